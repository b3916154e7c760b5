//! The agent's A2A server (JSON-RPC over HTTP, 1.0 and 0.3 on one URL), behind its sidecar's
//! inbound listener: the agent card at `/.well-known/agent-card.json`; sending a message
//! (`SendMessage`/`message/send`: waits for the task unless told not to), streaming one
//! (`SendStreamingMessage`/`message/stream`, SSE: the task, then its status and artifact events
//! until it is final), getting and canceling tasks, and their push notification configs.
//!
//! A message that names a task waiting for input is the human's answer: the task resumes at the
//! step that asked, unless the question expired. A message is idempotent: the same message (id,
//! context and text) again gets the task it made. Tasks run on the async runtime, never on a thread
//! of their own; a restarted agent resumes its open tasks. Push notifications go through the
//! sidecar to a mesh name, so policy sees them like any other call.

use crate::a2a::{self, code, Op, Version};
use crate::runner::Runner;
use crate::store::{PushConfig, Status, Task, TaskMeta};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Agent {
    pub runner: Arc<Runner>,
    /// The URL its card advertises.
    pub url: String,
    running: Mutex<HashSet<String>>,
}

type Shared = Arc<Agent>;

fn jsonrpc(v: Value) -> Response {
    (StatusCode::OK, Json(v)).into_response()
}

/// Why a request got no task: a JSON-RPC error code and message.
type Fault = (i64, String);

fn fault(code: i64, message: impl Into<String>) -> Fault {
    (code, message.into())
}

/// A push target must be a mesh name reached through the sidecar, never an arbitrary URL.
fn push_config(v: &Value) -> Result<Option<PushConfig>, Fault> {
    if v.is_null() {
        return Ok(None);
    }
    let url = v["url"].as_str().unwrap_or("").trim_start_matches('/');
    if !(url.starts_with("agents/") || url.starts_with("http/")) {
        return Err(fault(
            code::INVALID_PARAMS,
            format!("pushNotificationConfig.url `{url}` must be a mesh name (agents/<agent>/… or http/<name>/…): notifications go through the sidecar"),
        ));
    }
    Ok(Some(PushConfig {
        url: url.to_string(),
        token: v["token"].as_str().map(str::to_string),
    }))
}

/// The task id a message makes: the same message (id, context and text) sent again is the same
/// task — a retry — while another client's message that happens to reuse an id is not.
fn task_id(message: &Value, text: &str) -> String {
    let part = |k: &str| message[k].as_str().unwrap_or("").to_string();
    let h = crate::store::stable_hash(&[&part("messageId"), &part("contextId"), text]);
    format!("task-{h:016x}")
}

impl Agent {
    pub fn new(runner: Arc<Runner>, url: String) -> Shared {
        Arc::new(Agent {
            runner,
            url,
            running: Mutex::new(HashSet::new()),
        })
    }

    fn now(&self) -> String {
        a2a::rfc3339(self.runner.clock.now_ms())
    }

    /// Runs a task on the runtime unless it already runs.
    pub fn spawn(self: &Arc<Self>, task: Task) {
        if !self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(task.id.clone())
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let id = task.id.clone();
            if let Err(e) = me.runner.run(task).await {
                tracing::error!(task = %id, error = %e, "task store failed");
            }
            me.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
    }

    /// Resumes every task that was working when the agent stopped.
    pub fn resume(self: &Arc<Self>) -> Result<usize, crate::store::StoreError> {
        let open = self.runner.store.open_tasks()?;
        let mut n = 0;
        for t in open.into_iter().filter(|t| t.status == Status::Working) {
            tracing::info!(task = %t.id, step = t.step, "resuming task");
            self.spawn(t);
            n += 1;
        }
        Ok(n)
    }

    /// A question not answered in time fails its task.
    fn expire(&self, task: &mut Task) -> Result<(), Fault> {
        let limit = self.runner.manifest.questions_expire_after;
        let waited = self
            .runner
            .clock
            .now_ms()
            .saturating_sub(task.updated_at_ms);
        if task.status == Status::InputRequired && u128::from(waited) > limit.as_millis() {
            task.status = Status::Failed;
            task.question = Some(format!(
                "the question was not answered within {}",
                humantime::format_duration(limit)
            ));
            self.runner.commit(task).map_err(internal)?;
        }
        Ok(())
    }

    fn task(&self, id: &str) -> Result<Task, Fault> {
        let mut t = self
            .runner
            .store
            .task(id)
            .map_err(internal)?
            .ok_or_else(|| fault(code::TASK_NOT_FOUND, format!("no task `{id}`")))?;
        self.expire(&mut t)?;
        Ok(t)
    }

