//! Rego policy through a running sidecar: allow and deny for each call kind (LLM, MCP, A2A,
//! plain HTTP), headers an allow adds, deny by default, audit mode, per-route fail-open, hot
//! reload of the policy directory, and a broken policy rejected while the old one keeps deciding.

use agentmesh_tests::{Fixture, Scratch, Sidecar};
use serde_json::{json, Value};
use std::time::Duration;

const POLICY: &str = r#"
package agentmesh.authz

import rego.v1

default decision := {"allow": false, "reason": "default deny"}

decision := {"allow": true, "headers": {"x-policy": "v1"}} if allowed

decision := {"allow": false, "status": 429, "reason": sprintf("model %q is over budget", [input.llm.model])} if {
	input.llm.model == "gpt-5"
}

allowed if input.llm.model == "gpt-4o-mini"

allowed if {
	input.destination.kind == "mcp"
	not input.mcp.tool
}

allowed if input.mcp.tool in {"add", "echo"}

allowed if {
	input.destination.kind == "http"
	input.request.headers["x-team"] == "search"
}
"#;

struct Mesh {
    dir: Scratch,
    llm: Fixture,
    _mcp: Fixture,
    sc: Sidecar,
}

/// A mock LLM, the MCP tool server and a sidecar granting `llm/openai`, `mcp/tools`,
/// `agents/peer` and `http/echo`, under the policy in `<dir>/policy/` (`policy` section given).
async fn mesh(tag: &str, rego: &str, policy_section: &str, extra: &str) -> Mesh {
    let dir = Scratch::new(tag);
    std::fs::create_dir_all(dir.path("policy")).unwrap();
    std::fs::write(dir.path("policy/authz.rego"), rego).unwrap();
    let llm = Fixture::mock_llm(&dir, &[]).await;
    let mcp = Fixture::mcp_tools(&dir).await;
    let section = policy_section.replace("{DIR}", &dir.path("policy").display().to_string());
    let body = format!(
        "upstreams:\n  - {{name: llm/openai, endpoints: [\"{llm}\"]}}\n  - {{name: mcp/tools, endpoints: [\"{mcp}/mcp\"]}}\n  - {{name: agents/peer, endpoints: [\"{llm}\"]}}\n  - {{name: http/echo, endpoints: [\"{llm}/debug\"]{extra}}}\n{section}",
        llm = llm.url(""),
        mcp = mcp.url(""),
    );
    let sc = Sidecar::start(&dir, &body).await;
    Mesh {
        dir,
        llm,
        _mcp: mcp,
        sc,
    }
}

use agentmesh_tests::post_json as post;

/// An OpenAI chat completion through the sidecar's `llm/openai`.
async fn chat_call(sc: &Sidecar, model: &str) -> (u16, Value) {
    post(
        &sc.url("/llm/openai/v1/chat/completions"),
        &[],
        &chat(model),
    )
    .await
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "ping"}]})
}

/// A stateless (2026-07-28) MCP `tools/call`, headers agreeing with the body.
async fn call_tool(sc: &Sidecar, name: &str) -> (u16, Value) {
    let body = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": name, "arguments": {"a": 1, "b": 2, "text": "x"},
                   "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}});
    let headers = [
        ("accept", "application/json, text/event-stream"),
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", name),
    ];
    post(&sc.url("/mcp/tools"), &headers, &body).await
}

