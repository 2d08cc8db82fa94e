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
/// does not exit 0, if no record or more than one names the flow, or if another record
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
