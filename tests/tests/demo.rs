//! The demo runs unattended from start to finish, and every answer it shows agrees with the
//! lab's truth.

#[test]
#[ignore = "privileged end-to-end test: run as root with `cargo xtask test`"]
fn demo_runs_unattended() {
    nattrace_e2e::demo::run(&nattrace_e2e::agent::nattrace_bin())
        .unwrap_or_else(|e| panic!("demo failed: {e:#}"));
}
