//! The one typed state store: the config snapshot every request reads, and its single writer.
//! Requests take a cheap `Arc` snapshot (ArcSwap); `apply` swaps in a validated config and its
//! compiled policy whole, so a request never sees half an update. The YAML file watcher feeds it
//! today, the control-plane client will feed the same `apply` (design §5).

use crate::config::{Config, ConfigError, UpstreamConfig};
use crate::cost::PriceTable;
use crate::jwt::Validator;
use crate::pushed::Pushed;
use crate::route::UpstreamState;
use agentmesh_policy::{Policy, PolicyError};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// A config and the policy it names, both loaded and validated: what `Store::apply` installs.
#[derive(Debug)]
pub struct Desired {
    pub config: Config,
    pub policy: Option<Arc<Policy>>,
    pub prices: Arc<PriceTable>,
    /// The end-user token validator, when `jwt` is configured.
    pub jwt: Option<Arc<Validator>>,
    /// Held credentials by name: the file's `credentials` and the control server's secrets.
    pub secrets: Arc<Secrets>,
}

/// The tokens this sidecar accepts: the configured issuers and, with an identity, the mesh's
/// own token service, for tokens exchanged for this agent (its SPIFFE ID as the audience).
fn jwt_config(config: &Config) -> Option<agentmesh_control_api::jwt::JwtConfig> {
    use agentmesh_control_api::jwt::{JwtConfig, JwtIssuer};
    let mesh = config
        .identity
        .as_ref()
        .filter(|i| i.token_exchange)
        .map(|i| {
            let id = agentmesh_control_api::identity::AgentId::new(
                &i.trust_domain,
                &config.agent.namespace,
                &config.agent.name,
            );
            JwtIssuer {
                issuer: format!("spiffe://{}/control", i.trust_domain),
                jwks_uri: Some(format!("{}/v1/jwks", i.ca_server.trim_end_matches('/'))),
                jwks_file: None,
                audiences: vec![id.spiffe_id()],
                algorithms: vec!["ES256".into()],
                ca_file: Some(i.ca_file.clone()),
            }
        });
    match (config.jwt.clone(), mesh) {
        (Some(mut j), Some(m)) => {
            if !j.issuers.iter().any(|i| i.issuer == m.issuer) {
                j.issuers.push(m);
            }
            Some(j)
        }
        (Some(j), None) => Some(j),
        (None, Some(m)) => Some(JwtConfig {
            issuers: vec![m],
            leeway: std::time::Duration::from_secs(30),
            required: false,
        }),
        (None, None) => None,
    }
}

