//! Phase 6, observe (log part): one JSON line per call, on its own sink (stdout, a file, or off).
//! The full telemetry pipeline (OTLP, metrics, tap) is issue 4; this is the record it builds on.

use crate::record::CallRecord;
use crate::reject::Rejection;
use serde::Serialize;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where access lines go.
pub struct AccessLog {
    sink: Mutex<Option<Box<dyn Write + Send>>>,
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
    pub fn open(spec: &str) -> std::io::Result<AccessLog> {
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
        if let Ok(mut bytes) = serde_json::to_vec(&line) {
            bytes.push(b'\n');
            if let Err(e) = sink.write_all(&bytes).and_then(|_| sink.flush()) {
                tracing::warn!(error = %e, "access log write failed");
            }
        }
    }
}
