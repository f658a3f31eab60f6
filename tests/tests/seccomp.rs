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
    assert_killed_by_sigsys_with(thread, thread_name, &[]);
}

fn assert_killed_by_sigsys_with(thread: &str, thread_name: &str, extra: &[&str]) {
    let out = boot_with_violation(thread, extra);
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
fn a_forbidden_syscall_on_the_egress_thread_kills_by_sigsys() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.json");
    std::fs::write(&policy, r#"{"rules": []}"#).unwrap();
    assert_killed_by_sigsys_with(
        "egress",
        "net",
        &["--egress-policy", policy.to_str().unwrap()],
    );
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

/// Set in the re-executed test binary: the guest agent socket the filtered client connects to.
const FILTERED_CLIENT_ENV: &str = "AGENTVM_TEST_FILTERED_CLIENT_SOCK";

/// `agentvm serve`'s `/sandbox/...` jobs run the agent client under the `agent_jobs` filter: the
/// client's connection, reader thread, exec with a stdin thread, and file calls must all stay
/// inside it. The client runs in a re-executed copy of this test binary (a filter cannot be
/// taken off, and forking a multi-threaded test harness is unsafe) against the guest agent in
/// host-process mode.
#[test]
fn the_agent_client_works_under_the_agent_jobs_filter() {
    if let Some(sock) = std::env::var_os(FILTERED_CLIENT_ENV) {
        client_under_filter(std::path::Path::new(&sock));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let agent_bin = integration_tests::agentvm::agentvm_bin().with_file_name("agentvm-guest-agent");
    let mut agent = std::process::Command::new(&agent_bin)
        .arg("--listen-unix")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", agent_bin.display()));
    let listening = integration_tests::api::wait_for_path(&sock, TIMEOUT);
    let out = listening.then(|| {
        let mut command = std::process::Command::new(std::env::current_exe().unwrap());
        command
            .args([
                "--exact",
                "the_agent_client_works_under_the_agent_jobs_filter",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(FILTERED_CLIENT_ENV, &sock);
        integration_tests::agentvm::VmProcess::spawn(command).and_then(|p| p.wait(TIMEOUT))
    });
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        listening,
        "the guest agent did not listen on {}",
        sock.display()
    );
    let out = out.unwrap().unwrap();
    assert!(
        out.status.success() && !out.stderr_text().contains("seccomp"),
        "the filtered client failed\n{out:?}"
    );
    assert!(out.stdout_text().contains("FILTERED CLIENT OK"), "{out:?}");
}

fn client_under_filter(sock: &std::path::Path) {
    use agentvm_client::{
        AgentClient, ExecEvent, ExitStatus, ProcessSpec, ProcessSpecExt, WriteOptions,
    };
    use std::io::Write;

    vmm::seccomp::install(
        vmm::seccomp::ThreadKind::AgentJobs,
        vmm::seccomp::SeccompLevel::Enforce,
    )
    .expect("install the agent_jobs filter");
    // As serve does: the work happens on a thread started under the filter.
    let job = std::thread::spawn({
        let sock = sock.to_path_buf();
        move || {
            let stream = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
            let client = AgentClient::from_stream(stream).expect("handshake");
            let mut handle = client
                .exec(ProcessSpec::argv(["sh", "-c", "cat; echo done"]), true)
                .expect("exec");
            let mut stdin = handle.take_stdin().expect("stdin");
            let feeder = std::thread::spawn(move || {
                stdin.write_all(b"from stdin\n").expect("stdin write");
            });
            let mut stdout = Vec::new();
            let status = loop {
                match handle.next_event().expect("exec event") {
                    Some(ExecEvent::Stdout(bytes)) => stdout.extend(bytes),
                    Some(ExecEvent::Stderr(_)) => {}
                    Some(ExecEvent::Exited { status, .. }) => break status,
                    None => panic!("the exec stream ended without an exit"),
                }
            };
            feeder.join().unwrap();
            assert_eq!(String::from_utf8_lossy(&stdout), "from stdin\ndone\n");
            assert_eq!(status, ExitStatus::Code(0));

            let path = format!("/tmp/agentvm-filtered-client-{}", std::process::id());
            client
                .write_file(&path, &mut &b"contents"[..], WriteOptions::default())
                .expect("write_file");
            let mut back = Vec::new();
            client
                .read_file(&path, 0, None, &mut back)
                .expect("read_file");
            assert_eq!(back, b"contents");
            assert!(client
                .list_dir("/tmp")
                .expect("list_dir")
                .iter()
                .any(|e| path.ends_with(&e.name)));
            client.remove(&path, false).expect("remove");
        }
    });
    job.join().expect("the filtered client job");
    println!("FILTERED CLIENT OK");
}
