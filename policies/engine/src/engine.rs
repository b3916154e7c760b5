//! A compiled policy: Rego modules and data prepared once per revision, then evaluated for each
//! call by any worker thread, on one of regorus's two engines: the interpreter (the default: the
//! reference semantics, conflicts between rule definitions reported as errors as OPA does) or
//! the bytecode VM (faster; a conflict there leaves the decision undefined, which denies). Either
//! way no call parses or compiles Rego, and evaluation stops at a wall-clock limit, so a runaway
//! rule cannot stall the sidecar.

use crate::rego_value::to_rego;
use crate::{Decision, Input, PolicyError, Sources};
use regorus::rvm::{Program, RegoVM};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

/// Where the decision is read when the config names no other rule.
pub const DEFAULT_DECISION_PATH: &str = "data.agentmesh.authz.decision";

/// Longest one decision may take in the sidecar; past it the evaluation fails (and the call is
/// denied).
pub const EVAL_LIMIT: Duration = Duration::from_millis(50);

/// Which regorus engine evaluates a policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    #[default]
    Interpreter,
    Bytecode,
}

/// One policy revision, ready to decide. Cheap to share: clone the `Arc` it lives in.
#[derive(Debug)]
pub struct Policy {
    /// Unique per compiled revision: the key of each thread's engine (see `on_interpreter`).
    id: u64,
    /// A prepared interpreter engine, cloned once per worker thread.
    template: std::sync::Mutex<regorus::Engine>,
    compiled: regorus::CompiledPolicy,
    /// The bytecode, when the bytecode engine was asked for.
    program: Option<Arc<Program>>,
    data: regorus::Value,
    /// Decisions by input document (without `time`), when the policy opted in.
    cache: Option<moka::sync::Cache<String, Decision>>,
    /// Input paths (`/input/budget`) left out of the cache key.
    cache_ignore: Vec<String>,
    decision_path: String,
    revision: String,
    modules: Vec<String>,
}

impl Policy {
    /// Parses and compiles the sources for the rule at `decision_path`. Errors name the file,
    /// line and column, as regorus reports them.
    pub fn compile(
        sources: &Sources,
        decision_path: &str,
        kind: EngineKind,
    ) -> Result<Policy, PolicyError> {
        let mut engine = engine_with(sources, EVAL_LIMIT)?;
        let rule: regorus::Rc<str> = decision_path.into();
        let compiled =
            engine
                .compile_with_entrypoint(&rule)
                .map_err(|e| PolicyError::DecisionPath {
                    path: decision_path.to_string(),
                    message: e.to_string(),
                })?;
        let program = match kind {
            EngineKind::Interpreter => None,
            EngineKind::Bytecode => Some(
                regorus::languages::rego::compiler::Compiler::compile_from_policy(
                    &compiled,
                    &[decision_path],
                )
                .map_err(|e| {
                    PolicyError::Compile(format!(
                        "the bytecode engine does not take this policy ({e}); use `engine: interpreter`"
                    ))
                })?,
            ),
        };
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(Policy {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            template: std::sync::Mutex::new(engine),
            compiled,
            program,
            data: data_value(sources)?,
            cache: None,
            cache_ignore: Vec::new(),
            decision_path: decision_path.to_string(),
            revision: sources.revision.clone(),
            modules: sources.modules.iter().map(|(p, _)| p.clone()).collect(),
        })
    }

    pub fn revision(&self) -> &str {
        &self.revision
    }

    pub fn decision_path(&self) -> &str {
        &self.decision_path
    }

    /// The files this revision was compiled from.
    pub fn modules(&self) -> &[String] {
        &self.modules
    }

    /// Turns on the decision cache: a decision is reused for an identical input document for
    /// `ttl`. With it, `input.time` is left out of the document (it would make every input
    /// unique), so a cached policy must not read it. `ignore` lists input paths
    /// (`/input/budget`) left out of the key only: a decision is reused while they change.
    /// Evaluation errors are never cached.
    pub fn with_cache(mut self, ttl: Duration, max_entries: u64, ignore: &[String]) -> Self {
        self.cache_ignore = ignore.to_vec();
        self.cache = Some(
            moka::sync::Cache::builder()
                .time_to_live(ttl)
                .max_capacity(max_entries)
                .build(),
        );
        self
    }

