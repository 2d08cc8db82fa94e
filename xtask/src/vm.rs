//! `cargo xtask vm-test`: the end-to-end capture check inside Debian kernels under qemu.
//!
//! Per kernel: resolve the newest `linux-image-*-cloud-amd64-unsigned` of its ABI series from
//! the Debian indexes (main and security suites), download it into a persistent cache
//! (`~/.cache/nattrace/vm`, never pruned; the newest cached package is used when offline),
//! extract it, build an initramfs (busybox-static, the netfilter module closure, the host's
//! ip/nft/conntrack/sysctl/tar with their `ldd` closure, the release `nattrace` and the e2e
//! `capture` test executable), boot it (TCG; KVM only if a probe boot works) and read the
//! `NATTRACE-VM-RESULT` lines the guest's /init prints on the serial console.
//!
//! Notes from the spike (notes/issue4-spike.md): qemu 7.2 TCG needs `-cpu max,-cx16`;
//! Debian's busybox-static prefers its own applets, so host tools are called by full path in
//! the init script; the packages ship no modules.dep (dependencies come from `.modinfo`) and
//! trixie's modules are `.ko.xz` (decompressed on the host, busybox insmod cannot).

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::setup::output;
use crate::{StatusOk as _, cargo, step, workspace_root};

/// A Debian kernel of the matrix.
struct Kernel {
    /// `--kernel` name.
    name: &'static str,
    /// (archive base URL, suite) pairs searched for the package.
    suites: &'static [(&'static str, &'static str)],
    /// Package name = prefix + ABI number or version + suffix.
    prefix: &'static str,
    suffix: &'static str,
}

const DEBIAN: &str = "http://deb.debian.org/debian";
const SECURITY: &str = "http://deb.debian.org/debian-security";

const KERNELS: &[Kernel] = &[
    Kernel {
        name: "trixie",
        suites: &[(DEBIAN, "trixie"), (SECURITY, "trixie-security")],
        prefix: "linux-image-6.12.",
        suffix: "+deb13-cloud-amd64-unsigned",
    },
    Kernel {
        name: "bookworm",
        suites: &[(DEBIAN, "bookworm"), (SECURITY, "bookworm-security")],
        prefix: "linux-image-6.1.0-",
        suffix: "-cloud-amd64-unsigned",
    },
    Kernel {
        name: "bullseye",
        suites: &[(DEBIAN, "bullseye"), (SECURITY, "bullseye-security")],
        prefix: "linux-image-5.10.0-",
        suffix: "-cloud-amd64-unsigned",
    },
];

/// Names accepted by `--kernel`.
pub const KERNEL_NAMES: &[&str] = &["trixie", "bookworm", "bullseye"];

/// Backends of the issue's table, in its column order.
const BACKENDS: &[&str] = &["netfilter", "fentry", "kprobe"];

/// Host packages the VM run needs.
const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
    "curl",
    "binutils",
];

/// Modules the lab needs; their `depends=` closure is added.
const MODULES: &[&str] = &[
    "nf_conntrack",
    "nf_nat",
    "nf_tables",
    "nft_chain_nat",
    "nft_masq",
    "nft_ct",
    "nf_conntrack_netlink",
    "nfnetlink",
    "veth",
    "nf_conntrack_ipv6",
    "nf_nat_ipv6",
    "nft_nat",
    "nft_fib_inet",
    "nft_fib_ipv4",
    "nft_fib_ipv6",
];

/// Host binaries copied into the guest (with their ldd closure); the test runs them via PATH.
const HOST_TOOLS: &[&str] = &[
    "/usr/sbin/ip",
    "/usr/sbin/nft",
    "/usr/sbin/conntrack",
    "/usr/sbin/sysctl",
    "/usr/bin/tar",
    "/usr/bin/setpriv",
    "/usr/bin/unshare",
];

