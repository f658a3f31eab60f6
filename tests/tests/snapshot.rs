//! Snapshots on this machine's KVM with the ring-3 probe guest in `count` mode (it prints
//! `PROBE count <n>` for n = 1, 2, ... forever): a VM is booted under `agentvm serve`, paused and
//! snapshotted over the API, ended; new serves load the snapshot, and the count goes on from
//! where it stopped. Corrupt snapshots are refused with their reason and leave nothing running.

use std::path::{Path, PathBuf};

use integration_tests::agentvm::{require_kvm, run_agentvm};
use integration_tests::probe::probe_elf;
use integration_tests::serve::Serve;

/// Hang detector for one `agentvm snapshot` command.
const CLI_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Every `PROBE count <n>` of `console`, in order.
fn counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("PROBE count "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Asserts `counts` goes up by one from its first element.
fn assert_consecutive(counts: &[u64], what: &str) {
    for pair in counts.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "{what}: count jumps in {counts:?}");
    }
}

/// A snapshot's two files, in a directory that outlives the VM that wrote them.
struct SnapshotFiles {
    dir: tempfile::TempDir,
}

impl SnapshotFiles {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("vm.snap")
    }

    fn mem(&self) -> PathBuf {
        self.dir.path().join("vm.mem")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn load_body(state: &Path, mem: &Path, resume: bool) -> String {
    load_body_with(state, mem, resume, "File")
}

/// A load body with the given `backend_type` ("File" or "Uffd").
fn load_body_with(state: &Path, mem: &Path, resume: bool, backend: &str) -> String {
    serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": backend, "backend_path": mem},
        "resume_vm": resume,
    })
    .to_string()
}

