//! The sidecar's typed configuration: one model, fed by the YAML bootstrap file today and by the
//! control plane later (issue 'Control server'). Loading validates everything up front, and every
//! error names the file, the line and the field, so an operator can fix it without guessing.

pub use agentmesh_control_api::jwt::{JwtConfig, JwtIssuer};
pub use agentmesh_control_api::upstream::{
    is_dns_label, read_pem_certs, split_name, CallKind, CircuitBreakerConfig, Endpoint, LlmApi,
    Retries, Timeouts, TlsConfig, UpstreamConfig,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default bound on how much of a request body the sidecar inspects (design §3 step 2).
pub const DEFAULT_MAX_INSPECT_BYTES: usize = 1024 * 1024;

/// Why a configuration could not be loaded. The running config stays in force on any of these.
pub type ConfigError = agentmesh_control_api::FileError;

/// The whole sidecar configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The local agent this sidecar stands beside.
    pub agent: AgentConfig,
    #[serde(default)]
    pub listeners: Listeners,
    #[serde(default)]
    pub inbound: InboundConfig,
    #[serde(default)]
    pub limits: Limits,
    /// Upstreams the agent may call, by logical name (`llm/openai`, `mcp/search`, ...).
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// The Rego policy every call is decided by. Without one, every call is denied.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Model prices, for the cost of each LLM call.
    #[serde(default)]
    pub pricing: PricingConfig,
    /// Where traces go (docs/telemetry.md). Metrics are always on `/metrics`.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Names that resolve to several upstreams: `agents/by-skill/<skill>` (usually pushed by
    /// the control server).
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// The control server this sidecar subscribes to (docs/control.md); without it the file is
    /// the whole config.
    #[serde(default)]
    pub control: Option<ControlConfig>,
    /// The sidecar's SPIFFE identity (docs/identity.md): with it, calls between sidecars are
    /// mutually authenticated TLS; without it, the inbound listener takes plaintext only when
    /// `inbound.allow_plaintext` says so.
    #[serde(default)]
    pub identity: Option<IdentityConfig>,
    /// End-user JWTs: the issuers trusted for `Authorization: Bearer` tokens (docs/identity.md).
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Credentials the sidecar holds for its agent, by name, for upstreams' `credential`
    /// (docs/identity.md). Values are read at load and never shown.
    #[serde(default)]
    pub credentials: Vec<CredentialSource>,
}

/// Where a held credential's value is read from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CredentialSource {
    pub name: String,
    /// An environment variable of the sidecar ...
    #[serde(default)]
    pub env: Option<String>,
    /// ... or a file (relative to the config file; surrounding whitespace trimmed).
    #[serde(default)]
    pub file: Option<PathBuf>,
}

/// Where the sidecar's X.509-SVID comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The control server's API, which signs SVIDs: `https://127.0.0.1:15012`.
    pub ca_server: String,
    /// The control server's CA certificate (its `ca.pem`), trusted for that first contact.
    /// Relative to the config file.
    pub ca_file: PathBuf,
    /// A file holding the join token for the first SVID (relative to the config file).
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    /// Or the environment variable holding it.
    #[serde(default = "default_token_env")]
    pub join_token_env: String,
    /// Where the SVID and its key are kept between restarts (the key owner-only). Relative to
    /// the config file; default `.agentmesh/<agent>-identity` beside it.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Exchange the caller's token for one narrowed to each peer agent or tool (RFC 8693)
    /// before the call (default on).
    #[serde(default = "default_true")]
    pub token_exchange: bool,
}

fn default_token_env() -> String {
    "AGENTMESH_JOIN_TOKEN".into()
}

fn default_true() -> bool {
    true
}

fn default_trust_domain() -> String {
    agentmesh_control_api::identity::TRUST_DOMAIN.into()
}

/// A logical name balanced over several upstreams (those with an endpoint that takes calls).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `agents/by-skill/<skill>`.
    pub name: String,
    /// Upstream names, e.g. `agents/writer`.
    pub upstreams: Vec<String>,
}

