//! Phase 6, observe (live part): every finished call as an event for whoever is watching
//! `/tap` on the admin port, like `linkerd viz tap`. Nothing is built when no one watches; a
//! watcher that falls behind is told how many events it missed, and the proxy never waits for it.

use crate::accesslog::{ms, unix_ms, Timings};
use crate::metrics::decision_label;
use crate::record::CallRecord;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::broadcast;

/// Events a slow watcher may fall behind by before it starts missing some.
const BACKLOG: usize = 4096;

/// One finished call, as `/tap` streams it (one JSON object per SSE `data:` line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TapEvent {
    pub ts_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    pub direction: String,
    pub source: String,
    pub kind: String,
    pub target: String,
    /// The model, tool(s) or A2A method.
    pub subject: String,
    /// `allow`, `deny`, `audit_deny`, or `none` (refused before policy).
    pub decision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub status: u16,
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    pub duration_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_ms: Option<f64>,
}

impl TapEvent {
    pub fn new(rec: &CallRecord, source: &str, t: &Timings, trace_id: Option<&str>) -> TapEvent {
        TapEvent {
            ts_ms: unix_ms(),
            trace_id: trace_id.map(str::to_string),
            direction: format!("{:?}", rec.direction).to_lowercase(),
            source: source.to_string(),
            kind: rec.kind.as_str().to_string(),
            target: rec.target.clone(),
            subject: rec.subject(),
            decision: decision_label(rec).to_string(),
            reason: rec.decision.as_ref().and_then(|d| d.reason.clone()),
            status: rec.status,
            input_tokens: rec.llm.as_ref().map_or(0, |l| l.usage.input_tokens),
            output_tokens: rec.llm.as_ref().map_or(0, |l| l.usage.output_tokens),
            cost_usd: rec.llm.as_ref().and_then(|l| l.cost_usd),
            duration_ms: ms(t.total),
            upstream_ms: t.upstream.map(ms),
        }
    }
}

/// Which events a watcher wants: `/tap?agent=planner&kind=llm&decision=deny&min_ms=100`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TapFilter {
    /// The source agent.
    pub agent: Option<String>,
    pub kind: Option<String>,
    /// The destination (`llm/openai`).
    pub target: Option<String>,
    pub decision: Option<String>,
    /// Only calls that took at least this long.
    pub min_ms: Option<f64>,
}

impl TapFilter {
    /// Reads the query string; an unknown parameter or a bad number is an error naming it.
    pub fn parse(query: Option<&str>) -> Result<TapFilter, String> {
        let mut f = TapFilter::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = crate::admin::percent_decode(v);
            match k {
                "agent" => f.agent = Some(v),
                "kind" => f.kind = Some(v),
                "target" => f.target = Some(v),
                "decision" => f.decision = Some(v),
                "min_ms" => {
                    let n: f64 = v
                        .parse()
                        .map_err(|_| format!("min_ms: `{v}` is not a number of milliseconds"))?;
                    f.min_ms = Some(n);
                }
                other => {
                    return Err(format!(
                        "unknown filter `{other}`; use agent, kind, target, decision, min_ms"
                    ))
                }
            }
        }
        Ok(f)
    }

    pub fn matches(&self, e: &TapEvent) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&self.agent, &e.source)
            && eq(&self.kind, &e.kind)
            && eq(&self.target, &e.target)
            && eq(&self.decision, &e.decision)
            && self.min_ms.is_none_or(|m| e.duration_ms >= m)
    }
}

/// The hub calls are published to.
pub struct Tap {
    tx: broadcast::Sender<Arc<TapEvent>>,
}

impl Default for Tap {
    fn default() -> Self {
        Tap {
            tx: broadcast::channel(BACKLOG).0,
        }
    }
}

impl Tap {
    /// Whether anyone watches (build no event otherwise).
    pub fn watched(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// How many watch now.
    pub fn watchers(&self) -> usize {
        self.tx.receiver_count()
    }

    pub fn publish(&self, e: TapEvent) {
        let _ = self.tx.send(Arc::new(e));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<TapEvent>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, decision: &str, ms: f64) -> TapEvent {
        TapEvent {
            ts_ms: 0,
            trace_id: None,
            direction: "outbound".into(),
            source: "planner".into(),
            kind: kind.into(),
            target: "llm/openai".into(),
            subject: "gpt-4o-mini".into(),
            decision: decision.into(),
            reason: None,
            status: 200,
            input_tokens: 1,
            output_tokens: 1,
            cost_usd: None,
            duration_ms: ms,
            upstream_ms: None,
        }
    }

    #[test]
    fn filters_select_by_agent_kind_decision_and_latency() {
        let f = TapFilter::parse(Some("agent=planner&kind=llm&decision=deny&min_ms=5")).unwrap();
        assert!(f.matches(&event("llm", "deny", 5.0)));
        assert!(!f.matches(&event("llm", "deny", 4.9)));
        assert!(!f.matches(&event("llm", "allow", 9.0)));
        assert!(!f.matches(&event("mcp", "deny", 9.0)));
        assert!(TapFilter::parse(None)
            .unwrap()
            .matches(&event("a2a", "none", 0.0)));
        assert!(TapFilter::parse(Some("target=llm%2Fopenai"))
            .unwrap()
            .matches(&event("llm", "allow", 1.0)));
    }

    #[test]
    fn bad_filters_are_named() {
        assert!(TapFilter::parse(Some("min_ms=fast"))
            .unwrap_err()
            .contains("min_ms"));
        assert!(TapFilter::parse(Some("user=bob"))
            .unwrap_err()
            .contains("`user`"));
    }
}
