//! `pingora-floor`: the smallest pingora reverse proxy (one upstream, no phases of ours), used by
//! `scripts/bench.sh` to show how much of the sidecar's added latency is pingora's own and how
//! much is agentmesh's work (classification, usage reading, routing).
//!
//! `pingora-floor LISTEN_ADDR UPSTREAM_ADDR [THREADS]`

use async_trait::async_trait;
use pingora::prelude::*;

// The sidecar's allocator and options, so that the floor differs from the sidecar only in the
// sidecar's own phases.
#[path = "../../../proxy/src/allocator.rs"]
mod allocator;

struct Floor(String);

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.0.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: pingora-floor LISTEN_ADDR UPSTREAM_ADDR [THREADS]");
        std::process::exit(2);
    };
    let conf = pingora::server::configuration::ServerConf {
        threads: args.get(3).and_then(|t| t.parse().ok()).unwrap_or(2),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = pingora_proxy::http_proxy_service(&server.configuration, Floor(upstream.clone()));
    svc.add_tcp(listen);
    server.add_service(svc);
    server.run_forever();
}
