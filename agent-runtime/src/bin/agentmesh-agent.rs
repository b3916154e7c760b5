//! `agentmesh-agent`: runs a thin agent from its manifest. It serves A2A on the manifest's
//! `listen` address (its sidecar's `inbound.forward_to`), makes every call through its sidecar,
//! keeps its tasks in the manifest's store and resumes the open ones when it starts.

use agentmesh_agent_runtime::agent::{self, Agent};
use agentmesh_agent_runtime::clock::Clock;
use agentmesh_agent_runtime::manifest::Manifest;
use agentmesh_agent_runtime::runner::Runner;
use agentmesh_agent_runtime::store::Store;
use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "agentmesh-agent",
    about = "Run a thin agent (LLM + tools) behind its agentmesh sidecar"
)]
struct Args {
    /// The agent's manifest (YAML).
    #[arg(long, short)]
    manifest: PathBuf,
    /// Check the manifest and exit.
    #[arg(long)]
    check: bool,
    /// Test clock: a file holding the current time in unix milliseconds (task timestamps and
    /// question expiry read it).
    #[arg(long)]
    clock_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let manifest = match Manifest::load(&args.manifest) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if args.check {
        println!("{}: ok", args.manifest.display());
        return Ok(());
    }
    let listen = manifest.listen.with_context(|| {
        format!(
            "{}: field `listen` is required to serve A2A",
            args.manifest.display()
        )
    })?;
    let store_path = manifest.store.clone().unwrap_or_default();
    if let Some(dir) = store_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let store = Store::open(&store_path)?;
    let clock = args.clock_file.map_or(Clock::System, Clock::File);
    let name = manifest.name.clone();
    let card_url = manifest
        .card_url
        .clone()
        .unwrap_or_else(|| format!("http://{listen}/"));
    let runner = Arc::new(Runner::new(manifest, store).with_clock(clock));
    let agent = Agent::new(runner, card_url);
    let resumed = agent.resume()?;
    tracing::info!(agent = %name, %listen, store = %store_path.display(), resumed, "agent started");
    tokio::spawn(agent::push_notifications(agent.clone()));
    agentmesh_agent_runtime::serve::serve(agent::router(agent), listen, None).await?;
    Ok(())
}
