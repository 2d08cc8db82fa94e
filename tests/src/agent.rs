//! The real `nattrace` binary: the agent in the lab's NAT namespace, and the query, stats and
//! coverage commands, driven through their command-line contract only.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::lab::{Lab, Ns};
use crate::traffic::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
use crate::util::{Finished, describe, parse_rfc3339, run_with_timeout, signal};

/// How long the agent may take to print `ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a query, stats or coverage command may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// The `nattrace` binary to test: `$NATTRACE_BIN`, else the workspace's release build.
#[must_use]
pub fn nattrace_bin() -> PathBuf {
    std::env::var_os("NATTRACE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/nattrace"))
}

/// Environment variable naming the capture backend every agent of the tests uses
/// (`nattrace run --backend VALUE`); unset or empty: nattrace's default.
pub const BACKEND_ENV: &str = "NATTRACE_BACKEND";

/// The `--backend VALUE` arguments [`Agent::start_with`] adds for `backend` (the value of
/// [`BACKEND_ENV`]): none when it is unset or empty, or when `extra` already chooses one
/// (`--backend X` or `--backend=X`).
#[must_use]
pub fn backend_args(extra: &[&str], backend: Option<&str>) -> Vec<String> {
    let chosen = extra
        .iter()
        .any(|a| *a == "--backend" || a.starts_with("--backend="));
    match backend {
        Some(b) if !b.is_empty() && !chosen => vec!["--backend".into(), b.into()],
        _ => Vec::new(),
    }
}

/// Fails with a clear message if the binary is missing.
pub fn require_bin(bin: &Path) -> Result<()> {
    if !bin.is_file() {
        bail!(
            "nattrace binary not found at {} (build it with `cargo build --release -p tracer-user`, \
             or point NATTRACE_BIN at it)",
            bin.display()
        );
    }
    Ok(())
}

/// The read side of the command line, bound to a binary and a data directory.
#[derive(Clone, Debug)]
pub struct Cli {
    /// The `nattrace` binary.
    pub bin: PathBuf,
    /// The data directory.
    pub data_dir: PathBuf,
}

/// Output of one `nattrace query … --format json`.
#[derive(Debug)]
pub struct QueryOutput {
    /// Exit status (0 results, 1 none, 2 bad input, 3 partial, 4 environment); `None` if
    /// killed by a signal.
    pub status: Option<i32>,
    /// One JSON object per stdout line.
    pub records: Vec<Value>,
    /// Everything printed on stderr (e.g. the coverage warning).
    pub stderr: String,
}

impl QueryOutput {
    /// The records as typed bindings.
    pub fn bindings(&self) -> Result<Vec<Record>> {
        self.records.iter().map(Record::from_json).collect()
    }
}

impl Cli {
    /// A CLI on `data_dir` with `bin`.
    #[must_use]
    pub fn new(bin: &Path, data_dir: &Path) -> Cli {
        Cli {
            bin: bin.to_owned(),
            data_dir: data_dir.to_owned(),
        }
    }

    /// `nattrace SUBCOMMAND --data-dir DIR`, to add arguments to.
    #[must_use]
    pub fn command(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg(subcommand).arg("--data-dir").arg(&self.data_dir);
        cmd
    }

