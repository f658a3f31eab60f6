//! `agentvm-jailer`: the VMM (and a jail-inspecting test program) run jailed as uid/gid 1000; the
//! jail, the cgroup limits, the lifetime, signals, errors and cleanup, seen from outside and in.
//!
//! Needs root (skipped without it, failing instead under CI=true), /dev/kvm for the tests that
//! boot the probe, and the agentvm and agentvm-jailer binaries of the same profile
//! (`cargo build --release -p vmm -p jailer`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::agentvm::{agentvm_bin, require_kvm, VmOutput, VmProcess};
use integration_tests::jailer::{
    cgroup_dir, dir_entries, jailer_bin, possible_cgroup_dirs, require_root,
};
use integration_tests::probe::{probe_elf, ProbeOutput, DEFAULT_CHECKS};

/// Hang detectors, not performance limits.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);
const SANDBOX_UID: &str = "1000";
const INSPECT: &str = env!("CARGO_BIN_EXE_jail-inspect");

/// One sandbox: a unique id and its own chroot base dir, so cleanup can be checked exactly.
struct Sandbox {
    id: String,
    base: tempfile::TempDir,
}

impl Sandbox {
    fn new(name: &str) -> Self {
        Self {
            id: format!("{name}-{}", std::process::id()),
            base: tempfile::tempdir().expect("cannot create a temporary base dir"),
        }
    }

    /// The jailer command for `exec_file`, with `options` before `--` and `vmm_args` after.
    fn command(&self, exec_file: &Path, options: &[&str], vmm_args: &[&str]) -> Command {
        let mut command = Command::new(jailer_bin());
        command
            .args(["--id", &self.id, "--uid", SANDBOX_UID, "--gid", SANDBOX_UID])
            .arg("--exec-file")
            .arg(exec_file)
            .arg("--chroot-base-dir")
            .arg(self.base.path())
            .args(options)
            .arg("--")
            .args(vmm_args);
        command
    }

    /// The jailed VMM booting the probe (mounted at /probe) with `cmdline`.
    fn boot_probe(&self, options: &[&str], cmdline: &str) -> VmProcess {
        let probe_mount = format!("{}:/probe", probe_elf().display());
        let mut all: Vec<&str> = vec!["--mount", &probe_mount];
        all.extend_from_slice(options);
        let vmm_args = [
            "boot",
            "--kernel",
            "/probe",
            "--no-base-cmdline",
            "--mem-mib",
            "256",
            "--cmdline",
            cmdline,
        ];
        VmProcess::spawn(self.command(&agentvm_bin(), &all, &vmm_args)).expect("start jailer")
    }

    fn inspect(&self, options: &[&str], args: &[&str]) -> VmProcess {
        VmProcess::spawn(self.command(Path::new(INSPECT), options, args)).expect("start jailer")
    }

    /// Runs the inspect program with `options` and checks that the jail setup failed (exit 101)
    /// with `message`, leaving nothing behind.
    fn assert_setup_fails(&self, options: &[&str], message: &str) {
        let out = self
            .inspect(options, &["report", "/"])
            .wait(RUN_TIMEOUT)
            .unwrap();
        assert_eq!(out.status.code(), Some(101), "{out:?}");
        assert!(out.stderr_text().contains(message), "{out:?}");
        self.assert_cleaned_up(&out);
    }

    /// Nothing of the sandbox is left: no jail directory, no cgroup.
    fn assert_cleaned_up(&self, out: &VmOutput) {
        let left = dir_entries(self.base.path());
        assert!(left.is_empty(), "left in the base dir: {left:?}\n{out:?}");
        for dir in possible_cgroup_dirs(&self.id) {
            assert!(
                !dir.exists(),
                "cgroup {} left behind\n{out:?}",
                dir.display()
            );
        }
    }
}

fn ready(needs_kvm: bool) -> bool {
    require_root() && (!needs_kvm || require_kvm())
}

/// `key=value` lines as jail-inspect prints them.
fn report_field<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("jail-inspect printed no {key}=:\n{stdout}"))
}

/// The host pid of the jailer's child (the sandbox's PID 1, i.e. the VMM).
fn sandbox_pid(jailer_pid: u32) -> u32 {
    let children =
        fs::read_to_string(format!("/proc/{jailer_pid}/task/{jailer_pid}/children")).unwrap();
    children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("jailer {jailer_pid} has no child: {children:?}"))
}

