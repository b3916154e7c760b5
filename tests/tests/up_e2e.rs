//! `agentmesh up`, the README's demo, as a user runs it (issue 7): it starts the control server,
//! the mock LLM, two MCP servers and three agents with their sidecars from `examples/up`, runs
//! the sample conversation and prints every call. Asserted: the answer; the per-call table with
//! its hand-computed cost; the researcher's call to a tool it never declared, denied with the
//! policy's reason and never reaching the tool server; one trace across the three sidecars whose
//! tree follows the delegations; every process stopped at the end.

use agentmesh_tests::otlp::{ReceivedSpan, Receiver};
use agentmesh_tests::{bin_dir, Scratch};
use std::path::Path;

fn repo(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(p)
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_converses_through_the_mesh_and_shows_every_call() {
    let dir = Scratch::new("up");
    let otlp = Receiver::grpc().await;
    let run = dir.path("run");
    let args = vec![
        "up".to_string(),
        "--exit".into(),
        "--examples".into(),
        repo("examples/up"),
        "--policies".into(),
        repo("policies"),
        "--run-dir".into(),
        run.display().to_string(),
        "--otlp".into(),
        format!("http://127.0.0.1:{}", otlp.port),
    ];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin_dir().join("agentmesh"))
            .args(&args)
            .output()
            .expect("agentmesh up runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stdout}\n{stderr}");

    // Progress, then the answer the writer wrote from the researcher's notes.
    for step in 1..=7 {
        assert!(stdout.contains(&format!("[{step}/7] ")), "{stdout}");
    }
    assert!(
        stdout.contains("planner: working    step 2 of 3: research"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Answer: Agent meshes, in brief: every agent gets a sidecar"),
        "{stdout}"
    );
    // The table: 13 calls; tokens by the mock's rule; USD by hand from the built-in prices:
    // gpt-4o-mini $0.15/$0.60 per M: planner 19/15, researcher 25/10 + 45/10 + 68/20 tokens
    // = (19+25+45+68) × 0.15e-6 + (15+10+10+20) × 0.6e-6 = 0.00002355 + 0.000033 = 0.00005655;
    // claude-haiku-4-5 $1/$5 per M: writer 39/28 = 0.000039 + 0.00014 = 0.000179.
    // Total 0.00023555 USD, 279 tokens.
    assert!(
        stdout.contains("13 calls, 279 tokens, 0.000236 USD"),
        "{stdout}"
    );
    let row = |needle: &str| {
        stdout
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no row with {needle} in\n{stdout}"))
            .to_string()
    };
    let writer = row("claude-haiku-4-5");
    assert!(writer.contains("writer") && writer.contains("39/28") && writer.contains("0.000179"));
    assert!(row("tools/call:web_search").contains("allow"));
    assert!(row("agents/researcher").contains("message/stream"));
    // The denial: the researcher's model asked for a tool the researcher never declared.
    let denied = row("tools/call:add");
    assert!(
        denied.contains("deny") && denied.contains("403"),
        "{denied}"
    );
    assert!(
        stdout.contains("researcher → mcp/search-tools tools/call:add: agent \"researcher\" does not declare tool \"add\" of mcp/search-tools"),
        "{stdout}"
    );
    let search_log = std::fs::read_to_string(run.join("researcher/access.jsonl")).unwrap();
    let denied_line = search_log
        .lines()
        .find(|l| l.contains("\"subject\":\"tools/call:add\""))
        .unwrap_or_else(|| panic!("{search_log}"));
    assert!(denied_line.contains("\"allow\":false"), "{denied_line}");
    assert!(stdout.contains("stopping 10 processes … done"), "{stdout}");
    // Each agent's own card reached the registry through its sidecar (persisted there).
    let registry: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("control/registry.json")).unwrap())
            .unwrap();
    for agent in ["planner", "researcher", "writer"] {
        let card = &registry["cards"][agent];
        assert_eq!(card["name"], agent, "{registry}");
        assert_eq!(card["protocolVersion"], "0.3.0");
        assert_eq!(card["capabilities"]["streaming"], true);
    }
    assert_eq!(
        registry["cards"]["researcher"]["skills"][0]["id"],
        "research"
    );

    // One trace, its tree following the delegations: planner → researcher → its calls.
    let spans = otlp
        .wait(|s| {
            s.iter()
                .any(|s| s.service.ends_with("/writer") && s.name().starts_with("chat"))
                && s.len() >= 13
        })
        .await;
    let trace = spans[0].trace_id();
    assert!(
        spans.iter().all(|s| s.trace_id() == trace),
        "one trace: {:?}",
        spans
            .iter()
            .map(|s| (s.service.clone(), s.name().to_string(), s.trace_id()))
            .collect::<Vec<_>>()
    );
    let find = |service: &str, pred: &dyn Fn(&ReceivedSpan) -> bool| -> ReceivedSpan {
        spans
            .iter()
            .find(|s| s.service.ends_with(service) && pred(s))
            .cloned()
            .unwrap_or_else(|| panic!("no span of {service}: {spans:#?}"))
    };
    let delegation = find("/planner", &|s| {
        s.attr("agentmesh.destination").as_deref() == Some("agents/researcher")
    });
    let served = find("/researcher", &|s| {
        s.attr("agentmesh.a2a.method").is_some() && s.parent_span_id() == delegation.span_id()
    });
    let search = find("/researcher", &|s| {
        s.attr("gen_ai.tool.name").as_deref() == Some("web_search")
    });
    assert_eq!(
        search.parent_span_id(),
        served.span_id(),
        "the researcher's tool call is a child of the call it serves"
    );
    let planned = find("/researcher", &|s| s.name().starts_with("chat"));
    assert_eq!(planned.parent_span_id(), served.span_id());
    let to_writer = find("/planner", &|s| {
        s.attr("agentmesh.destination").as_deref() == Some("agents/writer")
    });
    let writer_served = find("/writer", &|s| s.parent_span_id() == to_writer.span_id());
    let writer_chat = find("/writer", &|s| s.name().starts_with("chat"));
    assert_eq!(writer_chat.parent_span_id(), writer_served.span_id());
    let usd: f64 = writer_chat
        .attr("agentmesh.cost.usd")
        .unwrap()
        .parse()
        .unwrap();
    assert!((usd - 0.000179).abs() < 1e-12, "{usd}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_stays_up_until_ctrl_c_then_every_process_stops() {
    use std::io::{BufRead, BufReader};
    let dir = Scratch::new("up-ctrl-c");
    let run = dir.path("run");
    let mut child = std::process::Command::new(bin_dir().join("agentmesh"))
        .args([
            "up",
            "--examples",
            &repo("examples/up"),
            "--policies",
            &repo("policies"),
        ])
        .args(["--run-dir", run.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut admins = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(addr) = line.trim().strip_prefix("planner     ") {
            admins.push(addr.to_string());
        }
        if let Some(addr) = line.trim().strip_prefix("writer      ") {
            admins.push(addr.to_string());
        }
        if line.contains("Press Ctrl-C") {
            break;
        }
    }
    assert_eq!(admins.len(), 2, "admin ports listed");
    // Up: the sidecars answer until Ctrl-C.
    for a in &admins {
        let r = reqwest::get(format!("http://{a}/readyz")).await.unwrap();
        assert!(r.status().is_success());
    }
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.starts_with("stopping 10 processes … done")),
        "{rest:?}"
    );
    for a in &admins {
        assert!(
            reqwest::get(format!("http://{a}/readyz")).await.is_err(),
            "{a} still answers after Ctrl-C"
        );
    }
}
