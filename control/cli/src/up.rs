//! `agentmesh up`: the whole local mesh on loopback, from the `examples/up` directory — the
//! control server, the mock LLM, two sample MCP tool servers, and each agent with its sidecar
//! (SVID from a join token, config from the control server) — then a sample conversation, the
//! table of every call it made (agent, kind, target, decision, tokens, USD, latency) and the
//! calls policy denied with their reasons. The mesh stays up for `agentmesh tap` until Ctrl-C,
//! then every process is stopped, agents first.

use crate::watch::{tap_row, Source, TAP_HEADER};
use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

#[derive(Args)]
pub struct UpArgs {
    /// The demo's files: mesh config, agent manifests, mock LLM script.
    #[arg(long, default_value = "examples/up")]
    examples: PathBuf,
    /// The policy library the demo's agents are decided by.
    #[arg(long, default_value = "policies")]
    policies: PathBuf,
    /// Where the run's config copies, logs, identities and task stores go (emptied first).
    #[arg(long, default_value = ".agentmesh/up")]
    run_dir: PathBuf,
    /// Where the agentmesh binaries are (default: next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Export every sidecar's spans to this OTLP endpoint (e.g. http://127.0.0.1:4317).
    #[arg(long)]
    otlp: Option<String>,
    /// The topic of the sample conversation.
    #[arg(long, default_value = "agent meshes")]
    topic: String,
    /// Stop after the conversation instead of waiting for Ctrl-C.
    #[arg(long)]
    exit: bool,
}

const AGENTS: [&str; 3] = ["planner", "researcher", "writer"];

/// A started process, stopped when `Up` ends.
struct Proc {
    name: String,
    child: Child,
}

/// Everything `up` started, and where.
struct Up {
    run: PathBuf,
    bins: PathBuf,
    procs: Vec<Proc>,
    step: usize,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Replaces every `${NAME}` of `vars` in `text`; an unknown one is an error.
fn fill(text: &str, vars: &[(String, String)], file: &Path) -> anyhow::Result<String> {
    let mut out = text.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("${{{k}}}"), v);
    }
    if let Some(i) = out.find("${") {
        let name: String = out[i..].chars().take_while(|c| *c != '}').collect();
        bail!("{}: unknown variable {name}}}", file.display());
    }
    Ok(out)
}

impl Up {
    fn progress(&mut self, what: &str) -> Instant {
        self.step += 1;
        print!("[{}/7] {what} … ", self.step);
        let _ = std::io::stdout().flush();
        Instant::now()
    }

    fn done(started: Instant) {
        println!("ok ({:.1}s)", started.elapsed().as_secs_f64());
    }

    fn spawn(&mut self, name: &str, bin: &str, args: &[&str]) -> anyhow::Result<()> {
        let log = self.run.join(format!("{name}.log"));
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(self.bins.join(bin))
            .args(args)
            .stdout(file.try_clone()?)
            .stderr(file)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        self.procs.push(Proc {
            name: name.to_string(),
            child,
        });
        Ok(())
    }

