//! The one typed state store: the config snapshot every request reads, and its single writer.
//! Requests take a cheap `Arc` snapshot (ArcSwap); `apply` swaps in a validated config and its
//! compiled policy whole, so a request never sees half an update. The YAML file watcher feeds it
//! today, the control-plane client will feed the same `apply` (design §5).

use crate::config::{Config, ConfigError, UpstreamConfig};
use crate::cost::PriceTable;
use crate::route::UpstreamState;
use agentmesh_policy::{Policy, PolicyError};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// A config and the policy it names, both loaded and validated: what `Store::apply` installs.
#[derive(Debug)]
pub struct Desired {
    pub config: Config,
    pub policy: Option<Arc<Policy>>,
    pub prices: Arc<PriceTable>,
}

/// Why a config or its policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("pricing.file {path}: {message}")]
    Prices { path: String, message: String },
    #[error("policy {path}: {source}")]
    Policy {
        path: String,
        #[source]
        source: PolicyError,
    },
}

impl Desired {
    /// Reads the bootstrap file, then compiles the policy it names.
    pub fn load(path: &Path) -> Result<Desired, LoadError> {
        Desired::from_config(Config::load(path)?)
    }

    pub fn from_config(config: Config) -> Result<Desired, LoadError> {
        let policy = match &config.policy.path {
            None => None,
            Some(p) => {
                let err = |source| LoadError::Policy {
                    path: p.display().to_string(),
                    source,
                };
                let sources = agentmesh_policy::load(p).map_err(err)?;
                let mut policy =
                    Policy::compile(&sources, &config.policy.decision, config.policy.engine)
                        .map_err(err)?;
                if let Some(c) = &config.policy.cache {
                    policy = policy.with_cache(c.ttl, c.max_entries, &c.ignore);
                }
                Some(Arc::new(policy))
            }
        };
        let prices = match &config.pricing.file {
            None => PriceTable::builtin(),
            Some(p) => PriceTable::load(p).map_err(|message| LoadError::Prices {
                path: p.display().to_string(),
                message,
            })?,
        };
        Ok(Desired {
            config,
            policy,
            prices: Arc::new(prices),
        })
    }

    /// Whether installing this would change nothing.
    pub fn same_as(&self, snap: &Snapshot) -> bool {
        self.config == snap.config
            && self.prices == snap.prices
            && self.policy.as_ref().map(|p| p.revision())
                == snap.policy.as_ref().map(|p| p.revision())
    }
}

/// An immutable view of the running config, with its runtime upstream state.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    /// The compiled policy; `None` denies every call.
    pub policy: Option<Arc<Policy>>,
    pub prices: Arc<PriceTable>,
    pub version: u64,
    pub upstreams: HashMap<String, Arc<UpstreamState>>,
    /// The local agent's server, as an upstream for the inbound listener.
    pub inbound: Option<Arc<UpstreamState>>,
    pub loaded_at: SystemTime,
}

/// Where the running config came from and how the last reload went.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadStatus {
    pub source: String,
    /// Times the source was read for a possible reload (SIGHUP or a change on disk).
    pub checks: u64,
    pub reloads_ok: u64,
    pub reloads_rejected: u64,
    pub last_error: Option<String>,
}

#[derive(Debug)]
pub struct Store {
    current: ArcSwap<Snapshot>,
    status: Mutex<ReloadStatus>,
}

impl Store {
    pub fn new(desired: Desired, source: &str) -> Arc<Self> {
        let snap = build(desired, 1, None);
        Arc::new(Store {
            current: ArcSwap::from_pointee(snap),
            status: Mutex::new(ReloadStatus {
                source: source.to_string(),
                ..Default::default()
            }),
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Installs a new, already validated config. Upstreams whose config did not change keep
    /// their runtime state (circuit breakers, round-robin position).
    pub fn apply(&self, desired: Desired) {
        let old = self.snapshot();
        if old.config.listeners != desired.config.listeners {
            tracing::warn!("listener addresses changed; they take effect on restart");
        }
        let snap = build(desired, old.version + 1, Some(&old));
        tracing::info!(
            version = snap.version,
            upstreams = snap.upstreams.len(),
            policy = snap.policy.as_ref().map(|p| p.revision()).unwrap_or("none"),
            "config applied"
        );
        self.current.store(Arc::new(snap));
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.reloads_ok += 1;
        s.last_error = None;
    }

    /// Records that the source was read for a possible reload.
    pub fn checked(&self) {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).checks += 1;
    }

    /// Records a rejected update; the running config stays in force.
    pub fn reject(&self, error: String) {
        tracing::error!(%error, "config rejected; keeping the running config");
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.reloads_rejected += 1;
        s.last_error = Some(error);
    }

    pub fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn build(desired: Desired, version: u64, old: Option<&Snapshot>) -> Snapshot {
    let Desired {
        config,
        policy,
        prices,
    } = desired;
    let keep = |c: &UpstreamConfig, prev: Option<&Arc<UpstreamState>>| match prev {
        Some(p) if p.config == *c => p.clone(),
        _ => UpstreamState::new(c.clone()),
    };
    let upstreams = config
        .upstreams
        .iter()
        .map(|u| {
            (
                u.name.clone(),
                keep(u, old.and_then(|o| o.upstreams.get(&u.name))),
            )
        })
        .collect();
    let inbound = config.inbound.forward_to.map(|addr| {
        let c = UpstreamConfig {
            name: "inbound".into(),
            endpoints: vec![format!("http://{addr}")],
            api: None,
            timeouts: crate::config::Timeouts {
                read: config.inbound.timeout,
                ..Default::default()
            },
            retries: Default::default(),
            circuit_breaker: crate::config::CircuitBreakerConfig {
                consecutive_failures: 0,
                ..Default::default()
            },
            tls: Default::default(),
            http2: false,
            fail_open: config.inbound.fail_open,
        };
        keep(&c, old.and_then(|o| o.inbound.as_ref()))
    });
    Snapshot {
        config,
        policy,
        prices,
        version,
        upstreams,
        inbound,
        loaded_at: SystemTime::now(),
    }
}
