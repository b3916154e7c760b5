//! Phase 6, observe (metrics part): per-call counters and histograms under the names of design
//! §7, served on the admin port as `/metrics` in the Prometheus text format (0.0.4), which
//! `promtool check metrics` and every Prometheus-compatible scraper read.
//!
//! Label sets stay bounded: labels come from the config (source agent, destination), from closed
//! sets (kind, decision, status, token type), or, for the model an agent names in its request,
//! through a guard that admits the first `MAX_MODELS` distinct names and folds the rest into
//! `other`. No user id, tool argument or prompt ever becomes a label.

use crate::decide::Outcome;
use crate::record::{CallRecord, LlmOperation, PolicyResult};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Distinct model names kept as label values; later ones are counted as `other`.
pub const MAX_MODELS: usize = 100;
/// Longest model name kept as a label value.
const MAX_LABEL_LEN: usize = 96;

/// `agentmesh_request_duration_seconds`: a call through the sidecar, 1 ms to 2 min.
const CALL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// `gen_ai_client_operation_duration_seconds`: the GenAI semantic conventions' advice.
const GENAI_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// `gen_ai_client_token_usage`: the GenAI semantic conventions' advice.
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];
/// `agentmesh_policy_eval_duration_seconds`: 1 µs to 50 ms (the evaluation limit).
const EVAL_BUCKETS: &[f64] = &[
    0.000001, 0.0000025, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001,
    0.0025, 0.005, 0.01, 0.025, 0.05,
];

/// One value per series: a counter (integer or USD) or a histogram.
trait Series: Send {
    fn new(buckets: &'static [f64]) -> Self;
    /// Writes this series' sample lines; `labels` is the rendered `k="v",...` list.
    fn render(&self, out: &mut String, name: &str, labels: &str);
}

struct Counter(f64);

impl Series for Counter {
    fn new(_: &'static [f64]) -> Self {
        Counter(0.0)
    }
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let _ = writeln!(out, "{name}{{{labels}}} {}", self.0);
    }
}

struct Histogram {
    buckets: &'static [f64],
    /// Per bucket (not cumulative); the last one is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
}

impl Series for Histogram {
    fn new(buckets: &'static [f64]) -> Self {
        Histogram {
            buckets,
            counts: vec![0; buckets.len() + 1],
            sum: 0.0,
        }
    }
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, n) in self.counts.iter().enumerate() {
            cumulative += n;
            match self.buckets.get(i) {
                Some(le) => {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
                    );
                }
            }
        }
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        let i = self.buckets.partition_point(|le| *le < v);
        self.counts[i] += 1;
        self.sum += v;
    }
}

/// A metric family: its series by label values, in the order of `labels`.
struct Family<S> {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    labels: &'static [&'static str],
    buckets: &'static [f64],
    /// By the label values joined with U+001F: the values and the series.
    series: Mutex<HashMap<String, (Vec<String>, S)>>,
}

