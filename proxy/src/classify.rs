//! Phase 2, classify: turn a request (method, path, headers, bounded body) into the typed call
//! record. A pure function of its inputs, tested by table without any network. It understands
//! the protocol revisions the official SDKs speak today (design §3): OpenAI Chat Completions and
//! Responses, Anthropic Messages; MCP Streamable HTTP both session-based (2025-11-25) and
//! stateless (2026-07-28, whose `Mcp-*` headers must agree with the body); A2A 1.0 and 0.3.

use crate::config::{CallKind, LlmApi};
use crate::record::{A2aCall, CallRecord, LlmCall, LlmOperation, McpCall, McpMessage, Usage};
use base64::Engine;
use http::HeaderMap;
use serde_json::Value;

/// JSON-RPC error codes used in our rejections.
pub const JSONRPC_PARSE_ERROR: i64 = -32700;
pub const JSONRPC_INVALID_REQUEST: i64 = -32600;
/// MCP 2026-07-28: an `Mcp-*` header disagrees with the body.
pub const MCP_HEADER_MISMATCH: i64 = -32020;

/// Envelope key carrying the protocol version in stateless MCP requests.
const MCP_META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";

/// Why a request cannot be classified; each maps to a 4xx answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClassifyError {
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("MCP header mismatch: {0}")]
    HeaderMismatch(String),
    #[error("request body exceeds the inspection limit of {limit} bytes")]
    TooLarge { limit: usize },
}

impl ClassifyError {
    pub fn http_status(&self) -> u16 {
        match self {
            ClassifyError::TooLarge { .. } => 413,
            _ => 400,
        }
    }

    /// Stable machine-readable cause, as the `type` of the error answer.
    pub fn cause(&self) -> &'static str {
        match self {
            ClassifyError::MalformedJson(_) => "malformed_json",
            ClassifyError::InvalidRequest(_) => "invalid_request",
            ClassifyError::HeaderMismatch(_) => "header_mismatch",
            ClassifyError::TooLarge { .. } => "body_too_large",
        }
    }

    pub fn jsonrpc_code(&self) -> i64 {
        match self {
            ClassifyError::MalformedJson(_) => JSONRPC_PARSE_ERROR,
            ClassifyError::HeaderMismatch(_) => MCP_HEADER_MISMATCH,
            ClassifyError::InvalidRequest(_) | ClassifyError::TooLarge { .. } => {
                JSONRPC_INVALID_REQUEST
            }
        }
    }
}

/// What the classifier knows of the destination.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    pub kind: CallKind,
    /// Provider name for `llm/*`.
    pub name: &'a str,
    pub llm_api: Option<LlmApi>,
}

/// Fills the kind-specific part of `record` from the request. `body` is the whole request body
/// (already bounded by the caller); empty for bodiless requests.
pub fn classify(
    record: &mut CallRecord,
    dest: Destination<'_>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), ClassifyError> {
    match dest.kind {
        CallKind::Llm => {
            record.llm = Some(classify_llm(&record.method, &record.path, dest, body)?);
        }
        CallKind::Mcp => record.mcp = Some(classify_mcp(&record.method, headers, body)?),
        CallKind::A2a => record.a2a = classify_a2a(&record.method, headers, body)?,
        CallKind::Http => {}
    }
    Ok(())
}

fn parse_json(body: &[u8]) -> Result<Value, ClassifyError> {
    serde_json::from_slice(body).map_err(|e| ClassifyError::MalformedJson(e.to_string()))
}

fn llm_operation(path: &str) -> LlmOperation {
    let path = path.split('?').next().unwrap_or(path).trim_end_matches('/');
    if path.ends_with("/chat/completions") {
        LlmOperation::ChatCompletions
    } else if path.ends_with("/responses") || path.contains("/responses/") {
        LlmOperation::Responses
    } else if path.ends_with("/messages") || path.ends_with("/messages/count_tokens") {
        LlmOperation::Messages
    } else if path.ends_with("/embeddings") {
        LlmOperation::Embeddings
    } else if path.ends_with("/models") || path.contains("/models/") {
        LlmOperation::Models
    } else {
        LlmOperation::Other
    }
}

