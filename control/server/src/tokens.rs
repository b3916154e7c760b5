//! The token exchange (RFC 8693) and the keys it signs with. A sidecar, authenticated by its
//! SVID, presents the token its call carries (an end user's, or one this service issued to it)
//! and names the destination; it gets a short-lived JWT for that audience alone, with the
//! delegation chain in nested `act` claims (the newest actor outermost) and scopes no wider than
//! the subject's. The signing key is made on first start (ES256, owner-only in the state
//! directory) and published as a JWKS.

use agentmesh_control_api::identity::{AgentId, TRUST_DOMAIN};
use agentmesh_control_api::jwt::{User, Validator};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::time::Duration;

pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// The `iss` of the tokens this service issues.
pub fn issuer() -> String {
    format!("spiffe://{TRUST_DOMAIN}/control")
}

/// How long an exchanged token lives (never past its subject's expiry).
pub const TOKEN_TTL: Duration = Duration::from_secs(300);

/// An RFC 6749 §5.2 error: the `error` code and a description.
#[derive(Debug, Clone, PartialEq)]
pub struct OauthError {
    pub status: u16,
    pub code: &'static str,
    pub description: String,
}

fn oauth(status: u16, code: &'static str, description: impl Into<String>) -> OauthError {
    OauthError {
        status,
        code,
        description: description.into(),
    }
}

pub struct Signer {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    jwk: Value,
}

impl Signer {
    /// Loads the signing key from `dir`, or makes one there.
    pub fn load_or_create(dir: &Path) -> Result<Signer, String> {
        let file = dir.join("token-key.pem");
        let key = if file.exists() {
            let pem = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            rcgen::KeyPair::from_pem(&pem).map_err(|e| format!("{}: {e}", file.display()))?
        } else {
            let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
            crate::tls::write_secret(&file, key.serialize_pem().as_bytes())?;
            key
        };
        let raw = key.public_key_raw();
        if raw.len() != 65 {
            return Err(format!("{}: not a P-256 key", file.display()));
        }
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let (x, y) = (b64(&raw[1..33]), b64(&raw[33..65]));
        let kid = crate::resources::digest(raw);
        let encoding =
            EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).map_err(|e| e.to_string())?;
        let decoding = DecodingKey::from_ec_components(&x, &y).map_err(|e| e.to_string())?;
        let jwk = json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid, "x": x, "y": y});
        Ok(Signer {
            kid,
            encoding,
            decoding,
            jwk,
        })
    }

    /// The JWKS sidecars verify exchanged tokens with.
    pub fn jwks(&self) -> Value {
        json!({"keys": [self.jwk]})
    }

    fn sign(&self, claims: &Value) -> Result<String, OauthError> {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        h.typ = Some("JWT".into());
        jsonwebtoken::encode(&h, claims, &self.encoding)
            .map_err(|e| oauth(500, "server_error", e.to_string()))
    }

    /// A token this service issued, verified.
    fn own(&self, token: &str) -> Result<Map<String, Value>, OauthError> {
        let mut v = Validation::new(Algorithm::ES256);
        v.set_issuer(&[issuer()]);
        v.validate_aud = false;
        v.leeway = 30;
        jsonwebtoken::decode::<Map<String, Value>>(token, &self.decoding, &v)
            .map(|d| d.claims)
            .map_err(|e| oauth(400, "invalid_grant", format!("the subject token: {e}")))
    }
}

/// A token exchange request (RFC 8693 §2.1), as form fields.
pub struct ExchangeRequest<'a> {
    pub grant_type: Option<&'a str>,
    pub subject_token: Option<&'a str>,
    pub subject_token_type: Option<&'a str>,
    pub actor_token: Option<&'a str>,
    pub audience: Option<&'a str>,
    pub scope: Option<&'a str>,
    pub requested_token_type: Option<&'a str>,
}

fn unix_now() -> u64 {
    crate::registry::now_unix()
}

fn scopes(v: Option<&Value>) -> Option<Vec<String>> {
    v.and_then(|s| s.as_str())
        .map(|s| s.split_whitespace().map(str::to_string).collect())
}

