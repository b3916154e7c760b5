//! A small real HTTP server for the identity suites: `GET /jwks.json` serves a JWKS the test
//! can change (and counts the fetches), and any other request is answered with the headers it
//! arrived with, so a test sees exactly what reached an upstream.

use http_body_util::Full;
use hyper::{Request, Response};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct State {
    jwks: Mutex<String>,
    fetches: AtomicU64,
    seen: Mutex<Vec<serde_json::Value>>,
}

pub struct Echo {
    pub port: u16,
    state: Arc<State>,
}

impl Echo {
    pub async fn start() -> Echo {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(State::default());
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: Request<hyper::body::Incoming>| {
                            let st = st.clone();
                            async move {
                                let body = if req.uri().path() == "/jwks.json" {
                                    st.fetches.fetch_add(1, Ordering::Relaxed);
                                    st.jwks.lock().unwrap().clone()
                                } else {
                                    let headers: serde_json::Map<String, serde_json::Value> = req
                                        .headers()
                                        .iter()
                                        .map(|(k, v)| {
                                            (k.to_string(), v.to_str().unwrap_or("").into())
                                        })
                                        .collect();
                                    let v = serde_json::json!({"path": req.uri().path(), "headers": headers});
                                    st.seen.lock().unwrap().push(v.clone());
                                    v.to_string()
                                };
                                Ok::<_, std::convert::Infallible>(
                                    Response::builder()
                                        .header("content-type", "application/json")
                                        .body(Full::new(bytes::Bytes::from(body)))
                                        .expect("response"),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Echo { port, state }
    }

    pub fn set_jwks(&self, jwks: &serde_json::Value) {
        *self.state.jwks.lock().unwrap() = jwks.to_string();
    }

    pub fn jwks_fetches(&self) -> u64 {
        self.state.fetches.load(Ordering::Relaxed)
    }

    /// Requests received, other than JWKS fetches: path and headers.
    pub fn seen(&self) -> Vec<serde_json::Value> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}
