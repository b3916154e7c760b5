//! The admin listener (design §2, port 15000): `/healthz` (the process serves), `/readyz` (a
//! config is loaded and the listeners are up), `/config_dump` (the effective config with its
//! version, policy revision and reload status), `/stats` (access-log, decision-log and decision
//! counters), `/metrics` (Prometheus text format), `/tap` (finished calls, live, as server-sent
//! events),
//! `/logging` (show or change the log filter at runtime).
//! Loopback only by default.

use crate::accesslog::AccessLog;
use crate::decide::PolicyCounters;
use crate::decisionlog::DecisionLog;
use crate::logging::LogControl;
use crate::metrics::{self, Metrics};
use crate::state::Store;
use crate::tap::{Tap, TapFilter};
use crate::traces::Traces;
use async_trait::async_trait;
use bytes::Bytes;
use http::Response;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use serde_json::json;
use std::sync::Arc;
use std::time::UNIX_EPOCH;
use tokio::sync::broadcast::error::RecvError;

pub struct Admin {
    pub store: Arc<Store>,
    pub access_log: Arc<AccessLog>,
    pub decision_log: Arc<DecisionLog>,
    pub policy_counters: Arc<PolicyCounters>,
    pub metrics: Arc<Metrics>,
    pub traces: Arc<Traces>,
    pub tap: Arc<Tap>,
    pub log: Option<Arc<LogControl>>,
    pub identity: Option<Arc<crate::identity::Identity>>,
}

/// `GET /logging` shows the log filter; `POST /logging?filter=DIRECTIVES` replaces it.
fn logging(log: Option<&LogControl>, method: &str, query: Option<&str>) -> Response<Vec<u8>> {
    let Some(log) = log else {
        return json_response(
            503,
            json!({"error": {"type": "unavailable", "message": "log control is not installed"}}),
        );
    };
    if method == "POST" || method == "PUT" {
        let wanted = query
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("filter="))
            .map(percent_decode);
        let Some(wanted) = wanted.filter(|w| !w.is_empty()) else {
            return json_response(
                400,
                json!({"error": {"type": "bad_request", "message": "give the new filter as ?filter=DIRECTIVES, e.g. ?filter=debug"}}),
            );
        };
        if let Err(m) = log.set(&wanted) {
            return json_response(400, json!({"error": {"type": "bad_request", "message": m}}));
        }
    }
    json_response(200, json!({"filter": log.current()}))
}

/// Decodes `%XX` escapes and `+` in a query value (filters contain `,` `=` and `::`).
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_response(status: u16, v: serde_json::Value) -> Response<Vec<u8>> {
    response(
        status,
        "application/json",
        serde_json::to_vec_pretty(&v).unwrap_or_default(),
    )
}

fn response(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .body(body)
        .unwrap_or_default()
}

/// Writes a whole response (header and body) to the session.
async fn send(http: &mut ServerSession, resp: Response<Vec<u8>>) -> Option<()> {
    let (parts, body) = resp.into_parts();
    let header: ResponseHeader = parts.into();
    http.write_response_header(Box::new(header)).await.ok()?;
    http.write_response_body(Bytes::from(body), true).await.ok()
}

#[async_trait]
impl HttpServerApp for Admin {
    async fn process_new_http(
        self: &Arc<Self>,
        mut http: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match http.read_request().await {
            Ok(true) => {}
            _ => return None,
        }
        if http.req_header().uri.path() == "/tap" {
            // A stream for as long as the watcher stays; the connection is not reused.
            self.tap(&mut http, shutdown).await;
            return None;
        }
        http.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
        let resp = self.response(&mut http).await;
        send(&mut http, resp).await?;
        let persistent = HttpPersistentSettings::for_session(&http);
        match http.finish().await {
            Ok(s) => s.map(|s| ReusedHttpStream::from_reusable_stream(s, persistent)),
            Err(_) => None,
        }
    }
}

