//! Phase 6, observe (log part): one JSON line per call, on its own sink (stdout, a file, or off).
//! The full telemetry pipeline (OTLP, metrics, tap) is issue 4; this is the record it builds on.
//!
//! Lines are rendered on the request's thread and handed to a dedicated writer thread over a
//! bounded queue, so a slow disk or a blocked stdout never stalls the proxy's workers. The writer
//! batches whatever is queued and flushes when the queue runs dry. If the queue is full the line
//! is counted as dropped (`/stats`), never waited for.

use crate::record::CallRecord;
use crate::reject::Rejection;
use serde::Serialize;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lines that may wait for the writer before new ones are dropped.
const QUEUE_LINES: usize = 65_536;

/// How each line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line, for machines.
    Json,
    /// Aligned columns, for a person watching a terminal.
    Text,
}

/// Where access lines go.
pub struct AccessLog {
    tx: Option<SyncSender<Vec<u8>>>,
    format: Format,
    counters: Arc<Counters>,
}

/// What happened to the lines, for `/stats`.
#[derive(Debug, Default, serde::Serialize)]
pub struct Counters {
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    pub write_errors: AtomicU64,
}

#[derive(Serialize)]
struct Line<'a> {
    /// Milliseconds since the Unix epoch.
    ts_ms: u128,
    #[serde(flatten)]
    call: &'a CallRecord,
    subject: String,
    duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttfb_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_message: Option<&'a str>,
}

fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

impl AccessLog {
    /// `spec` is `stdout`, `off`, or a file path (appended to).
    pub fn open(spec: &str, format: Format) -> std::io::Result<AccessLog> {
        let sink: Option<Box<dyn Write + Send>> = match spec {
            "off" => None,
            "stdout" | "-" => Some(Box::new(std::io::stdout())),
            path => Some(Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )),
        };
        Self::with_sink(sink, format, QUEUE_LINES)
    }

    fn with_sink(
        sink: Option<Box<dyn Write + Send>>,
        format: Format,
        queue: usize,
    ) -> std::io::Result<AccessLog> {
        let counters = Arc::new(Counters::default());
        let tx = match sink {
            None => None,
            Some(sink) => {
                let (tx, rx) = sync_channel::<Vec<u8>>(queue);
                let c = counters.clone();
                std::thread::Builder::new()
                    .name("access-log".into())
                    .spawn(move || {
                        let mut out = std::io::BufWriter::with_capacity(64 * 1024, sink);
                        // Blocks for the next line, takes every other queued one, then flushes.
                        while let Ok(first) = rx.recv() {
                            let mut n = 0u64;
                            let mut ok = out.write_all(&first).is_ok();
                            n += 1;
                            while let Ok(line) = rx.try_recv() {
                                ok &= out.write_all(&line).is_ok();
                                n += 1;
                            }
                            ok &= out.flush().is_ok();
                            if ok {
                                c.written.fetch_add(n, Ordering::Relaxed);
                            } else {
                                c.write_errors.fetch_add(n, Ordering::Relaxed);
                            }
                        }
                    })?;
                Some(tx)
            }
        };
        Ok(AccessLog {
            tx,
            format,
            counters,
        })
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn write(
        &self,
        call: &CallRecord,
        total: Duration,
        upstream: Option<Duration>,
        ttfb: Option<Duration>,
        rejection: Option<&Rejection>,
    ) {
        let Some(tx) = &self.tx else { return };
        let line = Line {
            ts_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
            call,
            subject: call.subject(),
            duration_ms: ms(total),
            upstream_ms: upstream.map(ms),
            ttfb_ms: ttfb.map(ms),
            error: rejection.map(|r| r.cause),
            error_message: rejection.map(|r| r.message.as_str()),
        };
        let bytes = match self.format {
            Format::Json => serde_json::to_vec(&line).map(|mut b| {
                b.push(b'\n');
                b
            }),
            Format::Text => Ok(text_line(&line).into_bytes()),
        };
        let Ok(bytes) = bytes else { return };
        match tx.try_send(bytes) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                let n = self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                if n.is_multiple_of(10_000) {
                    tracing::warn!(
                        dropped = n + 1,
                        "access log writer is behind; lines dropped"
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// `outbound llm  llm/openai       gpt-4o-mini          200  tokens 8/7       3.1 ms`
fn text_line(l: &Line<'_>) -> String {
    let c = l.call;
    let tokens = c
        .llm
        .as_ref()
        .map(|x| format!("{}/{}", x.usage.input_tokens, x.usage.output_tokens))
        .unwrap_or_else(|| "-".into());
    let subject = if l.subject.is_empty() {
        "-"
    } else {
        l.subject.as_str()
    };
    let mut s = format!(
        "{:<8} {:<4} {:<18} {:<32} {:>3}  tokens {:<9} {:>8.1} ms",
        match c.direction {
            crate::record::Direction::Outbound => "outbound",
            crate::record::Direction::Inbound => "inbound",
        },
        c.kind.as_str(),
        c.target,
        subject,
        c.status,
        tokens,
        l.duration_ms
    );
    if let (Some(e), Some(m)) = (l.error, l.error_message) {
        s.push_str(&format!("  {e}: {m}"));
    }
    if let Some(d) = c.decision.as_ref().filter(|d| !d.allow && !d.enforced) {
        let reason = d.reason.as_deref().unwrap_or("denied by policy");
        s.push_str(&format!("  audit-deny: {reason}"));
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CallKind;
    use crate::record::Direction;

    /// A sink tests can read back, optionally stalled until released.
    #[derive(Clone, Default)]
    struct Shared(Arc<std::sync::Mutex<Vec<u8>>>, Arc<std::sync::Mutex<()>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _gate = self.1.lock().unwrap();
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn call(n: u16) -> CallRecord {
        let mut r = CallRecord::new(Direction::Outbound, CallKind::Http, "http/x", "GET", "/");
        r.status = n;
        r
    }

    fn wait_for(c: &AtomicU64, n: u64) {
        for _ in 0..500 {
            if c.load(Ordering::Relaxed) >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn lines_arrive_in_order_off_the_caller_thread() {
        let sink = Shared::default();
        let log = AccessLog::with_sink(Some(Box::new(sink.clone())), Format::Json, 1024).unwrap();
        for i in 0..100 {
            log.write(&call(i), Duration::from_millis(1), None, None, None);
        }
        wait_for(&log.counters().written, 100);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let statuses: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["status"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(statuses, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_stalled_sink_drops_and_counts_instead_of_blocking() {
        let sink = Shared::default();
        let gate = sink.1.lock().unwrap(); // the sink blocks until released
        let log = AccessLog::with_sink(Some(Box::new(sink.clone())), Format::Text, 4).unwrap();
        // The first line reaches the writer thread, which then stalls on the sink.
        log.write(&call(0), Duration::from_millis(1), None, None, None);
        std::thread::sleep(Duration::from_millis(100));
        for i in 1..50 {
            log.write(&call(i), Duration::from_millis(1), None, None, None);
        }
        // The caller was never blocked: 49 more calls returned with the sink stalled; the
        // queue kept 4 of them and counted the rest as dropped.
        assert_eq!(log.counters().dropped.load(Ordering::Relaxed), 45);
        drop(gate);
        let kept = 50 - log.counters().dropped.load(Ordering::Relaxed);
        wait_for(&log.counters().written, kept);
        assert_eq!(log.counters().written.load(Ordering::Relaxed), kept);
    }
}
