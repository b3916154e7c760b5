//! `mcp-tools`: the sample MCP tool server (see `mcp_server`).

use agentmesh_agent_runtime::{mcp_server, serve};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "mcp-tools",
    about = "Sample MCP tool server (Streamable HTTP, both revisions)"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9200")]
    listen: std::net::SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    serve::serve(mcp_server::router(), args.listen, None).await?;
    Ok(())
}
