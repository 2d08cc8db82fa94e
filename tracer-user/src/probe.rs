//! `nattrace probe`: which kernel features this host offers, which capture backend
//! `nattrace run` would use, and why the others are ruled out.
//!
//! Every answer comes from a real probe of the running kernel (files it publishes, program
//! types it loads, programs it attaches), never from its version number. What could not be
//! probed (missing privileges, no kernel config) is reported as unknown, with the reason.
//!
//! Split in two: [`Features::probe`] touches the kernel; [`decide`] and [`write_table`] are
//! pure, so the decision for other kernels (Debian 6.12, 6.1, 5.10) is tested from feature
//! sets.

use std::{
    io::{self, Write},
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
};

use aya::programs::ProgramType;
use serde::Serialize;

use crate::{
    btf::VMLINUX_BTF,
    capture::{layout::KernelLayout, sys},
    exit::Status,
    output::ReportFormat,
};

/// Arguments of `nattrace probe`.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

/// Runs `nattrace probe`: exit 0 when a backend of this build can run, 4 when none can.
pub fn run(args: &ProbeArgs) -> anyhow::Result<Status> {
    let features = Features::probe();
    let decision = decide(&features);
    let mut out = io::stdout().lock();
    match args.format {
        ReportFormat::Json => {
            serde_json::to_writer_pretty(
                &mut out,
                &serde_json::json!({ "features": features, "decision": decision }),
            )?;
            out.write_all(b"\n")?;
        }
        ReportFormat::Table => write_table(&mut out, &features, &decision)?,
    }
    Ok(decision.status())
}

/// The answer of one probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "answer", content = "detail", rename_all = "snake_case")]
pub enum Finding {
    Yes(String),
    No(String),
    /// Not probed, or the probe could not tell.
    Unknown(String),
}

impl Finding {
    #[must_use]
    pub fn is_yes(&self) -> bool {
        matches!(self, Self::Yes(_))
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Yes(_) => "yes",
            Self::No(_) => "no",
            Self::Unknown(_) => "unknown",
        }
    }

    fn detail(&self) -> &str {
        match self {
            Self::Yes(d) | Self::No(d) | Self::Unknown(d) => d,
        }
    }
}

/// Where a netfilter module's functions and types are described.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleBtf {
    /// Built into the kernel: vmlinux BTF describes it.
    BuiltIn,
    /// A loaded module with its own split BTF in /sys/kernel/btf/<name>.
    Present,
    /// A loaded module without BTF (no CONFIG_DEBUG_INFO_BTF_MODULES, e.g. Linux 5.10).
    LoadedWithoutBtf,
    /// The module is not loaded, so nothing can be said about its BTF.
    NotLoaded,
}

/// One module's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModuleState {
    pub name: &'static str,
    pub btf: ModuleBtf,
}

/// Everything `nattrace probe` found out about the running kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Features {
    pub kernel_release: String,
    /// Capabilities missing for some probes (empty when root).
    pub missing_capabilities: Vec<&'static str>,
    pub vmlinux_btf: Finding,
    pub modules: Vec<ModuleState>,
    /// Whether the conntrack struct offsets can be derived from BTF.
    pub offsets: Finding,
    /// BPF_PROG_TYPE_NETFILTER loads.
    pub netfilter_program: Finding,
    /// A netfilter program could really be linked to a hook (then unlinked).
    pub netfilter_link: Finding,
    /// BPF_PROG_TYPE_TRACING loads (says nothing about attaching).
    pub tracing_program: Finding,
    /// A trivial fentry program could really be loaded and attached to a vmlinux function.
    pub fentry_attach: Finding,
    /// The perf kprobe PMU or tracefs kprobe_events.
    pub kprobe_events: Finding,
    /// BPF_PROG_TYPE_KPROBE loads (the type exists even in kernels without kprobes).
    pub kprobe_program: Finding,
    /// The conntrack functions the kprobe backend probes exist (/proc/kallsyms).
    pub kprobe_targets: Finding,
    /// Kernel lockdown mode, when securityfs shows it.
    pub lockdown: Option<String>,
    /// Kernel config lines that bear on the backends, when the config is readable.
    pub config: Vec<String>,
}

/// A capture backend, as `nattrace run --backend` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Netfilter,
    Fentry,
    Kprobe,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Self::Netfilter => "netfilter",
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
        }
    }
}

