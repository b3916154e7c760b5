//! The certificate authority's part of the API (design §6): join tokens for an agent's first
//! SVID (admin only, single-use, expiring), SVIDs signed on CSRs whose keys never leave the
//! sidecar — authenticated by a join token the first time and by the current SVID (a client
//! certificate) for each renewal — and the trust bundle.

use crate::api::{body, error, persist_failed, Answer, Api, ApiError};
use crate::registry::{now_unix, TokenError};
use crate::tls::SignError;
use crate::tokens::{exchange, ExchangeRequest, OauthError};
use agentmesh_control_api::identity::{AgentId, TRUST_DOMAIN};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

/// The SPIFFE ID of the client certificate the connection presented, if any (verified against
/// the root by the TLS layer).
#[derive(Clone, Debug, Default)]
pub struct PeerIdentity(pub Option<AgentId>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    agent: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    /// How long the token may be used (default one hour).
    #[serde(default = "default_token_ttl")]
    ttl_seconds: u64,
}

fn default_namespace() -> String {
    "default".into()
}

fn default_token_ttl() -> u64 {
    3600
}

pub async fn join_token(
    State(api): State<Api>,
    headers: HeaderMap,
    payload: Result<Json<TokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    api.authorize(&headers)?;
    let req = body(payload)?;
    let agent = api.find(&req.agent)?;
    if agent.namespace != req.namespace {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            &format!(
                "agent `{}` is in namespace `{}`, not `{}`",
                req.agent, agent.namespace, req.namespace
            ),
        ));
    }
    if req.ttl_seconds == 0 || req.ttl_seconds > 7 * 86_400 {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "`ttl_seconds` must be between 1 and 604800 (a week)",
        ));
    }
    let (value, t) = api
        .control
        .registry
        .new_join_token(&req.namespace, &req.agent, req.ttl_seconds)
        .map_err(persist_failed)?;
    let id = AgentId::new(TRUST_DOMAIN, &t.namespace, &t.agent);
    tracing::info!(spiffe_id = %id, expires_at_unix = t.expires_at_unix, "join token issued");
    Ok((
        StatusCode::CREATED,
        Json(json!({"token": value, "spiffe_id": id.spiffe_id(), "expires_at_unix": t.expires_at_unix})),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SvidRequest {
    /// A PKCS#10 CSR (PEM) asking for the agent's SPIFFE ID.
    csr: String,
    /// For a first SVID; a renewal authenticates with the current SVID instead.
    #[serde(default)]
    join_token: Option<String>,
}

fn refused(e: TokenError) -> ApiError {
    tracing::warn!(reason = %e, "SVID request refused");
    error(StatusCode::UNAUTHORIZED, "join_token", &e.to_string())
}

pub async fn svid(
    State(api): State<Api>,
    Extension(peer): Extension<PeerIdentity>,
    payload: Result<Json<SvidRequest>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    let req = body(payload)?;
    // Who is asking: the join token's agent, or the current SVID's.
    let (id, how) = match (&req.join_token, &peer.0) {
        (Some(token), _) => {
            let t = api
                .control
                .registry
                .check_join_token(token)
                .map_err(refused)?;
            (
                AgentId::new(TRUST_DOMAIN, &t.namespace, &t.agent),
                "join token",
            )
        }
        (None, Some(current)) => (current.clone(), "current SVID"),
        (None, None) => {
            tracing::warn!("SVID request refused: no credential");
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "no_credential",
                "a first SVID needs a `join_token`; a renewal needs the current SVID as the client certificate",
            ));
        }
    };
    if api.control.world().agent(&id.agent).is_none() {
        return Err(error(
            StatusCode::FORBIDDEN,
            "unknown_agent",
            &format!("agent `{}` is neither declared nor registered", id.agent),
        ));
    }
    // Check the CSR before a token is used up on it.
    let check = |e: SignError| match e {
        SignError::Sign(m) => error(StatusCode::INTERNAL_SERVER_ERROR, "sign", &m),
        SignError::BadCsr => error(StatusCode::BAD_REQUEST, "bad_csr", &e.to_string()),
        SignError::WrongIdentity { .. } => {
            tracing::warn!(spiffe_id = %id, error = %e, "SVID request refused");
            error(StatusCode::FORBIDDEN, "wrong_identity", &e.to_string())
        }
    };
    let svid = api
        .authority
        .signing()
        .sign_svid(&req.csr, &id, api.svid_ttl)
        .map_err(check)?;
    if let Some(token) = &req.join_token {
        api.control
            .registry
            .take_join_token(token)
            .map_err(persist_failed)?
            .map_err(refused)?;
    }
    let now = now_unix();
    tracing::info!(spiffe_id = %id, by = how, expires_at_unix = svid.not_after_unix, "SVID issued");
    Ok(Json(json!({
        "spiffe_id": id.spiffe_id(),
        "certificate": svid.cert_pem,
        "trust_bundle": api.authority.bundle_pem(),
        "expires_at_unix": svid.not_after_unix,
        // Renew at half-life (design §6).
        "renew_at_unix": now + svid.not_after_unix.saturating_sub(now) / 2,
    }))
    .into_response())
}

