//! `cargo xtask fuzz [--seconds N] [TARGET...]`: runs the cargo-fuzz targets of `fuzz/`
//! (libFuzzer, AddressSanitizer, nightly) for N seconds each, and fails on the first crash,
//! timeout or memory blow-up, naming the file libFuzzer saved the input in.
//!
//! Corpora: `fuzz/corpus/TARGET` (grown by libFuzzer, not checked in) and the seeds, which
//! libFuzzer only reads: `fuzz/seeds/TARGET` (checked in), the files `make_seeds` writes into
//! `fuzz/target/seeds/TARGET`, and for `segment_decoder` the format fixtures of tracer-user.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

use anyhow::{Context as _, bail};

use crate::{StatusOk as _, setup, step, workspace_root};

/// The fuzz targets (`fuzz/fuzz_targets/*.rs`).
pub const TARGETS: &[&str] = &[
    "segment_decoder",
    "import_csv",
    "import_conntrack",
    "bundle_verify",
];
/// Seconds each target runs for by default.
pub const DEFAULT_SECONDS: u64 = 60;
/// Overrides the seconds per target in `cargo xtask test` (0 skips fuzzing).
pub const SECONDS_ENV: &str = "NATTRACE_FUZZ_SECONDS";
/// libFuzzer's limit on the target's resident memory: above it the input is a failure.
const RSS_LIMIT_MB: u32 = 2048;
/// libFuzzer's limit on one input's run time, seconds.
const INPUT_TIMEOUT_S: u32 = 10;

/// libFuzzer's limit on a single allocation, MB (above it the input is a failure): the RSS
/// limit, but lower for targets whose inputs never need a large one.
fn malloc_limit_mb(target: &str) -> u32 {
    match target {
        // Bundles of some KB: reserving hundreds of MB for one is a bug (a header's size
        // taken on trust), which can abort `nattrace verify` where memory is not overcommitted.
        "bundle_verify" => 256,
        _ => RSS_LIMIT_MB,
    }
}

/// Seconds per target for `cargo xtask test`: [`SECONDS_ENV`] if set, else the default.
pub fn seconds_from_env() -> anyhow::Result<u64> {
    match std::env::var(SECONDS_ENV) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{SECONDS_ENV}={v:?} is not a number of seconds")),
        Err(std::env::VarError::NotPresent) => Ok(DEFAULT_SECONDS),
        Err(e) => Err(e).with_context(|| format!("{SECONDS_ENV} is not valid")),
    }
}

/// Builds the fuzz targets and runs each of `targets` (all when empty) for `seconds`.
pub fn run(seconds: u64, targets: &[String]) -> anyhow::Result<()> {
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    if let Some(t) = targets.iter().find(|t| !TARGETS.contains(t)) {
        bail!(
            "no fuzz target {t:?}; the targets are {}",
            TARGETS.join(", ")
        );
    }
    if seconds == 0 {
        eprintln!("xtask: fuzzing skipped (0 seconds per target)");
        return Ok(());
    }
    let fuzz = workspace_root().join("fuzz");
    step("build the fuzz targets (cargo +nightly fuzz build)", || {
        // Every bin of the fuzz crate: the targets and make_seeds, with the same flags.
        cargo_fuzz().arg("build").status_ok()
    })?;
    let generated = fuzz.join("target/seeds");
    step("write the generated seeds (make_seeds)", || {
        Command::new(
            fuzz.join("target")
                .join(host_triple()?)
                .join("release/make_seeds"),
        )
        .arg(&generated)
        .status_ok()
    })?;
    for target in targets {
        step(&format!("fuzz {target} for {seconds} s"), || {
            fuzz_one(&fuzz, &generated, target, seconds)
        })?;
    }
    Ok(())
}

/// `cargo +nightly fuzz …` from the workspace root, with `~/.cargo/bin` on PATH (for
/// cargo-fuzz and, in tracer-user's build script, bpf-linker).
fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz"])
        .current_dir(workspace_root())
        .env("PATH", setup::path_with_cargo_bin())
        // The stable toolchain of `cargo xtask` must not leak into the nightly build.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER");
    cmd
}

/// The host's target triple: cargo-fuzz builds for it, into `fuzz/target/TRIPLE/release`.
fn host_triple() -> anyhow::Result<String> {
    let out = Command::new("rustc")
        .args(["+nightly", "-vV"])
        .output()
        .context("cannot run rustc +nightly -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host:"))
        .map(|h| h.trim().to_owned())
        .context("`rustc +nightly -vV` names no host")
}

fn fuzz_one(fuzz: &Path, generated: &Path, target: &str, seconds: u64) -> anyhow::Result<()> {
    let corpus = fuzz.join("corpus").join(target);
    std::fs::create_dir_all(&corpus)
        .with_context(|| format!("cannot create {}", corpus.display()))?;
    // libFuzzer adds what it finds to the first directory and only reads the others.
    let mut dirs = vec![corpus];
    dirs.push(fuzz.join("seeds").join(target));
    dirs.push(generated.join(target));
    if target == "segment_decoder" {
        dirs.push(workspace_root().join("tracer-user/tests/fixtures"));
    }
    dirs.retain(|d| d.is_dir());
    let artifacts = fuzz.join("artifacts").join(target);
    let started = SystemTime::now();
    let result = cargo_fuzz()
        .args(["run", target])
        .args(&dirs)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-malloc_limit_mb={}", malloc_limit_mb(target)))
        .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
        .arg("-print_final_stats=1")
        .status_ok();
    if let Err(e) = result {
        let saved = new_files(&artifacts, started);
        if saved.is_empty() {
            return Err(e.context(format!(
                "fuzz target {target} failed (no input saved in {})",
                artifacts.display()
            )));
        }
        for f in &saved {
            eprintln!(
                "xtask: fuzz target {target} failed on the input saved at {}\n\
                 xtask:   reproduce: cargo +nightly fuzz run {target} {}",
                f.display(),
                f.display()
            );
        }
        let list: Vec<String> = saved.iter().map(|f| f.display().to_string()).collect();
        return Err(e.context(format!(
            "fuzz target {target} failed; input saved at {}",
            list.join(", ")
        )));
    }
    Ok(())
}

/// Files of `dir` modified since `since` (the inputs libFuzzer saved during this run).
fn new_files(dir: &Path, since: SystemTime) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= since)
        })
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_has_a_source_file() {
        for t in TARGETS {
            let src = workspace_root()
                .join("fuzz/fuzz_targets")
                .join(format!("{t}.rs"));
            assert!(src.is_file(), "{}", src.display());
        }
    }
}
