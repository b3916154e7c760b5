//! The policy library decides the same on both engines, for an input per rule of each module:
//! what a team checks before turning on `engine: bytecode`.

use agentmesh_policy::{load, Decision, EngineKind, Input, Policy, DEFAULT_DECISION_PATH};
use serde_json::json;
use std::path::Path;

fn input(v: serde_json::Value) -> Input {
    let mut base = json!({
        "version": 1, "direction": "outbound", "source": {"agent": "planner"},
        "destination": {"kind": "llm", "name": "openai"},
        "request": {"method": "POST", "path": "/x", "headers": {}},
        "time": "2026-12-01T00:00:00Z"
    });
    for (k, val) in v.as_object().unwrap() {
        base[k] = val.clone();
    }
    serde_json::from_value(base).unwrap()
}

fn cases() -> Vec<(&'static str, Input, bool)> {
    let llm = |agent: &str, model: &str| json!({"source": {"agent": agent}, "llm": {"provider": "openai", "operation": "chat_completions", "model": model, "stream": false}});
    let tool = |agent: &str, server: &str, name: &str, args: serde_json::Value| {
        json!({"source": {"agent": agent}, "destination": {"kind": "mcp", "name": server},
               "mcp": {"method": "tools/call", "tool": name, "arguments": args, "batch_size": 1}})
    };
    let mut over_budget = llm("planner", "gpt-4o-mini");
    over_budget["budget"] = json!({"spent_usd": 6, "window": "24h"});
    let mut analyst = tool(
        "researcher",
        "files",
        "read_file",
        json!({"path": "/workspace/a.md"}),
    );
    analyst["user"] = json!({"sub": "alice", "claims": {"roles": ["analyst"]}});
    let mut no_role = analyst.clone();
    no_role["user"] = json!({"sub": "bob", "claims": {"roles": ["viewer"]}});
    let mut shell = tool("researcher", "files", "shell", json!({"cmd": "rm -rf /"}));
    shell["user"] = json!({"sub": "alice", "claims": {"roles": ["admin"]}});
    let a2a = |from: &str, to: &str, claims: serde_json::Value| {
        json!({"source": {"agent": from}, "destination": {"kind": "a2a", "name": to},
               "a2a": {"method": "message/send", "streaming": false},
               "user": {"sub": "alice", "claims": claims}})
    };
    vec![
        ("allowed model", input(llm("planner", "gpt-4o-mini")), true),
        ("model not listed", input(llm("planner", "gpt-4.1")), false),
        (
            "unknown agent",
            input(llm("intruder", "gpt-4o-mini")),
            false,
        ),
        ("over budget", input(over_budget), false),
        (
            "declared tool",
            input(tool(
                "planner",
                "search-tools",
                "web_search",
                json!({"q": "x"}),
            )),
            true,
        ),
        (
            "undeclared tool",
            input(tool("planner", "search-tools", "read_file", json!({}))),
            false,
        ),
        ("file tool with role", input(analyst), true),
        ("file tool without role", input(no_role), false),
        ("destructive shell", input(shell), false),
        (
            "delegation edge",
            input(a2a("planner", "writer", json!({}))),
            true,
        ),
        (
            "no such edge",
            input(a2a("writer", "planner", json!({}))),
            false,
        ),
        (
            "chain too deep",
            input(a2a(
                "planner",
                "writer",
                json!({"act": {"sub": "a", "act": {"sub": "b", "act": {"sub": "c"}}}}),
            )),
            false,
        ),
    ]
}

#[test]
fn interpreter_and_bytecode_agree_on_the_library() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sources = load(&dir).unwrap();
    let interp = Policy::compile(&sources, DEFAULT_DECISION_PATH, EngineKind::Interpreter).unwrap();
    let bytecode = Policy::compile(&sources, DEFAULT_DECISION_PATH, EngineKind::Bytecode).unwrap();
    assert_eq!(bytecode.engine(), EngineKind::Bytecode);
    for (name, input, allowed) in cases() {
        let a: Decision = interp.decide(&input).unwrap();
        let b: Decision = bytecode.decide(&input).unwrap();
        assert_eq!(a, b, "{name}: the engines disagree");
        assert_eq!(a.allow, allowed, "{name}: {a:?}");
    }
}
