//! Phase 5, route: resolve a request's logical address (`/llm/openai/...` or
//! `Host: openai.llm.mesh`) to an upstream, and pick one of its endpoints with round-robin over
//! those whose circuit is closed. Pure functions of (request, snapshot), tested without network.

use crate::config::{split_name, CallKind, CircuitBreakerConfig, Endpoint, UpstreamConfig};
use pingora::protocols::tls::CaType;
use pingora::utils::tls::WrappedX509;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A request's logical destination and the path to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// `llm/openai`, `mcp/tools`, ...
    pub name: String,
    pub kind: CallKind,
    /// Path (and query) after the logical prefix, e.g. `/v1/chat/completions`; may be empty.
    pub path: String,
}

/// Reads the logical address from the path (`/<kind>/<name>/rest`) or, failing that, from a
/// `Host: <name>.<kind>.mesh` header (then the whole path is forwarded).
pub fn resolve(path_and_query: &str, host: Option<&str>) -> Option<Address> {
    let trimmed = path_and_query.trim_start_matches('/');
    let mut parts = trimmed.splitn(3, '/');
    if let (Some(prefix), Some(name_q)) = (parts.next(), parts.next()) {
        // `/mcp/tools?x=1` has its query glued to the name.
        let (name, query) = match name_q.split_once('?') {
            Some((n, q)) => (n, Some(q)),
            None => (name_q, None),
        };
        // Strings joined with `concat`, not `format!`: this runs on every call.
        let mut logical = [prefix, "/", name].concat();
        let mut rest = parts.next();
        // `/agents/by-skill/<skill>/...`: the skill is part of the name.
        if logical == "agents/by-skill" && query.is_none() {
            let r = rest.unwrap_or("");
            let (skill, after) = r.split_once('/').map_or((r, None), |(s, a)| (s, Some(a)));
            let (skill, q) = skill
                .split_once('?')
                .map_or((skill, None), |(s, q)| (s, Some(q)));
            if !crate::config::is_dns_label(skill) {
                return None;
            }
            logical = [crate::config::BY_SKILL, skill].concat();
            let mut path = after.map(|a| ["/", a].concat()).unwrap_or_default();
            if let Some(q) = q {
                path.push('?');
                path.push_str(q);
            }
            return Some(Address {
                name: logical,
                kind: CallKind::A2a,
                path,
            });
        }
        if let Some((kind, _)) = split_name(&logical) {
            let mut path = rest.take().map(|r| ["/", r].concat()).unwrap_or_default();
            if let Some(q) = query {
                path.push('?');
                path.push_str(q);
            }
            return Some(Address {
                name: logical,
                kind,
                path,
            });
        }
    }
    let host = host?.split(':').next()?;
    let stem = host.strip_suffix(".mesh")?;
    let (name, prefix) = stem.rsplit_once('.')?;
    let logical = [prefix, "/", name].concat();
    let (kind, _) = split_name(&logical)?;
    Some(Address {
        name: logical,
        kind,
        path: path_and_query.to_string(),
    })
}

/// Joins an endpoint's base path and the forwarded path.
pub fn upstream_path(base: &str, forwarded: &str) -> String {
    match (base.is_empty(), forwarded.is_empty()) {
        (true, true) => "/".into(),
        (_, true) => base.to_string(),
        (_, false) if forwarded.starts_with('?') => {
            [if base.is_empty() { "/" } else { base }, forwarded].concat()
        }
        _ => [base, forwarded].concat(),
    }
}

/// How long a resolved endpoint address is reused before asking DNS again.
const DNS_TTL: Duration = Duration::from_secs(30);

/// Consecutive-failure circuit breaker for one endpoint.
#[derive(Debug)]
pub struct Breaker {
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which the circuit is open; 0 when closed.
    open_until_ms: AtomicU64,
}

impl Breaker {
    fn new() -> Self {
        Breaker {
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
        }
    }
}

/// Runtime state of one upstream: its config, parsed endpoints and their breakers.
#[derive(Debug)]
pub struct UpstreamState {
    pub config: UpstreamConfig,
    pub endpoints: Vec<Endpoint>,
    breakers: Vec<Breaker>,
    next: AtomicUsize,
    epoch: Instant,
    /// Connection-pool key: a hash of the upstream's config.
    pub pool_key: u64,
    /// Trusted roots from `tls.ca_file` or `tls.ca_pem`, read once per config version (not per connection).
    pub ca: Option<Result<Arc<CaType>, String>>,
    /// Last resolved address per endpoint, for names (IP literals never need DNS).
    resolved: Vec<std::sync::Mutex<Option<(Instant, std::net::SocketAddr)>>>,
}

