//! The admin listener (design §2, port 15000): `/healthz` (the process serves), `/readyz` (a
//! config is loaded and the listeners are up), `/config_dump` (the effective config with its
//! version and reload status), `/stats` (access-log counters; `/metrics` comes with issue 4).
//! Loopback only by default.

use crate::accesslog::AccessLog;
use crate::state::Store;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

pub struct Admin {
    pub store: Arc<Store>,
    pub access_log: Arc<AccessLog>,
}

fn json_response(status: u16, v: serde_json::Value) -> Response<Vec<u8>> {
    let body = serde_json::to_vec_pretty(&v).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(body)
        .unwrap_or_default()
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/healthz" => json_response(200, json!({"status": "ok"})),
            "/readyz" => {
                let snap = self.store.snapshot();
                json_response(
                    200,
                    json!({"status": "ready", "config_version": snap.version, "agent": snap.config.agent.name}),
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
                        "config": snap.config.redacted(),
                    }),
                )
            }
            "/stats" => json_response(200, json!({"access_log": self.access_log.counters()})),
            _ => json_response(
                404,
                json!({"error": {"type": "not_found", "message": format!("no admin endpoint {path}; try /healthz, /readyz, /config_dump, /stats")}}),
            ),
        }
    }
}
