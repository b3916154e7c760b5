//! `policybench`: per-decision evaluation time of a policy directory, the way the sidecar
//! evaluates it (compiled once, `Policy::decide` per call), for one input document per call kind.
//!
//! `policybench [--policy DIR] [--iterations N]` prints p50/p99/max per input in microseconds.

use agentmesh_policy::input::*;
use agentmesh_policy::{load, CacheMode, EngineKind, Policy, DEFAULT_DECISION_PATH};
use anyhow::Context;
use clap::Parser;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Per-decision evaluation time of a policy")]
struct Args {
    #[arg(long, default_value = "policies")]
    policy: std::path::PathBuf,
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
}

fn base(kind: &str, name: &str, path: &str) -> Input {
    Input {
        version: INPUT_VERSION,
        direction: "outbound".into(),
        source: Source {
            agent: "planner".into(),
            spiffe_id: Some("spiffe://mesh.local/ns/default/agent/planner".into()),
        },
        user: None,
        destination: Destination {
            kind: kind.into(),
            name: name.into(),
        },
        request: Request {
            method: "POST".into(),
            path: path.into(),
            headers: [("content-type".to_string(), "application/json".to_string())].into(),
        },
        llm: None,
        mcp: None,
        a2a: None,
        budget: None,
        time: "2026-12-01T09:30:00.000Z".into(),
    }
}

/// One representative input per call kind, each allowed by the library's example data.
fn inputs() -> Vec<(&'static str, Input)> {
    let mut llm = base("llm", "openai", "/llm/openai/v1/chat/completions");
    llm.llm = Some(Llm {
        provider: "openai".into(),
        operation: "chat_completions".into(),
        model: Some("gpt-4o-mini".into()),
        stream: true,
        max_tokens: Some(512),
    });
    llm.budget = Some(Budget {
        spent_usd: 1.25,
        window: "24h".into(),
    });
    let mut mcp = base("mcp", "search-tools", "/mcp/search-tools");
    mcp.mcp = Some(Mcp {
        method: Some("tools/call".into()),
        tool: Some("web_search".into()),
        arguments: Some(serde_json::json!({"q": "service mesh", "region": "eu"})),
        session_id: None,
        protocol_version: Some("2026-07-28".into()),
        batch_size: 1,
    });
    let mut a2a = base("a2a", "writer", "/agents/writer/");
    a2a.a2a = Some(A2a {
        method: "message/send".into(),
        skill: Some("summarize".into()),
        task_id: None,
        context_id: Some("ctx-1".into()),
        streaming: false,
    });
    let http = base("http", "weather", "/http/weather/today");
    vec![("llm", llm), ("mcp", mcp), ("a2a", a2a), ("http", http)]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sources =
        load(&args.policy).with_context(|| format!("loading {}", args.policy.display()))?;
    for kind in [EngineKind::Interpreter, EngineKind::Bytecode] {
        for cached in [false, true] {
            let mode = if cached {
                CacheMode::On
            } else {
                CacheMode::Off
            };
            let policy = Policy::compile(&sources, DEFAULT_DECISION_PATH, kind)?.with_cache(
                mode,
                std::time::Duration::from_secs(60),
                10_000,
                &[],
            )?;
            println!(
                "\npolicy {} ({} modules), {kind:?} engine, cache {}, {} evaluations per input",
                args.policy.display(),
                policy.modules().len(),
                if cached { "on" } else { "off" },
                args.iterations
            );
            measure(&policy, args.iterations)?;
        }
    }
    Ok(())
}

fn measure(policy: &Policy, iterations: usize) -> anyhow::Result<()> {
    println!(
        "{:<6} {:>9} {:>9} {:>9}  decision",
        "input", "p50 µs", "p99 µs", "max µs"
    );
    for (name, input) in inputs() {
        let decision = policy.decide(&input)?;
        for _ in 0..iterations / 10 {
            policy.decide(&input)?; // warm-up
        }
        let mut ns: Vec<u128> = (0..iterations)
            .map(|_| {
                let t = Instant::now();
                let _ = policy.decide(&input);
                t.elapsed().as_nanos()
            })
            .collect();
        ns.sort_unstable();
        let pct = |p: f64| ns[((ns.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
        println!(
            "{name:<6} {:>9.1} {:>9.1} {:>9.1}  {}",
            pct(0.5),
            pct(0.99),
            pct(1.0),
            if decision.allow {
                "allow".into()
            } else {
                format!("deny: {:?}", decision.reason)
            }
        );
    }
    Ok(())
}
