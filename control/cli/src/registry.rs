//! `agentmesh registry ls|show|search`: the control server's agent registry, read over its
//! HTTPS API (trusting the control server's CA), as a table or as JSON; and `agentmesh token
//! create`, a join token for an agent's first SVID.

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

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// A single-use, expiring join token with which an agent's sidecar gets its first SVID.
    Create {
        /// The agent it is for (declared or registered).
        #[arg(long)]
        agent: String,
        #[arg(long, default_value = "default")]
        namespace: String,
        /// How long it may be used.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// The control server's admin token.
        #[arg(
            long,
            default_value = ".agentmesh/control/admin-token",
            env = "AGENTMESH_ADMIN_TOKEN_FILE"
        )]
        admin_token_file: PathBuf,
        #[command(flatten)]
        server: Server,
    },
}

impl Server {
    async fn get(&self, path_and_query: &str) -> anyhow::Result<Value> {
        self.send(reqwest::Method::GET, path_and_query, None, None)
            .await
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<&Value>,
        bearer: Option<&str>,
    ) -> anyhow::Result<Value> {
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
        let mut req = client.request(method, &url);
        if let Some(b) = body {
            req = req.json(b);
        }
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        let r = req
            .send()
            .await
            .with_context(|| format!("cannot reach the control server at {}", self.server))?;
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

pub async fn token(cmd: TokenCommand) -> anyhow::Result<i32> {
    let TokenCommand::Create {
        agent,
        namespace,
        ttl,
        admin_token_file,
        server,
    } = cmd;
    let admin = std::fs::read_to_string(&admin_token_file).with_context(|| {
        format!(
            "cannot read the admin token {} (set --admin-token-file)",
            admin_token_file.display()
        )
    })?;
    let body = serde_json::json!({"agent": agent, "namespace": namespace, "ttl_seconds": ttl.as_secs().max(1)});
    let v = server
        .send(
            reqwest::Method::POST,
            "/v1/join-tokens",
            Some(&body),
            Some(admin.trim()),
        )
        .await?;
    if server.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        // The token alone on stdout, for `$(agentmesh token create ...)`; the rest on stderr.
        eprintln!(
            "join token for {} (single use, expires at unix {}):",
            str_of(&v, "spiffe_id"),
            v["expires_at_unix"]
        );
        println!("{}", str_of(&v, "token"));
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
