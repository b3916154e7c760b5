//! `agentmesh-proxy`: the sidecar binary. Loads and validates the bootstrap file, then serves.

use agentmesh_proxy::accesslog::Format;
use agentmesh_proxy::logging::{LogControl, LogFormat};
use agentmesh_proxy::server::{build, RunOptions};
use agentmesh_proxy::state::Desired;
use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(name = "agentmesh-proxy", version, about = "agentmesh sidecar proxy")]
struct Args {
    /// YAML bootstrap file (reloaded on SIGHUP and on change).
    #[arg(long, short, env = "AGENTMESH_CONFIG")]
    config: PathBuf,
    /// Worker threads.
    #[arg(long, default_value_t = 2, env = "AGENTMESH_THREADS")]
    threads: usize,
    /// Access log: `stdout`, `off`, or a file path.
    #[arg(long, default_value = "stdout", env = "AGENTMESH_ACCESS_LOG")]
    access_log: String,
    /// Access log line format.
    #[arg(
        long,
        value_enum,
        default_value = "json",
        env = "AGENTMESH_ACCESS_LOG_FORMAT"
    )]
    access_log_format: Format,
    /// Where decision logs go (one OPA-shaped JSON line per policy evaluation): `stdout`,
    /// `off` or a file path.
    #[arg(long, default_value = "off", env = "AGENTMESH_DECISION_LOG")]
    decision_log: String,
    /// Format of the sidecar's own log lines on stderr (filter: `AGENTMESH_LOG`).
    #[arg(long, value_enum, default_value = "text", env = "AGENTMESH_LOG_FORMAT")]
    log_format: LogFormat,
    /// Only validate the config file and exit (0 if valid).
    #[arg(long)]
    check: bool,
}

fn main() {
    let args = Args::parse();
    let filter = std::env::var("AGENTMESH_LOG").ok();
    let log = Arc::new(LogControl::init(args.log_format, filter.as_deref()));
    let desired = match Desired::load(&args.config) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("agentmesh-proxy: invalid config: {e}");
            std::process::exit(2);
        }
    };
    if args.check {
        match &desired.policy {
            Some(p) => println!(
                "{}: ok (policy {} compiled, {} modules)",
                args.config.display(),
                p.revision(),
                p.modules().len()
            ),
            None => println!(
                "{}: ok (no policy: every call will be denied)",
                args.config.display()
            ),
        }
        return;
    }
    let config = &desired.config;
    tracing::info!(
        agent = %config.agent.name,
        outbound = %config.listeners.outbound,
        admin = %config.listeners.admin,
        upstreams = config.upstreams.len(),
        "starting agentmesh-proxy"
    );
    // The effective config, defaults filled in, for whoever reads the start-up log.
    for u in &config.upstreams {
        tracing::info!(
            upstream = %u.name,
            endpoints = ?u.endpoints,
            connect_timeout = ?u.timeouts.connect,
            read_timeout = ?u.timeouts.read,
            retries = u.retries.attempts,
            "upstream"
        );
    }
    let opts = RunOptions {
        config_path: args.config,
        threads: args.threads,
        access_log: args.access_log,
        access_log_format: args.access_log_format,
        decision_log: args.decision_log,
        log: Some(log),
    };
    match build(desired, &opts) {
        Ok(server) => server.run_forever(),
        Err(e) => {
            eprintln!("agentmesh-proxy: {e:#}");
            std::process::exit(1);
        }
    }
}

/// jemalloc, as ztunnel and linkerd2-proxy use: per call, glibc malloc+free cost 89k instructions
/// (5x the bare pingora proxy's) once policy values fragmented its heap (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
