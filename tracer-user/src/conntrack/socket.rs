//! ctnetlink sockets: the destroy-event listener and the table dump.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use libc::c_int;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use super::codec::{
    IPCTNL_MSG_CT_DELETE, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_NEW, NFGENMSG_LEN, NLMSG_DONE,
    NLMSG_ERROR, NLMSG_HDRLEN, NLMSG_NOOP, NLMSG_OVERRUN, NlMsgs, ctnl_msg_type,
    decode_done_status, decode_entry, decode_error_code,
};
use super::{ConntrackError, CtEntry};

/// `NFNLGRP_CONNTRACK_DESTROY` (linux/netfilter/nfnetlink.h).
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;
/// Receive buffer for one datagram. Events are a few hundred bytes; the kernel builds dump
/// datagrams of at most 32 KiB.
const DATAGRAM_BUF_LEN: usize = 64 * 1024;
/// Destroy events read per `recvmmsg(2)` call: one system call per event would cost the
/// agent more than the rest of its work when many bindings end at once.
const EVENTS_PER_READ: usize = 64;
/// Room for one destroy event datagram (a few hundred bytes in practice).
const EVENT_SLOT_LEN: usize = 8 * 1024;
/// How many times a dump is started over when it is interrupted.
const DUMP_ATTEMPTS: u32 = 3;
/// Longest wait for the next datagram of a dump.
const DUMP_RECV_TIMEOUT: Duration = Duration::from_secs(30);

fn socket_error(action: &'static str) -> impl FnOnce(io::Error) -> ConntrackError {
    move |source| ConntrackError::Socket { action, source }
}

/// Opens a NETLINK_NETFILTER socket bound to a kernel-chosen port, in the calling thread's
/// network namespace.
fn open_socket() -> Result<Socket, ConntrackError> {
    let mut socket =
        Socket::new(NETLINK_NETFILTER).map_err(socket_error("open a NETLINK_NETFILTER socket"))?;
    socket.bind_auto().map_err(socket_error("bind"))?;
    Ok(socket)
}

fn setsockopt<T>(fd: RawFd, level: c_int, name: c_int, value: &T) -> io::Result<()> {
    let len = libc::socklen_t::try_from(size_of::<T>()).expect("small option value");
    // SAFETY: `value` points to a live, initialised `T` of `len` bytes for the duration of
    // the call; the kernel only reads it.
    let rc = unsafe { libc::setsockopt(fd, level, name, std::ptr::from_ref(value).cast(), len) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sets the receive buffer to `bytes` (the kernel doubles it for its bookkeeping), with
/// SO_RCVBUFFORCE so that net.core.rmem_max does not cap it, falling back to SO_RCVBUF
/// without CAP_NET_ADMIN. Returns the size the kernel reports afterwards.
fn set_rcvbuf(socket: &Socket, bytes: usize) -> Result<usize, ConntrackError> {
    let fd = socket.as_raw_fd();
    let want = c_int::try_from(bytes)
        .unwrap_or(c_int::MAX)
        .min(c_int::MAX / 2);
    match setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &want) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &want)
                .map_err(socket_error("set the receive buffer size (SO_RCVBUF)"))?;
        }
        Err(e) => return Err(socket_error("set the receive buffer size (SO_RCVBUFFORCE)")(e)),
    }
    let got = socket
        .get_rx_buf_sz()
        .map_err(socket_error("read the receive buffer size"))?;
    // The kernel reports twice what it granted.
    if got / 2 < usize::try_from(want).unwrap_or(0) {
        log::warn!(
            "ctnetlink receive buffer is {got} bytes, less than the {bytes} requested: \
             destroy events may be lost under load; raise net.core.rmem_max or run with \
             CAP_NET_ADMIN"
        );
    }
    Ok(got)
}

/// What [`DestroyListener::drain`] stopped on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvOutcome {
    /// The socket queue is empty: wait for readiness and drain again.
    WouldBlock,
    /// The kernel reported ENOBUFS: destroy events were dropped because the receive buffer
    /// was full. The socket stays usable; the lost entries can only be found by comparing
    /// with a [`dump_table`](super::dump_table).
    Overrun,
}

