//! Phase 6, observe (log part): one JSON line per call, on its own sink (stdout, a file, or off).
//! The full telemetry pipeline (OTLP, metrics, tap) is issue 4; this is the record it builds on.

use crate::record::CallRecord;
use crate::reject::Rejection;
use serde::Serialize;
use std::io::Write;
use std::sync::Mutex;
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
    sink: Mutex<Option<Box<dyn Write + Send>>>,
    format: Format,
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
        Ok(AccessLog {
            sink: Mutex::new(sink),
            format,
        })
    }

    pub fn write(
        &self,
        call: &CallRecord,
        total: Duration,
        upstream: Option<Duration>,
        ttfb: Option<Duration>,
        rejection: Option<&Rejection>,
    ) {
        let mut guard = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        let Some(sink) = guard.as_mut() else { return };
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
        if let Ok(bytes) = bytes {
            if let Err(e) = sink.write_all(&bytes).and_then(|_| sink.flush()) {
                tracing::warn!(error = %e, "access log write failed");
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
    s.push('\n');
    s
}
