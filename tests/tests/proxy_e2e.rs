//! End-to-end behaviour of the sidecar with real processes on loopback: routing, grants,
//! failures and their JSON answers, retries, circuit breaking, timeouts, h2c, TLS + h2
//! origination, WebSocket, inbound, and hot reload.

use agentmesh_tests::{Fixture, Scratch, Sidecar};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn chat() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ping"}]})
}

async fn post(url: &str, body: &Value) -> (u16, Value) {
    agentmesh_tests::post_json(url, &[], body).await
}

/// A mock LLM and a sidecar that grants it as `llm/openai`; `fields` adds YAML lines to that
/// upstream (indented 4 spaces), `more` adds whole sections after it (`{LLM}` in it stands for
/// the mock's URL).
async fn openai_sidecar(tag: &str, fields: &str, more: &str) -> (Scratch, Fixture, Sidecar) {
    let dir = Scratch::new(tag);
    let llm = Fixture::mock_llm(&dir, &[]).await;
    let body = format!(
        "upstreams:\n  - name: llm/openai\n    endpoints: [\"{}\"]\n{fields}{}",
        llm.url(""),
        more.replace("{LLM}", &llm.url(""))
    );
    let sc = Sidecar::start(&dir, &body).await;
    (dir, llm, sc)
}

#[tokio::test]
async fn routes_by_path_and_host_and_refuses_unknown_names() {
    let (_dir, _llm, sc) = openai_sidecar("route", "", "").await;
    let (s, v) = post(&sc.url("/llm/openai/v1/chat/completions"), &chat()).await;
    assert_eq!(s, 200);
    assert_eq!(v["choices"][0]["message"]["content"], "Mock reply to: ping");
    // Host-based addressing: the path is forwarded whole.
    let r = reqwest::Client::new()
        .post(sc.url("/v1/chat/completions"))
        .header("host", "openai.llm.mesh")
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, v) = post(&sc.url("/llm/anthropic/v1/messages"), &chat()).await;
    assert_eq!(s, 403);
    assert_eq!(v["error"]["type"], "not_granted");
    assert_eq!(v["error"]["upstream"], "llm/anthropic");
    let (s, v) = post(&sc.url("/v1/chat/completions"), &chat()).await;
    assert_eq!((s, v["error"]["type"].as_str()), (404, Some("no_route")));
    let calls = sc.wait_calls(4).await;
    // Lines are written as each call's logging phase ends: a call answered early (a refusal)
    // may be logged after the next one has started, so compare them as a set.
    let mut statuses: Vec<_> = calls
        .iter()
        .map(|c| c["status"].as_u64().unwrap_or(0))
        .collect();
    statuses.sort();
    assert_eq!(
        statuses,
        vec![200, 200, 403, 404],
        "refusals are logged like any call"
    );
    let refused = calls
        .iter()
        .find(|c| c["status"] == 403)
        .expect("the refusal's line");
    assert_eq!(refused["error"], "not_granted");
    let unrouted = calls
        .iter()
        .find(|c| c["status"] == 404)
        .expect("the 404's line");
    assert_eq!(unrouted["error"], "no_route");
}

