//! A compiled policy: Rego modules and data prepared once per revision, then evaluated for each
//! call by any worker thread, on one of regorus's two engines: the interpreter (the default: the
//! reference semantics, conflicts between rule definitions reported as errors as OPA does) or
//! the bytecode VM (faster; a conflict there leaves the decision undefined, which denies). Either
//! way no call parses or compiles Rego, and evaluation stops at a wall-clock limit, so a runaway
//! rule cannot stall the sidecar.

use crate::reads::{pointer, Reads};
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

/// Whether decisions are reused (docs/policy.md, "The decision cache").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// On where reusing a decision is exact (see `Policy::with_cache`).
    #[default]
    Auto,
    On,
    Off,
}

/// Decisions by the values of the input paths the policy reads.
#[derive(Debug)]
struct DecisionCache {
    decisions: moka::sync::Cache<String, Decision>,
    /// The paths the key is made of, each with the ignored paths below it.
    parts: Vec<(Vec<String>, Vec<Vec<String>>)>,
}

impl DecisionCache {
    fn new(reads: &Reads, ttl: Duration, max_entries: u64, ignore: &[String]) -> DecisionCache {
        let ignore: Vec<Vec<String>> = ignore
            .iter()
            .filter_map(|p| p.strip_prefix("/input"))
            .map(|p| {
                p.split('/')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .collect();
        // `input.time` is left out of a whole-input key (`On` only): it is never the same twice.
        let time = vec!["time".to_string()];
        let parts = reads
            .paths
            .iter()
            .filter(|(p, _)| !ignore.iter().any(|i| p.starts_with(i)))
            .map(|(p, _)| {
                let below = ignore
                    .iter()
                    .chain(p.is_empty().then_some(&time))
                    .filter(|i| i.len() > p.len() && i.starts_with(p))
                    .map(|i| i[p.len()..].to_vec())
                    .collect();
                (p.clone(), below)
            })
            .collect();
        DecisionCache {
            decisions: moka::sync::Cache::builder()
                .time_to_live(ttl)
                .max_capacity(max_entries)
                .build(),
            parts,
        }
    }

    fn pointers(&self) -> Vec<String> {
        self.parts.iter().map(|(p, _)| pointer(p)).collect()
    }

    /// The JSON of each keyed path's value, one per line (`~` where the input has none).
    fn key(&self, input: &regorus::Value) -> Result<String, PolicyError> {
        let json = |e: serde_json::Error| PolicyError::Eval(format!("cache key: {e}"));
        let mut key = String::new();
        for (path, below) in &self.parts {
            let v = path.iter().fold(input, |v, step| &v[step.as_str()]);
            if *v == regorus::Value::Undefined {
                key.push('~');
            } else if below.is_empty() {
                key.push_str(&serde_json::to_string(v).map_err(json)?);
            } else {
                let mut tree = serde_json::to_value(v).map_err(json)?;
                for b in below {
                    remove_input_path(&mut tree, &pointer(b));
                }
                key.push_str(&tree.to_string());
            }
            key.push('\n');
        }
        Ok(key)
    }
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
    /// What the modules read of the input (the cache's key).
    reads: Reads,
    /// Decisions by what the policy reads of the input, when the cache is on.
    cache: Option<DecisionCache>,
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
            reads: Reads::of(sources)?,
            cache: None,
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

    /// Sets up the decision cache (docs/policy.md): a decision is reused for `ttl` by any call
    /// whose input agrees with the decided one on every path the policy reads (`Reads`), less
    /// the `ignore`d paths (`/input/budget`: reused while the spend changes). `Auto` turns it on
    /// only where that is exact: the policy calls no non-deterministic builtin and reads neither
    /// `input.time` nor the whole input. `On` turns it on for any policy but one that reads
    /// `input.time` (no decision could be reused; an error naming where). Evaluation errors are
    /// never cached.
    pub fn with_cache(
        mut self,
        mode: CacheMode,
        ttl: Duration,
        max_entries: u64,
        ignore: &[String],
    ) -> Result<Self, PolicyError> {
        let reads_time = self.reads.reads_field("time");
        let whole = self.reads.paths.iter().any(|(p, _)| p.is_empty());
        let time_ignored = ignore.iter().any(|i| i == "/input/time");
        self.cache = match mode {
            CacheMode::Off => None,
            CacheMode::Auto if reads_time.is_some() || whole || !self.reads.impure.is_empty() => {
                None
            }
            CacheMode::On if reads_time.is_some() && !time_ignored => {
                return Err(PolicyError::Compile(format!(
                    "{}: the policy reads input.time, so the decision cache could reuse no decision: set the cache's mode to `auto` or `off`, or ignore /input/time",
                    reads_time.expect("checked")
                )))
            }
            CacheMode::Auto | CacheMode::On => {
                Some(DecisionCache::new(&self.reads, ttl, max_entries, ignore))
            }
        };
        Ok(self)
    }

    /// What the policy reads of its input, and which non-deterministic builtins it calls.
    pub fn reads(&self) -> &Reads {
        &self.reads
    }

    /// The input paths a cached decision is keyed on (`None`: the cache is off).
    pub fn cache_key(&self) -> Option<Vec<String>> {
        self.cache.as_ref().map(DecisionCache::pointers)
    }

    /// Evaluates the decision rule on `input`. An undefined decision is a deny.
    pub fn decide(&self, input: &Input) -> Result<Decision, PolicyError> {
        let to_value = || to_rego(input).map_err(|e| PolicyError::Eval(format!("input: {e}")));
        let Some(cache) = &self.cache else {
            return self.decide_value(to_value()?);
        };
        // A policy that reads nothing of its input needs no input to find its decision.
        let (key, value) = if cache.parts.is_empty() {
            (String::new(), None)
        } else {
            let value = to_value()?;
            (cache.key(&value)?, Some(value))
        };
        if let Some(d) = cache.decisions.get(&key) {
            return Ok(d);
        }
        let d = self.decide_value(match value {
            Some(v) => v,
            None => to_value()?,
        })?;
        cache.decisions.insert(key, d.clone());
        Ok(d)
    }

    /// Decisions held in the cache, if it is on.
    pub fn cache_entries(&self) -> Option<u64> {
        self.cache.as_ref().map(|c| {
            // moka counts lazily; settle pending inserts first (admin path, not per call).
            c.decisions.run_pending_tasks();
            c.decisions.entry_count()
        })
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

    fn cached(rego: &str, mode: CacheMode, ignore: &[&str]) -> Result<Policy, PolicyError> {
        let ignore: Vec<String> = ignore.iter().map(|s| s.to_string()).collect();
        Policy::compile(
            &sources(rego),
            DEFAULT_DECISION_PATH,
            EngineKind::Interpreter,
        )
        .unwrap()
        .with_cache(mode, Duration::from_secs(60), 100, &ignore)
    }

    fn with_budget(mut i: Input, spent: f64) -> Input {
        i.budget = Some(crate::input::Budget {
            spent_usd: spent,
            window: "24h".into(),
        });
        i
    }

    #[test]
    fn the_cache_keys_on_what_the_policy_reads() {
        let p = cached(MODELS, CacheMode::Auto, &[]).unwrap();
        assert_eq!(
            p.cache_key().unwrap(),
            ["/input/llm/model", "/input/source/agent"]
        );
        // The time, a header, the budget: none is read, so the decision is reused.
        let mut a = llm_input("planner", "gpt-4o-mini");
        assert!(p.decide(&a).unwrap().allow);
        a.time = "2030-01-01T00:00:00Z".into();
        a.request.headers.insert("x-request-id".into(), "r2".into());
        assert!(p.decide(&with_budget(a.clone(), 3.0)).unwrap().allow);
        assert_eq!(p.cache_entries(), Some(1));
        assert!(!p.decide(&llm_input("planner", "gpt-5")).unwrap().allow);
        assert!(!p.decide(&llm_input("writer", "gpt-4o-mini")).unwrap().allow);
        assert_eq!(p.cache_entries(), Some(3));
        // Served from the cache: a poisoned entry is what comes back.
        let c = p.cache.as_ref().unwrap();
        c.decisions.insert(
            c.key(&to_rego(&a).unwrap()).unwrap(),
            Decision::deny("cached"),
        );
        assert_eq!(p.decide(&a).unwrap().reason.as_deref(), Some("cached"));
        // A policy that reads nothing has one decision for every input.
        let p = cached(
            "package agentmesh.authz\ndecision := true",
            CacheMode::Auto,
            &[],
        )
        .unwrap();
        assert_eq!(p.cache_key().unwrap(), Vec::<String>::new());
        for model in ["a", "b", "c"] {
            assert!(p.decide(&llm_input("planner", model)).unwrap().allow);
        }
        assert_eq!(p.cache_entries(), Some(1));
    }

    #[test]
    fn ignored_paths_leave_the_key_and_a_read_budget_is_part_of_it() {
        let rego = r#"package agentmesh.authz
import rego.v1
default decision := false
decision if {
    input.llm.model in data.models[input.source.agent]
    input.budget.spent_usd < 10
}
"#;
        for (ignore, entries) in [(&[][..], 3), (&["/input/budget"][..], 1)] {
            let p = cached(rego, CacheMode::Auto, ignore).unwrap();
            for spent in [1.0, 2.0, 3.0] {
                let i = with_budget(llm_input("planner", "gpt-4o-mini"), spent);
                assert!(p.decide(&i).unwrap().allow);
            }
            assert_eq!(p.cache_entries(), Some(entries), "ignore {ignore:?}");
        }
        // An ignored path below a read one is cut out of that value: the policy reads
        // `input.request` whole, the key holds its method but not its headers.
        let p = cached(
            "package agentmesh.authz\nrequest := input.request\ndecision := request.method == \"POST\"",
            CacheMode::On,
            &["/input/request/headers"],
        )
        .unwrap();
        assert_eq!(p.cache_key().unwrap(), ["/input/request"]);
        let c = p.cache.as_ref().unwrap();
        assert_eq!(c.parts[0].1, [vec!["headers".to_string()]]);
        let mut a = llm_input("planner", "x");
        a.request.headers.insert("x-request-id".into(), "r1".into());
        let key = c.key(&to_rego(&a).unwrap()).unwrap();
        assert!(key.contains("POST") && !key.contains("r1"), "{key}");
    }

    #[test]
    fn auto_stays_off_where_a_decision_could_differ_and_on_refuses_a_timed_policy() {
        for rego in [
            "package agentmesh.authz\ndecision := input.time < \"2030\"",
            "package agentmesh.authz\ndecision := time.now_ns() > 0",
            "package agentmesh.authz\ndecision := count(json.marshal(input)) > 0",
        ] {
            assert_eq!(
                cached(rego, CacheMode::Auto, &[]).unwrap().cache_key(),
                None,
                "{rego}"
            );
        }
        let err = cached(
            "package agentmesh.authz\n\ndecision := input.time < \"2030\"",
            CacheMode::On,
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("policy.rego:3: the policy reads input.time"),
            "{err}"
        );
        // On: a builtin like http.send is the author's call; the whole input is keyed but time.
        let p = cached(
            "package agentmesh.authz\ndecision := count(json.marshal(input)) > 0",
            CacheMode::On,
            &[],
        )
        .unwrap();
        assert_eq!(p.cache_key().unwrap(), ["/input"]);
        let mut a = llm_input("planner", "x");
        p.decide(&a).unwrap();
        a.time = "2031-01-01T00:00:00Z".into();
        p.decide(&a).unwrap();
        assert_eq!(p.cache_entries(), Some(1));
        assert_eq!(
            cached(MODELS, CacheMode::Off, &[]).unwrap().cache_key(),
            None
        );
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
