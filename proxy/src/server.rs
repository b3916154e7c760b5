//! Assembles the sidecar: the outbound and inbound proxy listeners, the admin listener and the
//! reloader, on one pingora server whose worker threads serve them all.

use crate::accesslog::AccessLog;
use crate::admin::Admin;
use crate::config::Config;
use crate::decide::PolicyCounters;
use crate::decisionlog::DecisionLog;
use crate::exchange::Exchanger;
use crate::identity::{peer_verifier, Identity, PeerIdentity, Renewer, ServerCert};
use crate::metrics::Metrics;
use crate::proxy::MeshProxy;
use crate::pushed::Pushed;
use crate::record::Direction;
use crate::reload::Reloader;
use crate::spend::Spend;
use crate::state::{Desired, Store};
use crate::tap::Tap;
use crate::traces::Traces;
use crate::xds::XdsClient;
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use pingora_proxy::ProxyServiceBuilder;
use std::path::PathBuf;
use std::sync::Arc;

/// Options that are not part of the reloadable config.
pub struct RunOptions {
    pub config_path: PathBuf,
    pub threads: usize,
    pub access_log: String,
    pub access_log_format: crate::accesslog::Format,
    /// `stdout`, `off` or a file path.
    pub decision_log: String,
    /// When the access and decision log files are rotated.
    pub rotation: crate::linesink::Rotation,
    /// The log filter's handle, for the admin port's `/logging`.
    pub log: Option<Arc<crate::logging::LogControl>>,
}

/// Write buffer of the connections the sidecar accepts (agent and peers). pingora's default is
/// one TCP segment (1,460 bytes): a response whose body did not fit beside its header left in
/// two segments, header then body, waking the agent twice; 16 KiB carries a typical LLM or tool
/// answer whole in one. Bodies framed by chunks or by the connection's end (SSE, WebSocket)
/// are flushed as each piece passes, as before; only a `Content-Length` body waits for its end
/// or for the buffer to fill.
const ACCEPTED_WRITE_BUFFER: usize = 16 * 1024;

/// A listener whose accepted connections use `ACCEPTED_WRITE_BUFFER`.
fn listener(addr: std::net::SocketAddr) -> ListenerConfig {
    ListenerConfig::tcp(addr.to_string())
        .l4_buffer(L4BufferSettings::default().write(ACCEPTED_WRITE_BUFFER))
}

/// Checks that every listener address can be bound, so that a taken port stops the start with
/// a clear error (pingora would log it from a service thread and keep running without it).
fn check_listeners(config: &Config) -> anyhow::Result<()> {
    let l = &config.listeners;
    let mut wanted = vec![("outbound", l.outbound), ("admin", l.admin)];
    if let (Some(addr), Some(_)) = (l.inbound, config.inbound.forward_to) {
        wanted.push(("inbound", addr));
    }
    for (name, addr) in wanted {
        // std sets SO_REUSEADDR on Unix, as pingora does, so TIME_WAIT sockets do not interfere.
        std::net::TcpListener::bind(addr).map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {addr} ({name} listener): {e}; is another sidecar or process using it? \
                 Set `listeners.{name}` to another address"
            )
        })?;
    }
    Ok(())
}

