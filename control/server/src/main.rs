//! `agentmesh-control`: loads the config directory, then serves discovery (15010) and the
//! registry API (15012) until SIGINT or SIGTERM.

use agentmesh_control::authority::Authority;
use agentmesh_control::control::Control;
use agentmesh_control::registry::Registry;
use agentmesh_control::serve::{run, Listeners};
use agentmesh_control::source::DirSource;
use agentmesh_control::tls::write_secret;
use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "agentmesh-control",
    version,
    about = "agentmesh control server: discovery and agent registry"
)]
struct Args {
    /// Directory of YAML files declaring agents, upstreams, policies and secrets (watched).
    #[arg(long, env = "AGENTMESH_CONTROL_CONFIG")]
    config_dir: PathBuf,
    /// Where the root CA, the admin token and API registrations are kept.
    #[arg(
        long,
        default_value = ".agentmesh/control",
        env = "AGENTMESH_CONTROL_STATE"
    )]
    state_dir: PathBuf,
    /// Discovery service (gRPC).
    #[arg(long, default_value = "127.0.0.1:15010", env = "AGENTMESH_CONTROL_XDS")]
    xds: SocketAddr,
    /// Registry API (HTTPS).
    #[arg(long, default_value = "127.0.0.1:15012", env = "AGENTMESH_CONTROL_API")]
    api: SocketAddr,
    /// How long the X.509-SVIDs the CA signs live (sidecars renew at half-life).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, env = "AGENTMESH_SVID_TTL")]
    svid_ttl: std::time::Duration,
    /// Only validate the config directory and exit (0 if valid).
    #[arg(long)]
    check: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AGENTMESH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = main_inner() {
        eprintln!("agentmesh-control: {e:#}");
        std::process::exit(2);
    }
}

fn main_inner() -> anyhow::Result<()> {
    let args = Args::parse();
    let source = DirSource {
        dir: args.config_dir.clone(),
    };
    if args.check {
        use agentmesh_control::source::ConfigSource;
        let c = source.load().map_err(anyhow::Error::msg)?;
        println!(
            "{}: ok ({} agents, {} upstreams, {} policies, {} secrets)",
            args.config_dir.display(),
            c.agents.len(),
            c.upstreams.len(),
            c.policies.len(),
            c.secrets.len()
        );
        return Ok(());
    }
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("cannot create {}", args.state_dir.display()))?;
    let authority = Authority::open(&args.state_dir).map_err(anyhow::Error::msg)?;
    let signer = std::sync::Arc::new(
        agentmesh_control::tokens::Signer::load_or_create(&args.state_dir)
            .map_err(anyhow::Error::msg)?,
    );
    let token_file = args.state_dir.join("admin-token");
    let token = match std::fs::read_to_string(&token_file) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            let t: String = {
                use rand::Rng;
                let bytes: [u8; 24] = rand::thread_rng().gen();
                bytes.iter().map(|b| format!("{b:02x}")).collect()
            };
            write_secret(&token_file, t.as_bytes()).map_err(anyhow::Error::msg)?;
            t
        }
    };
    let registry =
        Registry::open(Some(args.state_dir.join("registry.json"))).map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let control = Control::start(Box::new(source), registry).map_err(anyhow::Error::msg)?;
        let listeners = Listeners::bind(args.xds, args.api)
            .await
            .context("cannot bind the control server's ports")?;
        tracing::info!(
            xds = %listeners.xds.local_addr()?,
            api = %listeners.api.local_addr()?,
            ca = %args.state_dir.join("ca.pem").display(),
            "agentmesh-control serving"
        );
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
            tracing::info!("shutting down");
        };
        run(
            control,
            authority,
            signer,
            args.svid_ttl,
            token,
            listeners,
            shutdown,
        )
        .await
        .map_err(anyhow::Error::msg)
    })
}
