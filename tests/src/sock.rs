//! The few socket calls std does not offer, on top of libc: ICMP ping sockets, raw ICMP
//! sockets, TCP connect from a chosen source address, forced receive buffers, poll.
//!
//! Every socket is created in the network namespace of the calling thread (see
//! [`crate::lab::enter_netns`]).

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Converts a socket address to the C form.
fn to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in>(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in6>(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (
        storage,
        libc::socklen_t::try_from(len).expect("sockaddr size fits socklen_t"),
    )
}

/// Converts a C socket address (IPv4 or IPv6) back.
fn from_sockaddr(storage: &libc::sockaddr_storage) -> io::Result<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(&raw const *storage).cast::<libc::sockaddr_in>() };
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(&raw const *storage).cast::<libc::sockaddr_in6>() };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        family => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected address family {family}"),
        )),
    }
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn family(ip: IpAddr) -> libc::c_int {
    if ip.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

/// Creates a socket (close-on-exec).
pub fn socket(
    domain: libc::c_int,
    kind: libc::c_int,
    protocol: libc::c_int,
) -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the returned fd is owned by the OwnedFd.
    let fd = check(unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) })?;
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds a socket to an address.
pub fn bind(fd: &impl AsRawFd, addr: SocketAddr) -> io::Result<()> {
    let (storage, len) = to_sockaddr(&addr);
    // SAFETY: `storage` holds a valid address of `len` bytes.
    check(unsafe { libc::bind(fd.as_raw_fd(), (&raw const storage).cast(), len) }).map(drop)
}

/// The local address of a socket (for ping sockets, the port is the ICMP echo identifier).
pub fn local_addr(fd: &impl AsRawFd) -> io::Result<SocketAddr> {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = libc::socklen_t::try_from(size_of::<libc::sockaddr_storage>()).expect("fits");
    // SAFETY: `storage` has room for `len` bytes.
    check(unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut storage).cast(), &raw mut len) })?;
    from_sockaddr(&storage)
}

/// Sends one datagram to `dest`.
pub fn send_to(fd: &impl AsRawFd, buf: &[u8], dest: SocketAddr) -> io::Result<usize> {
    let (storage, len) = to_sockaddr(&dest);
    // SAFETY: `buf` and `storage` are valid for the given lengths.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            0,
            (&raw const storage).cast(),
            len,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Receives one datagram (honours the receive timeout: `WouldBlock`/`TimedOut` when it expires).
pub fn recv_from(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = libc::socklen_t::try_from(size_of::<libc::sockaddr_storage>()).expect("fits");
    // SAFETY: `buf` and `storage` are valid for the given lengths.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&raw mut storage).cast(),
            &raw mut len,
        )
    };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    Ok((n, from_sockaddr(&storage)?))
}

fn timeval(d: Duration) -> libc::timeval {
    libc::timeval {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(d.subsec_micros()),
    }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    let len = libc::socklen_t::try_from(size_of::<T>()).expect("option size fits socklen_t");
    // SAFETY: `value` points to a valid T of `len` bytes.
    check(unsafe { libc::setsockopt(fd, level, name, std::ptr::from_ref(value).cast(), len) })
        .map(drop)
}

/// Sets the receive timeout of a socket.
pub fn set_recv_timeout(fd: &impl AsRawFd, d: Duration) -> io::Result<()> {
    setsockopt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVTIMEO,
        &timeval(d),
    )
}

/// Sets the send timeout of a socket (also bounds a blocking `connect`).
pub fn set_send_timeout(fd: &impl AsRawFd, d: Duration) -> io::Result<()> {
    setsockopt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_SNDTIMEO,
        &timeval(d),
    )
}

/// Sets the receive buffer beyond `net.core.rmem_max` (root), returns the size the kernel
/// reports afterwards.
pub fn force_rcvbuf(fd: RawFd, bytes: usize) -> io::Result<usize> {
    let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &want)?;
    let mut got: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(size_of::<libc::c_int>()).expect("fits");
    // SAFETY: `got` has room for an int.
    check(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw mut got).cast(),
            &raw mut len,
        )
    })?;
    Ok(usize::try_from(got).unwrap_or(0))
}

/// Waits until `fd` is readable or `timeout` passes; true when readable.
pub fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
    match n {
        n if n < 0 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

/// An ICMP (IPv4) or ICMPv6 "ping" socket bound to `local` (SOCK_DGRAM, needs
/// `net.ipv4.ping_group_range`): the kernel picks the echo identifier, which
/// [`local_addr`] reports as the port.
pub fn ping_socket(local: IpAddr) -> io::Result<OwnedFd> {
    let proto = if local.is_ipv4() {
        libc::IPPROTO_ICMP
    } else {
        libc::IPPROTO_ICMPV6
    };
    let fd = socket(family(local), libc::SOCK_DGRAM, proto)?;
    bind(&fd, SocketAddr::new(local, 0))?;
    Ok(fd)
}

/// A raw socket receiving every ICMP (`v6 == false`, with the IPv4 header) or ICMPv6
/// (`v6 == true`, without the IPv6 header) message of the namespace.
pub fn raw_icmp_socket(v6: bool) -> io::Result<OwnedFd> {
    if v6 {
        socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6)
    } else {
        socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP)
    }
}

/// A socket of `kind` (`SOCK_STREAM`, `SOCK_DGRAM`) bound to `local` with a kernel-chosen
/// port; check [`local_addr`] before using it.
pub fn bound_socket(local: IpAddr, kind: libc::c_int) -> io::Result<OwnedFd> {
    let fd = socket(family(local), kind, 0)?;
    bind(&fd, SocketAddr::new(local, 0))?;
    Ok(fd)
}

/// Connects a (bound) TCP socket to `dest`, the connect bounded by `timeout`.
pub fn connect(fd: OwnedFd, dest: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    set_send_timeout(&fd, timeout)?;
    let (storage, len) = to_sockaddr(&dest);
    // SAFETY: `storage` holds a valid address of `len` bytes.
    check(unsafe { libc::connect(fd.as_raw_fd(), (&raw const storage).cast(), len) })?;
    Ok(TcpStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_round_trip() {
        for text in ["192.0.2.2:7000", "[2001:db8:1::2]:7001", "100.64.0.10:0"] {
            let addr: SocketAddr = text.parse().unwrap();
            let (storage, _) = to_sockaddr(&addr);
            assert_eq!(from_sockaddr(&storage).unwrap(), addr);
        }
    }
}
