//! The control-plane client (design §5): subscribes to the control server's discovery service
//! as the bootstrap file's agent, composes each response with the bootstrap config, and ACKs it
//! once installed (persisting it as the last good set) or NACKs it with the error, keeping the
//! running config. Reconnects with jittered exponential backoff; while disconnected the sidecar
//! serves on its last good config, and `/readyz` says it is not fresh.

use crate::config::{ControlConfig, DiscoveryMode};
use crate::identity::Identity;
use crate::pushed::Pushed;
use crate::state::{Desired, Store};
use agentmesh_control_api::discovery::{
    self as wire, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use agentmesh_control_api::TYPE_URL;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// First and longest pause between reconnects (each doubled, with full jitter).
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// How often the sidecar tells the control server it is alive (its agent's health).
pub const HEARTBEAT: Duration = Duration::from_secs(10);

pub struct XdsClient {
    config: ControlConfig,
    store: Arc<Store>,
    node: wire::Node,
    /// With an identity and an `https://` address, the stream is mTLS: the control server
    /// binds it to this agent, and only then sends the agent's secrets.
    identity: Option<Arc<Identity>>,
}

impl XdsClient {
    pub fn new(
        config: ControlConfig,
        store: Arc<Store>,
        identity: Option<Arc<Identity>>,
    ) -> XdsClient {
        let boot = store.bootstrap();
        let node_id = config.node_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "sidecar".into());
            format!("{host}-{}", std::process::id())
        });
        let advertise = config.advertise.clone().unwrap_or_else(|| {
            match (boot.inbound.forward_to, boot.listeners.inbound) {
                (Some(_), Some(addr)) => {
                    // With an identity the inbound listener is mTLS.
                    let scheme = if boot.identity.is_some() {
                        "https"
                    } else {
                        "http"
                    };
                    format!("{scheme}://127.0.0.1:{}", addr.port())
                }
                _ => String::new(),
            }
        });
        store.update_control(|c| c.node_id = node_id.clone());
        XdsClient {
            node: wire::Node {
                id: node_id,
                agent: boot.agent.name.clone(),
                namespace: boot.agent.namespace.clone(),
                inbound_url: advertise,
                build_version: env!("CARGO_PKG_VERSION").into(),
            },
            config,
            store,
            identity,
        }
    }

    /// Composes a candidate set with the bootstrap config and installs it. `Err`: why it was
    /// refused (the NACK's message).
    fn install(&self, candidate: Pushed) -> Result<(), String> {
        let current = self.store.pushed();
        if current.as_deref() == Some(&candidate) {
            return Ok(());
        }
        let desired = Desired::compose(self.store.bootstrap(), Some(&candidate))
            .map_err(|e| e.to_string())?;
        let candidate = Arc::new(candidate);
        if let Some(file) = &self.config.persist_file {
            if let Err(e) = candidate.persist(file) {
                // Served anyway; only a restart without the control server would miss it.
                tracing::error!(file = %file.display(), error = %e, "cannot persist the pushed config");
            }
        }
        self.store.apply_pushed(candidate, desired);
        Ok(())
    }

    /// Handles one response; returns the error to NACK with, if refused.
    fn on_response(&self, candidate: Pushed) -> Option<String> {
        let version = candidate.version.clone();
        let now = unix_now();
        match self.install(candidate) {
            Ok(()) => {
                self.store.update_control(|c| {
                    c.fresh = true;
                    c.source = "control".into();
                    c.version = Some(version);
                    c.last_update_unix = Some(now);
                    c.last_error = None;
                    c.acks += 1;
                });
                None
            }
            Err(e) => {
                self.store.reject(e.clone());
                self.store.update_control(|c| {
                    c.fresh = false;
                    c.last_error = Some(e.clone());
                    c.nacks += 1;
                });
                Some(e)
            }
        }
    }

    async fn connect(&self) -> Result<AggregatedDiscoveryServiceClient<Channel>, String> {
        let endpoint = Channel::from_shared(self.config.address.clone())
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(HEARTBEAT)
            .keep_alive_timeout(Duration::from_secs(5));
        let failed =
            |e: tonic::transport::Error| format!("cannot connect to {}: {e}", self.config.address);
        let channel = if self.config.address.starts_with("https://") {
            let id = self
                .identity
                .as_ref()
                .ok_or("an https:// control address needs an `identity`")?;
            let tls = tokio_rustls::TlsConnector::from(id.client_tls()?);
            let connector = tower::service_fn(move |uri: http::Uri| {
                let tls = tls.clone();
                async move {
                    let host = uri
                        .host()
                        .unwrap_or("localhost")
                        .trim_matches(['[', ']'])
                        .to_string();
                    let port = uri.port_u16().unwrap_or(443);
                    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                    let name = rustls::pki_types::ServerName::try_from(host)
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                    let stream = tls.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            });
            endpoint
                .connect_with_connector(connector)
                .await
                .map_err(failed)?
        } else {
            endpoint.connect().await.map_err(failed)?
        };
        Ok(AggregatedDiscoveryServiceClient::new(channel))
    }

    /// One stream, until it ends. `Ok(true)` when a response arrived (the next retry starts
    /// from the shortest backoff).
    async fn session<M: Mode>(&self) -> Result<bool, String> {
        let mut client = self.connect().await?;
        let (tx, rx) = mpsc::channel(4);
        let held = self.store.pushed();
        let _ = tx.send(M::first(&self.node, held.as_deref())).await;
        let mut inbound = M::open(&mut client, ReceiverStream::new(rx))
            .await
            .map_err(|s| describe(&s))?;
        self.store.update_control(|c| {
            c.connected = true;
            c.connects += 1;
        });
        tracing::info!(address = %self.config.address, mode = M::NAME, "connected to the control server");
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        let mut last_reply: Option<M::Req> = None;
        let mut got_one = false;
        loop {
            tokio::select! {
                msg = inbound.message() => {
                    let resp = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => return Ok(got_one),
                        Err(s) => return if got_one { Ok(true) } else { Err(describe(&s)) },
                    };
                    got_one = true;
                    let held = self.store.pushed();
                    let candidate = M::candidate(held.as_deref(), &resp);
                    let error = self.on_response(candidate);
                    let running = self.store.pushed().map(|p| p.version.clone()).unwrap_or_default();
                    let reply = M::reply(&resp, &running, error);
                    last_reply = Some(reply.clone());
                    if tx.send(reply).await.is_err() {
                        return Ok(true);
                    }
                }
                _ = heartbeat.tick() => {
                    // Repeating the last answer: the control server counts it as a heartbeat.
                    let beat = last_reply.clone().unwrap_or_else(|| M::first(&self.node, None));
                    if tx.send(beat).await.is_err() {
                        return Ok(got_one);
                    }
                }
            }
        }
    }
}

