//! Compiles `src/bpf/redirect.bpf.c` with clang and generates its libbpf-rs
//! skeleton into `$OUT_DIR/redirect.skel.rs`, which `src/lib.rs` includes.

use std::env;
use std::path::{Path, PathBuf};

use libbpf_cargo::SkeletonBuilder;

const SRC: &str = "src/bpf/redirect.bpf.c";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let skel = out.join("redirect.skel.rs");

    // libbpf-cargo adds the libbpf headers (<bpf/bpf_helpers.h>, ...) that
    // libbpf-sys vendors. The program uses the system's UAPI headers rather
    // than a generated vmlinux.h; on Debian-style systems <asm/types.h>
    // lives under the multiarch directory, which clang does not search when
    // targeting bpf.
    let mut clang_args: Vec<String> = Vec::new();
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    if Path::new(&multiarch).join("asm/types.h").exists() {
        clang_args.push(format!("-I{multiarch}"));
    }
    clang_args.push("-Wall".into());
    clang_args.push("-Werror".into());

    SkeletonBuilder::new()
        .source(SRC)
        .clang_args(&clang_args)
        .build_and_generate(&skel)
        .unwrap_or_else(|e| panic!("building the XDP program {SRC} failed: {e:#}"));

    println!("cargo:rerun-if-changed={SRC}");
    println!("cargo:rerun-if-changed=build.rs");
}