    /// Runs `nattrace query --data-dir DIR ARGS… --format json`. Only failing to run it, or
    /// stdout lines that are not JSON, are errors; the exit status is the caller's to judge.
    pub fn query(&self, args: &[&str]) -> Result<QueryOutput> {
        let mut cmd = self.command("query");
        cmd.args(args).args(["--format", "json"]);
        let f = run_with_timeout(&mut cmd, CLI_TIMEOUT)?;
        if f.timed_out {
            bail!("`{}` did not finish within {CLI_TIMEOUT:?}", describe(&cmd));
        }
        let records = f
            .stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).with_context(|| {
                    format!("`{}` printed a line that is not JSON: {l}", describe(&cmd))
                })
            })
            .collect::<Result<Vec<Value>>>()?;
        Ok(QueryOutput {
            status: f.status,
            records,
            stderr: f.stderr,
        })
    }

    /// Runs `nattrace query --data-dir DIR ARGS… --format table` for people to read.
    pub fn query_table(&self, args: &[&str]) -> Result<Finished> {
        let mut cmd = self.command("query");
        cmd.args(args).args(["--format", "table"]);
        run_with_timeout(&mut cmd, CLI_TIMEOUT)
    }

    /// Runs `nattrace stats --data-dir DIR --format json` and returns its JSON (exit 0 required).
    pub fn stats(&self) -> Result<Value> {
        self.json_command("stats", &[])
    }

    /// Runs `nattrace coverage --data-dir DIR --from T --to T --format json` (exit 0 required).
    pub fn coverage(&self, from: &str, to: &str) -> Result<Value> {
        self.json_command("coverage", &["--from", from, "--to", to])
    }

    fn json_command(&self, subcommand: &str, args: &[&str]) -> Result<Value> {
        let mut cmd = self.command(subcommand);
        cmd.args(args).args(["--format", "json"]);
        let f = run_with_timeout(&mut cmd, CLI_TIMEOUT)?;
        if f.status != Some(0) {
            bail!(
                "`{}` exited with {:?}: {}",
                describe(&cmd),
                f.status,
                f.stderr.trim()
            );
        }
        serde_json::from_str(f.stdout.trim())
            .with_context(|| format!("`{}` did not print JSON: {}", describe(&cmd), f.stdout))
    }
}

/// Loss counters of `nattrace stats`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Losses {
    /// Starts lost because the eBPF ring buffer was full.
    pub ring_full: u64,
    /// Ends lost because the eBPF ring buffer was full (fentry and kprobe backends).
    pub ring_full_end: u64,
    /// ctnetlink events lost to socket overruns.
    pub netlink_overrun: u64,
    /// Records lost to disk errors.
    pub disk_error: u64,
}

impl Losses {
    /// Reads `losses` of a stats object.
    pub fn from_stats(stats: &Value) -> Result<Losses> {
        let l = &stats["losses"];
        let get = |k: &str| {
            l[k].as_u64()
                .ok_or_else(|| anyhow!("stats.losses.{k} missing or not a number in {stats}"))
        };
        Ok(Losses {
            ring_full: get("ring_full")?,
            ring_full_end: get("ring_full_end")?,
            netlink_overrun: get("netlink_overrun")?,
            disk_error: get("disk_error")?,
        })
    }

    /// True when nothing was lost.
    #[must_use]
    pub fn is_zero(&self) -> bool {
        *self == Losses::default()
    }
}

/// One binding as `nattrace query --format json` prints it.
#[derive(Clone, Debug)]
pub struct Record {
    /// `id` as printed (number or string), as text.
    pub id: String,
    /// IANA protocol number.
    pub proto: u8,
    /// Subscriber address and port (echo id for ICMP).
    pub internal: SocketAddr,
    /// Public address and port (echo id for ICMP).
    pub external: SocketAddr,
    /// Destination address and port (0 for ICMP).
    pub destination: SocketAddr,
    /// Start.
    pub start: SystemTime,
    /// End; `None` while open.
    pub end: Option<SystemTime>,
    /// The start is an estimate.
    pub start_approximate: bool,
    /// The end is an estimate.
    pub end_approximate: bool,
    /// "ring", "destroy" or "dump".
    pub start_source: String,
    /// The JSON object as printed.
    pub raw: Value,
}

fn proto_of(v: &Value) -> Result<u8> {
    if let Some(n) = v.as_u64() {
        return Ok(u8::try_from(n)?);
    }
    match v.as_str().map(str::to_ascii_lowercase).as_deref() {
        Some("tcp") => Ok(IPPROTO_TCP),
        Some("udp") => Ok(IPPROTO_UDP),
        Some("icmp") => Ok(IPPROTO_ICMP),
        Some("icmpv6") => Ok(IPPROTO_ICMPV6),
        Some(other) => other
            .parse()
            .map_err(|_| anyhow!("unknown proto {other:?}")),
        None => bail!("proto missing"),
    }
}

