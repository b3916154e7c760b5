//! A sample MCP tool server over Streamable HTTP, speaking both revisions the official SDKs use:
//! the session-based one (`initialize`, `Mcp-Session-Id`, DELETE to close; 2024-11-05 to
//! 2025-11-25) and the stateless 2026-07-28 one (`server/discover`, a `_meta` envelope on every
//! request, `Mcp-Method`/`Mcp-Name`/`Mcp-Param-*` headers that must agree with the body).
//! Tools: `echo`, `add`, `web_search` (its `region` argument is mirrored in `Mcp-Param-Region`),
//! `read_file` (a small fixed file tree).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

const HANDSHAKE_VERSIONS: [&str; 4] = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];
const MODERN_VERSIONS: [&str; 1] = ["2026-07-28"];
const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const HEADER_MISMATCH: i64 = -32020;
const UNSUPPORTED_VERSION: i64 = -32022;

#[derive(Default)]
struct Sessions(Mutex<HashSet<String>>);

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Builds the server's router; the MCP endpoint is `/mcp`.
pub fn router() -> Router {
    Router::new()
        .route("/mcp", get(get_stream).post(post).delete(delete))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(Arc::new(Sessions::default()))
}

fn tools() -> Value {
    json!([
        {"name": "echo", "description": "Echo the text back.",
         "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}},
        {"name": "add", "description": "Add two integers.",
         "inputSchema": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}},
        {"name": "web_search", "description": "Search the (fixed, offline) web.",
         "inputSchema": {"type": "object", "properties": {
            "q": {"type": "string"},
            "region": {"type": "string", "x-mcp-header": "Region"}}, "required": ["q"]}},
        {"name": "read_file", "description": "Read a file from the sample workspace.",
         "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}
    ])
}

fn call_tool(name: &str, args: &Value) -> Result<(String, bool), (i64, String)> {
    let s = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_string);
    match name {
        "echo" => Ok((
            s("text").ok_or((INVALID_PARAMS, "`text` is required".to_string()))?,
            false,
        )),
        "add" => {
            let n = |k: &str| {
                args.get(k)
                    .and_then(Value::as_i64)
                    .ok_or((INVALID_PARAMS, format!("`{k}` must be an integer")))
            };
            Ok(((n("a")? + n("b")?).to_string(), false))
        }
        "web_search" => {
            let q = s("q").ok_or((INVALID_PARAMS, "`q` is required".to_string()))?;
            let region = s("region").unwrap_or_else(|| "global".into());
            Ok((
                format!("3 results for '{q}' ({region}): agentmesh.dev/{q}, docs/{q}, wiki/{q}"),
                false,
            ))
        }
        "read_file" => {
            let path = s("path").ok_or((INVALID_PARAMS, "`path` is required".to_string()))?;
            match path.as_str() {
                "/workspace/README.md" => {
                    Ok(("# Sample workspace\nNothing secret here.\n".into(), false))
                }
                "/workspace/notes.txt" => Ok(("meeting at 10\n".into(), false)),
                _ => Ok((format!("no such file: {path}"), true)),
            }
        }
        other => Err((INVALID_PARAMS, format!("unknown tool `{other}`"))),
    }
}

fn rpc_error(id: Value, code: i64, message: impl Into<String>, data: Option<Value>) -> Value {
    let mut e = json!({"code": code, "message": message.into()});
    if let Some(d) = data {
        e["data"] = d;
    }
    json!({"jsonrpc": "2.0", "id": id, "error": e})
}