pub async fn trust_bundle(State(api): State<Api>) -> Answer {
    Ok(
        Json(json!({"trust_domain": TRUST_DOMAIN, "roots": api.authority.bundle_pem()}))
            .into_response(),
    )
}

/// The CA's state: the rollover phase and how many roots are trusted.
pub async fn ca_status(State(api): State<Api>) -> Answer {
    let bundle = api.authority.bundle_pem();
    Ok(Json(json!({
        "phase": api.authority.phase(),
        "roots": bundle.matches("BEGIN CERTIFICATE").count(),
        "signing": api.authority.signing().cert_pem,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloverRequest {
    step: String,
}

/// One step of a root rollover (admin): `stage`, `activate`, `retire`.
pub async fn rollover(
    State(api): State<Api>,
    headers: HeaderMap,
    payload: Result<Json<RolloverRequest>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    api.authorize(&headers)?;
    let req = body(payload)?;
    api.authority
        .rollover(&req.step)
        .map_err(|m: String| error(StatusCode::CONFLICT, "rollover", &m))?;
    ca_status(State(api)).await
}

/// RFC 8693 token exchange: the client is the sidecar its SVID names.
pub async fn token(
    State(api): State<Api>,
    Extension(peer): Extension<PeerIdentity>,
    form: Result<
        axum::Form<std::collections::HashMap<String, String>>,
        axum::extract::rejection::FormRejection,
    >,
) -> axum::response::Response {
    let oauth_error = |e: OauthError| {
        tracing::warn!(code = e.code, reason = %e.description, "token exchange refused");
        (
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
            [(axum::http::header::CACHE_CONTROL, "no-store")],
            Json(json!({"error": e.code, "error_description": e.description})),
        )
            .into_response()
    };
    let Some(actor) = peer.0 else {
        return oauth_error(OauthError {
            status: 401,
            code: "invalid_client",
            description: "authenticate with the sidecar's SVID (a client certificate)".into(),
        });
    };
    let form = match form {
        Ok(axum::Form(f)) => f,
        Err(e) => {
            return oauth_error(OauthError {
                status: 400,
                code: "invalid_request",
                description: e.body_text(),
            })
        }
    };
    let get = |k: &str| form.get(k).map(String::as_str);
    let req = ExchangeRequest {
        grant_type: get("grant_type"),
        subject_token: get("subject_token"),
        subject_token_type: get("subject_token_type"),
        actor_token: get("actor_token"),
        audience: get("audience"),
        scope: get("scope"),
        requested_token_type: get("requested_token_type"),
    };
    let catalog = api.control.catalog();
    match exchange(&api.signer, catalog.issuers.as_deref(), &actor, &req).await {
        Ok(body) => (
            [(axum::http::header::CACHE_CONTROL, "no-store")],
            Json(body),
        )
            .into_response(),
        Err(e) => oauth_error(e),
    }
}

/// The keys exchanged tokens are signed with.
pub async fn jwks(State(api): State<Api>) -> Answer {
    Ok(Json(api.signer.jwks()).into_response())
}
