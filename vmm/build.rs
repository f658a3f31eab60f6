//! Compiles the seccomp filters (`seccomp/<target>.json`, seccompiler's JSON format) to BPF at build
//! time, so the VMM parses no JSON at run time and a malformed filter file fails the build.
//!
//! The programs go to `$OUT_DIR/seccomp_filters.bin` in the form `src/seccomp/filters.rs` decodes:
//! a u32 filter count, then per filter a u8 name length, the name, a u32 instruction count and the
//! instructions (u16 code, u8 jt, u8 jf, u32 k); all little-endian. seccompiler has no
//! serialised form of its own, and a hand-rolled one this small needs no serde at run time.
//!
//! It also builds the isolate-tier guest image (build/isolate_guest.rs).

#[path = "build/isolate_guest.rs"]
mod isolate_guest;

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Every filter the VMM installs; the build fails if the JSON lacks one.
const REQUIRED_FILTERS: [&str; 9] = [
    "vcpu",
    "devices",
    "vmm",
    "api",
    "agent_jobs",
    "uffd_handler",
    "isolate",
    "egress",
    "isolate_fetch",
];

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let target = env("TARGET");
    let arch = env("CARGO_CFG_TARGET_ARCH");
    let json_path = manifest_dir.join("seccomp").join(format!("{target}.json"));
    println!("cargo:rerun-if-changed={}", json_path.display());
    println!("cargo:rerun-if-changed=build.rs");

    let json = std::fs::read(&json_path).unwrap_or_else(|e| {
        fail(format!(
            "cannot read the seccomp filters for target {target} at {}: {e}",
            json_path.display()
        ))
    });
    let target_arch = seccompiler::TargetArch::try_from(arch.as_str()).unwrap_or_else(|e| {
        fail(format!(
            "seccomp filters: unsupported architecture {arch}: {e}"
        ))
    });
    let programs = seccompiler::compile_from_json(json.as_slice(), target_arch)
        .unwrap_or_else(|e| fail(format!("{}: {e}", json_path.display())));
    for name in REQUIRED_FILTERS {
        if !programs.contains_key(name) {
            fail(format!(
                "{}: no `{name}` filter (the VMM needs {REQUIRED_FILTERS:?})",
                json_path.display()
            ));
        }
    }
    // Sorted, so the blob is the same on every build.
    let programs: BTreeMap<_, _> = programs.into_iter().collect();

    let mut blob = Vec::new();
    blob.extend_from_slice(&(programs.len() as u32).to_le_bytes());
    for (name, program) in &programs {
        let name_len = u8::try_from(name.len())
            .unwrap_or_else(|_| fail(format!("seccomp filter name {name:?} is too long")));
        blob.push(name_len);
        blob.extend_from_slice(name.as_bytes());
        blob.extend_from_slice(&(program.len() as u32).to_le_bytes());
        for insn in program {
            blob.extend_from_slice(&insn.code.to_le_bytes());
            blob.push(insn.jt);
            blob.push(insn.jf);
            blob.extend_from_slice(&insn.k.to_le_bytes());
        }
    }
    let out = PathBuf::from(env("OUT_DIR")).join("seccomp_filters.bin");
    std::fs::write(&out, blob)
        .unwrap_or_else(|e| fail(format!("cannot write {}: {e}", out.display())));

    isolate_guest::build(&manifest_dir, &PathBuf::from(env("OUT_DIR")));
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| fail(format!("cargo did not set {name}")))
}

/// Ends the build with `message` as the error cargo shows.
fn fail(message: String) -> ! {
    eprintln!("error: seccomp filters: {message}");
    std::process::exit(1)
}
