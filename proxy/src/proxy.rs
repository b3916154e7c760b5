//! The request path (design §3) on pingora's `ProxyHttp` phases. Each call goes through, in order:
//! identify (direction and local agent; SVIDs arrive with issue 6), classify (`classify`), decide
//! (`decide`: granted names, then Rego policy), route (`route`), and observe (`usage` + the access
//! log). Phase functions stay small; the logic lives in the pure modules.
//!
//! Where a call is decided: bodiless calls and bodies whose `Content-Length` fits pingora's
//! replay buffer (64 KiB) are read, classified and decided in `request_filter`, before any
//! upstream connection; pingora then forwards the body from that buffer. Larger or chunked
//! bodies are decided in `request_body_filter` once whole: the upstream connection and request
//! head exist by then, but no body byte is sent before the decision (see ARCHITECTURE.md).

use crate::accesslog::AccessLog;
use crate::accesslog::Timings;
use crate::classify::{classify, ClassifyError, Destination};
use crate::config::CallKind;
use crate::decide::{self, CallFacts, PolicyCounters, Verdict};
use crate::decisionlog::{DecisionLog, Entry};
use crate::exchange::Exchanger;
use crate::identity::{Identity, Peer};
use crate::jwt::{self, JwtError};
use crate::metrics::Metrics;
use crate::record::{CallRecord, Direction, PolicyResult};
use crate::reject::Rejection;
use crate::route::{resolve, upstream_path, UpstreamState};
use crate::spend::Spend;
use crate::state::{Snapshot, Store};
use crate::tap::{Tap, TapEvent};
use crate::traces::{CallSpan, Traces};
use crate::usage::UsageReader;
use agentmesh_control_api::identity::AgentId;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora_error::{ErrorSource, ErrorType};
use pingora_proxy::FailToProxy;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One proxy per listener: outbound (agent → mesh) or inbound (mesh → agent).
pub struct MeshProxy {
    pub store: Arc<Store>,
    pub direction: Direction,
    pub access_log: Arc<AccessLog>,
    pub decision_log: Arc<DecisionLog>,
    pub policy_counters: Arc<PolicyCounters>,
    pub metrics: Arc<Metrics>,
    pub traces: Arc<Traces>,
    pub tap: Arc<Tap>,
    /// The local agent's LLM spend in the budget window.
    pub spend: Arc<Spend>,
    /// The sidecar's SPIFFE identity; with it, calls to peers are mTLS.
    pub identity: Option<Arc<Identity>>,
    /// Exchanges the caller's token before calls to peers and tools.
    pub exchanger: Option<Arc<Exchanger>>,
}

/// Largest body read before connecting upstream: pingora replays a body it has read only from its
/// retry buffer, which holds 64 KiB.
const PREREAD_LIMIT: usize = 64 * 1024;

/// Per-call context carried through the phases.
pub struct CallCtx {
    started: Instant,
    record: Option<CallRecord>,
    upstream: Option<Arc<UpstreamState>>,
    endpoint: Option<usize>,
    forward_path: String,
    /// Body held back for inspection (`Some` while reading an inspected body).
    held: Option<BytesMut>,
    /// The body was read in `request_filter` (pingora forwards it from its retry buffer).
    preread: bool,
    /// Headers an allow decision adds to the upstream request.
    decision_headers: Vec<(String, String)>,
    limit: usize,
    usage: Option<UsageReader>,
    tries: usize,
    rejection: Option<Rejection>,
    upstream_started: Option<Instant>,
    first_byte: Option<Duration>,
    upstream_failed: bool,
    /// The breaker already heard about this attempt (a failed connect).
    breaker_noted: bool,
    /// The response's body has ended (its usage is read in `logging`).
    response_ended: bool,
    /// The call's span, when traces are on.
    span: Option<CallSpan>,
    /// Inbound over mTLS: the calling peer, from its verified certificate.
    peer: Option<AgentId>,
    /// The end user, from a validated JWT.
    user: Option<jwt::User>,
    /// That JWT, to exchange on the way out.
    user_token: Option<String>,
}

