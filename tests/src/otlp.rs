//! A real OTLP trace receiver for the telemetry suites: the OTLP/gRPC `TraceService` (tonic, on
//! the types of `opentelemetry-proto`) and OTLP/HTTP protobuf (`POST /v1/traces`), keeping every
//! span it receives with its resource's `service.name`.

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One received span, flattened for assertions.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: String,
    pub span: Span,
}

impl ReceivedSpan {
    pub fn name(&self) -> &str {
        &self.span.name
    }
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
    /// An attribute's value as text (strings as they are, numbers and booleans printed).
    pub fn attr(&self, key: &str) -> Option<String> {
        let kv = self.span.attributes.iter().find(|kv| kv.key == key)?;
        match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            AnyValue::IntValue(i) => Some(i.to_string()),
            AnyValue::DoubleValue(d) => Some(d.to_string()),
            AnyValue::BoolValue(b) => Some(b.to_string()),
            other => Some(format!("{other:?}")),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The spans received, and the headers (gRPC metadata) of the last export.
#[derive(Clone, Default)]
struct Store(
    Arc<Mutex<Vec<ReceivedSpan>>>,
    Arc<Mutex<Vec<(String, String)>>>,
);

impl Store {
    fn add(&self, req: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().unwrap();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(ReceivedSpan {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
    }
}

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        *self.1.lock().unwrap() = request
            .metadata()
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    Some((k.to_string(), v.to_str().ok()?.to_string()))
                }
                _ => None,
            })
            .collect();
        self.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A receiver listening on a free loopback port; stops with the test's runtime.
pub struct Receiver {
    pub port: u16,
    store: Store,
}

impl Receiver {
    /// OTLP/gRPC: the endpoint is `http://127.0.0.1:PORT`.
    pub async fn grpc() -> Receiver {
        Self::grpc_on("127.0.0.1:0").await
    }

    /// OTLP/gRPC on a given address.
    pub async fn grpc_on(addr: &str) -> Receiver {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let store = Store::default();
        let svc = TraceServiceServer::new(store.clone());
        tokio::spawn(async move {
            let incoming = tokio_stream_listener(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        });
        Receiver { port, store }
    }

    /// OTLP/HTTP with protobuf bodies: the endpoint is `http://127.0.0.1:PORT/v1/traces`.
    pub async fn http() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let store = Store::default();
        let s = store.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let s = s.clone();
                            async move {
                                *s.1.lock().unwrap() = req
                                    .headers()
                                    .iter()
                                    .filter_map(|(k, v)| {
                                        Some((k.to_string(), v.to_str().ok()?.to_string()))
                                    })
                                    .collect();
                                let path = req.uri().path().to_string();
                                let body = req.into_body().collect().await?.to_bytes();
                                let status = match ExportTraceServiceRequest::decode(body) {
                                    Ok(r) if path == "/v1/traces" => {
                                        s.add(r);
                                        200
                                    }
                                    _ => 400,
                                };
                                let reply = ExportTraceServiceResponse::default().encode_to_vec();
                                Ok::<_, hyper::Error>(
                                    Response::builder()
                                        .status(status)
                                        .header("content-type", "application/x-protobuf")
                                        .body(Full::new(bytes::Bytes::from(reply)))
                                        .unwrap(),
                                )
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver { port, store }
    }

    /// The headers (gRPC metadata) of the last export.
    pub fn last_headers(&self) -> Vec<(String, String)> {
        self.store.1.lock().unwrap().clone()
    }

    /// How many spans arrived.
    pub fn count(&self) -> usize {
        self.store.0.lock().unwrap().len()
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.store.0.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for the spans received (export is batched, every 0.5 s).
    pub async fn wait(&self, pred: impl Fn(&[ReceivedSpan]) -> bool) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let spans = self.spans();
            if pred(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "the receiver never got the expected spans; it has: {:#?}",
                spans
                    .iter()
                    .map(|s| (s.service.clone(), s.name().to_string()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The listener as the stream of connections tonic serves.
fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}