fn status_line(pid: u32, key: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[test]
fn jailed_vmm_boots_the_probe_and_everything_is_removed() {
    if !ready(true) {
        return;
    }
    let sandbox = Sandbox::new("boot");
    let limits = [
        "--cpu-quota",
        "100",
        "--memory-limit-mib",
        "512",
        "--pids-max",
        "64",
    ];
    let out = sandbox
        .boot_probe(&limits, "probe.token=jailed")
        .wait(RUN_TIMEOUT)
        .unwrap();
    let report = ProbeOutput::parse(&out.stdout_text());
    let problems = report.problems(&DEFAULT_CHECKS);
    assert!(problems.is_empty(), "{problems:#?}\n{out:?}");
    assert!(report.has_marker("done"), "{out:?}");
    assert!(out.status.success(), "{out:?}");
    sandbox.assert_cleaned_up(&out);
}

#[test]
fn inside_the_jail_the_program_is_uid_1000_pid_1_and_sees_only_the_jail() {
    if !ready(false) {
        return;
    }
    let sandbox = Sandbox::new("inspect");
    // A host path the jail must hide: this test's own base dir.
    let host_path = sandbox.base.path().to_str().unwrap().to_string();
    // An fd the jailer inherits without close-on-exec; the jail must not pass it on.
    let leaked = fs::File::open("/dev/null").unwrap();
    let leaked_fd = std::os::fd::AsRawFd::as_raw_fd(&leaked);
    // SAFETY: fcntl on an fd this test owns; clearing FD_CLOEXEC touches no memory.
    assert_eq!(unsafe { libc::fcntl(leaked_fd, libc::F_SETFD, 0) }, 0);
    let options = [
        "--resource-limit",
        "no-file=64",
        "--resource-limit",
        "fsize=1048576",
        "--new-netns",
    ];
    let out = sandbox
        .inspect(&options, &["report", &host_path])
        .wait(RUN_TIMEOUT)
        .unwrap();
    drop(leaked);
    assert!(out.status.success(), "{out:?}");
    let stdout = out.stdout_text();
    let field = |key| report_field(&stdout, key);
    assert_eq!(field("uid"), "1000 1000 1000 1000");
    assert_eq!(field("gid"), "1000 1000 1000 1000");
    assert_eq!(field("groups"), "");
    assert_eq!(field("cap_eff"), "0000000000000000");
    assert_eq!(field("no_new_privs"), "1");
    assert_eq!(field("pid"), "1", "not PID 1 of a new PID namespace");
    assert_eq!(field("hostname"), sandbox.id);
    assert_eq!(field("root"), "dev,jail-inspect,proc,run,tmp");
    assert_eq!(field("dev"), "kvm,null,urandom,zero");
    // 3 is the directory being listed; an inherited fd would have pushed it to 4 or beyond.
    assert_eq!(field("fds"), "0,1,2,3");
    assert_eq!(field("nofile"), "64 64");
    assert_eq!(field("fsize"), "1048576 1048576");
    // No core dumps of guest memory when the VMM dies of a signal (seccomp's SIGSYS included).
    assert_eq!(field("core"), "0 0");
    assert_eq!(field("host_path"), "absent");
    assert_eq!(field("root_writable"), "no");
    assert_eq!(field("run_writable"), "yes");
    assert_eq!(field("tmp_writable"), "yes");
    sandbox.assert_cleaned_up(&out);
}

#[test]
fn cgroup_limits_are_in_the_cgroup_files_and_run_sockets_reachable_while_the_sandbox_runs() {
    if !ready(false) {
        return;
    }
    let sandbox = Sandbox::new("limits");
    let shared = tempfile::tempdir().unwrap();
    let shared_mount = format!("{}:/shared:rw", shared.path().display());
    let options = [
        "--mount",
        &shared_mount,
        "--cpu-quota",
        "50",
        "--memory-limit-mib",
        "64",
        "--pids-max",
        "16",
    ];
    let jailed = sandbox.inspect(&options, &["hold", "/shared/stop"]);
    jailed
        .wait_for_stdout(b"READY\n", RUN_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));

    let needed = ["cpu", "memory", "pids"];
    let read = |controller: &str, file: &str| {
        let path = cgroup_dir(&sandbox.id, controller, &needed).join(file);
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_string()
    };
    let v2 = cgroup_dir(&sandbox.id, "memory", &needed)
        .join("memory.max")
        .exists();
    if v2 {
        assert_eq!(read("cpu", "cpu.max"), "50000 100000");
        assert_eq!(read("memory", "memory.max"), (64u64 << 20).to_string());
    } else {
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "50000");
        assert_eq!(read("cpu", "cpu.cfs_period_us"), "100000");
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
    }
    assert_eq!(read("pids", "pids.max"), "16");
    let pid = sandbox_pid(jailed.pid()).to_string();
    for controller in needed {
        let procs = read(controller, "cgroup.procs");
        assert!(
            procs.lines().any(|p| p == pid),
            "{controller}: {pid} not in {procs:?}"
        );
    }

    // The jail's /run is the host's <id dir>/run: the VMM's sockets are reachable from outside.
    let socket = sandbox
        .base
        .path()
        .join("jail-inspect")
        .join(&sandbox.id)
        .join("run/inspect.sock");
    std::os::unix::net::UnixStream::connect(&socket)
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", socket.display()));

    fs::write(shared.path().join("stop"), b"").unwrap();
    let out = jailed.wait(RUN_TIMEOUT).unwrap();
    assert!(out.status.success(), "{out:?}");
    let cgroups = report_field(&out.stdout_text(), "cgroup").to_string();
    assert!(
        cgroups.contains(&format!("/agentvm/{}", sandbox.id)),
        "the program's /proc/self/cgroup does not name the sandbox cgroup: {cgroups}"
    );
    sandbox.assert_cleaned_up(&out);
}