#[tokio::test]
async fn connect_failures_retry_then_open_the_circuit() {
    let dir = Scratch::new("breaker");
    let llm = Fixture::mock_llm(&dir, &[]).await;
    // Port 1: nothing listens there, so connections are refused (a free port picked now could
    // be taken by another suite's server by the time it is dialled).
    let dead = "http://127.0.0.1:1".to_string();
    let sc = Sidecar::start(
        &dir,
        &format!(
            "upstreams:\n  - name: llm/openai\n    endpoints: [\"{dead}\", \"{}\"]\n    circuit_breaker: {{consecutive_failures: 100}}\n\
             \x20 - name: http/down\n    endpoints: [\"{dead}\"]\n    retries: {{attempts: 0}}\n    circuit_breaker: {{consecutive_failures: 3, cool_down: 60s}}\n",
            llm.url("")
        ),
    )
    .await;
    // One endpoint refuses connections: every call still succeeds on the other.
    for _ in 0..4 {
        assert_eq!(
            post(&sc.url("/llm/openai/v1/chat/completions"), &chat())
                .await
                .0,
            200
        );
    }
    // Both endpoints were used, in turn: the healthy one answered every call.
    let calls = sc.wait_calls(4).await;
    assert!(calls.iter().all(|c| c["status"] == 200));
    // Only a dead endpoint, no retries: 502 naming the upstream for each of the 3 failures the
    // breaker counts, then 503 while the circuit is open.
    for _ in 0..3 {
        let r = reqwest::get(sc.url("/http/down/x")).await.unwrap();
        assert_eq!(r.status(), 502);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["upstream"], "http/down");
        assert_eq!(v["error"]["type"], "upstream_unavailable");
    }
    let r = reqwest::get(sc.url("/http/down/x")).await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "circuit_open");
}

/// A chat call to `url` that the mock LLM answers 2 s late.
async fn chat_answered_late(url: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .header("x-mock-delay-ms", "2000")
        .json(&chat())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn slow_upstream_gets_504_and_unsafe_calls_are_not_retried() {
    let (_dir, llm, sc) = openai_sidecar("timeout", "    timeouts: {read: 300ms}\n", "").await;
    let r = chat_answered_late(&sc.url("/llm/openai/v1/chat/completions")).await;
    assert_eq!(r.status(), 504);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "upstream_timeout");
    assert_eq!(v["error"]["upstream"], "llm/openai");
    let calls = sc.wait_calls(1).await;
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["status"], 504);
    // A POST is not idempotent: it was sent once, never retried.
    assert_eq!(llm.requests().await, 1);
    // A GET is: it was tried 1 + `retries.attempts` (2) times before the 504.
    let r = reqwest::Client::new()
        .get(sc.url("/llm/openai/v1/models"))
        .header("x-mock-delay-ms", "2000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(llm.requests().await, 1 + 3);
}

#[tokio::test]
async fn h2c_from_the_agent_and_h2_over_tls_to_the_provider() {
    let dir = Scratch::new("tls");
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.path("cert.pem"), ca.cert.pem()).unwrap();
    std::fs::write(dir.path("key.pem"), ca.key_pair.serialize_pem()).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.path("other.pem"), other.cert.pem()).unwrap();
    let cert = dir.path("cert.pem");
    let key = dir.path("key.pem");
    let llm = Fixture::mock_llm(
        &dir,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    let sc = Sidecar::start(
        &dir,
        &format!(
            "upstreams:\n  - name: llm/openai\n    endpoints: [\"https://127.0.0.1:{p}\"]\n    tls: {{ca_file: \"{c}\", sni: localhost}}\n\
             \x20 - name: llm/wrongca\n    api: openai\n    endpoints: [\"https://127.0.0.1:{p}\"]\n    tls: {{ca_file: \"{o}\", sni: localhost}}\n",
            p = llm.port,
            c = cert.display(),
            o = dir.path("other.pem").display()
        ),
    )
    .await;
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2c
        .post(sc.url("/llm/openai/v1/chat/completions"))
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.version(),
        reqwest::Version::HTTP_2,
        "the agent spoke h2c to the sidecar"
    );
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    // The provider saw HTTP/2, negotiated by ALPN over TLS.
    let version = h2c
        .get(sc.url("/llm/openai/debug/version"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(version, "HTTP/2.0");
    // Without `tls.ca_file` the system roots are used (rustls-native-certs, which honours
    // SSL_CERT_FILE): trusted when the test CA is the system's, refused when it is not.
    let sys = format!("upstreams:\n  - name: llm/openai\n    endpoints: [\"https://127.0.0.1:{}\"]\n    tls: {{sni: localhost}}\n", llm.port);
    let trusting = Sidecar::start_with_env(
        &Scratch::new("sysroots"),
        &sys,
        &[("SSL_CERT_FILE", cert.to_str().unwrap())],
    )
    .await;
    assert_eq!(
        post(&trusting.url("/llm/openai/v1/chat/completions"), &chat())
            .await
            .0,
        200
    );
    let other_roots = dir.path("other.pem");
    let distrusting = Sidecar::start_with_env(
        &Scratch::new("sysroots2"),
        &sys,
        &[("SSL_CERT_FILE", other_roots.to_str().unwrap())],
    )
    .await;
    let (s, v) = post(&distrusting.url("/llm/openai/v1/chat/completions"), &chat()).await;
    assert_eq!(
        (s, v["error"]["type"].as_str()),
        (502, Some("upstream_tls_error"))
    );

    // A certificate from another CA is refused with a clear 502.
    let (s, v) = post(&sc.url("/llm/wrongca/v1/chat/completions"), &chat()).await;
    assert_eq!(s, 502);
    assert_eq!(v["error"]["type"], "upstream_tls_error");
    assert_eq!(v["error"]["upstream"], "llm/wrongca");
}

#[tokio::test]
async fn websocket_upgrade_is_passed_through() {
    let (_dir, _llm, sc) = openai_sidecar("ws", "", "").await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", sc.outbound))
        .await
        .unwrap();
    s.write_all(
        b"GET /llm/openai/v1/realtime HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // A masked text frame "hi" (client frames must be masked).
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | 2];
    frame.extend_from_slice(&mask);
    frame.extend(b"hi".iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).await.unwrap();
    let mut reply = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply[0], 0x81);
    let mut payload = vec![0u8; (reply[1] & 0x7f) as usize];
    s.read_exact(&mut payload).await.unwrap();
    assert_eq!(payload, b"echo: hi");
}