const TIMEOUT_ENV: &str = "NATTRACE_VM_TIMEOUT";
const ACCEL_ENV: &str = "NATTRACE_VM_ACCEL";

pub fn run(names: &[String]) -> anyhow::Result<()> {
    crate::setup::ensure_debian_packages("vm-test", HOST_PACKAGES)?;
    let kernels: Vec<&Kernel> = if names.is_empty() {
        KERNELS.iter().collect()
    } else {
        names
            .iter()
            .map(|n| {
                KERNELS
                    .iter()
                    .find(|k| k.name == n)
                    .with_context(|| format!("unknown kernel {n}"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let bins = build_binaries()?;
    let timeout = Duration::from_secs(match std::env::var(TIMEOUT_ENV) {
        Ok(s) => s
            .parse()
            .with_context(|| format!("{TIMEOUT_ENV}={s} is not seconds"))?,
        Err(_) => 1200,
    });
    let mut accel: Option<&'static str> = match std::env::var(ACCEL_ENV).as_deref() {
        Ok("kvm") => Some("kvm"),
        Ok("tcg") => Some("tcg"),
        _ => None,
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut failed = false;
    for k in kernels {
        let t = Instant::now();
        let outcome = run_kernel(k, &bins, timeout, &mut accel);
        let wall = t.elapsed();
        match outcome {
            Ok(mut r) => {
                for row in &mut r {
                    row.wall = wall;
                    failed |= row.is_failure();
                }
                rows.extend(r);
            }
            Err(e) => {
                eprintln!("xtask: vm-test {}: {e:#}", k.name);
                failed = true;
                rows.push(Row {
                    kernel: k.name.to_string(),
                    backend: "netfilter",
                    checked: 0,
                    result: format!("error: {e:#}"),
                    expected: true,
                    wall,
                });
            }
        }
    }
    println!("vm-test matrix (kernel, backend, bindings checked, result, wall time per kernel):");
    for r in &rows {
        println!(
            "  {:<48} {:<10} {:>5}  {}  [{:.0?}]",
            r.kernel, r.backend, r.checked, r.result, r.wall
        );
    }
    if failed {
        bail!(
            "vm-test: an expected backend failed (see the matrix above and target/vm/*/serial.log)"
        );
    }
    Ok(())
}

struct Row {
    kernel: String,
    backend: &'static str,
    checked: u64,
    result: String,
    /// The table says "yes" and this build implements the backend.
    expected: bool,
    wall: Duration,
}

impl Row {
    fn is_failure(&self) -> bool {
        self.expected && self.result != "pass"
    }
}

struct Binaries {
    nattrace: PathBuf,
    capture: PathBuf,
    /// Backends the `nattrace` binary offers (`run --help` mentions them).
    backends: Vec<&'static str>,
}

fn build_binaries() -> anyhow::Result<Binaries> {
    let nattrace = crate::build_release()?;
    let mut capture = None;
    step("build the e2e capture test (release)", || {
        let out = cargo(&[
            "test",
            "--release",
            "-p",
            "nattrace-e2e",
            "--test",
            "capture",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
        if !out.status.success() {
            bail!("cargo test --no-run failed");
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["reason"] == "compiler-artifact"
                && v["target"]["name"] == "capture"
                && let Some(exe) = v["executable"].as_str()
            {
                capture = Some(PathBuf::from(exe));
            }
        }
        Ok(())
    })?;
    let capture = capture.context("cargo named no executable for the capture test")?;
    let help = output(Command::new(&nattrace).args(["run", "--help"]))?;
    let backends = BACKENDS
        .iter()
        .copied()
        .filter(|b| *b == "netfilter" || help.contains(b))
        .collect();
    Ok(Binaries {
        nattrace,
        capture,
        backends,
    })
}

fn run_kernel(
    k: &Kernel,
    bins: &Binaries,
    timeout: Duration,
    accel: &mut Option<&'static str>,
) -> anyhow::Result<Vec<Row>> {
    let work = workspace_root().join("target/vm").join(k.name);
    fs::create_dir_all(&work)?;
    let deb = fetch_kernel(k)?;
    let pkg = work.join("pkg");
    let stamp = work.join("pkg.from");
    let deb_name = deb
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    if fs::read_to_string(&stamp).ok().as_deref() != Some(deb_name.as_str()) {
        step(&format!("{}: extract {deb_name}", k.name), || {
            let _ = fs::remove_dir_all(&pkg);
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(&pkg)
                .status_ok()?;
            fs::write(&stamp, &deb_name)?;
            Ok(())
        })?;
    }
    let modroot = ["lib/modules", "usr/lib/modules"]
        .iter()
        .filter_map(|d| fs::read_dir(pkg.join(d)).ok())
        .flat_map(|d| d.flatten().map(|e| e.path()))
        .next()
        .context("no lib/modules/KVER in the kernel package")?;
    let kver = modroot
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let vmlinuz = pkg.join(format!("boot/vmlinuz-{kver}"));
    let initrd = work.join("initrd.cpio.gz");
    step(&format!("{}: initramfs for {kver}", k.name), || {
        build_initramfs(&work, &modroot, bins, &initrd)
    })?;
    if accel.is_none() {
        *accel = Some(probe_kvm(&vmlinuz, &initrd, &work));
    }
    let accel = accel.unwrap_or("tcg");
    let log = work.join("serial.log");
    // Keep the previous run's console for comparison (TCG timing varies between runs).
    let _ = fs::rename(&log, work.join("serial.prev.log"));
    let mut rows = Vec::new();
    step(
        &format!(
            "{}: boot {kver} under {accel}, run the capture test",
            k.name
        ),
        || {
            let ok = boot(&vmlinuz, &initrd, &log, accel, "", timeout, None)?;
            let text = fs::read_to_string(&log).unwrap_or_default();
            let mut seen = HashSet::new();
            for line in text.lines() {
                let Some(rest) = line
                    .trim_end_matches('\r')
                    .split("NATTRACE-VM-RESULT ")
                    .nth(1)
                else {
                    continue;
                };
                let f: BTreeMap<&str, &str> = rest
                    .split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .collect();
                let backend = BACKENDS
                    .iter()
                    .copied()
                    .find(|b| Some(b) == f.get("backend"))
                    .unwrap_or("netfilter");
                if !seen.insert(backend) {
                    continue;
                }
                let res = *f.get("result").unwrap_or(&"?");
                let reason = f.get("reason").copied().unwrap_or("");
                let result = match res {
                    "pass" => "pass".to_string(),
                    "skip" if reason == "needs-6.4" => {
                        "not offered by this kernel (needs 6.4)".to_string()
                    }
                    other => format!("{other} ({reason})"),
                };
                let kernel_ver = f.get("kernel").copied().unwrap_or(&kver).to_string();
                rows.push(Row {
                    expected: backend == "netfilter" && supports_netfilter_link(&kernel_ver),
                    kernel: kernel_ver,
                    backend,
                    checked: f.get("checked").and_then(|n| n.parse().ok()).unwrap_or(0),
                    result,
                    wall: Duration::ZERO,
                });
            }
            if rows.iter().any(Row::is_failure) || !seen.contains("netfilter") {
                // The test's failure report (Tally::finish panics with the first failures).
                let lines: Vec<&str> = text.lines().collect();
                let from = lines
                    .iter()
                    .position(|l| l.contains("panicked") || l.contains("check(s) failed"))
                    .unwrap_or(lines.len().saturating_sub(40));
                eprintln!(
                    "xtask: vm-test {}: failure lines from {}:",
                    k.name,
                    log.display()
                );
                for l in lines.iter().skip(from).take(60) {
                    eprintln!("  | {l}");
                }
            }
            if !seen.contains("netfilter") {
                rows.push(Row {
                    expected: supports_netfilter_link(&kver),
                    kernel: kver.clone(),
                    backend: "netfilter",
                    checked: 0,
                    result: if ok {
                        "fail (no result line in the serial log)".into()
                    } else {
                        format!("fail (timeout after {timeout:?}, no result line)")
                    },
                    wall: Duration::ZERO,
                });
            }
            Ok(())
        },
    )?;
    for b in BACKENDS.iter().copied().filter(|b| *b != "netfilter") {
        let result = if bins.backends.contains(&b) {
            "in this build, but vm-test does not run it yet".to_string()
        } else {
            "not in this build".to_string()
        };
        rows.push(Row {
            kernel: kver.clone(),
            backend: b,
            checked: 0,
            result,
            expected: false,
            wall: Duration::ZERO,
        });
    }
    eprintln!("xtask: vm-test {}: serial log {}", k.name, log.display());
    // The uname release names the ABI; the package version names the point release.
    let version = deb_name.split('_').nth(1).unwrap_or("?");
    for r in &mut rows {
        r.kernel = format!("{} ({version})", r.kernel);
    }
    Ok(rows)
}

/// The netfilter BPF link needs Linux 6.4.
fn supports_netfilter_link(kver: &str) -> bool {
    let mut it = kver.split(|c: char| !c.is_ascii_digit());
    let major: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (major, minor) >= (6, 4)
}

// ---------------------------------------------------------------- kernel packages

struct Pkg {
    name: String,
    version: String,
    url: String,
    filename: String,
    sha256: String,
}

fn cache_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map_or_else(|| PathBuf::from("/root"), PathBuf::from)
        .join(".cache/nattrace/vm")
}

/// The kernel package: the newest of the indexes, downloaded and verified; else the newest
/// cached one.
fn fetch_kernel(k: &Kernel) -> anyhow::Result<PathBuf> {
    let cache = cache_dir();
    fs::create_dir_all(&cache)?;
    let candidates = match resolve(k) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "xtask: vm-test {}: cannot resolve from the Debian indexes ({e:#}); trying the cache",
                k.name
            );
            Vec::new()
        }
    };
    // Newest first; an index can name a file its mirror no longer has (bullseye-security
    // did on 2026-11-22), so fall back to the next one.
    for p in &candidates {
        let dest = cache.join(&p.filename);
        if dest.exists() && sha256(&dest)? == p.sha256 {
            eprintln!(
                "xtask: vm-test {}: {} {} (cached)",
                k.name, p.name, p.version
            );
            return Ok(dest);
        }
        let got = step(
            &format!("{}: download {} {}", k.name, p.name, p.version),
            || {
                let tmp = cache.join(format!("{}.part", p.filename));
                Command::new("curl")
                    .args(["-fsSL", "--retry", "2", "-o"])
                    .arg(&tmp)
                    .arg(&p.url)
                    .status_ok()?;
                let sum = sha256(&tmp)?;
                if sum != p.sha256 {
                    let _ = fs::remove_file(&tmp);
                    bail!("SHA256 of {} is {sum}, the index says {}", p.url, p.sha256);
                }
                fs::rename(&tmp, &dest)?;
                Ok(())
            },
        );
        match got {
            Ok(()) => return Ok(dest),
            Err(e) => eprintln!("xtask: vm-test {}: {e:#}; trying the next one", k.name),
        }
    }
    newest_cached(k, &cache)
}

fn matches(k: &Kernel, name: &str) -> bool {
    name.strip_prefix(k.prefix)
        .and_then(|r| r.strip_suffix(k.suffix))
        .is_some_and(|mid| !mid.is_empty() && mid.chars().all(|c| c.is_ascii_digit()))
}

/// Every matching package of the indexes, newest first.
fn resolve(k: &Kernel) -> anyhow::Result<Vec<Pkg>> {
    let mut all: Vec<Pkg> = Vec::new();
    for (base, suite) in k.suites {
        let url = format!("{base}/dists/{suite}/main/binary-amd64/Packages.xz");
        let text = match output(Command::new("sh").args([
            "-c",
            "curl -fsSL --max-time 60 \"$1\" | xz -dc",
            "sh",
            &url,
        ])) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("xtask: vm-test {}: {url}: {e:#}", k.name);
                continue;
            }
        };
        for stanza in text.split("\n\n") {
            let field = |f: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(f).and_then(|r| r.strip_prefix(": ")))
                    .map(str::to_string)
            };
            let (Some(name), Some(version), Some(filename), Some(sha)) = (
                field("Package"),
                field("Version"),
                field("Filename"),
                field("SHA256"),
            ) else {
                continue;
            };
            if !matches(k, &name) {
                continue;
            }
            all.push(Pkg {
                url: format!("{base}/{filename}"),
                filename: filename.rsplit('/').next().unwrap_or(&filename).to_string(),
                name,
                version,
                sha256: sha,
            });
        }
    }
    if all.is_empty() {
        bail!("no {}N{} in the indexes", k.prefix, k.suffix);
    }
    all.sort_by(|a, b| {
        if version_gt(&a.version, &b.version) {
            std::cmp::Ordering::Less
        } else if version_gt(&b.version, &a.version) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    });
    all.dedup_by(|a, b| a.filename == b.filename);
    Ok(all)
}

