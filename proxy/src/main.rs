//! `agentmesh-proxy`: the sidecar binary. Loads and validates the bootstrap file, then serves.

use agentmesh_proxy::accesslog::Format;
use agentmesh_proxy::logging::{LogControl, LogFormat};
use agentmesh_proxy::server::{build, RunOptions};
use agentmesh_proxy::state::Desired;
use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;

mod allocator;

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
    /// Rotate the access and decision log files once they reach this size (`100MiB`, `1GB`,
    /// `0` never): FILE becomes FILE.1, FILE.1 becomes FILE.2, and so on.
    #[arg(long, default_value = "100MiB", value_parser = parse_size, env = "AGENTMESH_LOG_MAX_SIZE")]
    log_max_size: u64,
    /// Rotated log files kept (FILE.1 ... FILE.N).
    #[arg(long, default_value_t = 5, env = "AGENTMESH_LOG_MAX_FILES")]
    log_max_files: usize,
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
    let (desired, bootstrap, pushed) = match Desired::startup(&args.config) {
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
        rotation: agentmesh_proxy::linesink::Rotation {
            max_bytes: args.log_max_size,
            keep: args.log_max_files,
        },
        log: Some(log),
    };
    match build(desired, bootstrap, pushed, &opts) {
        Ok(server) => server.run_forever(),
        Err(e) => {
            eprintln!("agentmesh-proxy: {e:#}");
            std::process::exit(1);
        }
    }
}

/// A size: bytes, or with a KB/MB/GB (powers of 1000) or KiB/MiB/GiB (of 1024) suffix.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let at = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(at);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 100MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(super::parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(super::parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(super::parse_size("512"), Ok(512));
        assert_eq!(super::parse_size("0"), Ok(0));
        assert!(super::parse_size("10 parsecs")
            .unwrap_err()
            .contains("parsecs"));
    }
}