#[tokio::test]
async fn inbound_calls_reach_the_local_agent_and_are_classified() {
    let dir = Scratch::new("inbound");
    let agent = Fixture::mock_llm(&dir, &[]).await; // stands in for the agent's own server
    let sc = Sidecar::start(
        &dir,
        &format!(
            "inbound: {{forward_to: \"127.0.0.1:{}\", kind: http, allow_plaintext: true}}\n",
            agent.port
        ),
    )
    .await;
    let r = reqwest::get(format!("http://127.0.0.1:{}/healthz", sc.inbound))
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    let calls = sc.wait_calls(1).await;
    assert_eq!(calls[0]["direction"], "inbound");
    assert_eq!(calls[0]["status"], 200);
}

#[tokio::test]
async fn hot_reload_applies_good_files_and_keeps_the_last_good_one() {
    let dir = Scratch::new("reload");
    let mcp = Fixture::mcp_tools(&dir).await;
    let a = format!(
        "upstreams:\n  - name: mcp/a\n    endpoints: [\"{}\"]\n",
        mcp.url("/mcp")
    );
    let sc = Sidecar::start(&dir, &a).await;
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25"}});
    assert_eq!(post(&sc.url("/mcp/b"), &init).await.0, 403);

    // A valid new file is picked up on change.
    let ab = format!(
        "{a}  - name: mcp/b\n    endpoints: [\"{}\"]\n",
        mcp.url("/mcp")
    );
    sc.rewrite(&ab);
    sc.wait_dump(|d| d["version"] == 2).await;
    assert_eq!(post(&sc.url("/mcp/b"), &init).await.0, 200);
    // Left alone, the file is not read again: the reload's own read is not a change.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let checks = sc.config_dump().await["status"]["checks"].clone();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(sc.config_dump().await["status"]["checks"], checks);

    // An invalid one is rejected with file, line and field; the running config stays.
    sc.rewrite(&format!("{ab}    timeouts: {{connect: soon}}\n"));
    let d = sc.wait_dump(|d| d["status"]["reloads_rejected"] == 1).await;
    let err = d["status"]["last_error"].as_str().unwrap().to_string();
    assert!(
        err.contains("sidecar.yaml") && err.contains("timeouts.connect") && err.contains("line"),
        "{err}"
    );
    assert_eq!(d["version"], 2);
    assert_eq!(post(&sc.url("/mcp/b"), &init).await.0, 200);

    // SIGHUP reloads too (here: back to a file without mcp/b).
    std::fs::write(
        &sc.config,
        Sidecar::config_text(sc.outbound, sc.admin, sc.inbound, &a),
    )
    .unwrap();
    // The file watcher may win the race; either way version 3 must come.
    let pid = sc.proc.0.id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status();
    sc.wait_dump(|d| d["version"] == 3).await;
    assert_eq!(post(&sc.url("/mcp/b"), &init).await.0, 403);
}