/// Builds the server; `run_forever` on the result starts serving.
pub fn build(
    desired: Desired,
    bootstrap: Config,
    pushed: Option<Arc<Pushed>>,
    opts: &RunOptions,
) -> anyhow::Result<Server> {
    let config = &desired.config;
    check_listeners(config)?;
    let conf = ServerConf {
        threads: opts.threads,
        // Per-upstream attempt limits are enforced in the proxy; this is only the ceiling.
        max_retries: 8,
        grace_period_seconds: Some(5),
        graceful_shutdown_timeout_seconds: Some(10),
        // Timeouts of a second or more (every default: connect 2 s, read 120 s, idle 60 s) run on
        // tokio's timer, in the worker's own event loop. pingora's "fast" timeouts need a thread
        // of their own that wakes every 10 ms for as long as the process lives, on the same CPU
        // as the worker, where each wake can hold up a call in flight. Shorter timeouts (a
        // route may set one) still use pingora's, whose thread then starts.
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let conf = server.configuration.clone();

    let listeners = config.listeners.clone();
    let inbound_on = config.inbound.forward_to.is_some();
    // The agent behind the inbound listener, whose card is announced.
    let local_agent = config
        .inbound
        .forward_to
        .map(|f| (config.agent.name.clone(), f));
    match (&desired.policy, &config.control) {
        (Some(_), _) => {}
        (None, Some(_)) => tracing::info!(
            "no policy yet: every call is denied until the control server pushes one"
        ),
        (None, None) => {
            tracing::warn!("no `policy.path` in the config: every call will be denied")
        }
    }
    // Trace export is set up once at start (a changed `telemetry` section takes a restart).
    let traces = Arc::new(Traces::new(
        config.telemetry.traces.as_ref(),
        &config.agent.name,
    )?);
    let control = bootstrap.control.clone();
    let identity = match &config.identity {
        Some(c) => Some(
            Identity::new(c.clone(), &config.agent.namespace, &config.agent.name)
                .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let exchanger = match (&identity, &config.identity) {
        (Some(id), Some(c)) if c.token_exchange => Some(Arc::new(Exchanger::new(id.clone()))),
        _ => None,
    };
    let store = Store::new(
        desired,
        bootstrap,
        pushed,
        &opts.config_path.display().to_string(),
    );
    let spend = Arc::new(Spend::new(store.snapshot().config.policy.budget_window));
    let policy_counters = Arc::new(PolicyCounters::default());
    let metrics = Arc::new(Metrics::default());
    let tap = Arc::new(Tap::default());
    let access_log = Arc::new(AccessLog::open(
        &opts.access_log,
        opts.access_log_format,
        opts.rotation,
    )?);
    let decision_log = Arc::new(DecisionLog::open(&opts.decision_log, opts.rotation)?);
    for (what, log) in [
        ("access log", &opts.access_log),
        ("decision log", &opts.decision_log),
    ] {
        if crate::reload::log_in_watched_dir(&opts.config_path, log) {
            tracing::warn!(
                "the {what} {log} is in the config file's directory, which the sidecar watches \
                 for config changes: each line written there wakes the watcher. Write it to \
                 another directory"
            );
        }
    }

    // The agent may speak h2c (prior knowledge) or HTTP/1.1 on the same port.
    let mut h2c = HttpServerOptions::default();
    h2c.h2c = true;
    let proxy = |direction| MeshProxy {
        store: store.clone(),
        direction,
        access_log: access_log.clone(),
        decision_log: decision_log.clone(),
        policy_counters: policy_counters.clone(),
        metrics: metrics.clone(),
        traces: traces.clone(),
        tap: tap.clone(),
        spend: spend.clone(),
        identity: identity.clone(),
        exchanger: exchanger.clone(),
    };
    let mut outbound = ProxyServiceBuilder::new(&conf, proxy(Direction::Outbound))
        .name("outbound")
        .server_options(h2c.clone())
        .build();
    outbound.add_listener(listener(listeners.outbound));
    server.add_service(outbound);

    if let (true, Some(addr)) = (inbound_on, listeners.inbound) {
        let mut inbound = ProxyServiceBuilder::new(&conf, proxy(Direction::Inbound))
            .name("inbound")
            .server_options(h2c)
            .build();
        match &identity {
            // mTLS: its certificate is the current SVID, peers' certificates must chain to the
            // trust bundle, and each connection carries the peer's SPIFFE ID.
            Some(id) => {
                let mut tls = TlsSettings::with_callbacks(Box::new(PeerIdentity {
                    identity: id.clone(),
                    metrics: metrics.clone(),
                }))?;
                tls.set_cert_resolver(Arc::new(ServerCert(id.clone())));
                tls.set_client_cert_verifier(peer_verifier(id.clone()));
                tls.enable_h2();
                inbound.add_listener(listener(addr).tls(tls));
            }
            None => inbound.add_listener(listener(addr)),
        }
        server.add_service(inbound);
    }

    let mut admin = Service::new(
        "admin".to_string(),
        Admin {
            store: store.clone(),
            access_log: access_log.clone(),
            decision_log,
            policy_counters,
            metrics,
            traces,
            tap,
            log: opts.log.clone(),
            identity: identity.clone(),
        },
    );
    admin.add_tcp(&listeners.admin.to_string());
    server.add_service(admin);

    if let Some(id) = identity.clone() {
        server.add_service(background_service("identity renewer", Renewer(id.clone())));
        if let Some((agent, forward_to)) = local_agent {
            server.add_service(background_service(
                "agent card announcer",
                crate::card::Announcer {
                    identity: id,
                    agent,
                    forward_to,
                },
            ));
        }
    }
    if let Some(control) = control {
        server.add_service(background_service(
            "control-plane client",
            XdsClient::new(control, store.clone(), identity.clone()),
        ));
    }
    server.add_service(background_service(
        "config reloader",
        Reloader {
            path: opts.config_path.clone(),
            store,
        },
    ));
    Ok(server)
}
