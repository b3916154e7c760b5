//! Phase 6, observe (log part): one JSON line per call, on its own sink (stdout, a file, or off).
//! The full telemetry pipeline (OTLP, metrics, tap) is issue 4; this is the record it builds on.
//! Lines are rendered on the request's thread and written by a `LineSink`, which never blocks
//! the proxy's workers.

use crate::linesink::{Counters, LineSink, Rotation};
use crate::record::CallRecord;
use crate::reject::Rejection;
use serde::Serialize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    sink: LineSink,
    format: Format,
}

#[derive(Serialize)]
struct Line<'a> {
    /// Milliseconds since the Unix epoch.
    ts_ms: u64,
    /// The call's trace, when traces are on.
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
    /// Who called: the local agent (outbound), the peer (inbound; `unknown` until mTLS).
    source: &'a str,
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

/// How long a call took: in all, waiting on the upstream, and to the first response byte.
pub struct Timings {
    pub total: Duration,
    pub upstream: Option<Duration>,
    pub ttfb: Option<Duration>,
}

/// A duration in milliseconds, to the microsecond.
pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl AccessLog {
    /// `spec` is `stdout`, `off`, or a file path (appended to).
    pub fn open(spec: &str, format: Format, rotation: Rotation) -> std::io::Result<AccessLog> {
        Ok(AccessLog {
            sink: LineSink::open(spec, "access-log", rotation)?,
            format,
        })
    }

    pub fn counters(&self) -> &Counters {
        self.sink.counters()
    }

    pub fn write(
        &self,
        call: &CallRecord,
        source: &str,
        t: Timings,
        rejection: Option<&Rejection>,
        trace_id: Option<&str>,
    ) {
        if !self.sink.is_on() {
            return;
        }
        let line = Line {
            ts_ms: unix_ms(),
            trace_id,
            source,
            call,
            subject: call.subject(),
            duration_ms: ms(t.total),
            upstream_ms: t.upstream.map(ms),
            ttfb_ms: t.ttfb.map(ms),
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
        if let Ok(bytes) = bytes {
            self.sink.send(bytes);
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
    use crate::linesink::tests::{wait_for, Shared};
    use crate::record::Direction;

    fn call(n: u16) -> CallRecord {
        let mut r = CallRecord::new(Direction::Outbound, CallKind::Http, "http/x", "GET", "/");
        r.status = n;
        r
    }

    #[test]
    fn lines_arrive_in_order_off_the_caller_thread() {
        let sink = Shared::default();
        let log = AccessLog {
            sink: LineSink::with_writer(Some(Box::new(sink.clone())), "test", 1024).unwrap(),
            format: Format::Json,
        };
        for i in 0..100 {
            log.write(
                &call(i),
                "tester",
                Timings {
                    total: Duration::from_millis(1),
                    upstream: None,
                    ttfb: None,
                },
                None,
                None,
            );
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
}