#[tokio::test]
async fn an_invalid_bootstrap_file_stops_the_start_with_its_error() {
    let dir = Scratch::new("badboot");
    let cfg = dir.path("bad.yaml");
    std::fs::write(&cfg, "agent: {name: x}\nupstreams:\n  - name: llm/acme\n    endpoints: [\"http://127.0.0.1:1\"]\n").unwrap();
    let out = std::process::Command::new(agentmesh_tests::bin_dir().join("agentmesh-proxy"))
        .args(["--config", cfg.to_str().unwrap(), "--check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml") && err.contains("upstreams[0].api"),
        "{err}"
    );
}

/// Data segments a TCP socket has received (Linux `tcpi_data_segs_in`).
#[allow(unsafe_code)]
fn data_segments_in(s: &impl std::os::fd::AsRawFd) -> u32 {
    // SAFETY: tcp_info is plain integers, for which all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which this frame owns.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    info.tcpi_data_segs_in
}

/// Reads one HTTP/1.1 message (head and `Content-Length` body) off a blocking socket; with
/// `continue_on_expect`, answers `100 Continue` when the head asks for it before reading on.
fn read_message(s: &mut std::net::TcpStream, continue_on_expect: bool) -> (String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before the head ended: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    if continue_on_expect && head.contains("expect: 100-continue") {
        s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
    }
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before the body ended");
        buf.extend_from_slice(&chunk[..n]);
    }
    (head, buf[head_end..].to_vec())
}

/// An upstream on a plain socket: serves one call, answering `answer_len` bytes, and returns
/// the request's head, body and the data segments it arrived in.
fn one_call_upstream(
    answer_len: usize,
    extra_headers: &'static str,
) -> (u16, std::thread::JoinHandle<(String, Vec<u8>, u32)>) {
    use std::io::Write;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let (head, body) = read_message(&mut c, true);
        let segments = data_segments_in(&c);
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n{extra_headers}content-length: {answer_len}\r\n\r\n"
        )
        .into_bytes();
        answer.resize(answer.len() + answer_len, b'x');
        c.write_all(&answer).unwrap();
        (head, body, segments)
    });
    (port, server)
}

/// A sidecar whose `http/seg` route leads to `one_call_upstream(answer_len, extra_headers)`.
async fn sidecar_before_one_call(
    tag: &str,
    answer_len: usize,
    extra_headers: &'static str,
) -> (
    Scratch,
    Fixture,
    Sidecar,
    std::thread::JoinHandle<(String, Vec<u8>, u32)>,
) {
    let (port, upstream) = one_call_upstream(answer_len, extra_headers);
    let more = format!("  - name: http/seg\n    endpoints: [\"http://127.0.0.1:{port}\"]\n");
    let (dir, llm, sc) = openai_sidecar(tag, "", &more).await;
    (dir, llm, sc, upstream)
}

