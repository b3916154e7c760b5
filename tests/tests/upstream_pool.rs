//! The keep-alive pool of upstream connections (pingora-core patch 5, `idle_pool.rs`): which
//! connection is reused, what a full pool closes, idle timeouts, and the sweep of connections
//! the upstream closed. Driven through pingora's `TransportConnector` over real sockets, and
//! through a running sidecar against a real keep-alive upstream.

use agentmesh_tests::{Scratch, Sidecar};
use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::protocols::Stream;
use pingora::upstreams::peer::{BasicPeer, Peer};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A listener whose accepted sockets the test holds, to read from or close.
struct Upstream {
    peer: BasicPeer,
    port: u16,
    accepted: mpsc::UnboundedReceiver<TcpStream>,
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, accepted) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                if tx.send(s).is_err() {
                    return;
                }
            }
        });
        Upstream {
            peer: BasicPeer::new(&format!("127.0.0.1:{port}")),
            port,
            accepted,
        }
    }

    /// A new connection to this upstream, and the upstream's side of it.
    async fn connect(&mut self, connector: &TransportConnector) -> (Stream, TcpStream) {
        let stream = connector.new_stream(&self.peer).await.unwrap();
        (stream, self.accepted.recv().await.unwrap())
    }
}

/// Waits (up to 10 s) for the end of the stream on the upstream's side: the pool closed it.
async fn closed_by_the_pool(upstream_side: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), upstream_side.read(&mut buf)).await,
        Ok(Ok(0))
    )
}

/// Sockets of this machine to `port` in CLOSE_WAIT: the upstream closed them, this side not yet.
fn half_closed_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let remote_port = f[2].rsplit(':').next().unwrap();
            u16::from_str_radix(remote_port, 16).unwrap() == port && f[3] == "08"
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_released_last_is_reused_first() {
    let connector = TransportConnector::new(None);
    let mut up = Upstream::start().await;
    let (a, _a_up) = up.connect(&connector).await;
    let (b, _b_up) = up.connect(&connector).await;
    let (a_id, b_id) = (a.id(), b.id());
    connector.release_stream(a, up.peer.reuse_hash(), None);
    connector.release_stream(b, up.peer.reuse_hash(), None);
    let (first, reused) = connector.get_stream(&up.peer).await.unwrap();
    assert!(reused);
    assert_eq!(
        first.id(),
        b_id,
        "the warmest connection serves the next call"
    );
    let (second, reused) = connector.get_stream(&up.peer).await.unwrap();
    assert!(reused);
    assert_eq!(second.id(), a_id);
    let other = Upstream::start().await;
    let (_, reused) = connector.get_stream(&other.peer).await.unwrap();
    assert!(!reused, "a connection is only reused for its own peer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_closes_the_connection_idle_the_longest() {
    let evicted = Arc::new(AtomicUsize::new(0));
    let counter = evicted.clone();
    let mut options = ConnectorOptions::new(2);
    options.keepalive_pool_callback = Some(Arc::new(move |_idle: Duration| {
        counter.fetch_add(1, Ordering::Relaxed);
    }));
    let connector = TransportConnector::new(Some(options));
    let mut one = Upstream::start().await;
    let mut two = Upstream::start().await;
    let (a, mut a_up) = one.connect(&connector).await;
    let (b, _b_up) = two.connect(&connector).await;
    let (c, _c_up) = two.connect(&connector).await;
    let (b_id, c_id) = (b.id(), c.id());
    connector.release_stream(a, one.peer.reuse_hash(), None);
    connector.release_stream(b, two.peer.reuse_hash(), None);
    connector.release_stream(c, two.peer.reuse_hash(), None);
    assert_eq!(
        evicted.load(Ordering::Relaxed),
        1,
        "one connection made room"
    );
    assert!(closed_by_the_pool(&mut a_up).await, "the oldest went");
    assert!(!connector.get_stream(&one.peer).await.unwrap().1);
    let (s, reused) = connector.get_stream(&two.peer).await.unwrap();
    assert!(reused && s.id() == c_id);
    let (s, reused) = connector.get_stream(&two.peer).await.unwrap();
    assert!(reused && s.id() == b_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_its_idle_timeout_is_closed_and_not_reused() {
    let connector = TransportConnector::new(None);
    let mut up = Upstream::start().await;
    let (kept, _kept_up) = up.connect(&connector).await;
    let (expired, _expired_up) = up.connect(&connector).await;
    let (swept, mut swept_up) = up.connect(&connector).await;
    let kept_id = kept.id();
    connector.release_stream(kept, up.peer.reuse_hash(), None);
    connector.release_stream(expired, up.peer.reuse_hash(), Some(Duration::ZERO));
    // Taking a connection skips (and closes) the one past its timeout.
    let (s, reused) = connector.get_stream(&up.peer).await.unwrap();
    assert!(reused);
    assert_eq!(s.id(), kept_id);
    assert!(!connector.get_stream(&up.peer).await.unwrap().1);
    // One nobody asks for again is closed by the sweep.
    connector.release_stream(
        swept,
        up.peer.reuse_hash(),
        Some(Duration::from_millis(100)),
    );
    assert!(
        closed_by_the_pool(&mut swept_up).await,
        "the idle connection outlived its timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_upstream_closed_is_swept_and_not_reused() {
    let connector = TransportConnector::new(None);
    let mut up = Upstream::start().await;
    let (a, a_up) = up.connect(&connector).await;
    let (b, b_up) = up.connect(&connector).await;
    let (c, _c_up) = up.connect(&connector).await;
    let c_id = c.id();
    connector.release_stream(c, up.peer.reuse_hash(), None);
    connector.release_stream(a, up.peer.reuse_hash(), None);
    drop(a_up);
    // The reuse path skips a connection the upstream closed (checked when it is taken).
    let mut reused_id = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if half_closed_to(up.port) == 1 {
            let (s, reused) = connector.get_stream(&up.peer).await.unwrap();
            assert!(reused);
            reused_id = Some(s.id());
            break;
        }
    }
    assert_eq!(
        reused_id,
        Some(c_id),
        "the closed connection was handed out"
    );
    // The sweep closes one the upstream closed while nobody asked for it.
    connector.release_stream(b, up.peer.reuse_hash(), None);
    drop(b_up);
    let mut left = usize::MAX;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = half_closed_to(up.port);
        if left == 0 {
            break;
        }
    }
    assert_eq!(
        left, 0,
        "a connection the upstream closed was left half-open"
    );
}

/// A keep-alive HTTP/1.1 upstream that counts its connections; with `close_after_answer`, it
/// closes each connection once it has answered (without saying so), as servers with a short
/// keep-alive timeout do.
async fn keepalive_upstream(close_after_answer: bool) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.clear(); // GETs only: no body follows the head
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(answer).await.is_err() || close_after_answer {
                        return;
                    }
                }
            });
        }
    });
    (port, connections)
}

