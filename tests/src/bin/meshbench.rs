//! `meshbench`: a constant-rate (open-loop) HTTP load generator that reports latency percentiles.
//! Each request is scheduled at `start + i / rate` and its latency is measured from that
//! scheduled instant, so a stalled server shows up as latency instead of silently lowering the
//! offered load (no coordinated omission).
//!
//! `meshbench --rate 1000 --duration 10s --warmup 2s --body-file req.json NAME=URL [NAME=URL ...]`
//! runs the targets one after another and prints one line per target, plus the added latency of
//! every target against the first (the baseline). `--header 'Name: value'` adds a header to
//! every request, `--http2` speaks h2c (scripts/pgo-train.sh uses both for MCP calls).

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

#[derive(Parser)]
#[command(about = "Constant-rate HTTP load generator with latency percentiles")]
struct Args {
    /// Requests per second offered to each target.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Measured time per target.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured time per target before measuring (fills pools, warms caches).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// POST this file as the request body (GET without it).
    #[arg(long)]
    body_file: Option<std::path::PathBuf>,
    /// `Name: value`, sent on every request (repeatable), e.g. the headers of an MCP call.
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<Header>,
    /// Rounds: targets are measured in turn, `rounds` times, each for `duration / rounds`, so
    /// that drift in the machine's load is spread over all targets alike.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Speak HTTP/2 without TLS (h2c, prior knowledge) instead of HTTP/1.1.
    #[arg(long)]
    http2: bool,
    /// Print results as JSON lines too.
    #[arg(long)]
    json: bool,
    /// Compare every target with this one round by round: rounds run back to back, so a paired
    /// comparison of each round's p99 separates a real difference from the machine's drift.
    #[arg(long)]
    compare: Option<String>,
    /// `name=url`; the first is the baseline for "added" latency.
    targets: Vec<String>,
}

struct Stats {
    name: String,
    sent: usize,
    errors: usize,
    lat_us: Vec<u64>,
    elapsed: Duration,
    /// The p99 of each round on its own, in ms.
    round_p99: Vec<f64>,
}

impl Stats {
    fn pct(&self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.lat_us.len() as f64 - 1.0) * p).round() as usize;
        self.lat_us[i] as f64 / 1000.0
    }
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;
type Header = (hyper::header::HeaderName, hyper::header::HeaderValue);

fn parse_header(s: &str) -> anyhow::Result<Header> {
    let (name, value) = s.split_once(':').context("a header is `Name: value`")?;
    Ok((name.trim().parse()?, value.trim().parse()?))
}

/// What every request of a run carries besides its URL.
#[derive(Clone)]
struct Request {
    body: Option<Bytes>,
    headers: Arc<Vec<Header>>,
}

async fn one(client: &HttpClient, url: &hyper::Uri, request: &Request) -> bool {
    let builder = match &request.body {
        Some(_) => hyper::Request::post(url.clone()).header("content-type", "application/json"),
        None => hyper::Request::get(url.clone()),
    };
    let builder = request
        .headers
        .iter()
        .fold(builder, |b, (k, v)| b.header(k, v));
    let Ok(req) = builder.body(Full::new(request.body.clone().unwrap_or_default())) else {
        return false;
    };
    match client.request(req).await {
        Ok(resp) => {
            let ok = resp.status().is_success();
            ok && resp.into_body().collect().await.is_ok()
        }
        Err(_) => false,
    }
}

