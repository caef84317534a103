//! Builds the eBPF program (`workspace-ebpf/steer-ebpf`) for `bpfel-unknown-none` and leaves
//! the object at `OUT_DIR/steer-ebpf`, which `src/steering/ebpf.rs` embeds in the binary.
//!
//! The eBPF build needs the nightly toolchain with `rust-src` (for `-Z build-std=core`) and
//! `bpf-linker`. Without them the build stops here with one line that says what to run,
//! instead of a page of linker errors.
//!
//! This is what `aya-build` does (nightly `cargo build` of the program crate into its own
//! target directory, with BTF), minus its habit of echoing every line of the inner build as
//! a cargo warning: here the inner build is silent when it succeeds and shown in full when
//! it fails, so a normal build stays warning-free.

use std::path::{Path, PathBuf};
use std::process::Command;

const PACKAGE: &str = "steer-ebpf";
const TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let ebpf_dir = manifest_dir.join("../workspace-ebpf");
    for watched in [
        "steer-ebpf/src",
        "steer-ebpf/Cargo.toml",
        "steer-common/src",
        "steer-common/Cargo.toml",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            ebpf_dir.join(watched).display()
        );
    }
    println!("cargo:rerun-if-env-changed=PATH");
    if let Err(missing) = check_toolchain() {
        fail(&format!(
            "cannot build the eBPF program: {missing}.\nRun `cargo xtask setup` once to install it, then build again."
        ));
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let target_dir = out_dir.join("ebpf-target");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
        // BPF ISA v3 (Linux 5.1+; atomics with fetch and compare-and-exchange from 5.12):
        // the per-client limit advances a client's state with compare-and-exchange.
        "-Ctarget-cpu=v3".into(),
    ]
    .join("\x1f");
    let output = Command::new("rustup")
        .args(["run", "nightly", "cargo", "build", "--quiet", "--release"])
        .args(["--package", PACKAGE, "--bin", PACKAGE, "--target", TARGET])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&manifest_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .output();
    let output = match output {
        Ok(output) => output,
        Err(err) => fail(&format!("cannot run `rustup run nightly cargo`: {err}")),
    };
    if !output.status.success() {
        fail(&format!(
            "building the eBPF program failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let object = target_dir.join(TARGET).join("release").join(PACKAGE);
    if let Err(err) = std::fs::copy(&object, out_dir.join(PACKAGE)) {
        fail(&format!("cannot copy {}: {err}", object.display()));
    }
}

fn fail(message: &str) -> ! {
    for line in message.lines() {
        eprintln!("error: {line}");
    }
    std::process::exit(1);
}

/// What is missing for the eBPF build, if anything.
fn check_toolchain() -> Result<(), String> {
    if !on_path("bpf-linker") {
        return Err("bpf-linker is not installed".into());
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output();
    match sysroot {
        Ok(out) if out.status.success() => {
            let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let core = Path::new(&sysroot).join("lib/rustlib/src/rust/library/core");
            if core.is_dir() {
                Ok(())
            } else {
                Err("the nightly toolchain has no rust-src component".into())
            }
        }
        _ => Err("the nightly Rust toolchain is not installed".into()),
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
