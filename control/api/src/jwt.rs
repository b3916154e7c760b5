//! End-user JWTs (design §3 step 1, RFC 8725): a `Bearer` token in `Authorization` that looks
//! like a JWT is validated against the configured issuers — the algorithm against the issuer's
//! allow-list (never `none`, never an HMAC algorithm, so no key-type confusion), the signature
//! against the issuer's JWKS (fetched, cached, refreshed once on an unknown `kid`), `exp` and
//! `nbf` with a small leeway, `iss` and `aud` — and its claims become `input.user`. Each
//! rejection has its own reason. Shared by the sidecar (end users' tokens, and exchanged
//! tokens from peers) and the control server's token exchange (subject tokens).

use crate::upstream::FieldError;
use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which end-user tokens are accepted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub issuers: Vec<JwtIssuer>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// Refuse calls that carry no token (default: a token is validated when present).
    #[serde(default)]
    pub required: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuer {
    /// The `iss` value.
    pub issuer: String,
    /// Where its keys are (fetched, cached 10 min, refreshed on an unknown `kid`) ...
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// ... or a JWKS file (relative to the config file).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Accepted `aud` values; empty: `aud` is not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// The allow-list; asymmetric algorithms only.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// CA certificates for the JWKS endpoint, instead of the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into(), "EdDSA".into()]
}

/// Algorithms an issuer may be allowed: asymmetric ones (an HMAC key shared with every sidecar
/// would let any of them mint tokens, and invites RS/HS confusion).
const ASYMMETRIC: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