#[tokio::test]
async fn a_call_and_its_answer_each_travel_in_one_segment() {
    // pingora sent a request's head and body in two segments, and an answer's head apart from
    // a body that did not fit beside it in its 1,460-byte buffer: each woke the receiver twice.
    let (_dir, _llm, sc, upstream) = sidecar_before_one_call("segments", 4096, "").await;
    let outbound = sc.outbound;
    let (head, segments_to_agent) = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let body = vec![b'a'; 2000];
        let mut request = format!(
            "POST /http/seg/upload HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        let mut s = std::net::TcpStream::connect(("127.0.0.1", outbound)).unwrap();
        s.write_all(&request).unwrap();
        let (head, answer) = read_message(&mut s, false);
        assert_eq!(answer.len(), 4096);
        (head, data_segments_in(&s))
    })
    .await
    .unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let (up_head, up_body, segments_to_upstream) = upstream.join().unwrap();
    assert!(up_head.starts_with("post /upload "), "{up_head}");
    assert_eq!(up_body.len(), 2000);
    assert_eq!(
        segments_to_upstream, 1,
        "the request left the sidecar in pieces"
    );
    assert_eq!(
        segments_to_agent, 1,
        "the answer left the sidecar in pieces"
    );
}

/// pingora's own upstream session over a real socket to `addr`, its `GET /answer` sent.
async fn upstream_session_asking(
    addr: std::net::SocketAddr,
) -> pingora::protocols::http::v1::client::HttpSession {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream: pingora::protocols::l4::stream::Stream = stream.into();
    let mut session = pingora::protocols::http::v1::client::HttpSession::new(Box::new(stream));
    let mut req = pingora::http::RequestHeader::build("GET", b"/answer", None).unwrap();
    req.insert_header("host", "upstream").unwrap();
    session.write_request_header(Box::new(req)).await.unwrap();
    session
}

/// The one connection to `listener`, once a request head (with no body) has come on it.
async fn accept_one_head(listener: &tokio::net::TcpListener) -> tokio::net::TcpStream {
    let (mut s, _) = listener.accept().await.unwrap();
    let mut head = vec![0u8; 1024];
    let n = s.read(&mut head).await.unwrap();
    assert!(head[..n].ends_with(b"\r\n\r\n"));
    s
}

#[tokio::test]
async fn an_answer_of_a_few_kib_is_read_from_the_upstream_in_one_go() {
    // pingora's first read of an answer took 4 KiB, so an answer of a few KiB, which arrives
    // whole, cost a second read (and often a second wake-up) for the rest of its body. Driven
    // through pingora's own upstream session over a real socket: the part of the body read with
    // the header is the first body chunk, so it must be the whole body.
    let body = vec![b'x'; 6000];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = {
        let mut a = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        a.extend_from_slice(&body);
        a
    };
    let (written_tx, written) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        let mut s = accept_one_head(&listener).await;
        // One write; on loopback its bytes are in the client's socket once it returns.
        s.write_all(&answer).await.unwrap();
        written_tx.send(()).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap(); // hold the connection until the client is done
    });
    let mut session = upstream_session_asking(addr).await;
    written.await.unwrap(); // the whole answer is there to read
    session.read_response().await.unwrap();
    let first = session.read_body_bytes().await.unwrap().expect("a body");
    assert_eq!(
        first.len(),
        body.len(),
        "the answer's body was read in pieces: the first read held only part of it"
    );
    assert!(session.is_body_done());
    drop(session);
    server.await.unwrap();
}

