//! The `nattrace` command.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracer_user::{
    agent, coverage,
    exit::{Status, UserError},
    import, query, retention, stats, verify,
};

/// Records every NAT binding of this host and answers "who held this public address and
/// port at that time". See README.md.
#[derive(Debug, Parser)]
#[command(name = "nattrace", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Capture NAT bindings in this network namespace and write them to the data directory.
    Run(agent::RunArgs),
    /// Find bindings by external address and port at a time, or by subscriber over a window.
    Query(query::QueryArgs),
    /// List when capture was running, and every loss, over a window.
    Coverage(coverage::CoverageArgs),
    /// Summarise a data directory: bindings, open bindings, losses, segments, bytes.
    Stats(stats::StatsArgs),
    /// Import bindings from CSV or `conntrack -E` text into a data directory.
    Import(import::ImportArgs),
    /// Check every segment's checksums, hashes and the hash chain; exit 0 only if intact.
    Verify(verify::VerifyArgs),
    /// Delete sealed segments older than a retention period, recording each in the ledger.
    Retention(retention::RetentionArgs),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => agent::run(args),
        Command::Query(args) => query::run(args),
        Command::Coverage(args) => coverage::run(args),
        Command::Stats(args) => stats::run(args),
        Command::Import(args) => import::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Retention(args) => retention::run(args),
    };
    match result {
        Ok(status) => ExitCode::from(status as u8),
        Err(error) => {
            // One line: the cause and what to do. A UserError carries its own status;
            // anything else is an environment problem.
            if let Some(user) = error.chain().find_map(|e| e.downcast_ref::<UserError>()) {
                eprintln!("nattrace: {user}");
                ExitCode::from(user.status as u8)
            } else {
                eprintln!("nattrace: {error:#}");
                ExitCode::from(Status::Environment as u8)
            }
        }
    }
}
