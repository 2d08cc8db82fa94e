//! nattrace: records every NAT binding of a Linux CGNAT host and answers "who held this
//! public address and port at that time".
//!
//! Module map: [`capture`] (eBPF backends), [`conntrack`] (ctnetlink ends and dumps),
//! [`tracker`] (merging starts and ends), [`clock`] (kernel time to UTC), [`storage`]
//! (segment files, see FORMAT.md), [`query`], [`coverage`], [`stats`] (the CLI's readers),
//! [`import`] (bindings from CSV or `conntrack -E` text), [`agent`] (`nattrace run`),
//! [`workload`] (synthetic CGNAT bindings for benchmarks).

pub mod access;
pub mod agent;
pub mod audit;
pub mod audit_cli;
pub mod binding;
pub mod btf;
pub mod capture;
pub mod cliparse;
pub mod clock;
pub mod config;
pub mod conntrack;
pub mod cosign;
pub mod coverage;
pub mod evidence;
pub mod exit;
pub mod import;
pub mod keygen;
pub mod output;
pub mod preflight;
pub mod probe;
pub mod proportionality;
pub mod query;
pub mod retention;
pub mod signing;
pub mod stats;
pub mod storage;
pub mod tracker;
pub mod verify;
pub mod workload;
