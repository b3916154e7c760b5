//! What each sidecar is sent: the catalog and the registry's live state turned into versioned
//! discovery resources, once per change, and each agent's grant — its own registry entry, the
//! upstreams, peers, skills, policy and secrets its spec names, and nothing else (zero trust
//! applies to config too).

use crate::model::{AgentSpec, Catalog};
use crate::registry::Registry;
use agentmesh_control_api::discovery::{self as wire, resource::Kind};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// The trust domain of SPIFFE IDs (design §6).
pub const TRUST_DOMAIN: &str = "mesh.local";

/// Every resource, by name, and what each agent is granted.
#[derive(Debug, Default)]
pub struct World {
    resources: HashMap<String, Arc<wire::Resource>>,
    grants: HashMap<String, Vec<String>>,
}

impl World {
    /// The resources granted to `agent`, sorted by name; `None` for an agent nobody declared or
    /// registered.
    pub fn for_agent(&self, agent: &str) -> Option<Vec<Arc<wire::Resource>>> {
        let names = self.grants.get(agent)?;
        Some(
            names
                .iter()
                .filter_map(|n| self.resources.get(n).cloned())
                .collect(),
        )
    }

    /// Every agent, declared or registered.
    pub fn agents(&self) -> impl Iterator<Item = &wire::Agent> {
        self.resources.values().filter_map(|r| match &r.kind {
            Some(Kind::Agent(a)) => Some(a),
            _ => None,
        })
    }

    pub fn agent(&self, name: &str) -> Option<&wire::Agent> {
        match self
            .resources
            .get(&format!("agent/{name}"))
            .map(|r| &r.kind)
        {
            Some(Some(Kind::Agent(a))) => Some(a),
            _ => None,
        }
    }