/// One backend's verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendVerdict {
    pub backend: Backend,
    /// Whether the kernel offers what the backend needs.
    pub kernel: Finding,
}

/// What `nattrace run` (backend auto) would do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub backends: Vec<BackendVerdict>,
    /// The backend `nattrace run` would use, if any.
    pub auto: Option<Backend>,
    /// One line on the choice.
    pub summary: String,
}

impl Decision {
    /// Exit status: 0 when a backend can run, 4 (environment) otherwise.
    #[must_use]
    pub fn status(&self) -> Status {
        if self.auto.is_some() {
            Status::Ok
        } else {
            Status::Environment
        }
    }
}

/// The nf_nat function the fentry backend hooks for binding starts.
const FENTRY_START_TARGET: &str = tracer_common::names::FEXIT_TARGET;
/// The nf_conntrack function it hooks for binding ends.
const FENTRY_END_TARGET: &str = tracer_common::names::END_TARGET;

/// Pure: which backends the kernel allows, and the one `nattrace run` would pick.
#[must_use]
pub fn decide(f: &Features) -> Decision {
    let netfilter = match (&f.offsets, &f.netfilter_program, &f.netfilter_link) {
        (Finding::Yes(_), Finding::Yes(_), Finding::Yes(_)) => {
            Finding::Yes("netfilter program and link, offsets from BTF".into())
        }
        (o @ (Finding::No(_) | Finding::Unknown(_)), _, _) => tag(o, "struct offsets"),
        (_, p @ (Finding::No(_) | Finding::Unknown(_)), _) => {
            tag(p, "BPF netfilter programs (Linux >= 6.4)")
        }
        (_, _, l) => tag(l, "BPF netfilter link"),
    };

    let module_target = |module: &str, function: &str| match f
        .modules
        .iter()
        .find(|m| m.name == module)
        .map(|m| m.btf)
    {
        Some(ModuleBtf::BuiltIn) => Finding::Yes(format!("{function} is in vmlinux BTF")),
        Some(ModuleBtf::Present) => Finding::Yes(format!(
            "{function} is in module BTF {module} (attach needs its BTF object fd)"
        )),
        Some(ModuleBtf::LoadedWithoutBtf) => Finding::No(format!(
            "{function} lives in module {module}, which publishes no BTF (needs CONFIG_DEBUG_INFO_BTF_MODULES, Linux >= 5.11)"
        )),
        Some(ModuleBtf::NotLoaded) | None => Finding::Unknown(format!(
            "module {module} is not loaded: load it (modprobe {module}) to see whether {function} can be attached"
        )),
    };
    let target = match (
        module_target("nf_nat", FENTRY_START_TARGET),
        module_target("nf_conntrack", FENTRY_END_TARGET),
    ) {
        (Finding::Yes(a), Finding::Yes(b)) => Finding::Yes(format!("{a}; {b}")),
        (Finding::Yes(_), other) | (other, _) => other,
    };
    let fentry = match (&f.offsets, &f.fentry_attach, &target) {
        (Finding::Yes(_), Finding::Yes(_), Finding::Yes(t)) => {
            Finding::Yes(format!("fentry attaches; {t}"))
        }
        (o @ (Finding::No(_) | Finding::Unknown(_)), _, _) => tag(o, "struct offsets"),
        (_, a @ (Finding::No(_) | Finding::Unknown(_)), _) => tag(a, "fentry attach"),
        (_, _, t) => tag(t, "fentry target"),
    };

    let kprobe = match (
        &f.offsets,
        &f.kprobe_events,
        &f.kprobe_program,
        &f.kprobe_targets,
    ) {
        (Finding::Yes(_), Finding::Yes(_), Finding::Yes(_), Finding::Yes(t)) => {
            Finding::Yes(format!("kprobes and BPF kprobe programs; {t}"))
        }
        (o @ (Finding::No(_) | Finding::Unknown(_)), _, _, _) => tag(o, "struct offsets"),
        (_, e @ (Finding::No(_) | Finding::Unknown(_)), _, _) => tag(e, "kprobes"),
        (_, _, p @ (Finding::No(_) | Finding::Unknown(_)), _) => tag(p, "BPF kprobe programs"),
        (_, _, _, t) => tag(t, "kprobe targets"),
    };

    let backends: Vec<BackendVerdict> = [
        (Backend::Netfilter, netfilter),
        (Backend::Fentry, fentry),
        (Backend::Kprobe, kprobe),
    ]
    .into_iter()
    .map(|(backend, kernel)| BackendVerdict { backend, kernel })
    .collect();

    let auto = backends
        .iter()
        .find(|b| b.kernel.is_yes())
        .map(|b| b.backend);
    let undecided = backends
        .iter()
        .any(|b| matches!(b.kernel, Finding::Unknown(_)));
    let summary = match auto {
        Some(b) => format!("nattrace run would use the {} backend", b.name()),
        None if undecided => {
            "cannot tell whether nattrace run can start: some probes were not made (see unknown above); nattrace run would fail here (exit 4)".into()
        }
        None => "no backend can run on this kernel: nattrace run would fail (exit 4)".into(),
    };
    Decision {
        backends,
        auto,
        summary,
    }
}