/// Credential values by name. Never printed: `Debug` shows names only.
#[derive(Default, PartialEq)]
pub struct Secrets(HashMap<String, String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl Secrets {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Reads the file's credentials, then adds the pushed secrets (which win on a name clash:
    /// the control server is the authority).
    fn load(config: &Config, pushed: Option<&Pushed>) -> Result<Secrets, LoadError> {
        let mut out = HashMap::new();
        for c in &config.credentials {
            let value = match (&c.env, &c.file) {
                (Some(v), _) => std::env::var(v).map_err(|_| LoadError::Credential {
                    name: c.name.clone(),
                    message: format!("environment variable `{v}` is not set"),
                })?,
                (None, Some(f)) => std::fs::read_to_string(f)
                    .map_err(|e| LoadError::Credential {
                        name: c.name.clone(),
                        message: format!("cannot read {}: {e}", f.display()),
                    })?
                    .trim()
                    .to_string(),
                (None, None) => continue,
            };
            out.insert(c.name.clone(), value);
        }
        for (name, value) in pushed.map(|p| p.secrets()).unwrap_or_default() {
            out.insert(name, value);
        }
        let secrets = Secrets(out);
        for u in &config.upstreams {
            if let Some(c) = &u.credential {
                if secrets.get(&c.secret).is_none() {
                    return Err(LoadError::Credential {
                        name: c.secret.clone(),
                        message: format!(
                            "upstream `{}` names it, but no credential or pushed secret has that name",
                            u.name
                        ),
                    });
                }
            }
        }
        Ok(secrets)
    }
}

/// Why a config or its policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("jwt: {0}")]
    Jwt(String),
    #[error("credential `{name}`: {message}")]
    Credential { name: String, message: String },
    #[error("pricing.file {path}: {message}")]
    Prices { path: String, message: String },
    #[error("control server version {version}: {message}")]
    Pushed { version: String, message: String },
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

    /// What a sidecar starts on: the bootstrap file, with the last good pushed set if it has a
    /// control server and one was persisted (a persisted set that no longer composes with the
    /// file is logged and left out). Returns the composed config, the file's own, and the set.
    pub fn startup(path: &Path) -> Result<(Desired, Config, Option<Arc<Pushed>>), LoadError> {
        let bootstrap = Config::load(path)?;
        let file = bootstrap
            .control
            .as_ref()
            .and_then(|c| c.persist_file.clone());
        if let Some(file) = file {
            match Pushed::restore(&file) {
                Ok(Some(p)) => match Desired::compose(bootstrap.clone(), Some(&p)) {
                    Ok(d) => {
                        tracing::info!(version = %p.version, file = %file.display(), "starting on the last good config from the control server");
                        return Ok((d, bootstrap, Some(Arc::new(p))));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, file = %file.display(), "the persisted control-server config does not apply; starting on the file alone")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot restore the persisted control-server config")
                }
            }
        }
        Ok((Desired::from_config(bootstrap.clone())?, bootstrap, None))
    }

    pub fn from_config(config: Config) -> Result<Desired, LoadError> {
        Desired::compose(config, None)
    }

    /// The bootstrap config with the control server's pushed set merged in (its upstreams and
    /// routes beside the file's, its policy instead of the file's), validated whole and its
    /// policy compiled.
    pub fn compose(mut config: Config, pushed: Option<&Pushed>) -> Result<Desired, LoadError> {
        let mut pushed_policy = None;
        if let Some(p) = pushed {
            let err = |message: String| LoadError::Pushed {
                version: p.version.clone(),
                message,
            };
            pushed_policy = p.merge_into(&mut config).map_err(err)?;
            if let Some(pp) = &pushed_policy {
                if !pp.decision.is_empty() {
                    config.policy.decision = pp.decision.clone();
                }
            }
            config
                .validate(&format!("control server version {}", p.version))
                .map_err(|e| err(e.to_string()))?;
        }
        let compile = |sources: &agentmesh_policy::Sources| {
            let c = &config.policy.cache;
            let policy = Policy::compile(sources, &config.policy.decision, config.policy.engine)?
                .with_cache(c.mode, c.ttl, c.max_entries, &c.ignore)?;
            Ok::<_, PolicyError>(Some(Arc::new(policy)))
        };
        let policy = match (&pushed_policy, &config.policy.path) {
            (Some(pp), _) => compile(&pp.sources).map_err(|source| LoadError::Policy {
                path: format!("policy/{} (pushed)", pp.name),
                source,
            })?,
            (None, Some(p)) => {
                let err = |source| LoadError::Policy {
                    path: p.display().to_string(),
                    source,
                };
                compile(&agentmesh_policy::load(p).map_err(err)?).map_err(err)?
            }
            (None, None) => None,
        };
        let prices = match &config.pricing.file {
            None => PriceTable::builtin(),
            Some(p) => PriceTable::load(p).map_err(|message| LoadError::Prices {
                path: p.display().to_string(),
                message,
            })?,
        };
        let secrets = Arc::new(Secrets::load(&config, pushed)?);
        let jwt = match jwt_config(&config) {
            Some(j) => Some(Arc::new(Validator::new(j).map_err(LoadError::Jwt)?)),
            None => None,
        };
        Ok(Desired {
            config,
            policy,
            prices: Arc::new(prices),
            jwt,
            secrets,
        })
    }

    /// Whether installing this would change nothing.
    pub fn same_as(&self, snap: &Snapshot) -> bool {
        self.config == snap.config
            && self.secrets == snap.secrets
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
    pub jwt: Option<Arc<Validator>>,
    pub secrets: Arc<Secrets>,
    pub version: u64,
    pub upstreams: HashMap<String, Arc<UpstreamState>>,
    /// Names balanced over several upstreams, and where each one's rotation is.
    pub routes: HashMap<String, (Vec<Arc<UpstreamState>>, AtomicUsize)>,
    /// The local agent's server, as an upstream for the inbound listener.
    pub inbound: Option<Arc<UpstreamState>>,
    pub loaded_at: SystemTime,
}

impl Snapshot {
    /// The upstream a logical name reaches: its own, or for a route the next of its upstreams
    /// (round-robin) that has an endpoint taking calls.
    pub fn upstream_for(&self, name: &str) -> Option<Arc<UpstreamState>> {
        if let Some(u) = self.upstreams.get(name) {
            return Some(u.clone());
        }
        let (targets, next) = self.routes.get(name)?;
        let n = targets.len();
        let start = next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &targets[(start + i) % n])
            .find(|u| u.available())
            .or_else(|| targets.get(start % n.max(1)))
            .cloned()
    }
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

/// The control-plane subscription, as `/readyz` and `/config_dump` show it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ControlStatus {
    pub address: String,
    pub mode: String,
    pub node_id: String,
    /// A discovery stream is open.
    pub connected: bool,
    /// Connected, and the last response was applied: the sidecar runs what the control server
    /// wants it to.
    pub fresh: bool,
    /// Where the running pushed set came from: `control`, `persisted` (read from disk at
    /// start), or `none` yet.
    pub source: String,
    /// The control server's version of the running set.
    pub version: Option<String>,
    pub last_update_unix: Option<u64>,
    pub last_error: Option<String>,
    pub connects: u64,
    pub acks: u64,
    pub nacks: u64,
    /// Names of the credentials held (never their values).
    pub secrets: Vec<String>,
}

