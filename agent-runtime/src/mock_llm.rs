//! A deterministic LLM provider for tests and the demo: OpenAI-compatible (`/v1/chat/completions`,
//! `/v1/responses`, `/v1/models`, a `/v1/realtime` WebSocket echo) and Anthropic-compatible
//! (`/v1/messages`), JSON and SSE, with scripted replies and tool calls and usage figures that
//! follow a fixed rule, so tests can compute expected token counts by hand:
//!
//! * input tokens  = words in every text of the request + 4 per message;
//! * output tokens = words in the reply (a tool call counts 10);
//! * cached input tokens = 0.
//!
//! Control headers let a test shape the answer: `x-mock-status` (answer with that error status),
//! `x-mock-delay-ms` (wait before answering), `x-mock-chunk-delay-ms` (wait between SSE chunks).
//! Two debug routes serve proxy tests: `GET /debug/version` (the HTTP version the request came
//! in) and `POST /debug/echo` (the number of body bytes received, and the request headers).

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One scripted behaviour: when the last user text contains `match`, answer with `reply` or
/// call `tool_call`. With `after_tool`, the rule is tried instead on a tool's result (when the
/// last message is one), so a script can chain calls.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(rename = "match")]
    pub pattern: String,
    #[serde(default)]
    pub reply: Option<String>,
    #[serde(default)]
    pub tool_call: Option<ToolCall>,
    #[serde(default)]
    pub after_tool: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    pub name: String,
    #[serde(default)]
    pub arguments: Value,
}

/// The script: rules tried in order; the first match wins.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Script {
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// The server's state: its script and how many API requests it has received.
struct MockState {
    script: Script,
    requests: AtomicU64,
}

/// `GET /debug/stats`: API requests received so far (lets tests see retries).
async fn stats(State(m): State<Arc<MockState>>) -> Json<Value> {
    Json(json!({"requests": m.requests.load(Ordering::Relaxed)}))
}

/// What the model "decided" for one request.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Text(String),
    Tool {
        id: String,
        name: String,
        arguments: Value,
    },
}

#[derive(Clone, Copy, PartialEq)]
enum Api {
    Chat,
    Responses,
    Messages,
}

/// Builds the mock provider's router.
pub fn router(script: Script) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/responses", post(responses))
        .route("/v1/messages", post(messages))
        .route("/v1/models", get(models))
        .route("/v1/realtime", any(realtime))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/debug/version",
            get(|v: axum::http::Version| async move { format!("{v:?}") }),
        )
        .route("/debug/echo", post(echo_len))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .route("/debug/stats", get(stats))
        .with_state(Arc::new(MockState {
            script,
            requests: AtomicU64::new(0),
        }))
}

/// Counts the body bytes received, for the proxy's streaming tests.
async fn echo_len(headers: HeaderMap, body: Bytes) -> Json<Value> {
    let headers: serde_json::Map<String, Value> = headers
        .iter()
        .filter_map(|(k, v)| Some((k.to_string(), Value::from(v.to_str().ok()?))))
        .collect();
    Json(json!({"bytes": body.len(), "headers": headers}))
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// Every text string in a request's messages, input and system prompt.
fn collect_texts(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| collect_texts(x, out)),
        Value::Object(o) => {
            for (k, x) in o {
                if matches!(
                    k.as_str(),
                    "content" | "text" | "input" | "output" | "system" | "instructions"
                ) {
                    collect_texts(x, out);
                }
            }
        }
        _ => {}
    }
}

fn message_list(req: &Value) -> Vec<Value> {
    match req.get("messages").or_else(|| req.get("input")) {
        Some(Value::Array(a)) => a.clone(),
        Some(Value::String(s)) => vec![json!({"role": "user", "content": s})],
        _ => Vec::new(),
    }
}

fn input_tokens(req: &Value) -> u64 {
    let msgs = message_list(req);
    let mut texts = Vec::new();
    for m in &msgs {
        collect_texts(m, &mut texts);
    }
    for k in ["system", "instructions"] {
        if let Some(s) = req.get(k) {
            collect_texts(s, &mut texts);
        }
    }
    texts.iter().map(|t| words(t)).sum::<u64>() + 4 * msgs.len() as u64
}

