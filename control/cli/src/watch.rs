//! `agentmesh tap` and `agentmesh top`: an SRE's live view of a sidecar's calls, read from its
//! admin port's `/tap` stream. `tap` prints each call as it ends (like `linkerd viz tap`);
//! `top` keeps per-destination rates, latency percentiles and spend, redrawn every second.

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

/// Which sidecar, and which calls.
#[derive(Args, Clone)]
pub struct Source {
    /// The sidecar's admin address.
    #[arg(long, default_value = "127.0.0.1:15000", env = "AGENTMESH_ADMIN")]
    admin: String,
    /// Only calls from this agent.
    #[arg(long)]
    agent: Option<String>,
    /// Only this kind: llm, mcp, a2a, http.
    #[arg(long)]
    kind: Option<String>,
    /// Only this destination (`llm/openai`).
    #[arg(long)]
    target: Option<String>,
    /// Only this decision: allow, deny, audit_deny, none.
    #[arg(long)]
    decision: Option<String>,
    /// Only calls that took at least this many milliseconds.
    #[arg(long)]
    min_ms: Option<f64>,
}

#[derive(Args)]
pub struct TapArgs {
    #[command(flatten)]
    source: Source,
    /// Print the events as JSON lines instead of a table.
    #[arg(long)]
    json: bool,
    /// Stop after this many calls.
    #[arg(long)]
    count: Option<usize>,
}

#[derive(Args)]
pub struct TopArgs {
    #[command(flatten)]
    source: Source,
    /// Print the table once after this many seconds and stop (for scripts), instead of
    /// redrawing it every second.
    #[arg(long)]
    once: Option<u64>,
}

impl Source {
    /// Every call of the sidecar whose admin port is at `admin`.
    pub fn all(admin: String) -> Source {
        Source {
            admin,
            agent: None,
            kind: None,
            target: None,
            decision: None,
            min_ms: None,
        }
    }

    fn url(&self) -> String {
        let mut q = Vec::new();
        for (k, v) in [
            ("agent", &self.agent),
            ("kind", &self.kind),
            ("target", &self.target),
            ("decision", &self.decision),
        ] {
            if let Some(v) = v {
                q.push(format!("{k}={}", v.replace('%', "%25").replace('&', "%26")));
            }
        }
        if let Some(ms) = self.min_ms {
            q.push(format!("min_ms={ms}"));
        }
        let q = if q.is_empty() {
            String::new()
        } else {
            format!("?{}", q.join("&"))
        };
        format!("http://{}/tap{q}", self.admin)
    }

