//! Developer and CI tasks for nattrace. `cargo xtask setup | build | test | fuzz | demo | bench | vm-test`.
//!
//! Every task that needs the toolchain or system packages runs `setup` first; `setup` is
//! idempotent and does only what is missing.

mod fuzz;
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "nattrace developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what building and testing need: rust-src for the nightly, bpf-linker built
    /// against the nightly's own LLVM, and Debian packages (iproute2, nftables, conntrack, …).
    Setup,
    /// Build the `nattrace` binary (release), eBPF programs included.
    Build,
    /// Everything CI runs: formatting, clippy, unit tests, fuzzing (NATTRACE_FUZZ_SECONDS per
    /// target, default 60; 0 skips it), privileged end-to-end tests, then the VM matrix of
    /// `vm-test` when qemu-system-x86_64 is installed (NATTRACE_VM=0 skips it).
    Test {
        /// Skip the end-to-end tests and the VM matrix (they need root and network namespaces).
        #[arg(long)]
        no_e2e: bool,
    },
    /// Run the fuzz targets of fuzz/ (cargo-fuzz, nightly) for a while each; fails on a crash
    /// and names the file the crashing input was saved in.
    Fuzz {
        /// Seconds each target runs for (0 skips fuzzing).
        #[arg(long, env = fuzz::SECONDS_ENV, default_value_t = fuzz::DEFAULT_SECONDS)]
        seconds: u64,
        /// Targets to run (default: all of them).
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(fuzz::TARGETS))]
        targets: Vec<String>,
    },
    /// The main job on the embedded default: a network-namespace CGNAT lab with the agent,
    /// traffic, and an investigator's questions answered.
    Demo,
    /// Measure the agent's per-binding cost against decoding alone, and the NAT's
    /// new-binding rate with and without the tracer, each in the same run.
    Bench,
    /// The end-to-end capture check inside Debian kernels (trixie 6.12, bookworm 6.1,
    /// bullseye 5.10) under qemu; prints one line per kernel and backend.
    VmTest {
        /// Kernels to test (default: all of them).
        #[arg(long = "kernel", value_parser = clap::builder::PossibleValuesParser::new(vm::KERNEL_NAMES))]
        kernels: Vec<String>,
        /// Also measure the cost of tracing per backend in each guest (new bindings per
        /// second with and without the agent, ring throughput: tests/tests/cost.rs).
        #[arg(long)]
        measure: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let started = Instant::now();
    match cli.task {
        Task::Setup => setup::run()?,
        Task::Build => {
            setup::run()?;
            build_release()?;
        }
        Task::Test { no_e2e } => test(no_e2e)?,
        Task::Fuzz { seconds, targets } => {
            setup::run()?;
            fuzz::run(seconds, &targets)?;
        }
        Task::Demo => {
            require_root("demo")?;
            setup::run()?;
            let bin = build_release()?;
            nattrace_e2e::demo::run(&bin)?;
        }
        Task::VmTest { kernels, measure } => {
            require_root("vm-test")?;
            setup::run()?;
            vm::run(&kernels, measure)?;
        }
        Task::Bench => {
            require_root("bench")?;
            setup::run()?;
            let bin = build_release()?;
            step("agent hot path (per binding, against decode only)", || {
                cargo(&["bench", "-p", "tracer-user", "--bench", "agent_path"]).status_ok()
            })?;
            step(
                "segment format: size, ingest, point queries at 100M bindings (long)",
                || cargo(&["bench", "-p", "tracer-user", "--bench", "segment_format"]).status_ok(),
            )?;
            step("NAT new-binding rate with and without the agent", || {
                cargo(&[
                    "run",
                    "--release",
                    "--quiet",
                    "-p",
                    "nattrace-e2e",
                    "--bin",
                    "nat-rate",
                ])
                .env("NATTRACE_BIN", &bin)
                .status_ok()
            })?;
        }
    }
    eprintln!("xtask: done in {:.0?}", started.elapsed());
    Ok(())
}

