//! The registry's runtime state: agents registered through the API (beside those the config
//! source declares), their certification records, and every sidecar that holds a discovery
//! stream — its agent, where it takes calls, when it was last heard from, and what it ACKed or
//! NACKed. Registrations and certifications are persisted (written whole, then renamed), so a
//! restarted control server loses none.

use crate::model::AgentSpec;
use agentmesh_control_api::write_atomically;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A sidecar not heard from for this long no longer makes its agent healthy (three missed
/// heartbeats).
pub const HEALTH_WINDOW: Duration = Duration::from_secs(30);
/// Disconnected sidecars stay visible in the API this long.
const FORGET_AFTER: Duration = Duration::from_secs(600);

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One certification check's outcome (which, whether it passed, when, by whom).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Certification {
    pub check: String,
    pub passed: bool,
    #[serde(default)]
    pub at_unix: u64,
    pub by: String,
    #[serde(default)]
    pub detail: String,
}

/// A NACK as the sidecar sent it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Nack {
    pub version: String,
    pub nonce: String,
    pub message: String,
    pub at_unix: u64,
}

/// What the control server knows of one sidecar.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sidecar {
    /// Which of the node's streams this entry belongs to (a reconnect opens a new one).
    #[serde(skip)]
    pub stream: u64,
    pub node_id: String,
    pub agent: String,
    pub namespace: String,
    pub inbound_url: String,
    pub build_version: String,
    /// `sotw` or `delta`.
    pub mode: &'static str,
    pub connected: bool,
    pub connected_at_unix: u64,
    pub last_seen_unix: u64,
    /// The version last sent, and whether the sidecar has answered it.
    pub sent_version: Option<String>,
    pub acked_version: Option<String>,
    pub acked_at_unix: Option<u64>,
    pub acks: u64,
    pub nacks: u64,
    pub last_nack: Option<Nack>,
}

impl Sidecar {
    pub fn live(&self, now: u64) -> bool {
        self.connected && now.saturating_sub(self.last_seen_unix) <= HEALTH_WINDOW.as_secs()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    #[serde(default)]
    registered: BTreeMap<String, AgentSpec>,
    #[serde(default)]
    certification: BTreeMap<String, Vec<Certification>>,
    /// Join tokens by the SHA-256 of their value (the value itself is never stored).
    #[serde(default)]
    join_tokens: BTreeMap<String, JoinToken>,
    /// A2A cards the agents announced themselves (through their sidecars), by agent.
    #[serde(default)]
    cards: BTreeMap<String, serde_json::Value>,
}

/// A single-use credential for an agent's first SVID (local mode; a Kubernetes service-account
/// token plays this part in a cluster).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JoinToken {
    pub namespace: String,
    pub agent: String,
    pub expires_at_unix: u64,
    #[serde(default)]
    pub used_at_unix: Option<u64>,
}

/// Why a join token was refused (each a distinct, logged 401).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenError {
    #[error("unknown join token")]
    Unknown,
    #[error("the join token expired")]
    Expired,
    #[error("the join token was already used")]
    Used,
}

fn check<'a>(p: &'a Persisted, token: &str) -> Result<&'a JoinToken, TokenError> {
    let t = p
        .join_tokens
        .get(&token_key(token))
        .ok_or(TokenError::Unknown)?;
    if t.used_at_unix.is_some() {
        return Err(TokenError::Used);
    }
    if now_unix() >= t.expires_at_unix {
        return Err(TokenError::Expired);
    }
    Ok(t)
}

fn token_key(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(Debug, Default)]
struct Inner {
    saved: Persisted,
    sidecars: BTreeMap<String, Sidecar>,
}

/// Why a registry change was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot persist the registry to {path}: {message}")]
    Persist { path: String, message: String },
}

#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    file: Option<PathBuf>,
}

