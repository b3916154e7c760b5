//! Hot reload of the bootstrap file and of the policy directory it names: on SIGHUP and when
//! either changes on disk. A new config is parsed and validated, and its policy compiled, before
//! anything is replaced; an invalid one is logged with its error, counted, and the running config
//! and policy stay in force.

use crate::config::Config;
use crate::state::{LoadError, Store};
use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub struct Reloader {
    pub path: PathBuf,
    pub store: Arc<Store>,
}

impl Reloader {
    /// Loads the file and applies it if valid and different. Returns whether it was applied.
    pub fn reload(&self) -> bool {
        self.store.checked();
        let loaded = Config::load(&self.path)
            .map_err(LoadError::from)
            .and_then(|b| Ok((self.store.compose_bootstrap(b.clone())?, b)));
        match loaded {
            Ok((d, _)) if d.same_as(&self.store.snapshot()) => false,
            Ok((d, bootstrap)) => {
                self.store.apply_bootstrap(bootstrap, d);
                true
            }
            Err(e) => {
                self.store.reject(e.to_string());
                false
            }
        }
    }
}

/// The directory watched for changes of the config file `file`.
fn watched_dir(file: &std::path::Path) -> PathBuf {
    file.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Whether a log written to `log` (a file path, `stdout` or `off`) lands in the directory
/// watched for changes of the config file: each line written there would wake the watcher.
pub fn log_in_watched_dir(config: &std::path::Path, log: &str) -> bool {
    if log == "stdout" || log == "off" {
        return false;
    }
    let dir = |p: &std::path::Path| std::fs::canonicalize(watched_dir(p)).ok();
    dir(std::path::Path::new(log)).is_some_and(|d| Some(d) == dir(config))
}

/// Whether an event on `path` may have changed `file`: the file itself, or Kubernetes' `..data`
/// symlink swap, by which a mounted ConfigMap changes every file at once.
fn concerns(path: &std::path::Path, file: &std::path::Path) -> bool {
    path.file_name() == file.file_name()
        || path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("..data"))
}

/// Whether a file event can change the file's content. Reads are not: reacting to them would
/// make every reload (which reads the file) trigger the next one.
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    matches!(
        kind,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any
    )
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(8);
        // Watch the directory: editors and Kubernetes ConfigMaps replace files rather than write.
        let file = self.path.clone();
        let watch_tx = tx.clone();
        let store = self.store.clone();
        let mut watcher =
            match notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
                if let Ok(ev) = ev {
                    let snap = store.snapshot();
                    let policy_dir = snap.config.policy.path.as_deref();
                    if is_change(&ev.kind)
                        && ev.paths.iter().any(|p| {
                            concerns(p, &file) || policy_dir.is_some_and(|d| p.starts_with(d))
                        })
                    {
                        let _ = watch_tx.try_send(());
                    }
                }
            }) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP");
                    None
                }
            };
        let dir = watched_dir(&self.path);
        if let Some(w) = watcher.as_mut() {
            if let Err(e) = w.watch(&dir, RecursiveMode::NonRecursive) {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the config directory");
            }
        }
        let mut policy_watched: Option<PathBuf> = None;
        let mut watch_policy = |w: &mut Option<notify::RecommendedWatcher>| {
            let want = self.store.snapshot().config.policy.path.clone();
            if want == policy_watched {
                return;
            }
            if let Some(w) = w.as_mut() {
                if let Some(old) = policy_watched.take() {
                    let _ = w.unwatch(&old);
                }
                if let Some(path) = &want {
                    // A bundle file is watched through its directory: it is usually replaced,
                    // not written in place.
                    let (dir, mode) = if path.is_dir() {
                        (path.as_path(), RecursiveMode::Recursive)
                    } else {
                        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
                        (
                            parent.unwrap_or(std::path::Path::new(".")),
                            RecursiveMode::NonRecursive,
                        )
                    };
                    if let Err(e) = w.watch(dir, mode) {
                        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the policy; reload with SIGHUP");
                    }
                }
            }
            policy_watched = want;
        };
        watch_policy(&mut watcher);
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP");
                None
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(()) = rx.recv() => {
                    // Let a burst of write events settle before reading the file.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    while rx.try_recv().is_ok() {}
                    self.reload();
                    watch_policy(&mut watcher);
                }
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    tracing::info!("SIGHUP: reloading config and policy");
                    self.reload();
                    watch_policy(&mut watcher);
                }
            }
        }
        drop(tx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
    use notify::EventKind;

    #[test]
    fn the_file_and_configmap_swaps_concern_the_reloader() {
        let file = std::path::Path::new("/etc/agentmesh/sidecar.yaml");
        assert!(concerns(
            std::path::Path::new("/etc/agentmesh/sidecar.yaml"),
            file
        ));
        assert!(concerns(
            std::path::Path::new("/etc/agentmesh/..data"),
            file
        ));
        assert!(concerns(
            std::path::Path::new("/etc/agentmesh/..data_tmp"),
            file
        ));
        assert!(!concerns(
            std::path::Path::new("/etc/agentmesh/other.yaml"),
            file
        ));
    }

    #[test]
    fn logs_beside_the_config_file_are_noticed() {
        let dir = std::env::temp_dir().join(format!("am-watched-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let config = dir.join("sidecar.yaml");
        let beside = dir.join("access.jsonl");
        let below = dir.join("logs/access.jsonl");
        assert!(log_in_watched_dir(&config, beside.to_str().unwrap()));
        assert!(!log_in_watched_dir(&config, below.to_str().unwrap()));
        assert!(!log_in_watched_dir(&config, "stdout"));
        assert!(!log_in_watched_dir(&config, "off"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_of_the_file_do_not_trigger_a_reload() {
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Read
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(is_change(&EventKind::Modify(ModifyKind::Any)));
        assert!(is_change(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
    }
}
