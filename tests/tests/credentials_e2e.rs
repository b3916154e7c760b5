//! Held credentials (issue 6): the provider key lives in the sidecar (a file, or a secret the
//! control server pushes) and is injected on the way out, in the header the API expects; any key
//! the agent sends is stripped; the value never appears in logs, traces, config dumps, metrics or
//! decision logs; an upstream naming a credential nobody holds is a config error.

use agentmesh_tests::control::{write_file, Control, ALLOW_ALL};
use agentmesh_tests::echo::Echo;
use agentmesh_tests::otlp::Receiver;
use agentmesh_tests::{bin_dir, Scratch, Sidecar};
use serde_json::{json, Value};

const HELD: &str = "sk-held-SECRET-4242";
const ANTHROPIC: &str = "sk-ant-held-SECRET-7777";

async fn call(sc: &Sidecar, path: &str, headers: &[(&str, &str)]) -> Value {
    let mut r = reqwest::Client::new().post(sc.url(path)).json(&json!({
        "model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]
    }));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.json().await.unwrap()
}

fn header<'a>(echoed: &'a Value, name: &str) -> Option<&'a str> {
    echoed["headers"][name].as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_credentials_replace_the_agents_and_never_show() {
    let dir = Scratch::new("creds");
    let echo = Echo::start().await;
    let otlp = Receiver::grpc().await;
    std::fs::write(dir.path("openai.key"), format!("{HELD}\n")).unwrap();
    let body = format!(
        "credentials:\n  - {{name: openai-key, file: openai.key}}\n  - {{name: anthropic-key, env: AGENTMESH_TEST_ANTHROPIC_KEY}}\nupstreams:\n  - {{name: llm/openai, endpoints: [\"{u}\"], credential: {{secret: openai-key}}}}\n  - {{name: llm/anthropic, endpoints: [\"{u}\"], credential: {{secret: anthropic-key}}}}\n  - {{name: http/plain, endpoints: [\"{u}\"]}}\ntelemetry: {{traces: {{endpoint: \"http://127.0.0.1:{p}\", capture_content: true}}}}\n",
        u = echo.url(""),
        p = otlp.port
    );
    let sc =
        Sidecar::start_with_env(&dir, &body, &[("AGENTMESH_TEST_ANTHROPIC_KEY", ANTHROPIC)]).await;

    // The agent's own keys are dropped; the held ones go out, each in its API's header.
    let got = call(
        &sc,
        "/llm/openai/v1/chat/completions",
        &[
            ("authorization", "Bearer sk-agent-own"),
            ("x-api-key", "agent"),
        ],
    )
    .await;
    assert_eq!(
        header(&got, "authorization"),
        Some(format!("Bearer {HELD}").as_str()),
        "{got}"
    );
    assert_eq!(header(&got, "x-api-key"), None, "{got}");
    let got = call(
        &sc,
        "/llm/anthropic/v1/messages",
        &[("x-api-key", "sk-agent-own"), ("authorization", "Bearer x")],
    )
    .await;
    assert_eq!(header(&got, "x-api-key"), Some(ANTHROPIC), "{got}");
    assert_eq!(header(&got, "authorization"), None, "{got}");
    let got = call(
        &sc,
        "/http/plain/x",
        &[
            ("authorization", "Bearer sk-agent-own"),
            ("cookie", "s=1"),
            ("api-key", "azure"),
        ],
    )
    .await;
    for h in ["authorization", "cookie", "api-key"] {
        assert_eq!(
            header(&got, h),
            None,
            "{h} reached an upstream without a credential: {got}"
        );
    }

    // Nowhere to be seen.
    otlp.wait(|s| s.len() >= 3).await;
    let spans = format!("{:?}", otlp.spans());
    let admin = |path: &'static str| {
        let url = format!("http://127.0.0.1:{}{path}", sc.admin);
        async move { reqwest::get(url).await.unwrap().text().await.unwrap() }
    };
    let places = [
        (
            "sidecar log",
            std::fs::read_to_string(dir.path("sidecar.log")).unwrap(),
        ),
        (
            "access log",
            std::fs::read_to_string(&sc.access_log).unwrap(),
        ),
        (
            "decision log",
            std::fs::read_to_string(dir.path("decisions.jsonl")).unwrap(),
        ),
        ("spans", spans),
        ("/config_dump", admin("/config_dump").await),
        ("/stats", admin("/stats").await),
        ("/metrics", admin("/metrics").await),
    ];
    for (place, text) in places {
        for secret in [HELD, ANTHROPIC, "sk-agent-own"] {
            assert!(!text.contains(secret), "{secret} appears in the {place}");
        }
    }
    assert!(
        admin("/config_dump").await.contains("openai-key"),
        "names are shown, values are not"
    );

    // An upstream naming a credential nobody holds does not load.
    let bad = dir.path("bad.yaml");
    std::fs::write(&bad, "agent: {name: p}\nupstreams: [{name: llm/openai, endpoints: [\"http://x\"], credential: {secret: nope}}]\n").unwrap();
    let out = std::process::Command::new(bin_dir().join("agentmesh-proxy"))
        .args(["--check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("credential `nope`") && err.contains("llm/openai"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_pushed_by_the_control_server_is_the_credential() {
    let dir = Scratch::new("creds-ctl");
    let echo = Echo::start().await;
    let conf = dir.path("mesh");
    write_file(&conf.join("policy/authz.rego"), ALLOW_ALL);
    std::fs::write(conf.join("openai.key"), HELD).unwrap();
    std::fs::write(
        conf.join("mesh.yaml"),
        format!(
            "secrets: [{{name: openai-key, file: openai.key}}]\nupstreams: [{{name: llm/openai, endpoints: [\"{}\"], credential: {{secret: openai-key}}}}]\npolicies: [{{name: p, path: policy}}]\nagents: [{{name: planner, calls: {{upstreams: [llm/openai]}}, policy: p, secrets: [openai-key]}}]\n",
            echo.url("")
        ),
    )
    .unwrap();
    let control = Control::start(&conf).await;
    // A sidecar whose stream is not bound to the agent by an SVID is sent no secrets: the
    // upstream's credential is missing, and it says so (a NACK), serving nothing.
    let plain_dir = Scratch::new("creds-ctl-plain");
    let admin = agentmesh_tests::free_port();
    let config = plain_dir.path("sidecar.yaml");
    std::fs::write(
        &config,
        Sidecar::config_text_for(
            "planner",
            agentmesh_tests::free_port(),
            admin,
            agentmesh_tests::free_port(),
            &format!(
                "control: {{address: \"{}\", persist_file: \"{}\"}}\n",
                control.address(),
                plain_dir.path("last-good.pb").display()
            ),
        ),
    )
    .unwrap();
    let _plain = agentmesh_tests::spawn(
        "agentmesh-proxy",
        &["--config", config.to_str().unwrap()],
        &plain_dir.path("sidecar.log"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let v: Value = match reqwest::get(format!("http://127.0.0.1:{admin}/readyz")).await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => Value::Null,
        };
        let err = v["control"]["last_error"].as_str().unwrap_or_default();
        if err.contains("credential `openai-key`") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no NACK for the missing secret: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let sc = control.identity_sidecar(&dir, "planner", None, "").await;
    sc.wait_dump(|d| d["control"]["secrets"] == json!(["openai-key"]))
        .await;
    let got = call(
        &sc,
        "/llm/openai/v1/chat/completions",
        &[("authorization", "Bearer sk-agent-own")],
    )
    .await;
    assert_eq!(
        header(&got, "authorization"),
        Some(format!("Bearer {HELD}").as_str()),
        "{got}"
    );
    let dump = sc.config_dump().await.to_string();
    assert!(
        !dump.contains(HELD),
        "the pushed secret's value is not in /config_dump"
    );
    let log = std::fs::read_to_string(dir.path("sidecar.log")).unwrap();
    assert!(!log.contains(HELD));
}