/// The control-plane subscription.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// The discovery service, `http://127.0.0.1:15010`.
    pub address: String,
    /// `delta` (default: only changes travel) or `sotw` (every response is the whole set).
    #[serde(default)]
    pub mode: DiscoveryMode,
    /// Where the last good pushed config is kept, to start on when the control server is down.
    /// Relative to the config file; default `.agentmesh/<agent>.last-good.pb` beside it.
    #[serde(default)]
    pub persist_file: Option<PathBuf>,
    /// How other sidecars reach this agent (its inbound listener), announced to the control
    /// server; default `http://127.0.0.1:<inbound port>` when `inbound.forward_to` is set.
    #[serde(default)]
    pub advertise: Option<String>,
    /// This sidecar's id on the control server; default `<hostname>-<pid>`.
    #[serde(default)]
    pub node_id: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryMode {
    #[default]
    Delta,
    Sotw,
}

/// The skill routes' prefix.
pub const BY_SKILL: &str = "agents/by-skill/";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP trace export; without it no spans are made.
    pub traces: Option<TracesConfig>,
}

/// One span per call, exported over OTLP in batches that never hold a call back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TracesConfig {
    /// The collector: `http://host:4317` for gRPC, `http://host:4318/v1/traces` for HTTP.
    pub endpoint: String,
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// Sent with every export (e.g. a vendor's API key); shown redacted in `/config_dump`.
    #[serde(default, serialize_with = "redact_values")]
    pub headers: BTreeMap<String, String>,
    /// Longest one export may take.
    #[serde(default = "default_export_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Spans kept in memory while the collector is slow or down; past it spans are dropped
    /// (and counted in `/stats`), never calls held back.
    #[serde(default = "default_span_queue")]
    pub max_queue: usize,
    /// Put prompts, completions and tool arguments in spans. Off: spans carry only names,
    /// models, counts, decisions and costs.
    #[serde(default)]
    pub capture_content: bool,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    #[default]
    Grpc,
    /// HTTP with protobuf bodies.
    Http,
}

fn default_export_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_span_queue() -> usize {
    4096
}

fn redact_values<S: serde::Serializer>(
    m: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut out = s.serialize_map(Some(m.len()))?;
    for k in m.keys() {
        out.serialize_entry(k, "<redacted>")?;
    }
    out.end()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PricingConfig {
    /// A price table in LiteLLM's `model_prices_and_context_window.json` format, relative to
    /// the config file; without it a small built-in table is used.
    pub file: Option<PathBuf>,
}

/// Where the policy comes from and how its decisions apply (docs/policy.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// A directory of `.rego` and `data.json` files; relative to the config file's directory.
    pub path: Option<PathBuf>,
    /// The rule whose value is the decision.
    pub decision: String,
    /// `enforce` (default) or `audit`: decisions are logged and counted, denies not enforced.
    pub mode: PolicyMode,
    /// `interpreter` (default, the reference semantics) or `bytecode` (faster).
    pub engine: agentmesh_policy::EngineKind,
    /// Reuse a decision for calls that agree on every input path the policy reads.
    pub cache: PolicyCache,
    /// Input paths removed from decision-log entries (`/input/...`, as OPA's masks).
    pub decision_log_mask: Vec<String>,
    /// The window `input.budget.spent_usd` counts over (fixed, aligned to UTC midnight for
    /// `24h`). Read at start.
    #[serde(with = "humantime_serde")]
    pub budget_window: Duration,
}

/// The decision cache (docs/policy.md): keyed on the input paths the policy reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyCache {
    /// `auto` (default: on unless the policy reads `input.time` or the whole input, or calls a
    /// non-deterministic builtin), `on` or `off`.
    pub mode: agentmesh_policy::CacheMode,
    /// How long a decision is reused.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    pub max_entries: u64,
    /// Input paths left out of the key although the policy reads them (e.g. `/input/budget`,
    /// which changes with every LLM call): decisions are reused while they change.
    pub ignore: Vec<String>,
}

