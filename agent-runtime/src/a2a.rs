//! A2A 0.3 over JSON-RPC, both ways: the shapes an agent serves (its card, tasks, streamed
//! status and artifact events, JSON-RPC errors) and the client side it delegates with
//! (`message/stream` to a collaborator through the sidecar, read event by event until the peer's
//! task is final).

use crate::manifest::Manifest;
use crate::store::{Status, Task};
use futures::StreamExt;
use serde_json::{json, Value};

/// JSON-RPC and A2A error codes.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL: i64 = -32603;
    pub const TASK_NOT_FOUND: i64 = -32001;
    pub const TASK_NOT_CANCELABLE: i64 = -32002;
}

/// A JSON-RPC error response.
pub fn error(id: &Value, code: i64, message: impl Into<String>) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message.into()}})
}

/// A JSON-RPC result response.
pub fn result(id: &Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// The protocol revision a request speaks, told by its method's name: 0.3 (`message/send`,
/// `tasks/get`, ...) or 1.0 (`SendMessage`, `GetTask`, ...; ProtoJSON shapes). An agent serves
/// both on one URL and answers each in its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V0_3,
    V1_0,
}

/// What a request asks for, in either revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Send,
    Stream,
    Get,
    Cancel,
    SetPush,
    GetPush,
}

impl Version {
    /// The revision and operation of a JSON-RPC method.
    pub fn of(method: &str) -> Option<(Version, Op)> {
        use {Op::*, Version::*};
        Some(match method {
            "message/send" => (V0_3, Send),
            "message/stream" => (V0_3, Stream),
            "tasks/get" => (V0_3, Get),
            "tasks/cancel" => (V0_3, Cancel),
            "tasks/pushNotificationConfig/set" => (V0_3, SetPush),
            "tasks/pushNotificationConfig/get" => (V0_3, GetPush),
            "SendMessage" => (V1_0, Send),
            "SendStreamingMessage" => (V1_0, Stream),
            "GetTask" => (V1_0, Get),
            "CancelTask" => (V1_0, Cancel),
            "CreateTaskPushNotificationConfig" => (V1_0, SetPush),
            "GetTaskPushNotificationConfig" => (V1_0, GetPush),
            _ => return None,
        })
    }

    /// The revision by the name a task keeps (`1.0`; anything else is 0.3).
    pub fn named(name: &str) -> Version {
        if name == "1.0" {
            Version::V1_0
        } else {
            Version::V0_3
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Version::V0_3 => "0.3",
            Version::V1_0 => "1.0",
        }
    }

    /// Whether a `message/send`'s configuration asks not to wait for the task.
    pub fn returns_immediately(self, configuration: &Value) -> bool {
        match self {
            Version::V0_3 => configuration["blocking"] == false,
            Version::V1_0 => configuration["returnImmediately"] == true,
        }
    }

    /// The push target a `message/send`'s configuration names, if any.
    pub fn push_of(self, configuration: &Value) -> &Value {
        match self {
            Version::V0_3 => &configuration["pushNotificationConfig"],
            Version::V1_0 => &configuration["taskPushNotificationConfig"],
        }
    }