fn text_of(m: &Value) -> String {
    let mut t = Vec::new();
    collect_texts(m, &mut t);
    t.join(" ")
}

/// Decides the answer: scripted rule, tool result summary, tool by name, or an echo.
fn decide(script: &Script, req: &Value) -> Answer {
    let msgs = message_list(req);
    let last = msgs.last().cloned().unwrap_or(Value::Null);
    let is_tool_result = last.get("role").and_then(Value::as_str) == Some("tool")
        || last.get("type").and_then(Value::as_str) == Some("function_call_output")
        || last
            .get("content")
            .and_then(Value::as_array)
            .is_some_and(|c| {
                c.iter()
                    .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            });
    let result = is_tool_result.then(|| text_of(&last));
    let user = msgs
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(text_of)
        .unwrap_or_default();
    let tools: Vec<String> = req
        .get("tools")
        .and_then(Value::as_array)
        .map(|ts| {
            ts.iter()
                .filter_map(|t| t.pointer("/function/name").or_else(|| t.get("name")))
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let call = |name: &str, arguments: Value| Answer::Tool {
        id: format!("call_{}", words(&user) + name.len() as u64),
        name: name.to_string(),
        arguments,
    };
    for rule in &script.rules {
        let seen = match &result {
            Some(r) => rule.after_tool && r.contains(&rule.pattern),
            None => !rule.after_tool && user.contains(&rule.pattern),
        };
        if seen {
            if let Some(tc) = &rule.tool_call {
                return call(&tc.name, tc.arguments.clone());
            }
            if let Some(r) = &rule.reply {
                return Answer::Text(r.clone());
            }
        }
    }
    if let Some(r) = result {
        return Answer::Text(format!("The tool answered: {r}"));
    }
    if let Some(t) = tools.iter().find(|t| user.contains(t.as_str())) {
        return call(t, json!({}));
    }
    Answer::Text(format!("Mock reply to: {user}"))
}

fn output_tokens(a: &Answer) -> u64 {
    match a {
        Answer::Text(t) => words(t),
        Answer::Tool { .. } => 10,
    }
}

fn header_u64(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Applies `x-mock-delay-ms` and `x-mock-status`; returns an error response if asked for one.
async fn control(m: &MockState, h: &HeaderMap, api: Api) -> Option<Response> {
    m.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(ms) = header_u64(h, "x-mock-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = header_u64(h, "x-mock-status")?;
    let code = StatusCode::from_u16(status as u16).ok()?;
    Some((code, Json(error_body(api, "api_error", "mock failure"))).into_response())
}

fn error_body(api: Api, kind: &str, message: &str) -> Value {
    match api {
        Api::Messages => json!({"type": "error", "error": {"type": kind, "message": message}}),
        _ => json!({"error": {"message": message, "type": kind, "code": null}}),
    }
}

/// Parses a request body regardless of its declared content type, as real providers do.
fn parse(body: &[u8], api: Api) -> Result<Value, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = format!("invalid JSON body: {e}");
        let body = Json(error_body(api, "invalid_request_error", &msg));
        Box::new((StatusCode::BAD_REQUEST, body).into_response())
    })
}

fn sse(events: Vec<(Option<&'static str>, Value)>, done: bool, delay: Duration) -> Response {
    let stream = async_stream(events, done, delay);
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

fn async_stream(
    events: Vec<(Option<&'static str>, Value)>,
    done: bool,
    delay: Duration,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::convert::Infallible>> {
    let mut frames: Vec<String> = events
        .into_iter()
        .map(|(name, data)| match name {
            Some(n) => format!("event: {n}\ndata: {data}\n\n"),
            None => format!("data: {data}\n\n"),
        })
        .collect();
    if done {
        frames.push("data: [DONE]\n\n".into());
    }
    futures::stream::unfold(
        (frames.into_iter(), true),
        move |(mut it, first)| async move {
            let f = it.next()?;
            if !first && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Some((Ok(bytes::Bytes::from(f)), (it, false)))
        },
    )
}

fn model_of(req: &Value) -> String {
    req.get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_string()
}

fn reply_words(t: &str) -> Vec<String> {
    let ws: Vec<&str> = t.split(' ').collect();
    ws.iter()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_string()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

async fn chat(State(m): State<Arc<MockState>>, h: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body, Api::Chat) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    if let Some(r) = control(&m, &h, Api::Chat).await {
        return r;
    }
    let model = model_of(&req);
    let answer = decide(&m.script, &req);
    let (inp, out) = (input_tokens(&req), output_tokens(&answer));
    let usage = json!({"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out,
        "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}});
    let id = "chatcmpl-mock";
    let created = 1_700_000_000u64;
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        let chunk = |delta: Value, finish: Value| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        let mut ev = vec![(
            None,
            chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        )];
        let finish = match &answer {
            Answer::Text(t) => {
                ev.extend(
                    reply_words(t)
                        .into_iter()
                        .map(|w| (None, chunk(json!({"content": w}), Value::Null))),
                );
                "stop"
            }
            Answer::Tool {
                id: cid,
                name,
                arguments,
            } => {
                ev.push((
                    None,
                    chunk(
                        json!({"tool_calls": [{"index": 0, "id": cid, "type": "function",
                    "function": {"name": name, "arguments": arguments.to_string()}}]}),
                        Value::Null,
                    ),
                ));
                "tool_calls"
            }
        };
        ev.push((None, chunk(json!({}), json!(finish))));
        if req
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true)
        {
            ev.push((None, json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [], "usage": usage})));
        }
        let delay = Duration::from_millis(header_u64(&h, "x-mock-chunk-delay-ms").unwrap_or(0));
        return sse(ev, true, delay);
    }
    let (message, finish) = match &answer {
        Answer::Text(t) => (
            json!({"role": "assistant", "content": t, "refusal": null}),
            "stop",
        ),
        Answer::Tool {
            id: cid,
            name,
            arguments,
        } => (
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": cid, "type": "function",
                "function": {"name": name, "arguments": arguments.to_string()}}]}),
            "tool_calls",
        ),
    };
    Json(
        json!({"id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": null}],
        "usage": usage, "system_fingerprint": "mock"}),
    )
    .into_response()
}

