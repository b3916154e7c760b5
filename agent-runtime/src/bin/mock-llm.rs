//! `mock-llm`: the deterministic OpenAI/Anthropic-compatible provider (see `mock_llm`).

use agentmesh_agent_runtime::{mock_llm, serve};
use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "mock-llm",
    about = "Deterministic OpenAI/Anthropic-compatible LLM for tests and demos"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: std::net::SocketAddr,
    /// YAML script of replies and tool calls (`rules: [{match, reply | tool_call}]`).
    #[arg(long)]
    script: Option<PathBuf>,
    /// Serve TLS (h2 and http/1.1 by ALPN) with this PEM certificate chain...
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// ...and this PEM private key.
    #[arg(long)]
    tls_key: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let script = match &args.script {
        Some(p) => serde_yaml::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        None => mock_llm::Script::default(),
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(serve::TlsFiles { cert, key }),
        _ => None,
    };
    serve::serve(mock_llm::router(script), args.listen, tls).await?;
    Ok(())
}
