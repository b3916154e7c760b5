//! The control server's shared state: the running catalog (replaced only by a catalog that
//! validated), the registry, the world of resources built from both, and the change signal that
//! wakes every discovery stream to compare what its sidecar runs with what it should.

use crate::model::Catalog;
use crate::registry::{now_unix, Registry};
use crate::resources::World;
use crate::source::ConfigSource;
use arc_swap::ArcSwap;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// How the config source's loads went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStatus {
    pub source: String,
    pub loads_ok: u64,
    pub loads_rejected: u64,
    pub last_loaded_unix: Option<u64>,
    /// The last rejected load's error, cleared by the next good one.
    pub last_error: Option<String>,
    pub files: Vec<String>,
}

pub struct Control {
    /// This server instance, as it signs its responses.
    pub instance: String,
    source: Box<dyn ConfigSource>,
    catalog: ArcSwap<Catalog>,
    pub registry: Registry,
    world: ArcSwap<World>,
    changes: watch::Sender<u64>,
    status: Mutex<SourceStatus>,
    rebuilding: Mutex<()>,
    /// Asks for a rebuild soon (coalesced: a burst of sidecars connecting makes one rebuild).
    soon: tokio::sync::Notify,
}

/// How long a requested rebuild waits for others to join it.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(20);

impl Control {
    /// Loads the source; a control server does not start on a config that does not validate.
    pub fn start(
        source: Box<dyn ConfigSource>,
        registry: Registry,
    ) -> Result<Arc<Control>, String> {
        let catalog = source.load().map_err(|e| e.to_string())?;
        let status = SourceStatus {
            source: source.describe(),
            loads_ok: 1,
            last_loaded_unix: Some(now_unix()),
            files: catalog.files.clone(),
            ..Default::default()
        };
        let c = Arc::new(Control {
            instance: format!(
                "agentmesh-control/{} {}-{}",
                env!("CARGO_PKG_VERSION"),
                hostname(),
                std::process::id()
            ),
            source,
            catalog: ArcSwap::from_pointee(catalog),
            registry,
            world: ArcSwap::from_pointee(World::default()),
            changes: watch::channel(0).0,
            status: Mutex::new(status),
            rebuilding: Mutex::new(()),
            soon: tokio::sync::Notify::new(),
        });
        c.rebuild();
        Ok(c)
    }

    /// Reads the source again; a catalog that fails validation is logged and counted, and the
    /// running one stays.
    pub fn reload(&self) {
        match self.source.load() {
            Ok(catalog) => {
                {
                    let mut s = self.lock_status();
                    s.loads_ok += 1;
                    s.last_loaded_unix = Some(now_unix());
                    s.last_error = None;
                    s.files = catalog.files.clone();
                }
                tracing::info!(
                    agents = catalog.agents.len(),
                    upstreams = catalog.upstreams.len(),
                    policies = catalog.policies.len(),
                    "config loaded"
                );
                self.catalog.store(Arc::new(catalog));
                self.rebuild();
            }
            Err(e) => {
                tracing::error!(error = %e, "config rejected; keeping the running config");
                let mut s = self.lock_status();
                s.loads_rejected += 1;
                s.last_error = Some(e.to_string());
            }
        }
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, SourceStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn source_status(&self) -> SourceStatus {
        self.lock_status().clone()
    }

    pub fn source(&self) -> &dyn ConfigSource {
        self.source.as_ref()
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.load_full()
    }

    pub fn world(&self) -> Arc<World> {
        self.world.load_full()
    }

    /// Rebuilds the resources from the catalog and the registry, and wakes every stream.
    pub fn rebuild(&self) {
        let _one_at_a_time = self.rebuilding.lock().unwrap_or_else(|e| e.into_inner());
        let world = World::build(&self.catalog.load(), &self.registry);
        self.world.store(Arc::new(world));
        self.changes.send_modify(|g| *g += 1);
    }

    /// Asks for a rebuild within a few milliseconds (sidecars connecting and leaving change
    /// where their agents are reached; a burst of them makes one rebuild).
    pub fn rebuild_soon(&self) {
        self.soon.notify_one();
    }

    /// Runs the coalesced rebuilds `rebuild_soon` asks for; spawned once by the server.
    pub async fn coalesce_rebuilds(self: Arc<Self>) {
        loop {
            self.soon.notified().await;
            tokio::time::sleep(COALESCE).await;
            self.rebuild();
        }
    }

    /// A receiver woken on every rebuild.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
