//! `agentmesh-agent` as a process behind a real sidecar (issue 7): a task that asks a human
//! waits in `input-required` and resumes on the answer hours later (a clock the test moves), or
//! fails when the question expired; its changes are pushed, with their token, through the
//! sidecar to a mesh name; and an agent killed mid-task resumes it on restart without repeating
//! the tool call it had completed, re-sending its delegation with the same message id.

use agentmesh_tests::{free_port, spawn, wait_ok_or, Fixture, Proc, Scratch, Sidecar};
use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A stand-in HTTP server that records what it is sent and answers with `answer`.
type Seen = Arc<Mutex<Vec<(HeaderMap, Value)>>>;

async fn server<F, Fut>(answer: F) -> (u16, Seen)
where
    F: Fn(usize, Value) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = axum::response::Response> + Send,
{
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().fallback(post(move |h: HeaderMap, body: Bytes| {
        let (s, answer) = (s.clone(), answer.clone());
        async move {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let n = {
                let mut s = s.lock().unwrap();
                s.push((h, v.clone()));
                s.len()
            };
            answer(n, v).await
        }
    }));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(l, app).await });
    (port, seen)
}

struct Agent {
    listen: u16,
    manifest: std::path::PathBuf,
    clock: std::path::PathBuf,
    log: std::path::PathBuf,
    proc: Option<Proc>,
}

impl Agent {
    async fn start(dir: &Scratch, sidecar: &Sidecar, body: &str) -> Agent {
        let listen = free_port();
        let manifest = dir.path("agent.yaml");
        std::fs::write(
            &manifest,
            format!(
                "name: approver\nmodel: {{provider: openai, name: gpt-4o-mini}}\ntools: [search]\nsidecar: \"{}\"\nlisten: \"127.0.0.1:{listen}\"\n{body}",
                sidecar.url("")
            ),
        )
        .unwrap();
        let mut a = Agent {
            listen,
            manifest,
            clock: dir.path("clock"),
            log: dir.path("agent.log"),
            proc: None,
        };
        a.restart().await;
        a
    }

    async fn restart(&mut self) {
        self.proc = None;
        let log = self.log.with_extension(format!("{}.log", free_port()));
        self.proc = Some(spawn(
            "agentmesh-agent",
            &[
                "--manifest",
                self.manifest.to_str().unwrap(),
                "--clock-file",
                self.clock.to_str().unwrap(),
            ],
            &log,
        ));
        wait_ok_or(
            &format!("http://127.0.0.1:{}/healthz", self.listen),
            Some(&log),
        )
        .await;
    }

    fn set_clock(&self, ms: u64) {
        std::fs::write(&self.clock, ms.to_string()).unwrap();
    }

