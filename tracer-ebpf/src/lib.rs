//! Host-side stub: the programs live in `main.rs` and only build for the bpf target.
#![no_std]