    fn state(self, s: Status) -> &'static str {
        match (self, s) {
            (Version::V0_3, s) => s.as_str(),
            (Version::V1_0, Status::Working) => "TASK_STATE_WORKING",
            (Version::V1_0, Status::InputRequired) => "TASK_STATE_INPUT_REQUIRED",
            (Version::V1_0, Status::Completed) => "TASK_STATE_COMPLETED",
            (Version::V1_0, Status::Failed) => "TASK_STATE_FAILED",
            (Version::V1_0, Status::Canceled) => "TASK_STATE_CANCELED",
        }
    }

    fn text(self, text: &str) -> Value {
        match self {
            Version::V0_3 => json!([{"kind": "text", "text": text}]),
            Version::V1_0 => json!([{"text": text}]),
        }
    }

    /// A message of the task, from the user or the agent.
    fn message(self, task: &Task, id: String, from_user: bool, text: &str) -> Value {
        let mut m = json!({"messageId": id, "taskId": task.id,
            "contextId": task.meta.context_id, "parts": self.text(text)});
        match self {
            Version::V0_3 => {
                m["kind"] = json!("message");
                m["role"] = json!(if from_user { "user" } else { "agent" });
            }
            Version::V1_0 => {
                m["role"] = json!(if from_user { "ROLE_USER" } else { "ROLE_AGENT" });
            }
        }
        m
    }

    /// A task's status: its state, and the question, the failure, the step it runs or the
    /// answer as a message.
    pub fn status(self, task: &Task, now_rfc3339: &str) -> Value {
        let mut s = json!({"state": self.state(task.status), "timestamp": now_rfc3339});
        let note = match task.status {
            Status::Completed => crate::runner::Runner::answer(task).map(str::to_string),
            _ => task.question.clone(),
        };
        if let Some(text) = note {
            s["message"] = self.message(task, format!("{}-status", task.id), false, &text);
        }
        s
    }

    /// The answer of a completed task as its one artifact.
    fn artifact(self, task: &Task) -> Option<Value> {
        if task.status != Status::Completed {
            return None;
        }
        let text = crate::runner::Runner::answer(task)?;
        Some(
            json!({"artifactId": format!("{}-answer", task.id), "name": "answer",
            "parts": self.text(text)}),
        )
    }

    /// The task, with the user's and agent's messages as history.
    pub fn task(self, task: &Task, now_rfc3339: &str) -> Value {
        let history: Vec<Value> = task
            .messages
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let from_user = match m["role"].as_str()? {
                    "user" => true,
                    "assistant" => false,
                    _ => return None,
                };
                let text = m["content"].as_str()?;
                Some(self.message(task, format!("{}-{i}", task.id), from_user, text))
            })
            .collect();
        let mut t = json!({"id": task.id, "contextId": task.meta.context_id,
            "status": self.status(task, now_rfc3339), "history": history});
        if self == Version::V0_3 {
            t["kind"] = json!("task");
        }
        if let Some(a) = self.artifact(task) {
            t["artifacts"] = json!([a]);
        }
        t
    }

    /// The task as the answer to a send, or the first event of a stream.
    pub fn task_event(self, task: &Task, now_rfc3339: &str) -> Value {
        match self {
            Version::V0_3 => self.task(task, now_rfc3339),
            Version::V1_0 => json!({"task": self.task(task, now_rfc3339)}),
        }
    }

    /// A status-update event of a stream.
    pub fn status_event(self, task: &Task, now_rfc3339: &str) -> Value {
        let status = self.status(task, now_rfc3339);
        match self {
            Version::V0_3 => json!({"kind": "status-update", "taskId": task.id,
                "contextId": task.meta.context_id, "status": status,
                "final": is_final(task.status)}),
            Version::V1_0 => json!({"statusUpdate": {"taskId": task.id,
                "contextId": task.meta.context_id, "status": status}}),
        }
    }

    /// An artifact-update event of a stream, for a completed task's answer.
    pub fn artifact_event(self, task: &Task) -> Option<Value> {
        let a = self.artifact(task)?;
        Some(match self {
            Version::V0_3 => json!({"kind": "artifact-update", "taskId": task.id,
                "contextId": task.meta.context_id, "artifact": a, "lastChunk": true}),
            Version::V1_0 => json!({"artifactUpdate": {"taskId": task.id,
                "contextId": task.meta.context_id, "artifact": a, "lastChunk": true}}),
        })
    }
}