    /// Builds the world from the catalog and the registry's current state.
    pub fn build(catalog: &Catalog, registry: &Registry) -> World {
        let mut w = World::default();
        let live = registry.live_endpoints();
        // Declared agents first; a registered agent never shadows a declared one.
        let mut agents: BTreeMap<String, AgentSpec> = registry.registered();
        for (name, a) in &catalog.agents {
            agents.insert(name.clone(), a.spec.clone());
        }
        for (name, spec) in &agents {
            let mut endpoints: Vec<wire::AgentEndpoint> = spec
                .endpoints
                .iter()
                .map(|url| wire::AgentEndpoint {
                    url: url.clone(),
                    // A fixed endpoint is taken as healthy: no heartbeat speaks for it, and the
                    // sidecars' circuit breakers stop calling it if it fails.
                    healthy: true,
                })
                .collect();
            for url in live.get(name).into_iter().flatten() {
                if !spec.endpoints.contains(url) {
                    endpoints.push(wire::AgentEndpoint {
                        url: url.clone(),
                        healthy: true,
                    });
                }
            }
            let agent = wire::Agent {
                name: name.clone(),
                namespace: spec.namespace.clone(),
                spiffe_id: format!("spiffe://{TRUST_DOMAIN}/ns/{}/agent/{name}", spec.namespace),
                description: spec.description.clone(),
                owner: spec.owner.clone(),
                tags: spec.tags.clone(),
                skills: spec
                    .skills
                    .iter()
                    .map(|s| wire::Skill {
                        id: s.id.clone(),
                        name: s.name.clone(),
                        description: s.description.clone(),
                        tags: s.tags.clone(),
                    })
                    .collect(),
                endpoints,
                // The agent's own card, once it announced one; until then one made from its entry.
                card_json: registry
                    .announced_card(name)
                    .unwrap_or_else(|| card(spec))
                    .to_string(),
                certification: registry
                    .certification(name)
                    .into_iter()
                    .map(|c| wire::CertificationCheck {
                        check: c.check,
                        passed: c.passed,
                        at_unix: i64::try_from(c.at_unix).unwrap_or(i64::MAX),
                        by: c.by,
                        detail: c.detail,
                    })
                    .collect(),
            };
            let urls: Vec<String> = agent.endpoints.iter().map(|e| e.url.clone()).collect();
            if !urls.is_empty() {
                let upstream = wire::Upstream {
                    name: format!("agents/{name}"),
                    endpoints: urls,
                    ..Default::default()
                };
                w.add(format!("upstream/agents/{name}"), Kind::Upstream(upstream));
            }
            w.add(format!("agent/{name}"), Kind::Agent(agent));
        }
        for (name, u) in &catalog.upstreams {
            match u.spec.to_wire() {
                Ok(up) => w.add(format!("upstream/{name}"), Kind::Upstream(up)),
                Err(e) => tracing::error!(upstream = %name, error = %e, "upstream left out"),
            }
        }
        for (name, p) in &catalog.policies {
            let bundle = wire::PolicyBundle {
                name: name.clone(),
                revision: p.spec.sources.revision.clone(),
                modules: p
                    .spec
                    .sources
                    .modules
                    .iter()
                    .map(|(path, text)| wire::RegoModule {
                        path: path.clone(),
                        text: text.clone(),
                    })
                    .collect(),
                data_json: p.spec.sources.data.to_string(),
                decision: p.spec.decision.clone(),
            };
            w.add(format!("policy/{name}"), Kind::PolicyBundle(bundle));
        }
        for (name, s) in &catalog.secrets {
            let secret = wire::Secret {
                name: name.clone(),
                value: s.spec.clone(),
            };
            w.add(format!("secret/{name}"), Kind::Secret(secret));
        }
        // Skills to the agents that offer them (with somewhere to call them).
        let mut by_skill: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (name, spec) in &agents {
            if w.resources.contains_key(&format!("upstream/agents/{name}")) {
                for s in &spec.skills {
                    by_skill
                        .entry(s.id.as_str())
                        .or_default()
                        .insert(name.as_str());
                }
            }
        }
        for (name, a) in &catalog.agents {
            let calls = &a.spec.calls;
            let mut granted = vec![format!("agent/{name}")];
            granted.extend(calls.upstreams.iter().map(|u| format!("upstream/{u}")));
            for peer in &calls.agents {
                granted.push(format!("agent/{peer}"));
                granted.push(format!("upstream/agents/{peer}"));
            }
            for skill in &calls.skills {
                let providers: Vec<&str> = by_skill
                    .get(skill.as_str())
                    .map(|s| s.iter().copied().filter(|p| p != name).collect())
                    .unwrap_or_default();
                if providers.is_empty() {
                    continue;
                }
                let route = wire::Route {
                    name: format!("agents/by-skill/{skill}"),
                    upstreams: providers.iter().map(|p| format!("agents/{p}")).collect(),
                };
                let route_name = format!("route/agents/by-skill/{skill}");
                w.add(route_name.clone(), Kind::Route(route));
                granted.push(route_name);
                for p in providers {
                    granted.push(format!("agent/{p}"));
                    granted.push(format!("upstream/agents/{p}"));
                }
            }
            granted.extend(a.spec.policy.iter().map(|p| format!("policy/{p}")));
            granted.extend(a.spec.secrets.iter().map(|s| format!("secret/{s}")));
            granted.sort();
            granted.dedup();
            w.grants.insert(name.clone(), granted);
        }
        // Registered agents hold no grants of their own: only their registry entry.
        for name in agents.keys() {
            w.grants
                .entry(name.clone())
                .or_insert_with(|| vec![format!("agent/{name}")]);
        }
        w
    }

    fn add(&mut self, name: String, kind: Kind) {
        let mut r = wire::Resource {
            name: name.clone(),
            version: String::new(),
            kind: Some(kind),
        };
        r.version = digest(&r.encode_to_vec());
        self.resources.insert(name, Arc::new(r));
    }
}

/// The A2A agent card: the declared one, or one made from the registry entry.
pub fn card(spec: &AgentSpec) -> serde_json::Value {
    if let Some(c) = &spec.card {
        return c.clone();
    }
    serde_json::json!({
        "name": spec.name,
        "description": spec.description,
        "version": "1.0.0",
        "skills": spec.skills.iter().map(|s| serde_json::json!({
            "id": s.id, "name": s.name, "description": s.description, "tags": s.tags,
        })).collect::<Vec<_>>(),
        "capabilities": {"streaming": true},
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain"],
    })
}

/// A short stable digest: equal bytes, equal versions, across restarts of the same build.
pub fn digest(bytes: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// The version of a whole resource set: a digest of its names and versions.
pub fn set_version(resources: &[Arc<wire::Resource>]) -> String {
    let mut text = String::new();
    for r in resources {
        text.push_str(&r.name);
        text.push('=');
        text.push_str(&r.version);
        text.push('\n');
    }
    digest(text.as_bytes())
}
