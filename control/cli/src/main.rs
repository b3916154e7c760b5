//! `agentmesh`, the mesh's command line. Today: `policy test` (run a directory's `test_` rules,
//! like `opa test`) and `policy eval` (decide one input and show the rules that had a value).

mod policy;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "agentmesh", version, about = "The agentmesh command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write, test and try Rego policies.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Policy(cmd) => policy::run(cmd),
    };
    match code {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("agentmesh: {e:#}");
            std::process::exit(2);
        }
    }
}