#[tokio::test]
async fn an_answer_whose_body_trails_its_header_is_read_whole_and_has_room_for_added_headers() {
    // pingora-core patches 6 and 7: the body buffer starts at the size of the body bytes that
    // came with the header and grows when the stream has more (a large body, sent in pieces
    // after the header, must still arrive whole and in order); the parsed header map has room
    // for the headers a proxy adds (the answer's `Date` and `Connection`) without growing.
    let body: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (first_read_tx, first_read) = tokio::sync::oneshot::channel::<()>();
    let sent = body.clone();
    let server = tokio::spawn(async move {
        let mut s = accept_one_head(&listener).await;
        let mut a = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
            sent.len()
        )
        .into_bytes();
        a.extend_from_slice(&sent[..100]);
        s.write_all(&a).await.unwrap();
        first_read.await.unwrap(); // the client has read the header and the first 100 bytes
        for piece in sent[100..].chunks(7_000) {
            s.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
    });
    let mut session = upstream_session_asking(addr).await;
    session.read_response().await.unwrap();
    let headers = &session.resp_header().unwrap().headers;
    assert!(
        headers.capacity() >= headers.len() + 2,
        "the parsed answer's header map is full ({} of {}): adding Date and Connection grows it",
        headers.len(),
        headers.capacity()
    );
    let mut got = session
        .read_body_bytes()
        .await
        .unwrap()
        .expect("a body")
        .to_vec();
    assert_eq!(got, body[..100], "the body bytes read with the header");
    first_read_tx.send(()).unwrap();
    while let Some(chunk) = session.read_body_bytes().await.unwrap() {
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got.len(), body.len());
    assert!(got == body, "the body arrived changed or out of order");
    assert!(session.is_body_done());
    drop(session);
    server.await.unwrap();
}

#[tokio::test]
async fn an_encoded_answer_passes_through_as_the_upstream_sent_it() {
    // The sidecar never compresses or decompresses (it registers none of pingora's
    // compression modules): the upstream's `Content-Encoding` and bytes reach the agent as
    // sent, and the agent's `Accept-Encoding` reaches the upstream.
    let (_dir, _llm, sc, upstream) =
        sidecar_before_one_call("encoded", 300, "content-encoding: gzip\r\n").await;
    let outbound = sc.outbound;
    let (head, body) = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", outbound)).unwrap();
        s.write_all(b"GET /http/seg/data HTTP/1.1\r\nhost: x\r\naccept-encoding: gzip, br\r\n\r\n")
            .unwrap();
        read_message(&mut s, false)
    })
    .await
    .unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("\r\ncontent-encoding: gzip\r\n"), "{head}");
    assert!(head.contains("\r\ncontent-length: 300\r\n"), "{head}");
    assert_eq!(body, vec![b'x'; 300]);
    let (up_head, _, _) = upstream.join().unwrap();
    assert!(
        up_head.contains("\r\naccept-encoding: gzip, br\r\n"),
        "{up_head}"
    );
}

#[tokio::test]
async fn a_client_waiting_for_100_continue_gets_it_from_the_upstream() {
    // The head is flushed alone when the client waits for `100 Continue` before its body.
    let (_dir, _llm, sc, upstream) = sidecar_before_one_call("continue", 2, "").await;
    let outbound = sc.outbound;
    let head = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", outbound)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(
            b"POST /http/seg/upload HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n",
        )
        .unwrap();
        let mut interim = [0u8; 25];
        s.read_exact(&mut interim)
            .expect("no 100 Continue: the head never reached the upstream");
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(b"hello").unwrap();
        read_message(&mut s, false).0
    })
    .await
    .unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let (_, body, _) = upstream.join().unwrap();
    assert_eq!(body, b"hello");
}

/// The names of a process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap())
        .map(|n| n.trim().to_string())
        .collect()
}

#[tokio::test]
async fn calls_under_timeouts_of_a_second_or_more_need_no_timer_thread() {
    // Every default timeout (connect 2 s, read 120 s, idle 60 s) runs on tokio's timer, in the
    // worker's event loop: pingora's own timer thread, which wakes every 10 ms on the worker's
    // CPU, is never started. A sub-second timeout still works, on pingora's timer.
    let more = "  - name: http/quick\n    endpoints: [\"{LLM}\"]\n    timeouts: {connect: 1s, read: 300ms, idle: 60s}\n";
    let (_dir, _llm, sc) = openai_sidecar("timer", "", more).await;
    for _ in 0..3 {
        let (s, _) = post(&sc.url("/llm/openai/v1/chat/completions"), &chat()).await;
        assert_eq!(s, 200);
    }
    let pid = sc.proc.0.id();
    let names = thread_names(pid);
    assert!(
        !names.iter().any(|n| n == "Timer thread"),
        "pingora's timer thread runs: {names:?}"
    );
    // The 300 ms read timeout, against an answer 2 s late.
    let r = chat_answered_late(&sc.url("/http/quick/v1/chat/completions")).await;
    assert_eq!(r.status(), 504);
    assert!(thread_names(pid).iter().any(|n| n == "Timer thread"));
}

