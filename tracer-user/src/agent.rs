//! `nattrace run`: the agent. Attaches the capture backend in the current network namespace,
//! listens for conntrack DESTROY events, merges starts and ends into bindings, reconciles with
//! conntrack dumps, and writes everything, with coverage and losses, to the data directory.

use std::{
    io::Write as _,
    os::fd::{AsRawFd, RawFd},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use log::{debug, error, info, warn};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    task::JoinHandle,
};

use crate::{
    binding::Binding,
    capture::{Backend, Capture, CapturedEnd, Lost, Probed, StartEvent},
    clock::{BootToUtc, now_unix_ns},
    conntrack::{self, ConntrackSysctls, CtEntry, DestroyListener, RecvOutcome},
    exit::{Status, UserError},
    preflight,
    storage::{CoverageEvent, LossCause, Writer, WriterOptions},
    tracker::Tracker,
};

/// Options of `nattrace run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Directory of the segment files (created if missing).
    #[arg(long, env = "NATTRACE_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Ring-buffer size in bytes between the eBPF program and the agent: a power-of-two
    /// multiple of the page size. Larger rides out longer bursts.
    #[arg(long, default_value_t = 16 * 1024 * 1024, value_parser = parse_ring_bytes)]
    pub ring_bytes: u32,
    /// Receive buffer of the ctnetlink DESTROY listener, in bytes. Too small a buffer loses
    /// end events when many bindings end at once (they are then closed by reconciliation).
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub netlink_rcvbuf: usize,
    /// How often the open bindings are reconciled with a dump of the conntrack table.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub reconcile_interval: Duration,
    /// Seal the active segment and start a new one at least this often. Shorter means more,
    /// smaller segments (less per-segment compression) and older data sealed sooner.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub segment_max_age: Duration,
    /// Sign every sealed segment's checkpoint with this private key (from nattrace keygen)
    /// [default: sign_key of DIR/nattrace.toml; neither: segments are unsigned].
    #[arg(long, value_name = "FILE")]
    pub sign_key: Option<PathBuf>,
    /// Capture backend: `auto` (the first this kernel offers of netfilter, fentry,
    /// kprobe; `nattrace probe` shows which and why), `netfilter` (BPF netfilter link,
    /// Linux >= 6.4, ends from ctnetlink), `fentry` (fexit/fentry on the NAT set-up and
    /// conntrack destroy functions) or `kprobe` (kprobes on conntrack confirm and destroy).
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
}

fn parse_ring_bytes(s: &str) -> Result<u32, String> {
    let v: u32 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a byte count: {e}"))?;
    // SAFETY: sysconf has no preconditions.
    let page = u32::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    if v < page || !v.is_power_of_two() {
        return Err(format!(
            "{v} must be a power of two and at least the page size ({page})"
        ));
    }
    Ok(v)
}

/// Attaches the first candidate the kernel accepts (some refusals, e.g. of trampolines,
/// show only at load time), with the ctnetlink DESTROY listener when the backend does not
/// capture ends itself. The listener is opened before attaching, so no end of a captured
/// binding is missed.
fn attach_first(
    candidates: &[Probed],
    args: &RunArgs,
) -> anyhow::Result<(Box<dyn Capture>, Option<DestroyListener>)> {
    let mut last_error = None;
    for probed in candidates {
        let listener = match probed.backend() {
            Backend::Netfilter => {
                Some(DestroyListener::new(args.netlink_rcvbuf).map_err(environment)?)
            }
            _ => None,
        };
        match probed.attach(args.ring_bytes) {
            Ok(capture) => {
                debug_assert_eq!(listener.is_none(), capture.captures_ends());
                return Ok((Box::new(capture), listener));
            }
            Err(e @ crate::capture::CaptureError::Unsupported { .. })
                if args.backend == Backend::Auto =>
            {
                info!(
                    "backend {}: ruled out at load: {}",
                    probed.backend().name(),
                    with_causes(&e)
                );
                last_error = Some(e);
            }
            Err(e) => return Err(environment(e).into()),
        }
    }
    Err(environment(last_error.expect("at least one candidate")).into())
}

