//! Comparisons of nattrace's answers with the lab's truth, returning a message that says
//! what differed (tests panic with it, the demo prints it).

use std::time::{Duration, SystemTime};

use anyhow::{Result, bail};

use crate::agent::{Cli, Record};
use crate::conntrack_truth::DestroyTime;
use crate::traffic::FlowTruth;
use crate::util::{endpoint_arg, rfc3339, secs_between, unix_secs};

/// How a time is written on the command line (nattrace takes both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeArg {
    /// `2026-11-22T14:09:01.123456789Z`
    Rfc3339,
    /// `1795356809.123456789`
    Unix,
}

impl TimeArg {
    /// `t` in this format.
    #[must_use]
    pub fn format(self, t: SystemTime) -> String {
        match self {
            TimeArg::Rfc3339 => rfc3339(t),
            TimeArg::Unix => unix_secs(t),
        }
    }
}

fn describe_flow(flow: &FlowTruth) -> String {
    format!(
        "{} {} -> {} (external {} seen by the server at {})",
        flow.proto_name(),
        flow.internal,
        flow.destination,
        flow.external,
        rfc3339(flow.seen_at)
    )
}

/// Asks nattrace "who held `flow.external` at `at`" (with the flow's protocol) and returns
/// the one record that names the flow's subscriber and destination. Fails if the command
/// does not exit 0, if no record names the flow, or more than one does and not exactly one
/// of those was alive at `at`, or if another record
/// claims the same external address and destination at that very moment.
pub fn who_held(cli: &Cli, flow: &FlowTruth, at: SystemTime, time_arg: TimeArg) -> Result<Record> {
    let external = endpoint_arg(flow.external);
    let at_text = time_arg.format(at);
    let args = [
        "--external",
        external.as_str(),
        "--at",
        at_text.as_str(),
        "--proto",
        flow.proto_name(),
    ];
    let out = cli.query(&args)?;
    if out.status != Some(0) {
        bail!(
            "query {} exited with {:?} (expected 0) for {}; stderr: {}",
            args.join(" "),
            out.status,
            describe_flow(flow),
            out.stderr.trim()
        );
    }
    let records = out.bindings()?;
    let (matching, others): (Vec<&Record>, Vec<&Record>) = records
        .iter()
        .partition(|r| r.internal == flow.internal && r.destination == flow.destination);
    // The query's slack window can hold two bindings of the same flow back to back: conntrack
    // ended an entry and made a new one for the same tuple (seen once under qemu: a TCP flow's
    // first entry ended 5 ms before the server saw the connection). Who held the address at
    // that instant is the one alive then; the other must not be.
    let matching: Vec<&Record> = if matching.len() > 1 {
        matching.into_iter().filter(|r| r.alive_at(at)).collect()
    } else {
        matching
    };
    let dump = || {
        records
            .iter()
            .map(|r| r.raw.to_string())
            .collect::<Vec<_>>()
            .join("\n  ")
    };
    if matching.len() != 1 {
        bail!(
            "query {} returned {} record(s) naming {}; expected exactly one:\n  {}",
            args.join(" "),
            matching.len(),
            describe_flow(flow),
            dump()
        );
    }
    let found = matching[0].clone();
    if found.external != flow.external || found.proto != flow.proto {
        bail!(
            "record for {} has external {} proto {}: {}",
            describe_flow(flow),
            found.external,
            found.proto,
            found.raw
        );
    }
    if let Some(c) = others
        .iter()
        .find(|r| r.destination == flow.destination && r.alive_at(at))
    {
        bail!(
            "query {} also names another subscriber holding the same external address and destination at that moment: {}\n(truth: {})",
            args.join(" "),
            c.raw,
            describe_flow(flow)
        );
    }
    Ok(found)
}

/// Checks that `record` ended within `tolerance` of `truth_end`.
pub fn end_matches(
    record: &Record,
    flow: &FlowTruth,
    truth: DestroyTime,
    tolerance: Duration,
) -> Result<()> {
    let truth_end = truth.earliest;
    let Some(end) = record.end else {
        bail!(
            "binding of {} has no end, but conntrack destroyed it at {}: {}",
            describe_flow(flow),
            rfc3339(truth_end),
            record.raw
        );
    };
    if end + tolerance < truth.earliest || end > truth.latest + tolerance {
        bail!(
            "binding of {} ends at {}, {:+.3} s from conntrack's DESTROY in [{}, {}] (tolerance {tolerance:?}): {}",
            describe_flow(flow),
            rfc3339(end),
            secs_between(truth_end, end),
            rfc3339(truth.earliest),
            rfc3339(truth.latest),
            record.raw
        );
    }
    Ok(())
}

/// Checks that `record` started within `tolerance` of `truth_start`.
pub fn start_matches(
    record: &Record,
    flow: &FlowTruth,
    truth_start: SystemTime,
    tolerance: Duration,
) -> Result<()> {
    let d = secs_between(truth_start, record.start);
    if d.abs() > tolerance.as_secs_f64() {
        bail!(
            "binding of {} starts at {}, {d:+.3} s from conntrack's NEW at {} (tolerance {tolerance:?}): {}",
            describe_flow(flow),
            rfc3339(record.start),
            rfc3339(truth_start),
            record.raw
        );
    }
    Ok(())
}