impl Default for PolicyCache {
    fn default() -> Self {
        PolicyCache {
            mode: agentmesh_policy::CacheMode::Auto,
            ttl: Duration::from_secs(10),
            max_entries: 10_000,
            ignore: Vec::new(),
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            path: None,
            decision: agentmesh_policy::DEFAULT_DECISION_PATH.into(),
            mode: PolicyMode::Enforce,
            engine: agentmesh_policy::EngineKind::Interpreter,
            cache: PolicyCache::default(),
            decision_log_mask: vec!["/input/mcp/arguments".into()],
            budget_window: Duration::from_secs(86_400),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    Enforce,
    Audit,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

fn default_namespace() -> String {
    "default".into()
}

/// Listener addresses (design §2). Port 0 picks a free port (used by tests).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Listeners {
    pub outbound: SocketAddr,
    pub inbound: Option<SocketAddr>,
    pub admin: SocketAddr,
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            outbound: "127.0.0.1:15001".parse().expect("valid literal"),
            inbound: Some("0.0.0.0:15006".parse().expect("valid literal")),
            admin: "127.0.0.1:15000".parse().expect("valid literal"),
        }
    }
}

/// Where inbound calls (from other sidecars) are delivered: the agent's own port.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InboundConfig {
    /// The agent's own server, e.g. `127.0.0.1:8080`. Without it the inbound listener is off.
    pub forward_to: Option<SocketAddr>,
    /// What the agent serves: `a2a` (default), `mcp` or `http`; decides how bodies are read.
    pub kind: CallKind,
    /// Accept plaintext from other sidecars. Closed by default; mTLS arrives with issue 6.
    pub allow_plaintext: bool,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Let inbound calls through when the policy fails to evaluate (default: deny them).
    pub fail_open: bool,
}

impl Default for InboundConfig {
    fn default() -> Self {
        InboundConfig {
            forward_to: None,
            kind: CallKind::A2a,
            allow_plaintext: false,
            timeout: Duration::from_secs(300),
            fail_open: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body the sidecar reads to classify a call; larger ones get a 413.
    pub max_inspect_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_inspect_body_bytes: DEFAULT_MAX_INSPECT_BYTES,
        }
    }
}

