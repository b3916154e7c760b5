//! The upstream model that the sidecar's bootstrap file, the control server's YAML source and
//! the discovery protocol all carry: what an agent may call by logical name (`llm/openai`,
//! `mcp/search`, `agents/writer`, `http/x`), its endpoints, timeouts, retries, circuit breaker
//! and TLS, with the validation every source applies and the conversions to and from the wire
//! `Upstream`. One model, so that a config is the same whichever way it arrives.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The kind of a call, from the upstream's logical name prefix (design §2).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum CallKind {
    Llm,
    Mcp,
    A2a,
    Http,
}

impl CallKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CallKind::Llm => "llm",
            CallKind::Mcp => "mcp",
            CallKind::A2a => "a2a",
            CallKind::Http => "http",
        }
    }

    /// The name prefix that selects this kind: `llm/`, `mcp/`, `agents/`, `http/`.
    pub fn from_prefix(prefix: &str) -> Option<CallKind> {
        match prefix {
            "llm" => Some(CallKind::Llm),
            "mcp" => Some(CallKind::Mcp),
            "agents" => Some(CallKind::A2a),
            "http" => Some(CallKind::Http),
            _ => None,
        }
    }

    /// Whether requests of this kind have their JSON body read before forwarding.
    pub fn inspects_body(self) -> bool {
        !matches!(self, CallKind::Http)
    }
}

/// LLM API family an `llm/*` upstream speaks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LlmApi {
    Openai,
    Anthropic,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Logical name: `llm/<provider>`, `mcp/<server>`, `agents/<agent>` or `http/<name>`.
    pub name: String,
    /// Base URLs, e.g. `https://api.openai.com` or `http://127.0.0.1:9000/base`.
    pub endpoints: Vec<String>,
    /// For `llm/*`: the API family; inferred for the providers `openai` and `anthropic`.
    #[serde(default)]
    pub api: Option<LlmApi>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub retries: Retries,
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    /// Offer HTTP/2 by ALPN on TLS endpoints (default true).
    #[serde(default = "default_true")]
    pub http2: bool,
    /// Let calls through when the policy fails to evaluate (default: deny them). A policy's
    /// deny is always enforced; this covers only errors.
    #[serde(default)]
    pub fail_open: bool,
    /// The credential the sidecar injects on the way out (the agent never holds it; any key
    /// the agent sends is stripped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialRef>,
}

/// A held credential, by name, and how it is sent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CredentialRef {
    /// The secret's name (the sidecar's `credentials`, or a secret pushed by the control
    /// server).
    pub secret: String,
    /// The header it goes in; default `x-api-key` for Anthropic, `authorization` otherwise.
    #[serde(default)]
    pub header: Option<String>,
    /// How the value is written, `{}` standing for the secret; default `Bearer {}` in
    /// `authorization`, `{}` elsewhere.
    #[serde(default)]
    pub format: Option<String>,
}

impl UpstreamConfig {
    /// The header and the text (the secret in place of `{}`) a credential is sent as.
    pub fn credential_header(&self, secret: &str) -> Option<(String, String)> {
        let c = self.credential.as_ref()?;
        let header = c.header.clone().unwrap_or_else(|| {
            match self.llm_api() {
                Some(LlmApi::Anthropic) => "x-api-key",
                _ => "authorization",
            }
            .to_string()
        });
        let format = c.format.clone().unwrap_or_else(|| {
            if header.eq_ignore_ascii_case("authorization") {
                "Bearer {}"
            } else {
                "{}"
            }
            .to_string()
        });
        Some((header, format.replace("{}", secret)))
    }
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// Longest wait for the next bytes of the response (not the whole stream).
    #[serde(with = "humantime_serde")]
    pub read: Duration,
    /// How long an idle pooled connection is kept.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            read: Duration::from_secs(120),
            idle: Duration::from_secs(60),
        }
    }
}

/// Retries apply only to safe calls: failed connects always, idempotent methods otherwise.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Retries {
    pub attempts: usize,
}

