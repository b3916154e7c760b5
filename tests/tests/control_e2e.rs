//! The control server with real sidecars (issue 5): grants pushed per agent and nothing more,
//! routing to agents by name and by skill, policy changes and grant removals pushed live, a bad
//! config file refused with the running config kept, a sidecar's NACK kept out of service and
//! visible in the API, the control server killed and restarted under traffic, a sidecar
//! restarted while the control server is down, and the registry API.

use agentmesh_tests::control::{write_file, write_mesh, Control};
use agentmesh_tests::{post_json, Fixture, Scratch, Sidecar};
use reqwest::Method;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn chat() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]})
}

/// The mesh the suites run: a mock LLM and an MCP server as upstreams, a planner that may call
/// the LLM, the writer by name and any summarizer by skill, and a writer that alone may call the
/// tools.
fn mesh_yaml(llm: u16, tools: u16, planner_upstreams: &str) -> String {
    format!(
        r#"upstreams:
  - name: llm/mock
    api: openai
    endpoints: ["http://127.0.0.1:{llm}"]
  - name: mcp/tools
    endpoints: ["http://127.0.0.1:{tools}/mcp"]
policies:
  - name: standard
    path: policy
agents:
  - name: planner
    owner: team-a
    tags: [demo]
    calls:
      upstreams: [{planner_upstreams}]
      agents: [writer]
      skills: [summarize]
    policy: standard
  - name: writer
    owner: team-b
    description: Writes and summarizes
    skills:
      - {{id: summarize, name: Summarize, tags: [text]}}
    calls: {{upstreams: [mcp/tools]}}
    policy: standard
"#
    )
}

/// A sidecar of `agent` subscribed to `control`; `extra` adds YAML (e.g. `inbound`).
async fn sidecar(
    dir: &Scratch,
    agent: &str,
    control: &Control,
    mode: &str,
    extra: &str,
) -> Sidecar {
    let address = control.address();
    let persist = dir.path("last-good.pb");
    let extra = extra.to_string();
    Sidecar::start_agent(dir, agent, move |_, _, _| {
        format!(
            "control: {{address: \"{address}\", mode: {mode}, persist_file: \"{}\"}}\n{extra}",
            persist.display()
        )
    })
    .await
}

