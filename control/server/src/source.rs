//! Config sources: where the catalog comes from. A source loads a validated `Catalog` and says
//! when it may have changed; the server reloads, and keeps its running catalog when a load
//! fails. The YAML directory is the embedded default; a Kubernetes custom-resource source
//! implements the same trait.

use crate::model::{parse_file, Catalog, ModelError};
use notify::{RecursiveMode, Watcher};
use std::path::{Path, PathBuf};

/// A source of the control server's config.
pub trait ConfigSource: Send + Sync + 'static {
    /// What it reads, for logs and `/v1/status` (`directory /etc/agentmesh`).
    fn describe(&self) -> String;
    /// Reads and validates everything the source declares.
    fn load(&self) -> Result<Catalog, ModelError>;
    /// Starts watching: `changed` is called whenever the source may have changed. The returned
    /// guard keeps the watch alive.
    fn watch(
        &self,
        changed: Box<dyn Fn() + Send + Sync>,
    ) -> Result<Box<dyn std::any::Any + Send>, String>;
}

/// A directory of YAML files (`*.yaml`, `*.yml`, any depth; hidden entries skipped), each with
/// any of the sections `agents`, `upstreams`, `policies`, `secrets`.
pub struct DirSource {
    pub dir: PathBuf,
}

impl DirSource {
    fn files(&self) -> Result<Vec<PathBuf>, ModelError> {
        let mut out = Vec::new();
        collect(&self.dir, &mut out)
            .map_err(|e| ModelError::read(&self.dir.display().to_string(), e))?;
        out.sort();
        Ok(out)
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        if entry.file_type()?.is_dir() {
            collect(&path, out)?;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            out.push(path);
        }
    }
    Ok(())
}

impl ConfigSource for DirSource {
    fn describe(&self) -> String {
        format!("directory {}", self.dir.display())
    }

    fn load(&self) -> Result<Catalog, ModelError> {
        let mut parsed = Vec::new();
        for path in self.files()? {
            let file = path
                .strip_prefix(&self.dir)
                .unwrap_or(&path)
                .display()
                .to_string();
            let text = std::fs::read_to_string(&path).map_err(|e| ModelError::read(&file, e))?;
            let dir = path.parent().unwrap_or(&self.dir).to_path_buf();
            parsed.push((file.clone(), dir, parse_file(&text, &file)?));
        }
        Catalog::build(parsed)
    }

    fn watch(
        &self,
        changed: Box<dyn Fn() + Send + Sync>,
    ) -> Result<Box<dyn std::any::Any + Send>, String> {
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            use notify::EventKind;
            if let Ok(ev) = ev {
                if matches!(
                    ev.kind,
                    EventKind::Create(_)
                        | EventKind::Modify(_)
                        | EventKind::Remove(_)
                        | EventKind::Any
                ) {
                    changed();
                }
            }
        })
        .map_err(|e| e.to_string())?;
        watcher
            .watch(&self.dir, RecursiveMode::Recursive)
            .map_err(|e| format!("cannot watch {}: {e}", self.dir.display()))?;
        Ok(Box::new(watcher))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_loads_and_grants_what_it_says() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/control/mesh");
        let c = DirSource { dir }.load().unwrap();
        assert_eq!(c.files, ["agents.yaml", "upstreams.yaml"]);
        assert_eq!(c.agents.len(), 2);
        assert_eq!(c.upstreams.len(), 3);
        let registry = crate::registry::Registry::open(None).unwrap();
        let world = crate::resources::World::build(&c, &registry);
        let names = |agent: &str| -> Vec<String> {
            world
                .for_agent(agent)
                .unwrap()
                .iter()
                .map(|r| r.name.clone())
                .collect()
        };
        // No sidecar of the writer is connected: nowhere to reach it yet, so no upstream for it.
        assert_eq!(
            names("planner"),
            [
                "agent/planner",
                "agent/writer",
                "policy/demo",
                "upstream/llm/anthropic",
                "upstream/llm/openai",
                "upstream/mcp/search-tools"
            ]
        );
        assert_eq!(
            names("writer"),
            ["agent/writer", "policy/demo", "upstream/llm/openai"]
        );
        assert!(world.for_agent("stranger").is_none());
    }

    #[test]
    fn a_broken_file_in_the_directory_is_named() {
        let dir = std::env::temp_dir().join(format!("am-dirsource-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.yaml"), "agents: [{name: a}]\n").unwrap();
        std::fs::write(dir.join(".hidden.yaml"), "junk: [").unwrap();
        std::fs::write(
            dir.join("sub/b.yml"),
            "upstreams: [{name: mcp/x, endpoints: []}]\n",
        )
        .unwrap();
        let e = DirSource { dir: dir.clone() }
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("sub/b.yml: field `upstreams[0].endpoints`"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