impl Default for Retries {
    fn default() -> Self {
        Retries { attempts: 2 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Consecutive failures (connect errors, 5xx) that open the circuit; 0 disables it.
    pub consecutive_failures: u32,
    #[serde(with = "humantime_serde")]
    pub cool_down: Duration,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            consecutive_failures: 5,
            cool_down: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file of CA certificates to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// The same, inline (how the control server sends it); `ca_file` wins when both are set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// Server name to verify, when it differs from the endpoint host.
    pub sni: Option<String>,
}

impl UpstreamConfig {
    /// The LLM API family, explicit or inferred from the provider name.
    pub fn llm_api(&self) -> Option<LlmApi> {
        self.api
            .or_else(|| split_name(&self.name).and_then(|(_, p)| infer_llm_api(p)))
    }

    /// The kind its name's prefix gives.
    pub fn kind(&self) -> Option<CallKind> {
        split_name(&self.name).map(|(k, _)| k)
    }

    /// The part after the prefix: the provider, server, agent or service name.
    pub fn short_name(&self) -> &str {
        split_name(&self.name).map(|(_, n)| n).unwrap_or(&self.name)
    }
}

/// Reads every certificate of a PEM file (DER bytes); an unreadable file or one without
/// certificates is an error, so a typo never silently falls back to other roots.
pub fn read_pem_certs(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_pem_certs(&text).map_err(|e| format!("{}{e}", path.display()))
}

/// Every certificate of PEM text (DER bytes); an error (starting with `: ` or ` `, to follow
/// where the text came from) when there is none or the PEM is bad.
pub fn parse_pem_certs(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let certs: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!(": bad PEM: {e}"))?
        .into_iter()
        .map(|c| c.to_vec())
        .collect();
    if certs.is_empty() {
        return Err(" holds no PEM certificate".into());
    }
    Ok(certs)
}

impl TlsConfig {
    /// The CA certificates to trust (DER), from `ca_file` or `ca_pem`; `None`: the system roots.
    pub fn ca_certs(&self) -> Option<Result<Vec<Vec<u8>>, String>> {
        match (&self.ca_file, &self.ca_pem) {
            (Some(f), _) => Some(read_pem_certs(f)),
            (None, Some(pem)) => {
                Some(parse_pem_certs(pem.as_bytes()).map_err(|e| format!("tls.ca_pem{e}")))
            }
            (None, None) => None,
        }
    }
}

fn infer_llm_api(provider: &str) -> Option<LlmApi> {
    match provider {
        "openai" => Some(LlmApi::Openai),
        "anthropic" => Some(LlmApi::Anthropic),
        _ => None,
    }
}

/// Splits `llm/openai` into its kind and name, checking both halves.
pub fn split_name(name: &str) -> Option<(CallKind, &str)> {
    let (prefix, rest) = name.split_once('/')?;
    let kind = CallKind::from_prefix(prefix)?;
    is_dns_label(rest).then_some((kind, rest))
}

pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        })
        && !s.starts_with('-')
}

/// One parsed endpoint URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix to put before the forwarded path (no trailing slash), may be empty.
    pub base_path: String,
    /// The `Host` header value: host (bracketed if IPv6), with the port when not the default.
    pub authority: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("`{url}` must start with http:// or https://"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| format!("`{url}` has an invalid port"))?;
                (h, port)
            }
            _ => (authority, if tls { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err(format!("`{url}` has no host"));
        }
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let default_port = if tls { 443 } else { 80 };
        let authority = if port == default_port {
            bracketed
        } else {
            format!("{bracketed}:{port}")
        };
        Ok(Endpoint {
            tls,
            host,
            port,
            base_path: path.trim_end_matches('/').to_string(),
            authority,
        })
    }
}

