//! End-to-end tests of nattrace, and the CGNAT lab they and `cargo xtask demo` run in.
//!
//! * [`lab`]: network namespaces for subscribers, a NAT (nftables SNAT pool and NAT66) and a
//!   server, torn down on drop.
//! * [`traffic`]: TCP, UDP and ICMP flows over IPv4 and IPv6, and servers that record what they
//!   observed: the truth of every binding, independent of nattrace.
//! * [`conntrack_truth`]: an independent `conntrack -E` listener (when bindings start and end)
//!   and chunked deletions.
//! * [`agent`]: the real `nattrace` binary (agent, query, stats) through its CLI contract.
//! * [`check`]: comparisons of nattrace's answers with the truth.
//! * [`demo`]: the investigator's walk-through shown by `cargo xtask demo`.
//!
//! Everything here needs root. The tests in `tests/` are `#[ignore]`d so that a plain
//! `cargo test` skips them; `cargo xtask test` runs them with `--ignored`, one at a time.

#![warn(missing_docs)]

pub mod agent;
pub mod check;
pub mod conntrack_truth;
pub mod demo;
pub mod lab;
pub mod sock;
pub mod traffic;
pub mod util;