    /// The task a message starts or answers, running (unless it waits or is done).
    fn accept(
        self: &Arc<Self>,
        v: Version,
        params: &Value,
        headers: &HeaderMap,
    ) -> Result<Task, Fault> {
        let message = &params["message"];
        if !message.is_object() {
            return Err(fault(code::INVALID_PARAMS, "params.message is required"));
        }
        let text = a2a::text_of(message);
        if let Some(id) = message["taskId"].as_str() {
            let task = self.task(id)?;
            if task.status != Status::InputRequired {
                return Ok(task); // an answer to a task that no longer waits changes nothing
            }
            let answer = json!({"role": "user", "content": text, "answer": true});
            let task = self
                .runner
                .store
                .answer(id, answer, self.runner.clock.now_ms())
                .map_err(internal)?;
            self.spawn(task.clone());
            return Ok(task);
        }
        if !message["messageId"].is_string() {
            return Err(fault(
                code::INVALID_PARAMS,
                "params.message.messageId is required",
            ));
        }
        let id = task_id(message, &text);
        if let Some(t) = self.runner.store.task(&id).map_err(internal)? {
            return Ok(t);
        }
        let meta = TaskMeta {
            context_id: message["contextId"]
                .as_str()
                .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string),
            push: push_config(v.push_of(&params["configuration"]))?,
            protocol: v.name().to_string(),
            traceparent: headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
        };
        let task = self.runner.create(&id, &text, meta).map_err(internal)?;
        self.spawn(task.clone());
        Ok(task)
    }

    /// Waits until the task is final (or waits for input), from its watch.
    async fn settle(&self, mut watch: tokio::sync::broadcast::Receiver<Task>, task: Task) -> Task {
        if a2a::is_final(task.status) {
            return task;
        }
        loop {
            match watch.recv().await {
                Ok(t) if t.id == task.id && a2a::is_final(t.status) => return t,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    if let Ok(Some(t)) = self.runner.store.task(&task.id) {
                        if a2a::is_final(t.status) {
                            return t;
                        }
                    }
                }
                Err(_) => return task,
            }
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Fault {
    fault(code::INTERNAL, e.to_string())
}

pub fn router(agent: Shared) -> Router {
    Router::new()
        .route("/", post(rpc))
        .route("/.well-known/agent-card.json", get(card))
        .route("/.well-known/agent.json", get(card))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(agent)
}

async fn card(State(agent): State<Shared>) -> Response {
    Json(a2a::card(&agent.runner.manifest, &agent.url)).into_response()
}

async fn rpc(State(agent): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return jsonrpc(a2a::error(
                &Value::Null,
                code::PARSE_ERROR,
                format!("invalid JSON: {e}"),
            ))
        }
    };
    let id = req["id"].clone();
    let Some(method) = req["method"].as_str() else {
        return jsonrpc(a2a::error(&id, code::INVALID_REQUEST, "no method"));
    };
    let params = &req["params"];
    let Some((v, op)) = Version::of(method) else {
        let m = format!("method `{method}` not found");
        return jsonrpc(a2a::error(&id, code::METHOD_NOT_FOUND, m));
    };
    let answer = match op {
        Op::Stream => return stream(agent, v, id, params, &headers),
        Op::Send => {
            let watch = agent.runner.watch();
            match agent.accept(v, params, &headers) {
                Ok(t) if v.returns_immediately(&params["configuration"]) => Ok(t),
                Ok(t) => Ok(agent.settle(watch, t).await),
                Err(f) => Err(f),
            }
            .map(|t| v.task_event(&t, &agent.now()))
        }
        Op::Get => agent
            .task(params["id"].as_str().unwrap_or(""))
            .map(|t| v.task(&t, &agent.now())),
        Op::Cancel => cancel(&agent, v, params["id"].as_str().unwrap_or("")),
        Op::SetPush => set_push(&agent, v, params),
        Op::GetPush => get_push(&agent, v, params),
    };
    jsonrpc(match answer {
        Ok(r) => a2a::result(&id, r),
        Err((c, m)) => a2a::error(&id, c, m),
    })
}

fn cancel(agent: &Shared, v: Version, id: &str) -> Result<Value, Fault> {
    let mut t = agent.task(id)?;
    if !t.status.is_open() {
        return Err(fault(
            code::TASK_NOT_CANCELABLE,
            format!("task `{id}` is {}", t.status.as_str()),
        ));
    }
    t.status = Status::Canceled;
    agent.runner.commit(&mut t).map_err(internal)?;
    Ok(v.task(&t, &agent.now()))
}

/// The push config as each revision shows it: 0.3 nests it, 1.0 flattens it into the task's.
fn push_json(v: Version, task_id: &str, c: &PushConfig) -> Value {
    match v {
        Version::V0_3 => json!({"taskId": task_id, "pushNotificationConfig": {"url": c.url}}),
        Version::V1_0 => json!({"taskId": task_id, "id": task_id, "url": c.url}),
    }
}

