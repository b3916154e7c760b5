//! Runs the control server: the discovery service on its gRPC port, the registry API on its
//! HTTPS port, config reloads on change and on SIGHUP, and a periodic rebuild that lets health
//! follow heartbeats. Everything stops on SIGINT/SIGTERM.

use crate::ads::Ads;
use crate::api::{router, Api};
use crate::authority::Authority;
use crate::ca_api::PeerIdentity;
use crate::control::{hostname, Control};
use agentmesh_control_api::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How often the resources are rebuilt even without a change, so that an agent whose sidecar
/// stopped sending heartbeats stops being called.
const HEALTH_TICK: Duration = Duration::from_secs(10);

pub struct Listeners {
    pub xds: TcpListener,
    pub api: TcpListener,
}

impl Listeners {
    pub async fn bind(xds: SocketAddr, api: SocketAddr) -> std::io::Result<Listeners> {
        Ok(Listeners {
            xds: TcpListener::bind(xds).await?,
            api: TcpListener::bind(api).await?,
        })
    }
}

/// Serves until `shutdown` resolves.
pub async fn run(
    control: Arc<Control>,
    authority: Arc<Authority>,
    signer: Arc<crate::tokens::Signer>,
    svid_ttl: Duration,
    token: String,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    // Reload on change (debounced: editors write in several steps) and on SIGHUP.
    let (changed_tx, mut changed_rx) = tokio::sync::mpsc::channel::<()>(1);
    let _watch = control
        .source()
        .watch(Box::new(move || {
            let _ = changed_tx.try_send(());
        }))
        .map_err(|e| format!("cannot watch the config source: {e}"))?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| e.to_string())?;
    tokio::spawn(control.clone().coalesce_rebuilds());
    let c = control.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEALTH_TICK);
        loop {
            tokio::select! {
                Some(()) = changed_rx.recv() => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    while changed_rx.try_recv().is_ok() {}
                    c.reload();
                }
                _ = hup.recv() => c.reload(),
                _ = tick.tick() => c.rebuild(),
            }
        }
    });

    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".into(),
        "::1".into(),
        hostname(),
    ];
    if let Ok(a) = listeners.api.local_addr() {
        if !a.ip().is_unspecified() {
            names.push(a.ip().to_string());
        }
    }
    let tls = tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
        crate::authority::ServingCert::new(authority.clone(), names),
        authority.client_verifier(),
    )?);
    let xds_tls = tls.clone();
    let app = router(Api {
        control: control.clone(),
        token: Arc::new(token),
        authority: authority.clone(),
        svid_ttl,
        signer,
    });
    let mut stop = stop_rx.clone();
    let api_listener = listeners.api;
    let api = tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                r = api_listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors, most likely: wait rather than spin.
                        tracing::warn!(error = %e, "registry API accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            let tls = tls.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let stream = match tls.accept(tcp).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                };
                // The client certificate, if one was presented (verified against the root).
                let peer = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|der| agentmesh_control_api::identity::agent_id_of(der).ok());
                let app = app.layer(axum::Extension(PeerIdentity(peer)));
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });

    let mut stop = stop_rx;
    let incoming = crate::xds_listener::incoming(listeners.xds, xds_tls);
    tonic::transport::Server::builder()
        // Dead peers are found by HTTP/2 pings, not only by a failed write.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(AggregatedDiscoveryServiceServer::new(Ads { control }))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.changed().await;
        })
        .await
        .map_err(|e| e.to_string())?;
    api.abort();
    Ok(())
}
