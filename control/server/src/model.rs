//! The control server's config model: what a directory of YAML files (or, next, Kubernetes
//! custom resources) declares — agents with what each may call, upstreams, policies and
//! secrets — parsed and validated into one `Catalog`. Every error names the file and the field,
//! and a catalog that fails validation never replaces the running one.

use agentmesh_control_api::upstream::{is_dns_label, split_name, CallKind, UpstreamConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One YAML file of the config directory: any mix of the four sections.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfigFile {
    pub agents: Vec<AgentSpec>,
    pub upstreams: Vec<UpstreamConfig>,
    pub policies: Vec<PolicySpec>,
    pub secrets: Vec<SecretSpec>,
    /// Identity providers whose user tokens the token exchange accepts as subject tokens.
    pub issuers: Vec<agentmesh_control_api::jwt::JwtIssuer>,
}

/// An agent: its registry entry and what its sidecar is granted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub skills: Vec<SkillSpec>,
    /// Fixed inbound URLs of the agent's sidecar. Sidecars also announce theirs when they
    /// connect, which is how most agents are found.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The A2A agent card; without one, a card is made from the fields above.
    #[serde(default)]
    pub card: Option<serde_json::Value>,
    /// What the agent may call; nothing else reaches its sidecar.
    #[serde(default)]
    pub calls: Calls,
    /// The policy (by name) every call of its sidecar is decided by.
    #[serde(default)]
    pub policy: Option<String>,
    /// Credentials its sidecar holds for it, by name.
    #[serde(default)]
    pub secrets: Vec<String>,
}

fn default_namespace() -> String {
    "default".into()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Calls {
    /// Upstream names: `llm/openai`, `mcp/search`, `http/x`.
    pub upstreams: Vec<String>,
    /// Peer agents by name (reached as `agents/<name>`).
    pub agents: Vec<String>,
    /// Skills, reached as `agents/by-skill/<skill>` on any agent that offers one.
    pub skills: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SkillSpec {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// A policy: a directory of `.rego` and `data.json` files or an OPA bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub name: String,
    /// Relative to the YAML file that declares it.
    pub path: PathBuf,
    /// The rule whose value is the decision (default `data.agentmesh.authz.decision`).
    #[serde(default)]
    pub decision: Option<String>,
}

/// A credential, read from a file or an environment variable of the control server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecretSpec {
    pub name: String,
    #[serde(default)]
    pub file: Option<PathBuf>,
    #[serde(default)]
    pub env: Option<String>,
}

/// Why a config source could not be loaded; the running catalog stays in force.
pub type ModelError = agentmesh_control_api::FileError;

/// A compiled policy, ready to send: its Rego sources and decision rule.
#[derive(Debug, Clone)]
pub struct PolicyEntry {
    pub sources: agentmesh_policy::Sources,
    pub decision: String,
}

/// A declared item and the file it came from (for errors and for `/v1/status`).
#[derive(Debug, Clone)]
pub struct Declared<T> {
    pub file: String,
    pub spec: T,
}

/// Everything a config source declares, validated: names unique, every reference resolved,
/// every policy compiled, every secret readable.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub agents: BTreeMap<String, Declared<AgentSpec>>,
    pub upstreams: BTreeMap<String, Declared<UpstreamConfig>>,
    pub policies: BTreeMap<String, Declared<PolicyEntry>>,
    pub secrets: BTreeMap<String, Declared<Vec<u8>>>,
    /// The files read, in order.
    pub files: Vec<String>,
    /// Validates external subject tokens for the token exchange (when issuers are declared).
    pub issuers: Option<std::sync::Arc<agentmesh_control_api::jwt::Validator>>,
}