async fn pool_sidecar(tag: &str, port: u16, idle: &str) -> (Scratch, Sidecar) {
    let dir = Scratch::new(tag);
    let body = format!(
        "upstreams:\n  - name: http/pool\n    endpoints: [\"http://127.0.0.1:{port}\"]\n    timeouts: {{idle: {idle}}}\n"
    );
    let sc = Sidecar::start(&dir, &body).await;
    (dir, sc)
}

async fn get_ok(client: &reqwest::Client, sc: &Sidecar) {
    let r = client
        .get(sc.url("/http/pool/x"))
        .send()
        .await
        .expect("the call");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
}

#[tokio::test]
async fn calls_through_the_sidecar_share_a_pooled_connection_and_survive_its_close() {
    let (port, connections) = keepalive_upstream(false).await;
    let (_dir, sc) = pool_sidecar("pool-reuse", port, "60s").await;
    let client = reqwest::Client::new();
    for _ in 0..5 {
        get_ok(&client, &sc).await;
    }
    assert_eq!(
        connections.load(Ordering::Relaxed),
        1,
        "five calls, one connection"
    );

    // An upstream that closes each connection after its answer: every call still succeeds,
    // on a new connection, whether or not the pool has noticed the close yet.
    let (port, connections) = keepalive_upstream(true).await;
    let (_dir, sc) = pool_sidecar("pool-closed", port, "60s").await;
    for _ in 0..5 {
        get_ok(&client, &sc).await;
    }
    assert_eq!(connections.load(Ordering::Relaxed), 5);
}

#[tokio::test]
async fn the_sidecar_closes_an_upstream_connection_idle_past_its_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_dir, sc) = pool_sidecar("pool-idle", port, "1s").await;
    let outbound = sc.outbound;
    let call = tokio::spawn(async move {
        let mut s = TcpStream::connect(("127.0.0.1", outbound)).await.unwrap();
        s.write_all(b"GET /http/pool/x HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = vec![0u8; 4096];
        let n = s.read(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer[..n]).to_string()
    });
    let (mut up, _) = listener.accept().await.unwrap();
    let mut head = [0u8; 4096];
    let n = up.read(&mut head).await.unwrap();
    assert!(head[..n].ends_with(b"\r\n\r\n"));
    up.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await
        .unwrap();
    assert!(call.await.unwrap().starts_with("HTTP/1.1 200"));
    assert!(
        closed_by_the_pool(&mut up).await,
        "the pooled connection outlived its 1 s idle timeout"
    );
}