/// The agent card: who the agent is, where it answers (both revisions, one URL), what it offers.
pub fn card(m: &Manifest, url: &str) -> Value {
    let skills: Vec<Value> = m
        .skills
        .iter()
        .map(|s| {
            json!({"id": s.id, "name": if s.name.is_empty() { &s.id } else { &s.name },
                "description": s.description, "tags": s.tags})
        })
        .collect();
    json!({
        "protocolVersion": "0.3.0",
        "name": m.name,
        "description": m.description,
        "url": url,
        "preferredTransport": "JSONRPC",
        "supportedInterfaces": [
            {"url": url, "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
            {"url": url, "protocolBinding": "JSONRPC", "protocolVersion": "0.3"},
        ],
        "version": env!("CARGO_PKG_VERSION"),
        "capabilities": {"streaming": true, "pushNotifications": true,
            "stateTransitionHistory": false},
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain"],
        "skills": skills,
    })
}

/// The text of a message's text parts (either revision).
pub fn text_of(message: &Value) -> String {
    message["parts"]
        .as_array()
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// Whether a task in this state will not change without a new message.
pub fn is_final(s: Status) -> bool {
    s != Status::Working
}

/// RFC 3339 UTC time from unix milliseconds (tasks' timestamps).
pub use agentmesh_control_api::rfc3339_ms as rfc3339;

/// The sidecar path of a collaborator: `agents/<name>` or, for `skill:<id>`,
/// `agents/by-skill/<id>`.
pub fn collaborator_path(to: &str) -> String {
    match to.strip_prefix("skill:") {
        Some(skill) => format!("/agents/by-skill/{skill}"),
        None => format!("/agents/{to}"),
    }
}

/// Sends `text` to a collaborator with `message/stream` through the sidecar and reads the peer's
/// events until its task is final: the answer (artifact, or the final status message), or why
/// there is none. `message_id` makes the delegation idempotent: the peer answers a repeated
/// message with the task it already made.
pub async fn delegate(
    http: &reqwest::Client,
    url: &str,
    message_id: &str,
    text: &str,
    headers: &[(&str, String)],
) -> Result<String, String> {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "message/stream", "params": {
        "message": {"kind": "message", "role": "user", "messageId": message_id,
            "parts": [{"kind": "text", "text": text}]}}});
    let mut req = http
        .post(url)
        .header("accept", "text/event-stream")
        .json(&body);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let r = req.send().await.map_err(|e| e.to_string())?;
    let status = r.status();
    let ctype = crate::content_type(&r);
    if !ctype.starts_with("text/event-stream") {
        let v: Value = r.json().await.unwrap_or(Value::Null);
        return Err(match v.get("error") {
            Some(e) => format!("{status}: {}", e["message"].as_str().unwrap_or("error")),
            None => format!("{status}: {v}"),
        });
    }
    let mut stream = r.bytes_stream();
    let mut buf = String::new();
    let mut answer: Option<String> = None;
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.map_err(|e| e.to_string())?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for data in event.lines().filter_map(|l| l.strip_prefix("data:")) {
                let v: Value = serde_json::from_str(data.trim()).map_err(|e| e.to_string())?;
                if let Some(e) = v.get("error") {
                    return Err(e["message"].as_str().unwrap_or("error").to_string());
                }
                let ev = &v["result"];
                if let Some(a) = ev.get("artifact") {
                    answer = Some(text_of(a));
                }
                if let Some(arts) = ev["artifacts"].as_array() {
                    if let Some(a) = arts.last() {
                        answer = Some(text_of(a));
                    }
                }
                let state = ev["status"]["state"].as_str().unwrap_or("");
                let note = text_of(&ev["status"]["message"]);
                match state {
                    "completed" => return Ok(answer.unwrap_or(note)),
                    "failed" | "rejected" | "canceled" => {
                        return Err(format!("the peer's task is {state}: {note}"))
                    }
                    "input-required" | "auth-required" => {
                        return Err(format!("the peer asks for input: {note}"))
                    }
                    _ => {}
                }
            }
        }
    }
    Err("the peer's stream ended before its task was final".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collaborators_are_reached_by_name_or_skill() {
        assert_eq!(collaborator_path("writer"), "/agents/writer");
        assert_eq!(
            collaborator_path("skill:summarize"),
            "/agents/by-skill/summarize"
        );
    }
}