async fn stats(sc: &Sidecar) -> Value {
    reqwest::get(format!("http://127.0.0.1:{}/stats", sc.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn allows_and_denies_each_kind_before_the_upstream_sees_the_call() {
    let m = mesh("policy-kinds", POLICY, "policy: {path: \"{DIR}\"}", "").await;
    let sc = &m.sc;

    let (s, v) = chat_call(sc, "gpt-4o-mini").await;
    assert_eq!(s, 200, "{v}");
    let before = m.llm.requests().await;
    let (s, v) = chat_call(sc, "gpt-4.1").await;
    assert_eq!(s, 403);
    assert_eq!(v["error"]["type"], "policy_denied");
    assert_eq!(v["error"]["message"], "default deny");
    assert_eq!(v["error"]["upstream"], "llm/openai");
    // The policy's own status and reason.
    let (s, v) = chat_call(sc, "gpt-5").await;
    assert_eq!(s, 429);
    assert_eq!(v["error"]["message"], "model \"gpt-5\" is over budget");
    assert_eq!(
        m.llm.requests().await,
        before,
        "denied calls never reach the LLM"
    );

    // MCP: the tool decides; a deny is a JSON-RPC error.
    let (s, v) = call_tool(sc, "add").await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = call_tool(sc, "read_file").await;
    assert_eq!(s, 403);
    assert_eq!(v["jsonrpc"], "2.0");
    assert_eq!(v["error"]["code"], -32003);
    assert_eq!(v["error"]["message"], "default deny");

    // A2A: nothing allows it here.
    let a2a = json!({"jsonrpc": "2.0", "id": "1", "method": "message/send",
                     "params": {"message": {"role": "user", "messageId": "m1", "parts": [{"kind": "text", "text": "hi"}]}}});
    let (s, v) = post(&sc.url("/agents/peer/"), &[], &a2a).await;
    assert_eq!(s, 403);
    assert_eq!(v["error"]["code"], -32003);

    // Plain HTTP: decided on headers; an allow adds the policy's headers upstream.
    let (s, v) = post(
        &sc.url("/http/echo/echo"),
        &[("x-team", "search")],
        &json!({"q": 1}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["headers"]["x-policy"], "v1");
    let (s, _) = post(
        &sc.url("/http/echo/echo"),
        &[("x-team", "other")],
        &json!({}),
    )
    .await;
    assert_eq!(s, 403);

    let calls = sc.wait_calls(8).await;
    let denied: Vec<&Value> = calls
        .iter()
        .filter(|c| c["decision"]["allow"] == false)
        .collect();
    assert_eq!(denied.len(), 5, "{calls:?}");
    assert!(denied.iter().all(|c| c["decision"]["enforced"] == true));
    let st = stats(sc).await;
    assert_eq!(st["policy"]["denied"], 5, "{st}");
    assert_eq!(st["policy"]["allowed"], 3, "{st}");
}

#[tokio::test]
async fn a_large_body_is_decided_before_any_of_it_goes_upstream() {
    let m = mesh("policy-large", POLICY, "policy: {path: \"{DIR}\"}", "").await;
    // Over the 64 KiB that can be decided before connecting: decided when whole.
    let big = "word ".repeat(30_000);
    let body = json!({"model": "gpt-4.1", "messages": [{"role": "user", "content": big}]});
    let before = m.llm.requests().await;
    let (s, v) = post(&m.sc.url("/llm/openai/v1/chat/completions"), &[], &body).await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["error"]["type"], "policy_denied");
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": big}]});
    let (s, v) = post(&m.sc.url("/llm/openai/v1/chat/completions"), &[], &body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        m.llm.requests().await,
        before + 1,
        "only the allowed call reached the LLM"
    );
}

#[tokio::test]
async fn without_a_policy_every_call_is_denied() {
    let dir = Scratch::new("policy-none");
    let llm = Fixture::mock_llm(&dir, &[]).await;
    // A `policy:` section without a path: no policy at all.
    let body = format!(
        "upstreams:\n  - {{name: llm/openai, endpoints: [\"{}\"]}}\npolicy: {{mode: enforce}}\n",
        llm.url("")
    );
    let sc = Sidecar::start(&dir, &body).await;
    let (s, v) = chat_call(&sc, "gpt-4o-mini").await;
    assert_eq!(s, 403);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no policy"),
        "{v}"
    );
    assert_eq!(llm.requests().await, 0);
}

#[tokio::test]
async fn audit_mode_logs_denies_without_enforcing_them() {
    let m = mesh(
        "policy-audit",
        POLICY,
        "policy: {path: \"{DIR}\", mode: audit}",
        "",
    )
    .await;
    let (s, _) = chat_call(&m.sc, "gpt-4.1").await;
    assert_eq!(s, 200, "audit mode forwards the denied call");
    let calls = m.sc.wait_calls(1).await;
    assert_eq!(calls[0]["decision"]["allow"], false);
    assert_eq!(calls[0]["decision"]["enforced"], false);
    assert_eq!(calls[0]["decision"]["reason"], "default deny");
    assert_eq!(stats(&m.sc).await["policy"]["audit_denied"], 1);
}

#[tokio::test]
async fn evaluation_errors_deny_unless_the_route_fails_open() {
    // Two definitions that both apply to the HTTP calls: an error found only at evaluation.
    let conflicting = r#"
package agentmesh.authz
import rego.v1
decision := true if input.destination.kind == "http"
decision := false if input.destination.kind == "http"
"#;
    let m = mesh(
        "policy-failopen",
        conflicting,
        "policy: {path: \"{DIR}\"}",
        ", fail_open: true",
    )
    .await;
    let (s, _) = post(&m.sc.url("/http/echo/echo"), &[], &json!({})).await;
    assert_eq!(s, 200, "http/echo fails open");
    // One meaning everywhere for a call let through on an error: `allow`, in the access log,
    // the decision counter and the request counter alike, with the error counted apart.
    let calls = m.sc.wait_calls(1).await;
    assert_eq!(calls[0]["decision"]["allow"], true, "{}", calls[0]);
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", m.sc.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let has = |prefix: &str| metrics.lines().any(|l| l.starts_with(prefix));
    assert!(
        has(
            r#"agentmesh_policy_decisions_total{source="tester",destination="http/echo",kind="http",decision="allow"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        has(
            r#"agentmesh_requests_total{source="tester",destination="http/echo",kind="http",model="",decision="allow",status="200"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        has(
            r#"agentmesh_policy_errors_total{source="tester",destination="http/echo",kind="http"} 1"#
        ),
        "{metrics}"
    );
    // The same error on a route that does not fail open denies.
    std::fs::write(
        m.dir.path("policy/authz.rego"),
        conflicting.replace("\"http\"", "\"llm\""),
    )
    .unwrap();
    m.sc.wait_dump(|d| d["status"]["reloads_ok"].as_u64() >= Some(1))
        .await;
    let (s, v) = chat_call(&m.sc, "gpt-4o-mini").await;
    assert_eq!(s, 403, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("policy evaluation failed"));
    assert!(stats(&m.sc).await["policy"]["errors"].as_u64() >= Some(2));
}

#[tokio::test]
async fn policy_changes_apply_live_and_a_broken_policy_is_rejected() {
    let m = mesh("policy-reload", POLICY, "policy: {path: \"{DIR}\"}", "").await;
    let url = m.sc.url("/llm/openai/v1/chat/completions");
    assert_eq!(post(&url, &[], &chat("gpt-4.1")).await.0, 403);
    let rev0 = m.sc.config_dump().await["policy"]["revision"].clone();

    // Allow gpt-4.1 too: picked up from the directory without a signal.
    std::fs::write(
        m.dir.path("policy/authz.rego"),
        POLICY.replace(
            "allowed if input.llm.model == \"gpt-4o-mini\"",
            "allowed if input.llm.model in {\"gpt-4o-mini\", \"gpt-4.1\"}",
        ),
    )
    .unwrap();
    let d = m.sc.wait_dump(|d| d["policy"]["revision"] != rev0).await;
    let rev1 = d["policy"]["revision"].clone();
    assert_eq!(post(&url, &[], &chat("gpt-4.1")).await.0, 200);

    // A syntax error: rejected with file:line:column, the last good policy keeps deciding.
    std::fs::write(
        m.dir.path("policy/extra.rego"),
        "package agentmesh.authz\n\nallowed if {\n",
    )
    .unwrap();
    let d =
        m.sc.wait_dump(|d| d["status"]["reloads_rejected"].as_u64() >= Some(1))
            .await;
    let err = d["status"]["last_error"].as_str().unwrap().to_string();
    assert!(err.contains("extra.rego:4:1:"), "{err}");
    assert!(stats(&m.sc).await["reloads"]["reloads_rejected"].as_u64() >= Some(1));
    assert_eq!(d["policy"]["revision"], rev1);
    assert_eq!(post(&url, &[], &chat("gpt-4.1")).await.0, 200);
    assert_eq!(post(&url, &[], &chat("o3")).await.0, 403);

    // Fixed: accepted again.
    std::fs::remove_file(m.dir.path("policy/extra.rego")).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d = m.sc.config_dump().await;
    assert_eq!(d["policy"]["revision"], rev1, "same content, same revision");
}

#[tokio::test]
async fn a_broken_policy_stops_the_start_with_its_location() {
    let dir = Scratch::new("policy-check");
    std::fs::create_dir_all(dir.path("p")).unwrap();
    std::fs::write(
        dir.path("p/a.rego"),
        "package agentmesh.authz\ndecision := \n",
    )
    .unwrap();
    std::fs::write(
        dir.path("sidecar.yaml"),
        "agent: {name: a}\npolicy: {path: p}\n",
    )
    .unwrap();
    let out = std::process::Command::new(agentmesh_tests::bin_dir().join("agentmesh-proxy"))
        .args(["--check", "--config"])
        .arg(dir.path("sidecar.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a.rego:3:1:"), "{err}");
    // The relative path resolved against the config file's directory.
    assert!(err.contains(&dir.path("p").display().to_string()), "{err}");
}

#[tokio::test]
async fn decision_logs_say_which_revision_decided_and_never_hold_the_arguments() {
    let m = mesh("policy-dlog", POLICY, "policy: {path: \"{DIR}\"}", "").await;
    let (s, _) = call_tool(&m.sc, "read_file").await;
    assert_eq!(s, 403);
    let (s, _) = call_tool(&m.sc, "add").await;
    assert_eq!(s, 200);
    let revision = m.sc.config_dump().await["policy"]["revision"].clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let entries = loop {
        let e = m.sc.decisions();
        if e.len() >= 2 || std::time::Instant::now() > deadline {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(entries.len(), 2, "{entries:?}");
    let denied = &entries[0];
    assert_eq!(denied["path"], "agentmesh/authz/decision");
    assert_eq!(denied["result"]["allow"], false);
    assert_eq!(denied["result"]["reason"], "default deny");
    assert_eq!(denied["input"]["mcp"]["tool"], "read_file");
    assert_eq!(denied["bundles"]["agentmesh"]["revision"], revision);
    assert_eq!(denied["erased"], json!(["/input/mcp/arguments"]));
    assert!(
        denied["metrics"]["timer_rego_query_eval_ns"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_ne!(entries[0]["decision_id"], entries[1]["decision_id"]);
    assert_eq!(entries[1]["result"]["allow"], true);
    let text = std::fs::read_to_string(m.dir.path("decisions.jsonl")).unwrap();
    assert!(
        !text.contains("\"text\":\"x\""),
        "tool arguments are masked: {text}"
    );
}

/// Writes an OPA bundle: a gzipped tarball with a `.manifest` naming the revision.
fn write_bundle(path: &std::path::Path, revision: &str, rego: &str) {
    let tmp = path.with_extension("tmp");
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&tmp).unwrap(),
        flate2::Compression::default(),
    );
    let mut t = tar::Builder::new(gz);
    let manifest = format!(r#"{{"revision": "{revision}", "roots": ["agentmesh"]}}"#);
    for (name, text) in [
        (".manifest", manifest.as_str()),
        ("agentmesh/authz.rego", rego),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(&mut h, name, text.as_bytes()).unwrap();
    }
    t.into_inner().unwrap().finish().unwrap();
    std::fs::rename(&tmp, path).unwrap(); // replaced whole, as a bundle server's client would
}

#[tokio::test]
async fn an_opa_bundle_is_a_policy_and_its_replacement_applies_live() {
    let dir = Scratch::new("policy-bundle");
    let llm = Fixture::mock_llm(&dir, &[]).await;
    let bundle = dir.path("authz.tar.gz");
    write_bundle(&bundle, "r1", POLICY);
    let body = format!(
        "upstreams:\n  - {{name: llm/openai, endpoints: [\"{}\"]}}\npolicy: {{path: authz.tar.gz}}\n",
        llm.url("")
    );
    let sc = Sidecar::start(&dir, &body).await;
    assert_eq!(sc.config_dump().await["policy"]["revision"], "r1");
    let url = sc.url("/llm/openai/v1/chat/completions");
    assert_eq!(post(&url, &[], &chat("gpt-4.1")).await.0, 403);

    write_bundle(
        &bundle,
        "r2",
        &POLICY.replace("\"gpt-4o-mini\"", "\"gpt-4.1\""),
    );
    sc.wait_dump(|d| d["policy"]["revision"] == "r2").await;
    assert_eq!(post(&url, &[], &chat("gpt-4.1")).await.0, 200);

    // A corrupt bundle is rejected; r2 keeps deciding.
    std::fs::write(dir.path("authz.tar.gz.tmp"), b"truncated").unwrap();
    std::fs::rename(dir.path("authz.tar.gz.tmp"), &bundle).unwrap();
    let d = sc
        .wait_dump(|d| d["status"]["reloads_rejected"].as_u64() >= Some(1))
        .await;
    assert!(
        d["status"]["last_error"]
            .as_str()
            .unwrap()
            .contains("not a readable .tar.gz bundle"),
        "{d}"
    );
    assert_eq!(d["policy"]["revision"], "r2");
    assert_eq!(post(&url, &[], &chat("gpt-4.1")).await.0, 200);
}

#[tokio::test]
async fn spend_read_off_responses_feeds_the_budget_policy() {
    let budget = r#"
package agentmesh.authz
import rego.v1
default decision := {"allow": true}
decision := {"allow": false, "status": 429, "reason": sprintf("daily budget spent: $%v of $0.01", [input.budget.spent_usd])} if {
	input.destination.kind == "llm"
	input.budget.spent_usd >= 0.01
}
"#;
    let dir = Scratch::new("policy-budget");
    std::fs::create_dir_all(dir.path("policy")).unwrap();
    std::fs::write(dir.path("policy/authz.rego"), budget).unwrap();
    // A price table in LiteLLM's format, dear enough that one call spends the budget.
    std::fs::write(
        dir.path("prices.json"),
        r#"{"gpt-4o-mini": {"input_cost_per_token": 0.001, "output_cost_per_token": 0.002, "litellm_provider": "openai", "mode": "chat"}}"#,
    )
    .unwrap();
    let llm = Fixture::mock_llm(&dir, &[]).await;
    let body = format!(
        "upstreams:\n  - {{name: llm/openai, endpoints: [\"{}\"]}}\npolicy: {{path: policy}}\npricing: {{file: prices.json}}\n",
        llm.url("")
    );
    let sc = Sidecar::start(&dir, &body).await;
    let url = sc.url("/llm/openai/v1/chat/completions");
    let (s, v) = post(&url, &[], &chat("gpt-4o-mini")).await;
    assert_eq!(s, 200, "{v}");
    // The mock's usage: 1 word + 4 per message in, 4 words out: 5 × $0.001 + 4 × $0.002.
    let calls = sc.wait_calls(1).await;
    let cost = calls[0]["llm"]["cost_usd"].as_f64().unwrap();
    assert!((cost - 0.013).abs() < 1e-9, "{cost}");
    let (s, v) = post(&url, &[], &chat("gpt-4o-mini")).await;
    assert_eq!(s, 429, "{v}");
    assert_eq!(v["error"]["message"], "daily budget spent: $0.013 of $0.01");
    assert_eq!(llm.requests().await, 1);
}

#[tokio::test]
async fn the_decision_cache_keys_on_what_the_policy_reads_by_default() {
    // No `cache` section: `auto`, on for this policy (it reads neither the time nor the whole
    // input, and calls no non-deterministic builtin).
    let m = mesh(
        "policy-cache",
        POLICY,
        "policy: {path: \"{DIR}\", engine: bytecode}",
        "",
    )
    .await;
    for _ in 0..3 {
        assert_eq!(chat_call(&m.sc, "gpt-4o-mini").await.0, 200);
        assert_eq!(chat_call(&m.sc, "gpt-4.1").await.0, 403);
    }
    let d = m.sc.config_dump().await;
    assert_eq!(d["policy"]["engine"], "bytecode");
    assert_eq!(
        d["policy"]["cache"]["key"],
        json!([
            "/input/destination/kind",
            "/input/llm/model",
            "/input/mcp/tool",
            "/input/request/headers/x-team"
        ])
    );
    // Six calls, two distinct keys: the spend and the time changed between them, unread.
    let cached =
        m.sc.wait_dump(|d| d["policy"]["cache"]["entries"].as_u64() == Some(2))
            .await;
    assert_eq!(cached["policy"]["cache"]["entries"], 2);
    let st = stats(&m.sc).await;
    assert_eq!(st["policy"]["allowed"], 3);
    assert_eq!(st["policy"]["denied"], 3);
}
