//! `opa test` for agentmesh: every rule whose name starts with `test_` is a test; it passes when
//! it evaluates to `true`. Also the rule listing `agentmesh policy eval` uses to show which
//! rules of the decision's package had a value for an input.

use crate::engine::engine_with;
use crate::{PolicyError, Sources};
use regorus::unstable::{Parser, Rule, RuleHead};
use std::time::{Duration, Instant};

/// Longest one test may run: generous, since tests also run on unoptimised builds.
const TEST_LIMIT: Duration = Duration::from_secs(10);

/// One test's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct TestResult {
    /// Full rule path, `data.agentmesh.models_test.test_allows_listed_model`.
    pub name: String,
    /// The file that defines it.
    pub file: String,
    pub outcome: Outcome,
    pub duration: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Pass,
    /// Evaluated to something other than `true` (usually undefined: a condition failed).
    Fail,
    /// Evaluation raised an error.
    Error(String),
}

/// A non-function rule: its package path, its name, the file it is in.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleRef {
    pub package: String,
    pub name: String,
    pub file: String,
}

impl RuleRef {
    pub fn path(&self) -> String {
        format!("{}.{}", self.package, self.name)
    }
}

/// Every non-function rule of the sources (each name once per package), in source order.
pub fn rules(sources: &Sources) -> Result<Vec<RuleRef>, PolicyError> {
    let mut engine = engine_with(sources, TEST_LIMIT)?;
    let mut out: Vec<RuleRef> = Vec::new();
    for module in engine.get_modules() {
        let package = path_of(&module.package.refr)?;
        for rule in &module.policy {
            let (refr, span) = match rule.as_ref() {
                Rule::Spec {
                    head: RuleHead::Compr { refr, span, .. } | RuleHead::Set { refr, span, .. },
                    ..
                } => (refr, span),
                // Functions take arguments: not tests, and without a value of their own.
                Rule::Spec {
                    head: RuleHead::Func { .. },
                    ..
                } => continue,
                Rule::Default { refr, args, .. } if args.is_empty() => (refr, refr.span()),
                Rule::Default { .. } => continue,
            };
            // `a.b.c := ...` defines `c` under `a.b`; the first component names the rule.
            let Some(name) = Parser::get_path_ref_components(refr)
                .map_err(|e| PolicyError::Compile(e.to_string()))?
                .first()
                .map(|s| s.text().to_string())
            else {
                continue;
            };
            let r = RuleRef {
                package: package.clone(),
                name,
                file: span.source.get_path().clone(),
            };
            if !out
                .iter()
                .any(|x| x.package == r.package && x.name == r.name)
            {
                out.push(r);
            }
        }
    }
    Ok(out)
}

fn path_of(refr: &regorus::unstable::Ref<regorus::unstable::Expr>) -> Result<String, PolicyError> {
    let parts =
        Parser::get_path_ref_components(refr).map_err(|e| PolicyError::Compile(e.to_string()))?;
    let mut path = String::from("data");
    for p in parts {
        path.push('.');
        path.push_str(p.text());
    }
    Ok(path)
}

/// Runs every `test_` rule whose full path contains `filter` (all when `None`).
pub fn run_tests(sources: &Sources, filter: Option<&str>) -> Result<Vec<TestResult>, PolicyError> {
    let mut engine = engine_with(sources, TEST_LIMIT)?;
    let mut results = Vec::new();
    for r in rules(sources)? {
        if !r.name.starts_with("test_") || filter.is_some_and(|f| !r.path().contains(f)) {
            continue;
        }
        let start = Instant::now();
        let outcome = match engine.eval_rule(r.path()) {
            Ok(v) if v == regorus::Value::from(true) => Outcome::Pass,
            Ok(_) => Outcome::Fail,
            Err(e) => Outcome::Error(crate::engine::one_line(&e.to_string())),
        };
        results.push(TestResult {
            name: r.path(),
            file: r.file,
            outcome,
            duration: start.elapsed(),
        });
    }
    Ok(results)
}

/// Evaluates every non-function rule of `package` on `input_json`: what `policy eval` shows as
/// the rules that fired (`None` for undefined).
pub fn eval_package(
    sources: &Sources,
    package: &str,
    input_json: &str,
) -> Result<Vec<(String, Option<serde_json::Value>)>, PolicyError> {
    let mut engine = engine_with(sources, TEST_LIMIT)?;
    engine
        .set_input_json(input_json)
        .map_err(|e| PolicyError::Eval(format!("input: {e}")))?;
    let mut out = Vec::new();
    for r in rules(sources)?.into_iter().filter(|r| r.package == package) {
        if r.name.starts_with("test_") {
            continue;
        }
        let v = engine
            .eval_rule(r.path())
            .map_err(|e| PolicyError::Eval(crate::engine::one_line(&e.to_string())))?;
        let v = if v == regorus::Value::Undefined {
            None
        } else {
            let json = v
                .to_json_str()
                .map_err(|e| PolicyError::Eval(e.to_string()))?;
            Some(serde_json::from_str(&json).map_err(|e| PolicyError::Eval(e.to_string()))?)
        };
        out.push((r.name, v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Sources {
        Sources {
            modules: vec![
                (
                    "authz.rego".into(),
                    "package agentmesh.authz\nimport rego.v1\ndefault decision := false\ndecision if input.ok\nhelper(x) := x\n".into(),
                ),
                (
                    "authz_test.rego".into(),
                    r#"package agentmesh.authz_test
import rego.v1
import data.agentmesh.authz
test_ok if authz.decision with input as {"ok": true}
test_not_ok if not authz.decision with input as {"ok": false}
test_wrong if authz.decision with input as {"ok": false}
test_broken if 1 / 0
"#
                    .into(),
                ),
            ],
            data: serde_json::json!({}),
            revision: "t".into(),
        }
    }

    #[test]
    fn test_rules_pass_fail_and_error() {
        let results = run_tests(&sources(), None).unwrap();
        let outcome = |n: &str| {
            results
                .iter()
                .find(|r| r.name == format!("data.agentmesh.authz_test.{n}"))
                .map(|r| r.outcome.clone())
                .unwrap()
        };
        assert_eq!(results.len(), 4);
        assert_eq!(outcome("test_ok"), Outcome::Pass);
        assert_eq!(outcome("test_not_ok"), Outcome::Pass);
        assert_eq!(outcome("test_wrong"), Outcome::Fail);
        assert!(matches!(
            outcome("test_broken"),
            Outcome::Error(_) | Outcome::Fail
        ));
        assert_eq!(results[0].file, "authz_test.rego");
        assert_eq!(run_tests(&sources(), Some("not_ok")).unwrap().len(), 1);
    }

    #[test]
    fn package_rules_show_which_had_a_value() {
        let v = eval_package(&sources(), "data.agentmesh.authz", r#"{"ok": true}"#).unwrap();
        assert_eq!(
            v,
            vec![("decision".to_string(), Some(serde_json::json!(true)))]
        );
    }
}
