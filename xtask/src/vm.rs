//! `cargo xtask vm-test`: the end-to-end capture check inside Debian kernels under qemu, once
//! per capture backend each kernel must offer.
//!
//! Per kernel: resolve the newest `linux-image-*-cloud-amd64-unsigned` of its ABI series from
//! the Debian indexes (main and security suites), download it into a persistent cache
//! (`~/.cache/nattrace/vm`, never pruned; the newest cached package is used when offline),
//! extract it, build an initramfs (busybox-static, the netfilter module closure, the host's
//! ip/nft/conntrack/sysctl/tar with their `ldd` closure, the release `nattrace` and the e2e
//! `capture` test executable), boot it once (TCG; KVM only if a probe boot works) and read the
//! `NATTRACE-VM-RESULT` lines the guest's /init prints on the serial console.
//!
//! What each kernel must offer is the issue's table ([`Kernel::offers`]); which backends this
//! build has comes from `nattrace run --help`. In the guest, /init prints
//! `nattrace probe --format json`, runs the capture test with `NATTRACE_BACKEND` set for
//! every backend that is "yes" and in the build (with `NATTRACE_E2E_SLACK` and
//! `NATTRACE_E2E_SCALE` for TCG), and records what `nattrace run --backend X` says for every
//! "no" that is in the build (it must refuse). A "yes" that does not pass, is not in the build
//! or has no result line is a failure; so is a "no" that nattrace starts anyway.
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
    /// What the kernel must offer, per backend of [`BACKENDS`] (the issue's table).
    offers: [Offer; 3],
}

/// One cell of the issue's table: a backend the kernel must offer, or one it cannot, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Offer {
    /// Must pass the capture test; a skip is a failure.
    Yes,
    /// Not offered, for this reason; `nattrace run --backend X` must refuse to start.
    No(&'static str),
}

const NEEDS_6_4: &str = "the BPF netfilter link needs Linux >= 6.4";
const NO_MODULE_BTF: &str = "no module BTF: fentry cannot attach to nf_nat/nf_conntrack \
    functions before Linux 5.11 / without CONFIG_DEBUG_INFO_BTF_MODULES";

const DEBIAN: &str = "http://deb.debian.org/debian";
const SECURITY: &str = "http://deb.debian.org/debian-security";