/// Collects failures and counts checks, so that a test reports every failure at once.
#[derive(Debug, Default)]
pub struct Tally {
    /// Checks made, by name.
    pub passed: std::collections::BTreeMap<&'static str, usize>,
    /// Failures: check name and message.
    pub failures: Vec<(&'static str, String)>,
}

impl Tally {
    /// Records the outcome of one check named `what`.
    pub fn check(&mut self, what: &'static str, result: Result<()>) {
        match result {
            Ok(()) => *self.passed.entry(what).or_default() += 1,
            Err(e) => self.failures.push((what, format!("{e:#}"))),
        }
    }

    /// Number of passed checks named `what`.
    #[must_use]
    pub fn count(&self, what: &str) -> usize {
        self.passed.get(what).copied().unwrap_or(0)
    }

    /// Prints the totals; panics listing the first failures if there were any.
    pub fn finish(&self, test: &str) {
        println!("{test}: checks passed:");
        for (what, n) in &self.passed {
            println!("  {what:<28} {n}");
        }
        if !self.failures.is_empty() {
            let mut failed: std::collections::BTreeMap<&str, usize> =
                std::collections::BTreeMap::new();
            for (what, _) in &self.failures {
                *failed.entry(what).or_default() += 1;
            }
            let counts: Vec<String> = failed
                .iter()
                .map(|(what, n)| format!("  {what:<28} {n}"))
                .collect();
            let shown: Vec<String> = self
                .failures
                .iter()
                .take(20)
                .map(|(what, e)| format!("[{what}] {e}"))
                .collect();
            panic!(
                "{test}: {} check(s) failed:\n{}\nfirst {}:\n{}",
                self.failures.len(),
                counts.join("\n"),
                shown.len(),
                shown.join("\n")
            );
        }
    }
}

/// `nattrace keygen --out KEYS --name nattrace-lab`: the producer key pair of a lab run.
pub fn keygen(bin: &std::path::Path, keys: &std::path::Path) -> anyhow::Result<()> {
    let out = std::process::Command::new(bin)
        .arg("keygen")
        .arg("--out")
        .arg(keys)
        .args(["--name", "nattrace-lab"])
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "nattrace keygen exited {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `nattrace export` of `f` for `case` at the moment its server saw it, signed with the key
/// pair in `keys` (made with [`keygen`] first when there is none: the checkpoints are then
/// signed at export), then `nattrace verify BUNDLE --key` on a copy in another directory;
/// returns its report. The bundle's CSV must hold `f`'s internal address and port as the
/// client socket reported them (the truth).
pub fn export_and_verify(
    bin: &std::path::Path,
    data_dir: &std::path::Path,
    f: &FlowTruth,
    case: &str,
    keys: &std::path::Path,
) -> anyhow::Result<String> {
    use std::process::Command;
    let work = tempfile::tempdir()?;
    if !keys.join("nattrace.key").exists() {
        keygen(bin, keys)?;
    }
    let run = |args: &[&std::ffi::OsStr]| -> anyhow::Result<String> {
        let out = Command::new(bin).args(args).output()?;
        if !out.status.success() {
            anyhow::bail!(
                "nattrace {:?} exited {:?}: {}{}",
                args,
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    let bundle = work.path().join("case.nattrace");
    let external = crate::util::endpoint_arg(f.external);
    let at = TimeArg::Rfc3339.format(f.seen_at);
    run(&[
        os("export").as_os_str(),
        os("--data-dir").as_os_str(),
        data_dir.as_os_str(),
        os("--case").as_os_str(),
        os(case).as_os_str(),
        os("--out").as_os_str(),
        bundle.as_os_str(),
        os("--sign-key").as_os_str(),
        keys.join("nattrace.key").as_os_str(),
        os("--external").as_os_str(),
        os(&external).as_os_str(),
        os("--at").as_os_str(),
        os(&at).as_os_str(),
        os("--proto").as_os_str(),
        os(f.proto_name()).as_os_str(),
    ])?;
    let elsewhere = tempfile::tempdir()?;
    let copy = elsewhere.path().join("received.nattrace");
    std::fs::copy(&bundle, &copy)?;
    let report = run(&[
        os("verify").as_os_str(),
        copy.as_os_str(),
        os("--key").as_os_str(),
        keys.join("nattrace.pub").as_os_str(),
    ])?;
    if !report.contains("result:      VERIFIED")
        || !report.contains(&format!("case:        {case}"))
    {
        anyhow::bail!("verify report: {report}");
    }
    let tar = Command::new("tar")
        .arg("-xOf")
        .arg(&copy)
        .arg("records.csv")
        .output()?;
    let csv = String::from_utf8_lossy(&tar.stdout).into_owned();
    let want = format!("{},{}", f.internal.ip(), f.internal.port());
    if !csv.lines().skip(1).any(|l| l.contains(&want)) {
        anyhow::bail!("records.csv should hold the binding of {want}:\n{csv}");
    }
    Ok(report)
}
