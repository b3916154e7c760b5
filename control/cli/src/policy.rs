//! `agentmesh policy test DIR` and `agentmesh policy eval`: the tools a security engineer uses
//! while writing policy. Output follows `opa test`: failures (all results with `-v`) grouped by
//! file, then `PASS: n/m`; the exit code is 0 only when every test passed.

use agentmesh_policy::testing::{eval_package, run_tests, Outcome};
use agentmesh_policy::{load, EngineKind, Policy, DEFAULT_DECISION_PATH};
use anyhow::Context;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Run every `test_` rule under DIR (.rego and data.json files, as the sidecar loads them).
    Test {
        dir: PathBuf,
        /// Show every test, not only failures.
        #[arg(short, long)]
        verbose: bool,
        /// Only tests whose full name (`data.pkg.test_x`) contains this text.
        #[arg(long)]
        run: Option<String>,
    },
    /// Decide one input document with the policy in DIR and show the rules that had a value.
    Eval {
        /// The policy directory.
        #[arg(long, short = 'p')]
        policy: PathBuf,
        /// The input document (JSON, as in docs/policy-input.md); `-` reads standard input.
        #[arg(long, short = 'i')]
        input: PathBuf,
        /// The decision rule.
        #[arg(long, default_value = DEFAULT_DECISION_PATH)]
        decision: String,
    },
}

pub fn run(cmd: PolicyCommand) -> anyhow::Result<i32> {
    match cmd {
        PolicyCommand::Test { dir, verbose, run } => test(&dir, verbose, run.as_deref()),
        PolicyCommand::Eval {
            policy,
            input,
            decision,
        } => eval(&policy, &input, &decision),
    }
}

fn test(dir: &std::path::Path, verbose: bool, filter: Option<&str>) -> anyhow::Result<i32> {
    let sources = load(dir)?;
    let results = run_tests(&sources, filter)?;
    if results.is_empty() {
        eprintln!("no tests found under {}", dir.display());
        return Ok(1);
    }
    let mut file = "";
    let mut passed = 0;
    for r in &results {
        let shown = verbose || r.outcome != Outcome::Pass;
        if r.outcome == Outcome::Pass {
            passed += 1;
        }
        if !shown {
            continue;
        }
        if r.file != file {
            file = &r.file;
            println!("{file}:");
        }
        let micros = r.duration.as_micros();
        match &r.outcome {
            Outcome::Pass => println!("{}: PASS ({micros}µs)", r.name),
            Outcome::Fail => println!("{}: FAIL ({micros}µs)", r.name),
            Outcome::Error(e) => println!("{}: ERROR ({micros}µs)\n  {e}", r.name),
        }
    }
    if verbose || passed < results.len() {
        println!("{}", "-".repeat(80));
    }
    let failed = results.len() - passed;
    if failed == 0 {
        println!("PASS: {passed}/{}", results.len());
        Ok(0)
    } else {
        println!("PASS: {passed}/{}", results.len());
        println!("FAIL: {failed}/{}", results.len());
        Ok(1)
    }
}

fn eval(dir: &std::path::Path, input: &std::path::Path, decision: &str) -> anyhow::Result<i32> {
    let text = if input.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the input from stdin")?
    } else {
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?
    };
    // The same checks the sidecar's documents pass: a typo in a field name is an error here.
    let doc: agentmesh_policy::Input = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a policy input document", input.display()))?;
    let text = serde_json::to_string(&doc)?;
    let sources = load(dir)?;
    let policy = Policy::compile(&sources, decision, EngineKind::Interpreter)?;
    // The sidecar's own path from document to decision.
    let d = policy.decide(&doc)?;
    println!("{}", serde_json::to_string_pretty(&d)?);
    if d.allow {
        println!("=> allow");
    } else {
        println!("=> deny ({})", d.deny_status());
    }
    let package = decision
        .rsplit_once('.')
        .map(|(p, _)| p)
        .unwrap_or(decision);
    println!("\nrules of {package} with a value for this input:");
    for (name, value) in eval_package(&sources, package, &text)? {
        match value {
            Some(v) => println!("  {name} = {v}"),
            None => println!("  {name}: undefined"),
        }
    }
    Ok(if d.allow { 0 } else { 3 })
}