const KERNELS: &[Kernel] = &[
    Kernel {
        name: "trixie",
        suites: &[(DEBIAN, "trixie"), (SECURITY, "trixie-security")],
        prefix: "linux-image-6.12.",
        suffix: "+deb13-cloud-amd64-unsigned",
        offers: [Offer::Yes, Offer::Yes, Offer::Yes],
    },
    Kernel {
        name: "bookworm",
        suites: &[(DEBIAN, "bookworm"), (SECURITY, "bookworm-security")],
        prefix: "linux-image-6.1.0-",
        suffix: "-cloud-amd64-unsigned",
        offers: [Offer::No(NEEDS_6_4), Offer::Yes, Offer::Yes],
    },
    Kernel {
        name: "bullseye",
        suites: &[(DEBIAN, "bullseye"), (SECURITY, "bullseye-security")],
        prefix: "linux-image-5.10.0-",
        suffix: "-cloud-amd64-unsigned",
        offers: [Offer::No(NEEDS_6_4), Offer::No(NO_MODULE_BTF), Offer::Yes],
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
    // The cost measurement's named counter (`counter name "flood"`); built in on 6.12.
    "nft_objref",
    "nft_counter",
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
/// Forwarded to the guest's capture test when set on the host; else the VM defaults below.
const SLACK_ENV: &str = "NATTRACE_E2E_SLACK";
const SCALE_ENV: &str = "NATTRACE_E2E_SCALE";
/// Time limits of the capture test x3 under TCG. Its slowest live answer against the nominal
/// 1 s: 0.97-1.16 s (netfilter, trixie, before the slack existed: one run passed only because
/// the last query started in time), then with x2: 1.18 s (netfilter, trixie), 1.71 s (fentry,
/// trixie) and 1.44 s (fentry, bookworm) on the shared 2-core machine. x2 left 15 % margin.
const VM_SLACK: &str = "3";
/// A quarter of the bulk traffic: 102 live + 240 bulk = 342 bindings per backend (the issue
/// asks for at least 200); the per-binding queries after the run dominate under TCG.
const VM_SCALE: &str = "0.25";
/// The guest stops one backend's capture test after this long (busybox `timeout`). A run took
/// 87-89 s under TCG on the 2-core CI machine; six runs at this bound still fit `cargo xtask
/// test` in an hour.
const RUN_TIMEOUT_SECS: u64 = 300;
/// The guest stops the cost measurement (`--measure`) after this long.
const COST_TIMEOUT_SECS: u64 = 900;

/// Runs the matrix on the named kernels (all when empty); `measure` adds the cost
/// measurement in each guest and prints its lines.
pub fn run(names: &[String], measure: bool) -> anyhow::Result<()> {
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
    let timeout = match std::env::var(TIMEOUT_ENV) {
        Ok(s) => {
            Some(Duration::from_secs(s.parse().with_context(|| {
                format!("{TIMEOUT_ENV}={s} is not seconds")
            })?))
        }
        Err(_) => None,
    };
    let guest_env = GuestEnv {
        slack: env_or(SLACK_ENV, VM_SLACK),
        scale: env_or(SCALE_ENV, VM_SCALE),
        measure,
    };
    eprintln!(
        "xtask: vm-test: backends in this build: {}; guest {SLACK_ENV}={} {SCALE_ENV}={}",
        bins.backends.join(", "),
        guest_env.slack,
        guest_env.scale
    );
    let mut accel: Option<&'static str> = match std::env::var(ACCEL_ENV).as_deref() {
        Ok("kvm") => Some("kvm"),
        Ok("tcg") => Some("tcg"),
        _ => None,
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    for k in kernels {
        let t = Instant::now();
        let outcome = run_kernel(k, &bins, timeout, &guest_env, &mut accel);
        let wall = t.elapsed();
        match outcome {
            Ok(r) => {
                notes.push(format!(
                    "  {:<10} {} [kernel total: fetch, initramfs, boot to poweroff {:.0?}]",
                    k.name, r.probe, wall
                ));
                rows.extend(r.rows);
            }
            Err(e) => {
                eprintln!("xtask: vm-test {}: {e:#}", k.name);
                rows.push(Row {
                    kernel: k.name.to_string(),
                    backend: "-",
                    checked: 0,
                    result: format!("error: {e:#}"),
                    failure: true,
                    seconds: None,
                });
            }
        }
    }
    println!(
        "vm-test matrix (kernel, backend, bindings checked, result, seconds the backend's run took in the guest):"
    );
    for r in &rows {
        let secs = r
            .seconds
            .map_or_else(String::new, |s| format!("  [{s:.1} s]"));
        println!(
            "  {:<42} {:<10} {:>5}  {}{}{secs}",
            r.kernel,
            r.backend,
            r.checked,
            if r.failure { "FAILURE: " } else { "" },
            r.result
        );
    }
    println!("nattrace probe in each guest (its choice for `--backend auto`):");
    for n in &notes {
        println!("{n}");
    }
    if measure {
        println!("cost of tracing in each guest (tests/tests/cost.rs; NATTRACE-COST lines):");
        for k in KERNELS {
            let log = workspace_root()
                .join("target/vm")
                .join(k.name)
                .join("serial.log");
            for line in fs::read_to_string(&log).unwrap_or_default().lines() {
                if let Some(at) = line.find("NATTRACE-COST ") {
                    println!("  {:<10} {}", k.name, &line[at..]);
                }
            }
        }
    }
    let failures = rows.iter().filter(|r| r.failure).count();
    if failures > 0 {
        bail!(
            "vm-test: {failures} row(s) of the matrix failed (see above and target/vm/*/serial.log)"
        );
    }
    Ok(())
}

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// Settings of the capture test in the guest.
struct GuestEnv {
    slack: String,
    scale: String,
    /// Run the cost measurement (tests/tests/cost.rs) over the kernel's backends.
    measure: bool,
}

struct Row {
    kernel: String,
    backend: &'static str,
    checked: u64,
    result: String,
    /// A "yes" of the table that did not pass, a "no" that nattrace did not refuse, or an
    /// infrastructure error.
    failure: bool,
    /// How long the backend's run took in the guest.
    seconds: Option<f64>,
}

/// What the guest does with one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// The capture test with `NATTRACE_BACKEND` set.
    Run,
    /// Record what `nattrace run --backend X` says (it must refuse), for this reason.
    Refuse(&'static str),
    /// The binary does not know the backend; a failure when the table says "yes".
    NotInBuild(Offer),
}

fn plan(offer: Offer, in_build: bool) -> Plan {
    match (offer, in_build) {
        (Offer::Yes, true) => Plan::Run,
        (Offer::No(reason), true) => Plan::Refuse(reason),
        (o, false) => Plan::NotInBuild(o),
    }
}

/// One `NATTRACE-VM-RESULT` line of the guest.
#[derive(Debug, Default, PartialEq)]
struct GuestResult {
    kernel: Option<String>,
    checked: u64,
    result: String,
    reason: String,
    seconds: Option<f64>,
    slowest: Option<String>,
}

/// Parses `… NATTRACE-VM-RESULT backend=B key=value …` into (backend, result).
fn parse_result_line(line: &str) -> Option<(String, GuestResult)> {
    let rest = line
        .trim_end_matches('\r')
        .split("NATTRACE-VM-RESULT ")
        .nth(1)?;
    let f: BTreeMap<&str, &str> = rest
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let backend = (*f.get("backend")?).to_string();
    Some((
        backend,
        GuestResult {
            kernel: f.get("kernel").map(|s| (*s).to_string()),
            checked: f.get("checked").and_then(|n| n.parse().ok()).unwrap_or(0),
            result: f.get("result").copied().unwrap_or("?").to_string(),
            reason: f.get("reason").copied().unwrap_or("").to_string(),
            seconds: f.get("seconds").and_then(|n| n.parse().ok()),
            slowest: f
                .get("slowest")
                .filter(|s| !s.is_empty() && **s != "-")
                .map(|s| (*s).to_string()),
        },
    ))
}

/// The row's result text and whether it is a failure. `guest` is the backend's result line,
/// if the guest printed one; `boot_ok` is false when qemu was killed at its timeout.
fn judge(plan: Plan, guest: Option<&GuestResult>, boot_ok: bool) -> (String, bool) {
    let missing = || {
        if boot_ok {
            "no result line in the serial log".to_string()
        } else {
            "qemu timed out before the result line".to_string()
        }
    };
    match (plan, guest) {
        (Plan::NotInBuild(Offer::Yes), _) => ("not in this build".into(), true),
        (Plan::NotInBuild(Offer::No(reason)), _) => {
            (format!("no ({reason}); not in this build"), false)
        }
        (Plan::Run, Some(g)) if g.result == "pass" => {
            let slowest = g
                .slowest
                .as_ref()
                .map_or_else(String::new, |s| format!(" (slowest live answer {s})"));
            (format!("pass{slowest}"), false)
        }
        (Plan::Run, Some(g)) => (format!("{} ({})", g.result, g.reason), true),
        (Plan::Run, None) => (format!("fail ({})", missing()), true),
        (Plan::Refuse(reason), Some(g)) if g.result == "refused" => (
            format!("no ({reason}); nattrace run refused it ({})", g.reason),
            false,
        ),
        (Plan::Refuse(reason), Some(g)) => (
            format!(
                "no ({reason}), but nattrace run did not refuse it: {} ({})",
                g.result, g.reason
            ),
            true,
        ),
        (Plan::Refuse(reason), None) => (format!("no ({reason}); {}", missing()), true),
    }
}

/// The backends `nattrace run --help` lists as possible values of `--backend`
/// (`[possible values: a, b]`, or clap's long form `- a: …` lines).
fn backends_in_help(help: &str) -> Vec<String> {
    let Some(at) = help.find("--backend") else {
        return Vec::new();
    };
    let section = &help[at..];
    // Up to the next option.
    let end = section[1..].find("\n  -").map_or(section.len(), |e| e + 1);
    let section = &section[..end];
    if let Some(p) = section.find("[possible values: ") {
        let list = &section[p + "[possible values: ".len()..];
        let list = &list[..list.find(']').unwrap_or(list.len())];
        return list
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
    }
    section
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- "))
        .filter_map(|l| l.split(':').next())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty() && !v.contains(' '))
        .collect()
}

/// The e2e test executables the guest runs: the capture test and the ring-overflow test per
/// backend, the cost measurement with `--measure`.
const GUEST_TESTS: [&str; 3] = ["capture", "ring_loss", "cost"];

struct Binaries {
    nattrace: PathBuf,
    capture: PathBuf,
    ring_loss: PathBuf,
    cost: PathBuf,
    /// Backends the `nattrace` binary offers (`run --help` lists them).
    backends: Vec<String>,
}

fn build_binaries() -> anyhow::Result<Binaries> {
    let nattrace = crate::build_release()?;
    let mut exes: BTreeMap<String, PathBuf> = BTreeMap::new();
    step("build the e2e tests run in the guest (release)", || {
        let mut args = vec!["test", "--release", "-p", "nattrace-e2e"];
        for t in GUEST_TESTS {
            args.extend(["--test", t]);
        }
        args.extend(["--no-run", "--message-format=json"]);
        let out = cargo(&args)
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
                && let (Some(name), Some(exe)) =
                    (v["target"]["name"].as_str(), v["executable"].as_str())
                && GUEST_TESTS.contains(&name)
            {
                exes.insert(name.to_string(), PathBuf::from(exe));
            }
        }
        Ok(())
    })?;
    let mut take = |name: &str| {
        exes.remove(name)
            .with_context(|| format!("cargo named no executable for the {name} test"))
    };
    let capture = take("capture")?;
    let ring_loss = take("ring_loss")?;
    let cost = take("cost")?;
    let help = output(Command::new(&nattrace).args(["run", "--help"]))?;
    let mut backends = backends_in_help(&help);
    if backends.is_empty() {
        // A build without `--backend` has the netfilter backend only.
        backends.push("netfilter".into());
    }
    Ok(Binaries {
        nattrace,
        capture,
        ring_loss,
        cost,
        backends,
    })
}

