//! Phase 6, observe (LLM part): read token usage off a response while its bytes pass through
//! untouched. Works on plain JSON (buffering a bounded copy) and on SSE streams (line by line as
//! chunks arrive: OpenAI's final usage chunk, Responses' `response.completed`, Anthropic's
//! `message_start` and `message_delta`). The reader never holds bytes back from the client.

use crate::record::Usage;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// Longest SSE line or JSON body we keep a copy of; larger ones are passed on unread.
const MAX_COPY: usize = 4 * 1024 * 1024;

#[derive(Debug)]
enum Mode {
    Json(Vec<u8>),
    Sse(Vec<u8>),
    /// Not a format we read, or over the copy bound.
    Off,
}

/// Incremental usage reader for one response.
#[derive(Debug)]
pub struct UsageReader {
    mode: Mode,
    pub usage: Usage,
    pub response_model: Option<String>,
    /// Whether any usage figure was seen.
    pub seen: bool,
}

impl UsageReader {
    /// Picks the reading mode from the response `Content-Type`.
    pub fn new(content_type: &str) -> Self {
        let ct = content_type.to_ascii_lowercase();
        let mode = if ct.starts_with("text/event-stream") {
            Mode::Sse(Vec::new())
        } else if ct.starts_with("application/json") || ct.is_empty() {
            Mode::Json(Vec::new())
        } else {
            Mode::Off
        };
        UsageReader {
            mode,
            usage: Usage::default(),
            response_model: None,
            seen: false,
        }
    }

    /// Feeds one chunk of the response body, as it passes.
    pub fn feed(&mut self, chunk: &[u8]) {
        match &mut self.mode {
            Mode::Json(buf) => {
                if buf.len() + chunk.len() > MAX_COPY {
                    self.mode = Mode::Off;
                } else {
                    buf.extend_from_slice(chunk);
                }
            }
            Mode::Sse(pending) => {
                let mut lines = Vec::new();
                let mut rest = chunk;
                while let Some(i) = rest.iter().position(|&b| b == b'\n') {
                    if pending.is_empty() {
                        lines.push(rest[..i].to_vec());
                    } else {
                        pending.extend_from_slice(&rest[..i]);
                        lines.push(std::mem::take(pending));
                    }
                    rest = &rest[i + 1..];
                }
                if pending.len() + rest.len() > MAX_COPY {
                    pending.clear(); // an absurd line: skip it rather than grow without bound
                } else {
                    pending.extend_from_slice(rest);
                }
                for line in lines {
                    self.sse_line(&line);
                }
            }
            Mode::Off => {}
        }
    }

    /// The whole JSON body read so far (before `finish`), when this is a JSON response.
    pub fn json_body(&self) -> Option<&[u8]> {
        match &self.mode {
            Mode::Json(buf) => Some(buf),
            _ => None,
        }
    }

    /// Ends the body: reads a buffered JSON document.
    pub fn finish(&mut self) {
        if let Mode::Json(buf) = std::mem::replace(&mut self.mode, Mode::Off) {
            self.read_doc(&buf);
        } else if let Mode::Sse(pending) = std::mem::replace(&mut self.mode, Mode::Off) {
            self.sse_line(&pending);
        }
    }

    fn sse_line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        // Cheap filter: most stream chunks carry neither usage nor a first sight of the model.
        let has = |needle: &[u8]| data.windows(needle.len()).any(|w| w == needle);
        if !(has(b"\"usage\"") || (self.response_model.is_none() && has(b"\"model\""))) {
            return;
        }
        self.read_doc(data.trim_ascii());
    }

    /// Reads one JSON document: typed first, which skips the generated text without building a
    /// tree of it; a document of another shape (an error event whose `message` is a string)
    /// falls back to a generic read.
    fn read_doc(&mut self, bytes: &[u8]) {
        if let Ok(d) = serde_json::from_slice::<UsageDoc>(bytes) {
            let holder = d.response.or(d.message).unwrap_or_default();
            let model = holder.model.or(d.model);
            self.take(model.as_ref(), holder.usage.or(d.usage));
        } else if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
            self.apply(&v);
        }
    }

    /// Takes usage and model from one JSON document or event, wherever the API puts them.
    fn apply(&mut self, v: &Value) {
        let holder = ["response", "message"]
            .iter()
            .find_map(|k| v.get(*k).filter(|x| x.is_object()))
            .unwrap_or(v);
        let model = holder.get("model").or_else(|| v.get("model"));
        let usage = holder.get("usage").or_else(|| v.get("usage"));
        self.take(model, usage.and_then(|u| Counts::deserialize(u).ok()));
    }

    /// Records the model (first seen wins) and whichever usage figures are present.
    fn take(&mut self, model: Option<&Value>, usage: Option<Counts>) {
        if self.response_model.is_none() {
            self.response_model = model.and_then(Value::as_str).map(str::to_string);
        }
        let Some(u) = usage else {
            return;
        };
        if let Some(n) = u.prompt_tokens.or(u.input_tokens) {
            self.usage.input_tokens = n;
            self.seen = true;
        }
        if let Some(n) = u.completion_tokens.or(u.output_tokens) {
            self.usage.output_tokens = n;
            self.seen = true;
        }
        let details = |d: Option<Details>| d.and_then(|d| d.cached_tokens);
        if let Some(n) = details(u.prompt_tokens_details)
            .or(details(u.input_tokens_details))
            .or(u.cache_read_input_tokens)
        {
            self.usage.cached_input_tokens = n;
        }
    }
}

