//! Phase 6, observe (trace part): one OpenTelemetry span per call, exported over OTLP (gRPC or
//! HTTP/protobuf) by a batch processor on its own thread, so a slow or absent collector never
//! holds a call back: past `max_queue` spans are dropped (`/stats` counts the spans ended,
//! exported and failed; the rest were dropped or are still queued). The W3C `traceparent`
//! the agent sent is continued (or a trace is started) and the call's own span is propagated
//! upstream, so a conversation across agents and sidecars is one trace.
//!
//! Attributes follow the OpenTelemetry GenAI and MCP semantic conventions (design §7), plus
//! `agentmesh.*` for the decision, the policy's reason, the cost and the agents. No prompt,
//! completion or tool argument is put in a span unless `capture_content` is on.

use crate::config::{OtlpProtocol, TracesConfig};
use crate::record::{CallRecord, Direction};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
};
use opentelemetry_sdk::Resource;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// Why trace export could not be set up (a bad endpoint or header).
#[derive(Debug, thiserror::Error)]
pub enum TracesError {
    #[error("telemetry.traces: {0}")]
    Setup(String),
}

/// Spans made, exported and lost, for `/stats`.
#[derive(Debug, Default, Serialize)]
pub struct SpanCounters {
    pub ended: AtomicU64,
    pub exported: AtomicU64,
    /// In batches the collector refused or did not answer in time.
    pub export_failed: AtomicU64,
}

/// The sidecar's tracer, or nothing when traces are off.
pub struct Traces {
    inner: Option<Inner>,
    pub counters: Arc<SpanCounters>,
}