impl Record {
    /// Reads a record, tolerating numbers-as-strings where the contract leaves it open.
    pub fn from_json(v: &Value) -> Result<Record> {
        let text = |k: &str| {
            v[k].as_str()
                .ok_or_else(|| anyhow!("field {k} missing or not a string in {v}"))
        };
        let port = |k: &str| -> Result<u16> {
            let p = &v[k];
            let n = p
                .as_u64()
                .or_else(|| p.as_str().and_then(|s| s.parse().ok()));
            u16::try_from(n.ok_or_else(|| anyhow!("field {k} missing or not a port in {v}"))?)
                .map_err(Into::into)
        };
        let ip = |k: &str| -> Result<IpAddr> {
            text(k)?
                .parse()
                .with_context(|| format!("field {k} is not an IP in {v}"))
        };
        let flag = |k: &str| {
            v[k].as_bool()
                .ok_or_else(|| anyhow!("field {k} missing or not a boolean in {v}"))
        };
        let end = match &v["end"] {
            Value::Null => None,
            Value::String(s) => Some(parse_rfc3339(s)?),
            other => bail!("field end is {other}, expected RFC 3339 or null in {v}"),
        };
        Ok(Record {
            id: match &v["id"] {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => bail!("field id is {other} in {v}"),
            },
            proto: proto_of(&v["proto"]).with_context(|| format!("in {v}"))?,
            internal: SocketAddr::new(ip("internal_ip")?, port("internal_port")?),
            external: SocketAddr::new(ip("external_ip")?, port("external_port")?),
            destination: SocketAddr::new(ip("destination_ip")?, port("destination_port")?),
            start: parse_rfc3339(text("start")?)?,
            end,
            start_approximate: flag("start_approximate")?,
            end_approximate: flag("end_approximate")?,
            start_source: text("start_source")?.to_owned(),
            raw: v.clone(),
        })
    }

    /// True when the binding was alive at `t` (start ≤ t ≤ end, open counts as alive).
    #[must_use]
    pub fn alive_at(&self, t: SystemTime) -> bool {
        self.start <= t && self.end.is_none_or(|e| t <= e)
    }
}

/// The agent, `nattrace run`, in the lab's NAT namespace. Dropping it stops it.
pub struct Agent {
    child: Option<Child>,
    /// The query side on the same binary and data directory.
    pub cli: Cli,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    /// When `ready` was read.
    pub ready_at: SystemTime,
}

impl Agent {
    /// Starts `nattrace run --data-dir DIR EXTRA…` in the NAT namespace with [`nattrace_bin`]
    /// and waits for `ready` (at most [`READY_TIMEOUT`]).
    pub fn start(lab: &Lab, data_dir: &Path, extra: &[&str]) -> Result<Agent> {
        Agent::start_with(&nattrace_bin(), lab, data_dir, extra)
    }

