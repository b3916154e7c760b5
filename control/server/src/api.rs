//! The registry API (HTTPS JSON on 15012, described by `/openapi.json`): list and search agents
//! by skill, owner or tag; get one, its A2A card, its health (last heartbeat from its sidecars)
//! and its certification record; register and deregister agents; read every sidecar's ACK/NACK
//! state and the config source's status. Reads are open to whoever reaches the port; changes
//! need the admin token (`Authorization: Bearer`), closed by default.

use crate::ca_api;
use crate::control::Control;
use crate::model::{check_agent, AgentSpec};
use crate::registry::{now_unix, Certification, HEALTH_WINDOW};
use crate::resources::card;
use agentmesh_control_api::discovery as wire;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Clone)]
pub struct Api {
    pub control: Arc<Control>,
    /// The admin token that changes need.
    pub token: Arc<String>,
    /// The CA that signs SVIDs, and how long they live.
    pub authority: Arc<crate::authority::Authority>,
    pub svid_ttl: std::time::Duration,
    /// Signs exchanged tokens.
    pub signer: Arc<crate::tokens::Signer>,
}

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/v1/status", get(status))
        .route("/v1/sidecars", get(sidecars))
        .route("/v1/agents", get(list).post(register))
        .route("/v1/agents/{name}", get(show).delete(deregister))
        .route("/v1/agents/{name}/card", get(agent_card).put(announce_card))
        .route("/v1/agents/{name}/health", get(health))
        .route(
            "/v1/agents/{name}/certification",
            get(certification).post(certify),
        )
        .route("/v1/join-tokens", post(ca_api::join_token))
        .route("/v1/svid", post(ca_api::svid))
        .route("/v1/trust-bundle", get(ca_api::trust_bundle))
        .route("/v1/token", post(ca_api::token))
        .route("/v1/ca", get(ca_api::ca_status))
        .route("/v1/ca/rollover", post(ca_api::rollover))
        .route("/v1/jwks", get(ca_api::jwks))
        .route("/.well-known/jwks.json", get(ca_api::jwks))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint; see /openapi.json",
            )
        })
        .with_state(api)
}

/// An API error: its status, a stable type and a message for people.
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

pub(crate) fn error(status: StatusCode, kind: &'static str, message: &str) -> ApiError {
    ApiError {
        status,
        kind,
        message: message.to_string(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {"type": self.kind, "message": self.message}})),
        )
            .into_response()
    }
}

pub(crate) type Answer = Result<Response, ApiError>;

impl Api {
    pub(crate) fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(t) if constant_time_eq(t.as_bytes(), self.token.as_bytes()) => Ok(()),
            Some(_) => Err(error(StatusCode::FORBIDDEN, "forbidden", "wrong admin token")),
            None => Err(error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "changes need `Authorization: Bearer <admin token>` (the control server's state directory holds it in `admin-token`)",
            )),
        }
    }

    /// One agent as the API shows it.
    fn view(&self, a: &wire::Agent) -> Value {
        let declared = self.control.catalog().agents.contains_key(&a.name);
        let heartbeat = self.control.registry.last_heartbeat(&a.name);
        json!({
            "name": a.name,
            "namespace": a.namespace,
            "spiffe_id": a.spiffe_id,
            "description": a.description,
            "owner": a.owner,
            "tags": a.tags,
            "skills": a.skills.iter().map(|s| json!({"id": s.id, "name": s.name, "description": s.description, "tags": s.tags})).collect::<Vec<_>>(),
            "endpoints": a.endpoints.iter().map(|e| json!({"url": e.url, "healthy": e.healthy})).collect::<Vec<_>>(),
            "source": if declared { "config" } else { "registered" },
            "healthy": healthy(heartbeat),
            "last_heartbeat_unix": heartbeat,
            "certification": a.certification.iter().map(|c| json!({"check": c.check, "passed": c.passed, "at_unix": c.at_unix, "by": c.by, "detail": c.detail})).collect::<Vec<_>>(),
        })
    }

    pub(crate) fn find(&self, name: &str) -> Result<wire::Agent, ApiError> {
        self.control.world().agent(name).cloned().ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no agent `{name}` is declared or registered"),
            )
        })
    }
}

fn healthy(heartbeat: Option<u64>) -> bool {
    heartbeat.is_some_and(|t| now_unix().saturating_sub(t) <= HEALTH_WINDOW.as_secs())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, Deserialize, Default)]
struct Search {
    skill: Option<String>,
    owner: Option<String>,
    tag: Option<String>,
    /// Words matched against name, description and skills.
    q: Option<String>,
}

async fn list(State(api): State<Api>, Query(s): Query<Search>) -> Response {
    let world = api.control.world();
    let mut agents: Vec<&wire::Agent> = world
        .agents()
        .filter(|a| {
            s.skill
                .as_ref()
                .is_none_or(|k| a.skills.iter().any(|x| &x.id == k || x.tags.contains(k)))
                && s.owner.as_ref().is_none_or(|o| &a.owner == o)
                && s.tag.as_ref().is_none_or(|t| a.tags.contains(t))
                && s.q.as_ref().is_none_or(|q| {
                    let q = q.to_lowercase();
                    a.name.contains(&q)
                        || a.description.to_lowercase().contains(&q)
                        || a.skills.iter().any(|k| {
                            k.id.contains(&q)
                                || k.name.to_lowercase().contains(&q)
                                || k.description.to_lowercase().contains(&q)
                        })
                })
        })
        .collect();
    agents.sort_by(|a, b| a.name.cmp(&b.name));
    Json(json!({"agents": agents.iter().map(|a| api.view(a)).collect::<Vec<_>>()})).into_response()
}

