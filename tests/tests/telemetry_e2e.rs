//! Telemetry through a running sidecar: `/metrics` in the Prometheus text format, linted by
//! `promtool check metrics` and scraped by a real Prometheus server, with per-call counts,
//! tokens and USD that add up to hand-computed figures for streamed and non-streamed calls of
//! both LLM API families, and a denied call counted as such.

use agentmesh_tests::otlp::Receiver;
use agentmesh_tests::{free_port, Fixture, Proc, Scratch, Sidecar};
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const POLICY: &str = r#"
package agentmesh.authz

import rego.v1

default decision := {"allow": false, "reason": "model not allowed"}

decision := {"allow": true} if input.llm.model in {"gpt-4o-mini", "claude-haiku-4-5"}

decision := {"allow": true} if input.destination.kind in {"http", "a2a"}

decision := {"allow": true} if input.direction == "inbound"
"#;

/// Prices in LiteLLM's format, round enough to add by hand.
const PRICES: &str = r#"{
  "gpt-4o-mini": {"input_cost_per_token": 0.001, "output_cost_per_token": 0.002, "litellm_provider": "openai", "mode": "chat"},
  "claude-haiku-4-5": {"input_cost_per_token": 0.003, "output_cost_per_token": 0.004, "litellm_provider": "anthropic", "mode": "chat"}
}"#;

/// A tool the test setup installs (scripts/setup.sh): its absence is a failure, not a skip.
fn tool(name: &str) -> String {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .expect("sh");
    let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
    assert!(
        !path.is_empty(),
        "`{name}` is not installed: run scripts/setup.sh (it installs Debian's prometheus package)"
    );
    path
}

struct Mesh {
    dir: Scratch,
    _llm: Fixture,
    sc: Sidecar,
}

async fn mesh(tag: &str) -> Mesh {
    mesh_with(tag, "").await
}

/// The mesh with `extra` YAML appended to the sidecar's config (a telemetry section).
async fn mesh_with(tag: &str, extra: &str) -> Mesh {
    let dir = Scratch::new(tag);
    std::fs::create_dir_all(dir.path("policy")).unwrap();
    std::fs::write(dir.path("policy/authz.rego"), POLICY).unwrap();
    std::fs::write(dir.path("prices.json"), PRICES).unwrap();
    let llm = Fixture::mock_llm(&dir, &[]).await;
    let body = format!(
        "upstreams:\n  - {{name: llm/openai, endpoints: [\"{u}\"]}}\n  - {{name: llm/anthropic, endpoints: [\"{u}\"]}}\n  - {{name: http/echo, endpoints: [\"{u}/debug\"]}}\npolicy: {{path: policy}}\npricing: {{file: prices.json}}\n{extra}",
        u = llm.url("")
    );
    let sc = Sidecar::start(&dir, &body).await;
    Mesh { dir, _llm: llm, sc }
}

async fn post(url: &str, body: &Value) -> (u16, String) {
    agentmesh_tests::post_text(url, &[("anthropic-version", "2023-06-01")], body).await
}