/// A ctnetlink socket subscribed to `NFNLGRP_CONNTRACK_DESTROY` in the network namespace of
/// the thread that created it. Non-blocking: poll its descriptor for readability (tokio
/// `AsyncFd`), then call [`drain`](Self::drain).
///
/// `NETLINK_BROADCAST_ERROR` is left off by default: with it, the kernel keeps every entry
/// whose destroy event it could not deliver and redelivers it later, so a stalled reader
/// makes ended entries pile up and count against `nf_conntrack_max` (new connections get
/// dropped). [`set_reliable`](Self::set_reliable) switches it on for those who prefer that.
#[derive(Debug)]
pub struct DestroyListener {
    socket: Socket,
    buf: Vec<u8>,
    rcvbuf: usize,
}

impl DestroyListener {
    /// Opens the socket with a receive buffer of `rcvbuf_bytes` (SO_RCVBUFFORCE, falling
    /// back to SO_RCVBUF capped by net.core.rmem_max), reporting overruns (ENOBUFS), then
    /// subscribes to destroy events.
    pub fn new(rcvbuf_bytes: usize) -> Result<Self, ConntrackError> {
        let socket = open_socket()?;
        socket
            .set_non_blocking(true)
            .map_err(socket_error("make the socket non-blocking"))?;
        // Report lost events with ENOBUFS rather than hiding them (the default, made explicit).
        socket
            .set_no_enobufs(false)
            .map_err(socket_error("clear NETLINK_NO_ENOBUFS"))?;
        // Size the buffer before subscribing so that no burst lands in a default-size one.
        let rcvbuf = set_rcvbuf(&socket, rcvbuf_bytes)?;
        socket
            .add_membership(NFNLGRP_CONNTRACK_DESTROY)
            .map_err(socket_error("subscribe to conntrack destroy events"))?;
        log::debug!("listening to conntrack destroy events, receive buffer {rcvbuf} bytes");
        Ok(Self {
            socket,
            buf: vec![0; EVENTS_PER_READ * EVENT_SLOT_LEN],
            rcvbuf,
        })
    }

    /// The receive buffer size the kernel granted (SO_RCVBUF as read back: twice the
    /// requested size when fully granted).
    #[must_use]
    pub fn rcvbuf(&self) -> usize {
        self.rcvbuf
    }

    /// Switches `NETLINK_BROADCAST_ERROR` on or off. On, the kernel keeps ended entries
    /// whose destroy event could not be queued to this socket and redelivers them later
    /// (with their original stop timestamp); [`RecvOutcome::Overrun`] is still reported.
    /// The cost: while this socket is open but not read, ended entries stay allocated and
    /// count against `nf_conntrack_max`.
    pub fn set_reliable(&self, on: bool) -> Result<(), ConntrackError> {
        self.socket
            .set_broadcast_error(on)
            .map_err(socket_error("set NETLINK_BROADCAST_ERROR"))
    }