#[test]
fn the_allocator_sweeps_its_thread_cache_per_4_mib_not_per_call() {
    // jemalloc prints the options in force at exit when asked to in its environment variable,
    // which is read after the binary's built-in options: so this shows both are applied.
    let dir = Scratch::new("malloc-conf");
    let cfg = dir.path("ok.yaml");
    std::fs::write(&cfg, "agent: {name: x}\n").unwrap();
    let out = std::process::Command::new(agentmesh_tests::bin_dir().join("agentmesh-proxy"))
        .args(["--config", cfg.to_str().unwrap(), "--check"])
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stats = String::from_utf8_lossy(&out.stderr);
    assert!(stats.contains("opt.stats_print: true"), "{stats}");
    assert!(
        stats.contains("opt.tcache_gc_incr_bytes: 4194304"),
        "{stats}"
    );
}

#[tokio::test]
async fn bodies_stream_on_http_routes_and_are_bounded_on_inspected_ones() {
    let more = "  - name: http/echo\n    endpoints: [\"{LLM}\"]\nlimits: {max_inspect_body_bytes: 65536}\n";
    let (_dir, _llm, sc) = openai_sidecar("bodies", "", more).await;
    // A 3 MiB upload on a plain http/ route is streamed through, not bounded.
    let big = vec![b'a'; 3 << 20];
    let r = reqwest::Client::new()
        .post(sc.url("/http/echo/debug/echo"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["bytes"], 3 << 20);

    // A chunked body (no Content-Length) that grows past the bound on an llm/ route: 413.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", sc.outbound))
        .await
        .unwrap();
    s.write_all(b"POST /llm/openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n")
        .await
        .unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 16384, "x".repeat(16384));
    for _ in 0..6 {
        if s.write_all(chunk.as_bytes()).await.is_err() {
            break; // the sidecar may already have answered and closed
        }
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");

    // A Content-Length over the bound is refused before the body is read.
    let r = reqwest::Client::new()
        .post(sc.url("/llm/openai/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(vec![b' '; 70000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // The sidecar still serves.
    assert_eq!(
        post(&sc.url("/llm/openai/v1/chat/completions"), &chat())
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn a_taken_port_stops_the_start_with_a_clear_error() {
    let dir = Scratch::new("taken");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = dir.path("c.yaml");
    let [admin, inbound] = agentmesh_tests::free_ports::<2>();
    std::fs::write(&cfg, Sidecar::config_text(port, admin, inbound, "")).unwrap();
    let out = std::process::Command::new(agentmesh_tests::bin_dir().join("agentmesh-proxy"))
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cannot listen on 127.0.0.1:{port} (outbound listener)"
        )),
        "{err}"
    );
}

#[tokio::test]
async fn an_sse_stream_over_h2c_arrives_chunk_by_chunk() {
    // The accepted connections' 16 KiB write buffer must not hold back an h2 stream's frames.
    use futures::StreamExt;
    let (_dir, _llm, sc) = openai_sidecar("h2c-sse", "", "").await;
    let body = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "one two three"}]});
    let resp = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap()
        .post(sc.url("/llm/openai/v1/chat/completions"))
        .header("x-mock-chunk-delay-ms", "200")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let mut stream = resp.bytes_stream();
    let mut arrivals = Vec::new();
    let mut text = Vec::new();
    while let Some(chunk) = stream.next().await {
        arrivals.push(std::time::Instant::now());
        text.extend_from_slice(&chunk.unwrap());
    }
    assert!(String::from_utf8_lossy(&text)
        .trim_end()
        .ends_with("data: [DONE]"));
    // The mock waits 200 ms between its chunks: passed through, they arrive over ~1.6 s, not
    // at once.
    assert!(arrivals.len() >= 5, "{} pieces", arrivals.len());
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(spread >= Duration::from_millis(600), "{spread:?}");
}