async fn responses(State(m): State<Arc<MockState>>, h: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body, Api::Responses) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    if let Some(r) = control(&m, &h, Api::Responses).await {
        return r;
    }
    let model = model_of(&req);
    let answer = decide(&m.script, &req);
    let (inp, out) = (input_tokens(&req), output_tokens(&answer));
    let output = match &answer {
        Answer::Text(t) => {
            json!([{"type": "message", "id": "msg_mock", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": t, "annotations": []}]}])
        }
        Answer::Tool {
            id,
            name,
            arguments,
        } => json!([{"type": "function_call", "id": "fc_mock", "call_id": id,
            "name": name, "arguments": arguments.to_string(), "status": "completed"}]),
    };
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": "resp_mock", "object": "response",
        "created_at": 1_700_000_000u64, "status": status, "model": model, "output": output, "usage": usage,
        "parallel_tool_calls": true, "tool_choice": "auto", "tools": [], "error": null, "incomplete_details": null,
        "instructions": null, "metadata": {}, "temperature": 1.0, "top_p": 1.0})
    };
    let usage = json!({"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out,
        "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}});
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        let mut seq = 0u64;
        let mut next = || {
            seq += 1;
            seq
        };
        let mut ev = vec![(
            Some("response.created"),
            json!({"type": "response.created", "sequence_number": next(),
            "response": response("in_progress", json!([]), Value::Null)}),
        )];
        if let Answer::Text(t) = &answer {
            for w in reply_words(t) {
                ev.push((Some("response.output_text.delta"), json!({"type": "response.output_text.delta",
                    "item_id": "msg_mock", "output_index": 0, "content_index": 0, "delta": w, "sequence_number": next()})));
            }
        }
        ev.push((
            Some("response.completed"),
            json!({"type": "response.completed", "sequence_number": next(),
            "response": response("completed", output, usage)}),
        ));
        let delay = Duration::from_millis(header_u64(&h, "x-mock-chunk-delay-ms").unwrap_or(0));
        return sse(ev, false, delay);
    }
    Json(response("completed", output, usage)).into_response()
}