    /// Evaluates the decision rule on `input`. An undefined decision is a deny.
    pub fn decide(&self, input: &Input) -> Result<Decision, PolicyError> {
        let Some(cache) = &self.cache else {
            let value = to_rego(input).map_err(|e| PolicyError::Eval(format!("input: {e}")))?;
            return self.decide_value(value);
        };
        let json = without_time(input)?;
        let key = if self.cache_ignore.is_empty() {
            json.clone()
        } else {
            let mut v: serde_json::Value =
                serde_json::from_str(&json).map_err(|e| PolicyError::Eval(e.to_string()))?;
            for path in &self.cache_ignore {
                remove_input_path(&mut v, path);
            }
            v.to_string()
        };
        if let Some(d) = cache.get(&key) {
            return Ok(d);
        }
        let d = self.decide_json(&json)?;
        cache.insert(key, d.clone());
        Ok(d)
    }

    /// Decisions held in the cache, if it is on.
    pub fn cache_entries(&self) -> Option<u64> {
        self.cache.as_ref().map(|c| {
            // moka counts lazily; settle pending inserts first (admin path, not per call).
            c.run_pending_tasks();
            c.entry_count()
        })
    }

    /// Evaluates the decision rule on an input given as JSON text (the cached path's key).
    fn decide_json(&self, input_json: &str) -> Result<Decision, PolicyError> {
        let input = regorus::Value::from_json_str(input_json)
            .map_err(|e| PolicyError::Eval(format!("input: {e}")))?;
        self.decide_value(input)
    }

    fn decide_value(&self, input: regorus::Value) -> Result<Decision, PolicyError> {
        let value = match &self.program {
            Some(program) => self.run_vm(program, input),
            None => self.on_interpreter(input),
        }
        .map_err(|e| PolicyError::Eval(one_line(&e)))?;
        to_decision(&value, &self.decision_path)
    }
}

/// The input document as JSON without `time`: the cache key, and what a cached policy
/// evaluates. `time` is the document's last field, so it is the serialization's tail.
fn without_time(input: &Input) -> Result<String, PolicyError> {
    let mut json = serde_json::to_string(input).map_err(|e| PolicyError::Eval(e.to_string()))?;
    match json.rfind(",\"time\":") {
        Some(at) => {
            json.truncate(at);
            json.push('}');
            Ok(json)
        }
        None => Err(PolicyError::Eval("input without `time`".into())),
    }
}

/// Removes `/input/...` from an input document; whether it was there.
pub fn remove_input_path(input: &mut serde_json::Value, path: &str) -> bool {
    let Some((parent, key)) = path
        .strip_prefix("/input")
        .and_then(|rest| rest.rsplit_once('/'))
    else {
        return false;
    };
    input
        .pointer_mut(parent)
        .and_then(serde_json::Value::as_object_mut)
        .and_then(|o| o.remove(key))
        .is_some()
}

/// Reads the decision rule's value; undefined is a deny.
fn to_decision(value: &regorus::Value, path: &str) -> Result<Decision, PolicyError> {
    if *value == regorus::Value::Undefined {
        return Ok(Decision::deny(format!(
            "no rule of `{path}` decided this call"
        )));
    }
    let v = serde_json::to_value(value).map_err(|e| PolicyError::Eval(e.to_string()))?;
    Decision::from_json(&v)
}