fn classify_llm(
    method: &str,
    path: &str,
    dest: Destination<'_>,
    body: &[u8],
) -> Result<LlmCall, ClassifyError> {
    let mut call = LlmCall {
        provider: dest.name.to_string(),
        api: dest.llm_api.unwrap_or(LlmApi::Openai),
        operation: llm_operation(path),
        model: None,
        stream: false,
        max_tokens: None,
        response_model: None,
        usage: Usage::default(),
        cost_usd: None,
    };
    if method != "POST" || body.is_empty() {
        return Ok(call);
    }
    // A derived struct would also accept a JSON array (as a tuple): only objects are requests.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        serde_json::from_slice::<serde::de::IgnoredAny>(body)
            .map_err(|e| ClassifyError::MalformedJson(e.to_string()))?;
        return Err(ClassifyError::InvalidRequest(
            "an LLM request body must be a JSON object".into(),
        ));
    }
    // Only a few top-level fields matter; serde skips the rest (the messages, which make up
    // nearly all of a long conversation) without building a tree of them.
    let head: LlmRequestHead = serde_json::from_slice(body).map_err(|e| {
        if e.classify() == serde_json::error::Category::Data {
            ClassifyError::InvalidRequest(format!("an LLM request body must be a JSON object: {e}"))
        } else {
            ClassifyError::MalformedJson(e.to_string())
        }
    })?;
    call.model = head
        .model
        .as_ref()
        .and_then(Value::as_str)
        .map(str::to_string);
    call.stream = head
        .stream
        .as_ref()
        .and_then(Value::as_bool)
        .unwrap_or(false);
    call.max_tokens = [
        head.max_tokens,
        head.max_completion_tokens,
        head.max_output_tokens,
    ]
    .iter()
    .find_map(|v| v.as_ref().and_then(Value::as_u64));
    Ok(call)
}

/// The top-level fields of an LLM request the sidecar reads. Kept as JSON values so that an
/// odd type (a numeric `model`) reads as absent rather than failing the call.
#[derive(serde::Deserialize)]
struct LlmRequestHead {
    #[serde(default)]
    model: Option<Value>,
    #[serde(default)]
    stream: Option<Value>,
    #[serde(default)]
    max_tokens: Option<Value>,
    #[serde(default)]
    max_completion_tokens: Option<Value>,
    #[serde(default)]
    max_output_tokens: Option<Value>,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn classify_mcp(method: &str, headers: &HeaderMap, body: &[u8]) -> Result<McpCall, ClassifyError> {
    let mut call = McpCall {
        protocol_version: header(headers, "mcp-protocol-version").map(str::to_string),
        session_id: header(headers, "mcp-session-id").map(str::to_string),
        messages: Vec::new(),
    };
    if method != "POST" {
        return Ok(call); // GET opens the server's SSE stream, DELETE ends the session.
    }
    let v = parse_json(body)?;
    let items: Vec<&Value> = match &v {
        Value::Array(a) if a.is_empty() => {
            return Err(ClassifyError::InvalidRequest("empty JSON-RPC batch".into()))
        }
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    for item in items {
        call.messages.push(mcp_message(item)?);
    }
    check_mcp_headers(headers, &v, &call)?;
    if call.protocol_version.is_none() {
        call.protocol_version = v
            .pointer("/params/_meta")
            .and_then(|m| m.get(MCP_META_PROTOCOL_VERSION))
            .and_then(Value::as_str)
            .map(str::to_string);
    }
    Ok(call)
}

fn jsonrpc_object(item: &Value) -> Result<&serde_json::Map<String, Value>, ClassifyError> {
    let obj = item.as_object().ok_or_else(|| {
        ClassifyError::InvalidRequest("a JSON-RPC message must be an object".into())
    })?;
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(ClassifyError::InvalidRequest(
            "`jsonrpc` must be \"2.0\"".into(),
        ));
    }
    Ok(obj)
}

fn mcp_message(item: &Value) -> Result<McpMessage, ClassifyError> {
    let obj = jsonrpc_object(item)?;
    let id = obj.get("id").cloned();
    let Some(method) = obj.get("method") else {
        // A client's answer to a server request (sampling, elicitation, roots).
        if obj.contains_key("result") || obj.contains_key("error") {
            return Ok(McpMessage {
                method: "response".into(),
                id,
                tool: None,
                arguments: None,
            });
        }
        return Err(ClassifyError::InvalidRequest(
            "a JSON-RPC message needs `method`, `result` or `error`".into(),
        ));
    };
    let method = method
        .as_str()
        .ok_or_else(|| ClassifyError::InvalidRequest("`method` must be a string".into()))?
        .to_string();
    let params = obj.get("params");
    let tool = mcp_name_param(&method)
        .and_then(|k| params.and_then(|p| p.get(k)).and_then(Value::as_str))
        .map(str::to_string);
    let arguments = match method.as_str() {
        "tools/call" | "prompts/get" => params.and_then(|p| p.get("arguments")).cloned(),
        _ => None,
    };
    Ok(McpMessage {
        method,
        id,
        tool,
        arguments,
    })
}

/// The params key mirrored in the `Mcp-Name` header, per method.
fn mcp_name_param(method: &str) -> Option<&'static str> {
    match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    }
}

