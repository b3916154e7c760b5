//! The discovery service (design §5): one stream per sidecar, state-of-the-world or delta.
//! Both modes run one session logic: on a stream's first request and after every rebuild, the
//! sidecar's granted set is compared with what it last ACKed; a difference is sent (the whole set,
//! or the changed resources and the removed names) with a version and a nonce, and nothing more is
//! sent until the sidecar answers that nonce. An ACK moves what the sidecar runs forward; a NACK
//! leaves it where it was, is recorded for the API, and the refused version is not sent again.

use crate::control::Control;
use crate::registry::{now_unix, Nack, Sidecar};
use crate::resources::set_version;
use crate::xds_listener::StreamPeer;
use agentmesh_control_api::discovery::{
    self as wire, aggregated_discovery_service_server::AggregatedDiscoveryService,
};
use agentmesh_control_api::TYPE_URL;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};

/// What one response carries, whichever the mode.
struct Update {
    version: String,
    nonce: String,
    /// The whole set (SotW) or the changed resources (delta).
    resources: Vec<wire::Resource>,
    removed: Vec<String>,
}

/// What a request says about the last response.
struct Answer {
    nonce: String,
    error: Option<wire::ErrorDetail>,
}

/// The two wire modes over one session logic.
trait Mode: Send + 'static {
    type Req: Send + 'static;
    type Resp: Send + 'static;
    const NAME: &'static str;
    fn node(req: &Self::Req) -> Option<wire::Node>;
    /// Resource versions the sidecar says it holds on its first request (delta only).
    fn initial(req: &Self::Req) -> BTreeMap<String, String>;
    fn answer(req: &Self::Req) -> Answer;
    fn response(u: Update, instance: &str) -> Self::Resp;
    /// Whether responses carry the whole set.
    const WHOLE: bool;
}

struct Sotw;
impl Mode for Sotw {
    type Req = wire::DiscoveryRequest;
    type Resp = wire::DiscoveryResponse;
    const NAME: &'static str = "sotw";
    const WHOLE: bool = true;
    fn node(req: &Self::Req) -> Option<wire::Node> {
        req.node.clone()
    }
    fn initial(_: &Self::Req) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
    fn answer(req: &Self::Req) -> Answer {
        Answer {
            nonce: req.response_nonce.clone(),
            error: req.error_detail.clone(),
        }
    }
    fn response(u: Update, instance: &str) -> Self::Resp {
        wire::DiscoveryResponse {
            version_info: u.version,
            resources: u.resources,
            type_url: TYPE_URL.into(),
            nonce: u.nonce,
            control_plane: instance.into(),
        }
    }
}

struct Delta;
impl Mode for Delta {
    type Req = wire::DeltaDiscoveryRequest;
    type Resp = wire::DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";
    const WHOLE: bool = false;
    fn node(req: &Self::Req) -> Option<wire::Node> {
        req.node.clone()
    }
    fn initial(req: &Self::Req) -> BTreeMap<String, String> {
        req.initial_resource_versions
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
    fn answer(req: &Self::Req) -> Answer {
        Answer {
            nonce: req.response_nonce.clone(),
            error: req.error_detail.clone(),
        }
    }
    fn response(u: Update, instance: &str) -> Self::Resp {
        wire::DeltaDiscoveryResponse {
            system_version_info: u.version,
            resources: u.resources,
            removed_resources: u.removed,
            type_url: TYPE_URL.into(),
            nonce: u.nonce,
            control_plane: instance.into(),
        }
    }
}

/// One sidecar's stream: what it runs, and the response it has not answered yet.
struct Session {
    node_id: String,
    agent: String,
    /// Resource name to version, as the sidecar runs them.
    running: BTreeMap<String, String>,
    running_version: Option<String>,
    pending: Option<(String, String, BTreeMap<String, String>)>,
    refused_version: Option<String>,
    sent: u64,
    /// The stream's client proved the agent's identity (mTLS): only then are secrets sent.
    authenticated: bool,
}

impl Session {
    /// The next response, if the sidecar's grant differs from what it runs (always one for a
    /// stream's first, so that the sidecar learns it is current).
    fn next(&mut self, control: &Control, whole: bool) -> Result<Option<Update>, Status> {
        if self.pending.is_some() {
            return Ok(None);
        }
        let world = control.world();
        let mut set = world.for_agent(&self.agent).ok_or_else(|| {
            Status::not_found(format!(
                "agent `{}` is neither declared in the control server's config nor registered",
                self.agent
            ))
        })?;
        if !self.authenticated {
            set.retain(|r| !r.name.starts_with("secret/"));
        }
        let version = set_version(&set);
        let first = self.sent == 0;
        if !first
            && (Some(&version) == self.running_version.as_ref()
                || Some(&version) == self.refused_version.as_ref())
        {
            return Ok(None);
        }
        let versions: BTreeMap<String, String> = set
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect();
        let resources = set
            .iter()
            .filter(|r| whole || self.running.get(&r.name) != Some(&r.version))
            .map(|r| (**r).clone())
            .collect();
        let removed = if whole {
            Vec::new()
        } else {
            self.running
                .keys()
                .filter(|n| !versions.contains_key(*n))
                .cloned()
                .collect()
        };
        self.sent += 1;
        let nonce = format!("{}", self.sent);
        self.pending = Some((nonce.clone(), version.clone(), versions));
        Ok(Some(Update {
            version,
            nonce,
            resources,
            removed,
        }))
    }