    /// The socket's descriptor, to poll for readability.
    #[must_use]
    pub fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Reads every message queued on the socket and appends each destroyed entry to `out`
    /// (all of them, NAT or not). Returns [`RecvOutcome::WouldBlock`] once the queue is
    /// empty, or [`RecvOutcome::Overrun`] as soon as the kernel reports lost events (call
    /// again to read what is still queued). A message that cannot be decoded is logged and
    /// skipped.
    pub fn drain(&mut self, out: &mut Vec<CtEntry>) -> Result<RecvOutcome, ConntrackError> {
        loop {
            let mut lens = [0usize; EVENTS_PER_READ];
            let received = match self.recv_batch(&mut lens) {
                Ok(n) => n,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) => return Ok(RecvOutcome::Overrun),
                    _ if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(RecvOutcome::WouldBlock);
                    }
                    _ => return Err(ConntrackError::Recv { source: e }),
                },
            };
            for (slot, &len) in lens[..received].iter().enumerate() {
                if len > EVENT_SLOT_LEN {
                    log::warn!(
                        "skipped a {len}-byte ctnetlink datagram, larger than {EVENT_SLOT_LEN} bytes"
                    );
                    continue;
                }
                let start = slot * EVENT_SLOT_LEN;
                decode_destroy_datagram(&self.buf[start..start + len], out);
            }
        }
    }

    /// Receives up to [`EVENTS_PER_READ`] datagrams without blocking, one per slot of
    /// `self.buf`, and stores each datagram's full length (larger than the slot when it was
    /// truncated). Returns how many were received.
    fn recv_batch(&mut self, lens: &mut [usize; EVENTS_PER_READ]) -> io::Result<usize> {
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut iovs: [libc::iovec; EVENTS_PER_READ] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; EVENTS_PER_READ] = unsafe { std::mem::zeroed() };
        for (i, (iov, hdr)) in iovs.iter_mut().zip(hdrs.iter_mut()).enumerate() {
            iov.iov_base = self.buf[i * EVENT_SLOT_LEN..].as_mut_ptr().cast();
            iov.iov_len = EVENT_SLOT_LEN;
            hdr.msg_hdr.msg_iov = std::ptr::from_mut(iov);
            hdr.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at one live iovec over a distinct slot of `self.buf`,
        // which outlives the call; the count matches the array.
        let n = unsafe {
            libc::recvmmsg(
                self.socket.as_raw_fd(),
                hdrs.as_mut_ptr(),
                u32::try_from(EVENTS_PER_READ).expect("small"),
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        for (len, hdr) in lens.iter_mut().zip(&hdrs[..n]) {
            let truncated = hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            *len = if truncated {
                EVENT_SLOT_LEN + 1
            } else {
                hdr.msg_len as usize
            };
        }
        Ok(n)
    }
}

/// Decodes the destroy events of one datagram into `out`; anything else is skipped, and a
/// malformed message is logged and ends the datagram.
fn decode_destroy_datagram(datagram: &[u8], out: &mut Vec<CtEntry>) {
    for msg in NlMsgs::new(datagram) {
        let msg = match msg {
            Ok(msg) => msg,
            Err(e) => {
                log::warn!("skipped the rest of a ctnetlink datagram: {e}");
                break;
            }
        };
        if msg.kind == ctnl_msg_type(IPCTNL_MSG_CT_DELETE) {
            match decode_entry(msg.payload) {
                Ok(entry) => out.push(entry),
                Err(e) => log::warn!("skipped a conntrack destroy event: {e}"),
            }
        } else {
            log::debug!(
                "ignored netlink message type {:#06x} on the destroy listener",
                msg.kind
            );
        }
    }
}

impl AsRawFd for DestroyListener {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl AsFd for DestroyListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// Why one dump attempt did not complete.
enum Attempt {
    /// Worth starting over.
    Interrupted(&'static str),
    /// Not worth it.
    Failed(ConntrackError),
}

impl From<ConntrackError> for Attempt {
    fn from(e: ConntrackError) -> Self {
        Self::Failed(e)
    }
}

/// The `IPCTNL_MSG_CT_GET` dump request: all families (AF_UNSPEC), all zones, no filter.
fn dump_request(seq: u32) -> [u8; NLMSG_HDRLEN + NFGENMSG_LEN] {
    let flags = u16::try_from(libc::NLM_F_REQUEST | libc::NLM_F_DUMP).expect("16-bit flags");
    let mut req = [0u8; NLMSG_HDRLEN + NFGENMSG_LEN];
    let len = u32::try_from(req.len()).expect("small request");
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&ctnl_msg_type(IPCTNL_MSG_CT_GET).to_ne_bytes());
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0, then nfgenmsg: family AF_UNSPEC, version NFNETLINK_V0, res_id 0.
    req
}

/// Dumps the whole conntrack table of the current network namespace (IPv4 and IPv6, all
/// zones) over a socket of its own. A dump the kernel reports as interrupted, or that lost
/// messages (ENOBUFS), is started over, up to 3 times. An entry the kernel sends twice
/// (it may, when the table changes during the dump) is returned once.
pub fn dump_table() -> Result<Vec<CtEntry>, ConntrackError> {
    for attempt in 1..=DUMP_ATTEMPTS {
        match dump_once(attempt) {
            Ok(entries) => return Ok(entries),
            Err(Attempt::Failed(e)) => return Err(e),
            Err(Attempt::Interrupted(why)) => {
                log::info!("conntrack table dump attempt {attempt} interrupted ({why})");
            }
        }
    }
    Err(ConntrackError::DumpInterrupted {
        attempts: DUMP_ATTEMPTS,
    })
}

fn dump_once(seq: u32) -> Result<Vec<CtEntry>, Attempt> {
    let socket = open_socket()?;
    let timeout = libc::timeval {
        tv_sec: libc::time_t::try_from(DUMP_RECV_TIMEOUT.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: 0,
    };
    setsockopt(
        socket.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVTIMEO,
        &timeout,
    )
    .map_err(socket_error("set a receive timeout"))?;
    let req = dump_request(seq);
    socket
        .send_to(&req, &SocketAddr::new(0, 0), 0)
        .map_err(|source| ConntrackError::Send { source })?;

    let mut buf = vec![0u8; DATAGRAM_BUF_LEN];
    let mut entries = Vec::new();
    let mut index: HashMap<_, usize> = HashMap::new();
    loop {
        let n = match socket.recv(&mut &mut buf[..], libc::MSG_TRUNC) {
            Ok(n) => n,
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOBUFS) => return Err(Attempt::Interrupted("receive buffer overrun")),
                _ if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(ConntrackError::DumpTimeout {
                        secs: DUMP_RECV_TIMEOUT.as_secs(),
                    }
                    .into());
                }
                _ => return Err(ConntrackError::Recv { source: e }.into()),
            },
        };
        if n > buf.len() {
            return Err(ConntrackError::Malformed {
                reason: format!(
                    "{n}-byte dump datagram, larger than the {}-byte buffer",
                    buf.len()
                ),
            }
            .into());
        }
        for msg in NlMsgs::new(&buf[..n]) {
            let msg = msg?;
            if msg.seq != seq {
                log::debug!(
                    "ignored a netlink message of sequence {} during a dump",
                    msg.seq
                );
                continue;
            }
            if msg.flags & u16::try_from(libc::NLM_F_DUMP_INTR).expect("16-bit flag") != 0 {
                return Err(Attempt::Interrupted("the table changed during the dump"));
            }
            match msg.kind {
                NLMSG_DONE => {
                    return match decode_done_status(msg.payload) {
                        0 => Ok(entries),
                        code => Err(kernel_error(code)),
                    };
                }
                NLMSG_ERROR => match decode_error_code(msg.payload)? {
                    0 => {}
                    code => return Err(kernel_error(code)),
                },
                NLMSG_NOOP | NLMSG_OVERRUN => {}
                k if k == ctnl_msg_type(IPCTNL_MSG_CT_NEW) => match decode_entry(msg.payload) {
                    Ok(entry) => match index.get(&entry.key()) {
                        Some(&i) => entries[i] = entry,
                        None => {
                            index.insert(entry.key(), entries.len());
                            entries.push(entry);
                        }
                    },
                    Err(e) => log::warn!("skipped a conntrack table entry: {e}"),
                },
                k => log::debug!("ignored netlink message type {k:#06x} during a dump"),
            }
        }
    }
}

/// Maps a -errno from NLMSG_ERROR or NLMSG_DONE to the outcome of the attempt.
fn kernel_error(code: i32) -> Attempt {
    let errno = code.checked_neg().unwrap_or(code);
    match errno {
        libc::EINTR | libc::EAGAIN => Attempt::Interrupted("the kernel asked to retry"),
        _ => Attempt::Failed(ConntrackError::DumpRefused {
            source: io::Error::from_raw_os_error(errno),
        }),
    }
}
