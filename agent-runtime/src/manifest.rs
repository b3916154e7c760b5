//! The agent manifest (issue 'Agent runtime'): what a thin agent is — its name, the model it
//! thinks with, its system prompt, the MCP tool servers and collaborators it may use (by mesh
//! name or skill), the skills it offers — and optionally a fixed workflow of steps run by the
//! runtime rather than planned by the model. Parsed and validated at load; every error names the
//! file, the line (for YAML faults) and the field.

use agentmesh_control_api::upstream::is_dns_label;
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub description: String,
    pub model: Model,
    #[serde(default)]
    pub system_prompt: String,
    /// MCP servers by mesh name (`mcp/<name>` through the sidecar).
    #[serde(default)]
    pub tools: Vec<String>,
    #[serde(default)]
    pub collaborators: Vec<Collaborator>,
    /// Skills this agent offers (its A2A card).
    #[serde(default)]
    pub skills: Vec<Skill>,
    /// The sidecar's outbound listener: every call goes through it.
    #[serde(default = "default_sidecar")]
    pub sidecar: String,
    /// Where the agent serves A2A (its sidecar's `inbound.forward_to`).
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
    /// The URL its card advertises (default `http://<listen>/`): where callers reach it, e.g.
    /// through their sidecar, `http://127.0.0.1:15001/agents/<name>/`.
    #[serde(default)]
    pub card_url: Option<String>,
    /// The task store (relative to the manifest); default `.agentmesh/<name>.tasks.db`.
    #[serde(default)]
    pub store: Option<PathBuf>,
    /// Fixed steps run by the runtime; without them the model plans with its tools.
    #[serde(default)]
    pub workflow: Vec<Step>,
    /// How long a task waits for a human's answer before it fails (default 72h).
    #[serde(default = "default_expiry", with = "humantime_serde")]
    pub questions_expire_after: std::time::Duration,
}

fn default_expiry() -> std::time::Duration {
    std::time::Duration::from_secs(72 * 3600)
}

fn default_namespace() -> String {
    "default".into()
}

fn default_sidecar() -> String {
    "http://127.0.0.1:15001".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// The LLM provider's mesh name (`llm/<provider>`).
    pub provider: String,
    pub name: String,
    #[serde(default)]
    pub max_tokens: Option<u32>,
}