async fn messages(State(m): State<Arc<MockState>>, h: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body, Api::Messages) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    if let Some(r) = control(&m, &h, Api::Messages).await {
        return r;
    }
    let model = model_of(&req);
    let answer = decide(&m.script, &req);
    let (inp, out) = (input_tokens(&req), output_tokens(&answer));
    let (block, stop) = match &answer {
        Answer::Text(t) => (json!({"type": "text", "text": t}), "end_turn"),
        Answer::Tool {
            id,
            name,
            arguments,
        } => (
            json!({"type": "tool_use", "id": id, "name": name, "input": arguments}),
            "tool_use",
        ),
    };
    let message = |content: Value, stop: Value, out: u64| {
        json!({"id": "msg_mock", "type": "message", "role": "assistant",
        "model": model, "content": content, "stop_reason": stop, "stop_sequence": null,
        "usage": {"input_tokens": inp, "output_tokens": out, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}})
    };
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        let mut ev = vec![(
            Some("message_start"),
            json!({"type": "message_start", "message": message(json!([]), Value::Null, 1)}),
        )];
        match &answer {
            Answer::Text(t) => {
                ev.push((Some("content_block_start"), json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})));
                for w in reply_words(t) {
                    ev.push((Some("content_block_delta"), json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}})));
                }
            }
            Answer::Tool {
                id,
                name,
                arguments,
            } => {
                ev.push((Some("content_block_start"), json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}})));
                ev.push((Some("content_block_delta"), json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": arguments.to_string()}})));
            }
        }
        ev.push((
            Some("content_block_stop"),
            json!({"type": "content_block_stop", "index": 0}),
        ));
        ev.push((Some("message_delta"), json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": out}})));
        ev.push((Some("message_stop"), json!({"type": "message_stop"})));
        let delay = Duration::from_millis(header_u64(&h, "x-mock-chunk-delay-ms").unwrap_or(0));
        return sse(ev, false, delay);
    }
    Json(message(json!([block]), json!(stop), out)).into_response()
}

async fn models(State(m): State<Arc<MockState>>, h: HeaderMap) -> Response {
    if let Some(r) = control(&m, &h, Api::Chat).await {
        return r;
    }
    Json(json!({"object": "list", "data": [
        {"id": "gpt-4o-mini", "object": "model", "created": 1_700_000_000u64, "owned_by": "mock"},
        {"id": "claude-haiku-4-5", "object": "model", "created": 1_700_000_000u64, "owned_by": "mock"}]}))
    .into_response()
}

/// Realtime-style WebSocket: echoes each text frame back prefixed with `echo: `.
async fn realtime(ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(|mut socket: WebSocket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            let reply = match msg {
                Message::Text(t) => Message::Text(format!("echo: {}", t.as_str()).into()),
                Message::Close(_) => break,
                other => other,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_rule_is_hand_computable() {
        let req = json!({"model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello there world"}]}]});
        assert_eq!(input_tokens(&req), 2 + 3 + 8);
        assert_eq!(
            decide(&Script::default(), &req),
            Answer::Text("Mock reply to: hello there world".into())
        );
    }

    #[test]
    fn scripted_tool_call_and_tool_result() {
        let script: Script = serde_yaml::from_str(
            "rules: [{match: weather, tool_call: {name: get_weather, arguments: {city: Paris}}}]",
        )
        .unwrap();
        let req = json!({"messages": [{"role": "user", "content": "what is the weather?"}]});
        match decide(&script, &req) {
            Answer::Tool {
                name, arguments, ..
            } => {
                assert_eq!(name, "get_weather");
                assert_eq!(arguments, json!({"city": "Paris"}));
            }
            other => panic!("{other:?}"),
        }
        let req = json!({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c", "content": "sunny"}]});
        assert_eq!(
            decide(&script, &req),
            Answer::Text("The tool answered: sunny".into())
        );
    }
}
