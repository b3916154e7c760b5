//! Answers the sidecar gives itself: every refusal and upstream failure has a precise status and
//! a JSON body saying what happened and to which upstream. MCP and A2A callers get a JSON-RPC
//! error object (their SDKs surface it), everyone else `{"error": {...}}`.

use crate::config::CallKind;
use serde_json::json;

/// JSON-RPC code for "the upstream could not answer" (implementation-defined server error range).
pub const JSONRPC_UPSTREAM_ERROR: i64 = -32001;

/// One refusal or failure, ready to render.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub status: u16,
    /// Stable machine-readable cause: `not_granted`, `malformed_json`, `upstream_timeout`, ...
    pub cause: &'static str,
    pub message: String,
    pub upstream: Option<String>,
    pub jsonrpc_code: i64,
    pub retry_after_secs: Option<u64>,
}

impl Rejection {
    pub fn new(status: u16, cause: &'static str, message: impl Into<String>) -> Self {
        Rejection {
            status,
            cause,
            message: message.into(),
            upstream: None,
            jsonrpc_code: JSONRPC_UPSTREAM_ERROR,
            retry_after_secs: None,
        }
    }

    pub fn upstream(mut self, name: &str) -> Self {
        self.upstream = Some(name.to_string());
        self
    }

    pub fn jsonrpc(mut self, code: i64) -> Self {
        self.jsonrpc_code = code;
        self
    }

    /// The JSON body for a caller of the given kind.
    pub fn body(&self, kind: Option<CallKind>) -> Vec<u8> {
        let detail = json!({
            "type": self.cause,
            "message": self.message,
            "upstream": self.upstream,
            "status": self.status,
        });
        let v = match kind {
            Some(CallKind::Mcp | CallKind::A2a) => json!({
                "jsonrpc": "2.0",
                "id": null,
                "error": {"code": self.jsonrpc_code, "message": self.message, "data": detail},
            }),
            _ => json!({ "error": detail }),
        };
        serde_json::to_vec(&v).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_per_kind() {
        let r = Rejection::new(504, "upstream_timeout", "no answer in 2s").upstream("llm/openai");
        let v: serde_json::Value = serde_json::from_slice(&r.body(Some(CallKind::Llm))).unwrap();
        assert_eq!(v["error"]["upstream"], "llm/openai");
        assert_eq!(v["error"]["type"], "upstream_timeout");
        let r = r.jsonrpc(-32700);
        let v: serde_json::Value = serde_json::from_slice(&r.body(Some(CallKind::Mcp))).unwrap();
        assert_eq!(v["jsonrpc"], "2.0");
        assert_eq!(v["error"]["code"], -32700);
        assert_eq!(v["error"]["data"]["upstream"], "llm/openai");
    }
}