/// Decodes the `=?base64?...?=` sentinel MCP uses for header values that are not plain ASCII.
fn decode_mcp_header(value: &str) -> Option<String> {
    match value
        .strip_prefix("=?base64?")
        .and_then(|v| v.strip_suffix("?="))
    {
        Some(payload) => base64::engine::general_purpose::STANDARD
            .decode(payload)
            .ok()
            .and_then(|b| String::from_utf8(b).ok()),
        None => Some(value.to_string()),
    }
}

/// Stateless MCP (2026-07-28) repeats parts of the body in headers so intermediaries can route
/// without parsing; a request whose headers and body disagree is an attempt to be judged on one
/// and served on the other, so it is rejected.
fn check_mcp_headers(
    headers: &HeaderMap,
    body: &Value,
    call: &McpCall,
) -> Result<(), ClassifyError> {
    let single = match call.messages.as_slice() {
        [m] => Some(m),
        _ => None,
    };
    if let Some(h) = header(headers, "mcp-method") {
        match single {
            Some(m) if m.method == h => {}
            _ => {
                return Err(ClassifyError::HeaderMismatch(
                    "Mcp-Method header does not match the body's method".into(),
                ))
            }
        }
    }
    if let (Some(h), Some(m)) = (header(headers, "mcp-name"), single) {
        if mcp_name_param(&m.method).is_some()
            && decode_mcp_header(h).as_deref() != m.tool.as_deref()
        {
            return Err(ClassifyError::HeaderMismatch(format!(
                "Mcp-Name header does not match the body's {}",
                mcp_name_param(&m.method).unwrap_or("name")
            )));
        }
    }
    if let Some(h) = header(headers, "mcp-protocol-version") {
        let envelope = body
            .pointer("/params/_meta")
            .and_then(|m| m.get(MCP_META_PROTOCOL_VERSION))
            .and_then(Value::as_str);
        if envelope.is_some_and(|v| v != h) {
            return Err(ClassifyError::HeaderMismatch(
                "Mcp-Protocol-Version header does not match the request envelope".into(),
            ));
        }
    }
    for (name, value) in headers {
        let Some(token) = name.as_str().strip_prefix("mcp-param-") else {
            continue;
        };
        let decoded = value.to_str().ok().and_then(decode_mcp_header);
        let args = single.and_then(|m| m.arguments.as_ref());
        let found = match (decoded, args) {
            (Some(d), Some(a)) => scalar_values(a).any(|s| s == d),
            _ => false,
        };
        if !found {
            return Err(ClassifyError::HeaderMismatch(format!(
                "Mcp-Param-{token} header has no matching argument in the body"
            )));
        }
    }
    Ok(())
}

/// Every scalar in a JSON value, rendered the way MCP clients render header values.
fn scalar_values(v: &Value) -> Box<dyn Iterator<Item = String> + '_> {
    match v {
        Value::String(s) => Box::new(std::iter::once(s.clone())),
        Value::Bool(b) => Box::new(std::iter::once(b.to_string())),
        Value::Number(n) => Box::new(std::iter::once(n.to_string())),
        Value::Array(a) => Box::new(a.iter().flat_map(scalar_values)),
        Value::Object(o) => Box::new(o.values().flat_map(scalar_values)),
        Value::Null => Box::new(std::iter::empty()),
    }
}