impl CallCtx {
    fn kind(&self) -> Option<CallKind> {
        self.record.as_ref().map(|r| r.kind)
    }
}

fn bodyful(method: &str) -> bool {
    matches!(method, "POST" | "PUT" | "PATCH")
}

impl MeshProxy {
    /// Who is calling, as telemetry labels it: the local agent on the way out; on the way in,
    /// the peer its mTLS certificate names (`unknown` over plaintext).
    fn source<'a>(&self, snap: &'a Snapshot, peer: &'a Option<AgentId>) -> &'a str {
        match (self.direction, peer) {
            (Direction::Outbound, _) => snap.config.agent.name.as_str(),
            (Direction::Inbound, Some(p)) => p.agent.as_str(),
            (Direction::Inbound, None) => "unknown",
        }
    }

    /// observe (LLM part), once the answer is out: the usage read off the buffered JSON body or
    /// the stream's last line, priced, and added to the local agent's spend.
    fn settle_usage(&self, ctx: &mut CallCtx) {
        let (Some(u), Some(r)) = (ctx.usage.as_mut(), ctx.record.as_mut()) else {
            return;
        };
        if let (Some(span), Some(body)) = (ctx.span.as_mut(), u.json_body()) {
            span.record_output(body);
        }
        u.finish();
        let Some(l) = r.llm.as_mut() else {
            return;
        };
        l.usage = u.usage;
        l.response_model = u.response_model.clone();
        let snap = self.store.snapshot();
        let model = l.response_model.as_deref().or(l.model.as_deref());
        if let Some(price) = model.and_then(|m| snap.prices.price(&l.provider, m)) {
            let usd = crate::cost::cost(price, l.api, &l.usage);
            l.cost_usd = Some(usd);
            if self.direction == Direction::Outbound {
                self.spend.add(usd);
            }
        }
    }

    /// identify, inbound: with an identity, the peer's verified SPIFFE ID, or a refusal saying
    /// why there is none (no client certificate, not TLS 1.3, a certificate without one).
    fn identify_peer(&self, session: &Session) -> Result<Option<AgentId>, Rejection> {
        if self.direction != Direction::Inbound || self.identity.is_none() {
            return Ok(None);
        }
        let peer = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .and_then(|t| t.extension.get::<Peer>());
        let why = match peer.map(|p| &p.0) {
            Some(Ok(id)) => return Ok(Some(id.clone())),
            Some(Err(why)) => format!("the calling sidecar is not identified: {why}"),
            None => "calls between sidecars must be mTLS".to_string(),
        };
        tracing::warn!(reason = %why, "inbound call refused");
        Err(Rejection::new(401, "unauthenticated_peer", why))
    }

    /// identify, the end user: a Bearer JWT validated against the configured issuers, its
    /// claims kept for `input.user`; an invalid token (or none, when required) is a 401 with
    /// the reason.
    async fn identify_user(
        &self,
        session: &Session,
        snap: &Snapshot,
        ctx: &mut CallCtx,
    ) -> Result<(), Rejection> {
        let Some(v) = &snap.jwt else {
            return Ok(());
        };
        let refuse = |e: JwtError| {
            tracing::warn!(reason = %e, "end-user token refused");
            Rejection::new(401, "invalid_token", e.to_string())
        };
        match jwt::bearer_jwt(&session.req_header().headers) {
            Some(token) => {
                ctx.user = Some(v.validate(token).await.map_err(refuse)?);
                ctx.user_token = Some(token.to_string());
            }
            None if v.required() => return Err(refuse(JwtError::Missing)),
            None => {}
        }
        Ok(())
    }