/// A fault in one field of an upstream: the field's path inside the upstream (`endpoints[0]`)
/// and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl UpstreamConfig {
    /// Checks what types alone cannot: the logical name, the endpoints' URLs, the LLM API, the
    /// CA certificates. Field paths are relative to the upstream.
    pub fn validate(&self) -> Result<(), FieldError> {
        let invalid = |field: &str, message: String| FieldError {
            field: field.to_string(),
            message,
        };
        let (kind, rest) = split_name(&self.name).ok_or_else(|| {
            invalid(
                "name",
                format!(
                    "`{}` must be `llm/<provider>`, `mcp/<server>`, `agents/<agent>` or `http/<name>`",
                    self.name
                ),
            )
        })?;
        if self.endpoints.is_empty() {
            return Err(invalid(
                "endpoints",
                "at least one endpoint is required".into(),
            ));
        }
        for (j, ep) in self.endpoints.iter().enumerate() {
            Endpoint::parse(ep).map_err(|m| invalid(&format!("endpoints[{j}]"), m))?;
        }
        if kind == CallKind::Llm && self.api.is_none() && infer_llm_api(rest).is_none() {
            return Err(invalid(
                "api",
                format!("cannot infer the API of provider `{rest}`: set `api: openai` or `api: anthropic`"),
            ));
        }
        if kind != CallKind::Llm && self.api.is_some() {
            return Err(invalid(
                "api",
                "only `llm/*` upstreams take an `api`".into(),
            ));
        }
        if let Some(c) = &self.credential {
            if c.secret.is_empty() {
                return Err(invalid("credential.secret", "must name a secret".into()));
            }
            if let Some(h) = &c.header {
                if http_header_name(h).is_none() {
                    return Err(invalid(
                        "credential.header",
                        format!("`{h}` is not a header name"),
                    ));
                }
            }
            if let Some(f) = &c.format {
                if !f.contains("{}") {
                    return Err(invalid(
                        "credential.format",
                        "must contain `{}` where the secret goes".into(),
                    ));
                }
            }
        }
        if let Some(Err(m)) = self.tls.ca_certs() {
            let field = if self.tls.ca_file.is_some() {
                "tls.ca_file"
            } else {
                "tls.ca_pem"
            };
            return Err(invalid(field, m));
        }
        Ok(())
    }
}

/// A lowercase header name of token characters, or `None`.
fn http_header_name(h: &str) -> Option<String> {
    let ok = !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    ok.then(|| h.to_ascii_lowercase())
}

fn ms(d: Duration) -> Option<u64> {
    Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl UpstreamConfig {
    /// The wire form. A `tls.ca_file` is read and sent inline, since the sidecar does not share
    /// the control server's disk.
    pub fn to_wire(&self) -> Result<wire::Upstream, String> {
        let ca_pem = match &self.tls.ca_file {
            Some(f) => std::fs::read_to_string(f)
                .map_err(|e| format!("cannot read {}: {e}", f.display()))?,
            None => self.tls.ca_pem.clone().unwrap_or_default(),
        };
        Ok(wire::Upstream {
            name: self.name.clone(),
            endpoints: self.endpoints.clone(),
            api: self.api.map(|a| a.as_str().to_string()).unwrap_or_default(),
            connect_timeout_ms: ms(self.timeouts.connect),
            read_timeout_ms: ms(self.timeouts.read),
            idle_timeout_ms: ms(self.timeouts.idle),
            retries: Some(u32::try_from(self.retries.attempts).unwrap_or(u32::MAX)),
            breaker_failures: Some(self.circuit_breaker.consecutive_failures),
            breaker_cool_down_ms: ms(self.circuit_breaker.cool_down),
            tls_ca_pem: ca_pem,
            tls_sni: self.tls.sni.clone().unwrap_or_default(),
            http2: Some(self.http2),
            fail_open: self.fail_open,
            credential_secret: self
                .credential
                .as_ref()
                .map(|c| c.secret.clone())
                .unwrap_or_default(),
            credential_header: self
                .credential
                .as_ref()
                .and_then(|c| c.header.clone())
                .unwrap_or_default(),
            credential_format: self
                .credential
                .as_ref()
                .and_then(|c| c.format.clone())
                .unwrap_or_default(),
        })
    }

    /// Reads the wire form, with the defaults for what it leaves out, and validates it.
    pub fn from_wire(w: &wire::Upstream) -> Result<UpstreamConfig, FieldError> {
        let api = match w.api.as_str() {
            "" => None,
            "openai" => Some(LlmApi::Openai),
            "anthropic" => Some(LlmApi::Anthropic),
            other => {
                return Err(FieldError {
                    field: "api".into(),
                    message: format!("unknown LLM API `{other}` (openai or anthropic)"),
                })
            }
        };
        let d = |v: Option<u64>, default: Duration| v.map(Duration::from_millis).unwrap_or(default);
        let (t, b) = (Timeouts::default(), CircuitBreakerConfig::default());
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let c = UpstreamConfig {
            name: w.name.clone(),
            endpoints: w.endpoints.clone(),
            api,
            timeouts: Timeouts {
                connect: d(w.connect_timeout_ms, t.connect),
                read: d(w.read_timeout_ms, t.read),
                idle: d(w.idle_timeout_ms, t.idle),
            },
            retries: Retries {
                attempts: w
                    .retries
                    .map(|r| r as usize)
                    .unwrap_or(Retries::default().attempts),
            },
            circuit_breaker: CircuitBreakerConfig {
                consecutive_failures: w.breaker_failures.unwrap_or(b.consecutive_failures),
                cool_down: d(w.breaker_cool_down_ms, b.cool_down),
            },
            tls: TlsConfig {
                ca_file: None,
                ca_pem: non_empty(&w.tls_ca_pem),
                sni: non_empty(&w.tls_sni),
            },
            http2: w.http2.unwrap_or(true),
            fail_open: w.fail_open,
            credential: non_empty(&w.credential_secret).map(|secret| CredentialRef {
                secret,
                header: non_empty(&w.credential_header),
                format: non_empty(&w.credential_format),
            }),
        };
        c.validate()?;
        Ok(c)
    }
}

impl LlmApi {
    pub fn as_str(self) -> &'static str {
        match self {
            LlmApi::Openai => "openai",
            LlmApi::Anthropic => "anthropic",
        }
    }
}