    /// Calls each event of the stream with `f` until it returns false or the deadline passes.
    pub async fn follow(
        &self,
        deadline: Option<Instant>,
        mut f: impl FnMut(Value) -> bool,
    ) -> anyhow::Result<()> {
        let url = self.url();
        let resp = reqwest::get(&url)
            .await
            .with_context(|| format!("cannot reach the sidecar's admin port at {url}"))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            let msg = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or(body);
            bail!("{url}: {status}: {msg}");
        }
        let mut stream = resp.bytes_stream();
        let mut pending = String::new();
        loop {
            let next = match deadline {
                Some(d) => match tokio::time::timeout_at(d.into(), stream.next()).await {
                    Ok(n) => n,
                    Err(_) => return Ok(()),
                },
                None => stream.next().await,
            };
            let Some(chunk) = next else {
                bail!("the sidecar closed the tap stream");
            };
            pending.push_str(&String::from_utf8_lossy(
                &chunk.context("reading the tap stream")?,
            ));
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                if let Some(lagged) = event.strip_prefix("event: lagged\n") {
                    eprintln!(
                        "agentmesh: missed events (too slow to keep up): {}",
                        lagged.trim()
                    );
                    continue;
                }
                for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                    if let Ok(v) = serde_json::from_str(data) {
                        if !f(v) {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}

pub fn str_of<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}

pub fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

pub const TAP_HEADER: &str = "TIME          SOURCE        KIND  TARGET              SUBJECT                 DECISION    STATUS  TOKENS         USD       LATENCY";

/// One call as a table row.
pub fn tap_row(e: &Value) -> String {
    let ts = e["ts_ms"].as_u64().unwrap_or(0);
    let time = format!(
        "{:02}:{:02}:{:02}.{:03}",
        ts / 3_600_000 % 24,
        ts / 60_000 % 60,
        ts / 1000 % 60,
        ts % 1000
    );
    let tokens = match (e["input_tokens"].as_u64(), e["output_tokens"].as_u64()) {
        (Some(i), Some(o)) if i + o > 0 => format!("{i}/{o}"),
        _ => "-".into(),
    };
    let usd = e["cost_usd"]
        .as_f64()
        .map(|c| format!("{c:.6}"))
        .unwrap_or_else(|| "-".into());
    let mut row = format!(
        "{time:<13} {:<13} {:<5} {:<19} {:<23} {:<11} {:<7} {tokens:<14} {usd:<9} {:>8.1} ms",
        cut(str_of(e, "source"), 13),
        str_of(e, "kind"),
        cut(str_of(e, "target"), 19),
        cut(str_of(e, "subject"), 23),
        str_of(e, "decision"),
        e["status"].as_u64().unwrap_or(0),
        e["duration_ms"].as_f64().unwrap_or(0.0),
    );
    if let Some(reason) = e["reason"].as_str() {
        row.push_str(&format!("  ({reason})"));
    }
    row
}

pub async fn tap(args: TapArgs) -> anyhow::Result<i32> {
    let mut seen = 0usize;
    let mut out = std::io::stdout();
    if !args.json {
        writeln!(out, "{TAP_HEADER}")?;
        out.flush()?;
    }
    args.source
        .follow(None, |e| {
            let line = if args.json {
                e.to_string()
            } else {
                tap_row(&e)
            };
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
            seen += 1;
            args.count.is_none_or(|n| seen < n)
        })
        .await?;
    Ok(0)
}

/// Calls to one destination from one source, over the time `top` has watched.
#[derive(Default)]
struct Row {
    calls: u64,
    denied: u64,
    errors: u64,
    durations_ms: Vec<f64>,
    tokens: u64,
    usd: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn top_table(rows: &BTreeMap<(String, String), Row>, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    let mut t = format!(
        "{:<13} {:<22} {:>8} {:>8} {:>7} {:>10} {:>10} {:>9} {:>10}\n",
        "SOURCE", "DESTINATION", "RPS", "SUCCESS", "DENIED", "P50", "P99", "TOK/S", "USD"
    );
    for ((source, dest), r) in rows {
        let mut d = r.durations_ms.clone();
        d.sort_by(f64::total_cmp);
        let ok = r.calls - r.errors - r.denied;
        t.push_str(&format!(
            "{:<13} {:<22} {:>8.2} {:>7.1}% {:>7} {:>7.1} ms {:>7.1} ms {:>9.1} {:>10.6}\n",
            cut(source, 13),
            cut(dest, 22),
            r.calls as f64 / secs,
            100.0 * ok as f64 / r.calls.max(1) as f64,
            r.denied,
            percentile(&d, 0.5),
            percentile(&d, 0.99),
            r.tokens as f64 / secs,
            r.usd,
        ));
    }
    t
}

pub async fn top(args: TopArgs) -> anyhow::Result<i32> {
    let started = Instant::now();
    let mut rows: BTreeMap<(String, String), Row> = BTreeMap::new();
    let mut drawn = Instant::now();
    let deadline = args.once.map(|s| started + Duration::from_secs(s));
    let live = args.once.is_none();
    args.source
        .follow(deadline, |e| {
            let r = rows
                .entry((str_of(&e, "source").into(), str_of(&e, "target").into()))
                .or_default();
            r.calls += 1;
            match str_of(&e, "decision") {
                "deny" => r.denied += 1,
                _ if e["status"].as_u64().unwrap_or(0) >= 500 => r.errors += 1,
                _ => {}
            }
            r.durations_ms
                .push(e["duration_ms"].as_f64().unwrap_or(0.0));
            r.tokens +=
                e["input_tokens"].as_u64().unwrap_or(0) + e["output_tokens"].as_u64().unwrap_or(0);
            r.usd += e["cost_usd"].as_f64().unwrap_or(0.0);
            if live && drawn.elapsed() >= Duration::from_secs(1) {
                // Clear the screen and draw the table again.
                print!("\x1b[2J\x1b[H{}", top_table(&rows, started.elapsed()));
                let _ = std::io::stdout().flush();
                drawn = Instant::now();
            }
            true
        })
        .await?;
    print!("{}", top_table(&rows, started.elapsed()));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_denied_call_shows_its_reason() {
        let row = tap_row(
            &json!({"ts_ms": 3_723_004u64, "source": "planner", "kind": "llm",
            "target": "llm/openai", "subject": "gpt-5", "decision": "deny", "status": 403,
            "duration_ms": 1.25, "reason": "model not allowed"}),
        );
        assert!(row.starts_with("01:02:03.004 "), "{row}");
        assert!(row.contains(" deny "), "{row}");
        assert!(
            row.ends_with("1.2 ms  (model not allowed)")
                || row.ends_with("1.3 ms  (model not allowed)"),
            "{row}"
        );
    }

    #[test]
    fn top_computes_rates_percentiles_and_spend() {
        let mut rows = BTreeMap::new();
        let r: &mut Row = rows
            .entry(("a".to_string(), "llm/openai".to_string()))
            .or_default();
        r.calls = 4;
        r.denied = 1;
        r.durations_ms = vec![1.0, 2.0, 3.0, 100.0];
        r.tokens = 40;
        r.usd = 0.5;
        let t = top_table(&rows, Duration::from_secs(2));
        let line = t.lines().nth(1).unwrap();
        assert!(line.contains("2.00"), "4 calls in 2 s: {line}");
        assert!(line.contains("75.0%"), "{line}");
        assert!(line.contains("100.0 ms"), "p99: {line}");
        assert!(line.contains("20.0"), "tokens/s: {line}");
        assert!(line.contains("0.500000"), "{line}");
    }

    #[test]
    fn filters_become_the_query() {
        let s = Source {
            admin: "127.0.0.1:1".into(),
            agent: Some("a&b".into()),
            kind: None,
            target: Some("llm/openai".into()),
            decision: None,
            min_ms: Some(5.0),
        };
        assert_eq!(
            s.url(),
            "http://127.0.0.1:1/tap?agent=a%26b&target=llm/openai&min_ms=5"
        );
    }
}