fn version_gt(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .is_ok_and(|s| s.success())
}

fn newest_cached(k: &Kernel, cache: &Path) -> anyhow::Result<PathBuf> {
    let mut best: Option<(String, PathBuf)> = None;
    for e in fs::read_dir(cache)?.flatten() {
        let file = e.file_name().to_string_lossy().to_string();
        let Some(stem) = file.strip_suffix("_amd64.deb") else {
            continue;
        };
        let Some((name, version)) = stem.split_once('_') else {
            continue;
        };
        if matches(k, name) && best.as_ref().is_none_or(|(v, _)| version_gt(version, v)) {
            best = Some((version.to_string(), e.path()));
        }
    }
    let (_, p) = best
        .with_context(|| format!("no cached {}N{} in {}", k.prefix, k.suffix, cache.display()))?;
    eprintln!("xtask: vm-test {}: using cached {}", k.name, p.display());
    Ok(p)
}

fn sha256(p: &Path) -> anyhow::Result<String> {
    let out = output(Command::new("sha256sum").arg(p))?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

// ---------------------------------------------------------------- initramfs

fn build_initramfs(work: &Path, modroot: &Path, bins: &Binaries, out: &Path) -> anyhow::Result<()> {
    let root = work.join("root");
    let _ = fs::remove_dir_all(&root);
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "etc",
        "lib64",
        "mnt",
        "bb",
        "opt/nattrace",
        "lib/modules/load",
        "var",
    ] {
        fs::create_dir_all(root.join(d))?;
    }
    std::os::unix::fs::symlink("/run", root.join("var/run"))?;
    fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("copying /bin/busybox (busybox-static)")?;
    for tool in HOST_TOOLS {
        copy_with_libs(Path::new(tool), &root, Path::new(tool), false)?;
    }
    copy_with_libs(
        &bins.nattrace,
        &root,
        Path::new("/opt/nattrace/nattrace"),
        true,
    )?;
    copy_with_libs(
        &bins.capture,
        &root,
        Path::new("/opt/nattrace/capture"),
        true,
    )?;
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;

    // Modules, dependencies first (the packages have no modules.dep: read .modinfo).
    let mut by_name: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut stack = vec![modroot.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = e.file_name().to_string_lossy().split(".ko").next()
                && e.file_name().to_string_lossy().contains(".ko")
            {
                by_name.insert(n.replace('-', "_"), p);
            }
        }
    }
    let mut order: Vec<(String, Vec<u8>)> = Vec::new();
    let mut seen = HashSet::new();
    for m in MODULES {
        if by_name.contains_key(*m) {
            visit(m, &by_name, &mut seen, &mut order)?;
        }
    }
    let mut list = String::new();
    for (i, (n, blob)) in order.iter().enumerate() {
        let dst = format!("/lib/modules/load/{i:02}-{n}.ko");
        fs::write(root.join(&dst[1..]), blob)?;
        list.push_str(&dst);
        list.push('\n');
    }
    fs::write(root.join("modules.load"), list)?;

    let init = root.join("init");
    fs::write(&init, INIT)?;
    chmod_x(&init)?;
    let _ = fs::remove_file(out);
    Command::new("sh")
        .args([
            "-c",
            "cd \"$1\" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1 > \"$2\"",
            "sh",
        ])
        .arg(&root)
        .arg(out)
        .status_ok()?;
    let size = fs::metadata(out)?.len();
    eprintln!(
        "xtask: initramfs {} ({} modules, {:.1} MB)",
        out.display(),
        order.len(),
        size as f64 / 1e6
    );
    Ok(())
}

