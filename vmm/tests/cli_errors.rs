//! Bad command-line input gives one clear error line and a non-zero exit, never a panic. These
//! need no KVM: every case is rejected before a VM is created.

use std::process::{Command, Output};

fn agentvm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentvm"))
        .args(args)
        .env("AGENTVM_LOG", "off")
        .output()
        .expect("run agentvm")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_clear_error(out: &Output, expected: &str) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected failure, got {:?}",
        out.status
    );
    assert!(err.contains(expected), "stderr lacks {expected:?}:\n{err}");
    assert!(!err.contains("panicked"), "agentvm panicked:\n{err}");
    assert!(!err.contains("RUST_BACKTRACE"), "agentvm panicked:\n{err}");
}

/// A file in a per-process temp directory, removed (with the directory once empty) on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn to_str(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl std::ops::Deref for TempFile {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn temp_file(name: &str, contents: &[u8]) -> TempFile {
    let dir = std::env::temp_dir().join(format!("agentvm-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    TempFile(path)
}

#[test]
fn missing_kernel_is_named() {
    let out = agentvm(&["boot", "--kernel", "/nonexistent/vmlinux"]);
    assert_clear_error(&out, "kernel /nonexistent/vmlinux does not exist");
    assert_eq!(out.status.code(), Some(125));
}

#[test]
fn a_text_file_is_not_a_kernel() {
    let path = temp_file("not-a-kernel", b"#!/bin/sh\necho hi\n");
    let out = agentvm(&["boot", "--kernel", path.to_str()]);
    // /dev/kvm is checked after the kernel's format on hosts without it; either error is clear,
    // but with /dev/kvm present the format error must come.
    let err = stderr(&out);
    if std::path::Path::new("/dev/kvm").exists() {
        assert_clear_error(&out, "is not a kernel");
    } else {
        assert!(err.contains("/dev/kvm"), "{err}");
    }
}

#[test]
fn zero_and_too_many_vcpus_are_refused() {
    let path = temp_file("k0", b"x");
    for n in ["0", "17", "300"] {
        let out = agentvm(&["boot", "--kernel", path.to_str(), "--vcpus", n]);
        assert_clear_error(&out, "--vcpus must be between 1 and 16");
    }
    let out = agentvm(&["boot", "--kernel", path.to_str(), "--vcpus", "-1"]);
    assert!(!out.status.success());
    assert!(!stderr(&out).contains("panicked"));
}

#[test]
fn memory_too_small_or_too_large_is_refused() {
    let path = temp_file("k1", b"x");
    let out = agentvm(&["boot", "--kernel", path.to_str(), "--mem-mib", "1"]);
    assert_clear_error(&out, "--mem-mib must be at least 16 MiB");
    let out = agentvm(&["boot", "--kernel", path.to_str(), "--mem-mib", "100000000"]);
    assert_clear_error(&out, "more than this host's");
}

#[test]
fn missing_initrd_is_named() {
    let path = temp_file("k2", b"x");
    let out = agentvm(&[
        "boot",
        "--kernel",
        path.to_str(),
        "--initrd",
        "/nonexistent/initrd.cpio",
    ]);
    assert_clear_error(&out, "initrd /nonexistent/initrd.cpio does not exist");
}

#[test]
fn bad_timeout_is_refused() {
    let path = temp_file("k3", b"x");
    let out = agentvm(&["boot", "--kernel", path.to_str(), "--timeout", "-5"]);
    assert!(!out.status.success());
    assert!(!stderr(&out).contains("panicked"));
}

#[test]
fn run_without_a_command_is_a_usage_error() {
    let out = agentvm(&["run"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("CMD"), "{}", stderr(&out));
}

#[test]
fn run_kernel_without_initrd_is_a_usage_error() {
    let out = agentvm(&["run", "--kernel", "/x", "--", "true"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--initrd"), "{}", stderr(&out));
}

#[test]
fn bad_publish_specs_are_explained() {
    for (spec, needle) in [
        ("0", "guest port must be 1..=65535"),
        ("8080:x", "guest port must be a number"),
        ("host:1:80", "is not an IP address"),
    ] {
        let out = agentvm(&["run", "--publish", spec, "--", "true"]);
        assert_clear_error(&out, needle);
        assert_clear_error(&out, "bad --publish");
    }
}

#[test]
fn interactive_runs_through_the_nested_host_are_refused_up_front() {
    for flag in ["-i", "-t", "-it", "--publish=8080:80"] {
        let out = agentvm(&["run", "--nested", flag, "--", "sh"]);
        assert_clear_error(&out, "do not work through the nested test host");
        assert_clear_error(&out, "--nested was given");
    }
}

/// Only root can open /dev/kvm on these hosts (mode 0600): an unprivileged user must get the
/// permission error, not a crash. Needs root to switch to `nobody`; skipped otherwise.
#[test]
fn no_permission_on_dev_kvm_is_explained() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let runuser = std::path::Path::new("/usr/sbin/runuser");
    if euid != 0 || !runuser.exists() || !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: needs root, runuser and /dev/kvm to test as an unprivileged user");
        return;
    }
    let kernel = temp_file("k-perm", b"x");
    // `nobody` must be able to reach the kernel file.
    let dir = kernel.parent().unwrap();
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        &*kernel,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let out = Command::new(runuser)
        .args([
            "-u",
            "nobody",
            "--",
            env!("CARGO_BIN_EXE_agentvm"),
            "boot",
            "--kernel",
        ])
        .arg(&*kernel)
        .env("AGENTVM_LOG", "off")
        .output()
        .expect("run agentvm as nobody");
    if stderr(&out).contains("Permission denied") && !stderr(&out).contains("/dev/kvm") {
        eprintln!(
            "skipping: nobody cannot execute the test binary here: {}",
            stderr(&out)
        );
        return;
    }
    assert_clear_error(&out, "no permission to open /dev/kvm");
}

#[test]
fn exec_without_a_running_vm_is_explained() {
    let out = agentvm(&[
        "exec",
        "--vsock-uds",
        "/nonexistent/agentvm-vsock.sock",
        "--connect-timeout",
        "1",
        "--",
        "true",
    ]);
    assert_clear_error(&out, "no VM is running with that --vsock-uds");

    let out = agentvm(&[
        "exec",
        "--vsock-uds",
        "/tmp/x.sock",
        "--connect-timeout",
        "0",
        "--",
        "true",
    ]);
    assert_clear_error(&out, "--connect-timeout must be a number of seconds > 0");
}

#[test]
fn exec_on_a_socket_nobody_answers_times_out_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vsock.sock");
    // Accepts and closes at once, like a VMM whose guest agent is not listening yet.
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        for conn in listener.incoming().flatten().take(200) {
            drop(conn);
        }
    });
    let out = agentvm(&[
        "exec",
        "--vsock-uds",
        path.to_str().unwrap(),
        "--connect-timeout",
        "1",
        "--",
        "true",
    ]);
    assert_clear_error(&out, "the guest agent did not answer on vsock port 1024");
    drop(server);
}
