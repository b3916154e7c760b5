//! `controlbench`: the control server's push benchmark (BENCHMARKS.md). Starts
//! `agentmesh-control` on a mesh of N agents, connects N simulated sidecars (one discovery
//! stream and one TCP connection each, ACKing every response at once), then changes the shared
//! policy file several times and reports, per change, how long until every sidecar had ACKed the
//! new policy (p50, p99, all), and the control server's memory per connected sidecar.
//!
//! Usage: controlbench [--sidecars 1000] [--changes 10] [--mode delta|sotw]

use agentmesh_control_api::discovery::{
    self as wire, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use agentmesh_control_api::TYPE_URL;
use agentmesh_tests::control::Control;
use agentmesh_tests::{bin_dir, Scratch};
use clap::Parser;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    sidecars: usize,
    #[arg(long, default_value_t = 10)]
    changes: usize,
    /// `delta` or `sotw`.
    #[arg(long, default_value = "delta")]
    mode: String,
}

/// What the simulated sidecars saw: when each one ACKed a changed policy (since the last
/// reset), and how many responses all of them have had and when the last came.
struct Arrivals {
    at: Mutex<Vec<Option<Instant>>>,
    responses: Mutex<(u64, Vec<bool>, Instant)>,
}

impl Arrivals {
    fn response(&self, i: usize) {
        let mut r = self.responses.lock().unwrap();
        r.0 += 1;
        r.1[i] = true;
        r.2 = Instant::now();
    }
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks * 10
}

fn mesh(n: usize) -> String {
    let mut y = String::from(
        "upstreams:\n  - {name: llm/openai, endpoints: [\"https://api.openai.com\"]}\n  - {name: mcp/tools, endpoints: [\"http://127.0.0.1:9/mcp\"]}\npolicies:\n  - {name: standard, path: policy}\nagents:\n",
    );
    for i in 0..n {
        y.push_str(&format!(
            "  - {{name: agent-{i}, skills: [{{id: skill-{}}}], calls: {{upstreams: [llm/openai, mcp/tools], agents: [agent-{}]}}, policy: standard}}\n",
            i % 50,
            (i + 1) % n
        ));
    }
    y
}

fn policy_text(rev: usize) -> String {
    format!("package agentmesh.authz\n\n# change {rev}\ndecision := true\n")
}

fn policy_version(resources: &[wire::Resource]) -> Option<String> {
    resources
        .iter()
        .find(|r| r.name == "policy/standard")
        .map(|r| r.version.clone())
}

async fn sidecar(
    i: usize,
    address: String,
    delta: bool,
    arrivals: Arc<Arrivals>,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Channel::from_shared(address)?
        .connect()
        .await?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let node = wire::Node {
        id: format!("sim-{i}"),
        agent: format!("agent-{i}"),
        namespace: "default".into(),
        inbound_url: format!("http://10.0.{}.{}:15006", i / 250, i % 250),
        build_version: "bench".into(),
    };
    let mut policy: Option<String> = None;
    // Called once the response is ACKed.
    let mut seen = |resources: &[wire::Resource]| {
        arrivals.response(i);
        if let Some(v) = policy_version(resources) {
            if policy.as_ref() != Some(&v) {
                policy = Some(v);
                arrivals.at.lock().unwrap()[i].get_or_insert_with(Instant::now);
            }
        }
    };
    if delta {
        let (tx, rx) = mpsc::channel(4);
        tx.send(wire::DeltaDiscoveryRequest {
            node: Some(node),
            type_url: TYPE_URL.into(),
            ..Default::default()
        })
        .await?;
        let mut inbound = client
            .delta_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        while let Some(resp) = inbound.message().await? {
            tx.send(wire::DeltaDiscoveryRequest {
                response_nonce: resp.nonce.clone(),
                type_url: TYPE_URL.into(),
                ..Default::default()
            })
            .await?;
            seen(&resp.resources);
        }
    } else {
        let (tx, rx) = mpsc::channel(4);
        tx.send(wire::DiscoveryRequest {
            node: Some(node),
            type_url: TYPE_URL.into(),
            ..Default::default()
        })
        .await?;
        let mut inbound = client
            .stream_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        while let Some(resp) = inbound.message().await? {
            tx.send(wire::DiscoveryRequest {
                version_info: resp.version_info.clone(),
                response_nonce: resp.nonce.clone(),
                type_url: TYPE_URL.into(),
                ..Default::default()
            })
            .await?;
            seen(&resp.resources);
        }
    }
    Ok(())
}