/// Prefixes a failed requirement's detail with what it is.
fn tag(f: &Finding, what: &str) -> Finding {
    match f {
        Finding::Yes(d) => Finding::Yes(d.clone()),
        Finding::No(d) => Finding::No(format!("{what}: {d}")),
        Finding::Unknown(d) => Finding::Unknown(format!("{what}: {d}")),
    }
}

/// Pure: the human-readable report.
pub fn write_table(out: &mut dyn Write, f: &Features, d: &Decision) -> io::Result<()> {
    writeln!(out, "kernel {}", f.kernel_release)?;
    if !f.missing_capabilities.is_empty() {
        writeln!(
            out,
            "running without {}: some probes were skipped (run as root for a full answer)",
            f.missing_capabilities.join(", ")
        )?;
    }
    writeln!(out)?;
    writeln!(out, "features")?;
    let mut rows: Vec<(String, &Finding)> = vec![("vmlinux BTF".into(), &f.vmlinux_btf)];
    let module_findings: Vec<(String, Finding)> = f
        .modules
        .iter()
        .map(|m| (format!("{} BTF", m.name), module_finding(m)))
        .collect();
    rows.extend(module_findings.iter().map(|(n, fi)| (n.clone(), fi)));
    rows.extend([
        ("struct offsets".into(), &f.offsets),
        ("BPF netfilter program".into(), &f.netfilter_program),
        ("BPF netfilter link".into(), &f.netfilter_link),
        ("BPF tracing program".into(), &f.tracing_program),
        ("fentry attach".into(), &f.fentry_attach),
        ("kprobes".into(), &f.kprobe_events),
        ("BPF kprobe program".into(), &f.kprobe_program),
        ("kprobe targets".into(), &f.kprobe_targets),
    ]);
    let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    for (name, finding) in &rows {
        writeln!(
            out,
            "  {name:<width$}  {:<7}  {}",
            finding.label(),
            finding.detail()
        )?;
    }
    if let Some(lockdown) = &f.lockdown {
        writeln!(out, "  {:<width$}  {lockdown}", "lockdown")?;
    }
    for line in &f.config {
        writeln!(out, "  {:<width$}  {line}", "config")?;
    }
    writeln!(out)?;
    writeln!(out, "backends")?;
    for b in &d.backends {
        writeln!(
            out,
            "  {:<9}  {:<7}  {}",
            b.backend.name(),
            b.kernel.label(),
            b.kernel.detail()
        )?;
    }
    writeln!(out)?;
    let auto = d.auto.map_or("none", Backend::name);
    writeln!(out, "backend auto would use: {auto}")?;
    writeln!(out, "{}", d.summary)
}

fn module_finding(m: &ModuleState) -> Finding {
    let path = format!("/sys/kernel/btf/{}", m.name);
    match m.btf {
        ModuleBtf::BuiltIn => Finding::Yes("built in: described by vmlinux BTF".into()),
        ModuleBtf::Present => Finding::Yes(path),
        ModuleBtf::LoadedWithoutBtf => Finding::No(format!(
            "module loaded but {path} is missing (no CONFIG_DEBUG_INFO_BTF_MODULES)"
        )),
        ModuleBtf::NotLoaded => Finding::Unknown("module not loaded".into()),
    }
}

// ---------------------------------------------------------------------------------------
// Probing the running kernel.

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