struct Inner {
    /// Kept for the life of the sidecar: its processor thread exports the spans.
    _provider: SdkTracerProvider,
    tracer: SdkTracer,
    capture_content: bool,
    /// Runs the gRPC exporter's connection (tonic needs a tokio runtime of its own here: the
    /// batch processor calls the exporter from its own thread).
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Inner {
    /// The sidecar drops its telemetry from inside a runtime at shutdown, where a runtime may
    /// not be dropped in place (tokio panics): let it wind down in the background.
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A call's span while it is in flight.
pub struct CallSpan {
    span: opentelemetry_sdk::trace::Span,
    counters: Arc<SpanCounters>,
    /// Prompts and completions may be recorded (`capture_content`).
    content: bool,
}

/// Longest prompt or completion text put in a span; longer ones are cut, marked.
const MAX_CONTENT: usize = 16 * 1024;

/// The fields of an LLM request or response body that hold its content, as one JSON text.
fn content_of(body: &[u8], fields: &[&str]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let picked: serde_json::Map<String, serde_json::Value> = fields
        .iter()
        .filter_map(|f| v.get(*f).map(|x| (f.to_string(), x.clone())))
        .collect();
    if picked.is_empty() {
        return None;
    }
    let mut text = serde_json::Value::Object(picked).to_string();
    if text.len() > MAX_CONTENT {
        let mut cut = MAX_CONTENT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("…(truncated)");
    }
    Some(text)
}

/// Counts what the wrapped exporter sends and what fails.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    counters: Arc<SpanCounters>,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        // The batch processor's own thread: encoding a batch must never delay a call.
        crate::background::lower_this_thread_once(crate::background::Priority::Idle);
        let n = batch.len() as u64;
        let r = self.inner.export(batch).await;
        let c = if r.is_ok() {
            &self.counters.exported
        } else {
            &self.counters.export_failed
        };
        c.fetch_add(n, Ordering::Relaxed);
        r
    }
    fn shutdown_with_timeout(&mut self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn force_flush(&mut self) -> OTelSdkResult {
        self.inner.force_flush()
    }
    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Collects the headers to set upstream.
#[derive(Default)]
pub struct Propagated(pub Vec<(&'static str, String)>);

impl Injector for Propagated {
    fn set(&mut self, key: &str, value: String) {
        let key = match key {
            "traceparent" => "traceparent",
            "tracestate" => "tracestate",
            _ => return,
        };
        self.0.push((key, value));
    }
}

impl Traces {
    /// No spans.
    pub fn off() -> Traces {
        Traces {
            inner: None,
            counters: Arc::default(),
        }
    }

    /// Sets up export to the configured collector; `service` names the agent's sidecar.
    pub fn new(cfg: Option<&TracesConfig>, service: &str) -> Result<Traces, TracesError> {
        let Some(cfg) = cfg else {
            return Ok(Traces::off());
        };
        let counters: Arc<SpanCounters> = Arc::default();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .on_thread_start(|| {
                crate::background::lower_this_thread(crate::background::Priority::Idle)
            })
            .enable_all()
            .build()
            .map_err(|e| TracesError::Setup(e.to_string()))?;
        let setup = |e: opentelemetry_otlp::ExporterBuildError| TracesError::Setup(e.to_string());
        let exporter = match cfg.protocol {
            OtlpProtocol::Grpc => {
                let _guard = rt.enter();
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (k, v) in &cfg.headers {
                    let key = tonic::metadata::MetadataKey::from_bytes(k.to_lowercase().as_bytes())
                        .map_err(|_| TracesError::Setup(format!("bad header name `{k}`")))?;
                    let value = v
                        .parse()
                        .map_err(|_| TracesError::Setup(format!("bad value for header `{k}`")))?;
                    metadata.insert(key, value);
                }
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(&cfg.endpoint)
                    .with_timeout(cfg.timeout)
                    .with_metadata(metadata)
                    .build()
                    .map_err(setup)?
            }
            OtlpProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(&cfg.endpoint)
                .with_timeout(cfg.timeout)
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_headers(cfg.headers.clone().into_iter().collect())
                .build()
                .map_err(setup)?,
        };
        let processor = BatchSpanProcessor::builder(Counted {
            inner: exporter,
            counters: counters.clone(),
        })
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(cfg.max_queue)
                .with_scheduled_delay(std::time::Duration::from_millis(500))
                .build(),
        )
        .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(
                Resource::builder()
                    .with_service_name(format!("agentmesh-sidecar/{service}"))
                    .with_attribute(KeyValue::new("agentmesh.agent", service.to_string()))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("agentmesh-proxy");
        Ok(Traces {
            inner: Some(Inner {
                _provider: provider,
                tracer,
                capture_content: cfg.capture_content,
                rt: Some(rt),
            }),
            counters,
        })
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Starts a call's span, child of the agent's `traceparent` if it sent one.
    pub fn start(
        &self,
        direction: Direction,
        headers: &http::HeaderMap,
        started: Instant,
    ) -> Option<CallSpan> {
        let inner = self.inner.as_ref()?;
        let started = SystemTime::now() - started.elapsed();
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let kind = match direction {
            Direction::Outbound => SpanKind::Client,
            Direction::Inbound => SpanKind::Server,
        };
        let span = inner
            .tracer
            .span_builder("agentmesh call")
            .with_kind(kind)
            .with_start_time(started)
            .start_with_context(&inner.tracer, &parent);
        Some(CallSpan {
            span,
            counters: self.counters.clone(),
            content: inner.capture_content,
        })
    }
}

impl CallSpan {
    /// `traceparent` (and `tracestate`) naming this span, for the upstream request.
    pub fn propagation(&self) -> Propagated {
        let cx = Context::new().with_remote_span_context(self.span.span_context().clone());
        let mut out = Propagated::default();
        TraceContextPropagator::new().inject_context(&cx, &mut out);
        out
    }

    /// With `capture_content`: the prompt of an LLM request body (`messages`, `system`,
    /// `input`, `instructions`) as `gen_ai.input.messages`.
    pub fn record_input(&mut self, body: &[u8]) {
        if !self.content {
            return;
        }
        if let Some(t) = content_of(body, &["system", "instructions", "messages", "input"]) {
            self.span
                .set_attribute(KeyValue::new("gen_ai.input.messages", t));
        }
    }

    /// With `capture_content`: the completion of a whole (not streamed) LLM response body
    /// (`choices`, `content` or `output`) as `gen_ai.output.messages`.
    pub fn record_output(&mut self, body: &[u8]) {
        if !self.content {
            return;
        }
        if let Some(t) = content_of(body, &["choices", "content", "output"]) {
            self.span
                .set_attribute(KeyValue::new("gen_ai.output.messages", t));
        }
    }

    /// The trace id, for the access log.
    pub fn trace_id(&self) -> String {
        self.span.span_context().trace_id().to_string()
    }

    /// Names the span and sets the call's attributes, then ends it.
    pub fn finish(mut self, rec: &CallRecord, source: &str, error: Option<&str>) {
        let (name, attrs) = describe(rec, source, self.content);
        self.span.update_name(name);
        self.span.set_attributes(attrs);
        if let Some(e) = error {
            self.span.set_status(Status::error(e.to_string()));
        } else if rec.status >= 500 {
            self.span
                .set_status(Status::error(format!("HTTP {}", rec.status)));
        }
        self.span.end();
        self.counters.ended.fetch_add(1, Ordering::Relaxed);
    }
}

/// The span name and attributes of a call (GenAI, MCP and `agentmesh.*` conventions); tool
/// arguments only with `content`.
pub fn describe(rec: &CallRecord, source: &str, content: bool) -> (String, Vec<KeyValue>) {
    let mut a = vec![
        KeyValue::new("agentmesh.source.agent", source.to_string()),
        KeyValue::new("agentmesh.destination", rec.target.clone()),
        KeyValue::new("agentmesh.kind", rec.kind.as_str()),
        KeyValue::new("http.request.method", rec.method.clone()),
        KeyValue::new("http.response.status_code", i64::from(rec.status)),
    ];
    if let Some(d) = &rec.decision {
        a.push(KeyValue::new("agentmesh.decision", d.label()));
        if let Some(r) = &d.reason {
            a.push(KeyValue::new("agentmesh.policy.reason", r.clone()));
        }
    }
    let mut name = format!("{} {}", rec.method, rec.target);
    if let Some(l) = &rec.llm {
        let op = crate::metrics::operation_name(l.operation);
        a.push(KeyValue::new("gen_ai.operation.name", op));
        a.push(KeyValue::new("gen_ai.provider.name", l.provider.clone()));
        if let Some(m) = &l.model {
            a.push(KeyValue::new("gen_ai.request.model", m.clone()));
            name = format!("{op} {m}");
        }
        if let Some(m) = &l.response_model {
            a.push(KeyValue::new("gen_ai.response.model", m.clone()));
        }
        if let Some(n) = l.max_tokens {
            a.push(KeyValue::new("gen_ai.request.max_tokens", n as i64));
        }
        a.push(KeyValue::new(
            "gen_ai.usage.input_tokens",
            l.usage.input_tokens as i64,
        ));
        a.push(KeyValue::new(
            "gen_ai.usage.output_tokens",
            l.usage.output_tokens as i64,
        ));
        if l.usage.cached_input_tokens > 0 {
            a.push(KeyValue::new(
                "gen_ai.usage.cache_read.input_tokens",
                l.usage.cached_input_tokens as i64,
            ));
        }
        if let Some(usd) = l.cost_usd {
            a.push(KeyValue::new("agentmesh.cost.usd", usd));
        }
    }
    if let Some(m) = &rec.mcp {
        if let Some(first) = m.messages.first() {
            a.push(KeyValue::new("mcp.method.name", first.method.clone()));
            name = first.method.clone();
            if let Some(t) = &first.tool {
                a.push(KeyValue::new("gen_ai.tool.name", t.clone()));
                a.push(KeyValue::new("gen_ai.operation.name", "execute_tool"));
                name = format!("{} {t}", first.method);
            }
            if let Some(id) = &first.id {
                a.push(KeyValue::new("jsonrpc.request.id", id.to_string()));
            }
            if let (true, Some(args)) = (content, &first.arguments) {
                a.push(KeyValue::new(
                    "gen_ai.tool.call.arguments",
                    args.to_string(),
                ));
            }
        }
        if let Some(s) = &m.session_id {
            a.push(KeyValue::new("mcp.session.id", s.clone()));
        }
        if let Some(v) = &m.protocol_version {
            a.push(KeyValue::new("mcp.protocol.version", v.clone()));
        }
    }
    if let Some(x) = &rec.a2a {
        a.push(KeyValue::new("agentmesh.a2a.method", x.method.clone()));
        a.push(KeyValue::new("gen_ai.operation.name", "invoke_agent"));
        name = format!("{} {}", x.method, rec.target);
        if let Some(s) = &x.skill {
            a.push(KeyValue::new("agentmesh.a2a.skill", s.clone()));
        }
    }
    (name, a)
}