fn rand_ms(below: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(below);
    h.finish() % below.max(1)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let n = args.sidecars;
    let dir = Scratch::new("controlbench");
    let conf = dir.path("mesh");
    std::fs::create_dir_all(conf.join("policy"))?;
    std::fs::write(conf.join("policy/authz.rego"), policy_text(0))?;
    std::fs::write(conf.join("mesh.yaml"), mesh(n))?;
    let control = Control::start(&conf).await;
    let (pid, xds) = (control.proc.0.id(), control.xds);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_idle = rss_kb(pid);
    println!(
        "# {} simulated sidecars ({} mode), {} agents, control server {} (pid {pid})",
        n,
        args.mode,
        n,
        bin_dir().join("agentmesh-control").display()
    );

    let arrivals = Arc::new(Arrivals {
        at: Mutex::new(vec![None; n]),
        responses: Mutex::new((0, vec![false; n], Instant::now())),
    });
    let address = format!("http://127.0.0.1:{xds}");
    let started = Instant::now();
    let delta = args.mode == "delta";
    for i in 0..n {
        let (a, arr) = (address.clone(), arrivals.clone());
        tokio::spawn(async move {
            // As real sidecars do: retry with jitter when the connection is refused or reset.
            let mut pause = 50u64;
            while let Err(e) = sidecar(i, a.clone(), delta, arr.clone()).await {
                if pause > 5000 {
                    eprintln!("sidecar {i}: {e}");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(pause / 2 + rand_ms(pause))).await;
                pause *= 2;
            }
        });
    }
    // Settled: every sidecar has its config, and no push (those its peers' connections cause)
    // for a second.
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let r = arrivals.responses.lock().unwrap();
        let have = r.1.iter().filter(|b| **b).count();
        if have == n && r.2.elapsed() > Duration::from_secs(1) {
            println!(
                "connected and settled: {n} sidecars, {} responses, in {:.2} s",
                r.0,
                (r.2 - started).as_secs_f64()
            );
            break;
        }
    }
    let rss_connected = rss_kb(pid);
    println!(
        "control server RSS: {:.1} MB idle with the catalog, {:.1} MB with {n} sidecars: {:.1} KB per connected sidecar",
        rss_idle as f64 / 1024.0,
        rss_connected as f64 / 1024.0,
        (rss_connected.saturating_sub(rss_idle)) as f64 / n as f64
    );

    // The first sidecar to ACK is the baseline of each change: the file watch, the reload and
    // one push. What the other N-1 add on top of it is the fan-out.
    println!("| change | first ACK (ms) | p50 (ms) | p99 (ms) | all ACKed (ms) | fan-out: all − first (ms) | all / first | control CPU (ms) |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut p99s = Vec::new();
    let mut fanouts = Vec::new();
    for c in 1..=args.changes {
        *arrivals.at.lock().unwrap() = vec![None; n];
        let cpu0 = cpu_ms(pid);
        let t0 = Instant::now();
        std::fs::write(conf.join("policy/authz.rego.tmp"), policy_text(c))?;
        std::fs::rename(
            conf.join("policy/authz.rego.tmp"),
            conf.join("policy/authz.rego"),
        )?;
        let deadline = t0 + Duration::from_secs(60);
        loop {
            let done = arrivals
                .at
                .lock()
                .unwrap()
                .iter()
                .filter(|a| a.is_some())
                .count();
            if done == n {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "change {c}: only {done}/{n} ACKed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut ms: Vec<f64> = arrivals
            .at
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .map(|t| t.duration_since(t0).as_secs_f64() * 1000.0)
            .collect();
        ms.sort_by(|a, b| a.total_cmp(b));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cpu = cpu_ms(pid) - cpu0;
        println!(
            "| {c} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {cpu} |",
            ms[0],
            pct(&ms, 0.50),
            pct(&ms, 0.99),
            ms[n - 1],
            ms[n - 1] - ms[0],
            ms[n - 1] / ms[0],
        );
        fanouts.push(ms[n - 1] - ms[0]);
        p99s.push(pct(&ms, 0.99));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    p99s.sort_by(|a, b| a.total_cmp(b));
    fanouts.sort_by(|a, b| a.total_cmp(b));
    println!(
        "median over changes: p99 time to ACK {:.0} ms (the file watch's 200 ms gathering included), fan-out to all {n} {:.0} ms",
        p99s[p99s.len() / 2],
        fanouts[fanouts.len() / 2]
    );
    drop(control);
    Ok(())
}