impl Features {
    /// Probes the running kernel. Never fails: what cannot be probed is `Unknown`.
    #[must_use]
    pub fn probe() -> Self {
        let caps = effective_caps();
        let has = |cap: u32| caps & (1u64 << cap) != 0;
        let bpf = has(CAP_BPF) || has(CAP_SYS_ADMIN);
        let perfmon = has(CAP_PERFMON) || has(CAP_SYS_ADMIN);
        let net_admin = has(CAP_NET_ADMIN);
        let mut missing = Vec::new();
        for (ok, name) in [
            (bpf, "CAP_BPF"),
            (perfmon, "CAP_PERFMON"),
            (net_admin, "CAP_NET_ADMIN"),
        ] {
            if !ok {
                missing.push(name);
            }
        }
        let need = |caps: &[(bool, &str)]| -> Option<Finding> {
            let lacking: Vec<&str> = caps.iter().filter(|(ok, _)| !ok).map(|c| c.1).collect();
            (!lacking.is_empty())
                .then(|| Finding::Unknown(format!("not probed: needs {}", lacking.join(", "))))
        };

        let vmlinux_btf = match std::fs::metadata(VMLINUX_BTF) {
            Ok(m) => Finding::Yes(format!("{VMLINUX_BTF} ({} bytes)", m.len())),
            Err(e) => Finding::No(format!(
                "{VMLINUX_BTF}: {e} (kernel without CONFIG_DEBUG_INFO_BTF, or sysfs not mounted)"
            )),
        };
        // aya-obj's reader, for function (not struct) lookups.
        let vmlinux = aya_obj::btf::Btf::from_sys_fs();
        let modules = [
            ("nf_conntrack", "nf_conntrack_alloc"),
            ("nf_nat", FENTRY_START_TARGET),
        ]
        .into_iter()
        .map(|(name, function)| ModuleState {
            name,
            btf: module_btf(name, vmlinux.as_ref().ok(), function),
        })
        .collect();
        let offsets = match KernelLayout::from_running_kernel() {
            Ok(_) => {
                Finding::Yes("sk_buff, nf_conn and nf_conntrack_tuple offsets from BTF".into())
            }
            Err(e) => Finding::No(error_chain(&e)),
        };
        let netfilter_program = need(&[(bpf, "CAP_BPF")])
            .unwrap_or_else(|| prog_type_supported(ProgramType::Netfilter));
        let netfilter_link = need(&[(bpf, "CAP_BPF"), (net_admin, "CAP_NET_ADMIN")])
            .unwrap_or_else(probe_netfilter_link);
        let tracing_program = need(&[(bpf, "CAP_BPF"), (perfmon, "CAP_PERFMON")])
            .unwrap_or_else(|| prog_type_supported(ProgramType::Tracing));
        let fentry_attach =
            need(&[(bpf, "CAP_BPF"), (perfmon, "CAP_PERFMON")]).unwrap_or_else(|| match &vmlinux {
                Ok(btf) => probe_fentry(btf),
                Err(e) => Finding::Unknown(format!("not probed: cannot read vmlinux BTF: {e}")),
            });
        let kprobe_program = need(&[(bpf, "CAP_BPF"), (perfmon, "CAP_PERFMON")])
            .unwrap_or_else(|| prog_type_supported(ProgramType::KProbe));
        Self {
            kernel_release: kernel_release(),
            missing_capabilities: missing,
            vmlinux_btf,
            modules,
            offsets,
            netfilter_program,
            netfilter_link,
            tracing_program,
            fentry_attach,
            kprobe_events: probe_kprobe_events(),
            kprobe_program,
            kprobe_targets: probe_kprobe_targets(),
            lockdown: lockdown(),
            config: kernel_config(),
        }
    }
}

fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn kernel_release() -> String {
    // SAFETY: uname only writes into the struct it is given.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&raw mut uts) } != 0 {
        return format!("unknown ({})", io::Error::last_os_error());
    }
    // SAFETY: the kernel NUL-terminates release.
    unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// `function` is one that lives in the module: found in vmlinux BTF, the module is built in.
fn module_btf(name: &str, vmlinux: Option<&aya_obj::btf::Btf>, function: &str) -> ModuleBtf {
    if Path::new(&format!("/sys/kernel/btf/{name}")).exists() {
        return ModuleBtf::Present;
    }
    match std::fs::read_to_string("/proc/modules") {
        Ok(list) => {
            if list.lines().any(|l| l.split(' ').next() == Some(name)) {
                ModuleBtf::LoadedWithoutBtf
            } else if Path::new(&format!("/sys/module/{name}")).exists()
                || vmlinux.is_some_and(|btf| {
                    btf.id_by_type_name_kind(function, aya_obj::btf::BtfKind::Func)
                        .is_ok()
                })
            {
                // In /sys/module (or vmlinux BTF) but not in /proc/modules: built in.
                ModuleBtf::BuiltIn
            } else {
                ModuleBtf::NotLoaded
            }
        }
        // No /proc/modules: a kernel without module support, everything is built in.
        Err(_) => ModuleBtf::BuiltIn,
    }
}