#[test]
fn a_guest_that_touches_all_its_ram_is_killed_by_the_memory_limit() {
    if !ready(true) {
        return;
    }
    let sandbox = Sandbox::new("hog");
    // 256 MiB of guest RAM against a 64 MiB cgroup.
    let out = sandbox
        .boot_probe(&["--memory-limit-mib", "64"], "probe.mode=hog")
        .wait(RUN_TIMEOUT)
        .unwrap();
    assert!(
        ProbeOutput::parse(&out.stdout_text())
            .marker("hog begin")
            .is_some(),
        "{out:?}"
    );
    assert_eq!(out.status.code(), Some(111), "{out:?}");
    assert!(
        out.stderr_text()
            .contains("VMM killed: memory limit of 64 MiB reached"),
        "{out:?}"
    );
    sandbox.assert_cleaned_up(&out);
}

#[test]
fn a_spinning_guest_is_killed_at_the_end_of_its_lifetime() {
    if !ready(true) {
        return;
    }
    let sandbox = Sandbox::new("lifetime");
    let out = sandbox
        .boot_probe(&["--lifetime", "1"], "probe.mode=spin")
        .wait(RUN_TIMEOUT)
        .unwrap();
    assert_eq!(out.status.code(), Some(110), "{out:?}");
    assert!(
        out.stderr_text()
            .contains("sandbox lifetime of 1 s exceeded"),
        "{out:?}"
    );
    sandbox.assert_cleaned_up(&out);
}

