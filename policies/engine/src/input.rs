//! The policy input document (design §4, documented field by field in `docs/policy-input.md`).
//! One per call; `version` changes only when a field changes meaning or goes away.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The version of the document this crate writes.
pub const INPUT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    pub version: u32,
    /// `outbound` (the local agent calls out) or `inbound` (a peer calls the local agent).
    pub direction: String,
    pub source: Source,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
    pub destination: Destination,
    pub request: Request,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm: Option<Llm>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<Mcp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a2a: Option<A2a>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// When the call arrived, RFC 3339 UTC.
    pub time: String,
}

/// Who is calling: the local agent (outbound) or the peer (inbound).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub agent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
}

/// The end user, from a validated JWT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub sub: String,
    #[serde(default)]
    pub claims: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// `llm`, `mcp`, `a2a` (for `agents/*`) or `http`.
    pub kind: String,
    /// The name after the kind: `openai` for `llm/openai`, `tools` for `mcp/tools`.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub method: String,
    /// The path the agent asked for, mesh prefix included, with the query.
    pub path: String,
    /// Request headers, names lowercased; credentials (`authorization`, `x-api-key`, `cookie`,
    /// `proxy-authorization`) are never included.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Llm {
    pub provider: String,
    /// `chat_completions`, `responses`, `messages`, `embeddings`, `models` or `other`.
    pub operation: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
}

/// One MCP JSON-RPC message. A batch is decided message by message; `batch_size` says how many
/// the request carried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mcp {
    /// Absent for the GET (server stream) and DELETE (end of session) requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// `params.name` of `tools/call` and `prompts/get`, `params.uri` of `resources/read`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    #[serde(default = "one")]
    pub batch_size: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct A2a {
    /// As sent: `message/send` (0.3) or `SendMessage` (1.0), and so on.
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skill: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_id: Option<String>,
    #[serde(default)]
    pub streaming: bool,
}

/// The source agent's spend in the current window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub spent_usd: f64,
    /// The window's length, e.g. `24h`.
    pub window: String,
}

/// Headers that carry credentials; they never enter the input document.
pub const CREDENTIAL_HEADERS: [&str; 5] = [
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "cookie",
];

/// The JSON examples of docs/policy-input.md, one per call kind.
#[cfg(test)]
pub(crate) fn documented_examples() -> Vec<&'static str> {
    include_str!("../../../docs/policy-input.md")
        .split("```json")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every example in docs/policy-input.md is an `Input`, field for field.
    #[test]
    fn the_documented_examples_are_exactly_the_document() {
        let examples = documented_examples();
        assert_eq!(examples.len(), 4, "one example per call kind");
        for text in examples {
            let raw: serde_json::Value = serde_json::from_str(text).expect("valid JSON");
            let input: Input =
                serde_json::from_value(raw.clone()).unwrap_or_else(|e| panic!("{e} in\n{text}"));
            assert_eq!(input.version, INPUT_VERSION);
            assert_eq!(serde_json::to_value(&input).unwrap(), raw, "{text}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<Input>(
            r#"{"version":1,"direction":"outbound","source":{"agent":"a","team":"x"},
                "destination":{"kind":"http","name":"w"},"request":{"method":"GET","path":"/"},
                "time":"t"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("team"), "{e}");
    }
}