    async fn rpc(&self, method: &str, params: Value) -> Value {
        reqwest::Client::new()
            .post(format!("http://127.0.0.1:{}/", self.listen))
            .json(&json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn send(&self, message: Value, configuration: Value) -> Value {
        self.rpc(
            "message/send",
            json!({"message": message, "configuration": configuration}),
        )
        .await
    }
}

fn message(id: &str, text: &str) -> Value {
    json!({"kind": "message", "role": "user", "messageId": id, "parts": [{"kind": "text", "text": text}]})
}

const T0: u64 = 1_800_000_000_000;
const HOUR: u64 = 3_600_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_waits_for_a_human_resumes_hours_later_and_pushes_its_changes() {
    let dir = Scratch::new("a2a-human");
    let tools = Fixture::mcp_tools(&dir).await;
    // The webhook is down at first: notifications wait in the agent's outbox.
    let hook_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let up = hook_up.clone();
    let (hook, pushed) = server(move |_, _| {
        let up = up.load(std::sync::atomic::Ordering::SeqCst);
        async move {
            let status = if up { 200 } else { 503 };
            axum::response::IntoResponse::into_response((
                axum::http::StatusCode::from_u16(status).unwrap(),
                "",
            ))
        }
    })
    .await;
    let sidecar = Sidecar::start(
        &dir,
        &format!(
            "upstreams:\n  - {{name: mcp/search, endpoints: [\"{}\"]}}\n  - {{name: http/hook, endpoints: [\"http://127.0.0.1:{hook}\"]}}\n",
            tools.url("/mcp")
        ),
    )
    .await;
    let agent = Agent::start(
        &dir,
        &sidecar,
        "questions_expire_after: 72h\nworkflow:\n  - {id: approve, ask: 'Publish {{input}}?'}\n  - {id: publish, tool: {server: search, name: echo, arguments: {text: 'published: {{steps.approve}}'}}}\n",
    )
    .await;
    agent.set_clock(T0);

    // The task pauses for a human, and says why.
    let push = json!({"pushNotificationConfig": {"url": "http/hook/cb", "token": "tok-1"}});
    let r = agent.send(message("m1", "the brief"), push.clone()).await;
    let task = &r["result"];
    assert_eq!(task["status"]["state"], "input-required", "{r}");
    assert_eq!(
        task["status"]["message"]["parts"][0]["text"],
        "Publish the brief?"
    );
    let id = task["id"].as_str().unwrap().to_string();
    assert_eq!(task["status"]["timestamp"], "2027-01-15T08:00:00.000Z");

    // The first notification is tried (and fails) before the agent is killed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pushed.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no notification tried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tried_before = pushed.lock().unwrap().len();

    // Five hours later (the agent restarted meanwhile), the answer arrives and the task ends.
    let mut agent = agent;
    agent.restart().await;
    hook_up.store(true, std::sync::atomic::Ordering::SeqCst);
    agent.set_clock(T0 + 5 * HOUR);
    let got = agent.rpc("tasks/get", json!({"id": id})).await;
    assert_eq!(got["result"]["status"]["state"], "input-required", "{got}");
    let answer = json!({"kind": "message", "role": "user", "messageId": "m1-answer", "taskId": id,
        "parts": [{"kind": "text", "text": "yes"}]});
    let r = agent.send(answer, json!({})).await;
    assert_eq!(r["result"]["status"]["state"], "completed", "{r}");
    assert_eq!(
        r["result"]["artifacts"][0]["parts"][0]["text"],
        "published: yes"
    );
    assert_eq!(
        r["result"]["status"]["timestamp"],
        "2027-01-15T13:00:00.000Z"
    );
    // The same message again is the same task, not a new one.
    let again = agent.send(message("m1", "the brief"), json!({})).await;
    assert_eq!(again["result"]["id"], id.as_str());
    assert_eq!(again["result"]["status"]["state"], "completed");

    // Every change was pushed, each with the token.
    let deadline = Instant::now() + Duration::from_secs(15);
    let states = loop {
        let seen = pushed.lock().unwrap().clone();
        let states: Vec<String> = seen[tried_before..]
            .iter()
            .map(|(h, v)| {
                assert_eq!(h["x-a2a-notification-token"], "tok-1");
                assert_eq!(v["id"], id.as_str());
                v["status"]["state"].as_str().unwrap_or("").to_string()
            })
            .collect();
        if states.last().map(String::as_str) == Some("completed") || Instant::now() > deadline {
            break states;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Delivered after the restart, in order, none lost: the task as it was created, its
    // question, then the answer's steps to the end (repeats of a notice that failed are
    // at-least-once delivery).
    let mut distinct = states.clone();
    distinct.dedup();
    assert_eq!(
        distinct,
        ["working", "input-required", "working", "completed"],
        "{states:?}"
    );
    assert_eq!(
        states.last().map(String::as_str),
        Some("completed"),
        "{states:?}"
    );
    let calls = sidecar.wait_calls(1).await;
    assert!(
        calls.iter().any(|c| c["target"] == "http/hook"),
        "notifications go through the sidecar: {calls:?}"
    );

    // A question left unanswered past its expiry fails the task.
    let r = agent.send(message("m2", "the memo"), json!({})).await;
    let id2 = r["result"]["id"].as_str().unwrap().to_string();
    assert_eq!(r["result"]["status"]["state"], "input-required");
    agent.set_clock(T0 + 5 * HOUR + 73 * HOUR);
    let late = json!({"kind": "message", "role": "user", "messageId": "m2-answer", "taskId": id2,
        "parts": [{"kind": "text", "text": "yes"}]});
    let r = agent.send(late, json!({})).await;
    assert_eq!(r["result"]["status"]["state"], "failed", "{r}");
    assert_eq!(
        r["result"]["status"]["message"]["parts"][0]["text"],
        "the question was not answered within 3days"
    );

    // Bad requests get JSON-RPC errors.
    let bad = agent
        .send(
            message("m3", "x"),
            json!({"pushNotificationConfig": {"url": "http://evil.example/steal"}}),
        )
        .await;
    assert_eq!(bad["error"]["code"], -32602, "{bad}");
    let missing = agent.rpc("tasks/get", json!({"id": "nope"})).await;
    assert_eq!(missing["error"]["code"], -32001);
    let unknown = agent.rpc("tasks/frobnicate", json!({})).await;
    assert_eq!(unknown["error"]["code"], -32601);
    let card: Value = reqwest::get(format!(
        "http://127.0.0.1:{}/.well-known/agent-card.json",
        agent.listen
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(card["name"], "approver");
    assert_eq!(card["capabilities"]["pushNotifications"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_resumes_its_task_without_repeating_the_completed_call() {
    let dir = Scratch::new("a2a-crash");
    let tools = Fixture::mcp_tools(&dir).await;
    // The peer never answers the first delegation (the agent is killed while it waits), and
    // answers the next with a completed task.
    let (peer, asked) = server(|n, _| async move {
        if n == 1 {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        let done = json!({"jsonrpc": "2.0", "id": 1, "result": {"kind": "task", "id": "p1",
            "contextId": "c", "status": {"state": "completed"},
            "artifacts": [{"artifactId": "a", "parts": [{"kind": "text", "text": "a summary"}]}]}});
        axum::response::Response::builder()
            .header("content-type", "text/event-stream")
            .body(axum::body::Body::from(format!("data: {done}\n\n")))
            .unwrap()
    })
    .await;
    let sidecar = Sidecar::start(
        &dir,
        &format!(
            "upstreams:\n  - {{name: mcp/search, endpoints: [\"{}\"]}}\n  - {{name: agents/peer, endpoints: [\"http://127.0.0.1:{peer}\"]}}\n",
            tools.url("/mcp")
        ),
    )
    .await;
    let mut agent = Agent::start(
        &dir,
        &sidecar,
        "collaborators: [{agent: peer}]\nworkflow:\n  - {id: search, tool: {server: search, name: web_search, arguments: {q: '{{input}}'}}}\n  - {id: summary, agent: {to: peer, message: 'Summarize {{steps.search}}'}}\n",
    )
    .await;
    let r = agent
        .send(message("c1", "agent meshes"), json!({"blocking": false}))
        .await;
    let id = r["result"]["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    while asked.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the delegation never reached the peer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tool_calls = |calls: &[Value]| {
        calls
            .iter()
            .filter(|c| c["subject"] == "tools/call:web_search")
            .count()
    };
    assert_eq!(tool_calls(&sidecar.calls()), 1);

    // Killed while it waits on the peer; restarted, it resumes at the delegation.
    agent.proc = None;
    agent.restart().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let task = loop {
        let t = agent.rpc("tasks/get", json!({"id": id})).await;
        if t["result"]["status"]["state"] == "completed" {
            break t;
        }
        assert!(Instant::now() < deadline, "not resumed: {t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        task["result"]["artifacts"][0]["parts"][0]["text"],
        "a summary"
    );
    assert_eq!(
        tool_calls(&sidecar.calls()),
        1,
        "the completed tool call was not made again"
    );
    let asked = asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 2, "the delegation was sent again once");
    let text = |i: usize| asked[i].1["params"]["message"].clone();
    assert_eq!(
        text(0)["messageId"],
        text(1)["messageId"],
        "with the same message id"
    );
    assert!(text(1)["parts"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("Summarize 3 results for 'agent meshes'"));
}

/// A peer agent that answers every message at once, quoting it.
async fn quoting_peer() -> (u16, Seen) {
    server(|_, v: Value| async move {
        let text = v["params"]["message"]["parts"][0]["text"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let done = json!({"jsonrpc": "2.0", "id": 1, "result": {"kind": "task", "id": "p1",
            "contextId": "c", "status": {"state": "completed"},
            "artifacts": [{"artifactId": "a", "parts": [{"kind": "text", "text": format!("peer says: {text}")}]}]}});
        axum::response::Response::builder()
            .header("content-type", "text/event-stream")
            .body(axum::body::Body::from(format!("data: {done}\n\n")))
            .unwrap()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_delegates_by_name_and_a_workflow_by_skill() {
    let dir = Scratch::new("a2a-delegate");
    let script = dir.path("script.yaml");
    std::fs::write(
        &script,
        "rules: [{match: 'Ask the peer', tool_call: {name: agent__peer, arguments: {message: hello peer}}}]\n",
    )
    .unwrap();
    let llm = Fixture::mock_llm(&dir, &["--script", script.to_str().unwrap()]).await;
    let tools = Fixture::mcp_tools(&dir).await;
    let (peer, asked) = quoting_peer().await;
    let sidecar = Sidecar::start(
        &dir,
        &format!(
            "upstreams:\n  - {{name: llm/openai, endpoints: [\"{}\"]}}\n  - {{name: mcp/search, endpoints: [\"{}\"]}}\n  - {{name: agents/peer, endpoints: [\"http://127.0.0.1:{peer}\"]}}\nroutes:\n  - {{name: agents/by-skill/summarize, upstreams: [agents/peer]}}\n",
            llm.url(""),
            tools.url("/mcp")
        ),
    )
    .await;

    // The model asks for `agent__peer`: the runtime delegates over A2A and hands back the answer.
    let planned = Agent::start(
        &Scratch::new("a2a-delegate-planned"),
        &sidecar,
        "collaborators: [{agent: peer}]\n",
    )
    .await;
    let r = planned
        .send(message("p1", "Ask the peer what it knows"), json!({}))
        .await;
    assert_eq!(r["result"]["status"]["state"], "completed", "{r}");
    assert_eq!(
        r["result"]["artifacts"][0]["parts"][0]["text"],
        "The tool answered: peer says: hello peer"
    );

    // A workflow step to `skill:summarize` goes to whichever agent offers it.
    let flow = Agent::start(
        &Scratch::new("a2a-delegate-skill"),
        &sidecar,
        "collaborators: [{skill: summarize}]\nworkflow:\n  - {id: sum, agent: {to: 'skill:summarize', message: 'Summarize {{input}}'}}\n",
    )
    .await;
    let r = flow.send(message("s1", "the report"), json!({})).await;
    assert_eq!(r["result"]["status"]["state"], "completed", "{r}");
    assert_eq!(
        r["result"]["artifacts"][0]["parts"][0]["text"],
        "peer says: Summarize the report"
    );

    let asked = asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 2);
    assert!(asked.iter().all(|(_, v)| v["method"] == "message/stream"));
    let calls = sidecar.calls();
    let a2a: Vec<&str> = calls
        .iter()
        .filter(|c| c["kind"] == "a2a")
        .filter_map(|c| c["target"].as_str())
        .collect();
    assert_eq!(
        a2a,
        ["agents/peer", "agents/by-skill/summarize"],
        "{calls:?}"
    );
}