#[test]
fn sigterm_to_the_jailer_stops_the_vmm_and_cleans_up() {
    if !ready(true) {
        return;
    }
    let sandbox = Sandbox::new("sigterm");
    let jailed = sandbox.boot_probe(&["--memory-limit-mib", "512"], "probe.mode=spin");
    jailed
        .wait_for_stdout(b"PROBE spinning", RUN_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let vmm = sandbox_pid(jailed.pid());
    assert_eq!(status_line(vmm, "Uid"), "1000 1000 1000 1000");
    let nspid = status_line(vmm, "NSpid");
    assert!(
        nspid.ends_with(" 1"),
        "VMM is not PID 1 of its namespace: {nspid}"
    );
    // SIGUSR1 is passed on for the VMM's state dump and ends nothing.
    jailed.signal(libc::SIGUSR1).unwrap();
    jailed
        .wait_for_stderr(b"state dump (SIGUSR1)", RUN_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        sandbox_pid(jailed.pid()),
        vmm,
        "the VMM changed after SIGUSR1"
    );
    jailed.signal(libc::SIGTERM).unwrap();
    let out = jailed.wait(RUN_TIMEOUT).unwrap();
    // The VMM's own status for "stopped by SIGTERM", passed through.
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{out:?}");
    sandbox.assert_cleaned_up(&out);
}

#[test]
fn a_vmm_killed_by_sigkill_is_reported_and_cleaned_up() {
    if !ready(true) {
        return;
    }
    let sandbox = Sandbox::new("sigkill");
    let jailed = sandbox.boot_probe(&["--pids-max", "32"], "probe.mode=spin");
    jailed
        .wait_for_stdout(b"PROBE spinning", RUN_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let vmm = sandbox_pid(jailed.pid());
    let pid = libc::pid_t::try_from(vmm).unwrap();
    // SAFETY: kill(2) with integers; the pid is the jailer's unreaped child (it reaps only after
    // this signal ends it), so it cannot have been reused.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let out = jailed.wait(RUN_TIMEOUT).unwrap();
    assert_eq!(out.status.code(), Some(128 + libc::SIGKILL), "{out:?}");
    assert!(
        out.stderr_text().contains("VMM killed by signal SIGKILL"),
        "{out:?}"
    );
    sandbox.assert_cleaned_up(&out);
}

/// (case, --id, --uid, further options, expected message); `None` keeps the sandbox's id.
type BadRequest<'a> = (&'a str, Option<&'a str>, &'a str, &'a [&'a str], &'a str);

#[test]
fn bad_requests_are_refused_with_the_reason_and_leave_nothing() {
    if !ready(false) {
        return;
    }
    let cases: [BadRequest; 5] = [
        ("uid0", None, "0", &[], "--uid 0 would run the VMM as root"),
        (
            "nosrc",
            None,
            SANDBOX_UID,
            &["--mount", "/nonexistent/kernel"],
            "--mount source /nonexistent/kernel",
        ),
        (
            "quota",
            None,
            SANDBOX_UID,
            &["--cpu-quota", "0"],
            "--cpu-quota 0 is out of range",
        ),
        (
            "rlimit",
            None,
            SANDBOX_UID,
            &["--resource-limit", "no-file=lots"],
            "no-file=lots",
        ),
        (
            "badid",
            Some("a/b"),
            SANDBOX_UID,
            &[],
            "is not a valid sandbox id",
        ),
    ];
    for (name, id, uid, options, expected) in cases {
        let sandbox = Sandbox::new(name);
        let mut command = Command::new(jailer_bin());
        command
            .args([
                "--id",
                id.unwrap_or(&sandbox.id),
                "--uid",
                uid,
                "--gid",
                SANDBOX_UID,
            ])
            .arg("--exec-file")
            .arg(INSPECT)
            .arg("--chroot-base-dir")
            .arg(sandbox.base.path())
            .args(options)
            .args(["--", "report", "/"]);
        let out = VmProcess::spawn(command)
            .unwrap()
            .wait(RUN_TIMEOUT)
            .unwrap();
        assert_eq!(out.status.code(), Some(100), "{name}: {out:?}");
        assert!(out.stderr_text().contains(expected), "{name}: {out:?}");
        sandbox.assert_cleaned_up(&out);
    }

    let sandbox = Sandbox::new("missing");
    let out = VmProcess::spawn(sandbox.command(Path::new("/nonexistent/agentvm"), &[], &[]))
        .unwrap()
        .wait(RUN_TIMEOUT)
        .unwrap();
    assert_eq!(out.status.code(), Some(100), "{out:?}");
    assert!(
        out.stderr_text()
            .contains("--exec-file /nonexistent/agentvm"),
        "{out:?}"
    );
    sandbox.assert_cleaned_up(&out);
}

#[test]
fn an_existing_jail_for_the_id_is_refused_and_left_alone() {
    if !ready(false) {
        return;
    }
    let sandbox = Sandbox::new("exists");
    let id_dir: PathBuf = sandbox.base.path().join("jail-inspect").join(&sandbox.id);
    fs::create_dir_all(id_dir.join("root")).unwrap();
    let out = sandbox
        .inspect(&["--memory-limit-mib", "64"], &["report", "/"])
        .wait(RUN_TIMEOUT)
        .unwrap();
    assert_eq!(out.status.code(), Some(100), "{out:?}");
    let expected = format!(
        "a jail for id {} already exists at {}: another sandbox is using it",
        sandbox.id,
        id_dir.display()
    );
    assert!(out.stderr_text().contains(&expected), "{out:?}");
    assert!(id_dir.join("root").is_dir(), "the other jail was touched");
    fs::remove_dir_all(sandbox.base.path().join("jail-inspect")).unwrap();
    sandbox.assert_cleaned_up(&out);
}

#[test]
fn a_stale_cgroup_left_by_a_killed_jailer_is_replaced_and_removed() {
    if !ready(false) {
        return;
    }
    let sandbox = Sandbox::new("stale");
    // What a jailer killed by SIGKILL leaves behind: the sandbox's cgroup, with no process.
    let stale = cgroup_dir(&sandbox.id, "memory", &["memory"]);
    fs::create_dir_all(&stale).unwrap();
    let out = sandbox
        .inspect(&["--memory-limit-mib", "64"], &["report", "/"])
        .wait(RUN_TIMEOUT)
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    sandbox.assert_cleaned_up(&out);
}

#[test]
fn a_setup_error_inside_the_jail_is_reported_and_everything_is_removed() {
    if !ready(false) {
        return;
    }
    let sandbox = Sandbox::new("setupfail");
    // Passes validation (the path exists) but setns refuses a file that is no namespace, after
    // the jail directory and the cgroup were created and the child was started.
    let not_a_netns = tempfile::NamedTempFile::new().unwrap();
    let netns = not_a_netns.path().to_str().unwrap().to_string();
    sandbox.assert_setup_fails(
        &[
            "--netns",
            &netns,
            "--memory-limit-mib",
            "64",
            "--pids-max",
            "8",
        ],
        "setting up the jail failed: setns failed",
    );
}

#[test]
fn a_fork_bomb_in_one_sandbox_leaves_its_neighbour_working() {
    if !ready(true) {
        return;
    }
    let bomb = Sandbox::new("forkbomb");
    let shared = tempfile::tempdir().unwrap();
    let shared_mount = format!("{}:/shared:rw", shared.path().display());
    let bombing = bomb.inspect(
        &["--mount", &shared_mount, "--pids-max", "16"],
        &["forkbomb", "/shared/stop"],
    );
    bombing
        .wait_for_stdout(b"forkbomb refused after", RUN_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));

    let neighbour = Sandbox::new("neighbour");
    let out = neighbour
        .boot_probe(&["--pids-max", "64"], "probe.token=next-door")
        .wait(RUN_TIMEOUT)
        .unwrap();
    let report = ProbeOutput::parse(&out.stdout_text());
    let problems = report.problems(&DEFAULT_CHECKS);
    assert!(problems.is_empty(), "{problems:#?}\n{out:?}");
    assert!(out.status.success(), "{out:?}");
    neighbour.assert_cleaned_up(&out);

    fs::write(shared.path().join("stop"), b"").unwrap();
    let out = bombing.wait(RUN_TIMEOUT).unwrap();
    assert!(
        out.stdout_text()
            .contains("forkbomb refused after 15 threads"),
        "the pids limit of 16 did not stop it at 16 tasks: {out:?}"
    );
    assert_eq!(out.status.code(), Some(112), "{out:?}");
    assert!(
        out.stderr_text().contains("pids limit of 16 reached"),
        "{out:?}"
    );
    bomb.assert_cleaned_up(&out);
}