/// The rows of one kernel, and a line on what `nattrace probe` said in the guest.
struct KernelOutcome {
    rows: Vec<Row>,
    probe: String,
}

fn run_kernel(
    k: &Kernel,
    bins: &Binaries,
    timeout: Option<Duration>,
    guest_env: &GuestEnv,
    accel: &mut Option<&'static str>,
) -> anyhow::Result<KernelOutcome> {
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

    let plans: Vec<(&'static str, Plan)> = BACKENDS
        .iter()
        .zip(k.offers)
        .map(|(b, o)| (*b, plan(o, bins.backends.iter().any(|x| x == b))))
        .collect();
    let list = |want: fn(Plan) -> bool| {
        plans
            .iter()
            .filter(|(_, p)| want(*p))
            .map(|(b, _)| *b)
            .collect::<Vec<_>>()
            .join(",")
    };
    let run = list(|p| p == Plan::Run);
    let refuse = list(|p| matches!(p, Plan::Refuse(_)));
    let runs = plans.iter().filter(|(_, p)| *p == Plan::Run).count() as u64;
    // Each capture run is bounded in the guest; qemu gets that plus boot and the refusals.
    // Each backend runs the capture test and the ring-overflow test, each bounded.
    let measure_secs = if guest_env.measure {
        COST_TIMEOUT_SECS
    } else {
        0
    };
    let timeout = timeout.unwrap_or_else(|| {
        Duration::from_secs(180 + measure_secs + runs * (2 * RUN_TIMEOUT_SECS + 60))
    });
    let cmdline = format!(
        "nattrace.run={run} nattrace.refuse={refuse} nattrace.slack={} nattrace.scale={} \
         nattrace.run_timeout={RUN_TIMEOUT_SECS} nattrace.measure={}",
        guest_env.slack,
        guest_env.scale,
        u8::from(guest_env.measure)
    );
    let log = work.join("serial.log");
    // Keep the previous run's console for comparison (TCG timing varies between runs).
    let _ = fs::rename(&log, work.join("serial.prev.log"));
    let mut boot_ok = false;
    step(
        &format!(
            "{}: boot {kver} under {accel}: run [{run}], refuse [{refuse}] (timeout {timeout:?})",
            k.name
        ),
        || {
            boot_ok = boot(&vmlinuz, &initrd, &log, accel, &cmdline, timeout, None)?;
            Ok(())
        },
    )?;
    let text = fs::read_to_string(&log).unwrap_or_default();
    let mut results: BTreeMap<String, GuestResult> = BTreeMap::new();
    for line in text.lines() {
        if let Some((b, r)) = parse_result_line(line) {
            results.entry(b).or_insert(r);
        }
    }
    // The uname release names the ABI; the package version names the point release.
    let version = deb_name.split('_').nth(1).unwrap_or("?");
    let mut rows = Vec::new();
    for (backend, p) in &plans {
        let guest = results.get(*backend);
        let (result, failure) = judge(*p, guest, boot_ok);
        let kernel = guest
            .and_then(|g| g.kernel.clone())
            .unwrap_or_else(|| kver.clone());
        rows.push(Row {
            kernel: format!("{kernel} ({version})"),
            backend,
            checked: guest.map_or(0, |g| g.checked),
            result,
            failure,
            seconds: guest.and_then(|g| g.seconds),
        });
    }
    let guest_failed = plans
        .iter()
        .zip(&rows)
        .any(|((_, p), r)| r.failure && !matches!(p, Plan::NotInBuild(_)));
    if guest_failed {
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
    eprintln!("xtask: vm-test {}: serial log {}", k.name, log.display());
    Ok(KernelOutcome {
        rows,
        probe: probe_summary(&text, k, &bins.backends),
    })
}

/// A kernel message on the console: `[   12.345678] …`.
fn is_printk(line: &str) -> bool {
    line.trim_start()
        .strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .is_some_and(|(stamp, _)| {
            stamp.contains('.')
                && stamp.trim().chars().all(|c| c.is_ascii_digit() || c == '.')
                && stamp.chars().any(|c| c.is_ascii_digit())
        })
}

/// One line from the guest's `nattrace probe --format json`: its `auto` choice and its verdict
/// per backend, with the cells where it differs from the issue's table or from `run --help`
/// (`in_build`) on whether the backend is in this build.
fn probe_summary(serial: &str, k: &Kernel, in_build: &[String]) -> String {
    let Some(json) = serial
        .split("NATTRACE-VM-PROBE-JSON-BEGIN")
        .nth(1)
        .and_then(|r| r.split("NATTRACE-VM-PROBE-JSON-END").next())
    else {
        return "nattrace probe: no output in the serial log".into();
    };
    // Kernel messages can interleave with the console output.
    let json: String = json
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !is_printk(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json.trim()) else {
        return "nattrace probe: output is not JSON (see the serial log)".into();
    };
    let auto = v["decision"]["auto"].as_str().unwrap_or("none");
    let mut cells = Vec::new();
    for b in v["decision"]["backends"].as_array().into_iter().flatten() {
        let Some(name) = b["backend"].as_str() else {
            continue;
        };
        let answer = b["kernel"]["answer"].as_str().unwrap_or("?");
        let table = BACKENDS
            .iter()
            .position(|x| *x == name)
            .map(|i| k.offers[i]);
        let differs = match table {
            Some(Offer::Yes) => answer != "yes",
            Some(Offer::No(_)) => answer == "yes",
            None => false,
        };
        let built = b["in_this_build"].as_bool();
        let help_lists = in_build.iter().any(|x| x == name);
        let build_note = match built {
            Some(false) if help_lists => " (probe: not in this build, but run --help lists it)",
            Some(true) if !help_lists => " (probe: in this build, but run --help does not list it)",
            _ => "",
        };
        cells.push(format!(
            "{name} {answer}{}{build_note}",
            if differs { " (table differs)" } else { "" }
        ));
    }
    format!(
        "nattrace probe: auto={auto}; kernel allows: {}",
        cells.join(", ")
    )
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
        all.extend(parse_packages(k, base, &text));
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

/// The packages of a `Packages` index (stanzas separated by blank lines) that are kernels of
/// `k`'s series, with their download URL under `base`.
fn parse_packages(k: &Kernel, base: &str, text: &str) -> Vec<Pkg> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |f: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(f).and_then(|r| r.strip_prefix(": ")))
                .map(|v| v.trim().to_string())
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
        out.push(Pkg {
            url: format!("{base}/{filename}"),
            filename: filename.rsplit('/').next().unwrap_or(&filename).to_string(),
            name,
            version,
            sha256: sha,
        });
    }
    out
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
    for (exe, name) in [
        (&bins.capture, "capture"),
        (&bins.ring_loss, "ring_loss"),
        (&bins.cost, "cost"),
    ] {
        copy_with_libs(exe, &root, &Path::new("/opt/nattrace").join(name), true)?;
    }
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
    fs::write(
        &init,
        INIT.replace("COST_TIMEOUT", &COST_TIMEOUT_SECS.to_string()),
    )?;
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
/// the test itself finds them via PATH (Rust's Command uses execvp). The kernel command line
/// says what to do: `nattrace.run=a,b` (the capture test once per backend, with
/// `NATTRACE_BACKEND` set), `nattrace.refuse=c` (record what `nattrace run --backend c` says:
/// it must refuse), `nattrace.slack=`, `nattrace.scale=` (the test's `NATTRACE_E2E_SLACK` and
/// `NATTRACE_E2E_SCALE`), `nattrace.run_timeout=` (seconds per capture run).
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
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}" | tr , ' ';; esac; done; }
if grep -q nattrace.probe /proc/cmdline; then echo "NATTRACE-VM-PROBE ok $KVER"; poweroff -f; fi
echo "NATTRACE-VM-LOG init start, kernel $KVER at $(up)s"
for m in $(cat /modules.load); do insmod $m || echo "NATTRACE-VM-LOG insmod FAILED $m"; done
echo "NATTRACE-VM-LOG modules loaded at $(up)s"
RUN=$(arg nattrace.run); REFUSE=$(arg nattrace.refuse)
RUN_TIMEOUT=$(arg nattrace.run_timeout); RUN_TIMEOUT=${RUN_TIMEOUT:-300}
export NATTRACE_BIN=/opt/nattrace/nattrace
export NATTRACE_E2E_SLACK=$(arg nattrace.slack) NATTRACE_E2E_SCALE=$(arg nattrace.scale)
echo "NATTRACE-VM-LOG run: [$RUN] refuse: [$REFUSE] NATTRACE_E2E_SLACK=$NATTRACE_E2E_SLACK NATTRACE_E2E_SCALE=$NATTRACE_E2E_SCALE"
/opt/nattrace/nattrace probe --format json > /tmp/probe.json 2> /tmp/probe.err; PRC=$?
echo "NATTRACE-VM-LOG nattrace probe --format json (exit $PRC):"
echo "NATTRACE-VM-PROBE-JSON-BEGIN"
cat /tmp/probe.json
echo "NATTRACE-VM-PROBE-JSON-END"
sed 's/^/NATTRACE-VM-LOG probe stderr: /' /tmp/probe.err
cd /tmp
for B in $RUN; do
  export NATTRACE_BACKEND=$B
  T0=$(up)
  echo "NATTRACE-VM-LOG backend $B: capture test starts at ${T0}s"
  { timeout -k 10 $RUN_TIMEOUT /opt/nattrace/capture --ignored --test-threads=1 --nocapture; echo $? > /tmp/capture.rc; } 2>&1 | tee /tmp/capture-$B.out
  RC=$(cat /tmp/capture.rc)
  T1=$(up)
  CHECKED=$(grep 'found (external, time, proto)' /tmp/capture-$B.out | awk '{print $NF}' | tail -1)
  SLOWEST=$(grep -o 'slowest answer [^ ]*' /tmp/capture-$B.out | awk '{print $3}' | tail -1)
  SECS=$(awk "BEGIN{printf \"%.1f\", $T1-$T0}")
  if [ "$RC" -eq 0 ]; then R=pass; REASON=ok
  elif [ "$RC" -eq 143 ] || [ "$RC" -eq 137 ]; then R=fail; REASON=timeout-after-${RUN_TIMEOUT}s
  else R=fail; REASON=exit-$RC; fi
  echo "NATTRACE-VM-LOG backend $B: capture test ran from ${T0}s to ${T1}s"
  # Ring overflow under this backend: every created binding is a record or a counted loss.
  { timeout -k 10 $RUN_TIMEOUT /opt/nattrace/ring_loss --ignored --test-threads=1 --nocapture; echo $? > /tmp/ring_loss.rc; } 2>&1 | tee /tmp/ring_loss-$B.out
  RLRC=$(cat /tmp/ring_loss.rc)
  if [ "$RLRC" -eq 0 ]; then RL=pass; else RL=fail; fi
  if [ "$R" = pass ] && [ "$RL" = fail ]; then R=fail; REASON=ring_loss-exit-$RLRC; fi
  echo "NATTRACE-VM-RESULT backend=$B kernel=$KVER checked=${CHECKED:-0} result=$R reason=$REASON seconds=$SECS slowest=${SLOWEST:--} ring_loss=$RL"
