//! Link arguments of every freestanding guest image (the probe, the isolate guest): no C runtime,
//! no libc, the image's own linker script `link.ld` beside its Cargo.toml. Included by their
//! build scripts (`#[path]`), not part of the library.

use std::path::PathBuf;

pub fn emit() {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let script = manifest_dir.join("link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
    // -no-pie: the image is linked at fixed physical addresses and nothing would relocate it.
    // --build-id=none: no .note section, so the loader sees only our PT_LOAD segments.
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,noexecstack",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