    /// Waits until `url` answers 2xx, or fails with the last answer (a `/readyz` says what it
    /// waits for) and the end of the process's log.
    async fn wait_http(
        &mut self,
        name: &str,
        url: &str,
        client: &reqwest::Client,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let log = self.run.join(format!("{name}.log"));
        loop {
            let last = match client.get(url).send().await {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => {
                    let status = r.status();
                    format!("{status} {}", r.text().await.unwrap_or_default().trim())
                }
                Err(e) => format!("no answer ({e})"),
            };
            if let Some(p) = self.procs.iter_mut().find(|p| p.name == name) {
                if let Ok(Some(status)) = p.child.try_wait() {
                    bail!("{name} exited ({status}); {}", log_tail(&log));
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} did not answer {url} with 2xx in 30s (last: {last}); {}",
                    log_tail(&log)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every process, newest first (agents, sidecars, control, fixtures).
    async fn stop(&mut self) {
        for p in self.procs.iter().rev() {
            if let Some(pid) = p.child.id() {
                // SIGINT: pingora's fast shutdown (SIGTERM would hold the listeners open for
                // its grace period); agents have committed every step. `kill` is in every base
                // system, and keeps this crate free of unsafe code.
                let _ = std::process::Command::new("kill")
                    .args(["-INT", &pid.to_string()])
                    .status();
            }
        }
        for p in self.procs.iter_mut().rev() {
            if tokio::time::timeout(Duration::from_secs(5), p.child.wait())
                .await
                .is_err()
            {
                let _ = p.child.kill().await;
            }
        }
        self.procs.clear();
    }
}

pub async fn up(args: UpArgs) -> anyhow::Result<i32> {
    let bins = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    for b in [
        "agentmesh-control",
        "agentmesh-proxy",
        "agentmesh-agent",
        "mock-llm",
        "mcp-tools",
    ] {
        if !bins.join(b).exists() {
            bail!(
                "{} is missing: build the mesh first (cargo build --workspace --bins)",
                bins.join(b).display()
            );
        }
    }
    let examples = std::fs::canonicalize(&args.examples)
        .with_context(|| format!("the demo's files are not at {}", args.examples.display()))?;
    let policies = std::fs::canonicalize(&args.policies)
        .with_context(|| format!("the policy library is not at {}", args.policies.display()))?;
    let _ = std::fs::remove_dir_all(&args.run_dir);
    std::fs::create_dir_all(&args.run_dir)?;
    let run = std::fs::canonicalize(&args.run_dir)?;
    let mut up = Up {
        run: run.clone(),
        bins,
        procs: Vec::new(),
        step: 0,
    };
    let result = run_demo(&mut up, &args, &examples, &policies).await;
    if result.is_err() {
        println!("failed");
    }
    if result.is_ok() && !args.exit {
        println!("\nThe mesh is up: `agentmesh tap --admin <admin>` shows calls as they happen (admin ports above).");
        println!("Press Ctrl-C to stop it.");
        let _ = tokio::signal::ctrl_c().await;
        println!();
    }
    let t = Instant::now();
    print!("stopping {} processes … ", up.procs.len());
    let _ = std::io::stdout().flush();
    up.stop().await;
    println!("done ({:.1}s)", t.elapsed().as_secs_f64());
    result.map(|()| 0)
}

async fn run_demo(
    up: &mut Up,
    args: &UpArgs,
    examples: &Path,
    policies: &Path,
) -> anyhow::Result<()> {
    let run = up.run.clone();
    let plain = reqwest::Client::new();
    let mut vars = vec![
        ("RUN".to_string(), run.display().to_string()),
        ("POLICIES".to_string(), policies.display().to_string()),
    ];
    let mut port = |name: &str| -> anyhow::Result<u16> {
        let p = free_port()?;
        vars.push((name.to_string(), format!("http://127.0.0.1:{p}")));
        Ok(p)
    };
    let llm = port("MOCK_LLM")?;
    let search = port("MCP_SEARCH")?;
    let files = port("MCP_FILES")?;
    // Per agent: its listen address and its sidecar's outbound, inbound and admin ports.
    let mut ports = Vec::new();
    for a in AGENTS {
        let (listen, outbound, inbound, admin) =
            (free_port()?, free_port()?, free_port()?, free_port()?);
        let upper = a.to_uppercase();
        vars.push((format!("{upper}_LISTEN"), format!("127.0.0.1:{listen}")));
        vars.push((
            format!("{upper}_SIDECAR"),
            format!("http://127.0.0.1:{outbound}"),
        ));
        ports.push((a, listen, outbound, inbound, admin));
    }
    let (xds, api) = (free_port()?, free_port()?);

    let t = up.progress("writing the demo's config");
    for (from, to) in [
        ("mesh/agents.yaml", "mesh/agents.yaml"),
        ("mesh/upstreams.yaml", "mesh/upstreams.yaml"),
        ("mock-llm-script.yaml", "mock-llm-script.yaml"),
        ("agents/planner.yaml", "agents/planner.yaml"),
        ("agents/researcher.yaml", "agents/researcher.yaml"),
        ("agents/writer.yaml", "agents/writer.yaml"),
    ] {
        let src = examples.join(from);
        let text =
            std::fs::read_to_string(&src).with_context(|| format!("reading {}", src.display()))?;
        let dst = run.join(to);
        std::fs::create_dir_all(dst.parent().unwrap_or(&run))?;
        std::fs::write(&dst, fill(&text, &vars, &src)?)?;
    }
    Up::done(t);

    let t = up.progress("mock LLM and two MCP tool servers");
    let script = run.join("mock-llm-script.yaml");
    let addr = |p: u16| format!("127.0.0.1:{p}");
    up.spawn(
        "mock-llm",
        "mock-llm",
        &[
            "--listen",
            &addr(llm),
            "--script",
            &script.display().to_string(),
        ],
    )?;
    up.spawn(
        "mcp-search-tools",
        "mcp-tools",
        &["--listen", &addr(search)],
    )?;
    up.spawn("mcp-files", "mcp-tools", &["--listen", &addr(files)])?;
    up.wait_http("mock-llm", &format!("http://{}/healthz", addr(llm)), &plain)
        .await?;
    up.wait_http(
        "mcp-search-tools",
        &format!("http://{}/healthz", addr(search)),
        &plain,
    )
    .await?;
    up.wait_http(
        "mcp-files",
        &format!("http://{}/healthz", addr(files)),
        &plain,
    )
    .await?;
    Up::done(t);

    let t = up.progress("control server (CA, registry, discovery)");
    let state = run.join("control");
    up.spawn(
        "control",
        "agentmesh-control",
        &[
            "--config-dir",
            &run.join("mesh").display().to_string(),
            "--state-dir",
            &state.display().to_string(),
            "--xds",
            &addr(xds),
            "--api",
            &addr(api),
        ],
    )?;
    let ca_pem = loop {
        if let Ok(pem) = std::fs::read(state.join("ca.pem")) {
            break pem;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(Ok(Some(s))) = up.procs.last_mut().map(|p| p.child.try_wait()) {
            bail!(
                "the control server exited ({s}); see {}",
                run.join("control.log").display()
            );
        }
    };
    let tls = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem)?)
        .tls_built_in_root_certs(false)
        .build()?;
    let api_url = format!("https://127.0.0.1:{api}");
    up.wait_http("control", &format!("{api_url}/v1/status"), &tls)
        .await?;
    let admin_token = std::fs::read_to_string(state.join("admin-token"))?;
    Up::done(t);

    let t = up.progress("three sidecars (join tokens, SVIDs, config from the control server)");
    for &(agent, listen, outbound, inbound, admin) in &ports {
        let dir = run.join(agent);
        std::fs::create_dir_all(&dir)?;
        let r = tls
            .post(format!("{api_url}/v1/join-tokens"))
            .bearer_auth(admin_token.trim())
            .json(&json!({"agent": agent}))
            .send()
            .await?;
        let v: Value = r.json().await?;
        let token = v["token"]
            .as_str()
            .context("the control server issued no join token")?;
        std::fs::write(dir.join("join-token"), token)?;
        let otlp = args
            .otlp
            .as_ref()
            .map(|e| format!("telemetry: {{traces: {{endpoint: \"{e}\"}}}}\n"))
            .unwrap_or_default();
        let config = format!(
            "agent: {{name: {agent}}}\nlisteners: {{outbound: \"127.0.0.1:{outbound}\", admin: \"127.0.0.1:{admin}\", inbound: \"127.0.0.1:{inbound}\"}}\n\
             identity: {{ca_server: \"{api_url}\", ca_file: \"{ca}\", join_token_file: \"{token}\", dir: \"{id}\"}}\n\
             control: {{address: \"https://127.0.0.1:{xds}\"}}\n\
             inbound: {{forward_to: \"127.0.0.1:{listen}\"}}\n{otlp}",
            ca = state.join("ca.pem").display(),
            token = dir.join("join-token").display(),
            id = dir.join("identity").display(),
        );
        std::fs::write(dir.join("sidecar.yaml"), config)?;
        up.spawn(
            &format!("{agent}-sidecar"),
            "agentmesh-proxy",
            &[
                "--config",
                &dir.join("sidecar.yaml").display().to_string(),
                "--access-log",
                &dir.join("access.jsonl").display().to_string(),
            ],
        )?;
    }
    for &(agent, .., admin) in &ports {
        up.wait_http(
            &format!("{agent}-sidecar"),
            &format!("http://127.0.0.1:{admin}/readyz"),
            &plain,
        )
        .await?;
    }
    Up::done(t);

    let t = up.progress("three agents (planner, researcher, writer), their cards registered");
    for &(agent, listen, ..) in &ports {
        let manifest = run.join(format!("agents/{agent}.yaml"));
        up.spawn(
            agent,
            "agentmesh-agent",
            &["--manifest", &manifest.display().to_string()],
        )?;
        up.wait_http(agent, &format!("http://127.0.0.1:{listen}/healthz"), &plain)
            .await?;
    }
    // Each agent's card, read by its sidecar, is in the registry.
    for &(agent, ..) in &ports {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let card: Value = match tls
                .get(format!("{api_url}/v1/agents/{agent}/card"))
                .send()
                .await
            {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            if card["protocolVersion"].is_string() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{agent}'s card never reached the registry; see {}",
                    run.join(format!("{agent}-sidecar.log")).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Each sidecar has been sent its peers' addresses once they are all connected.
    let deadline = Instant::now() + Duration::from_secs(20);
    let planner_admin = ports[0].4;
    loop {
        let dump: Value = plain
            .get(format!("http://127.0.0.1:{planner_admin}/config_dump"))
            .send()
            .await?
            .json()
            .await?;
        let ready = ["agents/researcher", "agents/writer"].iter().all(|n| {
            dump["config"]["upstreams"].as_array().is_some_and(|u| {
                u.iter().any(|u| {
                    u["name"] == *n && u["endpoints"].as_array().is_some_and(|e| !e.is_empty())
                })
            })
        });
        if ready && dump["identity"]["ready"] == true {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the planner's sidecar was not sent its peers in 20s; see {}",
                run.join("planner-sidecar.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Up::done(t);

    // Watch every sidecar's calls from before the first one.
    let calls = Arc::new(Mutex::new(Vec::<Value>::new()));
    let mut taps = Vec::new();
    for &(.., admin) in &ports {
        let calls = calls.clone();
        let source = Source::all(format!("127.0.0.1:{admin}"));
        taps.push(tokio::spawn(async move {
            let _ = source
                .follow(None, |e| {
                    calls.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                    true
                })
                .await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let t = up.progress("a conversation: the user asks the planner for a brief");
    println!();
    let answer = converse(
        &plain,
        &format!("http://127.0.0.1:{}/", ports[0].1),
        &args.topic,
    )
    .await?;
    print!("      ");
    Up::done(t);
    println!("\nAnswer: {answer}\n");

    // The last calls' events arrive after their responses.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for tap in &taps {
        tap.abort();
    }
    let mut calls = calls.lock().unwrap_or_else(|p| p.into_inner()).clone();
    calls.sort_by_key(|e| e["ts_ms"].as_u64().unwrap_or(0));
    let t = up.progress("every call of the conversation, as the sidecars saw it");
    println!("\n{TAP_HEADER}");
    for e in &calls {
        println!("{}", tap_row(e));
    }
    let usd: f64 = calls.iter().filter_map(|e| e["cost_usd"].as_f64()).sum();
    let tokens: u64 = calls
        .iter()
        .map(|e| e["input_tokens"].as_u64().unwrap_or(0) + e["output_tokens"].as_u64().unwrap_or(0))
        .sum();
    println!("{} calls, {tokens} tokens, {usd:.6} USD", calls.len());
    let denied: Vec<&Value> = calls.iter().filter(|e| e["decision"] == "deny").collect();
    println!("\nDenied by policy:");
    for e in &denied {
        println!(
            "  {} → {} {}: {}",
            e["source"].as_str().unwrap_or(""),
            e["target"].as_str().unwrap_or(""),
            e["subject"].as_str().unwrap_or(""),
            e["reason"].as_str().unwrap_or("")
        );
    }
    print!("      ");
    Up::done(t);
    println!("\nSidecar admin ports (for `agentmesh tap --admin`):");
    for &(agent, .., admin) in &ports {
        println!("  {agent:<11} 127.0.0.1:{admin}");
    }
    Ok(())
}

/// Sends the user's message to the planner and prints its task's progress until it is final.
async fn converse(http: &reqwest::Client, planner: &str, topic: &str) -> anyhow::Result<String> {
    use futures::StreamExt;
    let trace = format!("00-{:032x}-{:016x}-01", rand_u128(), rand_u128() as u64 | 1);
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "message/stream", "params": {"message": {
        "kind": "message", "role": "user", "messageId": format!("up-{}", rand_u128()),
        "parts": [{"kind": "text", "text": topic}]}}});
    let r = http
        .post(planner)
        .header("traceparent", &trace)
        .json(&body)
        .send()
        .await
        .context("the planner does not answer")?;
    let mut stream = r.bytes_stream();
    let mut buf = String::new();
    let mut answer = None;
    let mut last = None;
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for data in event.lines().filter_map(|l| l.strip_prefix("data:")) {
                let v: Value = serde_json::from_str(data.trim())?;
                if let Some(e) = v.get("error") {
                    bail!("the planner refused the message: {e}");
                }
                let ev = &v["result"];
                if let Some(a) = ev.get("artifact") {
                    answer = Some(a["parts"][0]["text"].as_str().unwrap_or("").to_string());
                }
                let Some(state) = ev["status"]["state"].as_str() else {
                    continue;
                };
                let note = ev["status"]["message"]["parts"][0]["text"]
                    .as_str()
                    .unwrap_or("");
                let line = format!("      planner: {state:<10} {}", crate::watch::cut(note, 90));
                if state != "completed" && last.as_ref() != Some(&line) {
                    println!("{line}");
                    last = Some(line);
                }
                match state {
                    "completed" => {
                        return answer.context("the planner completed without an answer")
                    }
                    "failed" | "canceled" | "rejected" | "input-required" => {
                        bail!("the planner's task is {state}: {note}");
                    }
                    _ => {}
                }
            }
        }
    }
    bail!("the planner's stream ended before its task was final")
}

fn rand_u128() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let s = std::collections::hash_map::RandomState::new();
    let mut h = s.build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let a = h.finish();
    let mut h = s.build_hasher();
    h.write_u64(a);
    (u128::from(a) << 64) | u128::from(h.finish())
}

/// The last lines of a process's log, for an error that names it.
fn log_tail(log: &std::path::Path) -> String {
    const LINES: usize = 20;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LINES)..].join("\n");
    format!("the end of {}:\n{tail}", log.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_start_shows_the_last_twenty_lines_of_the_log() {
        let dir = std::env::temp_dir().join(format!("up-log-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("planner-sidecar.log");
        let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).unwrap();
        let tail = log_tail(&log);
        assert!(tail.starts_with(&format!("the end of {}:", log.display())));
        assert!(tail.contains("line 11\n") && tail.ends_with("line 30"));
        assert!(!tail.contains("line 10\n"));
        std::fs::remove_dir_all(&dir).unwrap();
        // A log that is not there yet: the error still names it.
        assert!(log_tail(&dir.join("missing.log")).contains("missing.log"));
    }
}