use crate::discovery as wire;

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(yaml: &str) -> UpstreamConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn the_wire_form_round_trips_with_defaults_and_overrides() {
        for yaml in [
            "{name: llm/openai, endpoints: [\"https://api.openai.com\"]}",
            "{name: mcp/tools, endpoints: [\"http://127.0.0.1:9\", \"http://127.0.0.1:10/x\"], timeouts: {connect: 1s, read: 3s, idle: 5s}, retries: {attempts: 0}, circuit_breaker: {consecutive_failures: 0, cool_down: 2s}, http2: false, fail_open: true, tls: {sni: tools.example}}",
            "{name: llm/local, api: anthropic, endpoints: [\"http://127.0.0.1:9\"]}",
            "{name: llm/openai, endpoints: [\"https://x\"], credential: {secret: openai-key}}",
            "{name: http/api, endpoints: [\"https://x\"], credential: {secret: k, header: x-token, format: \"Token {}\"}}",
        ] {
            let c = upstream(yaml);
            let back = UpstreamConfig::from_wire(&c.to_wire().unwrap()).unwrap();
            assert_eq!(back, c, "{yaml}");
        }
        // An empty wire message takes the same defaults as an empty YAML one.
        let w = wire::Upstream {
            name: "mcp/a".into(),
            endpoints: vec!["http://a".into()],
            ..Default::default()
        };
        assert_eq!(
            UpstreamConfig::from_wire(&w).unwrap(),
            upstream("{name: mcp/a, endpoints: [\"http://a\"]}")
        );
    }

    #[test]
    fn a_ca_file_travels_inline_and_bad_wire_values_name_the_field() {
        let dir = std::env::temp_dir().join(format!("am-api-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem = dir.join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        std::fs::write(&pem, cert.cert.pem()).unwrap();
        let mut c = upstream("{name: llm/openai, endpoints: [\"https://x\"]}");
        c.tls.ca_file = Some(pem.clone());
        let w = c.to_wire().unwrap();
        assert!(w.tls_ca_pem.contains("BEGIN CERTIFICATE"));
        let back = UpstreamConfig::from_wire(&w).unwrap();
        assert_eq!(back.tls.ca_certs().unwrap().unwrap().len(), 1);

        let bad = |f: fn(&mut wire::Upstream)| {
            let mut w = c.to_wire().unwrap();
            f(&mut w);
            UpstreamConfig::from_wire(&w).unwrap_err().field
        };
        assert_eq!(bad(|w| w.tls_ca_pem = "junk".into()), "tls.ca_pem");
        assert_eq!(bad(|w| w.api = "cohere".into()), "api");
        assert_eq!(
            bad(|w| w.endpoints = vec!["ftp://x".into()]),
            "endpoints[0]"
        );
        assert_eq!(bad(|w| w.name = "nope".into()), "name");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
