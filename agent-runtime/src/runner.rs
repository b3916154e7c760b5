//! Runs a thin agent's tasks, every call through the sidecar. Two ways:
//!
//! * **model-planned**: the conversation goes to the model (OpenAI-compatible chat,
//!   `llm/<provider>`) with the agent's MCP tools (`<server>__<tool>`) and collaborators
//!   (`agent__<name>`, `skill__<id>`) as functions; each call the model asks for is made
//!   (`mcp/<server>` over MCP, `agents/...` over A2A) and its result goes back to the model,
//!   until it answers;
//! * **workflow**: the manifest's fixed steps (tool, agent, llm, ask) run in order by the
//!   runtime, each step's result available to later ones as `{{steps.<id>}}`.
//!
//! The task's state is committed before every step and every call's result recorded under its
//! idempotency key, so a task interrupted anywhere resumes where it stopped and never repeats a
//! completed call. An `ask` step pauses the task (`input-required`) until a human answers, or
//! until the question expires. Every commit is published to the task's watchers (A2A streams,
//! push notifications).

use crate::a2a;
use crate::clock::Clock;
use crate::manifest::{Manifest, Step};
use crate::store::{call_key, Status, Store, Task, TaskMeta};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::future::Future;

/// Steps a task may take before it is failed (a model that never stops calling tools).
pub const MAX_STEPS: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{what}: {message}")]
    Call { what: String, message: String },
    #[error("the task was canceled")]
    Canceled,
}

fn call_error(what: impl Into<String>, message: impl std::fmt::Display) -> RunError {
    RunError::Call {
        what: what.into(),
        message: message.to_string(),
    }
}

/// An MCP server reached through the sidecar: its session and its tools.
struct McpServer {
    session: Option<String>,
    tools: Vec<Value>,
}

pub struct Runner {
    pub manifest: Manifest,
    pub store: Store,
    pub clock: Clock,
    http: reqwest::Client,
    servers: tokio::sync::Mutex<HashMap<String, McpServer>>,
    events: tokio::sync::broadcast::Sender<Task>,
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
        let m = e["message"]
            .as_str()
            .map_or_else(|| e.to_string(), str::to_string);
        return Err(format!("JSON-RPC error {}: {m}", e["code"]));
    }
    doc.get("result").cloned().ok_or_else(|| "no result".into())
}

/// The text an MCP tool result carries (its text content), or the result itself as JSON.
fn tool_text(result: &Value) -> String {
    let texts: Vec<&str> = result["content"]
        .as_array()
        .map(|c| c.iter().filter_map(|p| p["text"].as_str()).collect())
        .unwrap_or_default();
    if texts.is_empty() {
        result.to_string()
    } else {
        texts.join("\n")
    }
}

/// A fresh W3C trace context for a task nobody traced yet.
pub fn new_traceparent() -> String {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    format!("00-{trace}-{span}-01")
}

/// Replaces `{{input}}` and `{{steps.<id>}}` in every string of `v`.
fn fill(v: &Value, task: &Task) -> Value {
    match v {
        Value::String(s) => Value::String(fill_text(s, task)),
        Value::Array(a) => Value::Array(a.iter().map(|x| fill(x, task)).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, x)| (k.clone(), fill(x, task))).collect())
        }
        other => other.clone(),
    }
}

fn fill_text(s: &str, task: &Task) -> String {
    let input = task
        .messages
        .iter()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .unwrap_or("");
    let mut out = s.replace("{{input}}", input);
    for m in &task.messages {
        if let (Some(id), Some(c)) = (m["step"].as_str(), m["content"].as_str()) {
            out = out.replace(&format!("{{{{steps.{id}}}}}"), c);
        }
    }
    out
}

impl Runner {
    pub fn new(manifest: Manifest, store: Store) -> Runner {
        Runner {
            manifest,
            store,
            clock: Clock::System,
            http: reqwest::Client::new(),
            servers: tokio::sync::Mutex::new(HashMap::new()),
            events: tokio::sync::broadcast::channel(1024).0,
        }
    }