thread_local! {
    static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl<S: Series> Family<S> {
    fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) -> Self {
        Family {
            name,
            help,
            kind: if buckets.is_empty() {
                "counter"
            } else {
                "histogram"
            },
            labels,
            buckets,
            series: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `f` on the series of these label values, made on first use.
    fn with(&self, values: &[&str], f: impl FnOnce(&mut S)) {
        debug_assert_eq!(values.len(), self.labels.len(), "{}", self.name);
        KEY.with(|key| {
            // The lookup key is built in a per-thread buffer: no allocation for a known series.
            let mut key = key.borrow_mut();
            key.clear();
            for v in values {
                key.push_str(v);
                key.push('\u{1f}');
            }
            let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
            match series.get_mut(key.as_str()) {
                Some((_, s)) => f(s),
                None => {
                    let mut s = S::new(self.buckets);
                    f(&mut s);
                    let values = values.iter().map(|v| v.to_string()).collect();
                    series.insert(key.clone(), (values, s));
                }
            }
        })
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<&(Vec<String>, S)> = series.values().collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        for (values, s) in all {
            let labels = self
                .labels
                .iter()
                .zip(values)
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect::<Vec<_>>()
                .join(",");
            s.render(out, self.name, &labels);
        }
    }
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Admits the first `MAX_MODELS` distinct model names as label values.
#[derive(Default)]
struct ModelGuard(Mutex<HashSet<String>>);

impl ModelGuard {
    fn admit<'a>(&self, model: &'a str) -> &'a str {
        if model.is_empty() || model.len() > MAX_LABEL_LEN {
            return if model.is_empty() { "" } else { "other" };
        }
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(model) {
            return model;
        }
        if seen.len() < MAX_MODELS {
            seen.insert(model.to_string());
            return model;
        }
        "other"
    }
}

/// Every metric a sidecar keeps.
pub struct Metrics {
    requests: Family<Counter>,
    request_duration: Family<Histogram>,
    decisions: Family<Counter>,
    policy_errors: Family<Counter>,
    policy_eval: Family<Histogram>,
    token_usage: Family<Histogram>,
    operation_duration: Family<Histogram>,
    cost: Family<Counter>,
    tls_handshakes: Family<Counter>,
    models: ModelGuard,
}

impl Default for Metrics {
    fn default() -> Self {
        const CALL: &[&str] = &[
            "source",
            "destination",
            "kind",
            "model",
            "decision",
            "status",
        ];
        const DECISION: &[&str] = &["source", "destination", "kind", "decision"];
        const GENAI: &[&str] = &[
            "source",
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
        ];
        const TOKENS: &[&str] = &[
            "source",
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
            "gen_ai_token_type",
        ];
        Metrics {
            requests: Family::new(
                "agentmesh_requests_total",
                "Calls through the sidecar, by source agent, destination, kind, model, policy decision and HTTP status.",
                CALL,
                &[],
            ),
            request_duration: Family::new(
                "agentmesh_request_duration_seconds",
                "Time from a call's arrival at the sidecar to the end of its response.",
                &["source", "destination", "kind", "decision"],
                CALL_BUCKETS,
            ),
            decisions: Family::new(
                "agentmesh_policy_decisions_total",
                "Policy decisions: allow, deny, or audit_deny (a deny that audit mode let through).",
                DECISION,
                &[],
            ),
            policy_errors: Family::new(
                "agentmesh_policy_errors_total",
                "Policy evaluations that failed (the call was denied, or let through where fail_open is set).",
                &["source", "destination", "kind"],
                &[],
            ),
            policy_eval: Family::new(
                "agentmesh_policy_eval_duration_seconds",
                "Time to evaluate the policy on one input document.",
                &[],
                EVAL_BUCKETS,
            ),
            token_usage: Family::new(
                "gen_ai_client_token_usage",
                "Tokens per LLM call, read from the provider's response (OpenTelemetry GenAI gen_ai.client.token.usage).",
                TOKENS,
                TOKEN_BUCKETS,
            ),
            operation_duration: Family::new(
                "gen_ai_client_operation_duration_seconds",
                "Duration of LLM calls (OpenTelemetry GenAI gen_ai.client.operation.duration).",
                GENAI,
                GENAI_DURATION_BUCKETS,
            ),
            cost: Family::new(
                "agentmesh_llm_cost_usd_total",
                "USD spent on LLM calls, priced from the response's usage and the price table.",
                &["source", "gen_ai_provider_name", "gen_ai_request_model"],
                &[],
            ),
            tls_handshakes: Family::new(
                "agentmesh_inbound_tls_handshakes_total",
                "Completed mTLS handshakes on the inbound listener: full, or resumed (an earlier session, no certificates exchanged).",
                &["handshake"],
                &[],
            ),
            models: ModelGuard::default(),
        }
    }
}

/// The `decision` label of a call: what policy said, or `none` for calls refused before policy
/// (unknown names, malformed bodies).
pub fn decision_label(rec: &CallRecord) -> &'static str {
    rec.decision.as_ref().map_or("none", PolicyResult::label)
}

/// The GenAI `gen_ai.operation.name` of an LLM API operation.
pub fn operation_name(op: LlmOperation) -> &'static str {
    match op {
        LlmOperation::ChatCompletions | LlmOperation::Messages | LlmOperation::Responses => "chat",
        LlmOperation::Embeddings => "embeddings",
        LlmOperation::Models => "models",
        LlmOperation::Other => "other",
    }
}

impl Metrics {
    /// Counts one policy decision (each evaluation's duration, the outcome, any error).
    pub fn decision(&self, source: &str, rec: &CallRecord, out: &Outcome) {
        for e in &out.evaluations {
            self.policy_eval
                .with(&[], |h| h.observe(e.eval_ns as f64 / 1e9));
        }
        let kind = rec.kind.as_str();
        self.decisions
            .with(&[source, &rec.target, kind, out.label()], |c| c.0 += 1.0);
        if out.error.is_some() {
            self.policy_errors
                .with(&[source, &rec.target, kind], |c| c.0 += 1.0);
        }
    }

    /// Counts one completed inbound mTLS handshake.
    pub fn tls_handshake(&self, resumed: bool) {
        let kind = if resumed { "resumed" } else { "full" };
        self.tls_handshakes.with(&[kind], |c| c.0 += 1.0);
    }

    /// Counts one finished call.
    pub fn call(&self, source: &str, rec: &CallRecord, total: Duration) {
        let kind = rec.kind.as_str();
        let decision = decision_label(rec);
        let model = self.models.admit(
            rec.llm
                .as_ref()
                .and_then(|l| l.model.as_deref())
                .unwrap_or(""),
        );
        let status = rec.status.to_string();
        self.requests.with(
            &[source, &rec.target, kind, model, decision, &status],
            |c| c.0 += 1.0,
        );
        let secs = total.as_secs_f64();
        self.request_duration
            .with(&[source, &rec.target, kind, decision], |h| h.observe(secs));
        // GenAI figures only for calls that went to the provider (allowed, or let through in
        // audit mode).
        let forwarded = rec
            .decision
            .as_ref()
            .is_some_and(|d| d.allow || !d.enforced);
        let Some(llm) = rec.llm.as_ref().filter(|_| forwarded) else {
            return;
        };
        let op = operation_name(llm.operation);
        let genai = [source, op, llm.provider.as_str(), model];
        self.operation_duration.with(&genai, |h| h.observe(secs));
        for (kind, n) in [
            ("input", llm.usage.input_tokens),
            ("output", llm.usage.output_tokens),
        ] {
            if n > 0 {
                let labels = [source, op, llm.provider.as_str(), model, kind];
                self.token_usage.with(&labels, |h| h.observe(n as f64));
            }
        }
        if let Some(usd) = llm.cost_usd.filter(|c| *c > 0.0) {
            self.cost
                .with(&[source, llm.provider.as_str(), model], |c| c.0 += usd);
        }
    }