#[tokio::test]
async fn sigterm_lets_an_open_stream_finish_before_exit() {
    use futures::StreamExt;
    let (_dir, _llm, mut sc) = openai_sidecar("drain", "", "").await;
    let body = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "one two three four five six"}]});
    let resp = reqwest::Client::new()
        .post(sc.url("/llm/openai/v1/chat/completions"))
        .header("x-mock-chunk-delay-ms", "250")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    // The stream has ~3 s to go; the sidecar is told to stop now.
    let pid = sc.proc.0.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.expect("the stream is not cut"));
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.trim_end().ends_with("data: [DONE]"),
        "stream ended early: {rest}"
    );
    // ...and then the process exits by itself.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = sc.proc.0.try_wait().unwrap() {
            assert!(status.success() || status.code().is_none(), "{status:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the sidecar did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_configmap_style_symlink_swap_is_reloaded() {
    use std::os::unix::fs::symlink;
    // Kubernetes mounts a ConfigMap as `file -> ..data/file`, `..data -> ..<timestamp>`, and
    // updates it by pointing a new `..data_tmp` at a new directory and renaming it over `..data`.
    let dir = Scratch::new("configmap");
    let llm = Fixture::mock_llm(&dir, &[]).await;
    let [outbound, admin, inbound] = agentmesh_tests::free_ports::<3>();
    let version = |n: u32, body: &str| {
        let v = dir.path(&format!("..v{n}"));
        std::fs::create_dir_all(&v).unwrap();
        std::fs::write(
            v.join("sidecar.yaml"),
            Sidecar::config_text(outbound, admin, inbound, body),
        )
        .unwrap();
    };
    version(1, "");
    symlink("..v1", dir.path("..data")).unwrap();
    symlink("..data/sidecar.yaml", dir.path("sidecar.yaml")).unwrap();
    let cfg = dir.path("sidecar.yaml");
    let _proc = agentmesh_tests::spawn(
        "agentmesh-proxy",
        &["--config", cfg.to_str().unwrap(), "--access-log", "off"],
        &dir.path("sidecar.log"),
    );
    agentmesh_tests::wait_ok(&format!("http://127.0.0.1:{admin}/readyz")).await;
    let url = format!("http://127.0.0.1:{outbound}/llm/openai/v1/chat/completions");
    assert_eq!(post(&url, &chat()).await.0, 403);

    version(
        2,
        &format!(
            "upstreams:\n  - name: llm/openai\n    endpoints: [\"{}\"]\n",
            llm.url("")
        ),
    );
    symlink("..v2", dir.path("..data_tmp")).unwrap();
    std::fs::rename(dir.path("..data_tmp"), dir.path("..data")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while post(&url, &chat()).await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the swapped ConfigMap was never loaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_log_filter_changes_at_runtime_from_the_admin_port() {
    let (_dir, _llm, sc) = openai_sidecar("logging", "", "").await;
    let url = format!("http://127.0.0.1:{}/logging", sc.admin);
    let c = reqwest::Client::new();
    let v: Value = c.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["filter"], "info,pingora=warn");
    let r = c
        .post(format!("{url}?filter=info%2Cagentmesh_proxy%3Ddebug"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = c.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["filter"], "info,agentmesh_proxy=debug");
    // The new filter is in force: the sidecar's own log says so.
    let log = std::fs::read_to_string(_dir.path("sidecar.log")).unwrap();
    assert!(log.contains("log filter changed"), "{log}");
    let r = c
        .post(format!("{url}?filter=%3D%3D%3D"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid filter"),
        "{v}"
    );
}