    pub fn with_clock(mut self, clock: Clock) -> Runner {
        self.clock = clock;
        self
    }

    /// Every committed change of every task, from now on.
    pub fn watch(&self) -> tokio::sync::broadcast::Receiver<Task> {
        self.events.subscribe()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.manifest.sidecar.trim_end_matches('/'))
    }

    /// Commits the task and tells its watchers; a task canceled meanwhile stops here.
    pub fn commit(&self, task: &mut Task) -> Result<(), RunError> {
        if task.status.is_open()
            && self
                .store
                .task(&task.id)?
                .is_some_and(|t| t.status == Status::Canceled)
        {
            task.status = Status::Canceled;
            let _ = self.events.send(task.clone());
            return Err(RunError::Canceled);
        }
        task.updated_at_ms = self.clock.now_ms();
        let notice = task.meta.push.is_some().then(|| {
            let v = a2a::Version::named(&task.meta.protocol);
            v.task_event(task, &a2a::rfc3339(task.updated_at_ms))
                .to_string()
        });
        self.store.checkpoint_notify(task, notice.as_deref())?;
        let _ = self.events.send(task.clone());
        Ok(())
    }

    /// A call made once per task and step: a result recorded under the same key is reused.
    async fn once<F>(
        &self,
        task: &Task,
        target: &str,
        args: &Value,
        call: F,
    ) -> Result<Value, RunError>
    where
        F: Future<Output = Result<Value, RunError>>,
    {
        let key = call_key(task.step, target, args);
        if let Some(done) = self.store.call_result(&task.id, &key)? {
            return Ok(done);
        }
        let r = call.await?;
        self.store.record_call(&task.id, &key, &r)?;
        Ok(r)
    }

    async fn rpc(
        &self,
        task: &Task,
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
            .header("traceparent", &task.meta.traceparent)
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
        let ctype = crate::content_type(&r);
        let body = r.text().await.map_err(|e| call_error(&what, e))?;
        let result = jsonrpc_result(&body, &ctype).map_err(|m| call_error(&what, m));
        if !status.is_success() && result.is_ok() {
            return Err(call_error(&what, format!("{status}: {body}")));
        }
        Ok((result?, session))
    }

    /// Opens the MCP session of each tool server (once) and lists its tools.
    async fn open_servers(&self, task: &Task) -> Result<(), RunError> {
        let mut servers = self.servers.lock().await;
        for name in &self.manifest.tools {
            if servers.contains_key(name) {
                continue;
            }
            let init = json!({"protocolVersion": "2025-11-25", "capabilities": {},
                "clientInfo": {"name": self.manifest.name, "version": env!("CARGO_PKG_VERSION")}});
            let (_, session) = self.rpc(task, name, None, "initialize", init).await?;
            let (listed, _) = self
                .rpc(task, name, session.as_deref(), "tools/list", json!({}))
                .await?;
            let tools = listed["tools"].as_array().cloned().unwrap_or_default();
            servers.insert(name.clone(), McpServer { session, tools });
        }
        Ok(())
    }

    /// The functions the model may call: every tool of every server, and every collaborator.
    async fn functions(&self, task: &Task) -> Result<Vec<Value>, RunError> {
        self.open_servers(task).await?;
        let servers = self.servers.lock().await;
        let mut out: Vec<Value> = self
            .manifest
            .tools
            .iter()
            .flat_map(|s| servers[s].tools.iter().map(move |t| (s, t)))
            .map(|(server, t)| {
                json!({"type": "function", "function": {
                    "name": format!("{server}__{}", t["name"].as_str().unwrap_or("")),
                    "description": t["description"], "parameters": t["inputSchema"]}})
            })
            .collect();
        let message = json!({"type": "object", "properties": {"message": {"type": "string"}},
            "required": ["message"]});
        for c in &self.manifest.collaborators {
            let (name, what) = match (&c.agent, &c.skill) {
                (Some(a), _) => (format!("agent__{a}"), format!("Ask the agent `{a}`.")),
                (_, Some(s)) => (
                    format!("skill__{s}"),
                    format!("Ask an agent offering `{s}`."),
                ),
                _ => continue,
            };
            out.push(json!({"type": "function", "function": {"name": name,
                "description": what, "parameters": message}}));
        }
        Ok(out)
    }

    /// Calls a tool of one of the agent's servers through the sidecar.
    async fn call_tool(
        &self,
        task: &Task,
        server: &str,
        tool: &str,
        args: &Value,
    ) -> Result<Value, RunError> {
        self.open_servers(task).await?;
        let session = self
            .servers
            .lock()
            .await
            .get(server)
            .and_then(|s| s.session.clone());
        let (result, _) = self
            .rpc(
                task,
                server,
                session.as_deref(),
                "tools/call",
                json!({"name": tool, "arguments": args}),
            )
            .await?;
        if result["isError"] == true {
            return Err(call_error(
                format!("mcp/{server} {tool}"),
                tool_text(&result),
            ));
        }
        Ok(result)
    }

    /// Sends a message to a collaborator (`<agent>` or `skill:<id>`) over A2A and waits, without
    /// holding a thread, for its answer.
    async fn delegate(&self, task: &Task, to: &str, text: &str) -> Result<Value, RunError> {
        let what = a2a::collaborator_path(to);
        let message_id = format!("{}:{}", task.id, call_key(task.step, to, &json!(text)));
        let headers = [("traceparent", task.meta.traceparent.clone())];
        let answer = a2a::delegate(&self.http, &self.url(&what), &message_id, text, &headers)
            .await
            .map_err(|m| call_error(what.trim_start_matches('/'), m))?;
        Ok(Value::String(answer))
    }

    /// One chat completion through the sidecar.
    async fn chat(
        &self,
        task: &Task,
        messages: &[Value],
        functions: &[Value],
    ) -> Result<Value, RunError> {
        let m = &self.manifest.model;
        let mut body = json!({"model": m.name, "messages": messages});
        if !functions.is_empty() {
            body["tools"] = json!(functions);
        }
        if let Some(n) = m.max_tokens {
            body["max_tokens"] = json!(n);
        }
        let what = format!("llm/{}", m.provider);
        let r = self
            .http
            .post(self.url(&format!("/llm/{}/v1/chat/completions", m.provider)))
            .header("traceparent", &task.meta.traceparent)
            .json(&body)
            .send()
            .await
            .map_err(|e| call_error(&what, e))?;
        let status = r.status();
        let v: Value = r.json().await.map_err(|e| call_error(&what, e))?;
        if !status.is_success() {
            let m = v["error"]["message"]
                .as_str()
                .map_or_else(|| v.to_string(), str::to_string);
            return Err(call_error(&what, format!("{status}: {m}")));
        }
        Ok(v["choices"][0]["message"].clone())
    }

    /// A new task for the user's input, committed before it runs.
    pub fn create(&self, id: &str, input: &str, meta: TaskMeta) -> Result<Task, RunError> {
        let mut messages = Vec::new();
        if !self.manifest.system_prompt.is_empty() {
            messages.push(json!({"role": "system", "content": self.manifest.system_prompt}));
        }
        messages.push(json!({"role": "user", "content": input}));
        let mut meta = meta;
        if meta.traceparent.is_empty() {
            meta.traceparent = new_traceparent();
        }
        let mut task = Task {
            id: id.into(),
            status: Status::Working,
            step: 0,
            messages,
            question: None,
            updated_at_ms: 0,
            meta,
        };
        self.commit(&mut task)?;
        Ok(task)
    }

    /// Starts a task with the user's input and runs it until it ends or waits.
    pub async fn start(&self, id: &str, input: &str) -> Result<Task, RunError> {
        let task = self.create(id, input, TaskMeta::default())?;
        self.run(task).await
    }

    /// Runs (or resumes) a task from its committed step until it completes, fails or waits for
    /// a human. A failing call fails the task, with the reason as its status message.
    pub async fn run(&self, mut task: Task) -> Result<Task, RunError> {
        let r = if self.manifest.workflow.is_empty() {
            self.planned(&mut task).await
        } else {
            self.workflow(&mut task).await
        };
        match r {
            Ok(()) => {}
            Err(RunError::Canceled) => return Ok(task),
            Err(RunError::Store(e)) => return Err(RunError::Store(e)),
            Err(e) => {
                tracing::warn!(task = %task.id, error = %e, "task failed");
                task.status = Status::Failed;
                task.question = Some(e.to_string());
            }
        }
        // A task that waits for a human was committed when it asked. Committing it again would
        // restamp the question (its expiry counts from then) and push its notification twice.
        if task.status != Status::InputRequired {
            self.commit(&mut task)?;
        }
        Ok(task)
    }

    async fn planned(&self, task: &mut Task) -> Result<(), RunError> {
        let functions = self.functions(task).await?;
        while task.status == Status::Working {
            if task.step >= MAX_STEPS {
                return Err(call_error(
                    "the model",
                    format!("no answer after {MAX_STEPS} steps"),
                ));
            }
            let message = self.chat(task, &task.messages, &functions).await?;
            task.messages.push(message.clone());
            let calls = message["tool_calls"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if calls.is_empty() {
                task.status = Status::Completed;
            }
            for c in calls {
                let function = c["function"]["name"].as_str().unwrap_or("").to_string();
                let args: Value =
                    serde_json::from_str(c["function"]["arguments"].as_str().unwrap_or("{}"))
                        .unwrap_or(json!({}));
                // A failed or denied call is the model's to handle: it gets the reason.
                let content = match self.function(task, &function, &args).await {
                    Ok(Value::String(s)) => s,
                    Ok(other) => tool_text(&other),
                    Err(RunError::Call { what, message }) => {
                        tracing::info!(task = %task.id, %what, %message, "call failed");
                        format!("error: {what}: {message}")
                    }
                    Err(e) => return Err(e),
                };
                task.messages
                    .push(json!({"role": "tool", "tool_call_id": c["id"], "content": content}));
            }
            task.step += 1;
            self.commit(task)?;
        }
        Ok(())
    }

    /// One function the model called: a tool or a collaborator.
    async fn function(&self, task: &Task, function: &str, args: &Value) -> Result<Value, RunError> {
        let (prefix, name) = function
            .split_once("__")
            .ok_or_else(|| call_error(function, "not a function of this agent"))?;
        let message = args["message"].as_str().unwrap_or("").to_string();
        match prefix {
            "agent" => {
                self.once(
                    task,
                    &format!("agent:{name}"),
                    args,
                    self.delegate(task, name, &message),
                )
                .await
            }
            "skill" => {
                let to = format!("skill:{name}");
                self.once(task, &to, args, self.delegate(task, &to, &message))
                    .await
            }
            server => {
                self.once(
                    task,
                    function,
                    args,
                    self.call_tool(task, server, name, args),
                )
                .await
            }
        }
    }

    async fn workflow(&self, task: &mut Task) -> Result<(), RunError> {
        while task.status == Status::Working {
            let Some(step) = self.manifest.workflow.get(task.step as usize).cloned() else {
                let last = task
                    .messages
                    .last()
                    .and_then(|m| m["content"].as_str())
                    .unwrap_or("");
                task.messages
                    .push(json!({"role": "assistant", "content": last}));
                task.status = Status::Completed;
                task.question = None;
                break;
            };
            let note = format!(
                "step {} of {}: {}",
                task.step + 1,
                self.manifest.workflow.len(),
                step.id
            );
            if task.question.as_deref() != Some(note.as_str()) {
                task.question = Some(note);
                self.commit(task)?;
            }
            let Some(result) = self.step(task, &step).await? else {
                return Ok(()); // waits for a human
            };
            task.messages
                .push(json!({"role": "step", "step": step.id, "content": result}));
            task.step += 1;
            self.commit(task)?;
        }
        Ok(())
    }

    /// Runs one workflow step: its result text, or `None` when it waits for a human.
    async fn step(&self, task: &mut Task, step: &Step) -> Result<Option<String>, RunError> {
        let text = |v: Value| match v {
            Value::String(s) => s,
            other => tool_text(&other),
        };
        if let Some(t) = &step.tool {
            let args = fill(&t.arguments, task);
            let target = format!("{}__{}", t.server, t.name);
            let r = self
                .once(
                    task,
                    &target,
                    &args,
                    self.call_tool(task, &t.server, &t.name, &args),
                )
                .await?;
            return Ok(Some(text(r)));
        }
        if let Some(a) = &step.agent {
            let message = fill_text(&a.message, task);
            let target = format!("agent:{}", a.to);
            let r = self
                .once(
                    task,
                    &target,
                    &json!(message),
                    self.delegate(task, &a.to, &message),
                )
                .await?;
            return Ok(Some(text(r)));
        }
        if let Some(l) = &step.llm {
            let prompt = fill_text(&l.prompt, task);
            let mut messages = Vec::new();
            if !self.manifest.system_prompt.is_empty() {
                messages.push(json!({"role": "system", "content": self.manifest.system_prompt}));
            }
            messages.push(json!({"role": "user", "content": prompt}));
            let chat = async {
                let m = self.chat(task, &messages, &[]).await?;
                Ok(m["content"].clone())
            };
            let r = self.once(task, "llm", &json!(prompt), chat).await?;
            return Ok(Some(text(r)));
        }
        let question = fill_text(step.ask.as_deref().unwrap_or(""), task);
        // The human's answer, once given, is the last message (see `Store::answer`).
        if let Some(answer) = task.messages.last().filter(|m| m["answer"] == true) {
            return Ok(Some(answer["content"].as_str().unwrap_or("").to_string()));
        }
        task.status = Status::InputRequired;
        task.question = Some(question);
        self.commit(task)?;
        Ok(None)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PushConfig;

    // A second commit of a waiting task restamped its question, so its expiry counted from
    // whenever the run ended (after a test had moved the clock on, on a loaded machine), and
    // pushed the question's notification twice.
    #[tokio::test]
    async fn a_task_that_asks_is_committed_and_notified_once_for_its_question() {
        let dir = std::env::temp_dir().join(format!("am-runner-ask-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let manifest = Manifest::from_yaml(
            "name: approver\nmodel: {provider: openai, name: gpt-4o-mini}\nworkflow:\n  - {id: approve, ask: 'Publish {{input}}?'}\n",
            "a.yaml",
        )
        .unwrap();
        let runner = Runner::new(manifest, Store::open(&dir.join("tasks.db")).unwrap());
        let task = Task {
            id: "t1".into(),
            status: Status::Working,
            step: 0,
            messages: vec![json!({"role": "user", "content": "the brief"})],
            question: None,
            updated_at_ms: 0,
            meta: TaskMeta {
                push: Some(PushConfig {
                    url: "http/hook/cb".into(),
                    token: None,
                }),
                ..Default::default()
            },
        };
        let ran = runner.run(task).await.unwrap();
        assert_eq!(ran.status, Status::InputRequired);
        let stored = runner.store.task("t1").unwrap().unwrap();
        assert_eq!(stored.status, Status::InputRequired);
        assert_eq!(stored.question.as_deref(), Some("Publish the brief?"));
        let mut states = Vec::new();
        while let Some(n) = runner.store.next_notice().unwrap() {
            let v: Value = serde_json::from_str(&n.body).unwrap();
            states.push(v["status"]["state"].as_str().unwrap_or("").to_string());
            runner.store.notice_done(n.seq).unwrap();
        }
        assert_eq!(
            states.iter().filter(|s| *s == "input-required").count(),
            1,
            "{states:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