impl Config {
    /// Reads, parses and validates a YAML bootstrap file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::read(&file, e))?;
        let mut config = Config::from_yaml(&text, &file)?;
        // Relative paths are relative to the config file, wherever the sidecar starts.
        if let Some(dir) = path.parent() {
            let agent = config.agent.name.clone();
            if let Some(c) = config.control.as_mut() {
                c.persist_file.get_or_insert_with(|| {
                    PathBuf::from(format!(".agentmesh/{agent}.last-good.pb"))
                });
            }
            if let Some(i) = config.identity.as_mut() {
                i.dir
                    .get_or_insert_with(|| PathBuf::from(format!(".agentmesh/{agent}-identity")));
            }
            let identity = config.identity.as_mut().map(|i| {
                [
                    Some(&mut i.ca_file),
                    i.join_token_file.as_mut(),
                    i.dir.as_mut(),
                ]
            });
            let issuers = config
                .jwt
                .iter_mut()
                .flat_map(|j| j.issuers.iter_mut())
                .flat_map(|i| [i.jwks_file.as_mut(), i.ca_file.as_mut()]);
            let credentials = config.credentials.iter_mut().map(|c| c.file.as_mut());
            let fixed = [
                config.policy.path.as_mut(),
                config.pricing.file.as_mut(),
                config
                    .control
                    .as_mut()
                    .and_then(|c| c.persist_file.as_mut()),
            ];
            for p in fixed
                .into_iter()
                .chain(identity.into_iter().flatten())
                .chain(issuers)
                .chain(credentials)
                .flatten()
            {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        Ok(config)
    }

    /// Parses and validates YAML text; `file` is used in error messages.
    pub fn from_yaml(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = agentmesh_control_api::from_yaml(text, file)?;
        config.validate(file)?;
        Ok(config)
    }

    /// Checks what types alone cannot: names, URLs, duplicates, closed-by-default rules.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| ConfigError::invalid(file, field, message);
        if !is_dns_label(&self.agent.name) {
            return Err(invalid(
                "agent.name".into(),
                format!(
                    "`{}` is not a valid agent name (lowercase letters, digits and '-')",
                    self.agent.name
                ),
            ));
        }
        if let Some(t) = &self.telemetry.traces {
            let ok = t.endpoint.starts_with("http://") || t.endpoint.starts_with("https://");
            if !ok || t.endpoint.parse::<http::Uri>().is_err() {
                return Err(invalid(
                    "telemetry.traces.endpoint".into(),
                    format!("`{}` is not an http:// or https:// URL", t.endpoint),
                ));
            }
            if t.max_queue == 0 {
                return Err(invalid(
                    "telemetry.traces.max_queue".into(),
                    "must be at least 1".into(),
                ));
            }
        }
        let d = &self.policy.decision;
        if !d.starts_with("data.") || d.split('.').any(str::is_empty) {
            return Err(invalid(
                "policy.decision".into(),
                format!("`{d}` is not a rule path like `data.agentmesh.authz.decision`"),
            ));
        }
        let ignored = self.policy.cache.ignore.iter();
        let paths = self
            .policy
            .decision_log_mask
            .iter()
            .map(|m| ("policy.decision_log_mask", m))
            .chain(ignored.map(|m| ("policy.cache.ignore", m)));
        for (field, m) in paths {
            if !m.starts_with("/input/") {
                return Err(invalid(
                    field.into(),
                    format!("`{m}` is not an input path like `/input/mcp/arguments`"),
                ));
            }
        }
        if self.policy.budget_window < Duration::from_secs(1) {
            return Err(invalid(
                "policy.budget_window".into(),
                "must be at least 1s".into(),
            ));
        }
        let c = &self.policy.cache;
        if c.ttl.is_zero() || c.max_entries == 0 {
            return Err(invalid(
                "policy.cache".into(),
                "ttl and max_entries must be greater than 0 (`mode: off` turns the cache off)"
                    .into(),
            ));
        }
        if self.limits.max_inspect_body_bytes == 0 {
            return Err(invalid(
                "limits.max_inspect_body_bytes".into(),
                "must be greater than 0".into(),
            ));
        }
        let l = &self.listeners;
        let mut taken = vec![
            ("listeners.outbound", l.outbound),
            ("listeners.admin", l.admin),
        ];
        if let (Some(inbound), Some(_)) = (l.inbound, self.inbound.forward_to) {
            taken.push(("listeners.inbound", inbound));
        }
        for (i, (field, addr)) in taken.iter().enumerate() {
            if let Some((other, _)) = taken[..i].iter().find(|(_, a)| {
                a.port() == addr.port()
                    && (a.ip() == addr.ip()
                        || a.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            }) {
                return Err(invalid(
                    field.to_string(),
                    format!("{addr} is also `{other}`"),
                ));
            }
        }
        if let Some(fwd) = self.inbound.forward_to {
            if taken.iter().any(|(_, a)| {
                a.port() == fwd.port() && (a.ip() == fwd.ip() || a.ip().is_unspecified())
            }) {
                return Err(invalid(
                    "inbound.forward_to".into(),
                    format!("{fwd} is one of this sidecar's own listeners: calls would loop"),
                ));
            }
        }
        match (&self.identity, self.inbound.allow_plaintext) {
            (None, false) if self.inbound.forward_to.is_some() => {
                return Err(invalid(
                    "inbound.allow_plaintext".into(),
                    "calls between sidecars are mTLS, which needs an `identity`; set \
                     `allow_plaintext: true` to accept plaintext explicitly"
                        .into(),
                ))
            }
            (Some(_), true) => {
                return Err(invalid(
                    "inbound.allow_plaintext".into(),
                    "with an `identity`, the inbound listener takes mTLS only: remove \
                     `allow_plaintext`"
                        .into(),
                ))
            }
            _ => {}
        }
        let mut names = std::collections::HashSet::new();
        for (i, c) in self.credentials.iter().enumerate() {
            let at = |f: &str| format!("credentials[{i}].{f}");
            if !is_dns_label(&c.name) {
                return Err(invalid(
                    at("name"),
                    format!("`{}` is not a valid name", c.name),
                ));
            }
            if !names.insert(c.name.as_str()) {
                return Err(invalid(
                    at("name"),
                    format!("`{}` is declared twice", c.name),
                ));
            }
            if c.env.is_some() == c.file.is_some() {
                return Err(invalid(
                    at("env"),
                    "set exactly one of `env` and `file`".into(),
                ));
            }
        }
        if let Some(j) = &self.jwt {
            j.validate()
                .map_err(|e| invalid(format!("jwt.{}", e.field), e.message))?;
        }
        if let Some(i) = &self.identity {
            if !i.ca_server.starts_with("https://") || i.ca_server.parse::<http::Uri>().is_err() {
                return Err(invalid(
                    "identity.ca_server".into(),
                    format!("`{}` is not an https:// URL", i.ca_server),
                ));
            }
            if !is_dns_label(&i.trust_domain) {
                return Err(invalid(
                    "identity.trust_domain".into(),
                    format!("`{}` is not a trust domain", i.trust_domain),
                ));
            }
        }
        if let Some(c) = &self.control {
            let ok = c.address.starts_with("http://") || c.address.starts_with("https://");
            if !ok || c.address.parse::<http::Uri>().is_err() {
                return Err(invalid(
                    "control.address".into(),
                    format!("`{}` is not an http:// or https:// URL", c.address),
                ));
            }
            if let Some(a) = &c.advertise {
                Endpoint::parse(a).map_err(|m| invalid("control.advertise".into(), m))?;
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            let skill = r.name.strip_prefix(BY_SKILL).unwrap_or("");
            if !is_dns_label(skill) {
                return Err(invalid(
                    format!("routes[{i}].name"),
                    format!("`{}` must be `{BY_SKILL}<skill>`", r.name),
                ));
            }
            for (j, u) in r.upstreams.iter().enumerate() {
                if !self.upstreams.iter().any(|x| &x.name == u) {
                    return Err(invalid(
                        format!("routes[{i}].upstreams[{j}]"),
                        format!("no upstream `{u}`"),
                    ));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, up) in self.upstreams.iter().enumerate() {
            up.validate()
                .map_err(|e| invalid(format!("upstreams[{i}].{}", e.field), e.message))?;
            if !seen.insert(up.name.as_str()) {
                return Err(invalid(
                    format!("upstreams[{i}].name"),
                    format!("`{}` is declared twice", up.name),
                ));
            }
        }
        Ok(())
    }

    /// A copy safe to show on `/config_dump`: no credentials are held here yet, but the dump
    /// goes through this one function so that issue 6's secrets are masked in one place.
    pub fn redacted(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "agent: {name: planner}\nupstreams:\n  - name: llm/openai\n    endpoints: [\"https://api.openai.com\"]\n";

    #[test]
    fn loads_with_defaults() {
        let c = Config::from_yaml(GOOD, "a.yaml").unwrap();
        assert_eq!(c.listeners.outbound.port(), 15001);
        assert_eq!(c.listeners.admin.port(), 15000);
        assert_eq!(c.limits.max_inspect_body_bytes, 1 << 20);
        assert_eq!(c.upstreams[0].llm_api(), Some(LlmApi::Openai));
        assert_eq!(c.upstreams[0].retries.attempts, 2);
    }

    #[test]
    fn parse_error_names_file_line_and_field() {
        let bad = "agent: {name: planner}\nupstreams:\n  - name: llm/openai\n    endpoints: [\"http://x\"]\n    timeouts: {connect: soon}\n";
        let e = Config::from_yaml(bad, "boot.yaml").unwrap_err().to_string();
        assert!(e.starts_with("boot.yaml: "), "{e}");
        assert!(e.contains("upstreams[0].timeouts.connect"), "{e}");
        assert!(e.contains("line 5"), "{e}");
    }

    #[test]
    fn unknown_field_is_rejected() {
        let bad = "agent: {name: planner, nmae: x}\n";
        let e = Config::from_yaml(bad, "b.yaml").unwrap_err().to_string();
        assert!(e.contains("unknown field `nmae`"), "{e}");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn validation_names_the_field() {
        let cases = [
            ("agent: {name: Planner}\n", "agent.name"),
            ("agent: {name: p}\nupstreams: [{name: llm/x, endpoints: [\"http://a\"]}]\n", "upstreams[0].api"),
            ("agent: {name: p}\nupstreams: [{name: foo, endpoints: [\"http://a\"]}]\n", "upstreams[0].name"),
            ("agent: {name: p}\nupstreams: [{name: mcp/a, endpoints: []}]\n", "upstreams[0].endpoints"),
            ("agent: {name: p}\nupstreams: [{name: mcp/a, endpoints: [\"ftp://a\"]}]\n", "upstreams[0].endpoints[0]"),
            ("agent: {name: p}\nupstreams: [{name: mcp/a, endpoints: [\"http://a\"]}, {name: mcp/a, endpoints: [\"http://b\"]}]\n", "upstreams[1].name"),
            ("agent: {name: p}\ninbound: {forward_to: \"127.0.0.1:1\"}\n", "inbound.allow_plaintext"),
            ("agent: {name: p}\nlimits: {max_inspect_body_bytes: 0}\n", "limits.max_inspect_body_bytes"),
            ("agent: {name: p}\nlisteners: {outbound: \"127.0.0.1:7000\", admin: \"127.0.0.1:7000\"}\n", "listeners.admin"),
            ("agent: {name: p}\nlisteners: {inbound: \"0.0.0.0:7001\", outbound: \"127.0.0.1:7001\"}\ninbound: {forward_to: \"127.0.0.1:9\", allow_plaintext: true}\n", "listeners.inbound"),
            ("agent: {name: p}\ninbound: {forward_to: \"127.0.0.1:15001\", allow_plaintext: true}\n", "inbound.forward_to"),
        ];
        for (yaml, field) in cases {
            let e = Config::from_yaml(yaml, "c.yaml").unwrap_err().to_string();
            assert!(e.contains(&format!("field `{field}`")), "{yaml} -> {e}");
        }
    }

    #[test]
    fn shipped_examples_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/local");
        let c = Config::load(&dir.join("sidecar.yaml")).unwrap();
        assert_eq!(c.agent.name, "planner");
        assert_eq!(c.upstreams.len(), 3);
        let d = crate::state::Desired::from_config(c).unwrap();
        assert!(d.policy.is_some(), "the example's policy compiles");
        let doc = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md"),
        )
        .unwrap();
        let full = doc
            .split("```yaml")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("docs/configuration.md has a yaml example");
        // The example's CA path is illustrative; point it at a real PEM file for the check.
        let pem = std::env::temp_dir().join(format!("agentmesh-doc-ca-{}.pem", std::process::id()));
        let cert = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        std::fs::write(&pem, cert.cert.pem()).unwrap();
        let full = full.replace("/etc/agentmesh/ca.pem", pem.to_str().unwrap());
        Config::from_yaml(&full, "docs/configuration.md").unwrap();
        let bad = full.replace(pem.to_str().unwrap(), "/nonexistent/ca.pem");
        let e = Config::from_yaml(&bad, "d.md").unwrap_err().to_string();
        assert!(
            e.contains("upstreams[0].tls.ca_file") && e.contains("cannot read"),
            "{e}"
        );
        std::fs::write(&pem, "not a pem").unwrap();
        let e = Config::from_yaml(&full, "d.md").unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        let _ = std::fs::remove_file(&pem);
    }

    #[test]
    fn the_control_example_names_its_server_and_persists_beside_itself() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/control");
        let c = Config::load(&dir.join("planner-sidecar.yaml")).unwrap();
        let control = c.control.expect("a control section");
        assert_eq!(control.address, "http://127.0.0.1:15010");
        assert_eq!(control.mode, DiscoveryMode::Delta);
        assert_eq!(
            control.persist_file,
            Some(dir.join(".agentmesh/planner.last-good.pb"))
        );
        // Without `persist_file`, the default sits beside the config too.
        let text = "agent: {name: p}\ncontrol: {address: \"http://h:1\"}\n";
        let tmp = std::env::temp_dir().join(format!("am-ctl-{}.yaml", std::process::id()));
        std::fs::write(&tmp, text).unwrap();
        let c = Config::load(&tmp).unwrap();
        assert_eq!(
            c.control.unwrap().persist_file,
            Some(std::env::temp_dir().join(".agentmesh/p.last-good.pb"))
        );
        let _ = std::fs::remove_file(&tmp);
        let bad = "agent: {name: p}\ncontrol: {address: \"grpc://h\"}\n";
        let e = Config::from_yaml(bad, "c.yaml").unwrap_err().to_string();
        assert!(e.contains("field `control.address`"), "{e}");
        let bad =
            "agent: {name: p}\nroutes: [{name: agents/by-skill/x, upstreams: [agents/nobody]}]\n";
        let e = Config::from_yaml(bad, "c.yaml").unwrap_err().to_string();
        assert!(e.contains("field `routes[0].upstreams[0]`"), "{e}");
    }

    #[test]
    fn every_relative_path_is_relative_to_the_config_file() {
        let dir = std::env::temp_dir().join(format!("am-rel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("s.yaml");
        std::fs::write(
            &file,
            "agent: {name: p}\nidentity: {ca_server: \"https://h:1\", ca_file: ca.pem, join_token_file: tok}\njwt: {issuers: [{issuer: i, jwks_file: keys.json, ca_file: idp.pem}]}\ncredentials: [{name: k, file: k.txt}, {name: e, env: E}]\n",
        )
        .unwrap();
        let c = Config::load(&file).unwrap();
        let id = c.identity.unwrap();
        assert_eq!(id.ca_file, dir.join("ca.pem"));
        assert_eq!(id.join_token_file, Some(dir.join("tok")));
        assert_eq!(id.dir, Some(dir.join(".agentmesh/p-identity")));
        let iss = &c.jwt.unwrap().issuers[0];
        assert_eq!(iss.jwks_file, Some(dir.join("keys.json")));
        assert_eq!(iss.ca_file, Some(dir.join("idp.pem")));
        assert_eq!(c.credentials[0].file, Some(dir.join("k.txt")));
        assert_eq!(c.credentials[1].file, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn endpoints_parse() {
        let e = Endpoint::parse("https://api.openai.com").unwrap();
        assert_eq!(
            (e.tls, e.host.as_str(), e.port, e.base_path.as_str()),
            (true, "api.openai.com", 443, "")
        );
        let e = Endpoint::parse("http://127.0.0.1:9000/base/").unwrap();
        assert_eq!(
            (e.tls, e.host.as_str(), e.port, e.base_path.as_str()),
            (false, "127.0.0.1", 9000, "/base")
        );
        let e = Endpoint::parse("http://[::1]:80").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.authority.as_str()),
            ("::1", 80, "[::1]")
        );
        let e = Endpoint::parse("https://[::1]:8443/x").unwrap();
        assert_eq!(e.authority, "[::1]:8443");
        assert_eq!(
            Endpoint::parse("https://api.openai.com").unwrap().authority,
            "api.openai.com"
        );
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:9100").unwrap().authority,
            "127.0.0.1:9100"
        );
        assert!(Endpoint::parse("http://:80").is_err());
        assert!(Endpoint::parse("http://a:x").is_err());
    }
}