/// Turns CA certificates (DER) into pingora's per-peer CA list.
fn load_ca(der: Result<Vec<Vec<u8>>, String>) -> Result<Arc<CaType>, String> {
    let certs: Vec<WrappedX509> = der?
        .into_iter()
        .map(|der| WrappedX509::new(der, pingora::utils::tls::parse_x509))
        .collect();
    Ok(Arc::from(certs.into_boxed_slice()))
}

impl UpstreamState {
    pub fn new(config: UpstreamConfig) -> Arc<Self> {
        let endpoints: Vec<Endpoint> = config
            .endpoints
            .iter()
            .filter_map(|e| Endpoint::parse(e).ok()) // validated at load
            .collect();
        let breakers = endpoints.iter().map(|_| Breaker::new()).collect();
        let n = endpoints.len();
        let pool_key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            config.name.hash(&mut h);
            format!("{:?}", config.tls).hash(&mut h);
            h.finish()
        };
        Arc::new(UpstreamState {
            endpoints,
            breakers,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            pool_key,
            ca: config.tls.ca_certs().map(load_ca),
            resolved: (0..n).map(|_| std::sync::Mutex::new(None)).collect(),
            config,
        })
    }

    /// The socket address of endpoint `i`: IP literals directly, names through DNS (off the
    /// worker thread) with the answer reused for `DNS_TTL`, so that a pooled connection is not
    /// preceded by a lookup on every call.
    pub async fn address(&self, i: usize) -> Result<std::net::SocketAddr, String> {
        let ep = &self.endpoints[i];
        if let Ok(ip) = ep.host.parse::<std::net::IpAddr>() {
            return Ok(std::net::SocketAddr::new(ip, ep.port));
        }
        let cached = *self.resolved[i].lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, addr)) = cached {
            if at.elapsed() < DNS_TTL {
                return Ok(addr);
            }
        }
        let addr = tokio::net::lookup_host((ep.host.as_str(), ep.port))
            .await
            .map_err(|e| format!("resolving {}: {e}", ep.host))?
            .next()
            .ok_or_else(|| format!("{} has no address", ep.host))?;
        *self.resolved[i].lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), addr));
        Ok(addr)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn cb(&self) -> &CircuitBreakerConfig {
        &self.config.circuit_breaker
    }

    /// Whether any endpoint may take a call now (without advancing the round-robin).
    pub fn available(&self) -> bool {
        let now = self.now_ms();
        self.breakers
            .iter()
            .any(|b| b.open_until_ms.load(Ordering::Relaxed) <= now)
    }

    /// Round-robin over endpoints whose circuit is closed, or whose cool-down has passed (one
    /// trial call). `None` when every circuit is open.
    pub fn pick(&self) -> Option<usize> {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| self.breakers[i].open_until_ms.load(Ordering::Relaxed) <= now)
    }

    pub fn record_success(&self, i: usize) {
        if let Some(b) = self.breakers.get(i) {
            b.failures.store(0, Ordering::Relaxed);
            b.open_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failure; returns true when this failure opened the circuit.
    pub fn record_failure(&self, i: usize) -> bool {
        let Some(b) = self.breakers.get(i) else {
            return false;
        };
        let threshold = self.cb().consecutive_failures;
        let n = b.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if threshold > 0 && n >= threshold {
            let until = self.now_ms() + self.cb().cool_down.as_millis() as u64;
            b.open_until_ms.store(until.max(1), Ordering::Relaxed);
            b.failures.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Time until the first circuit closes again, for the 503's `Retry-After`.
    pub fn retry_after(&self) -> Duration {
        let now = self.now_ms();
        let soonest = self
            .breakers
            .iter()
            .map(|b| b.open_until_ms.load(Ordering::Relaxed).saturating_sub(now))
            .min()
            .unwrap_or(0);
        Duration::from_millis(soonest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_path_addresses() {
        let a = resolve("/llm/openai/v1/chat/completions", None).unwrap();
        assert_eq!(
            (a.name.as_str(), a.kind, a.path.as_str()),
            ("llm/openai", CallKind::Llm, "/v1/chat/completions")
        );
        let a = resolve("/mcp/tools", None).unwrap();
        assert_eq!((a.name.as_str(), a.path.as_str()), ("mcp/tools", ""));
        let a = resolve("/mcp/tools?x=1", None).unwrap();
        assert_eq!((a.name.as_str(), a.path.as_str()), ("mcp/tools", "?x=1"));
        let a = resolve("/agents/by-skill/summarize/a2a/v1?x=1", None).unwrap();
        assert_eq!(
            (a.name.as_str(), a.kind, a.path.as_str()),
            ("agents/by-skill/summarize", CallKind::A2a, "/a2a/v1?x=1")
        );
        let a = resolve("/agents/by-skill/summarize", None).unwrap();
        assert_eq!(
            (a.name.as_str(), a.path.as_str()),
            ("agents/by-skill/summarize", "")
        );
        assert_eq!(resolve("/agents/by-skill/Bad!/x", None), None);
        let a = resolve("/agents/writer/", None).unwrap();
        assert_eq!((a.kind, a.path.as_str()), (CallKind::A2a, "/"));
        let a = resolve("/http/weather/v2/today?city=x", None).unwrap();
        assert_eq!(
            (a.kind, a.path.as_str()),
            (CallKind::Http, "/v2/today?city=x")
        );
    }

    #[test]
    fn resolves_host_addresses() {
        let a = resolve("/v1/messages", Some("anthropic.llm.mesh:15001")).unwrap();
        assert_eq!(
            (a.name.as_str(), a.path.as_str()),
            ("llm/anthropic", "/v1/messages")
        );
        let a = resolve("/", Some("writer.agents.mesh")).unwrap();
        assert_eq!(a.name, "agents/writer");
    }

    #[test]
    fn rejects_non_mesh_addresses() {
        assert_eq!(
            resolve("/v1/chat/completions", Some("api.openai.com")),
            None
        );
        assert_eq!(resolve("/foo/bar", None), None);
        assert_eq!(resolve("/llm/Bad!/x", None), None);
        assert_eq!(resolve("/", None), None);
    }

    #[test]
    fn joins_paths() {
        assert_eq!(upstream_path("", ""), "/");
        assert_eq!(upstream_path("/mcp", ""), "/mcp");
        assert_eq!(upstream_path("/mcp", "?a=b"), "/mcp?a=b");
        assert_eq!(upstream_path("", "?a=b"), "/?a=b");
        assert_eq!(upstream_path("/base", "/v1/x"), "/base/v1/x");
        assert_eq!(upstream_path("", "/v1/x"), "/v1/x");
    }

    fn upstream(n_endpoints: usize, failures: u32, cool: Duration) -> Arc<UpstreamState> {
        let yaml = format!(
            "name: mcp/t\nendpoints: [{}]\ncircuit_breaker: {{consecutive_failures: {failures}, cool_down: {}ms}}\n",
            (0..n_endpoints).map(|i| format!("\"http://127.0.0.1:{}\"", 1000 + i)).collect::<Vec<_>>().join(","),
            cool.as_millis()
        );
        UpstreamState::new(serde_yaml::from_str(&yaml).unwrap())
    }

    #[test]
    fn round_robin_skips_open_circuits() {
        let u = upstream(2, 2, Duration::from_secs(60));
        assert!(u.available());
        let picks: Vec<_> = (0..4).map(|_| u.pick().unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
        assert!(!u.record_failure(0));
        assert!(u.record_failure(0));
        assert!((0..4).all(|_| u.pick() == Some(1)));
        assert!(u.available());
        u.record_failure(1);
        u.record_failure(1);
        assert!(!u.available());
        assert_eq!(u.pick(), None);
        assert!(u.retry_after() > Duration::from_secs(50));
    }

    #[tokio::test]
    async fn addresses_resolve_and_are_cached() {
        let u = UpstreamState::new(
            serde_yaml::from_str(
                "name: http/x\nendpoints: [\"http://localhost:8080\", \"http://10.1.2.3\"]",
            )
            .unwrap(),
        );
        let a = u.address(0).await.unwrap();
        assert!(a.ip().is_loopback() && a.port() == 8080);
        assert!(
            u.resolved[0].lock().unwrap().is_some(),
            "the answer is kept"
        );
        assert_eq!(u.address(1).await.unwrap(), "10.1.2.3:80".parse().unwrap());
        assert!(
            u.resolved[1].lock().unwrap().is_none(),
            "IP literals skip DNS"
        );
    }

    #[test]
    fn success_resets_and_cool_down_reopens() {
        let u = upstream(1, 2, Duration::from_millis(0));
        u.record_failure(0);
        u.record_success(0);
        assert!(!u.record_failure(0), "success reset the count");
        let u = upstream(1, 1, Duration::from_millis(30));
        u.record_failure(0);
        assert_eq!(u.pick(), None);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(u.pick(), Some(0), "half-open after the cool-down");
        let off = upstream(1, 0, Duration::from_secs(1));
        for _ in 0..10 {
            assert!(!off.record_failure(0));
        }
        assert_eq!(off.pick(), Some(0));
    }
}