async fn show(State(api): State<Api>, Path(name): Path<String>) -> Answer {
    let a = api.find(&name)?;
    let mut v = api.view(&a);
    v["card"] = serde_json::from_str(&a.card_json).unwrap_or(Value::Null);
    Ok(Json(v).into_response())
}

async fn agent_card(State(api): State<Api>, Path(name): Path<String>) -> Answer {
    let a = api.find(&name)?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        a.card_json,
    )
        .into_response())
}

/// An agent's own card, announced by its sidecar: only the holder of that agent's SVID may.
async fn announce_card(
    State(api): State<Api>,
    Extension(peer): Extension<crate::ca_api::PeerIdentity>,
    Path(name): Path<String>,
    payload: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    let Some(id) = peer.0 else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "no_credential",
            "an agent's card is announced with the agent's SVID as the client certificate",
        ));
    };
    if id.agent != name {
        return Err(error(
            StatusCode::FORBIDDEN,
            "not_this_agent",
            &format!(
                "`{}` may announce only its own card, not `{name}`'s",
                id.agent
            ),
        ));
    }
    api.find(&name)?;
    let card = body(payload)?;
    if !card.is_object() || card["name"] != name.as_str() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_card",
            &format!("an A2A agent card is a JSON object whose `name` is `{name}`"),
        ));
    }
    if api
        .control
        .registry
        .announce_card(&name, card)
        .map_err(persist_failed)?
    {
        tracing::info!(agent = %name, "agent card announced");
        api.control.rebuild();
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn health(State(api): State<Api>, Path(name): Path<String>) -> Answer {
    api.find(&name)?;
    let heartbeat = api.control.registry.last_heartbeat(&name);
    let sidecars: Vec<_> = api
        .control
        .registry
        .sidecars()
        .into_iter()
        .filter(|s| s.agent == name)
        .collect();
    Ok(Json(json!({
        "agent": name,
        "healthy": healthy(heartbeat),
        "last_heartbeat_unix": heartbeat,
        "window_seconds": HEALTH_WINDOW.as_secs(),
        "sidecars": sidecars,
    }))
    .into_response())
}

async fn certification(State(api): State<Api>, Path(name): Path<String>) -> Answer {
    api.find(&name)?;
    Ok(checks(&api, &name))
}

fn checks(api: &Api, name: &str) -> Response {
    Json(json!({"agent": name, "checks": api.control.registry.certification(name)})).into_response()
}

/// A JSON body, or a 400 saying what is wrong with it.
pub(crate) fn body<T>(
    b: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, ApiError> {
    b.map(|Json(v)| v)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_body", &e.body_text()))
}

pub(crate) fn persist_failed(e: crate::registry::RegistryError) -> ApiError {
    error(StatusCode::INTERNAL_SERVER_ERROR, "persist", &e.to_string())
}

async fn certify(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(name): Path<String>,
    payload: Result<Json<Certification>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    api.authorize(&headers)?;
    api.find(&name)?;
    let c = body(payload)?;
    if c.check.is_empty() || c.by.is_empty() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "`check` and `by` are required",
        ));
    }
    api.control
        .registry
        .certify(&name, c)
        .map_err(persist_failed)?;
    api.control.rebuild();
    Ok(checks(&api, &name))
}

async fn register(
    State(api): State<Api>,
    headers: HeaderMap,
    payload: Result<Json<AgentSpec>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    api.authorize(&headers)?;
    let mut spec = body(payload)?;
    check_agent(&spec).map_err(|(field, message)| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_agent",
            &format!("field `{field}`: {message}"),
        )
    })?;
    if api.control.catalog().agents.contains_key(&spec.name) {
        return Err(error(
            StatusCode::CONFLICT,
            "declared",
            &format!(
                "agent `{}` is declared in the control server's config; change it there",
                spec.name
            ),
        ));
    }
    // What an agent may call is granted by config, never by registering.
    if spec.calls != Default::default() || spec.policy.is_some() || !spec.secrets.is_empty() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_agent",
            "grants (`calls`, `policy`, `secrets`) come from the control server's config, not from registration",
        ));
    }
    if spec.card.is_none() {
        spec.card = Some(card(&spec));
    }
    let new = api
        .control
        .registry
        .register(spec.clone())
        .map_err(persist_failed)?;
    api.control.rebuild();
    let a = api.find(&spec.name)?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(api.view(&a))).into_response())
}

async fn deregister(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Answer {
    api.authorize(&headers)?;
    if api.control.catalog().agents.contains_key(&name) {
        return Err(error(
            StatusCode::CONFLICT,
            "declared",
            &format!("agent `{name}` is declared in the control server's config; remove it there"),
        ));
    }
    if !api
        .control
        .registry
        .deregister(&name)
        .map_err(persist_failed)?
    {
        return Err(error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no agent `{name}` is registered"),
        ));
    }
    api.control.rebuild();
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn sidecars(State(api): State<Api>) -> Response {
    Json(json!({"sidecars": api.control.registry.sidecars()})).into_response()
}

async fn status(State(api): State<Api>) -> Response {
    let catalog = api.control.catalog();
    let sidecars = api.control.registry.sidecars();
    Json(json!({
        "instance": api.control.instance,
        "source": api.control.source_status(),
        "agents": api.control.world().agents().count(),
        "upstreams": catalog.upstreams.len(),
        "policies": catalog.policies.keys().collect::<Vec<_>>(),
        "sidecars_connected": sidecars.iter().filter(|s| s.connected).count(),
        "sidecars_nacking": sidecars.iter().filter(|s| s.connected && s.last_nack.as_ref().is_some_and(|n| Some(&n.version) == s.sent_version.as_ref())).count(),
    }))
    .into_response()
}

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}