fn prog_type_supported(ty: ProgramType) -> Finding {
    match aya::sys::is_program_supported(ty) {
        Ok(true) => Finding::Yes("program type loads".into()),
        Ok(false) => Finding::No("program type rejected by the kernel".into()),
        // aya reports EPERM as an error; with the capabilities checked first, it is the
        // kernel's answer (e.g. tracing programs refused on this kind of host), not a failure
        // of the probe.
        Err(e) => {
            let text = error_chain(&e);
            if text.contains("os error 1)") {
                Finding::No(format!("refused by the kernel: {text}"))
            } else {
                Finding::Unknown(format!("probe failed: {text}"))
            }
        }
    }
}

fn lockdown() -> Option<String> {
    std::fs::read_to_string("/sys/kernel/security/lockdown")
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The config options that bear on the backends, from /proc/config.gz (through `zcat`, which
/// may be absent) or /boot/config-<release>.
fn kernel_config() -> Vec<String> {
    const WANTED: [&str; 6] = [
        "CONFIG_NETFILTER_BPF_LINK",
        "CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS",
        "CONFIG_KPROBES",
        "CONFIG_KPROBE_EVENTS",
        "CONFIG_DEBUG_INFO_BTF_MODULES",
        "CONFIG_MODULES",
    ];
    let text = std::fs::read(format!("/boot/config-{}", kernel_release()))
        .ok()
        .or_else(|| {
            let gz = std::fs::File::open("/proc/config.gz").ok()?;
            let out = std::process::Command::new("zcat")
                .stdin(gz)
                .stderr(std::process::Stdio::null())
                .output()
                .ok()?;
            out.status.success().then_some(out.stdout)
        });
    let Some(text) = text else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&text);
    WANTED
        .iter()
        .map(|opt| {
            text.lines()
                .find(|l| {
                    l.strip_prefix(opt).is_some_and(|r| r.starts_with('='))
                        || l.strip_prefix("# ")
                            .and_then(|r| r.strip_prefix(opt))
                            .is_some_and(|r| r == " is not set")
                })
                .map_or_else(|| format!("{opt} absent"), str::to_owned)
        })
        .collect()
}

fn probe_kprobe_targets() -> Finding {
    match std::fs::read_to_string("/proc/kallsyms") {
        Ok(list) => match crate::capture::kprobe::targets(&list) {
            Ok(t) => Finding::Yes(format!("{} and {} in /proc/kallsyms", t.start, t.end)),
            Err(e) => Finding::No(e.to_string()),
        },
        Err(e) => Finding::Unknown(format!("cannot read /proc/kallsyms: {e}")),
    }
}

fn probe_kprobe_events() -> Finding {
    let pmu = Path::new("/sys/bus/event_source/devices/kprobe");
    let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
    if pmu.exists() {
        return Finding::Yes(format!("perf kprobe PMU {}", pmu.display()));
    }
    for dir in tracefs {
        let events = Path::new(dir).join("kprobe_events");
        if events.exists() {
            return Finding::Yes(format!("{}", events.display()));
        }
    }
    // Without the PMU, kprobe_events is the only other witness; it needs tracefs mounted.
    let tracefs_mounted = tracefs
        .iter()
        .any(|d| Path::new(d).join("available_events").exists());
    if tracefs_mounted {
        Finding::No(
            "no perf kprobe PMU and no kprobe_events: kernel without CONFIG_KPROBES / CONFIG_KPROBE_EVENTS".into(),
        )
    } else {
        Finding::No(
            "no perf kprobe PMU (/sys/bus/event_source/devices/kprobe): kernel without CONFIG_KPROBES / CONFIG_KPROBE_EVENTS (tracefs not mounted, kprobe_events not checked)"
                .into(),
        )
    }
}

// The two attach probes load two-instruction programs through the agent's own bpf(2)
// calls (aya 0.14 can neither load netfilter programs nor load an fentry program without an
// object file).

/// `r0 = imm; exit`.
fn return_program(imm: i32) -> [sys::Insn; 2] {
    let mov = 0xb7u64 | (u64::from(imm.cast_unsigned()) << 32); // BPF_ALU64|BPF_MOV|BPF_K, dst r0
    let exit = 0x95u64; // BPF_JMP|BPF_EXIT
    // SAFETY: `bpf_insn` is a plain 8-byte struct; these are the instructions' encodings.
    [mov, exit].map(|raw| unsafe { std::mem::transmute::<u64, sys::Insn>(raw) })
}

fn load(kind: sys::ProgKind<'_>, imm: i32) -> io::Result<OwnedFd> {
    sys::prog_load(kind, "nattrace_probe", &return_program(imm), c"GPL").map_err(|f| f.error)
}

/// Loads an accept-everything netfilter program and links it at IPv4 POSTROUTING for the
/// moment of the probe.
fn probe_netfilter_link() -> Finding {
    let prog = match load(sys::ProgKind::Netfilter, 1) {
        Ok(p) => p,
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::E2BIG)) => {
            return Finding::No(format!(
                "loading a netfilter program failed ({e}): needs Linux >= 6.4"
            ));
        }
        Err(e) => return Finding::No(format!("loading a netfilter program failed: {e}")),
    };
    match sys::link_netfilter(
        prog.as_fd(),
        sys::NFPROTO_IPV4,
        sys::NF_INET_POST_ROUTING,
        i32::MAX - 2,
    ) {
        Ok(_link) => {
            Finding::Yes("linked a test program at IPv4 POSTROUTING, then unlinked".into())
        }
        Err(e) => Finding::No(format!(
            "link create failed: {e} (needs CONFIG_NETFILTER_BPF_LINK)"
        )),
    }
}