/// Four allowed calls (OpenAI and Anthropic, JSON and SSE) and one denied; returns their count.
async fn traffic(sc: &Sidecar) -> usize {
    let ping = json!([{"role": "user", "content": "ping"}]);
    let openai = sc.url("/llm/openai/v1/chat/completions");
    let anthropic = sc.url("/llm/anthropic/v1/messages");
    let calls = [
        (&openai, json!({"model": "gpt-4o-mini", "messages": ping})),
        (
            &openai,
            json!({"model": "gpt-4o-mini", "messages": ping, "stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            &anthropic,
            json!({"model": "claude-haiku-4-5", "max_tokens": 64, "messages": ping}),
        ),
        (
            &anthropic,
            json!({"model": "claude-haiku-4-5", "max_tokens": 64, "messages": ping, "stream": true}),
        ),
    ];
    for (url, body) in &calls {
        let (s, text) = post(url, body).await;
        assert_eq!(s, 200, "{text}");
    }
    let (s, text) = post(&openai, &json!({"model": "gpt-5", "messages": ping})).await;
    assert_eq!(s, 403, "{text}");
    calls.len() + 1
}

async fn metrics(sc: &Sidecar) -> (String, String) {
    let r = reqwest::get(format!("http://127.0.0.1:{}/metrics", sc.admin))
        .await
        .expect("admin answers");
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (ct, r.text().await.unwrap())
}

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in\n{text}"))
}

#[tokio::test]
async fn metrics_pass_promtool_and_count_calls_tokens_and_usd() {
    let m = mesh("telemetry-metrics").await;
    let n = traffic(&m.sc).await;
    let calls = m.sc.wait_calls(n).await;
    // The mock's usage for one "ping": 1 word + 4 per message in, 4 words out — on both APIs,
    // streamed or not. Prices: OpenAI 5 × 0.001 + 4 × 0.002 = 0.013, Anthropic 5 × 0.003 +
    // 4 × 0.004 = 0.031.
    for c in calls.iter().filter(|c| c["status"] == 200) {
        let usage = &c["llm"]["usage"];
        assert_eq!(
            (
                usage["input_tokens"].as_u64(),
                usage["output_tokens"].as_u64()
            ),
            (Some(5), Some(4)),
            "{c}"
        );
    }
    let (ct, text) = metrics(&m.sc).await;
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");

    let mut lint = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    lint.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let calls_of = |dest: &str, model: &str, decision: &str, status: u16| {
        sample(
            &text,
            &format!(
                r#"agentmesh_requests_total{{source="tester",destination="{dest}",kind="llm",model="{model}",decision="{decision}",status="{status}"}}"#
            ),
        )
    };
    assert_eq!(calls_of("llm/openai", "gpt-4o-mini", "allow", 200), 2.0);
    assert_eq!(
        calls_of("llm/anthropic", "claude-haiku-4-5", "allow", 200),
        2.0
    );
    assert_eq!(calls_of("llm/openai", "gpt-5", "deny", 403), 1.0);
    assert_eq!(
        sample(
            &text,
            r#"agentmesh_policy_decisions_total{source="tester",destination="llm/openai",kind="llm",decision="deny"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(&text, "agentmesh_policy_eval_duration_seconds_count"),
        5.0
    );
    let usd = |provider: &str, model: &str| {
        sample(
            &text,
            &format!(
                r#"agentmesh_llm_cost_usd_total{{source="tester",gen_ai_provider_name="{provider}",gen_ai_request_model="{model}"}}"#
            ),
        )
    };
    assert!(
        (usd("openai", "gpt-4o-mini") - 0.026).abs() < 1e-9,
        "{text}"
    );
    assert!(
        (usd("anthropic", "claude-haiku-4-5") - 0.062).abs() < 1e-9,
        "{text}"
    );
    let tokens = |provider: &str, model: &str, kind: &str, what: &str| {
        sample(
            &text,
            &format!(
                r#"gen_ai_client_token_usage_{what}{{source="tester",gen_ai_operation_name="chat",gen_ai_provider_name="{provider}",gen_ai_request_model="{model}",gen_ai_token_type="{kind}"}}"#
            ),
        )
    };
    assert_eq!(tokens("openai", "gpt-4o-mini", "input", "sum"), 10.0);
    assert_eq!(tokens("openai", "gpt-4o-mini", "output", "count"), 2.0);
    assert_eq!(
        tokens("anthropic", "claude-haiku-4-5", "output", "sum"),
        8.0
    );
    // The denied call never reached the provider: no GenAI duration for gpt-5.
    assert!(!text.contains(r#"gen_ai_request_model="gpt-5""#), "{text}");
    assert_eq!(
        sample(
            &text,
            r#"gen_ai_client_operation_duration_seconds_count{source="tester",gen_ai_operation_name="chat",gen_ai_provider_name="anthropic",gen_ai_request_model="claude-haiku-4-5"}"#
        ),
        2.0
    );
}

/// A Prometheus server scraping the sidecar's admin port every second.
fn prometheus(dir: &Scratch, admin: u16) -> (Proc, u16) {
    let port = free_port();
    std::fs::write(
        dir.path("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [\"{rules}\"]\nscrape_configs:\n  - job_name: sidecar\n    static_configs: [{{targets: [\"127.0.0.1:{admin}\"]}}]\n",
            rules = repo("deploy/prometheus/agentmesh-alerts.yml").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path("prometheus.log")).unwrap();
    let child = Command::new(tool("prometheus"))
        .arg(format!(
            "--config.file={}",
            dir.path("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("prometheus starts");
    (Proc(child), port)
}

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// An instant query's answer (`data`), whatever it is.
async fn query_data(port: u16, q: &str) -> Value {
    let r: Value = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/api/v1/query"))
        .query(&[("query", q)])
        .send()
        .await
        .expect("prometheus answers")
        .json()
        .await
        .expect("json");
    assert_eq!(r["status"], "success", "`{q}`: {r}");
    r["data"].clone()
}

/// The single value of an instant query, once Prometheus has one.
async fn query(port: u16, q: &str, want: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Value::Null;
    while Instant::now() < deadline {
        if let Ok(r) = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/api/v1/query"))
            .query(&[("query", q)])
            .send()
            .await
        {
            last = r.json().await.unwrap_or(Value::Null);
            let v = last["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok());
            if let Some(v) = v.filter(|v| want(*v)) {
                return v;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("Prometheus never answered `{q}` as expected; last answer: {last}");
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_sidecar() {
    let m = mesh("telemetry-prometheus").await;
    let n = traffic(&m.sc).await;
    m.sc.wait_calls(n).await;
    let (_prom, port) = prometheus(&m.dir, m.sc.admin);
    assert_eq!(query(port, r#"up{job="sidecar"}"#, |v| v == 1.0).await, 1.0);
    assert_eq!(
        query(port, "sum(agentmesh_requests_total)", |v| v > 0.0).await,
        n as f64
    );
    assert_eq!(
        query(
            port,
            r#"sum by (decision) (agentmesh_requests_total{decision="deny"})"#,
            |v| v > 0.0
        )
        .await,
        1.0
    );
    let usd = query(port, "sum(agentmesh_llm_cost_usd_total)", |v| v > 0.0).await;
    assert!((usd - 0.088).abs() < 1e-9, "{usd}");
    // The GenAI histogram answers the SRE's p99 question.
    let p99 = query(
        port,
        "histogram_quantile(0.99, sum by (le) (gen_ai_client_operation_duration_seconds_bucket))",
        |v| v.is_finite(),
    )
    .await;
    assert!(p99 > 0.0 && p99 <= 81.92, "{p99}");
}

#[tokio::test]
async fn the_alert_rules_and_the_dashboard_queries_run_on_real_data() {
    let rules = repo("deploy/prometheus/agentmesh-alerts.yml");
    let out = Command::new(tool("promtool"))
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let m = mesh("telemetry-dashboard").await;
    let n = traffic(&m.sc).await;
    m.sc.wait_calls(n).await;
    let (_prom, port) = prometheus(&m.dir, m.sc.admin);
    // Three scrapes, so that rate() has points to work with.
    query(port, "count_over_time(up[1m])", |v| v >= 3.0).await;

    // Every rule loaded and evaluated without error.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r: Value = reqwest::get(format!("http://127.0.0.1:{port}/api/v1/rules"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let rules = r["data"]["groups"][0]["rules"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(rules.len(), 5, "{r}");
        if rules.iter().all(|x| x["health"] == "ok") {
            break;
        }
        assert!(
            Instant::now() < deadline && rules.iter().all(|x| x["health"] != "err"),
            "{r}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Every dashboard panel's query is valid PromQL over these metrics, and each has data,
    // but the 5xx share (no call failed).
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/agentmesh-dashboard.json")).unwrap(),
    )
    .unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 6);
    for p in panels {
        let expr = p["targets"][0]["expr"]
            .as_str()
            .unwrap()
            .replace("$__rate_interval", "1m");
        let data = query_data(port, &expr).await;
        let empty = data["result"].as_array().is_none_or(|r| r.is_empty());
        let title = p["title"].as_str().unwrap();
        assert_eq!(
            empty,
            title.starts_with("5xx"),
            "{title}: `{expr}` gave {data}"
        );
    }
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const AGENT_SPAN: &str = "00f067aa0ba902b7";

async fn post_traced(url: &str, body: &Value) -> (u16, Value) {
    let parent = format!("00-{TRACE}-{AGENT_SPAN}-01");
    let headers = [
        ("traceparent", parent.as_str()),
        ("tracestate", "vendor=agent"),
    ];
    agentmesh_tests::post_json(url, &headers, body).await
}

#[tokio::test]
async fn each_call_is_a_span_that_continues_the_agents_trace() {
    let rx = Receiver::grpc().await;
    let m = mesh_with(
        "telemetry-traces",
        &format!(
            "telemetry: {{traces: {{endpoint: \"http://127.0.0.1:{}\", headers: {{x-collector-key: s3cret}}}}}}\n",
            rx.port
        ),
    )
    .await;
    let ping = json!([{"role": "user", "content": "ping secret-prompt"}]);
    let chat = m.sc.url("/llm/openai/v1/chat/completions");
    let (s, v) = post_traced(&chat, &json!({"model": "gpt-4o-mini", "messages": ping})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = post_traced(&chat, &json!({"model": "gpt-5", "messages": ping})).await;
    assert_eq!(s, 403, "{v}");
    let (s, echo) = post_traced(&m.sc.url("/http/echo/echo"), &json!({"x": 1})).await;
    assert_eq!(s, 200, "{echo}");

    let spans = rx.wait(|s| s.len() >= 3).await;
    let find = |name: &str| {
        spans
            .iter()
            .find(|s| s.name() == name)
            .unwrap_or_else(|| panic!("no span {name}: {spans:#?}"))
    };
    let allowed = find("chat gpt-4o-mini");
    assert_eq!(allowed.service, "agentmesh-sidecar/tester");
    assert_eq!(allowed.trace_id(), TRACE, "the agent's trace is continued");
    assert_eq!(allowed.parent_span_id(), AGENT_SPAN);
    for (k, v) in [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.provider.name", "openai"),
        ("gen_ai.request.model", "gpt-4o-mini"),
        ("gen_ai.usage.input_tokens", "6"),
        ("gen_ai.usage.output_tokens", "5"),
        ("agentmesh.decision", "allow"),
        ("agentmesh.source.agent", "tester"),
        ("agentmesh.destination", "llm/openai"),
        ("http.response.status_code", "200"),
    ] {
        assert_eq!(allowed.attr(k).as_deref(), Some(v), "{k} of {allowed:#?}");
    }
    // In: 2 words + 4 for the message; out: the mock's 5-word reply to this prompt.
    // 6 × 0.001 + 5 × 0.002
    let usd: f64 = allowed.attr("agentmesh.cost.usd").unwrap().parse().unwrap();
    assert!((usd - 0.016).abs() < 1e-9, "{usd}");
    assert!(allowed.attr("gen_ai.response.model").is_some());

    let denied = find("chat gpt-5");
    assert_eq!(denied.attr("agentmesh.decision").as_deref(), Some("deny"));
    assert_eq!(
        denied.attr("agentmesh.policy.reason").as_deref(),
        Some("model not allowed")
    );
    assert_eq!(
        denied.attr("http.response.status_code").as_deref(),
        Some("403")
    );

    // The upstream got this call's span as its parent, in the same trace.
    let echoed = find("POST http/echo");
    let sent = echo["headers"]["traceparent"].as_str().unwrap_or_default();
    assert_eq!(
        sent,
        format!("00-{TRACE}-{}-01", echoed.span_id()),
        "{echo}"
    );
    assert_ne!(echoed.span_id(), AGENT_SPAN);

    // The configured headers go with each export, and stay out of the config dump.
    assert!(
        rx.last_headers()
            .contains(&("x-collector-key".into(), "s3cret".into())),
        "{:?}",
        rx.last_headers()
    );
    let dump = m.sc.config_dump().await;
    assert_eq!(
        dump["config"]["telemetry"]["traces"]["headers"]["x-collector-key"],
        "<redacted>"
    );
    assert!(!dump.to_string().contains("s3cret"));
    // No prompt text anywhere in a span without capture_content.
    for s in &spans {
        for kv in &s.span.attributes {
            assert!(
                !format!("{:?}", kv.value).contains("secret-prompt"),
                "{kv:?}"
            );
        }
    }
    // The exporter counts a batch once the collector has answered for it.
    let stats = wait_stats(&m.sc, |s| s["traces"]["exported"] == 3).await;
    assert_eq!(stats["traces"]["ended"], 3, "{stats}");
    // The access log names each call's trace and the policy's time.
    for line in m.sc.wait_calls(3).await {
        assert_eq!(line["trace_id"], TRACE, "{line}");
        assert_eq!(line["source"], "tester", "{line}");
        assert!(
            line["decision"]["eval_ms"].as_f64().unwrap() > 0.0,
            "{line}"
        );
    }
}

#[tokio::test]
async fn two_sidecars_put_a_delegation_in_one_trace_over_otlp_http() {
    let rx = Receiver::http().await;
    let telemetry = format!(
        "telemetry: {{traces: {{endpoint: \"http://127.0.0.1:{}/v1/traces\", protocol: http}}}}\n",
        rx.port
    );
    // B: the callee's sidecar, inbound to its agent (the mock's echo stands in for it).
    let b_dir = Scratch::new("telemetry-two-b");
    let b_agent = Fixture::mock_llm(&b_dir, &[]).await;
    std::fs::create_dir_all(b_dir.path("policy")).unwrap();
    std::fs::write(b_dir.path("policy/authz.rego"), POLICY).unwrap();
    let b_sc = Sidecar::start(
        &b_dir,
        &format!(
            "inbound: {{forward_to: \"127.0.0.1:{}\", kind: http, allow_plaintext: true}}\npolicy: {{path: policy}}\n{telemetry}",
            b_agent.port
        ),
    )
    .await;
    // A: the caller's sidecar, with B's inbound listener as `agents/b`.
    let a_dir = Scratch::new("telemetry-two-a");
    std::fs::create_dir_all(a_dir.path("policy")).unwrap();
    std::fs::write(a_dir.path("policy/authz.rego"), POLICY).unwrap();
    let a_sc = Sidecar::start(
        &a_dir,
        &format!(
            "upstreams:\n  - {{name: agents/b, endpoints: [\"http://127.0.0.1:{}\"]}}\npolicy: {{path: policy}}\n{telemetry}",
            b_sc.inbound
        ),
    )
    .await;
    let send = json!({"jsonrpc": "2.0", "id": 1, "method": "message/send",
        "params": {"message": {"role": "user", "messageId": "m1", "parts": [{"kind": "text", "text": "hi"}]}}});
    let (s, echo) = post_traced(&a_sc.url("/agents/b/debug/echo"), &send).await;
    assert_eq!(s, 200, "{echo}");

    let spans = rx.wait(|s| s.len() >= 2).await;
    let client = spans
        .iter()
        .find(|s| s.span.kind == 3)
        .expect("A's client span");
    let server = spans
        .iter()
        .find(|s| s.span.kind == 2)
        .expect("B's server span");
    assert_eq!(client.name(), "message/send agents/b");
    assert_eq!(
        client.attr("agentmesh.a2a.method").as_deref(),
        Some("message/send")
    );
    assert_eq!(client.trace_id(), TRACE);
    assert_eq!(client.parent_span_id(), AGENT_SPAN);
    assert_eq!(server.trace_id(), TRACE, "one trace across both sidecars");
    assert_eq!(
        server.parent_span_id(),
        client.span_id(),
        "B's span is A's child"
    );
    // B's agent got B's span as its parent.
    let sent = echo["headers"]["traceparent"].as_str().unwrap_or_default();
    assert_eq!(sent, format!("00-{TRACE}-{}-01", server.span_id()));
}

#[tokio::test]
async fn calls_go_on_when_the_collector_is_down_and_lost_spans_are_counted() {
    let closed = free_port();
    let m = mesh_with(
        "telemetry-down",
        &format!(
            "telemetry: {{traces: {{endpoint: \"http://127.0.0.1:{closed}\", timeout: 1s}}}}\n"
        ),
    )
    .await;
    let n = traffic(&m.sc).await;
    m.sc.wait_calls(n).await;
    let stats = wait_stats(&m.sc, |s| s["traces"]["export_failed"] == n as u64).await;
    assert_eq!(stats["traces"]["exported"], 0, "{stats}");
    assert_eq!(stats["traces"]["ended"], n as u64, "{stats}");
}

/// `/stats` once `pred` holds (within 15 s).
async fn wait_stats(sc: &Sidecar, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let stats: Value = reqwest::get(format!("http://127.0.0.1:{}/stats", sc.admin))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if pred(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "/stats never got there: {stats}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads server-sent events from `/tap` until `n` data events arrived.
async fn tap_events(resp: reqwest::Response, n: usize) -> Vec<Value> {
    use futures::StreamExt;
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while events.len() < n {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("only {} tap events in time: {text}", events.len()))
            .expect("the tap stream stays open")
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
        events = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
    }
    events
}

#[tokio::test]
async fn the_tap_streams_calls_live_with_filters() {
    let m = mesh("telemetry-tap").await;
    let tap = |q: &str| {
        reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/tap{q}", m.sc.admin))
            .send()
    };
    let all = tap("").await.unwrap();
    assert_eq!(all.headers()["content-type"], "text/event-stream");
    let denials = tap("?kind=llm&decision=deny").await.unwrap();
    let slow = tap("?min_ms=60000").await.unwrap();
    let bad = tap("?user=bob").await.unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("unknown filter `user`"));

    let n = traffic(&m.sc).await;
    let events = tap_events(all, n).await;
    assert_eq!(events.len(), n);
    let first = &events[0];
    assert_eq!(first["source"], "tester");
    assert_eq!(first["target"], "llm/openai");
    assert_eq!(first["subject"], "gpt-4o-mini");
    assert_eq!(first["decision"], "allow");
    assert_eq!(
        (
            first["input_tokens"].as_u64(),
            first["output_tokens"].as_u64()
        ),
        (Some(5), Some(4))
    );
    assert!(
        (first["cost_usd"].as_f64().unwrap() - 0.013).abs() < 1e-9,
        "{first}"
    );

    let denied = tap_events(denials, 1).await;
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["subject"], "gpt-5");
    assert_eq!(denied[0]["reason"], "model not allowed");
    assert_eq!(denied[0]["status"], 403);

    // Nothing took a minute: the stream is open but carries no event.
    use futures::StreamExt;
    let mut s = slow.bytes_stream();
    let first_chunk = s.next().await.unwrap().unwrap();
    assert_eq!(&first_chunk[..], b": agentmesh tap\n\n");
    assert!(tokio::time::timeout(Duration::from_millis(500), s.next())
        .await
        .is_err());
}

#[tokio::test]
async fn agentmesh_tap_and_top_show_the_calls() {
    let m = mesh("telemetry-cli").await;
    let admin = format!("127.0.0.1:{}", m.sc.admin);
    let cli = agentmesh_tests::bin_dir().join("agentmesh");
    let run = |args: &[&str]| {
        Command::new(&cli)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("agentmesh runs")
    };
    let tap = run(&["tap", "--admin", &admin, "--count", "5"]);
    let top = run(&["top", "--admin", &admin, "--once", "5"]);
    wait_stats(&m.sc, |s| s["tap"]["watchers"] == 2).await;
    let n = traffic(&m.sc).await;
    assert_eq!(n, 5);

    let tap = tokio::task::spawn_blocking(move || tap.wait_with_output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&tap.stdout);
    assert!(
        tap.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&tap.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "a header and one row per call:\n{text}");
    assert!(
        lines[0].starts_with("TIME") && lines[0].contains("DECISION"),
        "{text}"
    );
    let denied = lines
        .iter()
        .find(|l| l.contains("gpt-5"))
        .expect("the denied call");
    assert!(
        denied.contains(" deny ") && denied.contains(" 403 "),
        "{denied}"
    );
    assert!(denied.ends_with("(model not allowed)"), "{denied}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("claude-haiku-4-5") && l.contains("5/4")),
        "{text}"
    );

    let top = tokio::task::spawn_blocking(move || top.wait_with_output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&top.stderr)
    );
    let row = |dest: &str| {
        text.lines()
            .find(|l| l.starts_with("tester") && l.contains(dest))
            .unwrap_or_else(|| panic!("no row for {dest}:\n{text}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // SOURCE DESTINATION RPS SUCCESS DENIED P50 ms P99 ms TOK/S USD
    let openai = row("llm/openai");
    assert_eq!(openai[4], "1", "one denied: {openai:?}");
    assert_eq!(openai[3], "66.7%", "{openai:?}");
    let anthropic = row("llm/anthropic");
    assert_eq!(anthropic[3], "100.0%", "{anthropic:?}");
    assert_eq!(anthropic[10], "0.062000", "{anthropic:?}");
}

#[tokio::test]
async fn capture_content_puts_prompts_and_completions_in_spans() {
    let rx = Receiver::grpc().await;
    let m = mesh_with(
        "telemetry-content",
        &format!(
            "telemetry: {{traces: {{endpoint: \"http://127.0.0.1:{}\", capture_content: true}}}}\n",
            rx.port
        ),
    )
    .await;
    let chat = m.sc.url("/llm/openai/v1/chat/completions");
    let ping = json!([{"role": "user", "content": "ping secret-prompt"}]);
    let (s, reply) = post_traced(&chat, &json!({"model": "gpt-4o-mini", "messages": ping})).await;
    assert_eq!(s, 200, "{reply}");
    let spans = rx.wait(|s| !s.is_empty()).await;
    let input = spans[0].attr("gen_ai.input.messages").expect("the prompt");
    let input: Value = serde_json::from_str(&input).unwrap();
    assert_eq!(input["messages"], ping);
    let output = spans[0]
        .attr("gen_ai.output.messages")
        .expect("the completion");
    let output: Value = serde_json::from_str(&output).unwrap();
    assert_eq!(output["choices"], reply["choices"]);
}