thread_local! {
    /// Each worker thread's prepared interpreter engines, by policy id (the newest few).
    static ENGINES: std::cell::RefCell<Vec<(u64, regorus::Engine)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Policies whose engines a thread keeps (the running one and the one just replaced).
const ENGINES_PER_THREAD: usize = 2;

impl Policy {
    /// Evaluates on this thread's clone of the prepared engine: no per-call engine setup.
    fn on_interpreter(&self, input: regorus::Value) -> Result<regorus::Value, String> {
        ENGINES.with(|cell| {
            let mut engines = cell.borrow_mut();
            let i = match engines.iter().position(|(id, _)| *id == self.id) {
                Some(i) => i,
                None => {
                    let e = self
                        .template
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    if engines.len() >= ENGINES_PER_THREAD {
                        engines.remove(0);
                    }
                    engines.push((self.id, e));
                    engines.len() - 1
                }
            };
            let engine = &mut engines[i].1;
            engine.set_input(input);
            engine
                .eval_rule(self.decision_path.clone())
                .map_err(|e| e.to_string())
        })
    }

    fn run_vm(
        &self,
        program: &Arc<Program>,
        input: regorus::Value,
    ) -> Result<regorus::Value, String> {
        let mut vm = RegoVM::new_with_policy(self.compiled.clone());
        vm.load_program(program.clone());
        vm.set_execution_timer_config(Some(timer(EVAL_LIMIT)));
        // The VM's own default stops after 25,000 instructions, which a policy looping over a
        // few thousand data entries exceeds; the time limit is the bound that matters here.
        vm.set_max_instructions(usize::MAX);
        vm.set_data(self.data.clone()).map_err(|e| e.to_string())?;
        vm.set_input(input);
        vm.execute().map_err(|e| e.to_string())
    }

    pub fn engine(&self) -> EngineKind {
        match self.program {
            Some(_) => EngineKind::Bytecode,
            None => EngineKind::Interpreter,
        }
    }
}

fn timer(limit: Duration) -> regorus::utils::limits::ExecutionTimerConfig {
    regorus::utils::limits::ExecutionTimerConfig {
        limit,
        check_interval: NonZeroU32::new(1000).expect("non-zero literal"),
    }
}

fn data_value(sources: &Sources) -> Result<regorus::Value, PolicyError> {
    regorus::Value::from_json_str(&sources.data.to_string()).map_err(|e| PolicyError::Data {
        path: "data".into(),
        message: e.to_string(),
    })
}

/// A regorus engine holding the sources (Rego v1 syntax, as OPA 1.x), with an evaluation time
/// limit.
pub(crate) fn engine_with(
    sources: &Sources,
    limit: Duration,
) -> Result<regorus::Engine, PolicyError> {
    let mut engine = regorus::Engine::new();
    engine.set_execution_timer_config(timer(limit));
    engine
        .add_data(data_value(sources)?)
        .map_err(|e| PolicyError::Data {
            path: "data".into(),
            message: e.to_string(),
        })?;
    for (path, text) in &sources.modules {
        engine
            .add_policy(path.clone(), text.clone())
            .map_err(|e| PolicyError::Compile(one_line(&e.to_string())))?;
    }
    Ok(engine)
}

/// regorus reports `--> file:line:col`, a source excerpt, then `error: message`; logs and
/// `/config_dump` want `file:line:col: message` on one line.
pub(crate) fn one_line(report: &str) -> String {
    let at = report
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("--> "));
    let message = report
        .lines()
        .find_map(|l| l.strip_prefix("error: "))
        .unwrap_or(report.trim());
    match at {
        Some(at) => format!("{}: {message}", at.trim()),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::*;

    fn sources(rego: &str) -> Sources {
        Sources {
            modules: vec![("policy.rego".into(), rego.into())],
            data: serde_json::json!({"models": {"planner": ["gpt-4o-mini"]}}),
            revision: "test".into(),
        }
    }

    fn llm_input(agent: &str, model: &str) -> Input {
        Input {
            version: INPUT_VERSION,
            direction: "outbound".into(),
            source: Source {
                agent: agent.into(),
                spiffe_id: None,
            },
            user: None,
            destination: Destination {
                kind: "llm".into(),
                name: "openai".into(),
            },
            request: Request {
                method: "POST".into(),
                path: "/llm/openai/v1/chat/completions".into(),
                headers: Default::default(),
            },
            llm: Some(Llm {
                provider: "openai".into(),
                operation: "chat_completions".into(),
                model: Some(model.into()),
                stream: false,
                max_tokens: None,
            }),
            mcp: None,
            a2a: None,
            budget: None,
            time: "2026-12-01T00:00:00Z".into(),
        }
    }

    const MODELS: &str = r#"
package agentmesh.authz

default decision := {"allow": false, "reason": "model not allowed for this agent"}

decision := {"allow": true, "headers": {"x-policy": "models"}} if {
    input.llm.model in data.models[input.source.agent]
}
"#;

    #[test]
    fn compiled_policy_decides_from_input_and_data() {
        let p = Policy::compile(
            &sources(MODELS),
            DEFAULT_DECISION_PATH,
            EngineKind::Interpreter,
        )
        .unwrap();
        let allow = p.decide(&llm_input("planner", "gpt-4o-mini")).unwrap();
        assert!(allow.allow);
        assert_eq!(allow.headers, vec![("x-policy".into(), "models".into())]);
        let deny = p.decide(&llm_input("planner", "gpt-5")).unwrap();
        assert!(!deny.allow);
        assert_eq!(
            deny.reason.as_deref(),
            Some("model not allowed for this agent")
        );
        assert!(!p.decide(&llm_input("writer", "gpt-4o-mini")).unwrap().allow);
    }

    #[test]
    fn an_undefined_decision_denies() {
        let p = Policy::compile(
            &sources("package agentmesh.authz\ndecision if input.never\n"),
            DEFAULT_DECISION_PATH,
            EngineKind::Interpreter,
        )
        .unwrap();
        let d = p.decide(&llm_input("planner", "gpt-4o-mini")).unwrap();
        assert!(!d.allow);
        assert!(d.reason.unwrap().contains("no rule"));
    }

    #[test]
    fn parse_errors_name_file_line_and_column() {
        let err = Policy::compile(
            &sources("package agentmesh.authz\n\ndecision := {\"allow\": true\n"),
            DEFAULT_DECISION_PATH,
            EngineKind::Interpreter,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(err, "policy.rego:4:1: expecting `}` while parsing object");
    }

    #[test]
    fn a_missing_decision_rule_is_refused_at_load() {
        let err = Policy::compile(
            &sources(MODELS),
            "data.agentmesh.authz.allow",
            EngineKind::Interpreter,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("data.agentmesh.authz.allow"), "{err}");
    }

    #[test]
    fn runtime_errors_are_evaluation_errors() {
        // Two complete definitions with different values: a conflict only evaluation finds.
        let p = Policy::compile(
            &sources(
                "package agentmesh.authz\ndecision := true if input.version == 1\ndecision := false if input.version == 1\n",
            ),
            DEFAULT_DECISION_PATH,
            EngineKind::Interpreter,
        )
        .unwrap();
        assert!(matches!(
            p.decide(&llm_input("planner", "x")),
            Err(PolicyError::Eval(_))
        ));
    }

    #[test]
    fn the_cache_reuses_decisions_for_the_same_input_at_any_time() {
        let key = without_time(&llm_input("planner", "x")).unwrap();
        assert!(!key.contains("time") && key.ends_with("}}"), "{key}");
        let v: serde_json::Value = serde_json::from_str(&key).unwrap();
        assert_eq!(v["llm"]["model"], "x");

        // A policy whose answer we can change under the cache: it reads data we swap.
        let p = Policy::compile(
            &sources(MODELS),
            DEFAULT_DECISION_PATH,
            EngineKind::Interpreter,
        )
        .unwrap()
        .with_cache(Duration::from_secs(60), 100, &[]);
        let mut a = llm_input("planner", "gpt-4o-mini");
        assert!(p.decide(&a).unwrap().allow);
        a.time = "2030-01-01T00:00:00Z".into();
        assert!(p.decide(&a).unwrap().allow);
        p.cache.as_ref().unwrap().run_pending_tasks();
        assert_eq!(p.cache_entries(), Some(1), "time is not part of the key");
        assert!(!p.decide(&llm_input("planner", "gpt-5")).unwrap().allow);
        p.cache.as_ref().unwrap().run_pending_tasks();
        assert_eq!(p.cache_entries(), Some(2));
        // Served from the cache: a poisoned entry is what comes back.
        p.cache
            .as_ref()
            .unwrap()
            .insert(without_time(&a).unwrap(), Decision::deny("cached"));
        assert_eq!(p.decide(&a).unwrap().reason.as_deref(), Some("cached"));

        // Ignored paths do not make a new key: the budget changes, the decision is reused.
        let p = Policy::compile(
            &sources(MODELS),
            DEFAULT_DECISION_PATH,
            EngineKind::Interpreter,
        )
        .unwrap()
        .with_cache(Duration::from_secs(60), 100, &["/input/budget".into()]);
        for spent in [1.0, 2.0, 3.0] {
            let mut i = llm_input("planner", "gpt-4o-mini");
            i.budget = Some(crate::input::Budget {
                spent_usd: spent,
                window: "24h".into(),
            });
            assert!(p.decide(&i).unwrap().allow);
        }
        p.cache.as_ref().unwrap().run_pending_tasks();
        assert_eq!(p.cache_entries(), Some(1));
    }

    #[test]
    fn a_runaway_policy_is_stopped_at_the_time_limit() {
        let rego = "package agentmesh.authz\nimport rego.v1\ndecision if {\n  n := count([1 | some i in numbers.range(1, 4000); some j in numbers.range(1, 4000)])\n  n > 0\n}\n";
        for kind in [EngineKind::Interpreter, EngineKind::Bytecode] {
            let p = Policy::compile(&sources(rego), DEFAULT_DECISION_PATH, kind).unwrap();
            // 16 million iterations complete without error unless the time limit stops them.
            let r = p.decide(&llm_input("planner", "x"));
            assert!(
                matches!(&r, Err(PolicyError::Eval(m)) if m.contains("time limit")),
                "{kind:?}: {r:?}"
            );
        }
    }

    #[test]
    fn a_policy_is_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Policy>();
    }
}