async fn run(
    client: &HttpClient,
    name: &str,
    url: &str,
    request: &Request,
    rate: u64,
    dur: Duration,
) -> anyhow::Result<Stats> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("bad url {url}"))?;
    let total = (rate as f64 * dur.as_secs_f64()) as usize;
    let lat = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Requests are released by a dedicated OS thread: tokio's timer has a 1 ms granularity,
    // which at 1,000 req/s would add up to a millisecond of scheduling noise to every sample.
    let rt = tokio::runtime::Handle::current();
    let start = Instant::now();
    let (client, uri, request) = (client.clone(), uri.clone(), request.clone());
    let (lat2, err2) = (lat.clone(), errors.clone());
    let handles = std::thread::spawn(move || {
        let mut handles = Vec::with_capacity(total);
        for i in 0..total {
            let at = start + Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let (client, uri, request, lat, errors) = (
                client.clone(),
                uri.clone(),
                request.clone(),
                lat2.clone(),
                err2.clone(),
            );
            handles.push(rt.spawn(async move {
                if one(&client, &uri, &request).await {
                    lat.lock().await.push(at.elapsed().as_micros() as u64);
                } else {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }));
        }
        handles
    })
    .join()
    .map_err(|_| anyhow::anyhow!("scheduler thread panicked"))?;
    for h in handles {
        let _ = h.await;
    }
    let elapsed = start.elapsed();
    let mut lat_us = std::mem::take(&mut *lat.lock().await);
    lat_us.sort_unstable();
    let mut stats = Stats {
        name: name.to_string(),
        sent: total,
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        lat_us,
        elapsed,
        round_p99: Vec::new(),
    };
    stats.round_p99.push(stats.pct(0.99));
    Ok(stats)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.targets.is_empty() {
        bail!("give at least one NAME=URL target");
    }
    let body = match &args.body_file {
        Some(p) => Some(Bytes::from(
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )),
        None => None,
    };
    let request = Request {
        body,
        headers: Arc::new(args.headers.clone()),
    };
    let mut targets = Vec::new();
    for t in &args.targets {
        let (name, url) = t.split_once('=').context("targets are NAME=URL")?;
        // A keep-alive pool per target, so targets do not share connections.
        let client: HttpClient = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .http2_only(args.http2)
            .build_http();
        eprintln!("{name}: warming up {:?}", args.warmup);
        run(&client, name, url, &request, args.rate, args.warmup).await?;
        targets.push((name, url, client));
    }
    let slice = args.duration / args.rounds.max(1);
    let mut results: Vec<Option<Stats>> = (0..targets.len()).map(|_| None).collect();
    let n = targets.len();
    for round in 0..args.rounds.max(1) {
        // Each round starts one target further on, so that no target always runs right after
        // the same neighbour (a proxy that just ran leaves its core's caches and clock warm).
        for i in (0..n).map(|k| (k + round as usize) % n) {
            let (name, url, client) = &targets[i];
            eprintln!(
                "round {}: {name} for {slice:?} at {} req/s",
                round + 1,
                args.rate
            );
            let s = run(client, name, url, &request, args.rate, slice).await?;
            match &mut results[i] {
                Some(r) => {
                    r.sent += s.sent;
                    r.errors += s.errors;
                    r.lat_us.extend(s.lat_us);
                    r.elapsed += s.elapsed;
                    r.round_p99.extend(s.round_p99);
                }
                none => *none = Some(s),
            }
        }
    }
    let mut results: Vec<Stats> = results.into_iter().flatten().collect();
    for r in &mut results {
        r.lat_us.sort_unstable();
    }
    println!(
        "{:<16} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11}",
        "target", "req/s", "errors", "p50 ms", "p90 ms", "p99 ms", "max ms", "+p50 ms", "+p99 ms"
    );
    let base = &results[0];
    for s in &results {
        let rps = s.lat_us.len() as f64 / s.elapsed.as_secs_f64();
        println!(
            "{:<16} {:>8.0} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>11.3} {:>11.3}",
            s.name,
            rps,
            s.errors,
            s.pct(0.5),
            s.pct(0.9),
            s.pct(0.99),
            s.pct(1.0),
            s.pct(0.5) - base.pct(0.5),
            s.pct(0.99) - base.pct(0.99)
        );
        if args.json {
            println!(
                "{{\"target\":\"{}\",\"sent\":{},\"errors\":{},\"rps\":{rps:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3}}}",
                s.name, s.sent, s.errors, s.pct(0.5), s.pct(0.99)
            );
        }
    }
    if let Some(reference) = &args.compare {
        let Some(r) = results.iter().find(|s| &s.name == reference) else {
            bail!("--compare {reference}: no target of that name");
        };
        print_paired(&results, r);
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Two-sided sign-test p-value: the chance of a split at least as uneven as `wins` of `n` if
/// either target were as likely to win a round.
fn sign_test(wins: usize, n: usize) -> f64 {
    let k = wins.min(n - wins);
    let mut c = 1.0_f64; // C(n, 0)
    let mut tail = 0.0;
    for i in 0..=k {
        if i > 0 {
            c = c * (n - i + 1) as f64 / i as f64;
        }
        tail += c;
    }
    (2.0 * tail / 2f64.powi(n as i32)).min(1.0)
}

/// Each target's p99 against the reference's, round by round (rounds run back to back).
fn print_paired(results: &[Stats], reference: &Stats) {
    let n = reference.round_p99.len();
    println!(
        "\npaired by round against {} ({n} rounds): median of per-round p99, median per-round difference, rounds at or below {}'s p99 (sign-test p)",
        reference.name, reference.name
    );
    for s in results.iter().filter(|s| s.name != reference.name) {
        let diffs: Vec<f64> = s
            .round_p99
            .iter()
            .zip(&reference.round_p99)
            .map(|(a, b)| a - b)
            .collect();
        let wins = diffs.iter().filter(|d| **d <= 0.0).count();
        println!(
            "{:<16} p99 {:>7.3} ms  diff {:>+7.3} ms  {wins:>3}/{n} rounds  p={:.3}",
            s.name,
            median(s.round_p99.clone()),
            median(diffs),
            sign_test(wins, n)
        );
    }
}
