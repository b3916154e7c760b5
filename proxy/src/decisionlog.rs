//! Decision logs in OPA's shape: one JSON line per policy evaluation with `decision_id`, `path`,
//! `input`, `result`, `timestamp`, `bundles` (the revision that decided), `metrics`
//! (`timer_rego_query_eval_ns`) and `erased` (the masked input paths), so the tools that read
//! OPA's decision logs read these. Configured input paths are removed before writing (tool
//! arguments by default); credentials never enter the input at all. Written off the request's
//! thread through a `LineSink`.

use crate::decide::{now_rfc3339, Evaluation};
use crate::linesink::{Counters, LineSink, Rotation};
use agentmesh_policy::Input;
use serde_json::{json, Value};

pub struct DecisionLog {
    sink: LineSink,
}

/// What one call's evaluations have in common.
pub struct Entry<'a> {
    pub inputs: &'a [Input],
    pub evaluations: &'a [Evaluation],
    /// `data.agentmesh.authz.decision`; logged as OPA does, `agentmesh/authz/decision`.
    pub decision_path: &'a str,
    pub revision: Option<&'a str>,
    /// False when audit mode let a deny through.
    pub enforced: bool,
    pub mask: &'a [String],
}

impl DecisionLog {
    /// `spec` is `stdout`, `off`, or a file path (appended to).
    pub fn open(spec: &str, rotation: Rotation) -> std::io::Result<DecisionLog> {
        Ok(DecisionLog {
            sink: LineSink::open(spec, "decision-log", rotation)?,
        })
    }

    pub fn counters(&self) -> &Counters {
        self.sink.counters()
    }

    pub fn write(&self, e: &Entry) {
        if !self.sink.is_on() {
            return;
        }
        for (input, eval) in e.inputs.iter().zip(e.evaluations) {
            let mut line = serde_json::to_vec(&render(input, eval, e)).unwrap_or_default();
            line.push(b'\n');
            self.sink.send(line);
        }
    }
}

fn render(input: &Input, eval: &Evaluation, e: &Entry) -> Value {
    let mut input = serde_json::to_value(input).unwrap_or(Value::Null);
    let erased = mask(&mut input, e.mask);
    let mut v = json!({
        "decision_id": uuid::Uuid::new_v4().to_string(),
        "path": e.decision_path.trim_start_matches("data.").replace('.', "/"),
        "input": input,
        "timestamp": now_rfc3339(),
        "metrics": {"timer_rego_query_eval_ns": eval.eval_ns},
        "labels": {"app": "agentmesh-proxy", "version": env!("CARGO_PKG_VERSION")},
        "enforced": e.enforced,
    });
    match &eval.result {
        Ok(d) => v["result"] = serde_json::to_value(d).unwrap_or(Value::Null),
        Err(msg) => v["error"] = Value::from(msg.as_str()),
    }
    if let Some(r) = e.revision {
        v["bundles"] = json!({"agentmesh": {"revision": r}});
    }
    if !erased.is_empty() {
        v["erased"] = Value::from(erased);
    }
    v
}

/// Removes each `/input/...` path present in `input`; returns the paths removed.
fn mask(input: &mut Value, paths: &[String]) -> Vec<String> {
    paths
        .iter()
        .filter(|p| agentmesh_policy::engine::remove_input_path(input, p))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linesink::tests::{wait_for, Shared};
    use agentmesh_policy::Decision;

    fn input() -> Input {
        serde_json::from_value(json!({
            "version": 1, "direction": "outbound", "source": {"agent": "planner"},
            "destination": {"kind": "mcp", "name": "files"},
            "request": {"method": "POST", "path": "/mcp/files", "headers": {"x-team": "search"}},
            "mcp": {"method": "tools/call", "tool": "read_file",
                    "arguments": {"path": "/home/alice/secret-plan.txt"}, "batch_size": 1},
            "time": "2026-12-01T00:00:00Z"
        }))
        .unwrap()
    }

    #[test]
    fn entries_have_opa_s_shape_and_masked_inputs() {
        let sink = Shared::default();
        let log = DecisionLog {
            sink: LineSink::with_writer(Some(Box::new(sink.clone())), "test", 16).unwrap(),
        };
        let evals = [Evaluation {
            result: Ok(Decision::deny("no files")),
            eval_ns: 4200,
        }];
        let mask = vec![
            "/input/mcp/arguments".to_string(),
            "/input/request/headers/x-team".to_string(),
            "/input/not/there".to_string(),
        ];
        log.write(&Entry {
            inputs: &[input()],
            evaluations: &evals,
            decision_path: "data.agentmesh.authz.decision",
            revision: Some("sha-1"),
            enforced: true,
            mask: &mask,
        });
        wait_for(&log.counters().written, 1);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains("secret-plan"), "{text}");
        let v: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(v["path"], "agentmesh/authz/decision");
        assert_eq!(v["result"]["allow"], false);
        assert_eq!(v["result"]["reason"], "no files");
        assert_eq!(v["bundles"]["agentmesh"]["revision"], "sha-1");
        assert_eq!(v["metrics"]["timer_rego_query_eval_ns"], 4200);
        assert_eq!(v["input"]["mcp"]["tool"], "read_file");
        assert!(v["input"]["mcp"].get("arguments").is_none());
        assert!(v["input"]["request"]["headers"].get("x-team").is_none());
        assert_eq!(
            v["erased"],
            json!(["/input/mcp/arguments", "/input/request/headers/x-team"])
        );
        assert_eq!(v["decision_id"].as_str().unwrap().len(), 36);
    }

    #[test]
    fn errors_are_logged_without_a_result() {
        let e = Evaluation {
            result: Err("policy.rego:3:1: rule conflicts".into()),
            eval_ns: 10,
        };
        let v = render(
            &input(),
            &e,
            &Entry {
                inputs: &[],
                evaluations: &[],
                decision_path: "data.x.y",
                revision: None,
                enforced: true,
                mask: &[],
            },
        );
        assert!(v.get("result").is_none());
        assert_eq!(v["error"], "policy.rego:3:1: rule conflicts");
        assert!(v.get("bundles").is_none());
        assert_eq!(v["path"], "x/y");
    }
}