/// The value of the unlabelled (but for `id`) sample `name` in `GET /metrics`.
fn metric(s: &Serve, name: &str) -> Option<f64> {
    let text = s.call("GET", "/metrics", None).body;
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits until `GET /metrics` counts `n` after-restore steps that ended `outcome` (the step runs
/// in the background once a loaded VM runs); the probe guest has no agent, so each is skipped.
fn wait_after_restore(s: &Serve, outcome: &str, n: u64) {
    let sample = format!("outcome=\"{outcome}\"}} {n}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let text = s.call("GET", "/metrics", None).body;
        if text
            .lines()
            .any(|l| l.starts_with("agentvm_after_restore_total{") && l.ends_with(&sample))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no after-restore step ended {outcome} ({n}) in:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The log line of a skipped after-restore step of a probe snapshot with a vsock device.
const NO_DRIVER_SKIP: &str =
    "after restore: skipped: the guest had not set up its vsock device when the snapshot was taken";

/// Starts the counting probe in `s` (after whatever `s` was given already: a vsock device, an
/// egress policy) on `vcpus` vCPUs with `mem_mib` of memory, and lets it count to 3.
fn start_counting(s: &Serve, vcpus: u8, mem_mib: u64) {
    s.ok(
        "PUT",
        "/machine-config",
        &serde_json::json!({"vcpu_count": vcpus, "mem_size_mib": mem_mib}).to_string(),
    );
    let boot =
        serde_json::json!({"kernel_image_path": probe_elf(), "boot_args": "probe.mode=count"});
    s.ok("PUT", "/boot-source", &boot.to_string());
    s.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    s.wait_console("PROBE count 3\n");
}

/// Boots the counting probe on `vcpus` vCPUs (the probe runs on the first; the others wait for
/// an INIT-SIPI that never comes, so their MP state is saved and restored as such), with a vsock
/// device when `vsock` is given; lets it count to 3,
/// pauses it and snapshots it into `files`; returns the serve (still paused) and the console.
fn boot_and_snapshot(files: &SnapshotFiles, vcpus: u8, vsock: Option<&Path>) -> Serve {
    let s = Serve::start();
    if let Some(uds) = vsock {
        s.ok(
            "PUT",
            "/vsock",
            &serde_json::json!({"guest_cid": 3, "uds_path": uds}).to_string(),
        );
    }
    start_counting(&s, vcpus, 64);

    let create = serde_json::json!({
        "snapshot_path": files.state(),
        "mem_file_path": files.mem(),
        "snapshot_type": "Full",
    })
    .to_string();
    // Firecracker's rule: only a paused VM is snapshotted.
    s.refused("PUT", "/snapshot/create", &create, 400, "must be paused");
    s.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let diff = create.replace("\"Full\"", "\"Diff\"");
    s.refused(
        "PUT",
        "/snapshot/create",
        &diff,
        400,
        "needs dirty page tracking",
    );
    s.ok("PUT", "/snapshot/create", &create);
    // Again over the same files: the old state file is removed before the new memory file goes
    // in (snapshot::commit_snapshot), which the VMM thread's seccomp filter must allow.
    s.ok("PUT", "/snapshot/create", &create);
    assert_eq!(s.state(), "Paused");
    let mem_len = std::fs::metadata(files.mem()).expect("memory file").len();
    assert_eq!(mem_len, 64 << 20, "the memory file holds all guest RAM");
    // Loading is for a VM that has not started.
    s.refused(
        "PUT",
        "/snapshot/load",
        &load_body(&files.state(), &files.mem(), true),
        400,
        "not supported after starting",
    );
    s
}

/// A one-vCPU probe booted, snapshotted to `files` and ended: its console, and the last count it
/// printed.
fn snapshot_and_end(files: &SnapshotFiles) -> (String, u64) {
    let original = boot_and_snapshot(files, 1, None);
    let (_out, original_dir) = original.terminate();
    let before = std::fs::read_to_string(original_dir.path().join("console")).unwrap();
    let last = *counts(&before).last().expect("the original counted");
    (before, last)
}

#[test]
fn a_restored_guest_counts_on_from_where_it_was_snapshotted() {
    if !require_kvm() {
        return;
    }
    let files = SnapshotFiles::new();
    let uds = files.path("v.sock");
    let original = boot_and_snapshot(&files, 1, Some(&uds));
    // While the snapshotted VM still holds its vsock socket, a restore (which listens on the same
    // path) is refused by name and nothing runs.
    let early = Serve::start();
    early.refused(
        "PUT",
        "/snapshot/load",
        &load_body(&files.state(), &files.mem(), true),
        400,
        "already exists",
    );
    assert_eq!(early.state(), "Not started");
    drop(early);
    let (_out, original_dir) = original.terminate();
    let before = std::fs::read_to_string(original_dir.path().join("console")).unwrap();
    let last = *counts(&before).last().expect("the original counted");
    assert!(!uds.exists(), "the ended VMM removed its vsock socket");

    let restored = Serve::start();
    restored.ok(
        "PUT",
        "/snapshot/load",
        &load_body(&files.state(), &files.mem(), false),
    );
    assert_eq!(restored.state(), "Paused", "resume_vm false: loaded paused");
    let machine = restored.call("GET", "/machine-config", None).json();
    assert_eq!(machine["vcpu_count"], 1);
    assert_eq!(machine["mem_size_mib"], 64);
    assert!(
        uds.exists(),
        "the restored VM listens on the snapshot's vsock path"
    );
    restored.refused(
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        400,
        "not supported after starting",
    );
    // Loaded paused: the guest is told the time only when it runs.
    assert_eq!(
        metric(&restored, "agentvm_after_restore_duration_seconds"),
        None
    );
    restored.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    let after = restored.wait_console(&format!("PROBE count {}\n", last + 3));
    // The probe never drove its vsock device: no agent can be there, so the step is skipped
    // at once, and only once (a pause and resume do not repeat it).
    wait_after_restore(&restored, "skipped", 1);
    restored.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    restored.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    wait_after_restore(&restored, "skipped", 1);
    wait_after_restore(&restored, "failed", 0);

    // The two consoles are one stream: a line cut by the pause is finished by the restored VM.
    let joined = format!("{before}{after}");
    let all = counts(&joined);
    assert_eq!(all.first(), Some(&1));
    assert_consecutive(&all, "original + restored console");
    assert!(
        !counts(&after).contains(&1),
        "the restored guest started over:\n{after}"
    );

    // A restored VM is snapshotted again (with the CLI), over the very files its memory is
    // mapped from (the new files replace them by rename; the mapping keeps the old ones), and
    // restored again.
    let cli = |args: &[&std::ffi::OsStr]| {
        let out = run_agentvm(args, CLI_TIMEOUT).expect("agentvm snapshot");
        (out.status.code(), out.stderr_text())
    };
    let sock = restored.sock().as_os_str();
    let (state, mem) = (files.state(), files.mem());
    let (code, stderr) = cli(&[
        "snapshot".as_ref(),
        "create".as_ref(),
        "--api-sock".as_ref(),
        sock,
        "--snapshot".as_ref(),
        state.as_os_str(),
        "--mem".as_ref(),
        mem.as_os_str(),
        "--keep-paused".as_ref(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(restored.state(), "Paused");
    let (restored_out, restored_dir) = restored.terminate();
    let log = restored_out.stderr_text();
    assert_eq!(log.matches(NO_DRIVER_SKIP).count(), 1, "{log}");
    let second = std::fs::read_to_string(restored_dir.path().join("console")).unwrap();
    let last = *counts(&second).last().unwrap();
    let again = Serve::start();
    let moved_uds = files.path("moved.sock");
    let load = |snapshot: &Path| {
        cli(&[
            "snapshot".as_ref(),
            "load".as_ref(),
            "--api-sock".as_ref(),
            again.sock().as_os_str(),
            "--snapshot".as_ref(),
            snapshot.as_os_str(),
            "--mem".as_ref(),
            mem.as_os_str(),
            "--resume".as_ref(),
            "--vsock-uds-path".as_ref(),
            moved_uds.as_os_str(),
            "--vsock-guest-cid".as_ref(),
            "9".as_ref(),
        ])
    };
    let (code, stderr) = load(&files.path("missing.snap"));
    assert_eq!(code, Some(125), "{stderr}");
    assert!(stderr.contains("no such file"), "{stderr}");
    let (code, stderr) = load(&state);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        moved_uds.exists() && !uds.exists(),
        "--vsock-uds-path: the restored VM listens on the given path instead"
    );
    let third = again.wait_console(&format!("PROBE count {}\n", last + 3));
    wait_after_restore(&again, "skipped", 1);
    assert!(metric(&again, "agentvm_after_restore_duration_seconds").is_some());
    assert_consecutive(
        &counts(&format!("{before}{second}{third}")),
        "original + restored + restored again",
    );
    let (_, _dir) = again.terminate();
    assert!(!uds.exists() && !moved_uds.exists());
}

#[test]
fn one_snapshot_restores_twice_and_the_copies_run_independently() {
    if !require_kvm() {
        return;
    }
    let files = SnapshotFiles::new();
    let uds = files.path("v.sock");
    // The original stays alive (paused, holding its vsock socket) while two copies run: each
    // copy listens on its own vsock path given by vsock_override.
    let original = boot_and_snapshot(&files, 2, Some(&uds));
    let before = original.console();
    let last = *counts(&before).last().expect("the original counted");

    let copies = [Serve::start(), Serve::start()];
    let copy_socks = [files.path("copy-a.sock"), files.path("copy-b.sock")];
    for ((copy, sock), cid) in copies.iter().zip(&copy_socks).zip([5, 6]) {
        let mut body: serde_json::Value =
            serde_json::from_str(&load_body(&files.state(), &files.mem(), true)).unwrap();
        body["vsock_override"] = serde_json::json!({"uds_path": sock, "guest_cid": cid});
        copy.ok("PUT", "/snapshot/load", &body.to_string());
        assert_eq!(copy.state(), "Running");
        assert!(sock.exists(), "the copy listens on its own vsock path");
        assert_eq!(
            copy.call("GET", "/machine-config", None).json()["vcpu_count"],
            2
        );
    }
    for copy in &copies {
        let after = copy.wait_console(&format!("PROBE count {}\n", last + 3));
        assert_consecutive(&counts(&format!("{before}{after}")), "restored copy");
    }
    // Pausing one copy stops it and not the other: they share nothing but the snapshot.
    copies[0].ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let frozen = copies[0].console();
    let other = *counts(&copies[1].console()).last().unwrap();
    copies[1].wait_console(&format!("PROBE count {}\n", other + 3));
    assert_eq!(copies[0].console(), frozen, "the paused copy kept counting");
    assert!(
        uds.exists(),
        "the original still holds the snapshot's vsock path"
    );
    // The snapshot files are the restores' source, never written by them.
    let mem = std::fs::read(files.mem()).unwrap();
    let [a, b] = copies;
    let _ = a.terminate();
    let _ = b.terminate();
    assert!(
        copy_socks.iter().all(|s| !s.exists()),
        "copies removed their sockets"
    );
    drop(original);
    assert_eq!(std::fs::read(files.mem()).unwrap(), mem);
}

/// The egress policy the NIC tests give (the probe drives no NIC; only its presence matters).
const NIC_POLICY: &str = r#"{"rules": [{"id": "web", "cidr": "192.0.2.0/24", "ports": [80]}]}"#;

#[test]
fn a_snapshot_with_a_nic_restores_only_with_an_egress_policy_and_counts_on() {
    if !require_kvm() {
        return;
    }
    let files = SnapshotFiles::new();
    let original = Serve::start();
    original.ok("PUT", "/egress/policy", NIC_POLICY);
    start_counting(&original, 1, 64);
    original.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let create = serde_json::json!({"snapshot_path": files.state(), "mem_file_path": files.mem()});
    original.ok("PUT", "/snapshot/create", &create.to_string());
    let (_out, original_dir) = original.terminate();
    let before = std::fs::read_to_string(original_dir.path().join("console")).unwrap();
    let last = *counts(&before).last().expect("the original counted");

    // No policy: refused with the reason, and the VMM can still load.
    let restored = Serve::start();
    let load = load_body(&files.state(), &files.mem(), true);
    restored.refused(
        "PUT",
        "/snapshot/load",
        &load,
        400,
        "the snapshot's microVM has a NIC: give the restored one its egress policy",
    );
    assert_eq!(restored.state(), "Not started");
    restored.ok("PUT", "/egress/policy", NIC_POLICY);
    let audit = restored.path("egress.jsonl");
    restored.ok(
        "PUT",
        "/egress/audit-log",
        &serde_json::json!({"path": audit}).to_string(),
    );
    restored.ok("PUT", "/snapshot/load", &load);
    assert_eq!(restored.state(), "Running");
    let after = restored.wait_console(&format!("PROBE count {}\n", last + 3));
    assert_consecutive(&counts(&format!("{before}{after}")), "restored with a NIC");
    // The restored VM has a NIC behind a filter with the given policy, which it can change.
    assert_eq!(
        metric(&restored, "agentvm_egress_dns_queries_total"),
        Some(0.0)
    );
    let shown = restored.call("GET", "/egress/policy", None).json();
    assert_eq!(shown["rules"][0]["cidr"], "192.0.2.0/24", "{shown}");
    restored.ok(
        "PUT",
        "/egress/policy",
        r#"{"rules": [{"id": "other", "cidr": "198.51.100.0/24", "ports": [443]}]}"#,
    );
    assert!(audit.exists(), "the restored NIC opens its audit log");
    // Snapshotted again, its NIC comes along.
    restored.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let again = serde_json::json!({
        "snapshot_path": files.path("again.snap"),
        "mem_file_path": files.path("again.mem"),
    });
    restored.ok("PUT", "/snapshot/create", &again.to_string());
    let _ = restored.terminate();

    // `agentvm snapshot load --egress-policy` with a TOML file sends it before the load.
    let policy = files.path("policy.toml");
    std::fs::write(
        &policy,
        "[[rules]]\nid = \"web\"\ncidr = \"192.0.2.0/24\"\nports = [80]\n",
    )
    .unwrap();
    let by_cli = Serve::start();
    let api_sock = by_cli.path("api.sock");
    let (code, stderr) = snapshot_cli(&[
        "load".as_ref(),
        "--api-sock".as_ref(),
        api_sock.as_os_str(),
        "--snapshot".as_ref(),
        files.path("again.snap").as_os_str(),
        "--mem".as_ref(),
        files.path("again.mem").as_os_str(),
        "--egress-policy".as_ref(),
        policy.as_os_str(),
        "--resume".as_ref(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(by_cli.state(), "Running");
    by_cli.wait_console("PROBE count");
    let shown = by_cli.call("GET", "/egress/policy", None).json();
    assert_eq!(shown["rules"][0]["id"], "web", "{shown}");
    let _ = by_cli.terminate();

    // A policy for a snapshot whose VM had no NIC is refused: a restore cannot add a device.
    let plain = SnapshotFiles::new();
    snapshot_and_end(&plain);
    let no_nic = Serve::start();
    no_nic.ok("PUT", "/egress/policy", NIC_POLICY);
    no_nic.refused(
        "PUT",
        "/snapshot/load",
        &load_body(&plain.state(), &plain.mem(), true),
        400,
        "the snapshot's microVM has no NIC",
    );
    assert_eq!(no_nic.state(), "Not started");
}

/// A digest of a file's bytes (to tell two versions of a snapshot file apart).
fn digest(path: &Path) -> u64 {
    use std::hash::Hasher;
    use std::io::Read;
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            return hasher.finish();
        }
        hasher.write(&buf[..n]);
    }
}

/// A VMM killed (SIGKILL) while it overwrites a snapshot, at several moments of the write:
/// what is left at the snapshot's paths is a complete pair that restores and counts on, or a
/// memory file without a state file, which a load refuses by name; never a state file beside a
/// memory file it was not written with. Leftover temporary files never have the snapshot's names.
/// Which of those a kill gives depends on the moment; the assertions hold for every one.
#[test]
fn a_vmm_killed_while_writing_a_snapshot_leaves_a_whole_pair_or_no_state_file() {
    if !require_kvm() {
        return;
    }
    let mut outcomes = Vec::new();
    // Kills at fractions of the time the first (same-sized) snapshot took to write, so they
    // land before, during and after the overwrite's renames.
    for percent in [0u64, 30, 60, 90, 110, 150] {
        let files = SnapshotFiles::new();
        let s = Serve::start();
        start_counting(&s, 1, 512);
        s.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
        let create =
            serde_json::json!({"snapshot_path": files.state(), "mem_file_path": files.mem()})
                .to_string();
        let started = std::time::Instant::now();
        s.ok("PUT", "/snapshot/create", &create);
        let delay_ms = started.elapsed().as_millis() as u64 * percent / 100;
        let earlier = (digest(&files.state()), digest(&files.mem()));
        s.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
        s.wait_console("PROBE count 6\n");
        s.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
        // The overwrite runs on its own thread (its answer never comes: the VMM dies).
        let sock = s.sock().to_path_buf();
        let body = create.clone();
        let writer = std::thread::spawn(move || {
            integration_tests::api::request(&sock, "PUT", "/snapshot/create", Some(&body))
        });
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let (_out, _dir) = s.kill();
        let _ = writer.join();

        let leftovers: Vec<String> = std::fs::read_dir(files.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name != "vm.snap" && name != "vm.mem")
            .collect();
        assert!(
            leftovers
                .iter()
                .all(|name| name.starts_with('.') && name.contains(".tmp-")),
            "killed after {delay_ms} ms: unexpected files {leftovers:?}"
        );
        assert!(
            files.mem().exists(),
            "killed after {delay_ms} ms: no memory file"
        );
        let restore = Serve::start();
        let load = load_body(&files.state(), &files.mem(), true);
        if files.state().exists() {
            // The guest counted on between the two snapshots, so the new pair differs from the
            // earlier one in both files: the state file is the earlier one exactly when the
            // memory file is.
            let same_state = digest(&files.state()) == earlier.0;
            let same_memory = digest(&files.mem()) == earlier.1;
            assert_eq!(
                same_state,
                same_memory,
                "killed after {delay_ms} ms: the state file is {} the memory file {}",
                if same_state {
                    "the earlier one, but"
                } else {
                    "the new one, but"
                },
                if same_memory {
                    "is the earlier one"
                } else {
                    "is not the earlier one"
                }
            );
            restore.ok("PUT", "/snapshot/load", &load);
            let after = restore.wait_console("PROBE count");
            let counted = counts(&restore.wait_console(&format!(
                "PROBE count {}\n",
                counts(&after).first().copied().unwrap_or(0) + 2
            )));
            assert_consecutive(&counted, "restored after a killed overwrite");
            let which = if same_state { "earlier" } else { "new" };
            outcomes.push(format!("{delay_ms} ms: the whole {which} pair"));
        } else {
            restore.refused("PUT", "/snapshot/load", &load, 400, "snapshot_path");
            assert_eq!(restore.state(), "Not started");
            outcomes.push(format!("{delay_ms} ms: no state file"));
        }
        let _ = restore.terminate();
    }
    eprintln!("killed overwrites: {}", outcomes.join(", "));
}

#[test]
fn corrupt_or_mismatched_snapshots_are_refused_and_nothing_runs() {
    if !require_kvm() {
        return;
    }
    let files = SnapshotFiles::new();
    let original = boot_and_snapshot(&files, 1, None);
    let last = *counts(&original.console())
        .last()
        .expect("the original counted");
    drop(original);
    let state = std::fs::read(files.state()).unwrap();
    let mem = std::fs::read(files.mem()).unwrap();
    let variant = |name: &str, state: &[u8], mem_len: usize| {
        let (s, m) = (
            files.path(&format!("{name}.snap")),
            files.path(&format!("{name}.mem")),
        );
        std::fs::write(&s, state).unwrap();
        std::fs::write(&m, &mem[..mem_len]).unwrap();
        (s, m)
    };
    let mut flipped = state.clone();
    let middle = state.len() / 2;
    flipped[middle] ^= 0x10;
    let mut other_version = state.clone();
    other_version[snapshot::state_file::VERSION_OFFSET] = 99;
    let cases = [
        (
            "truncated",
            variant("truncated", &state[..state.len() / 2], mem.len()),
            "truncated state file",
        ),
        (
            "flipped",
            variant("flipped", &flipped, mem.len()),
            "checksum mismatch",
        ),
        (
            "version",
            variant("version", &other_version, mem.len()),
            "format version 99 is not supported",
        ),
        (
            "short-mem",
            variant("short-mem", &state, mem.len() / 2),
            "memory file is 33554432 bytes",
        ),
        (
            "not-a-snapshot",
            variant("not-a-snapshot", b"{\"hello\": 1}", mem.len()),
            "bad magic",
        ),
    ];

    // One serve takes every refusal: a refused load leaves it as it was, ready for another.
    let s = Serve::start();
    let backends = ["File", "Uffd"];
    for ((name, (state_path, mem_path), needle), backend) in cases
        .iter()
        .flat_map(|case| backends.iter().map(move |b| (case, b)))
    {
        let fault = s.refused(
            "PUT",
            "/snapshot/load",
            &load_body_with(state_path, mem_path, true, backend),
            400,
            needle,
        );
        assert!(
            fault.contains(&state_path.display().to_string())
                || fault.contains(&mem_path.display().to_string()),
            "{name} ({backend}): the message names the file: {fault}"
        );
        assert_eq!(s.state(), "Not started", "{name}: nothing runs");
        assert!(s.console().is_empty(), "{name}: a guest ran");
    }
    // A corrupt working set (uffd only) is refused by name too.
    let ws = files.path("vm.mem.ws");
    std::fs::write(&ws, b"AGVMWSET garbage").unwrap();
    s.refused(
        "PUT",
        "/snapshot/load",
        &load_body_with(&files.state(), &files.mem(), true, "Uffd"),
        400,
        &format!("{}: truncated", ws.display()),
    );
    assert_eq!(s.state(), "Not started");
    std::fs::remove_file(&ws).unwrap();
    s.refused(
        "PUT",
        "/snapshot/load",
        &load_body(&files.path("missing.snap"), &files.mem(), true),
        400,
        "no such file",
    );
    let mut no_vsock: serde_json::Value =
        serde_json::from_str(&load_body(&files.state(), &files.mem(), true)).unwrap();
    no_vsock["vsock_override"] = serde_json::json!({"uds_path": files.path("v.sock")});
    s.refused(
        "PUT",
        "/snapshot/load",
        &no_vsock.to_string(),
        400,
        "vsock_override: the snapshot's VM has no vsock device",
    );
    assert_eq!(s.state(), "Not started");

    // The same serve then loads the good snapshot.
    s.ok(
        "PUT",
        "/snapshot/load",
        &load_body(&files.state(), &files.mem(), true),
    );
    s.wait_console(&format!("PROBE count {}\n", last + 2));
}

/// `agentvm snapshot ...` with `args`: its exit code and stderr.
fn snapshot_cli(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let mut all: Vec<&std::ffi::OsStr> = vec!["snapshot".as_ref()];
    all.extend_from_slice(args);
    let out = run_agentvm(&all, CLI_TIMEOUT).expect("agentvm snapshot");
    (out.status.code(), out.stderr_text())
}

/// `agentvm snapshot merge` of `diff` onto `base` into `out` (each a file-name stem in `files`).
fn merge(files: &SnapshotFiles, base: &str, diff: &str, out: &str) -> (Option<i32>, String) {
    let p = |stem: &str, ext: &str| files.path(&format!("{stem}.{ext}")).into_os_string();
    let args = [
        "merge".into(),
        "--base-snapshot".into(),
        p(base, "snap"),
        "--base-mem".into(),
        p(base, "mem"),
        "--diff-snapshot".into(),
        p(diff, "snap"),
        "--diff-mem".into(),
        p(diff, "mem"),
        "--out-snapshot".into(),
        p(out, "snap"),
        "--out-mem".into(),
        p(out, "mem"),
    ];
    let args: Vec<std::ffi::OsString> = args.into_iter().collect();
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    snapshot_cli(&refs)
}

fn create_body(files: &SnapshotFiles, stem: &str, kind: &str) -> String {
    serde_json::json!({
        "snapshot_path": files.path(&format!("{stem}.snap")),
        "mem_file_path": files.path(&format!("{stem}.mem")),
        "snapshot_type": kind,
    })
    .to_string()
}

/// Bytes of disk a (sparse) file takes.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn a_diff_snapshot_merged_onto_its_base_is_the_full_snapshot_of_its_moment() {
    if !require_kvm() {
        return;
    }
    let files = SnapshotFiles::new();
    let s = Serve::start();
    s.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": true}"#,
    );
    let boot =
        serde_json::json!({"kernel_image_path": probe_elf(), "boot_args": "probe.mode=count"});
    s.ok("PUT", "/boot-source", &boot.to_string());
    s.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    s.wait_console("PROBE count 3\n");
    s.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    // A diff needs a base to be a diff of.
    s.refused(
        "PUT",
        "/snapshot/create",
        &create_body(&files, "diff", "Diff"),
        400,
        "take a Full snapshot first",
    );
    s.ok(
        "PUT",
        "/snapshot/create",
        &create_body(&files, "base", "Full"),
    );
    s.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    let counted = *counts(&s.console()).last().unwrap();
    s.wait_console(&format!("PROBE count {}\n", counted + 3));
    s.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    // A diff and a full snapshot of the same paused moment.
    s.ok(
        "PUT",
        "/snapshot/create",
        &create_body(&files, "diff", "Diff"),
    );
    s.ok(
        "PUT",
        "/snapshot/create",
        &create_body(&files, "full", "Full"),
    );
    let (_, original_dir) = s.terminate();
    let before = std::fs::read_to_string(original_dir.path().join("console")).unwrap();
    let last = *counts(&before).last().unwrap();

    assert_eq!(
        std::fs::metadata(files.path("diff.mem")).unwrap().len(),
        64 << 20,
        "a diff memory file has the full size (holes where nothing changed)"
    );
    assert!(
        allocated(&files.path("diff.mem")) < allocated(&files.path("full.mem")),
        "the diff holds fewer pages than the full snapshot ({} vs {} bytes)",
        allocated(&files.path("diff.mem")),
        allocated(&files.path("full.mem"))
    );

    // A diff alone cannot be restored.
    let lone = Serve::start();
    lone.refused(
        "PUT",
        "/snapshot/load",
        &load_body(&files.path("diff.snap"), &files.path("diff.mem"), true),
        400,
        "is a diff snapshot",
    );
    assert_eq!(lone.state(), "Not started");

    // Files that do not belong together are refused, by name.
    let (code, stderr) = merge(&files, "full", "diff", "bad");
    assert_ne!(code, Some(0));
    assert!(stderr.contains("do not belong together"), "{stderr}");
    let (code, stderr) = merge(&files, "base", "full", "bad");
    assert_ne!(code, Some(0));
    assert!(stderr.contains("not a diff"), "{stderr}");
    assert!(!files.path("bad.mem").exists() && !files.path("bad.snap").exists());

    let (code, stderr) = merge(&files, "base", "diff", "merged");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        std::fs::read(files.path("merged.mem")).unwrap()
            == std::fs::read(files.path("full.mem")).unwrap(),
        "base + diff differs from the full snapshot's memory"
    );

    // The merged snapshot restores, with dirty tracking, and counts on from the diff's moment.
    let mut load: serde_json::Value = serde_json::from_str(&load_body(
        &files.path("merged.snap"),
        &files.path("merged.mem"),
        true,
    ))
    .unwrap();
    load["track_dirty_pages"] = true.into();
    lone.ok("PUT", "/snapshot/load", &load.to_string());
    let after = lone.wait_console(&format!("PROBE count {}\n", last + 3));
    assert_consecutive(&counts(&format!("{before}{after}")), "original + merged");
    assert!(!counts(&after).contains(&1), "started over:\n{after}");

    // Diffs chain: the restored VM's next diff is against the merged snapshot, and only there.
    lone.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    lone.ok(
        "PUT",
        "/snapshot/create",
        &create_body(&files, "diff2", "Diff"),
    );
    lone.ok(
        "PUT",
        "/snapshot/create",
        &create_body(&files, "full2", "Full"),
    );
    let (code, stderr) = merge(&files, "base", "diff2", "bad");
    assert!(
        stderr.contains("do not belong together"),
        "{code:?} {stderr}"
    );
    // In place: the merge replaces its base (the mapped restore keeps the old file).
    let (code, stderr) = merge(&files, "merged", "diff2", "merged");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        std::fs::read(files.path("merged.mem")).unwrap()
            == std::fs::read(files.path("full2.mem")).unwrap(),
        "merged + diff2 differs from the second full snapshot's memory"
    );
}

#[test]
fn uffd_restore_counts_on_records_its_working_set_and_the_next_restore_prefetches_it() {
    if !require_kvm() {
        return;
    }
    let files = SnapshotFiles::new();
    let (before, last) = snapshot_and_end(&files);
    let ws = files.path("vm.mem.ws");
    let uffd_load = || load_body_with(&files.state(), &files.mem(), true, "Uffd");

    // First uffd restore: every page comes in by a fault; nothing to prefetch yet.
    let first = Serve::start();
    first.ok("PUT", "/snapshot/load", &uffd_load());
    assert_eq!(first.state(), "Running");
    let after = first.wait_console(&format!("PROBE count {}\n", last + 3));
    assert_consecutive(&counts(&format!("{before}{after}")), "uffd restore");
    let faults = metric(&first, "agentvm_uffd_faults_total").expect("uffd fault counter");
    assert!(faults >= 1.0, "the guest ran without a single fault");
    assert_eq!(
        metric(&first, "agentvm_uffd_prefetched_pages_total"),
        Some(0.0)
    );
    assert!(!ws.exists(), "the working set is written when the VM stops");
    wait_after_restore(&first, "skipped", 1);
    let (first_out, _first_dir) = first.terminate();
    let log = first_out.stderr_text();
    assert!(
        log.contains("after restore: skipped: the microVM has no vsock device"),
        "{log}"
    );
    let recorded = std::fs::read(&ws).expect("the first uffd restore recorded a working set");
    let pages = (recorded.len() as u64 - 68) / 8;
    assert!(pages >= 1, "empty working set");

    // Second uffd restore (by the CLI): the recorded pages are prefetched, so the guest counts
    // on with fewer faults; then it is snapshotted (reading pages it never touched through the
    // handler) and that snapshot is restored from its file.
    let second = Serve::start();
    let (state, mem) = (files.state(), files.mem());
    let args: [&std::ffi::OsStr; 11] = [
        "snapshot".as_ref(),
        "load".as_ref(),
        "--api-sock".as_ref(),
        second.sock().as_os_str(),
        "--snapshot".as_ref(),
        state.as_os_str(),
        "--mem".as_ref(),
        mem.as_os_str(),
        "--backend".as_ref(),
        "uffd".as_ref(),
        "--resume".as_ref(),
    ];
    let load = run_agentvm(args, CLI_TIMEOUT).expect("agentvm snapshot load --backend uffd");
    assert_eq!(load.status.code(), Some(0), "{}", load.stderr_text());
    let after = second.wait_console(&format!("PROBE count {}\n", last + 3));
    assert_consecutive(
        &counts(&format!("{before}{after}")),
        "prefetched uffd restore",
    );
    assert_eq!(
        metric(&second, "agentvm_uffd_prefetched_pages_total"),
        Some(pages as f64),
        "every recorded page was prefetched"
    );
    second.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (state2, mem2) = (files.path("again.snap"), files.path("again.mem"));
    second.ok(
        "PUT",
        "/snapshot/create",
        &serde_json::json!({"snapshot_path": state2, "mem_file_path": mem2}).to_string(),
    );
    let (_, second_dir) = second.terminate();
    let second_console = std::fs::read_to_string(second_dir.path().join("console")).unwrap();
    assert_eq!(
        std::fs::read(&ws).unwrap(),
        recorded,
        "a restore that prefetched keeps the recorded set"
    );
    let third = Serve::start();
    third.ok("PUT", "/snapshot/load", &load_body(&state2, &mem2, true));
    let last2 = *counts(&second_console).last().unwrap();
    let after = third.wait_console(&format!("PROBE count {}\n", last2 + 2));
    assert_consecutive(
        &counts(&format!("{second_console}{after}")),
        "file restore of a snapshot taken from a uffd restore",
    );
    assert_eq!(metric(&third, "agentvm_uffd_faults_total"), None);
    let _ = third.terminate();
}

#[test]
fn a_uffd_handler_that_cannot_read_a_page_ends_the_vm_with_the_reason() {
    if !require_kvm() {
        return;
    }
    let files = SnapshotFiles::new();
    let original = boot_and_snapshot(&files, 1, None);
    drop(original);
    let s = Serve::start();
    s.ok(
        "PUT",
        "/snapshot/load",
        &load_body_with(&files.state(), &files.mem(), false, "Uffd"),
    );
    // The memory file loses its pages under the paused VM: the first fault cannot be served.
    std::fs::OpenOptions::new()
        .write(true)
        .open(files.mem())
        .and_then(|f| f.set_len(0))
        .expect("truncate the memory file");
    s.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    let (out, _dir) = s.wait_exit();
    let stderr = out.stderr_text();
    assert!(
        stderr.contains("guest memory: reading guest page"),
        "the VM did not end on the handler's error:\n{stderr}"
    );
    assert!(!out.status.success(), "{stderr}");
}

/// `agentvm snapshot uffd-handler` serving `mem` on the socket `name` in `files`' dir, with
/// `flags` (--once, --prefetch-working-set).
struct UffdHandler {
    process: integration_tests::agentvm::VmProcess,
    socket: PathBuf,
}

impl UffdHandler {
    fn start(files: &SnapshotFiles, name: &str, mem: &Path, flags: &[&str]) -> Self {
        let socket = files.path(name);
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "snapshot".as_ref(),
            "uffd-handler".as_ref(),
            "--socket".as_ref(),
            socket.as_os_str(),
            "--mem-file".as_ref(),
            mem.as_os_str(),
        ];
        args.extend(flags.iter().map(std::ffi::OsStr::new));
        let process = integration_tests::agentvm::VmProcess::agentvm(args)
            .expect("start agentvm snapshot uffd-handler");
        process
            .wait_for_stdout(b"uffd-handler: listening on", CLI_TIMEOUT)
            .expect("the handler listens");
        Self { process, socket }
    }
}

/// The `faults=` counts of the handler's per-VM lines ("vm N ended (...): faults=F ...").
fn handler_faults(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter(|l| l.contains(" ended (the VMM closed its connection): "))
        .filter_map(|l| l.split("faults=").nth(1))
        .filter_map(|rest| rest.split(' ').next())
        .filter_map(|n| n.parse().ok())
        .collect()
}

#[test]
fn restores_through_an_external_uffd_handler_count_on_and_the_handler_counts_their_faults() {
    if !require_kvm() {
        return;
    }
    let files = SnapshotFiles::new();
    let (before, last) = snapshot_and_end(&files);
    let handler = UffdHandler::start(&files, "uffd.sock", &files.mem(), &[]);
    let via = |socket: &Path| load_body_with(&files.state(), socket, true, "Uffd");
    // A second handler on the same socket is refused without disturbing the first.
    let (mem, socket) = (files.mem(), handler.socket.clone());
    let second = run_agentvm(
        [
            "snapshot".as_ref(),
            "uffd-handler".as_ref(),
            "--socket".as_ref(),
            socket.as_os_str(),
            "--mem-file".as_ref(),
            mem.as_os_str(),
        ] as [&std::ffi::OsStr; 6],
        CLI_TIMEOUT,
    )
    .expect("a second handler");
    assert!(!second.status.success());
    assert!(
        second.stderr_text().contains("uffd.sock: already exists"),
        "{}",
        second.stderr_text()
    );
    assert!(
        socket.exists(),
        "the refused handler left the first one's socket"
    );

    let copies = [Serve::start(), Serve::start()];
    // No such socket, and a socket nobody listens on: refused, nothing runs, and the same
    // serve can still load.
    copies[0].refused(
        "PUT",
        "/snapshot/load",
        &via(&files.path("missing.sock")),
        400,
        "missing.sock: no such file (the memory file) or Unix socket",
    );
    let stale = files.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind a socket"));
    copies[0].refused(
        "PUT",
        "/snapshot/load",
        &via(&stale),
        400,
        "stale.sock: cannot connect",
    );
    assert_eq!(copies[0].state(), "Not started");

    // Two VMs restored through one handler at once, each counting on independently.
    for copy in &copies {
        copy.ok("PUT", "/snapshot/load", &via(&handler.socket));
        assert_eq!(copy.state(), "Running");
    }
    for copy in &copies {
        let after = copy.wait_console(&format!("PROBE count {}\n", last + 3));
        assert_consecutive(
            &counts(&format!("{before}{after}")),
            "external uffd restore",
        );
        // The VMM serves no faults itself: the handler counts them.
        assert_eq!(metric(copy, "agentvm_uffd_faults_total"), None);
    }
    copies[0].ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let frozen = copies[0].console();
    let other = *counts(&copies[1].console()).last().unwrap();
    copies[1].wait_console(&format!("PROBE count {}\n", other + 3));
    assert_eq!(copies[0].console(), frozen, "the paused copy kept counting");
    for copy in copies {
        let _ = copy.terminate();
    }
    handler
        .process
        .wait_for_stdout(b"vm 2 ended", CLI_TIMEOUT)
        .expect("the handler saw both VMs end");
    handler.process.signal(libc::SIGTERM).expect("SIGTERM");
    let out = handler
        .process
        .wait(CLI_TIMEOUT)
        .expect("the handler exits");
    let stdout = out.stdout_text();
    let faults = handler_faults(&stdout);
    assert_eq!(faults.len(), 2, "one line per VM:\n{stdout}");
    assert!(
        faults.iter().all(|&f| f >= 1),
        "a VM ran without a single fault served:\n{stdout}"
    );
    assert!(!handler.socket.exists(), "the handler removed its socket");
}

#[test]
fn an_external_uffd_handler_once_exits_after_its_vm_and_a_killed_one_ends_the_vm_with_the_reason() {
    if !require_kvm() {
        return;
    }
    let files = SnapshotFiles::new();
    let (before, last) = snapshot_and_end(&files);

    // --once: the handler ends (and removes its socket) when its one VM has ended. With
    // --prefetch-working-set it first copies in the pages of `<mem>.ws`.
    let mem_file = std::fs::File::open(files.mem()).unwrap();
    let identity = snapshot::memory_file_identity(&files.mem(), &mem_file).unwrap();
    let set = snapshot::WorkingSet {
        mem_file_len: identity.0,
        mem_file_mtime_ns: identity.1,
        pages: (0..8).collect(),
    };
    snapshot::write_working_set(&snapshot::working_set_path(&files.mem()), &set).unwrap();
    let once = UffdHandler::start(
        &files,
        "once.sock",
        &files.mem(),
        &["--once", "--prefetch-working-set"],
    );
    let s = Serve::start();
    let (state, socket) = (files.state(), once.socket.clone());
    let args: [&std::ffi::OsStr; 11] = [
        "snapshot".as_ref(),
        "load".as_ref(),
        "--api-sock".as_ref(),
        s.sock().as_os_str(),
        "--snapshot".as_ref(),
        state.as_os_str(),
        "--mem".as_ref(),
        socket.as_os_str(),
        "--backend".as_ref(),
        "uffd".as_ref(),
        "--resume".as_ref(),
    ];
    let load = run_agentvm(args, CLI_TIMEOUT).expect("agentvm snapshot load via the handler");
    assert_eq!(load.status.code(), Some(0), "{}", load.stderr_text());
    let after = s.wait_console(&format!("PROBE count {}\n", last + 2));
    assert_consecutive(&counts(&format!("{before}{after}")), "restore via --once");
    let _ = s.terminate();
    let out = once.process.wait(CLI_TIMEOUT).expect("--once exits");
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr_text());
    let stdout = out.stdout_text();
    assert_eq!(handler_faults(&stdout).len(), 1, "{stdout}");
    assert!(stdout.contains(" prefetched=8\n"), "{stdout}");
    assert!(!socket.exists(), "the --once handler removed its socket");

    // A handler that cannot serve the mappings (its memory file is too short) closes the
    // connection: the load is refused, or, if the VM was built before the handler had read
    // the mappings, that VM ends with the reason. Nothing keeps running either way.
    let short = files.path("short.mem");
    std::fs::write(&short, vec![0u8; 4096]).unwrap();
    let refusing = UffdHandler::start(&files, "short.sock", &short, &["--once"]);
    let s = Serve::start();
    let answer = s.call(
        "PUT",
        "/snapshot/load",
        Some(&load_body_with(
            &files.state(),
            &refusing.socket,
            false,
            "Uffd",
        )),
    );
    let out = refusing
        .process
        .wait(CLI_TIMEOUT)
        .expect("the handler ends");
    assert!(
        out.stderr_text().contains("the file has 0x1000"),
        "{}",
        out.stderr_text()
    );
    if answer.status == 400 {
        assert!(
            answer
                .body
                .contains("closed its connection before the VM ran"),
            "{answer:?}"
        );
        assert_eq!(s.state(), "Not started");
    } else {
        assert_eq!(answer.status, 204, "{answer:?}");
        let (out, _dir) = s.wait_exit();
        assert!(
            out.stderr_text()
                .contains("short.sock closed its connection"),
            "{}",
            out.stderr_text()
        );
    }

    // A handler killed while its VM runs: the VM ends, naming the handler, instead of hanging.
    let handler = UffdHandler::start(&files, "killed.sock", &files.mem(), &[]);
    let s = Serve::start();
    s.ok(
        "PUT",
        "/snapshot/load",
        &load_body_with(&files.state(), &handler.socket, true, "Uffd"),
    );
    s.wait_console(&format!("PROBE count {}\n", last + 2));
    handler.process.signal(libc::SIGKILL).expect("SIGKILL");
    let (out, _dir) = s.wait_exit();
    let stderr = out.stderr_text();
    assert!(
        stderr.contains("guest memory: the external uffd handler at")
            && stderr.contains("killed.sock closed its connection"),
        "the VM did not end on the handler's death:\n{stderr}"
    );
    assert!(!out.status.success(), "{stderr}");
}
