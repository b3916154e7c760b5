//! The resources the control server pushed, as the sidecar holds them: a versioned set that a
//! state-of-the-world response replaces and a delta response changes, merged into the same
//! `Config` the bootstrap file gives (pushed upstreams and routes beside the file's, the pushed
//! policy instead of the file's), and kept on disk so that the sidecar can start on its last
//! good set when the control server is down.

use crate::config::{Config, RouteConfig, UpstreamConfig};
use agentmesh_control_api::discovery::{self as wire, resource::Kind};
use prost::Message;
use std::collections::BTreeMap;
use std::path::Path;

/// A pushed policy, ready to compile.
#[derive(Debug, Clone)]
pub struct PushedPolicy {
    pub name: String,
    pub sources: agentmesh_policy::Sources,
    /// The rule the bundle names; empty for the config's.
    pub decision: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pushed {
    /// The control server's version of the whole set.
    pub version: String,
    pub resources: BTreeMap<String, wire::Resource>,
}

impl Pushed {
    /// The set a state-of-the-world response carries.
    pub fn whole(resp: &wire::DiscoveryResponse) -> Pushed {
        Pushed {
            version: resp.version_info.clone(),
            resources: resp
                .resources
                .iter()
                .map(|r| (r.name.clone(), r.clone()))
                .collect(),
        }
    }

    /// This set with a delta response applied.
    pub fn with_delta(&self, resp: &wire::DeltaDiscoveryResponse) -> Pushed {
        let mut next = self.clone();
        for name in &resp.removed_resources {
            next.resources.remove(name);
        }
        for r in &resp.resources {
            next.resources.insert(r.name.clone(), r.clone());
        }
        next.version = resp.system_version_info.clone();
        next
    }

    /// Name to version, as a reconnecting delta stream announces what it holds.
    pub fn versions(&self) -> std::collections::HashMap<String, String> {
        self.resources
            .iter()
            .map(|(n, r)| (n.clone(), r.version.clone()))
            .collect()
    }

    /// Merges the set into a bootstrap config: pushed upstreams and routes replace the file's
    /// of the same name; returns the pushed policy, if any. Errors name the resource and field.
    pub fn merge_into(&self, config: &mut Config) -> Result<Option<PushedPolicy>, String> {
        let mut policy = None;
        for (name, r) in &self.resources {
            match &r.kind {
                Some(Kind::Upstream(u)) => {
                    let u = UpstreamConfig::from_wire(u)
                        .map_err(|e| format!("{name}: field `{}`: {}", e.field, e.message))?;
                    config.upstreams.retain(|x| x.name != u.name);
                    config.upstreams.push(u);
                }
                Some(Kind::Route(rt)) => {
                    config.routes.retain(|x| x.name != rt.name);
                    config.routes.push(RouteConfig {
                        name: rt.name.clone(),
                        upstreams: rt.upstreams.clone(),
                    });
                }
                Some(Kind::PolicyBundle(b)) => {
                    if policy.is_some() {
                        return Err(format!("{name}: more than one policy was pushed"));
                    }
                    let data = if b.data_json.is_empty() {
                        serde_json::json!({})
                    } else {
                        serde_json::from_str(&b.data_json)
                            .map_err(|e| format!("{name}: field `data_json`: {e}"))?
                    };
                    policy = Some(PushedPolicy {
                        name: b.name.clone(),
                        sources: agentmesh_policy::Sources {
                            modules: b
                                .modules
                                .iter()
                                .map(|m| (m.path.clone(), m.text.clone()))
                                .collect(),
                            data,
                            revision: b.revision.clone(),
                        },
                        decision: b.decision.clone(),
                    });
                }
                // Registry entries and credentials are held, not merged: issue 6 uses them.
                Some(Kind::Agent(_)) | Some(Kind::Secret(_)) => {}
                None => return Err(format!("{name}: a resource without content")),
            }
        }
        Ok(policy)
    }

    /// The pushed secrets, name and value (for the sidecar's held credentials only).
    pub fn secrets(&self) -> Vec<(String, String)> {
        self.resources
            .values()
            .filter_map(|r| match &r.kind {
                Some(Kind::Secret(s)) => Some((
                    s.name.clone(),
                    String::from_utf8_lossy(&s.value).trim().to_string(),
                )),
                _ => None,
            })
            .collect()
    }