impl Catalog {
    /// Builds a catalog from parsed files (`(file name, its directory, content)`), checking
    /// each item and every cross-reference.
    pub fn build(files: Vec<(String, PathBuf, ConfigFile)>) -> Result<Catalog, ModelError> {
        let mut c = Catalog::default();
        let mut agent_at = BTreeMap::new();
        for (file, dir, content) in files {
            let invalid =
                |field: String, message: String| ModelError::invalid(&file, field, message);
            for (i, mut u) in content.upstreams.into_iter().enumerate() {
                if let Some(ca) = u.tls.ca_file.as_mut() {
                    if ca.is_relative() {
                        *ca = dir.join(&*ca);
                    }
                }
                u.validate()
                    .map_err(|e| invalid(format!("upstreams[{i}].{}", e.field), e.message))?;
                if split_name(&u.name).map(|(k, _)| k) == Some(CallKind::A2a) {
                    return Err(invalid(
                        format!("upstreams[{i}].name"),
                        format!("`{}`: agents are declared under `agents`, and their upstreams made from where their sidecars are", u.name),
                    ));
                }
                if let Some(prev) = c.upstreams.get(&u.name) {
                    return Err(invalid(
                        format!("upstreams[{i}].name"),
                        format!("`{}` is also declared in {}", u.name, prev.file),
                    ));
                }
                c.upstreams.insert(
                    u.name.clone(),
                    Declared {
                        file: file.clone(),
                        spec: u,
                    },
                );
            }
            for (i, p) in content.policies.into_iter().enumerate() {
                let at = |f: &str| format!("policies[{i}].{f}");
                check_name(&p.name).map_err(|m| invalid(at("name"), m))?;
                if let Some(prev) = c.policies.get(&p.name) {
                    return Err(invalid(
                        at("name"),
                        format!("`{}` is also declared in {}", p.name, prev.file),
                    ));
                }
                let path = dir.join(&p.path);
                let decision = p
                    .decision
                    .clone()
                    .unwrap_or_else(|| agentmesh_policy::DEFAULT_DECISION_PATH.to_string());
                let sources = agentmesh_policy::load(&path)
                    .map_err(|e| invalid(at("path"), e.to_string()))?;
                // Compile here, so that a broken policy is refused at the source and never
                // reaches a sidecar (which would NACK it anyway).
                agentmesh_policy::Policy::compile(
                    &sources,
                    &decision,
                    agentmesh_policy::EngineKind::Interpreter,
                )
                .map_err(|e| invalid(at("path"), e.to_string()))?;
                c.policies.insert(
                    p.name.clone(),
                    Declared {
                        file: file.clone(),
                        spec: PolicyEntry { sources, decision },
                    },
                );
            }
            for (i, s) in content.secrets.into_iter().enumerate() {
                let at = |f: &str| format!("secrets[{i}].{f}");
                check_name(&s.name).map_err(|m| invalid(at("name"), m))?;
                if let Some(prev) = c.secrets.get(&s.name) {
                    return Err(invalid(
                        at("name"),
                        format!("`{}` is also declared in {}", s.name, prev.file),
                    ));
                }
                let value = match (&s.file, &s.env) {
                    (Some(f), None) => std::fs::read(dir.join(f)).map_err(|e| {
                        invalid(at("file"), format!("cannot read {}: {e}", f.display()))
                    })?,
                    (None, Some(v)) => std::env::var(v)
                        .map_err(|_| {
                            invalid(at("env"), format!("environment variable `{v}` is not set"))
                        })?
                        .into_bytes(),
                    _ => {
                        return Err(invalid(
                            at("file"),
                            "set exactly one of `file` and `env`".into(),
                        ))
                    }
                };
                c.secrets.insert(
                    s.name.clone(),
                    Declared {
                        file: file.clone(),
                        spec: value,
                    },
                );
            }
            if !content.issuers.is_empty() {
                let mut issuers = content.issuers;
                for i in issuers.iter_mut() {
                    for p in [i.jwks_file.as_mut(), i.ca_file.as_mut()]
                        .into_iter()
                        .flatten()
                    {
                        if p.is_relative() {
                            *p = dir.join(&*p);
                        }
                    }
                }
                let config = agentmesh_control_api::jwt::JwtConfig {
                    issuers,
                    leeway: std::time::Duration::from_secs(30),
                    required: false,
                };
                config.validate().map_err(|e| invalid(e.field, e.message))?;
                if c.issuers.is_some() {
                    return Err(invalid(
                        "issuers".into(),
                        "issuers are declared in more than one file".into(),
                    ));
                }
                c.issuers = Some(std::sync::Arc::new(
                    agentmesh_control_api::jwt::Validator::new(config)
                        .map_err(|m| invalid("issuers".into(), m))?,
                ));
            }
            for (i, a) in content.agents.into_iter().enumerate() {
                check_agent(&a).map_err(|(f, m)| invalid(format!("agents[{i}].{f}"), m))?;
                if let Some(prev) = c.agents.get(&a.name) {
                    return Err(invalid(
                        format!("agents[{i}].name"),
                        format!("`{}` is also declared in {}", a.name, prev.file),
                    ));
                }
                agent_at.insert(a.name.clone(), i);
                c.agents.insert(
                    a.name.clone(),
                    Declared {
                        file: file.clone(),
                        spec: a,
                    },
                );
            }
            c.files.push(file);
        }
        // References, once every file is in: a grant must name something declared.
        for (name, a) in &c.agents {
            let i = agent_at[name];
            let invalid = |field: String, message: String| {
                ModelError::invalid(&a.file, format!("agents[{i}].{field}"), message)
            };
            for (j, u) in a.spec.calls.upstreams.iter().enumerate() {
                if !c.upstreams.contains_key(u) {
                    return Err(invalid(
                        format!("calls.upstreams[{j}]"),
                        format!("no upstream `{u}` is declared"),
                    ));
                }
            }
            for (j, peer) in a.spec.calls.agents.iter().enumerate() {
                if !is_dns_label(peer) {
                    return Err(invalid(
                        format!("calls.agents[{j}]"),
                        format!("`{peer}` is not an agent name"),
                    ));
                }
            }
            if let Some(p) = &a.spec.policy {
                if !c.policies.contains_key(p) {
                    return Err(invalid(
                        "policy".into(),
                        format!("no policy `{p}` is declared"),
                    ));
                }
            }
            for (j, s) in a.spec.secrets.iter().enumerate() {
                if !c.secrets.contains_key(s) {
                    return Err(invalid(
                        format!("secrets[{j}]"),
                        format!("no secret `{s}` is declared"),
                    ));
                }
            }
        }
        Ok(c)
    }
}