/// Another agent, by name or by a skill some agent offers.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Collaborator {
    #[serde(default)]
    pub agent: Option<String>,
    #[serde(default)]
    pub skill: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Skill {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// One workflow step: exactly one of a tool call, a message to another agent, a model call, or
/// a question for a human.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub id: String,
    #[serde(default)]
    pub tool: Option<ToolStep>,
    #[serde(default)]
    pub agent: Option<AgentStep>,
    #[serde(default)]
    pub llm: Option<LlmStep>,
    /// Pause in `input-required` with this question until a human answers.
    #[serde(default)]
    pub ask: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ToolStep {
    /// One of `tools`.
    pub server: String,
    pub name: String,
    /// Arguments; `{{input}}` and `{{steps.<id>}}` are replaced by the task's input and earlier
    /// steps' results.
    #[serde(default)]
    pub arguments: serde_json::Value,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentStep {
    /// A collaborator by name, or `skill:<id>`.
    pub to: String,
    pub message: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LlmStep {
    pub prompt: String,
}

/// Why a manifest did not load.
pub type ManifestError = agentmesh_control_api::FileError;

impl Manifest {
    /// Reads and validates a manifest file; the store path is made relative to it.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ManifestError::read(&file, e))?;
        let mut m = Manifest::from_yaml(&text, &file)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let store = m
            .store
            .take()
            .unwrap_or_else(|| PathBuf::from(format!(".agentmesh/{}.tasks.db", m.name)));
        m.store = Some(if store.is_relative() {
            dir.join(store)
        } else {
            store
        });
        Ok(m)
    }

    pub fn from_yaml(text: &str, file: &str) -> Result<Manifest, ManifestError> {
        let m: Manifest = agentmesh_control_api::from_yaml(text, file)?;
        m.validate()
            .map_err(|(field, message)| ManifestError::invalid(file, field, message))?;
        Ok(m)
    }

    /// What types alone cannot check; `(field, message)` on the first fault.
    fn validate(&self) -> Result<(), (String, String)> {
        let name = |field: String, v: &str| {
            if is_dns_label(v) {
                Ok(())
            } else {
                Err((
                    field,
                    format!("`{v}` is not a valid name (lowercase letters, digits, '-', '_', '.')"),
                ))
            }
        };
        name("name".into(), &self.name)?;
        name("namespace".into(), &self.namespace)?;
        name("model.provider".into(), &self.model.provider)?;
        if self.model.name.is_empty() {
            return Err(("model.name".into(), "must not be empty".into()));
        }
        if !self.sidecar.starts_with("http://") && !self.sidecar.starts_with("https://") {
            return Err((
                "sidecar".into(),
                format!("`{}` is not an http:// URL", self.sidecar),
            ));
        }
        for (i, t) in self.tools.iter().enumerate() {
            name(format!("tools[{i}]"), t)?;
            if t == "agent" || t == "skill" || t.contains("__") {
                return Err((
                    format!("tools[{i}]"),
                    format!("`{t}` is reserved (the model's functions are `<server>__<tool>`, `agent__<name>`, `skill__<id>`)"),
                ));
            }
        }
        for (i, c) in self.collaborators.iter().enumerate() {
            match (&c.agent, &c.skill) {
                (Some(a), None) => name(format!("collaborators[{i}].agent"), a)?,
                (None, Some(s)) => name(format!("collaborators[{i}].skill"), s)?,
                _ => {
                    return Err((
                        format!("collaborators[{i}]"),
                        "set exactly one of `agent` and `skill`".into(),
                    ))
                }
            }
        }
        for (i, s) in self.skills.iter().enumerate() {
            name(format!("skills[{i}].id"), &s.id)?;
        }
        let mut ids = HashSet::new();
        for (i, step) in self.workflow.iter().enumerate() {
            let at = |f: &str| format!("workflow[{i}].{f}");
            name(at("id"), &step.id)?;
            if !ids.insert(step.id.as_str()) {
                return Err((at("id"), format!("`{}` is used twice", step.id)));
            }
            let actions = [
                step.tool.is_some(),
                step.agent.is_some(),
                step.llm.is_some(),
                step.ask.is_some(),
            ];
            if actions.iter().filter(|a| **a).count() != 1 {
                return Err((
                    format!("workflow[{i}]"),
                    "set exactly one of `tool`, `agent`, `llm` and `ask`".into(),
                ));
            }
            if let Some(t) = &step.tool {
                if !self.tools.contains(&t.server) {
                    return Err((
                        at("tool.server"),
                        format!("`{}` is not one of this agent's `tools`", t.server),
                    ));
                }
            }
            if let Some(a) = &step.agent {
                let known = match a.to.strip_prefix("skill:") {
                    Some(s) => self
                        .collaborators
                        .iter()
                        .any(|c| c.skill.as_deref() == Some(s)),
                    None => self
                        .collaborators
                        .iter()
                        .any(|c| c.agent.as_deref() == Some(a.to.as_str())),
                };
                if !known {
                    return Err((
                        at("agent.to"),
                        format!("`{}` is not one of this agent's `collaborators`", a.to),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "name: planner
model: {provider: openai, name: gpt-4o-mini}
system_prompt: You plan research.
tools: [search-tools]
collaborators: [{agent: writer}, {skill: summarize}]
skills: [{id: plan, name: Plan research}]
listen: 127.0.0.1:8081
workflow:
  - {id: search, tool: {server: search-tools, name: web_search, arguments: {q: '{{input}}'}}}
  - {id: draft, agent: {to: writer, message: 'Write about {{steps.search}}'}}
  - {id: sum, agent: {to: 'skill:summarize', message: '{{steps.draft}}'}}
  - {id: approve, ask: Publish?}
  - {id: title, llm: {prompt: 'A title for {{steps.draft}}'}}
";

    #[test]
    fn a_manifest_loads_with_defaults() {
        let m = Manifest::from_yaml(GOOD, "p.yaml").unwrap();
        assert_eq!(m.namespace, "default");
        assert_eq!(m.sidecar, "http://127.0.0.1:15001");
        assert_eq!(m.workflow.len(), 5);
        assert_eq!(m.workflow[3].ask.as_deref(), Some("Publish?"));
    }

    /// The YAML blocks of docs/agents.md, in order.
    fn doc_blocks() -> Vec<String> {
        let doc = include_str!("../../docs/agents.md");
        doc.split("```yaml\n")
            .skip(1)
            .filter_map(|b| b.split("```").next().map(str::to_string))
            .collect()
    }

    #[test]
    fn the_documented_manifest_and_workflow_load() {
        let blocks = doc_blocks();
        let m = Manifest::from_yaml(&blocks[0], "docs/agents.md").unwrap();
        assert_eq!(m.name, "researcher");
        assert_eq!(
            m.questions_expire_after,
            std::time::Duration::from_secs(72 * 3600)
        );
        assert_eq!(
            m.card_url.as_deref(),
            Some("http://127.0.0.1:15001/agents/researcher/")
        );
        // The workflow example, on a manifest with the servers and collaborators it names.
        let with_flow = format!(
            "name: p\nmodel: {{provider: openai, name: m}}\ntools: [search-tools, files]\ncollaborators: [{{agent: researcher}}]\n{}",
            blocks[1]
        );
        let m = Manifest::from_yaml(&with_flow, "docs/agents.md").unwrap();
        let ids: Vec<&str> = m.workflow.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["plan", "search", "research", "approve", "publish"]);
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let cases = [
            (
                GOOD.replace("name: planner", "name: Planner"),
                "field `name`",
            ),
            (
                GOOD.replace("server: search-tools", "server: shell"),
                "field `workflow[0].tool.server`",
            ),
            (
                GOOD.replace("to: writer", "to: editor"),
                "field `workflow[1].agent.to`",
            ),
            (
                GOOD.replace("{id: approve, ask: Publish?}", "{id: approve}"),
                "field `workflow[3]`",
            ),
            (
                GOOD.replace("id: title", "id: sum"),
                "field `workflow[4].id`",
            ),
            (
                GOOD.replace("{skill: summarize}", "{agent: a, skill: b}"),
                "field `collaborators[1]`",
            ),
            (
                GOOD.replace("system_prompt", "system_promt"),
                "unknown field `system_promt`",
            ),
        ];
        for (yaml, want) in cases {
            let e = Manifest::from_yaml(&yaml, "p.yaml")
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("p.yaml: ") && e.contains(want),
                "{e}\nwant {want}"
            );
        }
        let e = Manifest::from_yaml("name: p\nmodel: {provider: openai}\n", "q.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("model") && e.contains("line 2"), "{e}");
    }
}