fn describe(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The two discovery modes, as the client speaks them.
#[async_trait]
trait Mode {
    type Req: Clone + Send + Sync + 'static;
    type Resp: Send;
    const NAME: &'static str;
    fn first(node: &wire::Node, held: Option<&Pushed>) -> Self::Req;
    async fn open(
        client: &mut AggregatedDiscoveryServiceClient<Channel>,
        requests: ReceiverStream<Self::Req>,
    ) -> Result<tonic::Streaming<Self::Resp>, tonic::Status>;
    fn candidate(held: Option<&Pushed>, resp: &Self::Resp) -> Pushed;
    fn reply(resp: &Self::Resp, running: &str, error: Option<String>) -> Self::Req;
}

fn nack(error: Option<String>) -> Option<wire::ErrorDetail> {
    error.map(|message| wire::ErrorDetail {
        code: tonic::Code::InvalidArgument as i32,
        message,
    })
}

struct Sotw;
#[async_trait]
impl Mode for Sotw {
    type Req = wire::DiscoveryRequest;
    type Resp = wire::DiscoveryResponse;
    const NAME: &'static str = "sotw";
    fn first(node: &wire::Node, held: Option<&Pushed>) -> Self::Req {
        wire::DiscoveryRequest {
            version_info: held.map(|p| p.version.clone()).unwrap_or_default(),
            node: Some(node.clone()),
            type_url: TYPE_URL.into(),
            ..Default::default()
        }
    }
    async fn open(
        client: &mut AggregatedDiscoveryServiceClient<Channel>,
        requests: ReceiverStream<Self::Req>,
    ) -> Result<tonic::Streaming<Self::Resp>, tonic::Status> {
        Ok(client.stream_resources(requests).await?.into_inner())
    }
    fn candidate(_: Option<&Pushed>, resp: &Self::Resp) -> Pushed {
        Pushed::whole(resp)
    }
    fn reply(resp: &Self::Resp, running: &str, error: Option<String>) -> Self::Req {
        wire::DiscoveryRequest {
            version_info: running.into(),
            node: None,
            type_url: TYPE_URL.into(),
            response_nonce: resp.nonce.clone(),
            error_detail: nack(error),
        }
    }
}

struct Delta;
#[async_trait]
impl Mode for Delta {
    type Req = wire::DeltaDiscoveryRequest;
    type Resp = wire::DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";
    fn first(node: &wire::Node, held: Option<&Pushed>) -> Self::Req {
        wire::DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: TYPE_URL.into(),
            initial_resource_versions: held.map(|p| p.versions()).unwrap_or_default(),
            ..Default::default()
        }
    }
    async fn open(
        client: &mut AggregatedDiscoveryServiceClient<Channel>,
        requests: ReceiverStream<Self::Req>,
    ) -> Result<tonic::Streaming<Self::Resp>, tonic::Status> {
        Ok(client.delta_resources(requests).await?.into_inner())
    }
    fn candidate(held: Option<&Pushed>, resp: &Self::Resp) -> Pushed {
        held.cloned().unwrap_or_default().with_delta(resp)
    }
    fn reply(resp: &Self::Resp, _: &str, error: Option<String>) -> Self::Req {
        wire::DeltaDiscoveryRequest {
            node: None,
            type_url: TYPE_URL.into(),
            response_nonce: resp.nonce.clone(),
            error_detail: nack(error),
            ..Default::default()
        }
    }
}

#[async_trait]
impl BackgroundService for XdsClient {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let run = async {
                match self.config.mode {
                    DiscoveryMode::Delta => self.session::<Delta>().await,
                    DiscoveryMode::Sotw => self.session::<Sotw>().await,
                }
            };
            let result = tokio::select! {
                r = run => r,
                _ = shutdown.changed() => return,
            };
            self.store.update_control(|c| {
                c.connected = false;
                c.fresh = false;
            });
            match result {
                Ok(true) => {
                    tracing::warn!(address = %self.config.address, "control-server stream ended; serving on the last good config");
                    backoff = BACKOFF_MIN;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(address = %self.config.address, error = %e, "control server unreachable; serving on the last good config");
                    self.store.update_control(|c| c.last_error = Some(e));
                }
            }
            // Full jitter: a restarted control server is not met by every sidecar at once.
            let pause = backoff
                .mul_f64(rand::random::<f64>())
                .max(Duration::from_millis(50));
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