/// Names of agents, policies and secrets: lowercase DNS-label-like.
fn check_name(name: &str) -> Result<(), String> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid name (lowercase letters, digits, '-', '_', '.')"
        ))
    }
}

/// An agent's own fields; a `(field, message)` on the first fault.
pub fn check_agent(a: &AgentSpec) -> Result<(), (String, String)> {
    check_name(&a.name).map_err(|m| ("name".to_string(), m))?;
    check_name(&a.namespace).map_err(|m| ("namespace".to_string(), m))?;
    for (j, s) in a.skills.iter().enumerate() {
        check_name(&s.id).map_err(|m| (format!("skills[{j}].id"), m))?;
    }
    for (j, s) in a.calls.skills.iter().enumerate() {
        check_name(s).map_err(|m| (format!("calls.skills[{j}]"), m))?;
    }
    for (j, e) in a.endpoints.iter().enumerate() {
        agentmesh_control_api::upstream::Endpoint::parse(e)
            .map_err(|m| (format!("endpoints[{j}]"), m))?;
    }
    if let Some(card) = &a.card {
        if !card.is_object() {
            return Err(("card".into(), "an agent card is a JSON object".into()));
        }
    }
    Ok(())
}

/// Parses one YAML file of the config directory.
pub fn parse_file(text: &str, file: &str) -> Result<ConfigFile, ModelError> {
    if text.trim().is_empty() {
        return Ok(ConfigFile::default());
    }
    agentmesh_control_api::from_yaml(text, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(files: &[(&str, &str)]) -> Result<Catalog, ModelError> {
        let parsed = files
            .iter()
            .map(|(name, text)| {
                Ok((
                    name.to_string(),
                    PathBuf::from("."),
                    parse_file(text, name)?,
                ))
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Catalog::build(parsed)
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let cases: [(&[(&str, &str)], &str); 7] = [
            (
                &[("a.yaml", "agents: [{name: Planner}]")],
                "a.yaml: field `agents[0].name`",
            ),
            (
                &[(
                    "a.yaml",
                    "agents: [{name: p, calls: {upstreams: [llm/openai]}}]",
                )],
                "a.yaml: field `agents[0].calls.upstreams[0]`: no upstream `llm/openai`",
            ),
            (
                &[(
                    "u.yaml",
                    "upstreams: [{name: mcp/x, endpoints: [\"ftp://x\"]}]",
                )],
                "u.yaml: field `upstreams[0].endpoints[0]`",
            ),
            (
                &[
                    (
                        "u.yaml",
                        "upstreams: [{name: mcp/x, endpoints: [\"http://x\"]}]",
                    ),
                    (
                        "v.yaml",
                        "upstreams: [{name: mcp/x, endpoints: [\"http://y\"]}]",
                    ),
                ],
                "v.yaml: field `upstreams[0].name`: `mcp/x` is also declared in u.yaml",
            ),
            (
                &[("a.yaml", "agents: [{name: p, policy: strict}]")],
                "field `agents[0].policy`",
            ),
            (
                &[(
                    "s.yaml",
                    "secrets: [{name: k, env: AGENTMESH_TEST_SURELY_UNSET}]",
                )],
                "s.yaml: field `secrets[0].env`",
            ),
            (
                &[("a.yaml", "agents: [{name: p, colls: {}}]")],
                "a.yaml: agents[0]: unknown field `colls`",
            ),
        ];
        for (files, want) in cases {
            let e = catalog(files).unwrap_err().to_string();
            assert!(e.contains(want), "{files:?}\n -> {e}\n want {want}");
        }
    }

    #[test]
    fn a_parse_error_has_its_line() {
        let e = catalog(&[(
            "a.yaml",
            "agents:\n  - name: p\n    calls: {upstreams: 3}\n",
        )])
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 3"), "{e}");
    }
}
