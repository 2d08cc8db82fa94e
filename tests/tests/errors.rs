//! Failures say what is wrong, in one line, with the documented exit status (2 bad input,
//! 4 environment), and harm nothing already stored.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use nattrace_e2e::agent::{Agent, Cli, nattrace_bin, require_bin};
use nattrace_e2e::check::{TimeArg, who_held};
use nattrace_e2e::conntrack_truth::{ConntrackListener, delete_chunked, evict_expired, flow_key};
use nattrace_e2e::lab::{Lab, LabConfig, Ns, expiry_wait};
use nattrace_e2e::traffic::{FlowKind, FlowTruth, Servers, TrafficPlan, generate};
use nattrace_e2e::util::{Finished, describe, run_with_timeout};
use serde_json::Value;

const NOBODY: &str = "65534";
const TIMEOUT: Duration = Duration::from_secs(30);

/// Fails clearly if a tool these tests use is missing.
fn require_tools() {
    nattrace_e2e::util::require_tools(&["setpriv", "unshare", "mount", "chown", "sh"])
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// Runs `cmd`, expecting it to fail with `status` and a last stderr line that names one of
/// `keywords` (case-insensitive); prints that line.
fn expect_failure(what: &str, cmd: &mut Command, status: i32, keywords: &[&str]) -> Finished {
    let f = run_with_timeout(cmd, TIMEOUT).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    let shown = describe(cmd);
    assert!(
        !f.timed_out,
        "{what}: `{shown}` still ran after {TIMEOUT:?} (expected exit {status}); stdout {:?} stderr:\n{}",
        f.stdout, f.stderr
    );
    assert!(
        !f.stderr.contains("panicked"),
        "{what}: `{shown}` panicked:\n{}",
        f.stderr
    );
    let line = f
        .stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    assert_eq!(
        f.status,
        Some(status),
        "{what}: `{shown}` exit status; stderr:\n{}",
        f.stderr
    );
    let lower = line.to_lowercase();
    assert!(
        keywords.iter().any(|k| lower.contains(&k.to_lowercase())),
        "{what}: the message {line:?} names none of {keywords:?} (stderr:\n{})",
        f.stderr
    );
    println!("{what}: exit {status}: {line}");
    f
}

/// A copy of the nattrace binary that uid 65534 can execute.
fn nobody_bin() -> (tempfile::TempDir, PathBuf) {
    let bin = nattrace_bin();
    require_bin(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod temp dir");
    let copy = dir.path().join("nattrace");
    std::fs::copy(&bin, &copy).expect("copying nattrace");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
        .expect("chmod nattrace");
    (dir, copy)
}

/// `setpriv` arguments that run the rest as uid/gid 65534 without any capability.
fn nobody_args() -> [String; 4] {
    [
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
        "--inh-caps=-all".into(),
    ]
}

/// A data directory written by a real agent run: a few bindings of every kind, all ended.
fn recorded_data_dir(lab: &Lab) -> (tempfile::TempDir, Vec<FlowTruth>) {
    let servers = Servers::start(lab).expect("starting the servers");
    let listener = ConntrackListener::start(lab).expect("starting conntrack -E");
    let data = tempfile::tempdir().expect("temp data dir");
    let mut agent = Agent::start(lab, data.path(), &[]).expect("starting the agent");
    let plan = TrafficPlan {
        kinds: FlowKind::ALL.to_vec(),
        subscribers: vec![0, 1],
        flows_per_kind: 2,
        threads: 2,
    };
    let flows = generate(lab, &servers, &plan).expect("generating traffic");
    end_all(lab, &listener, &flows);
    agent.stop().expect("stopping the agent");
    (data, flows)
}

/// Ends every flow (timeouts, then chunked deletion) and waits until conntrack -E saw it.
fn end_all(lab: &Lab, listener: &ConntrackListener, flows: &[FlowTruth]) {
    std::thread::sleep(expiry_wait(lab));
    evict_expired(lab).expect("conntrack -L");
    let mut sources = lab.subscribers(false);
    sources.extend(lab.subscribers(true));
    delete_chunked(lab, &sources, &[6, 17, 1, 58]).expect("chunked conntrack -D");
    let keys: Vec<_> = flows.iter().map(flow_key).collect();
    let first = flows.iter().map(|f| f.sent_at).min().expect("flows");
    let missing = listener.wait_for_destroys(&keys, first, Duration::from_secs(15));
    assert!(
        missing.is_empty(),
        "lab truth incomplete: no DESTROY for {} flows",
        missing.len()
    );
    std::thread::sleep(Duration::from_millis(1500));
}

/// Every record of the subscribers used by `flows` over their time, sorted: what a data
/// directory answers.
fn snapshot(cli: &Cli, flows: &[FlowTruth]) -> Vec<Value> {
    let from = TimeArg::Unix
        .format(flows.iter().map(|f| f.sent_at).min().expect("flows") - Duration::from_secs(5));
    let to = TimeArg::Unix.format(SystemTime::now());
    let mut subscribers: Vec<String> = flows.iter().map(|f| f.internal.ip().to_string()).collect();
    subscribers.sort();
    subscribers.dedup();
    let mut all = Vec::new();
    for s in &subscribers {
        let out = cli
            .query(&["--internal", s, "--from", &from, "--to", &to])
            .expect("query --internal");
        assert_eq!(out.status, Some(0), "query --internal {s}: {}", out.stderr);
        all.extend(out.records);
    }
    all.sort_by_key(|v| v["id"].to_string());
    all
}

/// A one-subscriber lab, the nattrace binary and an empty data directory: what each case
/// starts from.
fn small_lab() -> (Lab, std::path::PathBuf, tempfile::TempDir) {
    require_tools();
    let lab = Lab::new(LabConfig {
        subscribers: 1,
        ..LabConfig::default()
    })
    .expect("building the lab");
    let bin = nattrace_bin();
    require_bin(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    let data = tempfile::tempdir().expect("temp data dir");
    (lab, bin, data)
}

#[test]
#[ignore = "privileged end-to-end test: run as root with `cargo xtask test`"]
fn run_without_privileges_exits_4() {
    require_tools();
    let lab = Lab::new(LabConfig {
        subscribers: 1,
        ..LabConfig::default()
    })
    .expect("building the lab");
    let (_bin_dir, bin) = nobody_bin();
    let data = tempfile::tempdir().expect("temp data dir");
    // Writable by the unprivileged user, so that privileges are the only problem.
    let status = Command::new("chown")
        .args([
            &format!("{NOBODY}:{NOBODY}"),
            &data.path().display().to_string(),
        ])
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "chown of the data dir failed"
    );
    let mut cmd = lab.command_in(Ns::Nat, "setpriv");
    cmd.args(nobody_args())
        .arg(&bin)
        .arg("run")
        .arg("--data-dir")
        .arg(data.path());
    expect_failure(
        "run as uid 65534 without capabilities",
        &mut cmd,
        4,
        &["root", "CAP_BPF"],
    );
}

#[test]
#[ignore = "privileged end-to-end test: run as root with `cargo xtask test`"]
fn run_without_btf_exits_4() {
    let (lab, bin, data) = small_lab();
    // A private mount namespace in which /sys/kernel/btf is an empty tmpfs.
    let mut cmd = lab.command_in(Ns::Nat, "unshare");
    cmd.args([
        "-m",
        "sh",
        "-c",
        "mount -t tmpfs none /sys/kernel/btf && exec \"$0\" run --data-dir \"$1\"",
    ])
    .arg(&bin)
    .arg(data.path());
    expect_failure("run without /sys/kernel/btf", &mut cmd, 4, &["BTF"]);
}

#[test]
#[ignore = "privileged end-to-end test: run as root with `cargo xtask test`"]
fn run_with_read_only_data_dir_exits_4() {
    let (lab, bin, data) = small_lab();
    // Root ignores permission bits: a read-only mount is what makes it unwritable.
    let mut cmd = lab.command_in(Ns::Nat, "unshare");
    cmd.args([
        "-m",
        "sh",
        "-c",
        "mount -t tmpfs -o ro none \"$1\" && exec \"$0\" run --data-dir \"$1\"",
    ])
    .arg(&bin)
    .arg(data.path());
    expect_failure(
        "run with a read-only data dir",
        &mut cmd,
        4,
        &["read-only", "writ", "permission", "denied"],
    );
}

#[test]
#[ignore = "privileged end-to-end test: run as root with `cargo xtask test`"]
fn second_agent_is_refused_and_harms_nothing() {
    let lab = Lab::new(LabConfig {
        subscribers: 4,
        ..LabConfig::default()
    })
    .expect("building the lab");
    let servers = Servers::start(&lab).expect("starting the servers");
    let listener = ConntrackListener::start(&lab).expect("starting conntrack -E");
    let data = tempfile::tempdir().expect("temp data dir");
    let mut agent = Agent::start(&lab, data.path(), &[]).expect("starting the first agent");
    let cli = agent.cli.clone();
    let plan = TrafficPlan {
        kinds: FlowKind::ALL.to_vec(),
        subscribers: vec![0, 1],
        flows_per_kind: 2,
        threads: 2,
    };
    let flows = generate(&lab, &servers, &plan).expect("generating traffic");
    end_all(&lab, &listener, &flows);
    let before = snapshot(&cli, &flows);
    assert!(
        before.len() >= flows.len(),
        "{} records for {} flows before the second agent",
        before.len(),
        flows.len()
    );

    let mut second = lab.command_in(Ns::Nat, &cli.bin);
    second.arg("run").arg("--data-dir").arg(data.path());
    expect_failure(
        "a second agent on the same data dir",
        &mut second,
        4,
        // The data directory's lock, or (netfilter backend, same namespace) the hook slot
        // the first agent holds; either way the first agent is named as the reason.
        &["lock", "another nattrace agent"],
    );

    assert_eq!(
        snapshot(&cli, &flows),
        before,
        "the stored bindings changed after the refused second agent"
    );
    assert!(
        agent.is_running(),
        "the first agent died when the second one was refused; stderr:\n{}",
        agent.stderr()
    );
    // The first agent still captures.
    let plan = TrafficPlan {
        kinds: FlowKind::ALL.to_vec(),
        subscribers: vec![2, 3],
        flows_per_kind: 1,
        threads: 2,
    };
    for f in generate(&lab, &servers, &plan).expect("more traffic") {
        let mut r = who_held(&cli, &f, f.seen_at, TimeArg::Rfc3339);
        let deadline = f.seen_at + Duration::from_secs(1);
        while r.is_err() && SystemTime::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            r = who_held(&cli, &f, f.seen_at, TimeArg::Rfc3339);
        }
        r.unwrap_or_else(|e| {
            panic!("the first agent stopped capturing after the second was refused: {e:#}")
        });
    }
    agent.stop().expect("stopping the first agent");
    assert_eq!(
        snapshot(&cli, &flows),
        before,
        "the stored bindings changed after the first agent stopped"
    );
}

#[test]
#[ignore = "privileged end-to-end test: run as root with `cargo xtask test`"]
fn bad_query_input_exits_2() {
    let lab = Lab::new(LabConfig {
        subscribers: 2,
        ..LabConfig::default()
    })
    .expect("building the lab");
    let (data, _flows) = recorded_data_dir(&lab);
    let cli = Cli::new(&nattrace_bin(), data.path());
    let now = TimeArg::Rfc3339.format(SystemTime::now());
    let earlier = TimeArg::Rfc3339.format(SystemTime::now() - Duration::from_secs(60));
    let cases: [(&str, Vec<&str>, &[&str]); 4] = [
        (
            "unparsable time",
            vec!["--external", "203.0.113.7:20000", "--at", "yesterday-ish"],
            &["time", "yesterday-ish"],
        ),
        (
            "unparsable address",
            vec!["--external", "203.0.113.300:20000", "--at", &now],
            &["address", "203.0.113.300"],
        ),
        (
            "port 70000",
            vec!["--external", "203.0.113.7:70000", "--at", &now],
            &["port", "70000"],
        ),
        (
            "--to before --from",
            vec![
                "--internal",
                "100.64.0.10",
                "--from",
                &now,
                "--to",
                &earlier,
            ],
            &["--to", "--from", "before", "after"],
        ),
    ];
    for (what, args, keywords) in cases {
        expect_failure(what, cli.command("query").args(&args), 2, keywords);
    }
    let missing = Path::new("/nonexistent").join(format!("nattrace-e2e-{}", std::process::id()));
    let cli_missing = Cli::new(&nattrace_bin(), &missing);
    expect_failure(
        "missing data dir",
        cli_missing
            .command("query")
            .args(["--external", "203.0.113.7:20000", "--at", &now]),
        2,
        &["data", "exist", "not found", "no such", "nattrace-e2e-"],
    );
}

#[test]
#[ignore = "privileged end-to-end test: run as root with `cargo xtask test`"]
fn query_without_read_access_exits_4() {
    require_tools();
    let lab = Lab::new(LabConfig {
        subscribers: 2,
        ..LabConfig::default()
    })
    .expect("building the lab");
    let (data, flows) = recorded_data_dir(&lab);
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o700))
        .expect("chmod 0700");
    let (_bin_dir, bin) = nobody_bin();
    let f = &flows[0];
    let mut cmd = Command::new("setpriv");
    cmd.args(nobody_args())
        .arg(&bin)
        .args(["query", "--data-dir"])
        .arg(data.path())
        .args([
            "--external",
            &f.external.to_string(),
            "--at",
            &TimeArg::Rfc3339.format(f.seen_at),
        ]);
    expect_failure(
        "query as uid 65534 of a root-only data dir",
        &mut cmd,
        4,
        &["permission", "denied", "access", "read"],
    );
    // And root still reads it.
    who_held(
        &Cli::new(&nattrace_bin(), data.path()),
        f,
        f.seen_at,
        TimeArg::Rfc3339,
    )
    .expect("root query after the refused one");
}
