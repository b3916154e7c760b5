//! `agentmesh registry ls|show|search`: the control server's agent registry, read over its
//! HTTPS API (trusting the control server's CA), as a table or as JSON.

use crate::watch::{cut, str_of};
use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::Value;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct Server {
    /// The registry API.
    #[arg(
        long,
        default_value = "https://127.0.0.1:15012",
        env = "AGENTMESH_CONTROL_URL"
    )]
    server: String,
    /// The control server's CA certificate (in its state directory).
    #[arg(
        long,
        default_value = ".agentmesh/control/ca.pem",
        env = "AGENTMESH_CA"
    )]
    ca: PathBuf,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum RegistryCommand {
    /// Every agent: owner, skills, health, certification.
    Ls {
        #[command(flatten)]
        server: Server,
    },
    /// One agent in full, with its A2A card.
    Show {
        name: String,
        #[command(flatten)]
        server: Server,
    },
    /// Agents by skill, owner, tag or words in their name, description and skills.
    Search {
        /// Words to look for.
        words: Option<String>,
        #[arg(long)]
        skill: Option<String>,
        #[arg(long)]
        owner: Option<String>,
        #[arg(long)]
        tag: Option<String>,
        #[command(flatten)]
        server: Server,
    },
}

impl Server {
    async fn get(&self, path_and_query: &str) -> anyhow::Result<Value> {
        let ca = std::fs::read(&self.ca).with_context(|| {
            format!(
                "cannot read the control server's CA {} (set --ca or AGENTMESH_CA)",
                self.ca.display()
            )
        })?;
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
            .tls_built_in_root_certs(false)
            .build()?;
        let url = format!("{}{path_and_query}", self.server.trim_end_matches('/'));
        let r = client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("cannot reach the registry at {}", self.server))?;
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let msg = v["error"]["message"].as_str().unwrap_or("no detail");
            anyhow::bail!("{status}: {msg}");
        }
        Ok(v)
    }
}

const HEADER: &str =
    "NAME            OWNER       SKILLS                  HEALTH     ENDPOINTS  CERTIFIED  SOURCE";

fn row(a: &Value) -> String {
    let skills: Vec<&str> = a["skills"]
        .as_array()
        .map(|s| s.iter().map(|k| str_of(k, "id")).collect())
        .unwrap_or_default();
    let checks = a["certification"].as_array().cloned().unwrap_or_default();
    let passed = checks.iter().filter(|c| c["passed"] == true).count();
    let health = if a["healthy"] == true {
        "healthy"
    } else if a["last_heartbeat_unix"].is_null() {
        "unknown"
    } else {
        "stale"
    };
    format!(
        "{:<15} {:<11} {:<23} {:<10} {:<10} {:<10} {}",
        cut(str_of(a, "name"), 15),
        cut(str_of(a, "owner"), 11),
        cut(&skills.join(","), 23),
        health,
        a["endpoints"].as_array().map_or(0, |e| e.len()),
        format!("{passed}/{}", checks.len()),
        str_of(a, "source"),
    )
}

fn table(v: &Value) -> String {
    let mut out = String::from(HEADER);
    for a in v["agents"].as_array().into_iter().flatten() {
        out.push('\n');
        out.push_str(&row(a));
    }
    out
}

/// A query string from the search filters (values percent-encoded).
fn query(pairs: &[(&str, &Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub async fn run(cmd: RegistryCommand) -> anyhow::Result<i32> {
    let (server, v, list) = match &cmd {
        RegistryCommand::Ls { server } => (server, server.get("/v1/agents").await?, true),
        RegistryCommand::Show { name, server } => (
            server,
            server.get(&format!("/v1/agents/{}", encode(name))).await?,
            false,
        ),
        RegistryCommand::Search {
            words,
            skill,
            owner,
            tag,
            server,
        } => {
            let q = query(&[
                ("q", words),
                ("skill", skill),
                ("owner", owner),
                ("tag", tag),
            ]);
            (server, server.get(&format!("/v1/agents{q}")).await?, true)
        }
    };
    if server.json || !list {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", table(&v));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rows_show_skills_health_and_certification() {
        let v = json!({"agents": [{"name": "writer", "owner": "team-b", "skills": [{"id": "summarize"}, {"id": "write"}],
            "healthy": false, "last_heartbeat_unix": null, "endpoints": [{"url": "x"}],
            "certification": [{"passed": true}, {"passed": false}], "source": "config"}]});
        let t = table(&v);
        let line = t.lines().nth(1).unwrap();
        for want in [
            "writer",
            "team-b",
            "summarize,write",
            "unknown",
            "1/2",
            "config",
        ] {
            assert!(line.contains(want), "{line} lacks {want}");
        }
        assert_eq!(
            query(&[
                ("q", &Some("a b".into())),
                ("skill", &None),
                ("tag", &Some("x&y".into()))
            ]),
            "?q=a%20b&tag=x%26y"
        );
    }
}
