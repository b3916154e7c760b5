//! `agentmesh`, the mesh's command line: `policy test` (run a directory's `test_` rules, like
//! `opa test`), `policy eval` (decide one input and show the rules that had a value), `tap`
//! (a sidecar's calls as they end), `top` (per-destination rates, latency and spend) and
//! `registry ls|show|search` (the control server's agents) and `token create` (join tokens).

mod policy;
mod registry;
mod up;
mod watch;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "agentmesh", version, about = "The agentmesh command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole local mesh demo: control server, mock LLM, MCP tool servers, three agents
    /// with their sidecars, and a sample conversation; stays up until Ctrl-C.
    Up(up::UpArgs),
    /// Write, test and try Rego policies.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Watch a sidecar's calls as they end: source, target, model or tool, decision, tokens,
    /// cost, latency.
    Tap(watch::TapArgs),
    /// Per-destination request rate, success, denials, p50/p99 latency, tokens/s and spend, live.
    Top(watch::TopArgs),
    /// The control server's agent registry: list, show, search.
    #[command(subcommand)]
    Registry(registry::RegistryCommand),
    /// Join tokens: the credential of an agent's first SVID.
    #[command(subcommand)]
    Token(registry::TokenCommand),
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Up(args) => runtime().and_then(|rt| rt.block_on(up::up(args))),
        Command::Policy(cmd) => policy::run(cmd),
        Command::Tap(args) => runtime().and_then(|rt| rt.block_on(watch::tap(args))),
        Command::Top(args) => runtime().and_then(|rt| rt.block_on(watch::top(args))),
        Command::Registry(cmd) => runtime().and_then(|rt| rt.block_on(registry::run(cmd))),
        Command::Token(cmd) => runtime().and_then(|rt| rt.block_on(registry::token(cmd))),
    };
    match code {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("agentmesh: {e:#}");
            std::process::exit(2);
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
