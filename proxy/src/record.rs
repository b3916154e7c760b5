//! The typed call record: what one call through the sidecar is (filled by `classify`), what it
//! cost (filled by `usage` as the response streams) and how it ended. Policy, telemetry and the
//! access log all read this one record.

use crate::config::{CallKind, LlmApi};
use serde::Serialize;

/// Which side of the agent the call crosses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

/// One call, as classified from its request and observed on its response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallRecord {
    pub direction: Direction,
    pub kind: CallKind,
    /// Logical destination name (`llm/openai`, `mcp/tools`, `agents/writer`, `inbound`).
    pub target: String,
    pub method: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmCall>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpCall>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub a2a: Option<A2aCall>,
    /// What policy decided; absent for calls refused before policy (unknown or ungranted names,
    /// malformed bodies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<PolicyResult>,
    pub status: u16,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// The policy's answer for one call, as logs and telemetry show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyResult {
    pub allow: bool,
    /// False when audit mode let a deny through.
    pub enforced: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Time spent evaluating the policy (all of a batch's documents), in milliseconds.
    pub eval_ms: f64,
}

impl PolicyResult {
    /// `allow`, `deny`, or `audit_deny` (a deny that audit mode let through), as telemetry
    /// labels it.
    pub fn label(&self) -> &'static str {
        match (self.allow, self.enforced) {
            (true, _) => "allow",
            (false, true) => "deny",
            (false, false) => "audit_deny",
        }
    }
}

impl CallRecord {
    pub fn new(
        direction: Direction,
        kind: CallKind,
        target: &str,
        method: &str,
        path: &str,
    ) -> Self {
        CallRecord {
            direction,
            kind,
            target: target.to_string(),
            method: method.to_string(),
            path: path.to_string(),
            llm: None,
            mcp: None,
            a2a: None,
            decision: None,
            status: 0,
            request_bytes: 0,
            response_bytes: 0,
        }
    }

    /// The model or tool the call is about, for one-line summaries.
    pub fn subject(&self) -> String {
        if let Some(l) = &self.llm {
            return l.model.clone().unwrap_or_default();
        }
        if let Some(m) = &self.mcp {
            if m.messages.is_empty() {
                return match self.method.as_str() {
                    "GET" => "GET (server stream)".into(),
                    "DELETE" => "DELETE (end session)".into(),
                    other => other.into(),
                };
            }
            return m
                .messages
                .iter()
                .map(|x| match &x.tool {
                    Some(t) => format!("{}:{t}", x.method),
                    None => x.method.clone(),
                })
                .collect::<Vec<_>>()
                .join(",");
        }
        if let Some(a) = &self.a2a {
            return a.method.clone();
        }
        String::new()
    }
}

/// LLM API operation, from the request path. Serialized as `as_str` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmOperation {
    ChatCompletions,
    Responses,
    Messages,
    Embeddings,
    Models,
    Other,
}

impl LlmOperation {
    /// Its name in the access log, telemetry and policy input (`chat_completions`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            LlmOperation::ChatCompletions => "chat_completions",
            LlmOperation::Responses => "responses",
            LlmOperation::Messages => "messages",
            LlmOperation::Embeddings => "embeddings",
            LlmOperation::Models => "models",
            LlmOperation::Other => "other",
        }
    }
}

impl Serialize for LlmOperation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LlmCall {
    pub provider: String,
    pub api: LlmApi,
    pub operation: LlmOperation,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Model the provider says answered (may differ from the requested one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_model: Option<String>,
    pub usage: Usage,
    /// USD, from the usage and the price table; absent when the model has no price.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

/// Token usage read off the response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct McpCall {
    /// From `Mcp-Protocol-Version` (or the request envelope), when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// One entry per JSON-RPC message (a batch has several); empty for GET/DELETE.
    pub messages: Vec<McpMessage>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct McpMessage {
    pub method: String,
    /// Absent on notifications.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<serde_json::Value>,
    /// `params.name` of `tools/call` and `prompts/get`, `params.uri` of `resources/read`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// Read for policy, never written to logs: arguments can carry secrets and personal data.
    #[serde(skip_serializing)]
    pub arguments: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct A2aCall {
    /// `1.0` or `0.3`: from the `A2A-Version` header, else from the method's spelling.
    pub version: String,
    pub method: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skill: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_id: Option<String>,
    pub streaming: bool,
}