fn set_push(agent: &Shared, v: Version, params: &Value) -> Result<Value, Fault> {
    let mut t = agent.task(params["taskId"].as_str().unwrap_or(""))?;
    let config = match v {
        Version::V0_3 => &params["pushNotificationConfig"],
        Version::V1_0 => params,
    };
    t.meta.push = push_config(config)?;
    agent.runner.store.checkpoint(&t).map_err(internal)?;
    match &t.meta.push {
        Some(c) => Ok(push_json(v, &t.id, c)),
        None => Err(fault(
            code::INVALID_PARAMS,
            "no push notification config given",
        )),
    }
}

fn get_push(agent: &Shared, v: Version, params: &Value) -> Result<Value, Fault> {
    let id = match v {
        Version::V0_3 => params["id"].as_str(),
        Version::V1_0 => params["taskId"].as_str(),
    };
    let t = agent.task(id.unwrap_or(""))?;
    let c = t.meta.push.as_ref().ok_or_else(|| {
        fault(
            code::INVALID_PARAMS,
            "the task has no push notification config",
        )
    })?;
    Ok(push_json(v, &t.id, c))
}

/// `message/stream`: the task, then each change as an event, until it is final.
fn stream(agent: Shared, v: Version, id: Value, params: &Value, headers: &HeaderMap) -> Response {
    let watch = agent.runner.watch();
    let task = match agent.accept(v, params, headers) {
        Ok(t) => t,
        Err((c, m)) => return jsonrpc(a2a::error(&id, c, m)),
    };
    let task_id = task.id.clone();
    let events = futures::stream::unfold(
        (agent, watch, Some(task), false),
        move |(agent, mut watch, first, done)| {
            let (id, task_id) = (id.clone(), task_id.clone());
            async move {
                if done {
                    return None;
                }
                let now = agent.now();
                let frame = |v: Value| format!("data: {}\n\n", a2a::result(&id, v));
                let (t, mut out) = match first {
                    Some(t) => {
                        let out = frame(v.task_event(&t, &now));
                        if !a2a::is_final(t.status) {
                            return Some((Ok(Bytes::from(out)), (agent, watch, None, false)));
                        }
                        (t, out)
                    }
                    None => loop {
                        match watch.recv().await {
                            Ok(t) if t.id == task_id => break (t, String::new()),
                            Ok(_) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                                // Missed changes: the committed state says where it is now.
                                if let Ok(Some(t)) = agent.runner.store.task(&task_id) {
                                    break (t, String::new());
                                }
                            }
                            Err(_) => return None,
                        }
                    },
                };
                if let Some(a) = v.artifact_event(&t) {
                    out.push_str(&frame(a));
                }
                out.push_str(&frame(v.status_event(&t, &now)));
                let fin = a2a::is_final(t.status);
                Some((
                    Ok::<_, std::convert::Infallible>(Bytes::from(out)),
                    (agent, watch, None, fin),
                ))
            }
        },
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(events))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Delivers the outbox's notifications, oldest first, each to its mesh name through the
/// sidecar with its token: at least once, in order, across restarts. A target that answers 2xx
/// or refuses (4xx) settles a notification; one that is down or fails (5xx) is retried with
/// backoff, holding the rest behind it.
pub async fn push_notifications(agent: Shared) {
    let mut watch = agent.runner.watch();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    let sidecar = agent
        .runner
        .manifest
        .sidecar
        .trim_end_matches('/')
        .to_string();
    let mut backoff = Duration::from_millis(200);
    loop {
        let next = match agent.runner.store.next_notice() {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the push outbox");
                None
            }
        };
        let Some(n) = next else {
            // Nothing queued: wait for a change (or look again in a while).
            tokio::select! {
                r = watch.recv() => if let Err(tokio::sync::broadcast::error::RecvError::Closed) = r { return },
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            continue;
        };
        let mut req = http
            .post(format!("{sidecar}/{}", n.url))
            .header("content-type", "application/json")
            .body(n.body.clone());
        if let Some(token) = &n.token {
            req = req.header("x-a2a-notification-token", token);
        }
        let settled = match req.send().await {
            Ok(r) if r.status().is_success() => true,
            Ok(r) if r.status().is_client_error() => {
                tracing::warn!(task = %n.task_id, target = %n.url, status = %r.status(), "push notification refused; dropped");
                true
            }
            Ok(r) => {
                tracing::warn!(task = %n.task_id, target = %n.url, status = %r.status(), "push notification failed; retrying");
                false
            }
            Err(e) => {
                tracing::warn!(task = %n.task_id, target = %n.url, error = %e, "push notification failed; retrying");
                false
            }
        };
        if settled {
            backoff = Duration::from_millis(200);
            if let Err(e) = agent.runner.store.notice_done(n.seq) {
                tracing::error!(error = %e, "cannot update the push outbox");
                tokio::time::sleep(backoff).await;
            }
        } else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