done
if [ "$(arg nattrace.measure)" = 1 ] && [ -n "$RUN" ]; then
  echo "NATTRACE-VM-LOG cost measurement over [$RUN] starts at $(up)s"
  NATTRACE_COST_BACKENDS=$(echo $RUN | tr ' ' ,) timeout -k 10 COST_TIMEOUT /opt/nattrace/cost --ignored --test-threads=1 --nocapture 2>&1 | tee /tmp/cost.out
  echo "NATTRACE-VM-LOG cost measurement done at $(up)s"
fi
unset NATTRACE_BACKEND
for B in $REFUSE; do
  T0=$(up)
  echo "NATTRACE-VM-LOG backend $B: not offered by this kernel; what nattrace run --backend $B says:"
  mkdir -p /tmp/nt-$B
  timeout -k 5 30 /opt/nattrace/nattrace run --backend $B --data-dir /tmp/nt-$B > /tmp/refuse-$B.out 2>&1; RC=$?
  sed 's/^/  /' /tmp/refuse-$B.out | head -8
  SECS=$(awk "BEGIN{printf \"%.1f\", $(up)-$T0}")
  if grep -qx ready /tmp/refuse-$B.out || [ "$RC" -eq 0 ] || [ "$RC" -eq 143 ] || [ "$RC" -eq 137 ]; then
    R=started
  else
    R=refused
  fi
  echo "NATTRACE-VM-RESULT backend=$B kernel=$KVER checked=0 result=$R reason=exit-$RC seconds=$SECS"