    /// Names of the pushed secrets (their values never leave this module's holder).
    pub fn secret_names(&self) -> Vec<&str> {
        self.resources
            .values()
            .filter_map(|r| match &r.kind {
                Some(Kind::Secret(s)) => Some(s.name.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Writes the set (as a state-of-the-world response) whole: temporary file, sync, rename;
    /// readable by the sidecar's user only, since it holds credentials.
    pub fn persist(&self, path: &Path) -> std::io::Result<()> {
        let msg = wire::DiscoveryResponse {
            version_info: self.version.clone(),
            resources: self.resources.values().cloned().collect(),
            ..Default::default()
        };
        agentmesh_control_api::write_atomically_with(path, &msg.encode_to_vec(), true)
    }

    /// Reads a persisted set; `Ok(None)` when there is none.
    pub fn restore(path: &Path) -> Result<Option<Pushed>, String> {
        match std::fs::read(path) {
            Ok(bytes) => wire::DiscoveryResponse::decode(bytes.as_slice())
                .map(|r| Some(Pushed::whole(&r)))
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(name: &str, endpoint: &str) -> wire::Resource {
        wire::Resource {
            name: format!("upstream/{name}"),
            version: endpoint.into(),
            kind: Some(Kind::Upstream(wire::Upstream {
                name: name.into(),
                endpoints: vec![endpoint.into()],
                ..Default::default()
            })),
        }
    }

    #[test]
    fn deltas_add_change_and_remove_and_the_set_persists() {
        let whole = Pushed::whole(&wire::DiscoveryResponse {
            version_info: "v1".into(),
            resources: vec![upstream("mcp/a", "http://a"), upstream("mcp/b", "http://b")],
            ..Default::default()
        });
        let next = whole.with_delta(&wire::DeltaDiscoveryResponse {
            system_version_info: "v2".into(),
            resources: vec![
                upstream("mcp/a", "http://a2"),
                upstream("mcp/c", "http://c"),
            ],
            removed_resources: vec!["upstream/mcp/b".into()],
            ..Default::default()
        });
        assert_eq!(next.version, "v2");
        let names: Vec<&str> = next.resources.keys().map(String::as_str).collect();
        assert_eq!(names, ["upstream/mcp/a", "upstream/mcp/c"]);
        assert_eq!(next.versions()["upstream/mcp/a"], "http://a2");
        assert_eq!(whole.resources.len(), 2, "the running set is untouched");

        let mut config = Config::from_yaml(
            "agent: {name: p}\nupstreams: [{name: mcp/a, endpoints: [\"http://local\"]}, {name: http/x, endpoints: [\"http://x\"]}]\n",
            "t",
        )
        .unwrap();
        assert!(next.merge_into(&mut config).unwrap().is_none());
        let got: Vec<(&str, &str)> = config
            .upstreams
            .iter()
            .map(|u| (u.name.as_str(), u.endpoints[0].as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("http/x", "http://x"),
                ("mcp/a", "http://a2"),
                ("mcp/c", "http://c")
            ],
            "pushed upstreams replace the file's of the same name"
        );

        let file = std::env::temp_dir().join(format!("am-pushed-{}.pb", std::process::id()));
        next.persist(&file).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "only its owner reads the persisted set");
        assert_eq!(Pushed::restore(&file).unwrap(), Some(next));
        std::fs::write(&file, b"\xff\xff not protobuf").unwrap();
        assert!(Pushed::restore(&file).is_err());
        std::fs::remove_file(&file).unwrap();
        assert_eq!(Pushed::restore(&file).unwrap(), None);
    }

    #[test]
    fn a_bad_resource_is_named_in_the_error() {
        let mut bad = upstream("mcp/a", "ftp://a");
        bad.name = "upstream/mcp/a".into();
        let p = Pushed::whole(&wire::DiscoveryResponse {
            version_info: "v9".into(),
            resources: vec![bad],
            ..Default::default()
        });
        let mut config = Config::from_yaml("agent: {name: p}\n", "t").unwrap();
        let e = p.merge_into(&mut config).unwrap_err();
        assert!(e.starts_with("upstream/mcp/a: field `endpoints[0]`"), "{e}");
        let e = crate::state::Desired::compose(config, Some(&p))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("control server version v9: upstream/mcp/a"),
            "{e}"
        );
    }
}