    /// Takes the sidecar's answer to the pending response; stale nonces are ignored.
    fn answer(&mut self, control: &Control, a: Answer) {
        let now = now_unix();
        let matches = self.pending.as_ref().is_some_and(|(n, _, _)| *n == a.nonce);
        if !matches {
            control
                .registry
                .update(&self.node_id, |s| s.last_seen_unix = now);
            return;
        }
        let (nonce, version, versions) = self.pending.take().expect("matched above");
        match a.error {
            None => {
                self.running = versions;
                self.running_version = Some(version.clone());
                self.refused_version = None;
                control.registry.update(&self.node_id, |s| {
                    s.last_seen_unix = now;
                    s.acked_version = Some(version);
                    s.acked_at_unix = Some(now);
                    s.acks += 1;
                });
            }
            Some(e) => {
                tracing::warn!(node = %self.node_id, agent = %self.agent, %version, error = %e.message, "sidecar NACKed");
                self.refused_version = Some(version.clone());
                control.registry.update(&self.node_id, |s| {
                    s.last_seen_unix = now;
                    s.nacks += 1;
                    s.last_nack = Some(Nack {
                        version,
                        nonce,
                        message: e.message,
                        at_unix: now,
                    });
                });
            }
        }
    }
}

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Clone)]
pub struct Ads {
    pub control: Arc<Control>,
}

impl Ads {
    fn open<M: Mode>(&self, mut inbound: Streaming<M::Req>, peer: StreamPeer) -> Out<M::Resp>
    where
        M::Req: prost::Message + Default,
    {
        let (tx, rx) = mpsc::channel::<Result<M::Resp, Status>>(4);
        let control = self.control.clone();
        tokio::spawn(async move {
            if let Err(status) = serve::<M>(&control, &mut inbound, &tx, peer).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

async fn serve<M: Mode>(
    control: &Arc<Control>,
    inbound: &mut Streaming<M::Req>,
    tx: &mpsc::Sender<Result<M::Resp, Status>>,
    peer: StreamPeer,
) -> Result<(), Status>
where
    M::Req: prost::Message + Default,
{
    let Some(first) = inbound.message().await? else {
        return Ok(());
    };
    let node = M::node(&first)
        .filter(|n| !n.agent.is_empty() && !n.id.is_empty())
        .ok_or_else(|| {
            Status::invalid_argument("the first request must carry `node` with `id` and `agent`")
        })?;
    // A client certificate binds the stream to its agent; only such a stream is sent secrets.
    if let Some(id) = &peer.0 {
        if id.agent != node.agent || id.namespace != node.namespace {
            return Err(Status::permission_denied(format!(
                "the client certificate is `{id}`, not agent `{}` in namespace `{}`",
                node.agent, node.namespace
            )));
        }
    }
    let now = now_unix();
    static STREAMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let stream = STREAMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut session = Session {
        node_id: node.id.clone(),
        agent: node.agent.clone(),
        running: M::initial(&first),
        running_version: None,
        pending: None,
        refused_version: None,
        sent: 0,
        authenticated: peer.0.is_some(),
    };
    control.registry.connected(Sidecar {
        stream,
        node_id: node.id.clone(),
        agent: node.agent.clone(),
        namespace: node.namespace.clone(),
        inbound_url: node.inbound_url.clone(),
        build_version: node.build_version.clone(),
        mode: M::NAME,
        connected: true,
        connected_at_unix: now,
        last_seen_unix: now,
        sent_version: None,
        acked_version: None,
        acked_at_unix: None,
        acks: 0,
        nacks: 0,
        last_nack: None,
    });
    tracing::info!(node = %node.id, agent = %node.agent, mode = M::NAME, "sidecar connected");
    // Its endpoint is now live: peers that call this agent get it.
    control.rebuild_soon();
    let mut changes = control.subscribe();
    let result = async {
        loop {
            if let Some(update) = session.next(control, M::WHOLE)? {
                let version = update.version.clone();
                if tx
                    .send(Ok(M::response(update, &control.instance)))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
                control
                    .registry
                    .update(&session.node_id, |s| s.sent_version = Some(version));
            }
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => session.answer(control, M::answer(&req)),
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(e),
                },
                changed = changes.changed() => if changed.is_err() { return Ok(()) },
                _ = tx.closed() => return Ok(()),
            }
        }
    }
    .await;
    control.registry.update(&session.node_id, |s| {
        // Unless the node has reconnected meanwhile on a newer stream.
        if s.stream == stream {
            s.connected = false;
        }
    });
    tracing::info!(node = %session.node_id, agent = %session.agent, "sidecar disconnected");
    control.rebuild_soon();
    result
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamResourcesStream = Out<wire::DiscoveryResponse>;
    type DeltaResourcesStream = Out<wire::DeltaDiscoveryResponse>;

    async fn stream_resources(
        &self,
        request: Request<Streaming<wire::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamResourcesStream>, Status> {
        let peer = request
            .extensions()
            .get::<StreamPeer>()
            .cloned()
            .unwrap_or_default();
        Ok(Response::new(self.open::<Sotw>(request.into_inner(), peer)))
    }

    async fn delta_resources(
        &self,
        request: Request<Streaming<wire::DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaResourcesStream>, Status> {
        let peer = request
            .extensions()
            .get::<StreamPeer>()
            .cloned()
            .unwrap_or_default();
        Ok(Response::new(
            self.open::<Delta>(request.into_inner(), peer),
        ))
    }
}