/// The vmlinux function the fentry probe attaches to: the kernel's own BPF self-test hook,
/// present whenever BPF is, and never called outside `BPF_PROG_TEST_RUN`.
const FENTRY_PROBE_TARGET: &str = "bpf_fentry_test1";

/// Loads `return 0` as fentry on a vmlinux function and attaches it.
fn probe_fentry(btf: &aya_obj::btf::Btf) -> Finding {
    use aya_obj::btf::BtfKind;
    let Ok(id) = btf.id_by_type_name_kind(FENTRY_PROBE_TARGET, BtfKind::Func) else {
        return Finding::Unknown(format!(
            "not probed: vmlinux BTF has no function {FENTRY_PROBE_TARGET}"
        ));
    };
    let kind = sys::ProgKind::Tracing {
        attach_type: sys::BPF_TRACE_FENTRY,
        btf_id: id,
        btf_obj: None,
    };
    let prog = match load(kind, 0) {
        Ok(p) => p,
        Err(e) => {
            return Finding::No(format!("loading fentry/{FENTRY_PROBE_TARGET} refused: {e}"));
        }
    };
    match sys::attach_tracing(prog.as_fd()) {
        Ok(_link) => Finding::Yes(format!(
            "attached fentry/{FENTRY_PROBE_TARGET}, then detached"
        )),
        Err(e) => Finding::No(format!(
            "attaching fentry/{FENTRY_PROBE_TARGET} refused: {e}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yes() -> Finding {
        Finding::Yes("t".into())
    }

    fn no(d: &str) -> Finding {
        Finding::No(d.into())
    }

    fn modules(btf: ModuleBtf) -> Vec<ModuleState> {
        ["nf_conntrack", "nf_nat"]
            .into_iter()
            .map(|name| ModuleState { name, btf })
            .collect()
    }

    /// All yes; tests switch off what a kernel lacks.
    fn base(release: &str, btf: ModuleBtf) -> Features {
        Features {
            kernel_release: release.into(),
            missing_capabilities: Vec::new(),
            vmlinux_btf: yes(),
            modules: modules(btf),
            offsets: yes(),
            netfilter_program: yes(),
            netfilter_link: yes(),
            tracing_program: yes(),
            fentry_attach: yes(),
            kprobe_events: yes(),
            kprobe_program: yes(),
            kprobe_targets: yes(),
            lockdown: None,
            config: Vec::new(),
        }
    }

    /// This host: netfilter yes, fentry refused, kprobes not built.
    fn host_6_18() -> Features {
        Features {
            fentry_attach: no("attaching fentry/bpf_fentry_test1 refused: EPERM"),
            kprobe_events: no("no perf kprobe PMU"),
            ..base("6.18.44", ModuleBtf::BuiltIn)
        }
    }

    fn trixie_6_12() -> Features {
        base("6.12.107+deb13-cloud-amd64", ModuleBtf::Present)
    }

    fn bookworm_6_1() -> Features {
        Features {
            netfilter_program: no("program type rejected by the kernel"),
            netfilter_link: no("loading a netfilter program failed: needs Linux >= 6.4"),
            ..base("6.1.0-50-cloud-amd64", ModuleBtf::Present)
        }
    }

    fn bullseye_5_10() -> Features {
        Features {
            netfilter_program: no("program type rejected by the kernel"),
            netfilter_link: no("loading a netfilter program failed: needs Linux >= 6.4"),
            ..base("5.10.0-32-cloud-amd64", ModuleBtf::LoadedWithoutBtf)
        }
    }

    fn verdict(d: &Decision, b: Backend) -> &Finding {
        &d.backends.iter().find(|v| v.backend == b).unwrap().kernel
    }

    #[test]
    fn host_uses_netfilter_and_rules_out_the_others() {
        let d = decide(&host_6_18());
        assert_eq!(d.auto, Some(Backend::Netfilter));
        assert_eq!(d.status(), Status::Ok);
        assert!(verdict(&d, Backend::Netfilter).is_yes());
        let fentry = verdict(&d, Backend::Fentry);
        assert!(
            matches!(fentry, Finding::No(r) if r.contains("fentry attach") && r.contains("EPERM"))
        );
        assert!(matches!(verdict(&d, Backend::Kprobe), Finding::No(r) if r.starts_with("kprobes")));
    }

    #[test]
    fn trixie_allows_all_three_and_auto_takes_netfilter() {
        let d = decide(&trixie_6_12());
        assert_eq!(d.auto, Some(Backend::Netfilter));
        for b in [Backend::Netfilter, Backend::Fentry, Backend::Kprobe] {
            assert!(verdict(&d, b).is_yes(), "{b:?}");
        }
        assert!(
            matches!(verdict(&d, Backend::Fentry), Finding::Yes(r) if r.contains("module BTF nf_nat"))
        );
    }

    #[test]
    fn bookworm_uses_fentry_and_allows_kprobe() {
        let d = decide(&bookworm_6_1());
        assert_eq!(d.auto, Some(Backend::Fentry));
        assert_eq!(d.status(), Status::Ok);
        assert!(matches!(verdict(&d, Backend::Netfilter), Finding::No(r) if r.contains(">= 6.4")));
        assert!(verdict(&d, Backend::Fentry).is_yes());
        assert!(verdict(&d, Backend::Kprobe).is_yes());
        assert_eq!(d.summary, "nattrace run would use the fentry backend");
    }

    #[test]
    fn bullseye_uses_kprobe_fentry_lacks_module_btf() {
        let d = decide(&bullseye_5_10());
        assert_eq!(d.auto, Some(Backend::Kprobe));
        assert!(
            matches!(verdict(&d, Backend::Fentry), Finding::No(r) if r.contains("publishes no BTF"))
        );
        assert!(verdict(&d, Backend::Kprobe).is_yes());
    }

    #[test]
    fn conntrack_not_loaded_rules_out_kprobe_with_the_reason() {
        let f = Features {
            kprobe_targets: no("conntrack is not loaded"),
            ..bullseye_5_10()
        };
        let d = decide(&f);
        assert_eq!(d.auto, None);
        assert!(
            matches!(verdict(&d, Backend::Kprobe), Finding::No(r) if r == "kprobe targets: conntrack is not loaded")
        );
    }

    #[test]
    fn no_offsets_rules_out_everything() {
        let f = Features {
            offsets: no("kernel BTF has no struct nf_conn"),
            ..trixie_6_12()
        };
        let d = decide(&f);
        assert_eq!(d.auto, None);
        for b in [Backend::Netfilter, Backend::Fentry, Backend::Kprobe] {
            assert!(matches!(verdict(&d, b), Finding::No(r) if r.starts_with("struct offsets")));
        }
        assert!(d.summary.starts_with("no backend can run"), "{}", d.summary);
    }

    #[test]
    fn unprivileged_is_unknown_not_no() {
        let np = Finding::Unknown("not probed: needs CAP_BPF".into());
        let f = Features {
            missing_capabilities: vec!["CAP_BPF"],
            netfilter_program: np.clone(),
            netfilter_link: np.clone(),
            fentry_attach: np.clone(),
            kprobe_program: np,
            ..host_6_18()
        };
        let d = decide(&f);
        assert_eq!(d.auto, None);
        assert!(
            matches!(verdict(&d, Backend::Netfilter), Finding::Unknown(r) if r.contains("needs CAP_BPF"))
        );
        let mut out = Vec::new();
        write_table(&mut out, &f, &d).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("running without CAP_BPF"), "{text}");
        assert!(text.contains("not probed: needs CAP_BPF"), "{text}");
        assert!(d.summary.starts_with("cannot tell"), "{}", d.summary);
    }

    #[test]
    fn module_not_loaded_makes_fentry_unknown() {
        let f = Features {
            modules: modules(ModuleBtf::NotLoaded),
            ..bookworm_6_1()
        };
        let d = decide(&f);
        assert!(
            matches!(verdict(&d, Backend::Fentry), Finding::Unknown(r) if r.contains("modprobe nf_nat"))
        );
    }

    #[test]
    fn table_text_for_bookworm() {
        let f = bookworm_6_1();
        let d = decide(&f);
        let mut out = Vec::new();
        write_table(&mut out, &f, &d).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("kernel 6.1.0-50-cloud-amd64\n"), "{text}");
        assert!(text.contains("  nf_nat BTF "), "{text}");
        assert!(text.contains("/sys/kernel/btf/nf_nat"), "{text}");
        assert!(
            text.contains(
                "  netfilter  no       BPF netfilter programs (Linux >= 6.4): program type rejected"
            ),
            "{text}"
        );
        assert!(
            text.contains("  fentry     yes      fentry attaches; nf_nat_setup_info is in module BTF nf_nat (attach needs its BTF object fd); nf_ct_destroy is in module BTF nf_conntrack"),
            "{text}"
        );
        assert!(
            text.contains("\nbackend auto would use: fentry\n"),
            "{text}"
        );
    }

    #[test]
    fn table_text_for_host() {
        let f = host_6_18();
        let d = decide(&f);
        let mut out = Vec::new();
        write_table(&mut out, &f, &d).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("built in: described by vmlinux BTF"),
            "{text}"
        );
        assert!(
            text.contains("\nbackend auto would use: netfilter\n"),
            "{text}"
        );
        assert!(
            text.trim_end()
                .ends_with("nattrace run would use the netfilter backend")
        );
    }

    #[test]
    fn json_has_answers_and_decision() {
        let f = host_6_18();
        let d = decide(&f);
        let v = serde_json::json!({ "features": f, "decision": d });
        assert_eq!(v["features"]["fentry_attach"]["answer"], "no");
        assert_eq!(v["features"]["modules"][1]["btf"], "built_in");
        assert_eq!(v["decision"]["auto"], "netfilter");
    }

    #[test]
    fn return_program_encodes_mov_and_exit() {
        // SAFETY: an instruction is 8 plain bytes.
        let p = return_program(1).map(|i| unsafe { std::mem::transmute::<sys::Insn, u64>(i) });
        assert_eq!(p[0].to_le_bytes(), [0xb7, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(p[1].to_le_bytes(), [0x95, 0, 0, 0, 0, 0, 0, 0]);
    }

    /// The real probe on this host (kernel 6.18, see ../shared/TOOLCHAIN.md): netfilter yes,
    /// fentry refused (or unknown), kprobes not built. Skips elsewhere or without root.
    #[test]
    fn real_probe_matches_this_host() {
        let f = Features::probe();
        if !f.missing_capabilities.is_empty() {
            println!(
                "skipped: needs root (missing {}) to probe BPF",
                f.missing_capabilities.join(", ")
            );
            return;
        }
        if !f.kernel_release.starts_with("6.18.") {
            println!(
                "skipped: not the 6.18 development host ({})",
                f.kernel_release
            );
            return;
        }
        let d = decide(&f);
        assert!(f.vmlinux_btf.is_yes(), "{f:#?}");
        assert!(f.offsets.is_yes(), "{f:#?}");
        assert!(f.netfilter_program.is_yes(), "{f:#?}");
        assert!(f.netfilter_link.is_yes(), "{f:#?}");
        assert!(!f.fentry_attach.is_yes(), "{f:#?}");
        assert!(matches!(f.kprobe_events, Finding::No(_)), "{f:#?}");
        assert_eq!(d.auto, Some(Backend::Netfilter));
        assert_eq!(d.status(), Status::Ok);
    }
}