/// Runs an exchange for `actor` (the authenticated sidecar's agent): checks the request and
/// the subject token, and signs the narrowed token. Returns the RFC 8693 response body.
pub async fn exchange(
    signer: &Signer,
    external: Option<&Validator>,
    actor: &AgentId,
    req: &ExchangeRequest<'_>,
) -> Result<Value, OauthError> {
    if req.grant_type != Some(GRANT_TYPE) {
        return Err(oauth(
            400,
            "unsupported_grant_type",
            format!("grant_type must be {GRANT_TYPE}"),
        ));
    }
    let subject = req
        .subject_token
        .filter(|s| !s.is_empty())
        .ok_or_else(|| oauth(400, "invalid_request", "subject_token is required"))?;
    match req.subject_token_type {
        Some(JWT_TYPE) | Some(ACCESS_TOKEN_TYPE) => {}
        _ => {
            return Err(oauth(
                400,
                "invalid_request",
                format!("subject_token_type must be {JWT_TYPE}"),
            ))
        }
    }
    if let Some(t) = req.requested_token_type {
        if t != JWT_TYPE && t != ACCESS_TOKEN_TYPE {
            return Err(oauth(
                400,
                "invalid_request",
                format!("only {JWT_TYPE} tokens are issued"),
            ));
        }
    }
    let audience = req
        .audience
        .filter(|a| !a.is_empty())
        .ok_or_else(|| oauth(400, "invalid_target", "audience is required"))?;
    if AgentId::parse(audience).is_none()
        && agentmesh_control_api::upstream::split_name(audience).is_none()
    {
        return Err(oauth(
            400,
            "invalid_target",
            format!("`{audience}` is neither an agent's SPIFFE ID nor a mesh name"),
        ));
    }
    // The actor is the authenticated sidecar; an actor token, if sent, must say the same.
    if let Some(a) = req.actor_token.filter(|a| !a.is_empty()) {
        let claims = signer.own(a).map_err(|e| {
            oauth(
                400,
                "invalid_request",
                format!("actor_token: {}", e.description),
            )
        })?;
        if claims.get("sub").and_then(Value::as_str) != Some(actor.spiffe_id().as_str()) {
            return Err(oauth(
                400,
                "invalid_request",
                "actor_token does not name the authenticated client",
            ));
        }
    }
    let claims = if jsonwebtoken::decode_header(subject)
        .is_ok_and(|h| h.kid.as_deref() == Some(&signer.kid))
    {
        let c = signer.own(subject)?;
        // Only the party a token was issued to may exchange it onward.
        if c.get("aud").and_then(Value::as_str) != Some(actor.spiffe_id().as_str()) {
            return Err(oauth(
                400,
                "invalid_grant",
                format!("the subject token was not issued to {actor}"),
            ));
        }
        c
    } else {
        let v =
            external.ok_or_else(|| oauth(400, "invalid_grant", "no external issuer is trusted"))?;
        let User { claims, .. } = v
            .validate(subject)
            .await
            .map_err(|e| oauth(400, "invalid_grant", format!("the subject token: {e}")))?;
        claims
    };
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| oauth(400, "invalid_grant", "the subject token has no sub"))?;
    // Scopes narrow, never widen.
    let held = scopes(claims.get("scope"));
    let asked: Option<Vec<String>> = req
        .scope
        .map(|s| s.split_whitespace().map(str::to_string).collect());
    let granted = match (&asked, &held) {
        (Some(a), Some(h)) => {
            if let Some(extra) = a.iter().find(|s| !h.contains(s)) {
                return Err(oauth(
                    400,
                    "invalid_scope",
                    format!("scope `{extra}` is not in the subject token"),
                ));
            }
            Some(a.clone())
        }
        (Some(a), None) => Some(a.clone()),
        (None, h) => h.clone(),
    };
    let now = unix_now();
    let subject_exp = claims
        .get("exp")
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let exp = (now + TOKEN_TTL.as_secs()).min(subject_exp);
    let mut act = json!({"sub": actor.spiffe_id()});
    if let Some(prior) = claims.get("act") {
        act["act"] = prior.clone();
    }
    let mut out = json!({
        "iss": issuer(),
        "sub": sub,
        "aud": audience,
        "iat": now,
        "exp": exp,
        "jti": crate::resources::digest(format!("{sub}{audience}{now}{}", rand::random::<u64>()).as_bytes()),
        "act": act,
    });
    if let Some(g) = &granted {
        out["scope"] = json!(g.join(" "));
    }
    // The subject's identity claims travel on; delegation and audience are this token's own.
    for k in ["email", "name", "groups", "team", "tenant"] {
        if let Some(v) = claims.get(k) {
            out[k] = v.clone();
        }
    }
    let token = signer.sign(&out)?;
    tracing::info!(sub, audience, actor = %actor, depth = depth(&out["act"]), "token exchanged");
    let mut body = json!({
        "access_token": token,
        "issued_token_type": JWT_TYPE,
        "token_type": "Bearer",
        "expires_in": exp.saturating_sub(now),
    });
    if let Some(g) = granted {
        body["scope"] = json!(g.join(" "));
    }
    Ok(body)
}

/// How many actors an `act` chain holds.
pub fn depth(act: &Value) -> usize {
    match act.get("act") {
        Some(inner) => 1 + depth(inner),
        None if act.is_object() => 1,
        None => 0,
    }
}