    /// Like [`Agent::start`] with a given binary.
    ///
    /// When `NATTRACE_BACKEND` ([`BACKEND_ENV`]) is set and not empty, `--backend VALUE` is
    /// appended, unless `extra` already contains `--backend`: the same tests then run against
    /// the backend it names (`cargo xtask vm-test` runs them once per backend a kernel offers).
    /// A value `nattrace run` does not accept makes the start fail with its message.
    pub fn start_with(bin: &Path, lab: &Lab, data_dir: &Path, extra: &[&str]) -> Result<Agent> {
        require_bin(bin)?;
        let mut cmd = lab.command_in(Ns::Nat, bin);
        cmd.arg("run").arg("--data-dir").arg(data_dir).args(extra);
        let backend = std::env::var(BACKEND_ENV).ok();
        cmd.args(backend_args(extra, backend.as_deref()));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = describe(&cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{what}`"))?;
        let stderr: Arc<Mutex<String>> = Arc::default();
        let (ready_tx, ready_rx) = mpsc::channel();
        let out = child.stdout.take().expect("stdout piped");
        let err = child.stderr.take().expect("stderr piped");
        let verbose = std::env::var_os("NATTRACE_E2E_VERBOSE").is_some();
        let readers = vec![
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if line.trim() == "ready" {
                        let _ = ready_tx.send(SystemTime::now());
                    }
                }
            }),
            {
                let stderr = stderr.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(err).lines().map_while(Result::ok) {
                        if verbose {
                            eprintln!("agent| {line}");
                        }
                        let mut s = stderr.lock().expect("stderr poisoned");
                        s.push_str(&line);
                        s.push('\n');
                    }
                })
            },
        ];
        let mut agent = Agent {
            child: Some(child),
            cli: Cli::new(bin, data_dir),
            stderr,
            readers,
            ready_at: SystemTime::now(),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match ready_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(at) => {
                    agent.ready_at = at;
                    return Ok(agent);
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    if let Some(status) = agent.child.as_mut().expect("child present").try_wait()? {
                        agent.child = None;
                        agent.join_readers();
                        bail!(
                            "`{what}` exited ({status}) before printing ready; stderr:\n{}",
                            agent.stderr()
                        );
                    }
                }
                Err(_) => bail!(
                    "`{what}` did not print ready within {READY_TIMEOUT:?}; stderr:\n{}",
                    agent.stderr()
                ),
            }
        }
    }

    /// The agent's process id (`ip netns exec` execs it in place), while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the agent printed on stderr so far.
    #[must_use]
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr poisoned").clone()
    }

    /// True while the agent process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends SIGTERM and expects exit status 0 within [`STOP_TIMEOUT`]; otherwise kills it
    /// and fails with its stderr.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("the agent is not running")
        };
        signal(child.id(), libc::SIGTERM)?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.join_readers();
        match status {
            Some(s) if s.success() => Ok(()),
            Some(s) => bail!(
                "the agent exited with {s} after SIGTERM (expected 0); stderr:\n{}",
                self.stderr()
            ),
            None => bail!(
                "the agent did not exit within {STOP_TIMEOUT:?} of SIGTERM (killed); stderr:\n{}",
                self.stderr()
            ),
        }
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let result = self.stop();
            if std::thread::panicking() || result.is_err() {
                eprintln!(
                    "---- agent stderr ----\n{}----------------------",
                    self.stderr()
                );
            }
        } else if std::thread::panicking() {
            eprintln!(
                "---- agent stderr ----\n{}----------------------",
                self.stderr()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_contract_record() {
        let v: Value = serde_json::from_str(
            r#"{"id":7,"proto":"icmpv6","internal_ip":"fd00:64::10","internal_port":15106,
                "external_ip":"2001:db8:1::1","external_port":15106,"destination_ip":"2001:db8:1::2",
                "destination_port":0,"start":"2026-11-22T14:09:01.5Z","end":null,
                "start_approximate":false,"end_approximate":false,"start_source":"ring","zone":0,
                "mark":0,"packets_out":1,"bytes_out":64,"packets_in":1,"bytes_in":64}"#,
        )
        .unwrap();
        let r = Record::from_json(&v).unwrap();
        assert_eq!(r.proto, IPPROTO_ICMPV6);
        assert_eq!(r.internal.to_string(), "[fd00:64::10]:15106");
        assert!(r.end.is_none());
        assert!(r.alive_at(r.start));
        assert_eq!(r.id, "7");
    }

    #[test]
    fn reads_losses() {
        let v: Value = serde_json::from_str(
            r#"{"losses":{"ring_full":3,"ring_full_end":0,"netlink_overrun":0,"disk_error":0}}"#,
        )
        .unwrap();
        assert_eq!(Losses::from_stats(&v).unwrap().ring_full, 3);
        assert!(Losses::from_stats(&serde_json::json!({})).is_err());
    }

    #[test]
    fn backend_from_the_environment() {
        let none: Vec<String> = Vec::new();
        assert_eq!(backend_args(&[], None), none);
        assert_eq!(backend_args(&[], Some("")), none);
        assert_eq!(
            backend_args(&["--segment-max-age", "4s"], Some("fentry")),
            ["--backend", "fentry"]
        );
        // The test's own choice wins.
        assert_eq!(
            backend_args(&["--backend", "netfilter"], Some("fentry")),
            none
        );
        assert_eq!(backend_args(&["--backend=netfilter"], Some("kprobe")), none);
    }
}
