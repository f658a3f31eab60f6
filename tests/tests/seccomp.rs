//! The VMM's seccomp filters, seen from outside the process: a forbidden syscall on any kind of
//! VMM thread kills `agentvm boot` by SIGSYS with a line naming the thread and the syscall, and
//! `--no-seccomp` switches the filters off. (Normal boots with the filters on are probe_boot.rs.)
//!
//! Needs /dev/kvm (skipped without it, failing instead under CI=true) and the agentvm binary of the
//! same profile (`cargo build -p vmm`).

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use integration_tests::agentvm::{require_kvm, run_agentvm, VmOutput};
use integration_tests::probe::probe_elf;

/// Hang detector, not a performance limit.
const TIMEOUT: Duration = Duration::from_secs(120);
/// The syscall the test hook makes (prctl on x86_64).
const FORBIDDEN: &str = "forbidden syscall 157 (prctl)";

/// Boots the spinning probe with the hook on `thread`; `--timeout` ends the VM if nothing kills it.
fn boot_with_violation(thread: &str, extra: &[&str]) -> VmOutput {
    let probe = probe_elf();
    let mut args: Vec<&OsStr> = vec![
        "boot".as_ref(),
        "--kernel".as_ref(),
        probe.as_os_str(),
        "--no-base-cmdline".as_ref(),
        "--cmdline".as_ref(),
        "probe.mode=spin".as_ref(),
        "--timeout".as_ref(),
        "2".as_ref(),
        "--seccomp-test-violation".as_ref(),
        thread.as_ref(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    run_agentvm(args, TIMEOUT).unwrap_or_else(|e| panic!("agentvm boot: {e}"))
}

fn assert_killed_by_sigsys(thread: &str, thread_name: &str) {
    let out = boot_with_violation(thread, &[]);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "expected death by SIGSYS\n{out:?}"
    );
    let expected = format!("thread {thread_name} ({thread} filter) made {FORBIDDEN}");
    assert!(
        out.stderr_text()
            .lines()
            .any(|l| l.starts_with("agentvm: seccomp: ") && l.contains(&expected)),
        "stderr lacks {expected:?}\n{out:?}"
    );
}

#[test]
fn a_forbidden_syscall_on_a_vcpu_thread_kills_by_sigsys() {
    if !require_kvm() {
        return;
    }
    assert_killed_by_sigsys("vcpu", "vcpu0");
}

#[test]
fn a_forbidden_syscall_on_the_device_thread_kills_by_sigsys() {
    if !require_kvm() {
        return;
    }
    assert_killed_by_sigsys("devices", "devices");
}

#[test]
fn a_forbidden_syscall_on_the_main_thread_kills_by_sigsys() {
    if !require_kvm() {
        return;
    }
    assert_killed_by_sigsys("vmm", "main");
}

#[test]
fn without_seccomp_the_same_syscalls_are_harmless() {
    if !require_kvm() {
        return;
    }
    for thread in ["vcpu", "devices", "vmm"] {
        let out = boot_with_violation(thread, &["--no-seccomp"]);
        assert_eq!(out.status.signal(), None, "{thread}: {out:?}");
        assert!(
            out.stderr_text().contains("the 2.0 s time limit passed"),
            "{thread}: the VM should have run until its --timeout\n{out:?}"
        );
        assert!(!out.stderr_text().contains("seccomp"), "{thread}: {out:?}");
    }
}