/// Where usage and model sit in the documents and events of the supported APIs: top level
/// (OpenAI chat, Anthropic messages), under `response` (OpenAI Responses events) or `message`
/// (Anthropic `message_start`). Other fields are skipped unread.
#[derive(Deserialize, Default)]
struct UsageDoc {
    #[serde(default)]
    model: Option<Value>,
    #[serde(default)]
    usage: Option<Counts>,
    #[serde(default)]
    response: Option<UsageHolder>,
    #[serde(default)]
    message: Option<UsageHolder>,
}

#[derive(Deserialize, Default)]
struct UsageHolder {
    #[serde(default)]
    model: Option<Value>,
    #[serde(default)]
    usage: Option<Counts>,
}

/// A `usage` object under the names of each API: OpenAI Chat (`prompt_tokens`,
/// `completion_tokens`, `prompt_tokens_details.cached_tokens`), OpenAI Responses
/// (`input_tokens`, `output_tokens`, `input_tokens_details.cached_tokens`) and Anthropic
/// (`input_tokens`, `output_tokens`, `cache_read_input_tokens`). A figure that is not a whole
/// number is taken as absent, not as an unreadable document.
#[derive(Deserialize, Default)]
struct Counts {
    #[serde(default, deserialize_with = "count")]
    prompt_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    completion_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    output_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    #[serde(default)]
    input_tokens_details: Option<Details>,
}

#[derive(Deserialize, Default)]
struct Details {
    #[serde(default, deserialize_with = "count")]
    cached_tokens: Option<u64>,
}

fn count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(Value::deserialize(d)?.as_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_in_chunks(ct: &str, body: &str, size: usize) -> UsageReader {
        let mut r = UsageReader::new(ct);
        for c in body.as_bytes().chunks(size) {
            r.feed(c);
        }
        r.finish();
        r
    }

    #[test]
    fn openai_chat_json() {
        let body = r#"{"id":"x","model":"gpt-4o-mini-2024-07-18","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"prompt_tokens_details":{"cached_tokens":4}}}"#;
        let r = read_in_chunks("application/json", body, 7);
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 12,
                output_tokens: 5,
                cached_input_tokens: 4
            }
        );
        assert_eq!(r.response_model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
    }

    #[test]
    fn openai_chat_sse_final_usage_chunk_split_anywhere() {
        let body = "data: {\"id\":\"1\",\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
                    data: {\"id\":\"1\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":30,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n";
        for size in [1, 3, 17, 1000] {
            let r = read_in_chunks("text/event-stream; charset=utf-8", body, size);
            assert_eq!(
                (r.usage.input_tokens, r.usage.output_tokens),
                (30, 7),
                "chunk size {size}"
            );
            assert_eq!(r.response_model.as_deref(), Some("gpt-4o"));
        }
    }

    #[test]
    fn openai_responses_sse() {
        let body = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"model\":\"gpt-5\",\"usage\":null}}\n\n\
                    event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"gpt-5\",\"usage\":{\"input_tokens\":20,\"output_tokens\":9,\"input_tokens_details\":{\"cached_tokens\":2}}}}\n\n";
        let r = read_in_chunks("text/event-stream", body, 5);
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 20,
                output_tokens: 9,
                cached_input_tokens: 2
            }
        );
    }

    #[test]
    fn anthropic_sse_start_and_delta() {
        let body = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1,\"cache_read_input_tokens\":10}}}\n\n\
                    event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hello\"}}\n\n\
                    event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n";
        let r = read_in_chunks("text/event-stream", body, 9);
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 25,
                output_tokens: 15,
                cached_input_tokens: 10
            }
        );
        assert_eq!(r.response_model.as_deref(), Some("claude-sonnet-4-5"));
    }

    #[test]
    fn anthropic_json() {
        let body = r#"{"id":"msg_1","type":"message","model":"claude-haiku-4-5","content":[],"usage":{"input_tokens":8,"output_tokens":3}}"#;
        let r = read_in_chunks("application/json", body, 4);
        assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (8, 3));
        assert!(r.seen);
    }

    #[test]
    fn an_error_event_with_a_string_message_is_read_generically() {
        let body = "event: error\ndata: {\"type\":\"error\",\"message\":\"overloaded\",\"model\":\"gpt-5\"}\n\n\
                    data: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":4}}}\n\n";
        let r = read_in_chunks("text/event-stream", body, 11);
        assert_eq!(r.response_model.as_deref(), Some("gpt-5"));
        assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (3, 4));
    }

    #[test]
    fn a_figure_that_is_not_a_whole_number_is_absent_and_the_others_still_count() {
        let body = r#"{"model":"m","usage":{"prompt_tokens":"12","completion_tokens":5,"prompt_tokens_details":null}}"#;
        let r = read_in_chunks("application/json", body, 64);
        assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (0, 5));
        assert!(r.seen);
    }

    #[test]
    fn garbage_is_ignored() {
        let r = read_in_chunks("application/json", "{not json", 3);
        assert!(!r.seen);
        let r = read_in_chunks("text/plain", "usage", 3);
        assert!(!r.seen);
    }
}