/// Waits until the sidecars' access logs hold `n` calls between them (lines are written as
/// calls end, off the request path).
async fn wait_total(sidecars: &[&Sidecar], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let total: usize = sidecars.iter().map(|s| s.calls().len()).sum();
        if total >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "access logs hold {total} calls, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn upstream_names(dump: &Value) -> Vec<String> {
    dump["config"]["upstreams"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|u| u["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

async fn get(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.expect("answers");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Waits until `f` gives `want`.
async fn eventually<T: PartialEq + std::fmt::Debug, F: std::future::Future<Output = T>>(
    what: &str,
    want: T,
    f: impl Fn() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = f().await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_routes_and_live_changes_reach_each_sidecar() {
    let dir = Scratch::new("ctl-grants");
    let llm = Fixture::mock_llm(&dir, &[]).await;
    let tools = Fixture::mcp_tools(&dir).await;
    let conf = dir.path("mesh");
    write_mesh(&conf, &mesh_yaml(llm.port, tools.port, "llm/mock"));
    let control = Control::start(&conf).await;

    // The writer serves plain HTTP (the mock LLM stands in for its server).
    let wdir = Scratch::new("ctl-writer");
    let writer = sidecar(
        &wdir,
        "writer",
        &control,
        "delta",
        &format!(
            "inbound: {{forward_to: \"127.0.0.1:{}\", kind: http, allow_plaintext: true}}\n",
            llm.port
        ),
    )
    .await;
    let pdir = Scratch::new("ctl-planner");
    let planner = sidecar(&pdir, "planner", &control, "delta", "").await;

    // Zero trust for config: each sidecar holds exactly its grants.
    let dump = planner
        .wait_dump(|d| upstream_names(d).contains(&"agents/writer".to_string()))
        .await;
    let mut names = upstream_names(&dump);
    names.sort();
    assert_eq!(names, ["agents/writer", "llm/mock"], "{dump}");
    assert_eq!(
        dump["config"]["routes"][0]["name"],
        "agents/by-skill/summarize"
    );
    assert_eq!(
        dump["config"]["routes"][0]["upstreams"],
        json!(["agents/writer"])
    );
    let module = dump["policy"]["modules"][0].as_str().unwrap_or_default();
    assert!(module.ends_with("mesh/policy/authz.rego"), "{dump}");
    let wdump = writer.config_dump().await;
    assert_eq!(upstream_names(&wdump), ["mcp/tools"], "{wdump}");
    let (s, ready) = get(&format!(
        "http://127.0.0.1:{}/readyz?fresh=1",
        planner.admin
    ))
    .await;
    assert_eq!(s, 200, "{ready}");
    assert_eq!(ready["control"]["fresh"], true);
    assert_eq!(ready["control"]["source"], "control");

    // Calls: the LLM, the writer by name and by skill; the tools are not the planner's.
    let (s, v) = post_json(&planner.url("/llm/mock/v1/chat/completions"), &[], &chat()).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = get(&planner.url("/agents/writer/healthz")).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = get(&planner.url("/agents/by-skill/summarize/healthz")).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = post_json(
        &planner.url("/mcp/tools"),
        &[],
        &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(
        v["error"]["data"]["type"], "not_granted",
        "a JSON-RPC error for MCP: {v}"
    );

    // The API sees both sidecars, each having ACKed what it was sent.
    let sidecars = control
        .wait("/v1/sidecars", |v| {
            v["sidecars"].as_array().is_some_and(|a| {
                a.len() == 2
                    && a.iter()
                        .all(|s| s["connected"] == true && s["acked_version"] == s["sent_version"])
            })
        })
        .await;
    assert!(sidecars["sidecars"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["agent"] == "writer"
            && s["inbound_url"] == format!("http://127.0.0.1:{}", writer.inbound)));
    let found = control.get("/v1/agents?skill=summarize").await;
    assert_eq!(found["agents"].as_array().unwrap().len(), 1, "{found}");
    assert_eq!(found["agents"][0]["name"], "writer");
    assert_eq!(found["agents"][0]["healthy"], true);

    // A sidecar for an agent nobody declared gets nothing, and says why.
    let sdir = Scratch::new("ctl-stranger");
    let admin = agentmesh_tests::free_port();
    let stranger_config = sdir.path("sidecar.yaml");
    std::fs::write(
        &stranger_config,
        Sidecar::config_text_for(
            "stranger",
            agentmesh_tests::free_port(),
            admin,
            agentmesh_tests::free_port(),
            &format!("control: {{address: \"{}\"}}\n", control.address()),
        ),
    )
    .unwrap();
    let _stranger = agentmesh_tests::spawn(
        "agentmesh-proxy",
        &["--config", stranger_config.to_str().unwrap()],
        &sdir.path("sidecar.log"),
    );
    let ready = format!("http://127.0.0.1:{admin}/readyz");
    let deadline = Instant::now() + Duration::from_secs(15);
    let why = loop {
        if let Ok(r) = reqwest::get(&ready).await {
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or_default();
            if let Some(e) = v["control"]["last_error"].as_str() {
                assert_eq!(status, 503, "not ready without any config: {v}");
                break e.to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the stranger's sidecar never said why"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        why.contains("NotFound") && why.contains("`stranger` is neither declared"),
        "{why}"
    );

    // A broken file is refused, named with its field, and nothing changes.
    write_file(
        &conf.join("broken.yaml"),
        "agents:\n  - name: x\n    calls: {upstreams: [llm/nowhere]}\n",
    );
    let status = control
        .wait("/v1/status", |v| {
            v["source"]["loads_rejected"].as_u64() >= Some(1)
        })
        .await;
    let err = status["source"]["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("broken.yaml") && err.contains("agents[0].calls.upstreams[0]"),
        "{err}"
    );
    let (s, _) = post_json(&planner.url("/llm/mock/v1/chat/completions"), &[], &chat()).await;
    assert_eq!(s, 200, "the running config stays in force");
    std::fs::remove_file(conf.join("broken.yaml")).unwrap();

    // A policy change reaches the sidecar and decides its next call.
    write_file(&conf.join("policy/authz.rego"),
        "package agentmesh.authz\n\ndecision := {\"allow\": false, \"reason\": \"frozen by the security team\"}\n",
    );
    let url = planner.url("/llm/mock/v1/chat/completions");
    eventually("the pushed deny policy", 403, || async {
        post_json(&url, &[], &chat()).await.0
    })
    .await;
    let (_, v) = post_json(&url, &[], &chat()).await;
    assert!(v.to_string().contains("frozen by the security team"), "{v}");

    // A grant taken away is removed from the sidecar (a delta removal).
    write_mesh(&conf, &mesh_yaml(llm.port, tools.port, ""));
    planner
        .wait_dump(|d| !upstream_names(d).contains(&"llm/mock".to_string()))
        .await;
    let (s, v) = post_json(&url, &[], &chat()).await;
    assert_eq!(
        (s, v["error"]["type"].as_str()),
        (403, Some("not_granted")),
        "{v}"
    );
    drop(writer);
    // The writer's sidecar gone, its endpoint leaves the planner's config.
    planner
        .wait_dump(|d| !upstream_names(d).contains(&"agents/writer".to_string()))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_version_never_replaces_the_last_good_one() {
    let dir = Scratch::new("ctl-nack");
    let llm = Fixture::mock_llm(&dir, &[]).await;
    let conf = dir.path("mesh");
    write_mesh(&conf, &mesh_yaml(llm.port, 9, "llm/mock"));
    let control = Control::start(&conf).await;
    // This sidecar runs the bytecode engine, which does not take `with`: a policy the control
    // server accepts (it checks with the interpreter) and this sidecar must refuse.
    let pdir = Scratch::new("ctl-nack-planner");
    let planner = sidecar(
        &pdir,
        "planner",
        &control,
        "sotw",
        "policy: {engine: bytecode}\n",
    )
    .await;
    let url = planner.url("/llm/mock/v1/chat/completions");
    assert_eq!(post_json(&url, &[], &chat()).await.0, 200);
    let good = planner.config_dump().await["policy"]["revision"].clone();

    write_file(&conf.join("policy/authz.rego"),
        "package agentmesh.authz\n\nopen if input.version == 1\n\ndecision := false if { not open with input.version as 2 }\n",
    );
    let sidecars = control
        .wait("/v1/sidecars", |v| {
            v["sidecars"][0]["nacks"].as_u64() >= Some(1)
        })
        .await;
    let s = &sidecars["sidecars"][0];
    let nack = s["last_nack"]["message"].as_str().unwrap_or_default();
    assert!(nack.contains("bytecode"), "{sidecars}");
    assert_eq!(s["last_nack"]["version"], s["sent_version"]);
    assert_ne!(s["acked_version"], s["sent_version"], "{sidecars}");
    let status = control.get("/v1/status").await;
    assert_eq!(status["sidecars_nacking"], 1, "{status}");

    // The sidecar serves on its last good version, and says why it is not fresh.
    let dump = planner.config_dump().await;
    assert_eq!(dump["policy"]["revision"], good);
    assert!(dump["control"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .contains("bytecode"));
    assert_eq!(dump["control"]["fresh"], false);
    assert_eq!(post_json(&url, &[], &chat()).await.0, 200);
    let (s, _) = get(&format!(
        "http://127.0.0.1:{}/readyz?fresh=1",
        planner.admin
    ))
    .await;
    assert_eq!(s, 503);
    let (s, _) = get(&format!("http://127.0.0.1:{}/readyz", planner.admin)).await;
    assert_eq!(s, 200, "a stale config still serves");

    // Fixed at the source: the next version is ACKed.
    write_file(
        &conf.join("policy/authz.rego"),
        "package agentmesh.authz\n\ndecision := false\n",
    );
    control
        .wait("/v1/sidecars", |v| {
            v["sidecars"][0]["acked_version"] == v["sidecars"][0]["sent_version"]
        })
        .await;
    eventually("the fixed policy", 403, || async {
        post_json(&url, &[], &chat()).await.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_server_down_and_back_under_traffic() {
    let dir = Scratch::new("ctl-restart");
    let llm = Fixture::mock_llm(&dir, &[]).await;
    let conf = dir.path("mesh");
    write_mesh(&conf, &mesh_yaml(llm.port, 9, "llm/mock"));
    let mut control = Control::start(&conf).await;
    let pdir = Scratch::new("ctl-restart-planner");
    let mut planner = sidecar(&pdir, "planner", &control, "delta", "").await;
    let url = planner.url("/llm/mock/v1/chat/completions");
    assert_eq!(post_json(&url, &[], &chat()).await.0, 200);

    // Traffic throughout: every call must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), url.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match post_json(&url, &[], &chat()).await.0 {
                    200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    control.kill();
    let ready = format!("http://127.0.0.1:{}/readyz", planner.admin);
    eventually("not fresh without the control server", 503, || async {
        get(&format!("{ready}?fresh=1")).await.0
    })
    .await;
    assert_eq!(get(&ready).await.0, 200);
    // Changed while the server is down: the sidecar gets it once the server is back.
    write_file(
        &conf.join("policy/authz.rego"),
        "package agentmesh.authz\n\n# revision 2\ndecision := true\n",
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = planner.config_dump().await["policy"]["revision"].clone();
    control.restart().await;
    planner
        .wait_dump(|d| d["policy"]["revision"] != before && d["control"]["fresh"] == true)
        .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no call failed");
    assert!(ok.load(Ordering::Relaxed) > 20, "traffic flowed");

    // A sidecar restarted while the control server is down starts on its persisted config.
    control.kill();
    let converged = planner.config_dump().await["policy"]["revision"].clone();
    planner.restart(&pdir).await;
    let dump = planner.config_dump().await;
    assert_eq!(dump["control"]["source"], "persisted", "{dump}");
    assert_eq!(dump["policy"]["revision"], converged);
    assert_eq!(
        post_json(&planner.url("/llm/mock/v1/chat/completions"), &[], &chat())
            .await
            .0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_api_registers_finds_certifies_and_guards_changes() {
    let dir = Scratch::new("ctl-api");
    let conf = dir.path("mesh");
    write_mesh(&conf, &mesh_yaml(9, 9, "llm/mock"));
    let control = Control::start(&conf).await;
    let card = json!({"name": "translator", "description": "Translates", "version": "2.0.0",
        "skills": [{"id": "translate", "name": "Translate"}]});
    let spec = json!({"name": "translator", "owner": "team-c", "tags": ["lang"],
        "skills": [{"id": "translate", "name": "Translate", "tags": ["text"]}],
        "endpoints": ["http://127.0.0.1:9999"], "card": card});

    // Changes need the admin token.
    let (s, v) = control
        .call(Method::POST, "/v1/agents", Some(&spec), false)
        .await;
    assert_eq!(s, 401, "{v}");
    let (s, v) = control
        .call(Method::POST, "/v1/agents", Some(&spec), true)
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["source"], "registered");
    assert_eq!(
        v["spiffe_id"],
        "spiffe://mesh.local/ns/default/agent/translator"
    );
    let (s, _) = control
        .call(Method::POST, "/v1/agents", Some(&spec), true)
        .await;
    assert_eq!(s, 200, "registering again replaces");

    // Bad input gets a precise error.
    let (s, v) = control
        .post("/v1/agents", &json!({"name": "Bad Name"}), true)
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("field `name`"),
        "{v}"
    );
    let (s, v) = control
        .post(
            "/v1/agents",
            &json!({"name": "sneaky", "calls": {"upstreams": ["llm/mock"]}}),
            true,
        )
        .await;
    assert_eq!(s, 400, "grants come from config: {v}");
    let (s, v) = control
        .post("/v1/agents", &json!({"name": "writer"}), true)
        .await;
    assert_eq!(s, 409, "{v}");

    // Search by skill, owner, tag and words.
    let names = |v: &Value| -> Vec<String> {
        v["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        names(&control.get("/v1/agents").await),
        ["planner", "translator", "writer"]
    );
    assert_eq!(
        names(&control.get("/v1/agents?skill=translate").await),
        ["translator"]
    );
    assert_eq!(
        names(&control.get("/v1/agents?owner=team-b").await),
        ["writer"]
    );
    assert_eq!(
        names(&control.get("/v1/agents?tag=demo").await),
        ["planner"]
    );
    assert_eq!(names(&control.get("/v1/agents?q=summar").await), ["writer"]);
    assert_eq!(control.get("/v1/agents/translator/card").await, card);
    let writer_card = control.get("/v1/agents/writer/card").await;
    assert_eq!(
        writer_card["skills"][0]["id"], "summarize",
        "a card made from the entry"
    );
    let health = control.get("/v1/agents/translator/health").await;
    assert_eq!(
        health["healthy"], false,
        "no sidecar has sent a heartbeat: {health}"
    );
    let (s, _) = control
        .call(Method::GET, "/v1/agents/nobody", None, false)
        .await;
    assert_eq!(s, 404);

    // Certification: which check, whether it passed, when, by whom.
    let check = json!({"check": "prompt-injection-suite", "passed": true, "by": "sec-team", "detail": "42/42"});
    let (s, v) = control
        .call(
            Method::POST,
            "/v1/agents/translator/certification",
            Some(&check),
            true,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let got = control.get("/v1/agents/translator").await;
    assert_eq!(got["certification"][0]["check"], "prompt-injection-suite");
    assert_eq!(got["certification"][0]["by"], "sec-team");
    assert!(got["certification"][0]["at_unix"].as_i64().unwrap() > 1_700_000_000);

    // The CLI reads the same registry.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(agentmesh_tests::bin_dir().join("agentmesh"))
            .args(args)
            .args(["--server", &control.url(""), "--ca"])
            .arg(control.state_dir.join("ca.pem"))
            .output()
            .expect("agentmesh runs");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let ls = cli(&["registry", "ls"]);
    let lines: Vec<&str> = ls.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{ls}");
    assert_eq!(lines.len(), 4, "{ls}");
    let row = lines
        .iter()
        .find(|l| l.starts_with("translator"))
        .expect("a translator row");
    for want in ["team-c", "translate", "1/1", "registered"] {
        assert!(row.contains(want), "{row} lacks {want}");
    }
    let found = cli(&["registry", "search", "--skill", "summarize"]);
    assert_eq!(found.lines().count(), 2, "{found}");
    assert!(
        found.lines().nth(1).unwrap().starts_with("writer"),
        "{found}"
    );
    let shown: Value = serde_json::from_str(&cli(&["registry", "show", "translator"])).unwrap();
    assert_eq!(shown["card"], card);
    let out = std::process::Command::new(agentmesh_tests::bin_dir().join("agentmesh"))
        .args([
            "registry",
            "show",
            "nobody",
            "--server",
            &control.url(""),
            "--ca",
        ])
        .arg(control.state_dir.join("ca.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no agent `nobody`"));

    // Registrations and certifications survive a restart.
    let mut control = control;
    control.restart().await;
    let got = control.get("/v1/agents/translator").await;
    assert_eq!(got["certification"][0]["passed"], true, "{got}");
    let (s, _) = control
        .call(Method::DELETE, "/v1/agents/translator", None, true)
        .await;
    assert_eq!(s, 204);
    let (s, _) = control
        .call(Method::DELETE, "/v1/agents/writer", None, true)
        .await;
    assert_eq!(s, 409, "declared agents are removed from config");
    assert_eq!(
        names(&control.get("/v1/agents").await),
        ["planner", "writer"]
    );

    // The OpenAPI document describes every path the server serves.
    let doc = control.get("/openapi.json").await;
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    for path in [
        "/v1/agents",
        "/v1/agents/{name}",
        "/v1/agents/{name}/card",
        "/v1/agents/{name}/health",
        "/v1/agents/{name}/certification",
        "/v1/sidecars",
        "/v1/status",
        "/v1/join-tokens",
        "/v1/svid",
        "/v1/trust-bundle",
        "/v1/ca",
        "/v1/ca/rollover",
        "/v1/token",
        "/v1/jwks",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} is not in the OpenAPI document"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_balance_over_live_instances_and_skill_providers() {
    let dir = Scratch::new("ctl-lb");
    let llm = Fixture::mock_llm(&dir, &[]).await;
    let conf = dir.path("mesh");
    write_mesh(&conf, "policies: [{name: standard, path: policy}]\nagents:\n  - {name: planner, calls: {agents: [writer], skills: [summarize]}, policy: standard}\n  - {name: writer, skills: [{id: summarize}], policy: standard}\n  - {name: editor, skills: [{id: summarize}], policy: standard}\n",);
    let control = Control::start(&conf).await;
    let inbound = format!(
        "inbound: {{forward_to: \"127.0.0.1:{}\", kind: http, allow_plaintext: true}}\n",
        llm.port
    );
    let (d1, d2, d3, dp) = (
        Scratch::new("ctl-lb-w1"),
        Scratch::new("ctl-lb-w2"),
        Scratch::new("ctl-lb-ed"),
        Scratch::new("ctl-lb-pl"),
    );
    let w1 = sidecar(&d1, "writer", &control, "delta", &inbound).await;
    let w2 = sidecar(&d2, "writer", &control, "delta", &inbound).await;
    let editor = sidecar(&d3, "editor", &control, "delta", &inbound).await;
    let planner = sidecar(&dp, "planner", &control, "delta", "").await;
    let endpoints = |d: &Value, name: &str| -> usize {
        d["config"]["upstreams"]
            .as_array()
            .and_then(|a| a.iter().find(|u| u["name"] == name))
            .and_then(|u| u["endpoints"].as_array())
            .map_or(0, |e| e.len())
    };
    planner
        .wait_dump(|d| endpoints(d, "agents/writer") == 2 && endpoints(d, "agents/editor") == 1)
        .await;

    // By name: over both instances of the writer.
    for _ in 0..10 {
        assert_eq!(get(&planner.url("/agents/writer/healthz")).await.0, 200);
    }
    wait_total(&[&w1, &w2], 10).await;
    let (n1, n2) = (w1.calls().len(), w2.calls().len());
    assert_eq!(n1 + n2, 10);
    assert!(
        n1 >= 3 && n2 >= 3,
        "round-robin over instances: {n1} and {n2}"
    );

    // By skill: over both agents that offer it.
    for _ in 0..10 {
        assert_eq!(
            get(&planner.url("/agents/by-skill/summarize/healthz"))
                .await
                .0,
            200
        );
    }
    wait_total(&[&w1, &w2, &editor], 20).await;
    let by_editor = editor.calls().len();
    assert!(
        (3..=7).contains(&by_editor),
        "the editor took {by_editor} of 10"
    );
    let calls = planner.wait_calls(20).await;
    let skill_calls: Vec<&Value> = calls
        .iter()
        .filter(|c| c["target"] == "agents/by-skill/summarize")
        .collect();
    assert_eq!(skill_calls.len(), 10, "{calls:?}");

    // Every call reached exactly one instance.
    let deadline = Instant::now() + Duration::from_secs(10);
    while w1.calls().len() + w2.calls().len() + editor.calls().len() < 20 {
        assert!(
            Instant::now() < deadline,
            "inbound access logs never reached 20 calls"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let n1 = w1.calls().len();

    // An instance gone: its endpoint leaves, and every call lands on the one left.
    drop(w2);
    planner
        .wait_dump(|d| endpoints(d, "agents/writer") == 1)
        .await;
    for _ in 0..10 {
        assert_eq!(get(&planner.url("/agents/writer/healthz")).await.0, 200);
    }
    assert_eq!(w1.wait_calls(n1 + 10).await.len(), n1 + 10);
}