impl JwtConfig {
    /// Checks what types alone cannot; field paths are relative to the section.
    pub fn validate(&self) -> Result<(), FieldError> {
        for (i, iss) in self.issuers.iter().enumerate() {
            let invalid = |f: &str, message: String| FieldError {
                field: format!("issuers[{i}].{f}"),
                message,
            };
            if iss.issuer.is_empty() {
                return Err(invalid("issuer", "must not be empty".into()));
            }
            if iss.jwks_uri.is_some() == iss.jwks_file.is_some() {
                return Err(invalid(
                    "jwks_uri",
                    "set exactly one of `jwks_uri` and `jwks_file`".into(),
                ));
            }
            if let Some(u) = &iss.jwks_uri {
                if !u.starts_with("https://") && !u.starts_with("http://") {
                    return Err(invalid("jwks_uri", format!("`{u}` is not a URL")));
                }
            }
            for (k, a) in iss.algorithms.iter().enumerate() {
                if !ASYMMETRIC.contains(&a.as_str()) {
                    return Err(invalid(
                        &format!("algorithms[{k}]"),
                        format!("`{a}` is not allowed: use one of {}", ASYMMETRIC.join(", ")),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JwtError {
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("algorithm `{0}` is not allowed for this issuer")]
    Algorithm(String),
    #[error("issuer `{0}` is not trusted")]
    UnknownIssuer(String),
    #[error("the token names no issuer")]
    NoIssuer,
    #[error("no key `{0}` in the issuer's JWKS")]
    UnknownKey(String),
    #[error("the signature does not verify")]
    Signature,
    #[error("the token expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token is not for this audience")]
    Audience,
    #[error("the token has no `sub`")]
    NoSubject,
    #[error("the issuer's keys cannot be fetched: {0}")]
    Jwks(String),
    #[error("a token is required")]
    Missing,
}

/// A validated token's subject and claims.
#[derive(Debug, Clone)]
pub struct User {
    pub sub: String,
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// How soon an issuer's JWKS may be fetched again on an unknown `kid` (a flood of forged kids
/// must not become a flood of fetches).
const REFRESH_FLOOR: Duration = Duration::from_secs(10);
/// How long fetched keys are used before they are fetched again.
const JWKS_TTL: Duration = Duration::from_secs(600);

struct Keys {
    set: JwkSet,
}

pub struct Validator {
    config: JwtConfig,
    keys: moka::sync::Cache<String, Arc<Keys>>,
    http: reqwest::Client,
    last_refresh: Mutex<std::collections::HashMap<String, Instant>>,
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validator").finish_non_exhaustive()
    }
}

/// Reads a Bearer token that looks like a JWT (three dot-separated parts); other bearer values
/// (an LLM provider key) are not the user's token.
pub fn bearer_jwt(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let t = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))?
        .trim();
    (t.split('.').count() == 3).then_some(t)
}

fn payload_issuer(token: &str) -> Result<Option<String>, JwtError> {
    let part = token.split('.').nth(1).ok_or(JwtError::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| JwtError::Malformed)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;
    Ok(v.get("iss").and_then(|i| i.as_str()).map(str::to_string))
}

impl Validator {
    pub fn new(config: JwtConfig) -> Result<Validator, String> {
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(5));
        for i in &config.issuers {
            if let Some(ca) = &i.ca_file {
                let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
                b = b.add_root_certificate(
                    reqwest::Certificate::from_pem(&pem).map_err(|e| e.to_string())?,
                );
            }
        }
        Ok(Validator {
            config,
            keys: moka::sync::Cache::builder()
                .max_capacity(64)
                .time_to_live(JWKS_TTL)
                .build(),
            http: b.build().map_err(|e| e.to_string())?,
            last_refresh: Mutex::new(Default::default()),
        })
    }

    pub fn required(&self) -> bool {
        self.config.required
    }

    async fn fetch(&self, issuer: &JwtIssuer) -> Result<Arc<Keys>, JwtError> {
        let set: JwkSet = match (&issuer.jwks_uri, &issuer.jwks_file) {
            (Some(uri), _) => self
                .http
                .get(uri)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| JwtError::Jwks(e.to_string()))?
                .json()
                .await
                .map_err(|e| JwtError::Jwks(e.to_string()))?,
            (None, Some(file)) => {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| JwtError::Jwks(format!("{}: {e}", file.display())))?;
                serde_json::from_str(&text).map_err(|e| JwtError::Jwks(e.to_string()))?
            }
            (None, None) => return Err(JwtError::Jwks("no jwks_uri or jwks_file".into())),
        };
        let keys = Arc::new(Keys { set });
        self.keys.insert(issuer.issuer.clone(), keys.clone());
        Ok(keys)
    }

    /// The issuer's key `kid`, fetching the JWKS when it is not cached, and once more (at most
    /// every 10 s) when the kid is unknown: how a rotated key is picked up.
    async fn key(&self, issuer: &JwtIssuer, kid: &str) -> Result<jsonwebtoken::jwk::Jwk, JwtError> {
        let keys = match self.keys.get(&issuer.issuer) {
            Some(k) => k,
            None => self.fetch(issuer).await?,
        };
        if let Some(k) = keys.set.find(kid) {
            return Ok(k.clone());
        }
        let may_refresh = {
            let mut last = self.last_refresh.lock().unwrap_or_else(|e| e.into_inner());
            let ok = last
                .get(&issuer.issuer)
                .is_none_or(|t| t.elapsed() >= REFRESH_FLOOR);
            if ok {
                last.insert(issuer.issuer.clone(), Instant::now());
            }
            ok
        };
        if may_refresh {
            let keys = self.fetch(issuer).await?;
            if let Some(k) = keys.set.find(kid) {
                return Ok(k.clone());
            }
        }
        Err(JwtError::UnknownKey(kid.to_string()))
    }

    /// Validates a token; its user on success.
    pub async fn validate(&self, token: &str) -> Result<User, JwtError> {
        // The algorithm is checked against the issuer's allow-list from the raw header, before
        // anything else reads it: `none` and HMAC names never reach a key.
        let alg_name = header_alg(token)?;
        let iss = payload_issuer(token)?.ok_or(JwtError::NoIssuer)?;
        let issuer = self
            .config
            .issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or(JwtError::UnknownIssuer(iss))?;
        if !issuer.algorithms.contains(&alg_name) || alg_name.starts_with("HS") {
            return Err(JwtError::Algorithm(alg_name));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
        let alg = header.alg;
        if is_hmac(alg) || format!("{alg:?}") != alg_name {
            return Err(JwtError::Algorithm(alg_name));
        }
        let kid = header.kid.clone().unwrap_or_default();
        let jwk = self.key(issuer, &kid).await?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|_| JwtError::Signature)?;
        let mut v = Validation::new(alg);
        v.leeway = self.config.leeway.as_secs();
        v.validate_nbf = true;
        v.set_issuer(&[issuer.issuer.as_str()]);
        if issuer.audiences.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&issuer.audiences);
        }
        v.set_required_spec_claims(&["exp", "iss", "sub"]);
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &v)
                .map_err(|e| {
                    use jsonwebtoken::errors::ErrorKind as K;
                    match e.kind() {
                        K::ExpiredSignature => JwtError::Expired,
                        K::ImmatureSignature => JwtError::NotYetValid,
                        K::InvalidAudience => JwtError::Audience,
                        K::InvalidIssuer => JwtError::UnknownIssuer(issuer.issuer.clone()),
                        K::MissingRequiredClaim(c) if c == "sub" => JwtError::NoSubject,
                        K::InvalidAlgorithm => JwtError::Algorithm(format!("{alg:?}")),
                        K::InvalidSignature => JwtError::Signature,
                        _ => JwtError::Malformed,
                    }
                })?;
        let claims = data.claims;
        let sub = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .ok_or(JwtError::NoSubject)?
            .to_string();
        Ok(User { sub, claims })
    }
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// The `alg` the header names, read before any library interprets the header.
fn header_alg(token: &str) -> Result<String, JwtError> {
    let h = token.split('.').next().ok_or(JwtError::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h.trim_end_matches('='))
        .map_err(|_| JwtError::Malformed)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;
    v.get("alg")
        .and_then(|a| a.as_str())
        .map(str::to_string)
        .ok_or(JwtError::Malformed)
}
