//! `cargo xtask setup`: installs what nattrace's build and tests need, idempotently.
//!
//! - rust-src for the nightly toolchain (eBPF builds use `-Z build-std=core`);
//! - bpf-linker 0.13, built against the nightly's own libLLVM (Debian's LLVM is too old),
//!   with the `llvm-NN` feature picked from the nightly's LLVM major version;
//! - cargo-fuzz, built with the nightly (fuzzing needs the nightly's sanitizer flags);
//! - the Debian packages the tests and the demo use.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::StatusOk as _;

const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Debian packages: ip and netns (iproute2), nft (nftables), conntrack (conntrack-tools),
/// setpriv and unshare (util-linux) for the privilege and mount-namespace tests, and g++ for
/// the fuzz targets (libfuzzer-sys compiles libFuzzer).
const DEBIAN_PACKAGES: &[&str] = &["iproute2", "nftables", "conntrack", "util-linux", "g++"];

pub fn run() -> anyhow::Result<()> {
    ensure_nightly_with_rust_src()?;
    ensure_bpf_linker()?;
    ensure_cargo_fuzz()?;
    ensure_debian_packages("setup", DEBIAN_PACKAGES)?;
    Ok(())
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map_or_else(|| home().join(".cargo"), PathBuf::from)
        .join("bin")
}

/// PATH with cargo's bin directory (where bpf-linker is installed) in front.
pub fn path_with_cargo_bin() -> OsString {
    let mut paths = vec![cargo_bin()];
    if let Some(p) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(paths).expect("PATH entries contain no separator")
}

/// Runs `cmd` and gives its standard output; a failure carries its standard error.
pub(crate) fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    ))
}

fn ensure_nightly_with_rust_src() -> anyhow::Result<()> {
    if nightly_sysroot().is_err() {
        eprintln!("xtask: setup: installing the nightly toolchain");
        Command::new("rustup")
            .args(["toolchain", "install", "nightly", "--profile", "minimal"])
            .status_ok()?;
    }
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        return Ok(());
    }
    eprintln!("xtask: setup: installing rust-src for the nightly");
    let added = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "nightly"])
        .status_ok();
    if let Err(e) = added {
        // Offline fallback: the component kept beside the repository (../shared/toolchain).
        let kept = crate::workspace_root().join("../shared/toolchain");
        let tarball = std::fs::read_dir(&kept)
            .ok()
            .and_then(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .find(|p| p.to_string_lossy().contains("rust-src"))
            })
            .ok_or(e)?;
        eprintln!(
            "xtask: setup: rustup failed, installing {}",
            tarball.display()
        );
        let tmp = std::env::temp_dir().join("nattrace-rust-src");
        std::fs::create_dir_all(&tmp)?;
        Command::new("tar")
            .arg("-xJf")
            .arg(&tarball)
            .arg("-C")
            .arg(&tmp)
            .status_ok()?;
        let dir = std::fs::read_dir(&tmp)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("install.sh").exists());
        let dir = dir.context("rust-src archive has no install.sh")?;
        Command::new("sh")
            .arg(dir.join("install.sh"))
            .arg(format!("--prefix={}", sysroot.display()))
            .arg("--components=rust-src")
            .status_ok()?;
    }
    Ok(())
}

/// The nightly's LLVM major version, from `rustc +nightly -vV`.
fn nightly_llvm_major() -> anyhow::Result<u32> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    parse_llvm_major(&vv).context("`rustc +nightly -vV` names no LLVM version")
}

fn parse_llvm_major(vv: &str) -> Option<u32> {
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))?
        .trim();
    version.split('.').next()?.parse().ok()
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let installed = cargo_bin().join("bpf-linker");
    if let Ok(v) = output(Command::new(&installed).arg("--version"))
        && v.contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    let major = nightly_llvm_major()?;
    let lib = nightly_sysroot()?.join("lib");
    // The nightly ships libLLVM as `libLLVM.so.<major>.<minor>-rust-<version>`.
    let prefix = format!("libLLVM.so.{major}.");
    let libllvm = std::fs::read_dir(&lib)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .with_context(|| format!("no {prefix}* in {}", lib.display()))?;
    let llvm_prefix = home().join(".cache/nattrace/bpf-llvm");
    let llvm_lib = llvm_prefix.join("lib");
    std::fs::create_dir_all(&llvm_lib)?;
    let name = libllvm.file_name().expect("has a name");
    link(&libllvm, &llvm_lib.join(name))?;
    link(Path::new(name), &llvm_lib.join("libLLVM.so"))?;
    eprintln!(
        "xtask: setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major}"
    );
    Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &llvm_prefix)
        .status_ok()
}

/// cargo-fuzz, installed with the nightly (`cargo +nightly fuzz …` is how `cargo xtask fuzz`
/// runs it). `--locked`: the versions of its dependencies it was released with.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let installed = cargo_bin().join("cargo-fuzz");
    if let Ok(v) = output(Command::new(&installed).arg("--version"))
        && v.split_whitespace().nth(1) == Some(CARGO_FUZZ_VERSION)
    {
        return Ok(());
    }
    eprintln!("xtask: setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} with the nightly");
    Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ])
        .env("PATH", path_with_cargo_bin())
        .status_ok()
}

fn link(target: &Path, at: &Path) -> anyhow::Result<()> {
    if std::fs::read_link(at).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(target, at).with_context(|| format!("symlink {}", at.display()))
}

/// Installs those of `packages` that dpkg does not list as installed (apt-get, once);
/// `task` names the xtask task in the message.
pub(crate) fn ensure_debian_packages(task: &str, packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_ok_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "xtask: {task}: installing Debian packages {}",
        missing.join(" ")
    );
    Command::new("apt-get")
        .args(["update", "-qq"])
        .status_ok()?;
    Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_comes_from_rustc_verbose_version() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(parse_llvm_major(vv), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0\n"), None);
    }
}
