//! Harness for the end-to-end suites: starts the real binaries (sidecar, mock LLM, MCP server) on
//! free loopback ports, writes sidecar configs, and reads access logs. Processes die with the
//! harness values that own them.

pub mod control;
pub mod echo;
pub mod otlp;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the workspace's binaries (`AGENTMESH_BIN_DIR`, else `target/debug`).
pub fn bin_dir() -> PathBuf {
    std::env::var_os("AGENTMESH_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"))
}

fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A file or directory under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// `N` distinct free loopback ports: held open together while chosen, so that no two are the
/// same (one `free_port` after another can return a port twice).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("bound").port())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn(name: &str, args: &[&str], log: &Path) -> Proc {
    spawn_with_env(name, args, &[], log)
}

pub fn spawn_with_env(name: &str, args: &[&str], env: &[(&str, &str)], log: &Path) -> Proc {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    let child = Command::new(bin_dir().join(name))
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name} from {}: {e}", bin_dir().display()));
    Proc(child)
}

/// Polls `url` until it answers 2xx.
pub async fn wait_ok(url: &str) {
    wait_ok_or(url, None).await
}

/// `wait_ok`, showing `log` (the process's output) if it never comes up.
pub async fn wait_ok_or(url: &str, log: Option<&Path>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = reqwest::get(url).await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{url} did not come up{}",
            log.map(|l| format!(": {}", std::fs::read_to_string(l).unwrap_or_default()))
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!(
            "agentmesh-{tag}-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fixture server (mock LLM or MCP tools) on a free port.
pub struct Fixture {
    pub port: u16,
    _proc: Proc,
}

impl Fixture {
    /// The mock LLM's count of API requests received (`/debug/stats`).
    pub async fn requests(&self) -> u64 {
        let v: serde_json::Value = reqwest::get(self.url("/debug/stats"))
            .await
            .expect("stats")
            .json()
            .await
            .expect("json");
        v["requests"].as_u64().unwrap_or(0)
    }

    pub async fn mock_llm(dir: &Scratch, extra: &[&str]) -> Fixture {
        Self::start("mock-llm", dir, extra).await
    }
    pub async fn mcp_tools(dir: &Scratch) -> Fixture {
        Self::start("mcp-tools", dir, &[]).await
    }
    async fn start(name: &str, dir: &Scratch, extra: &[&str]) -> Fixture {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["--listen", listen.as_str()];
        args.extend_from_slice(extra);
        let proc = spawn(name, &args, &dir.path(&format!("{name}-{port}.log")));
        let tls = extra.contains(&"--tls-cert");
        if tls {
            // Wait for the port rather than an HTTP answer: its certificate is the test's own.
            let deadline = Instant::now() + Duration::from_secs(20);
            while tokio::net::TcpStream::connect(&listen).await.is_err() {
                assert!(Instant::now() < deadline, "{name} did not come up");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else {
            wait_ok(&format!("http://{listen}/healthz")).await;
        }
        Fixture { port, _proc: proc }
    }
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// A running sidecar with its config file and access log.
pub struct Sidecar {
    pub outbound: u16,
    pub admin: u16,
    pub inbound: u16,
    pub config: PathBuf,
    pub access_log: PathBuf,
    pub proc: Proc,
}

impl Sidecar {
    /// The listener block for fresh ports; `body` adds upstreams and other sections.
    /// Without a `policy:` section in `body`, the sidecar gets an allow-all policy: the
    /// data-plane suites are about proxying; the policy suites bring their own.
    pub fn config_text(outbound: u16, admin: u16, inbound: u16, body: &str) -> String {
        Self::config_text_for("tester", outbound, admin, inbound, body)
    }

    /// `config_text` for another agent. A config with a `control:` section gets its policy
    /// from the control server, so no default policy is added to it.
    pub fn config_text_for(
        agent: &str,
        outbound: u16,
        admin: u16,
        inbound: u16,
        body: &str,
    ) -> String {
        let policy = if body.contains("policy:") || body.contains("control:") {
            String::new()
        } else {
            format!(
                "policy: {{path: \"{}\"}}\n",
                fixture("policy-allow-all").display()
            )
        };
        format!(
            "agent: {{name: {agent}}}\nlisteners: {{outbound: \"127.0.0.1:{outbound}\", admin: \"127.0.0.1:{admin}\", inbound: \"127.0.0.1:{inbound}\"}}\n{policy}{body}"
        )
    }

    pub async fn start(dir: &Scratch, body: &str) -> Sidecar {
        Self::start_with_env(dir, body, &[]).await
    }

    /// Starts with extra environment variables (e.g. `SSL_CERT_FILE` for the system roots).
    pub async fn start_with_env(dir: &Scratch, body: &str, env: &[(&str, &str)]) -> Sidecar {
        let [outbound, admin, inbound] = free_ports::<3>();
        let config = dir.path("sidecar.yaml");
        std::fs::write(&config, Self::config_text(outbound, admin, inbound, body))
            .expect("write config");
        Self::run(dir, config, (outbound, admin, inbound), env).await
    }

    /// Starts the sidecar of `agent`, with a config written by `body(outbound, admin, inbound)`
    /// (which may name its ports, e.g. in `inbound`).
    pub async fn start_agent(
        dir: &Scratch,
        agent: &str,
        body: impl Fn(u16, u16, u16) -> String,
    ) -> Sidecar {
        let [outbound, admin, inbound] = free_ports::<3>();
        let config = dir.path("sidecar.yaml");
        let text = Self::config_text_for(
            agent,
            outbound,
            admin,
            inbound,
            &body(outbound, admin, inbound),
        );
        std::fs::write(&config, text).expect("write config");
        Self::run(dir, config, (outbound, admin, inbound), &[]).await
    }

    /// Starts the sidecar again on its config file and ports (after `proc` was killed).
    pub async fn restart(&mut self, dir: &Scratch) {
        let _ = self.proc.0.kill();
        let _ = self.proc.0.wait();
        let again = Self::run(
            dir,
            self.config.clone(),
            (self.outbound, self.admin, self.inbound),
            &[],
        )
        .await;
        *self = again;
    }

    async fn run(
        dir: &Scratch,
        config: PathBuf,
        (outbound, admin, inbound): (u16, u16, u16),
        env: &[(&str, &str)],
    ) -> Sidecar {
        let access_log = dir.path("access.jsonl");
        let proc = spawn_with_env(
            "agentmesh-proxy",
            &[
                "--config",
                config.to_str().unwrap_or_default(),
                "--access-log",
                access_log.to_str().unwrap_or_default(),
                "--decision-log",
                dir.path("decisions.jsonl").to_str().unwrap_or_default(),
            ],
            env,
            &dir.path("sidecar.log"),
        );
        wait_ok_or(
            &format!("http://127.0.0.1:{admin}/readyz"),
            Some(&dir.path("sidecar.log")),
        )
        .await;
        Sidecar {
            outbound,
            admin,
            inbound,
            config,
            access_log,
            proc,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.outbound)
    }

    /// Replaces the config file in one step (write + rename), as an operator's tooling would.
    pub fn rewrite(&self, body: &str) {
        let tmp = self.config.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).expect("tmp config");
        f.write_all(Self::config_text(self.outbound, self.admin, self.inbound, body).as_bytes())
            .expect("write");
        drop(f);
        std::fs::rename(&tmp, &self.config).expect("rename");
    }

    pub async fn config_dump(&self) -> serde_json::Value {
        reqwest::get(format!("http://127.0.0.1:{}/config_dump", self.admin))
            .await
            .expect("admin answers")
            .json()
            .await
            .expect("json")
    }

    /// Waits until `/config_dump` satisfies `pred`.
    pub async fn wait_dump(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let d = self.config_dump().await;
            if pred(&d) {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "config never reached the expected state: {d}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn calls(&self) -> Vec<serde_json::Value> {
        json_lines(&self.access_log)
    }

    /// The decision log's entries so far (`decisions.jsonl` beside the config).
    pub fn decisions(&self) -> Vec<serde_json::Value> {
        json_lines(&self.config.with_file_name("decisions.jsonl"))
    }

    /// Waits for at least `n` access-log lines (written as each call ends).
    pub async fn wait_calls(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let c = self.calls();
            if c.len() >= n || Instant::now() > deadline {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// POSTs a JSON body with extra headers: the status and the body as text.
pub async fn post_text(
    url: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> (u16, String) {
    let mut r = reqwest::Client::new().post(url).json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.expect("the server answers");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

/// POSTs a JSON body with extra headers: the status and the JSON answer (null if it is not JSON).
pub async fn post_json(
    url: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let (status, text) = post_text(url, headers, body).await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}