    /// The text exposition of every family.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        self.requests.render(&mut out);
        self.request_duration.render(&mut out);
        self.decisions.render(&mut out);
        self.policy_errors.render(&mut out);
        self.policy_eval.render(&mut out);
        self.token_usage.render(&mut out);
        self.operation_duration.render(&mut out);
        self.cost.render(&mut out);
        self.tls_handshakes.render(&mut out);
        out
    }
}

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CallKind;
    use crate::record::{Direction, LlmCall, PolicyResult, Usage};

    fn llm_call(model: &str, input: u64, output: u64, usd: f64) -> CallRecord {
        let mut r = CallRecord::new(
            Direction::Outbound,
            CallKind::Llm,
            "llm/openai",
            "POST",
            "/llm/openai/v1/chat/completions",
        );
        r.llm = Some(LlmCall {
            provider: "openai".into(),
            api: crate::config::LlmApi::Openai,
            operation: LlmOperation::ChatCompletions,
            model: Some(model.into()),
            stream: false,
            max_tokens: None,
            response_model: None,
            usage: Usage {
                input_tokens: input,
                output_tokens: output,
                cached_input_tokens: 0,
            },
            cost_usd: Some(usd),
        });
        r.decision = Some(PolicyResult {
            allow: true,
            enforced: true,
            reason: None,
            eval_ms: 0.01,
        });
        r.status = 200;
        r
    }

    #[test]
    fn counters_histograms_and_cost_add_up() {
        let m = Metrics::default();
        m.call(
            "planner",
            &llm_call("gpt-4o-mini", 100, 20, 0.25),
            Duration::from_millis(30),
        );
        m.call(
            "planner",
            &llm_call("gpt-4o-mini", 3000, 5, 0.5),
            Duration::from_millis(700),
        );
        let text = m.render();
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
                .to_string()
        };
        assert_eq!(
            line("agentmesh_requests_total{"),
            r#"agentmesh_requests_total{source="planner",destination="llm/openai",kind="llm",model="gpt-4o-mini",decision="allow",status="200"} 2"#
        );
        assert!(line("agentmesh_llm_cost_usd_total{").ends_with(" 0.75"));
        // 30 ms and 700 ms: one in le=0.05, both in le=1.
        assert!(line(r#"agentmesh_request_duration_seconds_bucket{source="planner",destination="llm/openai",kind="llm",decision="allow",le="0.05"}"#).ends_with(" 1"));
        assert!(line(r#"agentmesh_request_duration_seconds_bucket{source="planner",destination="llm/openai",kind="llm",decision="allow",le="1"}"#).ends_with(" 2"));
        assert!(line("agentmesh_request_duration_seconds_count{").ends_with(" 2"));
        // Tokens: input 100 (le=256) and 3000 (le=4096).
        let input = r#"gen_ai_client_token_usage_bucket{source="planner",gen_ai_operation_name="chat",gen_ai_provider_name="openai",gen_ai_request_model="gpt-4o-mini",gen_ai_token_type="input""#;
        assert!(line(&format!("{input},le=\"256\"}}")).ends_with(" 1"));
        assert!(line(&format!("{input},le=\"4096\"}}")).ends_with(" 2"));
        assert!(line("gen_ai_client_token_usage_sum{source=\"planner\",gen_ai_operation_name=\"chat\",gen_ai_provider_name=\"openai\",gen_ai_request_model=\"gpt-4o-mini\",gen_ai_token_type=\"input\"}").ends_with(" 3100"));
        assert!(text.contains("# TYPE gen_ai_client_operation_duration_seconds histogram"));
    }

    #[test]
    fn model_labels_are_bounded() {
        let m = Metrics::default();
        for i in 0..MAX_MODELS + 20 {
            m.call(
                "a",
                &llm_call(&format!("m{i}"), 1, 1, 0.0),
                Duration::from_millis(1),
            );
        }
        m.call(
            "a",
            &llm_call(&"x".repeat(500), 1, 1, 0.0),
            Duration::from_millis(1),
        );
        let text = m.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("agentmesh_requests_total{"))
            .count();
        assert_eq!(series, MAX_MODELS + 1, "{MAX_MODELS} models and `other`");
        assert!(text.contains(r#"model="other",decision="allow",status="200"} 21"#));
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::default();
        m.call(
            "a",
            &llm_call("we\"ird\\mo\ndel", 1, 1, 0.0),
            Duration::from_millis(1),
        );
        assert!(m.render().contains(r#"model="we\"ird\\mo\ndel""#));
    }
}