fn visit(
    name: &str,
    by_name: &BTreeMap<String, PathBuf>,
    seen: &mut HashSet<String>,
    order: &mut Vec<(String, Vec<u8>)>,
) -> anyhow::Result<()> {
    let name = name.replace('-', "_");
    if !seen.insert(name.clone()) {
        return Ok(());
    }
    let path = by_name
        .get(&name)
        .with_context(|| format!("module {name} is not in the package"))?;
    let blob = if path.extension().is_some_and(|e| e == "xz") {
        Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .context("xz -dc")?
            .stdout
    } else {
        fs::read(path)?
    };
    let key = b"\0depends=";
    if let Some(at) = blob.windows(key.len()).position(|w| w == key) {
        let rest = &blob[at + key.len()..];
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let deps = String::from_utf8_lossy(&rest[..end]).to_string();
        for d in deps.split(',').filter(|d| !d.is_empty()) {
            visit(d, by_name, seen, order)?;
        }
    }
    order.push((name, blob));
    Ok(())
}

/// Copies `src` to `root/dst` (stripped of debug info if `strip`) and its `ldd` closure to the
/// same paths as on the host.
fn copy_with_libs(src: &Path, root: &Path, dst: &Path, strip: bool) -> anyhow::Result<()> {
    let to = root.join(dst.strip_prefix("/").unwrap_or(dst));
    fs::create_dir_all(to.parent().expect("has a parent"))?;
    if strip {
        Command::new("strip")
            .args(["--strip-debug", "-o"])
            .arg(&to)
            .arg(src)
            .status_ok()?;
    } else {
        fs::copy(src, &to).with_context(|| format!("copying {}", src.display()))?;
    }
    let ldd = output(Command::new("ldd").arg(src))?;
    for lib in ldd
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(Path::new)
    {
        let lto = root.join(lib.strip_prefix("/").unwrap_or(lib));
        if lto.exists() {
            continue;
        }
        fs::create_dir_all(lto.parent().expect("has a parent"))?;
        fs::copy(lib, &lto).with_context(|| format!("copying {}", lib.display()))?;
    }
    Ok(())
}