fn error_response(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn server_info() -> Value {
    json!({"name": "agentmesh-sample-tools", "version": env!("CARGO_PKG_VERSION")})
}

/// Handles one request message; `modern` selects the 2026-07-28 result shape.
fn handle(method: &str, id: Value, params: &Value, modern: bool) -> Value {
    let ok = |mut result: Value| {
        if modern {
            result["resultType"] = json!("complete");
        }
        json!({"jsonrpc": "2.0", "id": id, "result": result})
    };
    match method {
        "initialize" => {
            let asked = params
                .get("protocolVersion")
                .and_then(Value::as_str)
                .unwrap_or("");
            let version = if HANDSHAKE_VERSIONS.contains(&asked) {
                asked
            } else {
                HANDSHAKE_VERSIONS[3]
            };
            ok(
                json!({"protocolVersion": version, "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": server_info(), "instructions": "Sample tools for agentmesh tests."}),
            )
        }
        "server/discover" => ok(
            json!({"supportedVersions": MODERN_VERSIONS, "capabilities": {"tools": {"listChanged": false}},
            "serverInfo": server_info(), "cacheScope": "public", "ttlMs": 0}),
        ),
        "ping" => ok(json!({})),
        "tools/list" => ok(json!({"tools": tools(), "cacheScope": "public", "ttlMs": 0})),
        "tools/call" => {
            let name = params.get("name").and_then(Value::as_str).unwrap_or("");
            let args = params.get("arguments").cloned().unwrap_or(json!({}));
            match call_tool(name, &args) {
                Ok((text, is_error)) => {
                    ok(json!({"content": [{"type": "text", "text": text}], "isError": is_error}))
                }
                Err((code, msg)) => rpc_error(id, code, msg, None),
            }
        }
        other => rpc_error(
            id,
            METHOD_NOT_FOUND,
            format!("method `{other}` not found"),
            None,
        ),
    }
}

/// Checks the stateless envelope and its headers; `Err` is the JSON-RPC error to send.
fn check_modern(
    h: &HeaderMap,
    msg: &Value,
    version: &str,
) -> Result<(), (i64, String, Option<Value>)> {
    let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
    if header(h, "mcp-protocol-version") != Some(version) {
        return Err((
            HEADER_MISMATCH,
            "MCP-Protocol-Version header does not match the envelope".into(),
            None,
        ));
    }
    if header(h, "mcp-method") != Some(method) {
        return Err((
            HEADER_MISMATCH,
            "Mcp-Method header does not match the body".into(),
            None,
        ));
    }
    if method == "tools/call" {
        let name = msg.pointer("/params/name").and_then(Value::as_str);
        if header(h, "mcp-name") != name {
            return Err((
                HEADER_MISMATCH,
                "Mcp-Name header does not match the body".into(),
                None,
            ));
        }
    }
    if !MODERN_VERSIONS.contains(&version) {
        return Err((
            UNSUPPORTED_VERSION,
            format!("unsupported protocol version {version}"),
            Some(json!({"supported": MODERN_VERSIONS, "requested": version})),
        ));
    }
    Ok(())
}

async fn post(State(sessions): State<Arc<Sessions>>, h: HeaderMap, body: Bytes) -> Response {
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                rpc_error(Value::Null, PARSE_ERROR, format!("parse error: {e}"), None),
            )
        }
    };
    let (batch, msgs) = match v {
        Value::Array(a) => (true, a),
        single => (false, vec![single]),
    };
    let mut replies = Vec::new();
    let mut new_session = None;
    for msg in &msgs {
        let id = msg.get("id").cloned();
        let Some(method) = msg.get("method").and_then(Value::as_str) else {
            continue; // a client's response to a server request: nothing to answer
        };
        let params = msg.get("params").cloned().unwrap_or(json!({}));
        let envelope = params
            .pointer("/_meta")
            .and_then(|m| m.get(META_VERSION))
            .and_then(Value::as_str);
        let modern = method == "server/discover" || envelope.is_some();
        if modern {
            let version = envelope
                .or_else(|| header(&h, "mcp-protocol-version"))
                .unwrap_or("");
            if let Err((code, m, data)) = check_modern(&h, msg, version) {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    rpc_error(id.unwrap_or(Value::Null), code, m, data),
                );
            }
        } else if method != "initialize" {
            let refused = match header(&h, "mcp-session-id") {
                None => Some((
                    StatusCode::BAD_REQUEST,
                    "missing Mcp-Session-Id: initialize first",
                )),
                Some(s) if !sessions.lock().contains(s) => {
                    Some((StatusCode::NOT_FOUND, "unknown or terminated session"))
                }
                Some(_) => None,
            };
            if let Some((status, message)) = refused {
                let id = id.unwrap_or(Value::Null);
                return error_response(status, rpc_error(id, INVALID_REQUEST, message, None));
            }
        }
        let Some(id) = id else { continue }; // notification
        if method == "initialize" {
            let sid = uuid::Uuid::new_v4().to_string();
            sessions.lock().insert(sid.clone());
            new_session = Some(sid);
        }
        replies.push(handle(method, id, &params, modern));
    }
    if replies.is_empty() {
        return StatusCode::ACCEPTED.into_response();
    }
    let body = if batch {
        Value::Array(replies)
    } else {
        replies.remove(0)
    };
    let mut resp = Json(body).into_response();
    if let Some(sid) = new_session.and_then(|s| s.parse().ok()) {
        resp.headers_mut().insert("mcp-session-id", sid);
    }
    resp
}

/// This server pushes nothing unprompted, which the spec allows to say with 405.
async fn get_stream() -> Response {
    (StatusCode::METHOD_NOT_ALLOWED, [("allow", "POST, DELETE")]).into_response()
}

async fn delete(State(sessions): State<Arc<Sessions>>, h: HeaderMap) -> Response {
    match header(&h, "mcp-session-id") {
        Some(s) if sessions.lock().remove(s) => StatusCode::OK.into_response(),
        Some(_) => StatusCode::NOT_FOUND.into_response(),
        None => StatusCode::BAD_REQUEST.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_answer() {
        assert_eq!(call_tool("add", &json!({"a": 2, "b": 40})).unwrap().0, "42");
        assert!(
            call_tool("read_file", &json!({"path": "/etc/passwd"}))
                .unwrap()
                .1
        );
        assert_eq!(
            call_tool("add", &json!({"a": "x"})).unwrap_err().0,
            INVALID_PARAMS
        );
    }

    #[test]
    fn modern_header_checks() {
        let msg =
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}});
        let mut h = HeaderMap::new();
        h.insert("mcp-protocol-version", "2026-07-28".parse().unwrap());
        h.insert("mcp-method", "tools/call".parse().unwrap());
        h.insert("mcp-name", "echo".parse().unwrap());
        assert!(check_modern(&h, &msg, "2026-07-28").is_ok());
        h.insert("mcp-name", "add".parse().unwrap());
        assert_eq!(
            check_modern(&h, &msg, "2026-07-28").unwrap_err().0,
            HEADER_MISMATCH
        );
    }
}