fn test(no_e2e: bool) -> anyhow::Result<()> {
    let fuzz_seconds = fuzz::seconds_from_env()?;
    setup::run()?;
    step("cargo fmt --check", || {
        cargo(&["fmt", "--all", "--check"]).status_ok()?;
        // The fuzz crate is a workspace of its own.
        cargo(&[
            "fmt",
            "--all",
            "--check",
            "--manifest-path",
            "fuzz/Cargo.toml",
        ])
        .status_ok()
    })?;
    step("cargo clippy", || {
        cargo(&["clippy", "--all-targets", "--", "-D", "warnings"]).status_ok()?;
        // The fuzz crate, sharing the workspace's target directory so that its dependencies
        // (tracer-user among them) are not checked twice.
        cargo(&[
            "clippy",
            "--manifest-path",
            "fuzz/Cargo.toml",
            "--target-dir",
            "target",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .status_ok()
    })?;
    step("unit tests", || {
        // Unit tests of every crate; the privileged end-to-end tests are #[ignore]d here.
        cargo(&["test", "--workspace", "--exclude", "tracer-ebpf"]).status_ok()
    })?;
    step(
        "segment format benchmark, smoke size (keeps it working)",
        || {
            cargo(&[
                "bench",
                "-p",
                "tracer-user",
                "--bench",
                "segment_format",
                "--",
                "--smoke",
                "--cold",
                "0",
            ])
            .status_ok()
        },
    )?;
    // Each fuzz target for NATTRACE_FUZZ_SECONDS (default 60; 0 skips).
    fuzz::run(fuzz_seconds, &[])?;
    if no_e2e {
        eprintln!("xtask: end-to-end tests skipped (--no-e2e)");
        return Ok(());
    }
    require_root("test (end-to-end part)")?;
    // Decided before the long part, so that a bad value fails at once.
    let vm = vm_matrix_wanted()?;
    let bin = build_release()?;
    step("end-to-end tests", || {
        // The privileged tests are #[ignore]d so that a plain `cargo test` runs anywhere;
        // here they run, one at a time (they share the machine's CPUs and conntrack sysctls).
        cargo(&[
            "test",
            "--release",
            "-p",
            "nattrace-e2e",
            "--",
            "--ignored",
            "--test-threads=1",
        ])
        .env("NATTRACE_BIN", &bin)
        .status_ok()
    })?;
    match vm {
        Ok(()) => step("VM matrix (vm-test, every kernel)", || vm::run(&[], false)),
        Err(why) => {
            eprintln!("xtask: VM matrix (vm-test) skipped: {why}");
            Ok(())
        }
    }
}

const VM_ENV: &str = "NATTRACE_VM";

/// Whether `cargo xtask test` runs the VM matrix: `Err(why not)` when NATTRACE_VM=0, or when
/// qemu-system-x86_64 is not on PATH and NATTRACE_VM=1 does not ask for it anyway (vm-test
/// installs qemu and its other host packages itself).
fn vm_matrix_wanted() -> anyhow::Result<Result<(), String>> {
    let qemu = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()));
    vm_decision(std::env::var(VM_ENV).ok().as_deref(), qemu)
}

fn vm_decision(env: Option<&str>, qemu: bool) -> anyhow::Result<Result<(), String>> {
    match env.map(str::trim) {
        Some("0") => Ok(Err(format!("{VM_ENV}=0"))),
        Some("1") => Ok(Ok(())),
        None | Some("") if qemu => Ok(Ok(())),
        None | Some("") => Ok(Err(
            "qemu-system-x86_64 is not installed (NATTRACE_VM=1 runs it anyway: vm-test \
             installs qemu-system-x86 and its other host packages)"
                .to_string(),
        )),
        Some(other) => bail!("{VM_ENV}={other}: expected 0 (skip the VM matrix) or 1 (run it)"),
    }
}

fn build_release() -> anyhow::Result<PathBuf> {
    step("build nattrace (release)", || {
        cargo(&["build", "--release", "-p", "tracer-user"]).status_ok()
    })?;
    let bin = workspace_root().join("target/release/nattrace");
    if !bin.exists() {
        bail!("build succeeded but {} is missing", bin.display());
    }
    Ok(bin)
}

fn step(name: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    eprintln!("xtask: == {name}");
    let t = Instant::now();
    f().with_context(|| format!("{name} failed"))?;
    eprintln!("xtask: == {name}: ok in {:.0?}", t.elapsed());
    Ok(())
}

fn require_root(task: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "`cargo xtask {task}` creates network namespaces and loads eBPF programs: run it as root"
        );
    }
    Ok(())
}

/// The workspace root (xtask lives one level below it).
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

/// A cargo command run from the workspace root with `~/.cargo/bin` on PATH (for bpf-linker).
fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(args)
        .current_dir(workspace_root())
        .env("PATH", setup::path_with_cargo_bin());
    cmd
}

/// Runs a command and fails unless it exits 0.
pub(crate) trait StatusOk {
    fn status_ok(&mut self) -> anyhow::Result<()>;
}

impl StatusOk for Command {
    fn status_ok(&mut self) -> anyhow::Result<()> {
        let status = self
            .status()
            .with_context(|| format!("cannot start {self:?}"))?;
        if !status.success() {
            bail!("{self:?} exited with {status}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_matrix_decision() {
        assert_eq!(vm_decision(None, true).unwrap(), Ok(()));
        assert_eq!(vm_decision(Some("1"), true).unwrap(), Ok(()));
        assert!(vm_decision(Some("0"), true).unwrap().is_err());
        let why = vm_decision(None, false).unwrap().unwrap_err();
        assert!(why.contains("qemu-system-x86_64"), "{why}");
        assert_eq!(vm_decision(Some("1"), false).unwrap(), Ok(()));
        assert!(vm_decision(Some("yes"), true).is_err());
    }
}
