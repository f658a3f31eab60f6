//! Builds the isolate-tier guest (guest-agent/isolate, a freestanding ELF with its own linker
//! script, not a workspace member) with a nested cargo and leaves it at
//! `$OUT_DIR/isolate-guest.elf`, which `src/isolate/image.rs` embeds.
//!
//! Its target directory is `<workspace target>/guests`, shared by every profile and by clippy,
//! so the guest (wasmi and all) is compiled once, not once per build-script run.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-gnu";

pub fn build(manifest_dir: &Path, out_dir: &Path) {
    let root = manifest_dir
        .parent()
        .unwrap_or_else(|| fail("the vmm crate has no parent directory".into()));
    let guest = root.join("guest-agent/isolate");
    for input in [
        "guest-agent/isolate/src",
        "guest-agent/isolate/Cargo.toml",
        "guest-agent/isolate/Cargo.lock",
        "guest-agent/isolate/link.ld",
        "guest-agent/isolate/build.rs",
        "guest-agent/freestanding/src",
        "guest-agent/freestanding/Cargo.toml",
        "guest-agent/freestanding/link_args.rs",
        "isolate-abi/src",
        "isolate-abi/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(input).display());
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("guests");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir)
        // Replaces the workspace's rustflags (+crt-static, for host binaries): the guest is
        // non-PIC code at fixed addresses.
        .env("RUSTFLAGS", "-Crelocation-model=static");
    // What cargo sets for this build script must not leak into the guest's build (clippy's
    // wrapper, the outer target dir and flags, the jobserver's descriptors).
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd
        .output()
        .unwrap_or_else(|e| fail(format!("cannot run cargo for the isolate guest: {e}")));
    if !output.status.success() {
        fail(format!(
            "building the isolate guest ({}) failed:\n{}",
            guest.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let elf = target_dir.join(TARGET).join("release/isolate-guest");
    let dest = out_dir.join("isolate-guest.elf");
    std::fs::copy(&elf, &dest).unwrap_or_else(|e| {
        fail(format!(
            "cannot copy {} to {}: {e}",
            elf.display(),
            dest.display()
        ))
    });
}

fn fail(message: String) -> ! {
    eprintln!("error: isolate guest: {message}");
    std::process::exit(1)
}