    /// Sends a rejection straight to the caller; the call ends in this phase.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &mut CallCtx,
        rej: Rejection,
    ) -> Result<bool> {
        send_rejection(session, &rej, ctx.kind()).await?;
        if let Some(r) = ctx.record.as_mut() {
            r.status = rej.status;
        }
        ctx.rejection = Some(rej);
        Ok(true)
    }

    /// Identify + route-by-name: which upstream this call is for, or why it may not proceed.
    fn select(
        &self,
        session: &Session,
        snap: &Snapshot,
        ctx: &mut CallCtx,
    ) -> Result<(), Rejection> {
        let req = session.req_header();
        let method = req.method.as_str();
        let path_q = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let (name, kind, fwd) = match self.direction {
            Direction::Outbound => {
                let host = req
                    .headers
                    .get("host")
                    .and_then(|h| h.to_str().ok())
                    .or_else(|| req.uri.host());
                let Some(addr) = resolve(path_q, host) else {
                    ctx.record = Some(CallRecord::new(
                        self.direction,
                        CallKind::Http,
                        "-",
                        method,
                        path_q,
                    ));
                    return Err(Rejection::new(
                        404,
                        "no_route",
                        format!(
                            "`{}` is not a mesh address: use /llm/<provider>/..., /mcp/<server>, \
                             /agents/<agent>/... or /http/<name>/...",
                            req.uri.path()
                        ),
                    ));
                };
                (addr.name, addr.kind, addr.path)
            }
            Direction::Inbound => (
                "inbound".to_string(),
                snap.config.inbound.kind,
                path_q.to_string(),
            ),
        };
        // Recorded before the grant check, so that refusals are logged like any call.
        ctx.record = Some(CallRecord::new(self.direction, kind, &name, method, &fwd));
        ctx.peer = self.identify_peer(session)?;
        let upstream = match self.direction {
            Direction::Outbound => snap.upstream_for(&name).ok_or_else(|| {
                Rejection::new(
                    403,
                    "not_granted",
                    format!(
                        "upstream `{name}` is not granted to agent `{}`",
                        snap.config.agent.name
                    ),
                )
                .upstream(&name)
            })?,
            Direction::Inbound => snap.inbound.clone().ok_or_else(|| {
                Rejection::new(
                    503,
                    "no_inbound",
                    "this sidecar has no `inbound.forward_to`",
                )
            })?,
        };
        ctx.forward_path = fwd;
        ctx.upstream = Some(upstream);
        Ok(())
    }

    fn run_classify(
        &self,
        session: &Session,
        ctx: &mut CallCtx,
        body: &[u8],
    ) -> Result<(), Rejection> {
        let (Some(up), Some(rec)) = (ctx.upstream.as_ref(), ctx.record.as_mut()) else {
            return Ok(());
        };
        let dest = Destination {
            kind: rec.kind,
            name: up.config.short_name(),
            llm_api: up.config.llm_api(),
        };
        rec.request_bytes = body.len() as u64;
        if let (Some(span), CallKind::Llm) = (ctx.span.as_mut(), rec.kind) {
            span.record_input(body);
        }
        classify(rec, dest, &session.req_header().headers, body)
            .map_err(|e| classify_rejection(&e, &rec.target))
    }

    /// Reads a whole (small) body before connecting upstream, keeping it in pingora's retry
    /// buffer, from which pingora forwards it.
    async fn preread(&self, session: &mut Session) -> Result<Bytes> {
        session.as_mut().enable_retry_buffering();
        let mut buf = BytesMut::new();
        while let Some(chunk) = session.read_request_body().await? {
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    /// decide: the Rego policy on the classified call. Deny by default (no policy, evaluation
    /// errors), audit mode only logs denies.
    fn run_decide(
        &self,
        session: &Session,
        snap: &Snapshot,
        ctx: &mut CallCtx,
    ) -> Result<(), Rejection> {
        let (Some(up), Some(rec)) = (ctx.upstream.as_ref(), ctx.record.as_mut()) else {
            return Ok(());
        };
        let req = session.req_header();
        let own = self.identity.as_ref().map(|i| i.id.spiffe_id());
        let peer = ctx.peer.as_ref().map(|p| (p.agent.as_str(), p.spiffe_id()));
        let (agent, spiffe_id, destination) = match (self.direction, &peer) {
            (Direction::Outbound, _) => (
                snap.config.agent.name.as_str(),
                own.as_deref(),
                up.config.short_name(),
            ),
            (Direction::Inbound, Some((agent, id))) => {
                (*agent, Some(id.as_str()), snap.config.agent.name.as_str())
            }
            // Plaintext (allowed by config): the caller is not known.
            (Direction::Inbound, None) => ("", None, snap.config.agent.name.as_str()),
        };
        let facts = CallFacts {
            agent,
            spiffe_id,
            user: ctx.user.as_ref(),
            destination,
            path: req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
            headers: &req.headers,
            time: decide::now_rfc3339(),
            budget: (self.direction == Direction::Outbound).then(|| {
                agentmesh_policy::input::Budget {
                    // To the micro-dollar: sums of float prices carry binary noise
                    // (0.005 + 0.008 = 0.013000000000000001) that reasons would print.
                    spent_usd: (self.spend.current() * 1e6).round() / 1e6,
                    window: self.spend.window_text().to_string(),
                }
            }),
        };
        let inputs = decide::inputs(rec, &facts);
        let out = decide::decide(
            snap.policy.as_deref(),
            &inputs,
            snap.config.policy.mode,
            up.config.fail_open,
            &rec.target,
        );
        self.policy_counters.count(&out);
        self.metrics
            .decision(self.source(snap, &ctx.peer), rec, &out);
        self.decision_log.write(&Entry {
            inputs: &inputs,
            evaluations: &out.evaluations,
            decision_path: &snap.config.policy.decision,
            revision: snap.policy.as_ref().map(|p| p.revision()),
            enforced: !out.audited,
            mask: &snap.config.policy.decision_log_mask,
        });
        rec.decision = Some(PolicyResult {
            allow: out.decision.allow,
            enforced: !out.audited,
            reason: out.decision.reason.clone(),
            eval_ms: out.evaluations.iter().map(|e| e.eval_ns).sum::<u64>() as f64 / 1e6,
        });
        if out.audited {
            tracing::warn!(
                target = %rec.target,
                reason = out.decision.reason.as_deref().unwrap_or("denied by policy"),
                "policy denies this call; audit mode lets it through"
            );
        }
        match out.verdict {
            Verdict::Allow { headers } => {
                ctx.decision_headers = headers;
                Ok(())
            }
            Verdict::Deny(rej) => Err(rej),
        }
    }

    fn too_large(&self, ctx: &CallCtx) -> Rejection {
        let target = ctx.record.as_ref().map(|r| r.target.as_str()).unwrap_or("");
        classify_rejection(&ClassifyError::TooLarge { limit: ctx.limit }, target)
    }
}

/// The answer to a request that could not be classified.
fn classify_rejection(e: &ClassifyError, target: &str) -> Rejection {
    Rejection::new(e.http_status(), e.cause(), e.to_string())
        .upstream(target)
        .jsonrpc(e.jsonrpc_code())
}

/// Writes a rejection as the whole response (JSON body, `Retry-After` when known) and closes the
/// connection after it.
async fn send_rejection(
    session: &mut Session,
    rej: &Rejection,
    kind: Option<CallKind>,
) -> Result<()> {
    let body = rej.body(kind);
    let mut resp = ResponseHeader::build(rej.status, Some(4))?;
    resp.insert_header("content-type", "application/json")?;
    resp.insert_header("content-length", body.len().to_string())?;
    if let Some(s) = rej.retry_after_secs {
        resp.insert_header("retry-after", s.to_string())?;
    }
    session.set_keepalive(None);
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
}

/// The 503 for an upstream whose every endpoint has an open circuit.
fn circuit_open(up: &UpstreamState) -> Rejection {
    let name = &up.config.name;
    let mut rej = Rejection::new(
        503,
        "circuit_open",
        format!("upstream `{name}` is failing; its circuit is open"),
    )
    .upstream(name);
    rej.retry_after_secs = Some(up.retry_after().as_secs().max(1));
    rej
}

/// Maps a proxy error to the status and cause the caller sees.
fn failure_of(e: &Error, upstream: &str) -> Rejection {
    use ErrorType::*;
    let (status, cause, what) = match e.etype() {
        HTTPStatus(code) => (*code, "rejected", "rejected"),
        ConnectTimedout | TLSHandshakeTimedout => (504, "upstream_timeout", "connect timed out"),
        ReadTimedout | WriteTimedout => {
            (504, "upstream_timeout", "upstream did not answer in time")
        }
        ConnectRefused => (502, "upstream_unavailable", "connection refused"),
        ConnectNoRoute => (502, "upstream_unavailable", "no route to host"),
        TLSHandshakeFailure | InvalidCert | HandshakeError => (
            502,
            "upstream_tls_error",
            "TLS handshake with the upstream failed",
        ),
        _ if e.esource() == &ErrorSource::Upstream => {
            (502, "upstream_error", "the upstream connection failed")
        }
        _ if e.esource() == &ErrorSource::Downstream => (400, "bad_request", "bad request"),
        _ => (502, "upstream_error", "the call could not be proxied"),
    };
    let detail = e
        .context
        .as_ref()
        .map(|c| c.as_str().to_string())
        .unwrap_or_default();
    let message = if detail.is_empty() {
        format!("{what} (upstream `{upstream}`)")
    } else {
        format!("{what} (upstream `{upstream}`): {detail}")
    };
    Rejection::new(status, cause, message).upstream(upstream)
}

#[async_trait]
impl ProxyHttp for MeshProxy {
    /// Boxed: pingora keeps the context inside each request's future, which it moves onto the
    /// heap whole for every request on a connection (1,376 bytes of context copied each time).
    type CTX = Box<CallCtx>;

    fn new_ctx(&self) -> Box<CallCtx> {
        Box::new(CallCtx {
            started: Instant::now(),
            record: None,
            upstream: None,
            endpoint: None,
            forward_path: String::new(),
            held: None,
            preread: false,
            decision_headers: Vec::new(),
            limit: 0,
            usage: None,
            tries: 0,
            rejection: None,
            upstream_started: None,
            first_byte: None,
            upstream_failed: false,
            breaker_noted: false,
            response_ended: false,
            span: None,
            peer: None,
            user: None,
            user_token: None,
        })
    }

    /// No downstream modules. pingora's default registers its response-compression module at
    /// level 0 (off), which still builds a boxed module context for every request and runs its
    /// filters on every header and body chunk. The sidecar never compresses: the upstream's
    /// `Content-Encoding` passes through as it came.
    fn init_downstream_modules(&self, _modules: &mut pingora_core::modules::http::HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        ctx.span = self
            .traces
            .start(self.direction, &session.req_header().headers, ctx.started);
        let snap = self.store.snapshot();
        ctx.limit = snap.config.limits.max_inspect_body_bytes;
        if let Err(rej) = self.select(session, &snap, ctx) {
            return self.respond(session, ctx, rej).await;
        }
        if let Err(rej) = self.identify_user(session, &snap, ctx).await {
            return self.respond(session, ctx, rej).await;
        }
        let kind = ctx.kind().unwrap_or(CallKind::Http);
        let method = session.req_header().method.as_str().to_string();
        if kind.inspects_body() && bodyful(&method) {
            let declared = session
                .req_header()
                .headers
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok());
            if declared.is_some_and(|n| n > ctx.limit) {
                let rej = self.too_large(ctx);
                return self.respond(session, ctx, rej).await;
            }
            if declared.is_some_and(|n| n <= PREREAD_LIMIT) {
                // Small enough to replay: classify and decide before any upstream connection.
                let body = self.preread(session).await?;
                ctx.preread = true;
                if let Err(rej) = self
                    .run_classify(session, ctx, &body)
                    .and_then(|()| self.run_decide(session, &snap, ctx))
                {
                    return self.respond(session, ctx, rej).await;
                }
            } else {
                // Classified and decided when the whole body has arrived (request_body_filter).
                ctx.held = Some(BytesMut::new());
            }
        } else if let Err(rej) = self
            .run_classify(session, ctx, b"")
            .and_then(|()| self.run_decide(session, &snap, ctx))
        {
            return self.respond(session, ctx, rej).await;
        }
        if let Some(up) = &ctx.upstream {
            if !up.available() {
                let rej = circuit_open(up);
                return self.respond(session, ctx, rej).await;
            }
        }
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let up = ctx
            .upstream
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no upstream selected"))?;
        ctx.tries += 1;
        ctx.breaker_noted = false;
        // A retry re-sends the body from pingora's retry buffer: read it afresh.
        if ctx.held.is_some() {
            ctx.held = Some(BytesMut::new());
        }
        let Some(i) = up.pick() else {
            ctx.rejection = Some(circuit_open(&up));
            return Err(Error::explain(ErrorType::HTTPStatus(503), "circuit open"));
        };
        ctx.endpoint = Some(i);
        let ep = &up.endpoints[i];
        let addr = up
            .address(i)
            .await
            .map_err(|m| Error::explain(ErrorType::ConnectNoRoute, m))?;
        // To a peer agent with an identity: mTLS with the current SVID, the peer's certificate
        // checked against the trust bundle and its identity as the name.
        let mesh_tls = match (&self.identity, up.config.kind()) {
            (Some(id), Some(CallKind::A2a)) if self.direction == Direction::Outbound => {
                let svid = id.current().ok_or_else(|| {
                    ctx.rejection = Some(Rejection::new(
                        503,
                        "no_identity",
                        "this sidecar has no SVID yet: calls to peers wait for one",
                    ));
                    Error::explain(ErrorType::HTTPStatus(503), "no SVID")
                })?;
                let peer_id = AgentId::new(
                    &id.id.trust_domain,
                    &self.store.namespace_of(up.config.short_name()),
                    up.config.short_name(),
                );
                Some((svid, peer_id.dns_name()))
            }
            _ => None,
        };
        let tls = ep.tls || mesh_tls.is_some();
        let sni = match &mesh_tls {
            Some((_, name)) => name.clone(),
            None => up.config.tls.sni.clone().unwrap_or_else(|| ep.host.clone()),
        };
        let mut peer = HttpPeer::new(addr, tls, sni);
        // Pools are per logical upstream: two upstreams with different trust settings never
        // share a connection, even to the same address.
        peer.group_key = up.pool_key;
        let t = &up.config.timeouts;
        peer.options.connection_timeout = Some(t.connect);
        peer.options.total_connection_timeout = Some(t.connect * 2);
        peer.options.read_timeout = Some(t.read);
        peer.options.write_timeout = Some(t.read);
        peer.options.idle_timeout = Some(t.idle);
        if let Some((svid, _)) = &mesh_tls {
            peer.client_cert_key = Some(svid.cert_key.clone());
            peer.options.ca = Some(svid.bundle.clone());
        } else if ep.tls {
            if up.config.http2 {
                peer.options.set_http_version(2, 1);
            }
            if let Some(ca) = &up.ca {
                let ca = ca
                    .clone()
                    .map_err(|m| Error::explain(ErrorType::InvalidCert, m))?;
                peer.options.ca = Some(ca);
            }
        }
        ctx.upstream_started = Some(Instant::now());
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let (Some(up), Some(i)) = (ctx.upstream.as_ref(), ctx.endpoint) else {
            return Ok(());
        };
        let ep = &up.endpoints[i];
        if self.direction == Direction::Outbound {
            let path = upstream_path(&ep.base_path, &ctx.forward_path);
            let uri = path
                .parse::<http::Uri>()
                .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "rewriting path", e))?;
            req.set_uri(uri);
            req.insert_header("host", ep.authority.as_str())?;
            // The agent holds no credentials: whatever it sent (a dummy provider key, the
            // user's token) stays here, and the sidecar's own credential goes out instead.
            for h in agentmesh_policy::input::CREDENTIAL_HEADERS {
                // Looked up first: pingora's removal also rebuilds its header-case map, and
                // most calls carry none of these.
                if req.headers.contains_key(h) {
                    req.remove_header(h);
                }
            }
            if let Some(c) = &up.config.credential {
                let secret = self
                    .store
                    .snapshot()
                    .secrets
                    .get(&c.secret)
                    .map(str::to_string);
                if let Some((name, value)) = secret.and_then(|v| up.config.credential_header(&v)) {
                    req.insert_header(name, value)?;
                }
            }
            // To a peer agent or a tool: the caller's token, exchanged for one for that
            // destination alone.
            let kind = up.config.kind();
            if let (Some(ex), Some(subject), Some(CallKind::A2a | CallKind::Mcp)) =
                (&self.exchanger, &ctx.user_token, kind)
            {
                let audience = match kind {
                    Some(CallKind::A2a) => {
                        let name = up.config.short_name();
                        let td = self.identity.as_ref().map(|i| i.id.trust_domain.clone());
                        AgentId::new(
                            td.as_deref()
                                .unwrap_or(agentmesh_control_api::identity::TRUST_DOMAIN),
                            &self.store.namespace_of(name),
                            name,
                        )
                        .spiffe_id()
                    }
                    _ => up.config.name.clone(),
                };
                match ex.token(subject, &audience).await {
                    Ok(t) => req.insert_header("authorization", format!("Bearer {t}"))?,
                    Err(e) => {
                        tracing::warn!(%audience, error = %e, "token exchange failed");
                        ctx.rejection = Some(Rejection::new(
                            403,
                            "token_exchange_failed",
                            format!(
                                "the caller's token could not be exchanged for {audience}: {e}"
                            ),
                        ));
                        return Err(Error::explain(ErrorType::HTTPStatus(403), "token exchange"));
                    }
                }
            }
        }
        for (name, value) in &ctx.decision_headers {
            req.insert_header(name.clone(), value.as_str())?;
        }
        if let Some(span) = &ctx.span {
            // The upstream continues this call's span, not the agent's.
            req.remove_header("tracestate");
            for (name, value) in span.propagation().0 {
                req.insert_header(name, value)?;
            }
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let Some(held) = ctx.held.as_mut() else {
            if let (Some(r), Some(b), false) = (ctx.record.as_mut(), body.as_ref(), ctx.preread) {
                r.request_bytes += b.len() as u64;
            }
            return Ok(());
        };
        if let Some(chunk) = body.take() {
            if held.len() + chunk.len() > ctx.limit {
                ctx.held = None;
                ctx.rejection = Some(self.too_large(ctx));
                return Err(Error::explain(
                    ErrorType::HTTPStatus(413),
                    "body over the inspection limit",
                ));
            }
            held.extend_from_slice(&chunk);
        }
        if !end_of_stream {
            *body = Some(Bytes::new()); // hold back until the body is whole
            return Ok(());
        }
        let whole = ctx.held.take().map(BytesMut::freeze).unwrap_or_default();
        let snap = self.store.snapshot();
        if let Err(rej) = self
            .run_classify(session, ctx, &whole)
            .and_then(|()| self.run_decide(session, &snap, ctx))
        {
            let status = rej.status;
            ctx.rejection = Some(rej);
            return Err(Error::explain(
                ErrorType::HTTPStatus(status),
                "request refused by classification or policy",
            ));
        }
        if !ctx.decision_headers.is_empty() {
            tracing::warn!(
                "the policy's headers were not added: this body (chunked or over 64 KiB) was \
                 decided after the request head had gone upstream"
            );
            ctx.decision_headers.clear();
        }
        // Re-arm for a possible retry, which replays the body from pingora's retry buffer.
        ctx.held = Some(BytesMut::new());
        *body = Some(whole);
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        ctx.first_byte = Some(ctx.started.elapsed());
        if resp.status.is_server_error() {
            ctx.upstream_failed = true;
        }
        if let Some(r) = ctx.record.as_mut() {
            r.status = resp.status.as_u16();
            if r.llm.is_some() {
                let ct = resp
                    .headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                ctx.usage = Some(UsageReader::new(ct));
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<Option<Duration>> {
        if let Some(b) = body.as_ref() {
            if let Some(r) = ctx.record.as_mut() {
                r.response_bytes += b.len() as u64;
            }
            if let Some(u) = ctx.usage.as_mut() {
                u.feed(b);
            }
        }
        // The usage is read once the agent has the whole answer (`logging`), not here, where
        // parsing the body would hold back its last bytes.
        ctx.response_ended |= end_of_stream;
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let (Some(up), Some(i)) = (ctx.upstream.as_ref(), ctx.endpoint) {
            if up.record_failure(i) {
                tracing::warn!(upstream = %up.config.name, endpoint = i, "circuit opened");
            }
            ctx.breaker_noted = true;
            // Nothing was sent yet: a failed connect is always safe to retry.
            e.set_retry(ctx.tries <= up.config.retries.attempts);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("peer {peer}"));
        let attempts = ctx
            .upstream
            .as_ref()
            .map_or(0, |u| u.config.retries.attempts);
        // Retry only safe calls: idempotent methods with a replayable body, within the budget,
        // and only before the caller has seen any of the response. Such a call is retried on
        // any upstream failure, timeouts included (what pingora alone would retry only on a
        // reused connection).
        if ctx.rejection.is_some()
            || ctx.tries > attempts
            || ctx.first_byte.is_some()
            || !session.req_header().method.is_idempotent()
            || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else if e.esource() == &ErrorSource::Upstream {
            e.set_retry(true);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let upstream = ctx
            .record
            .as_ref()
            .map(|r| r.target.clone())
            .unwrap_or_default();
        let rej = ctx
            .rejection
            .clone()
            .unwrap_or_else(|| failure_of(e, &upstream));
        let downstream_gone = e.esource() == &ErrorSource::Downstream
            && matches!(
                e.etype(),
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
            );
        if ctx.rejection.is_none() && e.esource() == &ErrorSource::Upstream {
            ctx.upstream_failed = true;
        }
        let code = if downstream_gone || ctx.first_byte.is_some() {
            0 // the caller left, or the response already started: nothing more can be said
        } else {
            if let Err(e) = send_rejection(session, &rej, ctx.kind()).await {
                tracing::debug!(error = %e, "could not send the error answer");
            }
            rej.status
        };
        if let Some(r) = ctx.record.as_mut() {
            if code > 0 {
                r.status = code;
            }
        }
        ctx.rejection = Some(rej);
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Self::CTX, _error: &Error) -> bool {
        // Our own refusals are in the access log with their cause; they are not proxy faults.
        ctx.rejection.is_some()
    }

    async fn logging(&self, _session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        // The call's times end here, before the work done after the answer.
        let times = Timings {
            total: ctx.started.elapsed(),
            upstream: ctx.upstream_started.map(|s| s.elapsed()),
            ttfb: ctx.first_byte,
        };
        if ctx.response_ended {
            self.settle_usage(ctx);
        }
        if let (Some(up), Some(i), false) = (ctx.upstream.as_ref(), ctx.endpoint, ctx.breaker_noted)
        {
            if ctx.upstream_failed {
                if up.record_failure(i) {
                    tracing::warn!(upstream = %up.config.name, endpoint = i, "circuit opened");
                }
            } else if ctx.rejection.is_none() && e.is_none() {
                up.record_success(i);
            }
        }
        if let Some(r) = ctx.record.as_ref() {
            let trace_id = ctx.span.as_ref().map(CallSpan::trace_id);
            let total = times.total;
            let snap = self.store.snapshot();
            if self.tap.watched() {
                let event = TapEvent::new(
                    r,
                    self.source(&snap, &ctx.peer),
                    &times,
                    trace_id.as_deref(),
                );
                self.tap.publish(event);
            }
            self.access_log.write(
                r,
                self.source(&snap, &ctx.peer),
                times,
                ctx.rejection.as_ref(),
                trace_id.as_deref(),
            );
            self.metrics.call(self.source(&snap, &ctx.peer), r, total);
            if let Some(span) = ctx.span.take() {
                let error = e.map(|e| e.to_string());
                span.finish(r, self.source(&snap, &ctx.peer), error.as_deref());
            }
        }
    }
}