/// How often the ring buffer and the listener are drained when no wakeup came, and pending
/// work (early ends, loss counters) is looked at.
const TICK: Duration = Duration::from_millis(100);
/// How often buffered records are written out (they become queryable then).
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// How often the clock offset is re-measured and a heartbeat written.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How often the agent signs the audit log's head over entries appended without it.
const AUDIT_SIGN_EVERY: Duration = Duration::from_secs(3600);
/// How often the agent applies the data directory's retention setting.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

/// Deletes sealed segments past `keep` (see `storage::retention`), logging what it did.
fn apply_retention_logged(dir: &std::path::Path, keep: Duration) {
    match crate::storage::retention::apply_retention(dir, keep, now_unix_ns(), false) {
        Ok(report) => {
            for e in &report.deleted {
                log::info!("retention: deleted segment {:08} (ledger updated)", e.seq);
            }
            for p in &report.problems {
                log::warn!(
                    "retention: {}: offset {}: {}",
                    p.path.display(),
                    p.offset,
                    p.cause
                );
            }
        }
        Err(e) => log::warn!("retention failed: {}", with_causes(&e)),
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub fn run(args: &RunArgs) -> anyhow::Result<Status> {
    preflight::check_privileges()?;
    let candidates = Probed::candidates(args.backend).map_err(environment)?;
    let options = WriterOptions {
        max_segment_age: args.segment_max_age,
        ..WriterOptions::default()
    };
    let config =
        crate::config::load(&args.data_dir).map_err(|e| UserError::bad_input(e.to_string()))?;
    let signer = config
        .signer(args.sign_key.as_deref())
        .map_err(|e| UserError::environment(format!("signing key: {}", with_causes(&e))))?;
    let started_ns = now_unix_ns();

    // Attach before the data directory is touched: some refusals (e.g. of trampolines) show
    // only when loading. Records wait in the ring buffer meanwhile. On an error below, the
    // capture detaches and the sysctls are restored as they drop.
    let sysctls = ConntrackSysctls::enable().map_err(environment)?;
    let (capture, listener) = attach_first(&candidates, args)?;
    let attached_ns = now_unix_ns();
    let backend = capture.backend();

    let mut writer = Writer::open_with_options(&args.data_dir, options).map_err(|e| {
        UserError::environment(format!(
            "cannot use data dir {}: {}",
            args.data_dir.display(),
            with_causes(&e)
        ))
    })?;
    let signer = signer.map(std::sync::Arc::new);
    if let Some(key) = &signer {
        let name = key.name().to_owned();
        let signed = writer.sign_with(std::sync::Arc::clone(key)).map_err(|e| {
            UserError::environment(format!("signing checkpoints: {}", with_causes(&e)))
        })?;
        log::info!(
            "signing checkpoints with key {name}{}",
            if signed > 0 {
                format!(" ({signed} segments sealed without a checkpoint signed now)")
            } else {
                String::new()
            }
        );
    }
    let previous_open = writer.inherited().to_vec();
    writer.append_event(CoverageEvent::AgentStart {
        t_ns: started_ns,
        pid: std::process::id(),
    });
    writer.append_event(CoverageEvent::Attached {
        t_ns: attached_ns,
        backend: backend.to_owned(),
    });

    let mut agent = Agent {
        writer,
        tracker: Tracker::new(),
        capture,
        listener,
        clock: BootToUtc::measure(),
        lost_seen: Lost::default(),
        out: Vec::new(),
        starts: Vec::new(),
        captured_ends: Vec::new(),
        ends: Vec::new(),
        disk_failing: false,
    };
    agent.start_up(previous_open)?;
    info!(
        "attached ({backend} backend), {} open bindings; clock offset error <= {} ns",
        agent.tracker.open_count(),
        agent.clock.error_ns
    );
    println!("ready");
    std::io::stdout().flush().ok();
    notify_systemd_ready();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(agent.event_loop(
        args.reconcile_interval,
        config.retention,
        signer,
        args.data_dir.clone(),
    ));
    let status = agent.shut_down();
    sysctls
        .restore()
        .map_err(|e| anyhow::anyhow!("restoring conntrack sysctls: {e}"))?;
    result?;
    status
}

struct Agent {
    writer: Writer,
    tracker: Tracker,
    capture: Box<dyn Capture>,
    /// The ctnetlink DESTROY listener, for backends that do not capture ends themselves.
    listener: Option<DestroyListener>,
    clock: BootToUtc,
    /// Ring-buffer losses already recorded.
    lost_seen: Lost,
    out: Vec<Binding>,
    starts: Vec<StartEvent>,
    captured_ends: Vec<CapturedEnd>,
    ends: Vec<CtEntry>,
    /// The last flush failed; cleared by the next success.
    disk_failing: bool,
}

/// A conntrack dump running on a blocking thread.
type DumpTask = JoinHandle<Result<Vec<CtEntry>, conntrack::ConntrackError>>;

/// Raw fd for tokio's readiness; the owner outlives the registration.
struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl Agent {
    /// First reconciliation: adopt bindings earlier runs left open, and record entries that
    /// existed before the agent started.
    fn start_up(&mut self, previous_open: Vec<Binding>) -> anyhow::Result<()> {
        let dump_ns = now_unix_ns();
        let dump = conntrack::dump_table().map_err(environment)?;
        self.tracker
            .adopt(previous_open, &dump, dump_ns, &mut self.out);
        self.store_out();
        self.finish_reconcile(&dump, dump_ns);
        self.flush();
        Ok(())
    }

    async fn event_loop(
        &mut self,
        reconcile_every: Duration,
        retention: Option<Duration>,
        signer: Option<std::sync::Arc<crate::signing::SignerKey>>,
        data_dir: std::path::PathBuf,
    ) -> anyhow::Result<()> {
        // SAFETY: both fds belong to `self` (the capture's ring buffer and the listener's
        // socket), which outlives this function and so both registrations.
        let ring = unsafe {
            AsyncFd::register_with_interest(
                Fd(self.capture.wakeup_fd().as_raw_fd()),
                Interest::READABLE,
            )
        }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with tokio: {e}"))?;
        let netlink = match &self.listener {
            // SAFETY: as above, the listener belongs to `self`.
            Some(listener) => Some(
                unsafe {
                    AsyncFd::register_with_interest(Fd(listener.as_raw_fd()), Interest::READABLE)
                }
                .map_err(|e| anyhow::anyhow!("registering the ctnetlink socket with tokio: {e}"))?,
            ),
            None => None,
        };
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(TICK);
        let mut reconcile = tokio::time::interval_at(
            tokio::time::Instant::now() + reconcile_every,
            reconcile_every,
        );
        let mut last_flush = tokio::time::Instant::now();
        let mut last_heartbeat = tokio::time::Instant::now();
        let mut dump_task: Option<(i64, DumpTask)> = None;
        let mut reconcile_due = false;
        // Retention from DIR/nattrace.toml: at start-up, then hourly, off the event loop.
        let mut retention_tick = tokio::time::interval(RETENTION_EVERY);
        let mut retention_task: Option<JoinHandle<()>> = None;
        // The audit log's head, signed hourly over entries the group's members appended.
        let mut audit_tick = tokio::time::interval(AUDIT_SIGN_EVERY);
        let mut audit_task: Option<JoinHandle<()>> = None;
        loop {
            tokio::select! {
                _ = audit_tick.tick(), if signer.is_some() => {
                    if audit_task.as_ref().is_none_or(JoinHandle::is_finished) {
                        let key = std::sync::Arc::clone(signer.as_ref().expect("guarded"));
                        let dir = data_dir.clone();
                        audit_task = Some(tokio::task::spawn_blocking(move || {
                            match crate::audit::sign_head(&dir, &key) {
                                Ok(0) => {}
                                Ok(n) => log::info!("audit log: head signed over {n} more entries"),
                                Err(e) => log::error!("audit log: {}", with_causes(&e)),
                            }
                        }));
                    }
                }
                _ = retention_tick.tick(), if retention.is_some() => {
                    if retention_task.as_ref().is_none_or(JoinHandle::is_finished) {
                        let keep = retention.expect("guarded");
                        let dir = data_dir.clone();
                        retention_task = Some(tokio::task::spawn_blocking(move || {
                            apply_retention_logged(&dir, keep);
                        }));
                    }
                }
                guard = ring.readable() => {
                    guard?.clear_ready();
                    self.drain_ring();
                }
                guard = async { netlink.as_ref().expect("guarded").readable().await }, if netlink.is_some() => {
                    guard?.clear_ready();
                    reconcile_due |= self.drain_netlink();
                }
                _ = tick.tick() => {
                    self.drain_ring();
                    reconcile_due |= self.drain_netlink();
                    reconcile_due |= self.check_ring_losses();
                    let now = now_unix_ns();
                    let mut alloc = || self.writer.next_binding_id();
                    self.tracker.expire(now, &mut alloc, &mut self.out);
                    self.store_out();
                    if last_heartbeat.elapsed() >= HEARTBEAT_EVERY {
                        self.clock = BootToUtc::measure();
                        self.writer.append_event(CoverageEvent::Heartbeat { t_ns: now });
                        last_heartbeat = tokio::time::Instant::now();
                    }
                    if last_flush.elapsed() >= FLUSH_EVERY {
                        self.flush();
                        last_flush = tokio::time::Instant::now();
                    }
                }
                _ = reconcile.tick() => reconcile_due = true,
                joined = async { (&mut dump_task.as_mut().expect("guarded").1).await }, if dump_task.is_some() => {
                    let (dump_ns, _) = dump_task.take().expect("guarded");
                    match joined {
                        Ok(Ok(dump)) => {
                            // Every entry in the dump had its start emitted before it was
                            // confirmed: drain now so the tracker has seen all of them.
                            self.drain_ring();
                            reconcile_due |= self.drain_netlink();
                            self.finish_reconcile(&dump, dump_ns);
                        }
                        Ok(Err(e)) => warn!("conntrack dump failed, will retry: {e}"),
                        Err(e) => warn!("conntrack dump task failed, will retry: {e}"),
                    }
                }
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
            }
            if reconcile_due && dump_task.is_none() {
                reconcile_due = false;
                let dump_ns = now_unix_ns();
                dump_task = Some((dump_ns, tokio::task::spawn_blocking(conntrack::dump_table)));
            }
        }
        if let Some((_, task)) = dump_task {
            task.abort();
        }
        Ok(())
    }

    fn finish_reconcile(&mut self, dump: &[CtEntry], dump_ns: i64) {
        let mut alloc = || self.writer.next_binding_id();
        let report = self
            .tracker
            .reconcile(dump, dump_ns, &mut alloc, &mut self.out);
        self.store_out();
        if report.closed > 0 || report.opened > 0 {
            info!(
                "reconciled with {} conntrack entries: {} bindings ended unseen (approximate end), {} live entries had no start (approximate start)",
                dump.len(),
                report.closed,
                report.opened
            );
        }
    }

    fn drain_ring(&mut self) {
        self.starts.clear();
        self.captured_ends.clear();
        let bad = self
            .capture
            .drain(&mut self.starts, &mut self.captured_ends);
        if bad > 0 {
            warn!("{bad} ring-buffer records could not be decoded");
        }
        let clock = self.clock;
        let mut alloc = || self.writer.next_binding_id();
        for start in &self.starts {
            self.tracker.on_start(
                start,
                clock.to_unix_ns(start.boot_ns),
                &mut alloc,
                &mut self.out,
            );
        }
        // Ends after starts: an end read in the same batch as its start finds it open, and an
        // end of an older entry with the same tuple closes the oldest binding first.
        let now = now_unix_ns();
        for end in self.captured_ends.drain(..) {
            let mut entry = end.entry;
            // The kernel's stop time when it set one (dated back to a timed-out entry's
            // expiry), else when the destroy hook ran.
            entry.stop_ns = entry
                .stop_ns
                .or_else(|| Some(clock.to_unix_ns(end.boot_ns)));
            self.tracker.on_destroy(entry, now, &mut self.out);
        }
        self.store_out();
    }

    /// Reads queued DESTROY events. Returns true when the listener overran (a reconciliation
    /// is then needed).
    fn drain_netlink(&mut self) -> bool {
        let Some(listener) = &mut self.listener else {
            return false;
        };
        let mut overran = false;
        loop {
            self.ends.clear();
            let outcome = listener.drain(&mut self.ends);
            let now = now_unix_ns();
            for entry in self.ends.drain(..) {
                self.tracker.on_destroy(entry, now, &mut self.out);
            }
            match outcome {
                Ok(RecvOutcome::WouldBlock) => break,
                Ok(RecvOutcome::Overrun) => {
                    overran = true;
                    warn!(
                        "ctnetlink listener overran (ENOBUFS): DESTROY events lost; reconciling with a conntrack dump"
                    );
                    self.writer.append_event(CoverageEvent::Loss {
                        t_ns: now,
                        cause: LossCause::NetlinkOverrun,
                        count: 1,
                        detail: "ctnetlink DESTROY events lost (ENOBUFS); affected bindings get approximate ends from the next conntrack dump".into(),
                    });
                }
                Err(e) => {
                    error!("reading ctnetlink events: {e}");
                    break;
                }
            }
        }
        self.store_out();
        overran
    }

    /// Records new ring-buffer losses. Returns true when there were some (a reconciliation
    /// then recovers the starts of bindings still alive, and ends the bindings whose end was
    /// lost).
    fn check_ring_losses(&mut self) -> bool {
        let lost = match self.capture.lost() {
            Ok(n) => n,
            Err(e) => {
                warn!("{e}");
                return false;
            }
        };
        let seen = std::mem::replace(&mut self.lost_seen, lost);
        let t_ns = now_unix_ns();
        let mut any = false;
        for (total, before, what, cause, detail) in [
            (
                lost.starts,
                seen.starts,
                "starts",
                LossCause::RingFull,
                "binding starts not captured (ring buffer full); live ones are recovered from the next conntrack dump, ended ones from their end event, with approximate starts",
            ),
            (
                lost.ends,
                seen.ends,
                "ends",
                LossCause::RingFullEnd,
                "binding ends not captured (ring buffer full); the next conntrack dump closes those bindings with approximate ends, without counters",
            ),
        ] {
            let new = total.saturating_sub(before);
            if new == 0 {
                continue;
            }
            any = true;
            warn!(
                "ring buffer full: {new} binding {what} lost ({total} in total); reconciling with conntrack"
            );
            self.writer.append_event(CoverageEvent::Loss {
                t_ns,
                cause,
                count: new,
                detail: detail.into(),
            });
        }
        any
    }

    fn store_out(&mut self) {
        for b in self.out.drain(..) {
            self.writer.append_binding(&b);
        }
    }

    fn flush(&mut self) {
        match self.writer.flush() {
            Ok(()) => {
                if self.disk_failing {
                    info!("writing segments again");
                    self.disk_failing = false;
                }
            }
            Err(e) => {
                // Records stay buffered and are written by a later flush.
                if !self.disk_failing {
                    error!(
                        "writing segment failed, keeping {} records in memory: {}",
                        self.writer.buffered_records(),
                        with_causes(&e)
                    );
                    self.writer.append_event(CoverageEvent::Loss {
                        t_ns: now_unix_ns(),
                        cause: LossCause::DiskError,
                        // One episode of failed writes; its records are kept, not dropped.
                        count: 1,
                        detail: format!("segment write failed ({}); records held in memory until the disk accepts them", with_causes(&e)),
                    });
                }
                self.disk_failing = true;
            }
        }
    }

    /// Detaches, drains what is left, records the stop, seals the segment.
    fn shut_down(mut self) -> anyhow::Result<Status> {
        self.capture.detach();
        let detached_ns = now_unix_ns();
        self.drain_ring();
        self.drain_netlink();
        self.check_ring_losses();
        // Ends still waiting for a start will not get one now.
        let mut alloc = || self.writer.next_binding_id();
        self.tracker.expire(i64::MAX, &mut alloc, &mut self.out);
        self.store_out();
        self.writer
            .append_event(CoverageEvent::Detached { t_ns: detached_ns });
        self.writer.append_event(CoverageEvent::AgentStop {
            t_ns: now_unix_ns(),
        });
        debug!("{} bindings still open at stop", self.tracker.open_count());
        self.writer.close().context("sealing the active segment")?;
        info!("stopped");
        Ok(Status::Ok)
    }
}

/// An error and all its causes on one line ("a: b: c").
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// A kernel or system error that stops the agent: exit status 4, with its causes.
fn environment(e: impl std::error::Error + Send + Sync + 'static) -> UserError {
    UserError::environment(with_causes(&e))
}

/// Tells systemd (Type=notify) the agent is ready, when started by it.
fn notify_systemd_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let socket = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => return warn!("NOTIFY_SOCKET: {e}"),
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| socket.send_to_addr(b"READY=1", &a))
    } else {
        socket.send_to(b"READY=1", &path)
    };
    if let Err(e) = sent {
        warn!("notifying systemd: {e}");
    }
}
