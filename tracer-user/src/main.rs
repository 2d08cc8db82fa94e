//! The `nattrace` command.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracer_user::{
    agent, audit_cli, coverage,
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
    /// Write one case's answer as a signed evidence bundle, with a proof for every record.
    Export(tracer_user::evidence::export::ExportArgs),
    /// Check a data directory (checksums, hashes, chain, signatures) or an evidence bundle
    /// offline; exit 0 only if intact.
    Verify(verify::VerifyArgs),
    /// Delete sealed segments older than a retention period, recording each in the ledger.
    Retention(retention::RetentionArgs),
    /// List the audit log of queries and exports, or check its hash chain and head (--verify).
    Audit(audit_cli::AuditArgs),
    /// Create an Ed25519 key pair for signing checkpoints (nattrace.key and nattrace.pub).
    Keygen(tracer_user::keygen::KeygenArgs),
    /// Add a signature by a second key to every checkpoint of a data directory.
    Cosign(tracer_user::cosign::CosignArgs),
    /// Show which kernel features exist, which backend `nattrace run` would use, and why.
    Probe(tracer_user::probe::ProbeArgs),
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
        Command::Export(args) => tracer_user::evidence::export::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Retention(args) => retention::run(args),
        Command::Audit(args) => audit_cli::run(args),
        Command::Keygen(args) => tracer_user::keygen::run(args),
        Command::Cosign(args) => tracer_user::cosign::run(args),
        Command::Probe(args) => tracer_user::probe::run(args),
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
