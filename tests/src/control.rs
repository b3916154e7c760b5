//! The control server as the suites run it: `agentmesh-control` on free loopback ports with a
//! config directory and a state directory, and a client of its registry API that trusts the
//! server's own CA and holds its admin token.

use crate::{free_port, spawn, Proc, Scratch, Sidecar};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Control {
    pub xds: u16,
    pub api: u16,
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub proc: Proc,
    client: reqwest::Client,
    token: String,
}

impl Control {
    /// Starts on fresh ports; the state directory is `<config_dir>/../control-state`.
    pub async fn start(config_dir: &Path) -> Control {
        let state = config_dir.with_file_name("control-state");
        let [xds, api] = crate::free_ports::<2>();
        Self::start_on(config_dir, &state, xds, api).await
    }

    /// Starts on fresh ports with extra flags (e.g. `--svid-ttl 6s`).
    pub async fn start_with(config_dir: &Path, state_dir: &Path, extra: &[&str]) -> Control {
        let [xds, api] = crate::free_ports::<2>();
        Self::launch(config_dir, state_dir, xds, api, extra).await
    }

    /// Starts on given ports and state (a restart keeps both).
    pub async fn start_on(config_dir: &Path, state_dir: &Path, xds: u16, api: u16) -> Control {
        Self::launch(config_dir, state_dir, xds, api, &[]).await
    }

    async fn launch(
        config_dir: &Path,
        state_dir: &Path,
        xds: u16,
        api: u16,
        extra: &[&str],
    ) -> Control {
        let xds_addr = format!("127.0.0.1:{xds}");
        let api_addr = format!("127.0.0.1:{api}");
        let log = state_dir.with_file_name(format!("control-{}.log", free_port()));
        std::fs::create_dir_all(state_dir).expect("state dir");
        let mut args = vec![
            "--config-dir",
            config_dir.to_str().unwrap_or_default(),
            "--state-dir",
            state_dir.to_str().unwrap_or_default(),
            "--xds",
            &xds_addr,
            "--api",
            &api_addr,
        ];
        args.extend_from_slice(extra);
        let proc = spawn("agentmesh-control", &args, &log);
        // The CA and token are written before the ports open.
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(&api_addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "agentmesh-control did not come up: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ca = std::fs::read(state_dir.join("ca.pem")).expect("the control server's CA");
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("PEM"))
            .tls_built_in_root_certs(false)
            .build()
            .expect("client");
        let token = std::fs::read_to_string(state_dir.join("admin-token")).expect("admin token");
        Control {
            xds,
            api,
            config_dir: config_dir.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            proc,
            client,
            token,
        }
    }

    /// Kills the server (as a crash would) and starts it again on the same ports and state.
    pub async fn restart(&mut self) {
        self.kill();
        *self = Self::start_on(&self.config_dir, &self.state_dir, self.xds, self.api).await;
    }

    pub fn kill(&mut self) {
        let _ = self.proc.0.kill();
        let _ = self.proc.0.wait();
    }

    /// The discovery address a sidecar's `control.address` names.
    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.xds)
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.api)
    }

    /// A call to the registry API: status and JSON body (null when empty). `auth`: send the
    /// admin token.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        auth: bool,
    ) -> (u16, Value) {
        let mut r = self.client.request(method, self.url(path));
        if let Some(b) = body {
            r = r.json(b);
        }
        if auth {
            r = r.bearer_auth(&self.token);
        }
        let r = r.send().await.expect("the registry API answers");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// `POST path` with a JSON body; `auth`: send the admin token.
    pub async fn post(&self, path: &str, body: &Value, auth: bool) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body), auth)
            .await
    }

    pub async fn get(&self, path: &str) -> Value {
        let (status, v) = self.call(reqwest::Method::GET, path, None, false).await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    /// Polls `GET path` until `pred` holds.
    pub async fn wait(&self, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let v = self.get(path).await;
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{path} never got there: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Control {
    /// A sidecar of `agent` with an identity from this control server (a join token in a
    /// file) and a subscription; `inbound_to`: the agent's own server, if it takes calls;
    /// `extra`: more YAML.
    pub async fn identity_sidecar(
        &self,
        dir: &Scratch,
        agent: &str,
        inbound_to: Option<u16>,
        extra: &str,
    ) -> Sidecar {
        let (s, t) = self
            .call(
                reqwest::Method::POST,
                "/v1/join-tokens",
                Some(&serde_json::json!({"agent": agent})),
                true,
            )
            .await;
        assert_eq!(s, 201, "{t}");
        let token = dir.path("join-token");
        std::fs::write(&token, t["token"].as_str().unwrap_or_default()).expect("token file");
        let ca = self.state_dir.join("ca.pem");
        // The discovery stream over mTLS too: the only way to be sent the agent's secrets.
        let (xds, api) = (self.address().replace("http://", "https://"), self.url(""));
        let inbound = inbound_to
            .map(|p| format!("inbound: {{forward_to: \"127.0.0.1:{p}\", kind: http}}\n"))
            .unwrap_or_default();
        let id_dir = dir.path("identity");
        let extra = extra.to_string();
        Sidecar::start_agent(dir, agent, move |_, _, _| {
            format!(
                "identity: {{ca_server: \"{api}\", ca_file: \"{}\", join_token_file: \"{}\", dir: \"{}\"}}\ncontrol: {{address: \"{xds}\"}}\n{inbound}{extra}",
                ca.display(),
                token.display(),
                id_dir.display()
            )
        })
        .await
    }
}

/// A policy that allows every call, for suites about something else.
pub const ALLOW_ALL: &str = "package agentmesh.authz\n\ndecision := true\n";

/// Writes a file in one step (write, then rename), as an operator's tooling would, so that a
/// watcher never reads half of it.
pub fn write_file(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("a parent directory")).expect("directory");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// A control server's config directory: `mesh.yaml` and an allow-all policy in `policy/`.
pub fn write_mesh(conf: &Path, mesh_yaml: &str) {
    write_file(&conf.join("policy/authz.rego"), ALLOW_ALL);
    write_file(&conf.join("mesh.yaml"), mesh_yaml);
}