fn classify_a2a(
    method: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Option<A2aCall>, ClassifyError> {
    if method != "POST" {
        return Ok(None); // agent card fetches and other plain reads
    }
    let v = parse_json(body)?;
    let obj = jsonrpc_object(&v)?;
    let rpc_method = obj.get("method").and_then(Value::as_str).ok_or_else(|| {
        ClassifyError::InvalidRequest("an A2A request needs a string `method`".into())
    })?;
    let params = obj.get("params");
    let pick = |ptrs: &[&str]| {
        ptrs.iter()
            .find_map(|p| params.and_then(|x| x.pointer(p)).and_then(Value::as_str))
            .map(str::to_string)
    };
    // 0.3 methods are slash-separated (`message/send`); 1.0 methods are PascalCase (`SendMessage`).
    let version = header(headers, "a2a-version")
        .map(str::to_string)
        .unwrap_or_else(|| {
            if rpc_method.contains('/') {
                "0.3"
            } else {
                "1.0"
            }
            .to_string()
        });
    Ok(Some(A2aCall {
        version,
        method: rpc_method.to_string(),
        skill: pick(&["/metadata/skill", "/message/metadata/skill"]),
        task_id: pick(&["/id", "/taskId", "/message/taskId", "/message/task_id"]),
        context_id: pick(&["/message/contextId", "/message/context_id", "/contextId"]),
        streaming: matches!(
            rpc_method,
            "message/stream" | "tasks/resubscribe" | "SendStreamingMessage" | "SubscribeToTask"
        ),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Direction;
    use serde_json::json;

    fn run(
        kind: CallKind,
        method: &str,
        path: &str,
        hdrs: &[(&str, &str)],
        body: &str,
    ) -> Result<CallRecord, ClassifyError> {
        let mut headers = HeaderMap::new();
        for (k, v) in hdrs {
            headers.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let (name, api) = match kind {
            CallKind::Llm if path.contains("messages") => ("anthropic", Some(LlmApi::Anthropic)),
            CallKind::Llm => ("openai", Some(LlmApi::Openai)),
            _ => ("x", None),
        };
        let mut r = CallRecord::new(Direction::Outbound, kind, "t", method, path);
        classify(
            &mut r,
            Destination {
                kind,
                name,
                llm_api: api,
            },
            &headers,
            body.as_bytes(),
        )?;
        Ok(r)
    }

    #[test]
    fn openai_chat_completions() {
        let r = run(
            CallKind::Llm,
            "POST",
            "/v1/chat/completions",
            &[],
            r#"{"model":"gpt-4o-mini","stream":true,"max_completion_tokens":50,"messages":[]}"#,
        )
        .unwrap();
        let l = r.llm.unwrap();
        assert_eq!(l.operation, LlmOperation::ChatCompletions);
        assert_eq!(l.model.as_deref(), Some("gpt-4o-mini"));
        assert!(l.stream);
        assert_eq!(l.max_tokens, Some(50));
        assert_eq!(l.provider, "openai");
    }

    #[test]
    fn openai_responses() {
        let r = run(
            CallKind::Llm,
            "POST",
            "/v1/responses",
            &[],
            r#"{"model":"gpt-5","input":"hi","max_output_tokens":9}"#,
        )
        .unwrap();
        let l = r.llm.unwrap();
        assert_eq!(
            (l.operation, l.model.as_deref(), l.stream, l.max_tokens),
            (LlmOperation::Responses, Some("gpt-5"), false, Some(9))
        );
    }

    #[test]
    fn anthropic_messages() {
        let r = run(
            CallKind::Llm,
            "POST",
            "/v1/messages",
            &[],
            r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":true,"messages":[]}"#,
        )
        .unwrap();
        let l = r.llm.unwrap();
        assert_eq!(
            (
                l.api,
                l.operation,
                l.model.as_deref(),
                l.stream,
                l.max_tokens
            ),
            (
                LlmApi::Anthropic,
                LlmOperation::Messages,
                Some("claude-sonnet-4-5"),
                true,
                Some(1024)
            )
        );
    }

    #[test]
    fn llm_long_conversation_and_odd_types() {
        let msgs: Vec<_> = (0..2000)
            .map(|i| json!({"role": "user", "content": format!("message {i}")}))
            .collect();
        let body = json!({"messages": msgs, "model": "gpt-4o", "stream": false, "max_tokens": 7})
            .to_string();
        let l = run(CallKind::Llm, "POST", "/v1/chat/completions", &[], &body)
            .unwrap()
            .llm
            .unwrap();
        assert_eq!(
            (l.model.as_deref(), l.max_tokens),
            (Some("gpt-4o"), Some(7))
        );
        let l = run(
            CallKind::Llm,
            "POST",
            "/v1/chat/completions",
            &[],
            r#"{"model": 5, "stream": "yes"}"#,
        )
        .unwrap()
        .llm
        .unwrap();
        assert_eq!((l.model, l.stream), (None, false));
        // Syntax errors inside skipped fields are still caught.
        let e = run(
            CallKind::Llm,
            "POST",
            "/v1/chat/completions",
            &[],
            r#"{"model":"m","messages":[{"x":}]}"#,
        )
        .unwrap_err();
        assert!(matches!(e, ClassifyError::MalformedJson(_)), "{e}");
    }

    #[test]
    fn llm_bad_bodies() {
        assert!(matches!(
            run(CallKind::Llm, "POST", "/v1/chat/completions", &[], "{nope").unwrap_err(),
            ClassifyError::MalformedJson(_)
        ));
        assert!(matches!(
            run(CallKind::Llm, "POST", "/v1/chat/completions", &[], "[1]").unwrap_err(),
            ClassifyError::InvalidRequest(_)
        ));
        // A GET has no body to read.
        assert!(run(CallKind::Llm, "GET", "/v1/models", &[], "")
            .unwrap()
            .llm
            .unwrap()
            .model
            .is_none());
    }

    #[test]
    fn mcp_session_based_tool_call() {
        let r = run(CallKind::Mcp, "POST", "/mcp", &[("mcp-session-id", "s-1"), ("mcp-protocol-version", "2025-11-25")],
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"web_search","arguments":{"q":"rust"}}}"#).unwrap();
        let m = r.mcp.unwrap();
        assert_eq!(m.session_id.as_deref(), Some("s-1"));
        assert_eq!(m.protocol_version.as_deref(), Some("2025-11-25"));
        assert_eq!(m.messages[0].method, "tools/call");
        assert_eq!(m.messages[0].tool.as_deref(), Some("web_search"));
        assert_eq!(m.messages[0].arguments, Some(json!({"q":"rust"})));
        assert_eq!(m.messages[0].id, Some(json!(3)));
    }

    #[test]
    fn mcp_batch_and_notification_and_response() {
        let r = run(CallKind::Mcp, "POST", "/mcp", &[],
            r#"[{"jsonrpc":"2.0","method":"notifications/initialized"},{"jsonrpc":"2.0","id":"a","method":"tools/list"},{"jsonrpc":"2.0","id":7,"result":{}}]"#).unwrap();
        let methods: Vec<_> = r
            .mcp
            .unwrap()
            .messages
            .into_iter()
            .map(|m| (m.method, m.id))
            .collect();
        assert_eq!(
            methods,
            vec![
                ("notifications/initialized".into(), None),
                ("tools/list".into(), Some(json!("a"))),
                ("response".into(), Some(json!(7)))
            ]
        );
    }

    #[test]
    fn mcp_get_and_delete_have_no_body() {
        let r = run(
            CallKind::Mcp,
            "DELETE",
            "/mcp",
            &[("mcp-session-id", "s-9")],
            "",
        )
        .unwrap();
        let m = r.mcp.unwrap();
        assert!(m.messages.is_empty());
        assert_eq!(m.session_id.as_deref(), Some("s-9"));
    }

    const STATELESS_CALL: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":2,"region":"eu"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;

    #[test]
    fn mcp_stateless_headers_agree() {
        let r = run(
            CallKind::Mcp,
            "POST",
            "/mcp",
            &[
                ("mcp-protocol-version", "2026-07-28"),
                ("mcp-method", "tools/call"),
                ("mcp-name", "add"),
                ("mcp-param-region", "eu"),
            ],
            STATELESS_CALL,
        )
        .unwrap();
        let m = r.mcp.unwrap();
        assert_eq!(m.protocol_version.as_deref(), Some("2026-07-28"));
        assert_eq!(m.messages[0].tool.as_deref(), Some("add"));
        // base64 sentinel decodes to the same value
        run(
            CallKind::Mcp,
            "POST",
            "/mcp",
            &[
                ("mcp-method", "tools/call"),
                ("mcp-name", "=?base64?YWRk?="),
            ],
            STATELESS_CALL,
        )
        .unwrap();
    }

    #[test]
    fn mcp_stateless_header_mismatches_are_rejected() {
        let cases: &[&[(&str, &str)]] = &[
            &[("mcp-method", "tools/list")],
            &[("mcp-method", "tools/call"), ("mcp-name", "rm_rf")],
            &[("mcp-protocol-version", "2025-11-25")],
            &[("mcp-param-region", "us")],
        ];
        for hdrs in cases {
            let e = run(CallKind::Mcp, "POST", "/mcp", hdrs, STATELESS_CALL).unwrap_err();
            assert!(
                matches!(e, ClassifyError::HeaderMismatch(_)),
                "{hdrs:?}: {e}"
            );
            assert_eq!(e.jsonrpc_code(), MCP_HEADER_MISMATCH);
        }
    }

    #[test]
    fn mcp_discover_is_classified() {
        let r = run(
            CallKind::Mcp,
            "POST",
            "/mcp",
            &[("mcp-method", "server/discover")],
            r#"{"jsonrpc":"2.0","id":0,"method":"server/discover","params":{}}"#,
        )
        .unwrap();
        assert_eq!(r.mcp.unwrap().messages[0].method, "server/discover");
    }

    #[test]
    fn mcp_malformed() {
        let e = run(CallKind::Mcp, "POST", "/mcp", &[], r#"{"jsonrpc":"2.0","#).unwrap_err();
        assert_eq!(
            (e.http_status(), e.jsonrpc_code()),
            (400, JSONRPC_PARSE_ERROR)
        );
        let e = run(
            CallKind::Mcp,
            "POST",
            "/mcp",
            &[],
            r#"{"id":1,"method":"x"}"#,
        )
        .unwrap_err();
        assert_eq!(e.jsonrpc_code(), JSONRPC_INVALID_REQUEST);
        assert!(run(CallKind::Mcp, "POST", "/mcp", &[], "[]").is_err());
    }

    #[test]
    fn a2a_v03_message_send_and_stream() {
        let body = r#"{"jsonrpc":"2.0","id":"1","method":"message/send","params":{"message":{"role":"user","messageId":"m1","contextId":"c1","parts":[{"kind":"text","text":"hi"}],"metadata":{"skill":"summarize"}}}}"#;
        let a = run(CallKind::A2a, "POST", "/", &[], body)
            .unwrap()
            .a2a
            .unwrap();
        assert_eq!(
            (
                a.version.as_str(),
                a.method.as_str(),
                a.skill.as_deref(),
                a.context_id.as_deref(),
                a.streaming
            ),
            ("0.3", "message/send", Some("summarize"), Some("c1"), false)
        );
        let a = run(
            CallKind::A2a,
            "POST",
            "/",
            &[],
            &body.replace("message/send", "message/stream"),
        )
        .unwrap()
        .a2a
        .unwrap();
        assert!(a.streaming);
        let a = run(
            CallKind::A2a,
            "POST",
            "/",
            &[],
            r#"{"jsonrpc":"2.0","id":2,"method":"tasks/get","params":{"id":"t-42"}}"#,
        )
        .unwrap()
        .a2a
        .unwrap();
        assert_eq!(a.task_id.as_deref(), Some("t-42"));
    }

    #[test]
    fn a2a_v10_methods() {
        let a = run(CallKind::A2a, "POST", "/", &[("a2a-version", "1.0")],
            r#"{"jsonrpc":"2.0","id":1,"method":"SendStreamingMessage","params":{"message":{"messageId":"m","role":"ROLE_USER","parts":[{"text":"x"}]},"metadata":{"skill":"write"}}}"#).unwrap().a2a.unwrap();
        assert_eq!(
            (
                a.version.as_str(),
                a.method.as_str(),
                a.skill.as_deref(),
                a.streaming
            ),
            ("1.0", "SendStreamingMessage", Some("write"), true)
        );
        let a = run(
            CallKind::A2a,
            "POST",
            "/",
            &[],
            r#"{"jsonrpc":"2.0","id":1,"method":"GetTask","params":{"id":"t1"}}"#,
        )
        .unwrap()
        .a2a
        .unwrap();
        assert_eq!(
            (a.version.as_str(), a.task_id.as_deref()),
            ("1.0", Some("t1"))
        );
    }

    #[test]
    fn a2a_card_fetch_and_malformed() {
        assert!(run(
            CallKind::A2a,
            "GET",
            "/.well-known/agent-card.json",
            &[],
            ""
        )
        .unwrap()
        .a2a
        .is_none());
        let e = run(CallKind::A2a, "POST", "/", &[], "not json").unwrap_err();
        assert_eq!(e.jsonrpc_code(), JSONRPC_PARSE_ERROR);
    }

    #[test]
    fn plain_http_is_not_read() {
        let r = run(CallKind::Http, "POST", "/x", &[], "{not json").unwrap();
        assert!(r.llm.is_none() && r.mcp.is_none() && r.a2a.is_none());
    }
}