#[derive(Debug)]
pub struct Store {
    current: ArcSwap<Snapshot>,
    status: Mutex<ReloadStatus>,
    /// The bootstrap file's config as last loaded (before pushed resources are merged).
    bootstrap: Mutex<Config>,
    /// The control server's set the running config was composed with.
    pushed: Mutex<Option<Arc<Pushed>>>,
    control: Mutex<Option<ControlStatus>>,
}

impl Store {
    /// A store running `desired`, composed from the `bootstrap` config and, if any, a pushed
    /// set (restored from disk at start).
    pub fn new(
        desired: Desired,
        bootstrap: Config,
        pushed: Option<Arc<Pushed>>,
        source: &str,
    ) -> Arc<Self> {
        let control = bootstrap.control.as_ref().map(|c| ControlStatus {
            address: c.address.clone(),
            mode: format!("{:?}", c.mode).to_lowercase(),
            node_id: c.node_id.clone().unwrap_or_default(),
            source: if pushed.is_some() {
                "persisted"
            } else {
                "none"
            }
            .into(),
            version: pushed.as_ref().map(|p| p.version.clone()),
            secrets: pushed
                .as_ref()
                .map(|p| p.secret_names().iter().map(|s| s.to_string()).collect())
                .unwrap_or_default(),
            ..Default::default()
        });
        let snap = build(desired, 1, None);
        Arc::new(Store {
            current: ArcSwap::from_pointee(snap),
            status: Mutex::new(ReloadStatus {
                source: source.to_string(),
                ..Default::default()
            }),
            bootstrap: Mutex::new(bootstrap),
            pushed: Mutex::new(pushed),
            control: Mutex::new(control),
        })
    }

    /// A store for a config that has no control server (tests, tools).
    pub fn standalone(desired: Desired, source: &str) -> Arc<Self> {
        let bootstrap = desired.config.clone();
        Store::new(desired, bootstrap, None, source)
    }

    pub fn bootstrap(&self) -> Config {
        lock(&self.bootstrap).clone()
    }

    pub fn pushed(&self) -> Option<Arc<Pushed>> {
        lock(&self.pushed).clone()
    }

    /// A peer agent's namespace, from its pushed registry entry (`default` without one).
    pub fn namespace_of(&self, agent: &str) -> String {
        use agentmesh_control_api::discovery::resource::Kind;
        let pushed = lock(&self.pushed).clone();
        pushed
            .and_then(
                |p| match &p.resources.get(&format!("agent/{agent}"))?.kind {
                    Some(Kind::Agent(a)) if !a.namespace.is_empty() => Some(a.namespace.clone()),
                    _ => None,
                },
            )
            .unwrap_or_else(|| "default".into())
    }

    /// Composes a bootstrap config with the running pushed set.
    pub fn compose_bootstrap(&self, bootstrap: Config) -> Result<Desired, LoadError> {
        let pushed = self.pushed();
        Desired::compose(bootstrap, pushed.as_deref())
    }

    /// Installs a config composed from a new bootstrap file.
    pub fn apply_bootstrap(&self, bootstrap: Config, desired: Desired) {
        *lock(&self.bootstrap) = bootstrap;
        self.apply(desired);
    }

    /// Installs a config composed with a new pushed set.
    pub fn apply_pushed(&self, pushed: Arc<Pushed>, desired: Desired) {
        self.update_control(|c| {
            c.secrets = pushed
                .secret_names()
                .iter()
                .map(|s| s.to_string())
                .collect();
        });
        *lock(&self.pushed) = Some(pushed);
        self.apply(desired);
    }

    pub fn control(&self) -> Option<ControlStatus> {
        lock(&self.control).clone()
    }

    pub fn update_control(&self, f: impl FnOnce(&mut ControlStatus)) {
        if let Some(c) = lock(&self.control).as_mut() {
            f(c);
        }
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn build(desired: Desired, version: u64, old: Option<&Snapshot>) -> Snapshot {
    let Desired {
        config,
        policy,
        prices,
        jwt,
        secrets,
    } = desired;
    let keep = |c: &UpstreamConfig, prev: Option<&Arc<UpstreamState>>| match prev {
        Some(p) if p.config == *c => p.clone(),
        _ => UpstreamState::new(c.clone()),
    };
    let upstreams: HashMap<String, Arc<UpstreamState>> = config
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
            credential: None,
        };
        keep(&c, old.and_then(|o| o.inbound.as_ref()))
    });
    let routes = config
        .routes
        .iter()
        .map(|r| {
            let targets = r
                .upstreams
                .iter()
                .filter_map(|u| upstreams.get(u).cloned())
                .collect();
            (r.name.clone(), (targets, AtomicUsize::new(0)))
        })
        .collect();
    Snapshot {
        config,
        policy,
        prices,
        jwt,
        secrets,
        version,
        upstreams,
        routes,
        inbound,
        loaded_at: SystemTime::now(),
    }
}