fn chmod_x(p: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(p, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The guest's /init. Host tools by full path (busybox-static prefers its applets in `sh`);
/// the test itself finds them via PATH (Rust's Command uses execvp).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bb
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/bb
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /run; mount -t tmpfs tmp /tmp
mount -t bpf bpf /sys/fs/bpf; mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmp /dev/shm
/bb/hostname nattrace-vm
/bb/ip link set lo up 2>/dev/null
KVER=$(uname -r)
up() { cut -d' ' -f1 /proc/uptime; }
if grep -q nattrace.probe /proc/cmdline; then echo "NATTRACE-VM-PROBE ok $KVER"; poweroff -f; fi
echo "NATTRACE-VM-LOG init start, kernel $KVER at $(up)s"
for m in $(cat /modules.load); do insmod $m || echo "NATTRACE-VM-LOG insmod FAILED $m"; done
echo "NATTRACE-VM-LOG modules loaded at $(up)s"
MAJ=${KVER%%.*}; MIN=${KVER#*.}; MIN=${MIN%%.*}
if [ "$MAJ" -lt 6 ] || { [ "$MAJ" -eq 6 ] && [ "$MIN" -lt 4 ]; }; then
  echo "NATTRACE-VM-LOG netfilter BPF link needs 6.4; what nattrace says when asked to run:"
  mkdir -p /tmp/nt; timeout 60 /opt/nattrace/nattrace run --data-dir /tmp/nt 2>&1 | head -5
  echo "NATTRACE-VM-RESULT backend=netfilter kernel=$KVER checked=0 result=skip reason=needs-6.4"
else
  export NATTRACE_BIN=/opt/nattrace/nattrace
  T0=$(up)
  cd /tmp
  { /opt/nattrace/capture --ignored --test-threads=1 --nocapture; echo $? > /tmp/capture.rc; } 2>&1 | tee /tmp/capture.out
  RC=$(cat /tmp/capture.rc)
  T1=$(up)
  CHECKED=$(grep 'found (external, time, proto)' /tmp/capture.out | awk '{print $NF}' | tail -1)
  if [ $RC -eq 0 ]; then R=pass; REASON=ok; else R=fail; REASON=exit-$RC; fi
  echo "NATTRACE-VM-LOG capture test ran from ${T0}s to ${T1}s"
  echo "NATTRACE-VM-RESULT backend=netfilter kernel=$KVER checked=${CHECKED:-0} result=$R reason=$REASON"
fi
echo "NATTRACE-VM-LOG done at $(up)s"
poweroff -f
"#;

// ---------------------------------------------------------------- qemu

/// Boots the kernel; the serial console goes to `log`. Returns false on timeout.
fn boot(
    vmlinuz: &Path,
    initrd: &Path,
    log: &Path,
    accel: &str,
    extra_cmdline: &str,
    timeout: Duration,
    give_up_on: Option<&str>,
) -> anyhow::Result<bool> {
    let file = fs::File::create(log)?;
    let (accel_arg, cpu) = if accel == "kvm" {
        ("kvm", "host")
    } else {
        ("tcg,thread=single", "max,-cx16")
    };
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", accel_arg, "-cpu", cpu, "-smp", "2", "-m", "2048"])
        .args(["-nic", "none", "-nographic", "-no-reboot", "-kernel"])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet {extra_cmdline}"))
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let t = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(true);
        }
        let gave_up =
            give_up_on.is_some_and(|m| fs::read_to_string(log).is_ok_and(|text| text.contains(m)));
        if gave_up || t.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let mut f = fs::OpenOptions::new().append(true).open(log)?;
            writeln!(f, "\nxtask: qemu killed after {:.0?}", t.elapsed())?;
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// KVM if /dev/kvm exists and a probe boot reaches /init within 30 s; else TCG.
fn probe_kvm(vmlinuz: &Path, initrd: &Path, work: &Path) -> &'static str {
    if !Path::new("/dev/kvm").exists() {
        return "tcg";
    }
    let log = work.join("kvm-probe.log");
    let ok = boot(
        vmlinuz,
        initrd,
        &log,
        "kvm",
        "nattrace.probe",
        Duration::from_secs(30),
        Some("KVM internal error"),
    )
    .unwrap_or(false)
        && fs::read_to_string(&log).is_ok_and(|t| t.contains("NATTRACE-VM-PROBE ok"));
    eprintln!(
        "xtask: vm-test: KVM probe boot {} ({}); using {}",
        if ok { "worked" } else { "failed" },
        log.display(),
        if ok { "KVM" } else { "TCG" }
    );
    if ok { "kvm" } else { "tcg" }
}

// ---------------------------------------------------------------- host