impl Admin {
    /// `GET /tap[?agent=&kind=&target=&decision=&min_ms=]`: finished calls as server-sent
    /// events (`data: {json}`), `event: lagged` when this watcher missed some, a comment every
    /// 15 s to keep the stream (and to notice a watcher that left).
    async fn tap(&self, http: &mut ServerSession, shutdown: &ShutdownWatch) {
        let filter = match TapFilter::parse(http.req_header().uri.query()) {
            Ok(f) => f,
            Err(m) => {
                let bad = json!({"error": {"type": "bad_request", "message": m}});
                let _ = send(http, json_response(400, bad)).await;
                return;
            }
        };
        let mut events = self.tap.subscribe();
        let Ok(mut header) = ResponseHeader::build(200, None) else {
            return;
        };
        for (k, v) in [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
            ("transfer-encoding", "chunked"),
        ] {
            let _ = header.insert_header(k, v);
        }
        if http.write_response_header(Box::new(header)).await.is_err() {
            return;
        }
        let mut shutdown = shutdown.clone();
        let mut next = Some(Bytes::from_static(b": agentmesh tap\n\n"));
        loop {
            if let Some(chunk) = next.take() {
                if http.write_response_body(chunk, false).await.is_err() {
                    return; // the watcher left
                }
            }
            next = tokio::select! {
                e = events.recv() => match e {
                    Ok(e) if filter.matches(&e) => serde_json::to_string(&*e)
                        .ok()
                        .map(|j| Bytes::from(format!("data: {j}\n\n"))),
                    Ok(_) => None,
                    Err(RecvError::Lagged(n)) => Some(Bytes::from(format!(
                        "event: lagged\ndata: {{\"missed\":{n}}}\n\n"
                    ))),
                    Err(RecvError::Closed) => break,
                },
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(std::time::Duration::from_secs(15)) => {
                    Some(Bytes::from_static(b": keep-alive\n\n"))
                }
            };
        }
        let _ = http.write_response_body(Bytes::new(), true).await;
    }

    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let query = session.req_header().uri.query().unwrap_or("").to_string();
        match path.as_str() {
            "/healthz" => json_response(200, json!({"status": "ok"})),
            "/readyz" => {
                let snap = self.store.snapshot();
                let control = self.store.control();
                let want_fresh = query
                    .split('&')
                    .any(|p| p == "fresh=1" || p == "fresh=true");
                // With a control server: not ready before a first config (pushed or persisted),
                // and with `?fresh=1` not ready while that config may be stale.
                let identity = self.identity.as_ref().map(|i| i.status());
                let (code, status) = match (&control, &identity) {
                    (_, Some(i)) if !i.ready => (503, "waiting for an SVID"),
                    (Some(c), _) if c.source == "none" => (503, "waiting for the control server"),
                    (Some(c), _) if want_fresh && !c.fresh => (503, "config is not fresh"),
                    _ => (200, "ready"),
                };
                json_response(
                    code,
                    json!({
                        "status": status,
                        "config_version": snap.version,
                        "agent": snap.config.agent.name,
                        "control": control,
                        "identity": identity,
                    }),
                )
            }
            "/config_dump" => {
                let snap = self.store.snapshot();
                let loaded = snap
                    .loaded_at
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                json_response(
                    200,
                    json!({
                        "version": snap.version,
                        "loaded_at_unix": loaded,
                        "status": self.store.status(),
                        "control": self.store.control(),
                        "identity": self.identity.as_ref().map(|i| i.status()),
                        "policy": snap.policy.as_ref().map(|p| json!({
                            "revision": p.revision(),
                            "decision": p.decision_path(),
                            "modules": p.modules(),
                            "mode": snap.config.policy.mode,
                            "engine": p.engine(),
                            "reads": p.reads().pointers(),
                            "cache": p.cache_key().map(|key| json!({
                                "key": key,
                                "entries": p.cache_entries(),
                            })),
                        })),
                        "config": snap.config.redacted(),
                    }),
                )
            }
            "/metrics" => response(
                200,
                metrics::CONTENT_TYPE,
                self.metrics.render().into_bytes(),
            ),
            "/logging" => {
                let req = session.req_header();
                logging(self.log.as_deref(), req.method.as_str(), req.uri.query())
            }
            "/stats" => json_response(
                200,
                json!({
                    "access_log": self.access_log.counters(),
                    "policy": self.policy_counters.snapshot(),
                    "decision_log": self.decision_log.counters(),
                    // Spans made and exported; ended − exported − export_failed were dropped
                    // (queue full) or are still queued.
                    "traces": self.traces.enabled().then(|| &*self.traces.counters),
                    "tap": {"watchers": self.tap.watchers()},
                    // Reloads of the config and its policy: rejected ones kept the last good.
                    "reloads": self.store.status(),
                }),
            ),
            _ => json_response(
                404,
                json!({"error": {"type": "not_found", "message": format!("no admin endpoint {path}; try /healthz, /readyz, /config_dump, /stats, /metrics, /tap, /logging")}}),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn query_values_decode() {
        assert_eq!(
            percent_decode("info%2Cagentmesh_proxy%3A%3Aproxy%3Ddebug"),
            "info,agentmesh_proxy::proxy=debug"
        );
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%é"), "%é");
    }
}
