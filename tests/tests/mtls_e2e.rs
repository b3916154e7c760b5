//! mTLS between sidecars with SVIDs from the control server's CA (issue 6): the happy path
//! between two agents with the caller's SPIFFE ID reaching the callee's policy input; peers
//! with no certificate, a certificate from another CA, an expired one, a non-agent SPIFFE ID, or
//! the wrong identity for the name called — each refused with the reason logged; plaintext
//! refused; TLS sessions between sidecars resumed; and SVID rotation under load without a
//! failed call.

use agentmesh_tests::control::{write_file, write_mesh, Control};
use agentmesh_tests::{Fixture, Scratch, Sidecar};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn mesh(extra_writer: &str) -> String {
    format!(
        "policies: [{{name: standard, path: policy}}]\nagents:\n  - {{name: planner, calls: {{agents: [writer]}}, policy: standard}}\n  - {{name: writer, policy: standard{extra_writer}}}\n  - {{name: editor, policy: standard}}\n"
    )
}

async fn sidecar(
    dir: &Scratch,
    control: &Control,
    agent: &str,
    inbound_to: Option<u16>,
) -> Sidecar {
    control.identity_sidecar(dir, agent, inbound_to, "").await
}

async fn get(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.expect("the sidecar answers");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool, show: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: {}", show());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn log_of(dir: &Scratch) -> String {
    std::fs::read_to_string(dir.path("sidecar.log")).unwrap_or_default()
}

/// A client certificate for `spiffe_id`, signed by the given issuer (or self-signed), valid
/// from `from` to `to` (unix seconds).
fn client_cert(
    spiffe_id: &str,
    issuer: Option<(&str, &str)>,
    from: i64,
    to: i64,
) -> reqwest::Identity {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.try_into().unwrap())];
    p.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
    p.not_after = time::OffsetDateTime::from_unix_timestamp(to).unwrap();
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = match issuer {
        Some((ca_pem, ca_key_pem)) => {
            let ca_key = rcgen::KeyPair::from_pem(ca_key_pem).unwrap();
            let ca = rcgen::CertificateParams::from_ca_cert_pem(ca_pem)
                .unwrap()
                .self_signed(&ca_key)
                .unwrap();
            p.signed_by(&key, &ca, &ca_key).unwrap()
        }
        None => p.self_signed(&key).unwrap(),
    };
    reqwest::Identity::from_pem(format!("{}{}", cert.pem(), key.serialize_pem()).as_bytes())
        .unwrap()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A client of the writer's inbound port, as a foreign sidecar would be: trusting the mesh's
/// root, presenting `identity`, a new connection for every call (TLS sessions are resumed).
fn inbound_client(
    control: &Control,
    port: u16,
    identity: Option<reqwest::Identity>,
) -> reqwest::Client {
    let ca = std::fs::read(control.state_dir.join("ca.pem")).unwrap();
    let mut b = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .tls_built_in_root_certs(false)
        .pool_max_idle_per_host(0)
        .resolve(
            "writer.default.agent.mesh.local",
            ([127, 0, 0, 1], port).into(),
        );
    if let Some(i) = identity {
        b = b.identity(i);
    }
    b.build().unwrap()
}