#[test]
fn parent_cgroup_puts_the_sandbox_cgroup_under_it() {
    if !ready(false) {
        return;
    }
    let sandbox = Sandbox::new("parent");
    let parent = format!("/agentvm-jailer-test-{}", std::process::id());
    let mut host = ::jailer::cgroup::CgroupHost::read().unwrap();
    host.reparent(Path::new(&parent)).unwrap();
    let parent_dir = if host.v2_missing(&["memory"]).is_ok() {
        host.v2_own_dir.clone()
    } else {
        host.v1_own_dir("memory").map(Path::to_path_buf)
    }
    .expect("no memory cgroup hierarchy");
    fs::create_dir(&parent_dir).unwrap();

    let out = sandbox
        .inspect(
            &["--parent-cgroup", &parent, "--memory-limit-mib", "64"],
            &["report", "/"],
        )
        .wait(RUN_TIMEOUT);
    let left = dir_entries(&parent_dir)
        .into_iter()
        .filter(|e| e == "agentvm")
        .count();
    fs::remove_dir(&parent_dir).unwrap();
    let out = out.unwrap();
    assert!(out.status.success(), "{out:?}");
    let cgroups = report_field(&out.stdout_text(), "cgroup").to_string();
    let expected = format!("{parent}/agentvm/{}", sandbox.id);
    assert!(cgroups.contains(&expected), "{expected} not in {cgroups}");
    assert_eq!(left, 0, "the sandboxes cgroup was left under {parent}");
    sandbox.assert_cleaned_up(&out);

    let missing = Sandbox::new("noparent");
    missing.assert_setup_fails(
        &[
            "--parent-cgroup",
            "/agentvm-no-such-cgroup",
            "--pids-max",
            "8",
        ],
        "agentvm-no-such-cgroup does not exist",
    );
}

#[test]
fn a_seccomp_violation_is_reported_as_sigsys() {
    if !ready(false) {
        return;
    }
    let sandbox = Sandbox::new("sigsys");
    let out = sandbox
        .inspect(&[], &["seccomp-violation"])
        .wait(RUN_TIMEOUT)
        .unwrap();
    assert!(out.stdout_text().contains("filter installed"), "{out:?}");
    assert_eq!(out.status.code(), Some(128 + libc::SIGSYS), "{out:?}");
    assert!(
        out.stderr_text()
            .contains("VMM killed by signal SIGSYS (seccomp violation)"),
        "{out:?}"
    );
    sandbox.assert_cleaned_up(&out);
}
