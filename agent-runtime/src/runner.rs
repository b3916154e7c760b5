//! The model-planned loop of a thin agent: the conversation goes to the model (OpenAI-compatible
//! chat through the sidecar, `llm/<provider>`) with the agent's MCP tools; each tool call the
//! model asks for is made through the sidecar (`mcp/<server>`), and its result goes back to the
//! model, until it answers. The task's state is committed before every step and every call's
//! result recorded under its idempotency key, so a task interrupted anywhere resumes where it
//! stopped and never repeats a completed call.

use crate::manifest::Manifest;
use crate::store::{call_key, Status, Store, Task};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// Steps a task may take before it is failed (a model that never stops calling tools).
pub const MAX_STEPS: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{what}: {message}")]
    Call { what: String, message: String },
}

fn call_error(what: impl Into<String>, message: impl std::fmt::Display) -> RunError {
    RunError::Call {
        what: what.into(),
        message: message.to_string(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An MCP server reached through the sidecar: its session and its tools.
struct McpServer {
    session: Option<String>,
    tools: Vec<Value>,
}

pub struct Runner {
    pub manifest: Manifest,
    pub store: Store,
    http: reqwest::Client,
    servers: tokio::sync::Mutex<HashMap<String, McpServer>>,
}

/// Reads a JSON-RPC answer that came as JSON or as an SSE stream of JSON events.
fn jsonrpc_result(body: &str, content_type: &str) -> Result<Value, String> {
    let doc: Value = if content_type.starts_with("text/event-stream") {
        body.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
            .find(|v| v.get("result").is_some() || v.get("error").is_some())
            .ok_or("no JSON-RPC answer in the event stream")?
    } else {
        serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?
    };
    if let Some(e) = doc.get("error") {
        return Err(format!("JSON-RPC error: {e}"));
    }
    doc.get("result").cloned().ok_or_else(|| "no result".into())
}

impl Runner {
    pub fn new(manifest: Manifest, store: Store) -> Runner {
        Runner {
            manifest,
            store,
            http: reqwest::Client::new(),
            servers: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.manifest.sidecar.trim_end_matches('/'))
    }

    async fn rpc(
        &self,
        server: &str,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<(Value, Option<String>), RunError> {
        let what = format!("mcp/{server} {method}");
        let mut req = self
            .http
            .post(self.url(&format!("/mcp/{server}")))
            .header("accept", "application/json, text/event-stream")
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}));
        if let Some(s) = session {
            req = req.header("mcp-session-id", s);
        }
        let r = req.send().await.map_err(|e| call_error(&what, e))?;
        let status = r.status();
        let session = r
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let ctype = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = r.text().await.map_err(|e| call_error(&what, e))?;
        if !status.is_success() {
            return Err(call_error(&what, format!("{status}: {body}")));
        }
        let result = jsonrpc_result(&body, &ctype).map_err(|m| call_error(&what, m))?;
        Ok((result, session))
    }

    /// Opens the MCP session of each tool server (once) and lists its tools.
    async fn tools(&self) -> Result<Vec<Value>, RunError> {
        let mut servers = self.servers.lock().await;
        for name in &self.manifest.tools {
            if servers.contains_key(name) {
                continue;
            }
            let init = json!({"protocolVersion": "2025-11-25", "capabilities": {},
                "clientInfo": {"name": self.manifest.name, "version": env!("CARGO_PKG_VERSION")}});
            let (_, session) = self.rpc(name, None, "initialize", init).await?;
            let (listed, _) = self
                .rpc(name, session.as_deref(), "tools/list", json!({}))
                .await?;
            let tools = listed["tools"].as_array().cloned().unwrap_or_default();
            servers.insert(name.clone(), McpServer { session, tools });
        }
        Ok(self
            .manifest
            .tools
            .iter()
            .flat_map(|s| servers[s].tools.iter().map(move |t| (s, t)))
            .map(|(server, t)| {
                json!({"type": "function", "function": {
                    "name": format!("{server}__{}", t["name"].as_str().unwrap_or("")),
                    "description": t["description"], "parameters": t["inputSchema"]}})
            })
            .collect())
    }

    /// Calls a tool (`<server>__<tool>`) through the sidecar.
    async fn call_tool(&self, function: &str, arguments: &Value) -> Result<Value, RunError> {
        let (server, tool) = function
            .split_once("__")
            .ok_or_else(|| call_error(function, "not a tool of this agent"))?;
        let session = self
            .servers
            .lock()
            .await
            .get(server)
            .and_then(|s| s.session.clone());
        let (result, _) = self
            .rpc(
                server,
                session.as_deref(),
                "tools/call",
                json!({"name": tool, "arguments": arguments}),
            )
            .await?;
        Ok(result)
    }

    /// Starts a task with the user's input and runs it to its end.
    pub async fn start(&self, id: &str, input: &str) -> Result<Task, RunError> {
        let mut messages = Vec::new();
        if !self.manifest.system_prompt.is_empty() {
            messages.push(json!({"role": "system", "content": self.manifest.system_prompt}));
        }
        messages.push(json!({"role": "user", "content": input}));
        let task = Task {
            id: id.into(),
            status: Status::Working,
            step: 0,
            messages,
            question: None,
            updated_at_ms: now_ms(),
        };
        self.store.checkpoint(&task)?;
        self.run(task).await
    }

    /// Runs (or resumes) a task from its committed step until it completes or fails.
    pub async fn run(&self, mut task: Task) -> Result<Task, RunError> {
        let tools = self.tools().await?;
        while task.status == Status::Working {
            if task.step >= MAX_STEPS {
                task.status = Status::Failed;
                task.question = Some(format!("no answer after {MAX_STEPS} steps"));
                break;
            }
            let m = &self.manifest.model;
            let mut body = json!({"model": m.name, "messages": task.messages});
            if !tools.is_empty() {
                body["tools"] = json!(tools);
            }
            if let Some(n) = m.max_tokens {
                body["max_tokens"] = json!(n);
            }
            let what = format!("llm/{}", m.provider);
            let r = self
                .http
                .post(self.url(&format!("/llm/{}/v1/chat/completions", m.provider)))
                .json(&body)
                .send()
                .await
                .map_err(|e| call_error(&what, e))?;
            let status = r.status();
            let v: Value = r.json().await.map_err(|e| call_error(&what, e))?;
            if !status.is_success() {
                return Err(call_error(&what, format!("{status}: {v}")));
            }
            let message = v["choices"][0]["message"].clone();
            task.messages.push(message.clone());
            let calls = message["tool_calls"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if calls.is_empty() {
                task.status = Status::Completed;
            } else {
                for c in calls {
                    let function = c["function"]["name"].as_str().unwrap_or("").to_string();
                    let arguments: Value =
                        serde_json::from_str(c["function"]["arguments"].as_str().unwrap_or("{}"))
                            .unwrap_or(json!({}));
                    let key = call_key(task.step, &function, &arguments);
                    let result = match self.store.call_result(&task.id, &key)? {
                        Some(done) => done,
                        None => {
                            let r = self.call_tool(&function, &arguments).await?;
                            self.store.record_call(&task.id, &key, &r)?;
                            r
                        }
                    };
                    task.messages
                        .push(json!({"role": "tool", "tool_call_id": c["id"],
                        "content": result.to_string()}));
                }
            }
            task.step += 1;
            task.updated_at_ms = now_ms();
            self.store.checkpoint(&task)?;
        }
        self.store.checkpoint(&task)?;
        Ok(task)
    }

    /// The answer of a completed task: its last assistant message.
    pub fn answer(task: &Task) -> Option<&str> {
        task.messages
            .iter()
            .rev()
            .find(|m| m["role"] == "assistant")
            .and_then(|m| m["content"].as_str())
    }
}