done
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

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(name: &str) -> &'static Kernel {
        KERNELS.iter().find(|k| k.name == name).unwrap()
    }

    #[test]
    fn the_issue_table() {
        assert_eq!(KERNEL_NAMES.len(), KERNELS.len());
        for (k, n) in KERNELS.iter().zip(KERNEL_NAMES) {
            assert_eq!(k.name, *n);
        }
        let yes = |k: &str| {
            BACKENDS
                .iter()
                .zip(kernel(k).offers)
                .filter(|(_, o)| *o == Offer::Yes)
                .map(|(b, _)| *b)
                .collect::<Vec<_>>()
        };
        assert_eq!(yes("trixie"), ["netfilter", "fentry", "kprobe"]);
        assert_eq!(yes("bookworm"), ["fentry", "kprobe"]);
        assert_eq!(yes("bullseye"), ["kprobe"]);
        assert_eq!(kernel("bullseye").offers[1], Offer::No(NO_MODULE_BTF));
    }

    #[test]
    fn plans_and_judgements() {
        let pass = GuestResult {
            checked: 342,
            result: "pass".into(),
            reason: "ok".into(),
            slowest: Some("1.02s".into()),
            ..GuestResult::default()
        };
        let fail = GuestResult {
            result: "fail".into(),
            reason: "exit-101".into(),
            ..GuestResult::default()
        };
        let refused = GuestResult {
            result: "refused".into(),
            reason: "exit-4".into(),
            ..GuestResult::default()
        };
        let started = GuestResult {
            result: "started".into(),
            reason: "exit-143".into(),
            ..GuestResult::default()
        };
        assert_eq!(plan(Offer::Yes, true), Plan::Run);
        assert_eq!(plan(Offer::No(NEEDS_6_4), true), Plan::Refuse(NEEDS_6_4));
        assert_eq!(plan(Offer::Yes, false), Plan::NotInBuild(Offer::Yes));

        let judged = |p, g: Option<&GuestResult>, ok| judge(p, g, ok);
        assert_eq!(
            judged(Plan::Run, Some(&pass), true),
            ("pass (slowest live answer 1.02s)".into(), false)
        );
        assert!(judged(Plan::Run, Some(&fail), true).1);
        // A "yes" without a result line, with a timeout, or missing from the build fails.
        assert!(judged(Plan::Run, None, true).1);
        assert!(judged(Plan::Run, None, false).0.contains("timed out"));
        assert_eq!(
            judged(Plan::NotInBuild(Offer::Yes), None, true),
            ("not in this build".into(), true)
        );
        // A "no" is fine when nattrace refuses it or does not know it, and says why.
        let (text, failed) = judged(Plan::Refuse(NO_MODULE_BTF), Some(&refused), true);
        assert!(
            !failed && text.contains("no module BTF") && text.contains("exit-4"),
            "{text}"
        );
        assert!(!judged(Plan::NotInBuild(Offer::No(NEEDS_6_4)), None, true).1);
        // A "no" that nattrace starts anyway, or no word from the guest, fails.
        assert!(judged(Plan::Refuse(NEEDS_6_4), Some(&started), true).1);
        assert!(judged(Plan::Refuse(NEEDS_6_4), None, true).1);
    }

    #[test]
    fn result_lines() {
        let (b, r) = parse_result_line(
            "NATTRACE-VM-RESULT backend=fentry kernel=6.1.0-56-cloud-amd64 checked=342 \
             result=pass reason=ok seconds=101.5 slowest=980.1ms\r",
        )
        .unwrap();
        assert_eq!(b, "fentry");
        assert_eq!(
            r,
            GuestResult {
                kernel: Some("6.1.0-56-cloud-amd64".into()),
                checked: 342,
                result: "pass".into(),
                reason: "ok".into(),
                seconds: Some(101.5),
                slowest: Some("980.1ms".into()),
            }
        );
        let (_, r) = parse_result_line(
            "[  3.1] x NATTRACE-VM-RESULT backend=netfilter checked=0 result=refused reason=exit-4 slowest=-",
        )
        .unwrap();
        assert_eq!((r.result.as_str(), r.slowest), ("refused", None));
        assert!(parse_result_line("NATTRACE-VM-LOG done").is_none());
        assert!(parse_result_line("NATTRACE-VM-RESULT result=pass").is_none());
    }

    #[test]
    fn backends_from_run_help() {
        let help = "Options:\n      --sign-key <FILE>\n          Sign … kprobe is mentioned here\n      \
            --backend <BACKEND>\n          Capture backend: `netfilter` or `fentry` [default: \
            netfilter] [possible values: netfilter, fentry]\n  -h, --help\n          Print help\n";
        assert_eq!(backends_in_help(help), ["netfilter", "fentry"]);
        let long = "      --backend <BACKEND>\n          Capture backend\n\n          Possible \
            values:\n          - auto:      the best one\n          - netfilter: BPF link\n          \
            - kprobe:    kprobes\n\n  -h, --help\n";
        assert_eq!(backends_in_help(long), ["auto", "netfilter", "kprobe"]);
        assert!(backends_in_help("Options:\n  -h, --help\n").is_empty());
    }

    #[test]
    fn packages_index() {
        let index = "Package: linux-image-6.1.0-56-cloud-amd64-unsigned\nSource: linux\n\
            Version: 6.1.192-2\nFilename: pool/main/l/linux/linux-image-6.1.0-56-cloud-amd64-unsigned_6.1.192-2_amd64.deb\n\
            Size: 26489272\nSHA256: abc123\n\n\
            Package: linux-image-6.12.48+deb12-cloud-amd64-unsigned\nVersion: 6.12.48-1~deb12u1\n\
            Filename: pool/main/l/linux/x.deb\nSHA256: def\n\n\
            Package: linux-image-6.1.0-56-cloud-amd64-dbg\nVersion: 6.1.192-2\nFilename: y.deb\nSHA256: 0\n\n\
            Package: linux-image-6.1.0-55-cloud-amd64-unsigned\nVersion: 6.1.190-1\n";
        let got = parse_packages(kernel("bookworm"), SECURITY, index);
        assert_eq!(
            got.len(),
            1,
            "the 6.12 backport, the dbg package and a stanza without a file are not kernels of the series"
        );
        let p = &got[0];
        assert_eq!(p.name, "linux-image-6.1.0-56-cloud-amd64-unsigned");
        assert_eq!(p.version, "6.1.192-2");
        assert_eq!(p.sha256, "abc123");
        assert_eq!(
            p.filename,
            "linux-image-6.1.0-56-cloud-amd64-unsigned_6.1.192-2_amd64.deb"
        );
        assert_eq!(
            p.url,
            format!(
                "{SECURITY}/pool/main/l/linux/linux-image-6.1.0-56-cloud-amd64-unsigned_6.1.192-2_amd64.deb"
            )
        );
        assert!(matches(
            kernel("trixie"),
            "linux-image-6.12.117+deb13-cloud-amd64-unsigned"
        ));
        assert!(!matches(
            kernel("trixie"),
            "linux-image-6.12.48+deb12-cloud-amd64-unsigned"
        ));
    }

    #[test]
    fn probe_output_in_the_serial_log() {
        let serial = "NATTRACE-VM-PROBE-JSON-BEGIN\r\n{\r\n  \"decision\": {\r\n    \"auto\": \"fentry\",\r\n\
            [    4.200000] random: crng init done\r\n    \"backends\": [\r\n      {\"backend\": \"netfilter\", \
            \"kernel\": {\"answer\": \"no\"}},\r\n      {\"backend\": \"fentry\", \"in_this_build\": false, \"kernel\": {\"answer\": \"yes\"}},\r\n\
                  {\"backend\": \"kprobe\", \"kernel\": {\"answer\": \"no\"}}\r\n    ]\r\n  }\r\n}\r\n\
            NATTRACE-VM-PROBE-JSON-END\r\n";
        assert!(is_printk("[    4.200000] random: crng init done"));
        assert!(!is_printk("[\"not\", \"a printk\"],"));
        assert!(!is_printk("[]"));
        let s = probe_summary(
            serial,
            kernel("bookworm"),
            &["netfilter".into(), "fentry".into()],
        );
        assert!(s.contains("auto=fentry"), "{s}");
        assert!(
            s.contains(
                "netfilter no, fentry yes (probe: not in this build, but run --help lists it), \
                 kprobe no (table differs)"
            ),
            "{s}"
        );
        assert!(probe_summary("nothing", kernel("trixie"), &[]).contains("no output"));
    }
}
