//! Builds the eBPF programs (tracer-ebpf) for the bpf target with the nightly toolchain and
//! bpf-linker, and places the object at `$OUT_DIR/tracer` for `include_bytes!`.
//! `cargo xtask setup` installs what this needs.

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../tracer-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tracer-ebpf",
            root_dir: "../tracer-ebpf",
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
