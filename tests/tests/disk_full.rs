//! A disk that refuses writes loses no record and is not silent: the agent's data directory is
//! a tmpfs too small for the traffic, so segment writes fail with ENOSPC; the agent logs it,
//! keeps the records in memory, records a `disk_error` loss, and writes everything once the
//! file system has room again. Every binding the server saw is then found with the right
//! subscriber (truth from the sockets and the server, not from nattrace).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nattrace_e2e::agent::{Agent, Losses};
use nattrace_e2e::check::{TimeArg, who_held};
use nattrace_e2e::lab::{Lab, LabConfig};
use nattrace_e2e::traffic::{Servers, udp_burst};

/// Unmounts the tmpfs on drop, even when the test fails.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0750"),
                "nattrace-test",
            ])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(ok.success(), "mount tmpfs on {}", at.display());
        Tmpfs(at.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("run mount");
        assert!(ok.success(), "remount tmpfs {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
#[ignore = "privileged end-to-end test: run as root with `cargo xtask test`"]
fn full_disk_loses_no_record() {
    let lab = Lab::new(LabConfig::default()).expect("building the lab");
    let servers = Servers::start(&lab).expect("starting the servers");
    let base = tempfile::tempdir().expect("temp dir");
    // Three pages: the lock file, the segment header and a little more.
    let fs = Tmpfs::mount(base.path(), "12k");
    let data = base.path().join("data");
    let mut agent = Agent::start(&lab, &data, &[]).expect("starting the agent");
    let cli = agent.cli.clone();

    // Enough bindings to overflow a page of compressed records, in a few bursts.
    let mut flows = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.stderr().contains("writing segment failed") {
        assert!(
            Instant::now() < deadline,
            "the data dir never filled up; agent stderr:\n{}",
            agent.stderr()
        );
        flows.extend(
            udp_burst(&lab, &servers, 500, false)
                .expect("UDP burst")
                .observed,
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // More bindings while the disk is full: they must be kept in memory.
    flows.extend(
        udp_burst(&lab, &servers, 500, false)
            .expect("UDP burst")
            .observed,
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        agent.is_running(),
        "the agent must survive a full disk:\n{}",
        agent.stderr()
    );

    fs.resize("64m");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.stderr().contains("writing segments again") {
        assert!(
            Instant::now() < deadline,
            "the agent never wrote again:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.stop().expect("stopping the agent");

    let stats = cli.stats().expect("nattrace stats");
    let losses = Losses::from_stats(&stats).expect("stats losses");
    println!("{} flows; stats: {stats}", flows.len());
    assert!(
        losses.disk_error >= 1,
        "the failed writes are not counted: {stats}"
    );
    let mut missing = Vec::new();
    for f in &flows {
        if let Err(e) = who_held(&cli, f, f.seen_at, TimeArg::Rfc3339) {
            missing.push(format!("{e:#}"));
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} bindings lost or wrong after the disk filled up, e.g.:\n{}",
        missing.len(),
        flows.len(),
        missing
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