async fn call_with(client: &reqwest::Client, port: u16) -> Result<(u16, Value), String> {
    let r = client
        .get(format!(
            "https://writer.default.agent.mesh.local:{port}/healthz"
        ))
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

/// Calls the writer's inbound port directly, as a foreign sidecar would.
async fn call_inbound(
    control: &Control,
    port: u16,
    identity: Option<reqwest::Identity>,
) -> Result<(u16, Value), String> {
    call_with(&inbound_client(control, port, identity), port).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_call_each_other_over_mtls_and_refuse_everyone_else() {
    let dir = Scratch::new("mtls");
    let llm = Fixture::mock_llm(&dir, &[]).await;
    let conf = dir.path("mesh");
    write_mesh(&conf, &mesh(""));
    let control = Control::start(&conf).await;
    let (wd, pd) = (Scratch::new("mtls-writer"), Scratch::new("mtls-planner"));
    let writer = sidecar(&wd, &control, "writer", Some(llm.port)).await;
    let planner = sidecar(&pd, &control, "planner", None).await;
    let ready = planner.config_dump().await;
    assert_eq!(
        ready["identity"]["spiffe_id"],
        "spiffe://mesh.local/ns/default/agent/planner"
    );
    assert_eq!(ready["identity"]["ready"], true);

    // The happy path: planner → writer over mTLS, the caller known to the callee.
    planner
        .wait_dump(|d| {
            d["config"]["upstreams"].as_array().is_some_and(|u| {
                u.iter().any(|u| {
                    u["name"] == "agents/writer"
                        && u["endpoints"][0]
                            .as_str()
                            .is_some_and(|e| e.starts_with("https://"))
                })
            })
        })
        .await;
    let (s, v) = get(&planner.url("/agents/writer/healthz")).await;
    assert_eq!(s, 200, "{v}");
    let calls = writer.wait_calls(1).await;
    assert_eq!(calls[0]["source"], "planner", "{calls:?}");
    let decisions = writer.decisions();
    assert_eq!(
        decisions[0]["input"]["source"]["spiffe_id"],
        "spiffe://mesh.local/ns/default/agent/planner",
        "{decisions:?}"
    );
    assert_eq!(decisions[0]["input"]["source"]["agent"], "planner");
    let out = planner.decisions();
    assert_eq!(
        out[0]["input"]["source"]["spiffe_id"],
        "spiffe://mesh.local/ns/default/agent/planner"
    );

    // Session resumption: three overlapping calls need two connections besides the pooled one;
    // both resume the first session (its tickets), and the caller is still known on each.
    let slow = |_| async {
        reqwest::Client::new()
            .get(planner.url("/agents/writer/v1/models"))
            .header("x-mock-delay-ms", "300")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let statuses = futures::future::join_all((0..3).map(slow)).await;
    assert_eq!(statuses, [200, 200, 200]);
    let calls = writer.wait_calls(4).await;
    assert!(calls.iter().all(|c| c["source"] == "planner"), "{calls:?}");
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", writer.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let handshakes = |kind: &str| {
        let series = format!("agentmesh_inbound_tls_handshakes_total{{handshake=\"{kind}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .map_or(0.0, |v| v.parse::<f64>().unwrap())
    };
    assert_eq!(handshakes("full"), 1.0, "{metrics}");
    assert_eq!(handshakes("resumed"), 2.0, "{metrics}");

    // No client certificate: the handshake completes, the call is refused with the reason.
    let (s, v) = call_inbound(&control, writer.inbound, None).await.unwrap();
    assert_eq!(s, 401, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no client certificate"),
        "{v}"
    );
    // A certificate from another CA, an expired one: refused in the handshake, reason logged.
    let planner_id = "spiffe://mesh.local/ns/default/agent/planner";
    let foreign = client_cert(planner_id, None, now() - 60, now() + 3600);
    assert!(call_inbound(&control, writer.inbound, Some(foreign))
        .await
        .is_err());
    let ca_pem = std::fs::read_to_string(control.state_dir.join("ca.pem")).unwrap();
    let ca_key = std::fs::read_to_string(control.state_dir.join("ca-key.pem")).unwrap();
    let expired = client_cert(
        planner_id,
        Some((&ca_pem, &ca_key)),
        now() - 7200,
        now() - 3600,
    );
    assert!(call_inbound(&control, writer.inbound, Some(expired))
        .await
        .is_err());
    // Signed by the mesh's CA but not an agent's identity: refused with the reason.
    let odd = client_cert(
        "spiffe://mesh.local/ns/default/sa/backup",
        Some((&ca_pem, &ca_key)),
        now() - 60,
        now() + 3600,
    );
    let (s, v) = call_inbound(&control, writer.inbound, Some(odd))
        .await
        .unwrap();
    assert_eq!(s, 401, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not an agent SPIFFE ID"),
        "{v}"
    );
    wait_for(
        "the refusals are logged with their reasons",
        || {
            let log = log_of(&wd);
            log.contains("peer certificate refused")
                && log.contains("UnknownIssuer")
                && log.contains("certificate expired")
                && log.contains("no client certificate")
        },
        || log_of(&wd),
    )
    .await;
    // A resumed session is verified again: a certificate that expired since the handshake
    // that made the session is refused on resumption, though no certificate is exchanged.
    let short = client_cert(planner_id, Some((&ca_pem, &ca_key)), now() - 60, now() + 2);
    let client = inbound_client(&control, writer.inbound, Some(short));
    let (s, v) = call_with(&client, writer.inbound).await.unwrap();
    assert_eq!(s, 200, "{v}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (s, v) = call_with(&client, writer.inbound).await.unwrap();
    assert_eq!(s, 401, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the resumed session's certificate is no longer valid"),
        "{v}"
    );
    // Plaintext to the mTLS port gets nowhere.
    let plain = reqwest::get(format!("http://127.0.0.1:{}/healthz", writer.inbound)).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_wrong_identity_for_the_name_is_refused() {
    let dir = Scratch::new("mtls-wrong");
    let llm = Fixture::mock_llm(&dir, &[]).await;
    let conf = dir.path("mesh");
    write_mesh(&conf, &mesh(""));
    let control = Control::start(&conf).await;
    // The editor's sidecar, listed as the writer's endpoint: it answers with the editor's SVID.
    let ed = Scratch::new("mtls-editor");
    let editor = sidecar(&ed, &control, "editor", Some(llm.port)).await;
    write_file(
        &conf.join("mesh.yaml"),
        &mesh(&format!(
            ", endpoints: [\"https://127.0.0.1:{}\"]",
            editor.inbound
        )),
    );
    let pd = Scratch::new("mtls-wrong-planner");
    let planner = sidecar(&pd, &control, "planner", None).await;
    planner
        .wait_dump(|d| {
            d["config"]["upstreams"]
                .as_array()
                .is_some_and(|u| u.iter().any(|u| u["name"] == "agents/writer"))
        })
        .await;
    let (s, v) = get(&planner.url("/agents/writer/healthz")).await;
    assert_eq!(s, 502, "{v}");
    assert!(
        editor.calls().is_empty(),
        "nothing reached the impostor's agent"
    );
    wait_for(
        "the planner logs why",
        || {
            let log = log_of(&pd);
            log.contains("writer.default.agent.mesh.local") || log.contains("NotValidForName")
        },
        || log_of(&pd),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svids_rotate_under_load_without_a_failed_call() {
    // Six-second SVIDs: renewed every three seconds.
    let pair = Pair::start("mtls-rotate", "6s").await;
    let (writer, planner) = (&pair.writer, &pair.planner);
    let load = Load::start(planner.url("/agents/writer/healthz"));
    renewed(writer, planner, 2).await;
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "no call failed across rotations");
    assert!(ok > 100);
}

/// A control server issuing SVIDs that live `ttl`, and two sidecars over mTLS: the planner,
/// granted the writer, and the writer, whose server is the mock LLM.
struct Pair {
    control: Control,
    writer: Sidecar,
    planner: Sidecar,
    _keep: (Scratch, Scratch, Scratch, Fixture),
}

impl Pair {
    async fn start(tag: &str, ttl: &str) -> Pair {
        let dir = Scratch::new(tag);
        let llm = Fixture::mock_llm(&dir, &[]).await;
        let conf = dir.path("mesh");
        write_mesh(&conf, &mesh(""));
        let control =
            Control::start_with(&conf, &dir.path("control-state"), &["--svid-ttl", ttl]).await;
        let (wd, pd) = (
            Scratch::new(&format!("{tag}-writer")),
            Scratch::new(&format!("{tag}-planner")),
        );
        let writer = sidecar(&wd, &control, "writer", Some(llm.port)).await;
        let planner = sidecar(&pd, &control, "planner", None).await;
        planner
            .wait_dump(|d| {
                d["config"]["upstreams"]
                    .as_array()
                    .is_some_and(|u| u.iter().any(|u| u["name"] == "agents/writer"))
            })
            .await;
        Pair {
            control,
            writer,
            planner,
            _keep: (dir, wd, pd, llm),
        }
    }
}

/// Calls at a steady pace, opening a new connection now and then so that handshakes with
/// renewed SVIDs happen too; counts what succeeded and what failed.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(url: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            let mut client = reqwest::Client::new();
            while !s.load(Ordering::Relaxed) {
                n += 1;
                if n.is_multiple_of(20) {
                    client = reqwest::Client::new();
                }
                match client.get(&url).send().await.map(|r| r.status().as_u16()) {
                    Ok(200) => o.fetch_add(1, Ordering::Relaxed),
                    _ => f.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Load {
            stop,
            ok,
            failed,
            task,
        }
    }

    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Waits until both sidecars have renewed their SVIDs `more` times beyond what they had.
async fn renewed(a: &Sidecar, b: &Sidecar, more: u64) {
    let count = |d: Value| d["identity"]["renewals"].as_u64().unwrap_or(0);
    let (a0, b0) = (count(a.config_dump().await), count(b.config_dump().await));
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(a.config_dump().await) < a0 + more || count(b.config_dump().await) < b0 + more {
        assert!(Instant::now() < deadline, "SVIDs were not renewed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_rolls_over_under_load_without_a_failed_call() {
    let pair = Pair::start("mtls-rollover", "4s").await;
    let (control, writer, planner) = (&pair.control, &pair.writer, &pair.planner);
    let first_root = std::fs::read_to_string(control.state_dir.join("ca.pem")).unwrap();
    let load = Load::start(planner.url("/agents/writer/healthz"));
    let step_to = |step: &str| serde_json::json!({ "step": step });
    for (step, phase, roots) in [
        ("stage", "staged", 2),
        ("activate", "rolled", 2),
        ("retire", "steady", 1),
    ] {
        let (s, v) = control.post("/v1/ca/rollover", &step_to(step), true).await;
        assert_eq!(s, 200, "{step}: {v}");
        assert_eq!(
            (v["phase"].as_str(), v["roots"].as_u64()),
            (Some(phase), Some(roots)),
            "{v}"
        );
        // Every sidecar has the new bundle (and, after activation, an SVID from the new root)
        // before the next step.
        renewed(writer, planner, 2).await;
    }
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "no call failed during the rollover");
    assert!(ok > 100, "{ok}");
    let now = control.get("/v1/ca").await;
    assert_ne!(
        now["signing"].as_str().unwrap(),
        first_root,
        "a new root signs"
    );
    let (s, v) = control
        .post("/v1/ca/rollover", &step_to("activate"), true)
        .await;
    assert_eq!(s, 409, "nothing staged: {v}");
    let (s, _) = control
        .post("/v1/ca/rollover", &step_to("stage"), false)
        .await;
    assert_eq!(s, 401, "admin only");
}