impl Registry {
    /// Opens the registry persisted at `file` (a missing file is an empty registry).
    pub fn open(file: Option<PathBuf>) -> Result<Registry, String> {
        let saved = match &file {
            Some(f) if f.exists() => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| format!("cannot read {}: {e}", f.display()))?;
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", f.display()))?
            }
            _ => Persisted::default(),
        };
        Ok(Registry {
            inner: Mutex::new(Inner {
                saved,
                sidecars: BTreeMap::new(),
            }),
            file,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the persisted part, writes it, and undoes the change if it cannot be written.
    fn change<R>(&self, f: impl FnOnce(&mut Persisted) -> R) -> Result<R, RegistryError> {
        let mut inner = self.lock();
        let before = serde_json::to_string(&inner.saved).unwrap_or_default();
        let out = f(&mut inner.saved);
        if let Some(file) = &self.file {
            let text = serde_json::to_string_pretty(&inner.saved).unwrap_or_default();
            if let Err(e) = write_atomically(file, text.as_bytes()) {
                inner.saved = serde_json::from_str(&before).unwrap_or_default();
                return Err(RegistryError::Persist {
                    path: file.display().to_string(),
                    message: e.to_string(),
                });
            }
        }
        Ok(out)
    }

    /// Registers (or replaces) an agent; whether it was new.
    pub fn register(&self, agent: AgentSpec) -> Result<bool, RegistryError> {
        self.change(|p| p.registered.insert(agent.name.clone(), agent).is_none())
    }

    /// Removes a registered agent; whether it was there.
    pub fn deregister(&self, name: &str) -> Result<bool, RegistryError> {
        self.change(|p| p.registered.remove(name).is_some())
    }

    /// Keeps the card an agent announced; whether it changed.
    pub fn announce_card(
        &self,
        agent: &str,
        card: serde_json::Value,
    ) -> Result<bool, RegistryError> {
        self.change(|p| p.cards.insert(agent.to_string(), card.clone()).as_ref() != Some(&card))
    }

    /// The card the agent announced, if it did.
    pub fn announced_card(&self, agent: &str) -> Option<serde_json::Value> {
        self.lock().saved.cards.get(agent).cloned()
    }

    pub fn registered(&self) -> BTreeMap<String, AgentSpec> {
        self.lock().saved.registered.clone()
    }

    /// Makes a join token for an agent; returns its value (shown once, stored hashed).
    pub fn new_join_token(
        &self,
        namespace: &str,
        agent: &str,
        ttl_seconds: u64,
    ) -> Result<(String, JoinToken), RegistryError> {
        let value: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let now = now_unix();
        let t = JoinToken {
            namespace: namespace.into(),
            agent: agent.into(),
            expires_at_unix: now + ttl_seconds,
            used_at_unix: None,
        };
        self.change(|p| {
            // Tokens past their time are of no use to anyone: dropped as new ones are made.
            p.join_tokens
                .retain(|_, old| old.expires_at_unix + 86_400 > now);
            p.join_tokens.insert(token_key(&value), t.clone());
        })?;
        Ok((value, t))
    }

    /// Checks a join token without using it up.
    pub fn check_join_token(&self, token: &str) -> Result<JoinToken, TokenError> {
        check(&self.lock().saved, token).cloned()
    }

    /// Checks and uses up a join token in one step (two requests with one token: one wins);
    /// the use is persisted, so it stays used across restarts.
    pub fn take_join_token(
        &self,
        token: &str,
    ) -> Result<Result<JoinToken, TokenError>, RegistryError> {
        let now = now_unix();
        self.change(|p| {
            let t = check(p, token)?.clone();
            if let Some(held) = p.join_tokens.get_mut(&token_key(token)) {
                held.used_at_unix = Some(now);
            }
            Ok(t)
        })
    }

    pub fn certify(&self, agent: &str, mut c: Certification) -> Result<(), RegistryError> {
        if c.at_unix == 0 {
            c.at_unix = now_unix();
        }
        self.change(|p| {
            let checks = p.certification.entry(agent.to_string()).or_default();
            // One record per check: the latest outcome.
            checks.retain(|old| old.check != c.check);
            checks.push(c);
        })
    }

    pub fn certification(&self, agent: &str) -> Vec<Certification> {
        self.lock()
            .saved
            .certification
            .get(agent)
            .cloned()
            .unwrap_or_default()
    }

    /// A sidecar opened a stream (a reconnect replaces its old entry).
    pub fn connected(&self, s: Sidecar) {
        let now = now_unix();
        let mut inner = self.lock();
        inner.sidecars.retain(|_, old| {
            old.connected || now.saturating_sub(old.last_seen_unix) < FORGET_AFTER.as_secs()
        });
        inner.sidecars.insert(s.node_id.clone(), s);
    }

    /// Updates one sidecar's entry, if it is there.
    pub fn update(&self, node_id: &str, f: impl FnOnce(&mut Sidecar)) {
        if let Some(s) = self.lock().sidecars.get_mut(node_id) {
            f(s);
        }
    }

    pub fn sidecars(&self) -> Vec<Sidecar> {
        self.lock().sidecars.values().cloned().collect()
    }

    /// The inbound URLs of an agent's live sidecars.
    pub fn live_endpoints(&self) -> BTreeMap<String, Vec<String>> {
        let now = now_unix();
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for s in self.lock().sidecars.values() {
            if s.live(now) && !s.inbound_url.is_empty() {
                out.entry(s.agent.clone())
                    .or_default()
                    .push(s.inbound_url.clone());
            }
        }
        for v in out.values_mut() {
            v.sort();
            v.dedup();
        }
        out
    }

    /// An agent's last heartbeat from any of its sidecars.
    pub fn last_heartbeat(&self, agent: &str) -> Option<u64> {
        self.lock()
            .sidecars
            .values()
            .filter(|s| s.agent == agent)
            .map(|s| s.last_seen_unix)
            .max()
    }
}
