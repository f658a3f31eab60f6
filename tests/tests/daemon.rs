//! `agentvm daemon` over its real socket, with the ring-3 probe guest as the sandboxes' guest
//! (jailed when the tests run as root, as in CI): every error class, the sandbox lifecycle, a
//! daemon killed and restarted (sandboxes adopted, a vanished one reported lost, a hibernated
//! one kept and resumed from its snapshot), a second daemon refused, and 50 creates in
//! parallel; and isolate sandboxes (tier isolate: a WebAssembly module served by its own worker
//! process, no guest boot) through the same API. The agent routes with a real Linux guest are
//! in the agent-e2e driver (`daemon` check).
//!
//! Needs /dev/kvm (skipped without it, failing instead under CI=true) and the agentvm and
//! agentvm-jailer binaries: `cargo build --release -p vmm -p jailer`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration_tests::agentvm::{require_kvm, VmProcess};
use integration_tests::api::{request, wait_for_text, ApiResponse};
use integration_tests::probe::probe_elf;

const START_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A daemon on a temp state directory; dropping it ends the daemon and every sandbox VMM it
/// left running (SIGTERM first, so jailers remove their jails and cgroups).
struct Daemon {
    process: Option<VmProcess>,
    sock: PathBuf,
    state: PathBuf,
    /// Environment the daemon gets beyond the test's (its sandboxes inherit it).
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Self {
        Self::start_with_env(&[])
    }

    fn start_with_env(env: &[(&str, &str)]) -> Self {
        // Short paths: sandbox sockets live under the state directory.
        let dir = tempfile::Builder::new()
            .prefix("avd")
            .tempdir_in("/tmp")
            .unwrap();
        let sock = dir.path().join("d.sock");
        let state = dir.path().join("s");
        let mut daemon = Self {
            process: None,
            sock,
            state,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _dir: dir,
        };
        daemon.process = Some(daemon.spawn());
        daemon
    }

    fn spawn(&self) -> VmProcess {
        let mut args = vec![
            "daemon".to_string(),
            "--sock".to_string(),
            self.sock.display().to_string(),
            "--state-dir".to_string(),
            self.state.display().to_string(),
        ];
        if !is_root() {
            args.push("--no-jail".to_string());
        }
        let mut command = std::process::Command::new(integration_tests::agentvm::agentvm_bin());
        command.args(&args).envs(self.env.iter().cloned());
        let process = VmProcess::spawn(command).expect("start agentvm daemon");
        // A restarted daemon replaces the stale socket of the one before: wait for an answer.
        let until = Instant::now() + START_TIMEOUT;
        while std::os::unix::net::UnixStream::connect(&self.sock).is_err() {
            assert!(
                Instant::now() < until,
                "the daemon did not answer on its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        process
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> ApiResponse {
        request(&self.sock, method, path, body)
    }

    fn expect(&self, method: &str, path: &str, body: Option<&str>, status: u16) -> ApiResponse {
        let answer = self.call(method, path, body);
        let shown = body.map(|b| &b[..b.len().min(200)]);
        assert_eq!(
            answer.status, status,
            "{method} {path} {shown:?}: {answer:?}"
        );
        answer
    }

    fn refused(&self, method: &str, path: &str, body: Option<&str>, status: u16, needle: &str) {
        let fault = self.expect(method, path, body, status).fault();
        let shown = body.map(|b| &b[..b.len().min(200)]);
        assert!(
            fault.contains(needle),
            "{method} {path} {shown:?}: {fault:?} lacks {needle:?}"
        );
    }

    fn sandbox(&self, id: &str) -> serde_json::Value {
        self.expect("GET", &format!("/sandboxes/{id}"), None, 200)
            .json()
    }

    fn pids(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(self.state.join("sandboxes")) else {
            return vec![];
        };
        entries
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("sandbox.json")).ok())
            .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter_map(|v| v["pid"].as_u64().map(|p| p as u32))
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        drop(self.process.take());
        let pids = self.pids();
        for (signal, wait) in [(libc::SIGTERM, 5), (libc::SIGKILL, 5)] {
            for &pid in &pids {
                // SAFETY: kill(2) with integers only; a pid of a VMM this test started.
                unsafe { libc::kill(pid as i32, signal) };
            }
            let until = Instant::now() + Duration::from_secs(wait);
            while pids.iter().any(|p| alive(*p)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// The console of sandbox `id`'s VMM: in its jail's /run when jailed.
fn console_path(state: &Path, id: &str) -> PathBuf {
    if is_root() {
        state.join(format!("jail/agentvm/{id}/run/console.log"))
    } else {
        state.join(format!("sandboxes/{id}/console.log"))
    }
}

/// The numbers of the probe's `PROBE count N` lines.
fn counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("PROBE count "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn template(mode: &str) -> String {
    serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": format!("probe.mode={mode}"),
        "mem_size_mib": 32,
        "agent": false,
    })
    .to_string()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + EXIT_TIMEOUT;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_bad_request_is_a_4xx_with_a_fault_message() {
    if !require_kvm() {
        return;
    }
    let d = Daemon::start();
    d.expect("PUT", "/templates/probe", Some(&template("count")), 204);

    d.refused("POST", "/sandboxes", Some("{"), 400, "EOF while parsing");
    d.refused("POST", "/sandboxes", None, 400, "needs a JSON body");
    d.refused(
        "POST",
        "/sandboxes",
        Some(r#"{"colour": 1}"#),
        400,
        "unknown field `colour`",
    );
    d.refused(
        "POST",
        "/sandboxes",
        Some(r#"{"vcpu_count": "two"}"#),
        400,
        "invalid type",
    );
    d.refused(
        "POST",
        "/sandboxes",
        Some(r#"{"template": "probe", "vcpu_count": 0}"#),
        400,
        "vcpu_count must be 1..=16",
    );
    d.refused(
        "POST",
        "/sandboxes",
        Some(r#"{"template": "probe", "mem_size_mib": 1}"#),
        400,
        "mem_size_mib must be",
    );
    d.refused(
        "POST",
        "/sandboxes",
        Some(r#"{"template": "probe", "timeout_s": 0}"#),
        400,
        "timeout_s",
    );
    d.refused(
        "POST",
        "/sandboxes",
        Some(r#"{"template": "probe", "id": "../x"}"#),
        400,
        "1-40 characters",
    );
    d.refused(
        "POST",
        "/sandboxes",
        Some(r#"{"template": "nope"}"#),
        404,
        "no template \"nope\"",
    );
    d.refused(
        "POST",
        "/sandboxes",
        Some(r#"{"kernel_image_path": "/no/such/kernel", "agent": false}"#),
        400,
        "/no/such/kernel is not a readable file",
    );
    let big = format!(r#"{{"kernel_image_path": "{}"}}"#, "x".repeat(70 * 1024));
    d.refused("PUT", "/templates/big", Some(&big), 413, "65536-byte limit");
    // A create may carry an isolate's module (8 MiB, in base64): its limit is that.
    // (Refused from its Content-Length, before the body is read.)
    let answer = integration_tests::api::raw(
        &d.sock,
        b"POST /sandboxes HTTP/1.1\r\nHost: x\r\nContent-Length: 11300000\r\n\r\n",
    );
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(answer.fault().contains("11250344-byte limit"), "{answer:?}");
    d.refused("GET", "/sandboxes/ghost", None, 404, "no sandbox \"ghost\"");
    d.refused("DELETE", "/sandboxes/ghost", None, 404, "no sandbox");
    d.refused("POST", "/sandboxes/ghost/stop", None, 404, "no sandbox");
    d.refused(
        "POST",
        "/sandboxes/ghost/hibernate",
        None,
        404,
        "no sandbox",
    );
    d.refused(
        "POST",
        "/sandboxes/ghost/exec",
        Some("{}"),
        404,
        "no sandbox",
    );
    d.refused("PATCH", "/sandboxes/x", None, 405, "GET, DELETE");
    d.refused("GET", "/no/such/route", None, 404, "no such route");
    d.refused(
        "PUT",
        "/templates/bad",
        Some(r#"{"kernel_image_path": "k"}"#),
        400,
        "absolute",
    );
    d.refused(
        "PUT",
        "/templates/bad",
        Some(r#"{}"#),
        400,
        "missing field `kernel_image_path`",
    );
    d.refused("GET", "/templates/nope", None, 404, "no template");
    d.refused("DELETE", "/templates/nope", None, 404, "no template");

    // A sandbox without an agent, then in the wrong states.
    let created = d.expect(
        "POST",
        "/sandboxes",
        Some(r#"{"template": "probe", "id": "a"}"#),
        201,
    );
    assert_eq!(created.json()["state"], "running", "{created:?}");
    d.refused(
        "POST",
        "/sandboxes",
        Some(r#"{"template": "probe", "id": "a"}"#),
        409,
        "already exists",
    );
    d.refused(
        "POST",
        "/sandboxes/a/exec",
        Some(r#"{"cmd": ["true"]}"#),
        409,
        "without the agentvm agent",
    );
    d.expect("POST", "/sandboxes/a/pause", None, 200);
    d.refused("POST", "/sandboxes/a/files/list?path=/", None, 405, "GET");
    d.refused(
        "GET",
        "/sandboxes/a/files/list?path=/",
        None,
        409,
        "sandbox a is paused",
    );
    d.expect("POST", "/sandboxes/a/stop", None, 200);
    d.refused(
        "POST",
        "/sandboxes/a/resume",
        None,
        409,
        "sandbox a is stopped (stopped through the API)",
    );
    d.refused("GET", "/sandboxes/a/metrics", None, 409, "is stopped");
    d.refused("POST", "/sandboxes/a/hibernate", None, 409, "is stopped");
    d.expect("DELETE", "/sandboxes/a", None, 204);
    d.refused("GET", "/sandboxes/a", None, 404, "no sandbox");
    assert!(!d.state.join("sandboxes/a").exists());
}

#[test]
fn sandboxes_live_pause_stop_and_survive_a_daemon_restart() {
    if !require_kvm() {
        return;
    }
    let mut d = Daemon::start();
    d.expect("PUT", "/templates/probe", Some(&template("count")), 204);
    assert_eq!(
        d.expect("GET", "/templates", None, 200).json()["templates"],
        serde_json::json!(["probe"])
    );
    let keep = d.expect(
        "POST",
        "/sandboxes",
        Some(r#"{"template": "probe", "id": "keep"}"#),
        201,
    );
    let keep_pid = keep.json()["pid"].as_u64().expect("a pid") as u32;
    assert_eq!(keep.json()["jailed"], is_root());
    d.expect("POST", "/sandboxes/keep/pause", None, 200);
    assert_eq!(d.sandbox("keep")["state"], "paused");
    // Forwarded to the per-VM API.
    let metrics = d.expect("GET", "/sandboxes/keep/metrics", None, 200);
    assert!(metrics.body.contains("agentvm_vm_state"), "{metrics:?}");
    let doomed = d.expect(
        "POST",
        "/sandboxes",
        Some(r#"{"template": "probe", "id": "doomed"}"#),
        201,
    );
    let doomed_pid = doomed.json()["pid"].as_u64().unwrap() as u32;
    d.expect("POST", "/sandboxes/doomed/pause", None, 200);
    // A guest that ends by itself: the sandbox has exited, with the reason.
    let quick = serde_json::json!({
        "kernel_image_path": probe_elf(), "boot_args": "probe.mode=default",
        "mem_size_mib": 32, "agent": false, "id": "quick",
    });
    d.expect("POST", "/sandboxes", Some(&quick.to_string()), 201);
    wait_until("the quick sandbox to exit", || {
        d.sandbox("quick")["state"] == "exited"
    });
    assert_eq!(d.sandbox("quick")["ended"], "the guest shut down");
    assert_eq!(d.sandbox("quick")["template"], "(inline)");

    // A hibernated sandbox: its VMM gone, its snapshot in the state directory.
    d.expect(
        "POST",
        "/sandboxes",
        Some(r#"{"template": "probe", "id": "sleeper"}"#),
        201,
    );
    let console = console_path(&d.state, "sleeper");
    wait_for_text(&console, "PROBE count 2\n", EXIT_TIMEOUT).expect("the sleeper counts");
    // Paused first, so that the console read here is the last thing the guest printed.
    d.expect("POST", "/sandboxes/sleeper/pause", None, 200);
    let before = std::fs::read_to_string(&console).unwrap();
    let last = *counts(&before).last().unwrap();
    let sleeper_pid = d.sandbox("sleeper")["pid"].as_u64().unwrap() as u32;
    let hibernated = d
        .expect("POST", "/sandboxes/sleeper/hibernate", None, 200)
        .json();
    assert_eq!(hibernated["state"], "hibernated", "{hibernated}");
    assert!(hibernated.get("pid").is_none(), "{hibernated}");
    assert!(!alive(sleeper_pid));
    let snapshot = d.state.join("sandboxes/sleeper/snapshot");
    assert!(snapshot.join("state").is_file() && snapshot.join("mem").is_file());
    // Hibernating again changes nothing; a hibernated sandbox cannot be paused.
    d.expect("POST", "/sandboxes/sleeper/hibernate", None, 200);
    d.refused(
        "POST",
        "/sandboxes/sleeper/pause",
        None,
        409,
        "is hibernated",
    );
    d.refused(
        "GET",
        "/sandboxes/sleeper/metrics",
        None,
        409,
        "is hibernated",
    );

    // The daemon dies; one VMM dies while it is down (the VMM itself when jailed, so that its
    // jailer still cleans up the jail and cgroup, as after a VMM crash).
    d.process.take().unwrap().signal(libc::SIGKILL).unwrap();
    kill_sandbox_process(doomed_pid);
    wait_until("the doomed VMM to die", || !alive(doomed_pid));
    // A second daemon on the same state directory is refused while the first holds it... the
    // first is gone, so a restart takes over its stale socket.
    d.process = Some(d.spawn());

    let keep = d.sandbox("keep");
    assert_eq!(keep["state"], "paused", "{keep}");
    assert_eq!(keep["pid"].as_u64(), Some(u64::from(keep_pid)));
    let doomed = d.sandbox("doomed");
    assert_eq!(doomed["state"], "lost", "{doomed}");
    assert!(
        doomed["ended"]
            .as_str()
            .unwrap()
            .contains("was gone when the daemon restarted"),
        "{doomed}"
    );
    assert_eq!(d.sandbox("quick")["state"], "exited");
    assert_eq!(d.sandbox("sleeper")["state"], "hibernated");
    let list = d.expect("GET", "/sandboxes", None, 200).json();
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 4, "{list}");

    // The hibernated sandbox resumes from its snapshot in a new VMM: the count goes on.
    let resumed = d
        .expect("POST", "/sandboxes/sleeper/resume", None, 200)
        .json();
    assert_eq!(resumed["state"], "running", "{resumed}");
    assert!(
        !snapshot.join("mem").exists(),
        "the snapshot outlived the resume"
    );
    let after = wait_for_text(
        &console,
        &format!("PROBE count {}\n", last + 2),
        EXIT_TIMEOUT,
    )
    .expect("the resumed sleeper counts on");
    let after = counts(after.strip_prefix(before.as_str()).unwrap_or(&after));
    assert!(
        !after.is_empty() && !after.contains(&1) && after[0] <= last + 2,
        "the resumed guest started over or skipped: {after:?} after {last}"
    );

    // The adopted VMM is controlled as before.
    d.expect("POST", "/sandboxes/keep/resume", None, 200);
    assert_eq!(d.sandbox("keep")["state"], "running");
    let stopped = d.expect("POST", "/sandboxes/keep/stop", None, 200).json();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(!alive(keep_pid));
    // Hibernated straight from running; destroying it removes the snapshot with the rest.
    let sleeper_pid = d.sandbox("sleeper")["pid"].as_u64().unwrap() as u32;
    d.expect("POST", "/sandboxes/sleeper/hibernate", None, 200);
    assert!(!alive(sleeper_pid));
    assert!(snapshot.join("mem").is_file());
    for id in ["keep", "doomed", "quick", "sleeper"] {
        d.expect("DELETE", &format!("/sandboxes/{id}"), None, 204);
    }
    assert_eq!(
        d.expect("GET", "/sandboxes", None, 200).json()["sandboxes"],
        serde_json::json!([])
    );
    assert_leftovers_gone(&d.state);
}

#[test]
fn a_second_daemon_on_the_same_state_or_socket_is_refused() {
    let d = Daemon::start();
    let other = tempfile::tempdir().unwrap();
    let same_state = VmProcess::agentvm([
        "daemon".as_ref(),
        "--no-jail".as_ref(),
        "--sock".as_ref(),
        other.path().join("d.sock").as_os_str(),
        "--state-dir".as_ref(),
        d.state.as_os_str(),
    ])
    .unwrap()
    .wait(EXIT_TIMEOUT)
    .unwrap();
    assert_eq!(same_state.status.code(), Some(125), "{same_state:?}");
    assert!(
        same_state
            .stderr_text()
            .contains("another agentvm daemon is using the state directory"),
        "{same_state:?}"
    );
    let same_sock = VmProcess::agentvm([
        "daemon".as_ref(),
        "--no-jail".as_ref(),
        "--sock".as_ref(),
        d.sock.as_os_str(),
        "--state-dir".as_ref(),
        other.path().join("s").as_os_str(),
    ])
    .unwrap()
    .wait(EXIT_TIMEOUT)
    .unwrap();
    assert_eq!(same_sock.status.code(), Some(125), "{same_sock:?}");
    assert!(
        same_sock.stderr_text().contains("is in use"),
        "{same_sock:?}"
    );
    assert_eq!(d.call("GET", "/", None).status, 200);
}

#[test]
fn fifty_creates_in_parallel_all_succeed() {
    if !require_kvm() {
        return;
    }
    const N: usize = 50;
    let d = Daemon::start();
    // The default probe checks the machine and shuts down: each sandbox runs, then exits.
    d.expect("PUT", "/templates/probe", Some(&template("default")), 204);
    let answers: Vec<ApiResponse> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..N)
            .map(|_| scope.spawn(|| d.call("POST", "/sandboxes", Some(r#"{"template": "probe"}"#))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ids: Vec<String> = answers
        .iter()
        .map(|a| {
            assert_eq!(a.status, 201, "{a:?}");
            a.json()["id"].as_str().unwrap().to_string()
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), N, "ids must be distinct");
    for id in &ids {
        wait_until("every sandbox to end", || {
            d.sandbox(id)["state"] == "exited"
        });
        assert_eq!(d.sandbox(id)["ended"], "the guest shut down");
    }
    for id in &ids {
        d.expect("DELETE", &format!("/sandboxes/{id}"), None, 204);
    }
    assert_leftovers_gone(&d.state);
}

/// No sandbox directory and no jail is left in the state directory.
fn assert_leftovers_gone(state: &Path) {
    let left: Vec<_> = std::fs::read_dir(state.join("sandboxes"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "sandbox directories left: {left:?}");
    let jails = state.join("jail/agentvm");
    if let Ok(entries) = std::fs::read_dir(&jails) {
        let left: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        assert!(left.is_empty(), "jails left: {left:?}");
    }
}

/// The isolate sandboxes' module: arithmetic, the sandbox's key/value store (`put` then `get`
/// in two calls: each call starts from a fresh isolate, so only the store carries the value),
/// a log line, a trap, an endless loop and `memory.grow`.
const ISOLATE_MODULE: &str = r#"(module
    (import "agentvm" "log" (func $log (param i32 i32)))
    (import "agentvm" "kv_get" (func $kv_get (param i32 i32 i32 i32) (result i32)))
    (import "agentvm" "kv_put" (func $kv_put (param i32 i32 i32 i32) (result i32)))
    (memory (export "memory") 1)
    (data (i32.const 0) "count")
    (data (i32.const 16) "stored")
    (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add)
    (func (export "put") (param $v i32) (result i32)
        (i32.store (i32.const 32) (local.get $v))
        (call $kv_put (i32.const 0) (i32.const 5) (i32.const 32) (i32.const 4)))
    (func (export "get") (result i32)
        (call $log (i32.const 16) (i32.const 6))
        (drop (call $kv_get (i32.const 0) (i32.const 5) (i32.const 64) (i32.const 4)))
        (i32.load (i32.const 64)))
    (func (export "boom") unreachable)
    (func (export "spin") (loop br 0))
    (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0))))"#;

/// SIGKILLs the process of a sandbox whose record names `pid`: when jailed, the jailer's child
/// (the VMM or worker itself), so that its jailer still cleans up as after a crash.
fn kill_sandbox_process(pid: u32) {
    let victim = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()
        .and_then(|c| {
            c.split_whitespace()
                .next()
                .and_then(|p| p.parse::<i32>().ok())
        })
        .filter(|_| is_root())
        .unwrap_or(pid as i32);
    // SAFETY: kill(2) with integers only, on a process this test started.
    unsafe { libc::kill(victim, libc::SIGKILL) };
}

fn isolate_create(id: &str, module: &[u8], extra: serde_json::Value) -> String {
    use base64::Engine;
    let mut body = serde_json::json!({
        "id": id,
        "tier": "isolate",
        "module_base64": base64::engine::general_purpose::STANDARD.encode(module),
    });
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        body[k] = v;
    }
    body.to_string()
}

/// `POST /sandboxes/iso/call` with `body`, answered with `status`: its JSON.
fn isolate_call(d: &Daemon, body: &str, status: u16) -> serde_json::Value {
    d.expect("POST", "/sandboxes/iso/call", Some(body), status)
        .json()
}

/// Whether any process's command line names `needle` (a sandbox's worker or its jailer).
fn process_mentions(needle: &str) -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| String::from_utf8_lossy(&c).contains(needle))
}

#[test]
fn isolate_sandboxes_call_refuse_the_other_tier_and_survive_a_daemon_restart() {
    if !require_kvm() {
        return;
    }
    let mut d = Daemon::start();
    let module = wat::parse_str(ISOLATE_MODULE).unwrap();
    let limits = serde_json::json!({"limits": {"cpu_limit_ms": 5000, "max_memory_mib": 1}});
    let info = d
        .expect(
            "POST",
            "/sandboxes",
            Some(&isolate_create("iso", &module, limits.clone())),
            201,
        )
        .json();
    assert_eq!(info["tier"], "isolate", "{info}");
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["jailed"], is_root(), "{info}");
    assert_eq!(info["isolate"]["max_memory_mib"], 1, "{info}");
    assert_eq!(info["isolate"]["cpu_limit_ms"], 5000, "{info}");
    assert_eq!(info["isolate"]["module_bytes"], module.len(), "{info}");
    assert!(info.get("vsock_uds").is_none(), "{info}");
    let iso_pid = info["pid"].as_u64().expect("a pid") as u32;

    let added = isolate_call(&d, r#"{"function": "add", "args": [2, "40"]}"#, 200);
    assert_eq!(
        added["results"],
        serde_json::json!([{"type": "i32", "value": 42}]),
        "{added}"
    );
    // The store is empty, then holds what the previous call put.
    assert_eq!(
        isolate_call(&d, r#"{"function": "get"}"#, 200)["results"][0]["value"],
        0
    );
    isolate_call(&d, r#"{"function": "put", "args": [1234]}"#, 200);
    let got = isolate_call(&d, r#"{"function": "get"}"#, 200);
    assert_eq!(got["results"][0]["value"], 1234, "{got}");
    assert_eq!(got["logs"], serde_json::json!(["stored"]), "{got}");
    // Beyond max_memory_mib (1 MiB: 16 pages), memory.grow fails inside the module.
    let grown = isolate_call(&d, r#"{"function": "grow", "args": [100]}"#, 200);
    assert_eq!(grown["results"][0]["value"], -1, "{grown}");
    let trapped = isolate_call(&d, r#"{"function": "boom"}"#, 422);
    assert_eq!(trapped["kind"], "trap", "{trapped}");
    assert!(
        trapped["fault_message"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{trapped}"
    );
    let spun = isolate_call(&d, r#"{"function": "spin", "cpu_limit_ms": 100}"#, 422);
    assert_eq!(spun["kind"], "cpu_limit_exceeded", "{spun}");
    let missing = isolate_call(&d, r#"{"function": "nope"}"#, 400);
    assert_eq!(missing["kind"], "missing_export", "{missing}");
    let bad = isolate_call(&d, r#"{"function": "add", "args": ["two", 1]}"#, 400);
    assert_eq!(bad["kind"], "bad_arguments", "{bad}");
    d.refused(
        "POST",
        "/sandboxes/iso/call",
        Some(r#"{"function": "spin", "cpu_limit_ms": 5001}"#),
        400,
        "cpu_limit_ms must be 1..=5000",
    );
    d.refused(
        "POST",
        "/sandboxes/iso/call",
        Some(r#"{"function": "add", "args": [true]}"#),
        400,
        "args[0] is true",
    );
    // After all that, the isolate still starts from its template.
    assert_eq!(
        isolate_call(&d, r#"{"function": "add", "args": [1, 2]}"#, 200)["results"][0]["value"],
        3
    );

    // The worker's own API describes the module.
    let worker = request(
        Path::new(info["api_sock"].as_str().unwrap()),
        "GET",
        "/",
        None,
    )
    .json();
    assert_eq!(
        worker["exports"][0],
        serde_json::json!({"name": "add", "params": ["i32", "i32"], "results": ["i32"]}),
        "{worker}"
    );
    assert_eq!(worker["exports"].as_array().unwrap().len(), 6, "{worker}");
    assert_eq!(worker["limits"]["max_memory_mib"], 1, "{worker}");
    // The ten calls above that reached the job thread (two were refused before it).
    assert_eq!(worker["calls_served"], 10, "{worker}");

    // Each tier's routes refuse the other's sandboxes.
    for (method, path, route) in [
        ("POST", "/sandboxes/iso/exec", "POST /sandboxes/{id}/exec"),
        (
            "GET",
            "/sandboxes/iso/files?path=/",
            "GET /sandboxes/{id}/files",
        ),
        ("POST", "/sandboxes/iso/pause", "POST /sandboxes/{id}/pause"),
        (
            "POST",
            "/sandboxes/iso/hibernate",
            "POST /sandboxes/{id}/hibernate",
        ),
        (
            "GET",
            "/sandboxes/iso/metrics",
            "GET /sandboxes/{id}/metrics",
        ),
    ] {
        d.refused(
            method,
            path,
            Some("{}"),
            400,
            &format!("sandbox iso is an isolate sandbox; {route} needs tier microvm"),
        );
    }
    d.expect("PUT", "/templates/probe", Some(&template("count")), 204);
    d.expect(
        "POST",
        "/sandboxes",
        Some(r#"{"template": "probe", "id": "vm"}"#),
        201,
    );
    assert_eq!(d.sandbox("vm")["tier"], "microvm");
    d.refused(
        "POST",
        "/sandboxes/vm/call",
        Some(r#"{"function": "add"}"#),
        400,
        "sandbox vm is a microvm sandbox; POST /sandboxes/{id}/call needs tier isolate",
    );
    d.refused(
        "POST",
        "/sandboxes",
        Some(&isolate_create(
            "x",
            &module,
            serde_json::json!({"vcpu_count": 2}),
        )),
        400,
        "vcpu_count is a field of tier microvm",
    );
    d.refused(
        "POST",
        "/sandboxes",
        Some(r#"{"template": "probe", "module_base64": "AGFzbQEAAAA="}"#),
        400,
        "module_base64 is a field of tier isolate",
    );
    d.refused(
        "POST",
        "/sandboxes",
        Some(r#"{"tier": "isolate"}"#),
        400,
        "needs module_base64",
    );
    d.refused(
        "POST",
        "/sandboxes",
        Some(&isolate_create(
            "x",
            &module,
            serde_json::json!({"limits": {"max_memory_mib": 0}}),
        )),
        400,
        "limits.max_memory_mib must be 1..=4096",
    );

    // A module the isolate refuses: 400 saying why, and nothing left of the sandbox.
    let invalid = b"\0asm\x01\0\0\0\x01\xff";
    d.refused(
        "POST",
        "/sandboxes",
        Some(&isolate_create("iso-bad", invalid, serde_json::json!({}))),
        400,
        "the module is refused",
    );
    d.refused("GET", "/sandboxes/iso-bad", None, 404, "no sandbox");
    assert!(!d.state.join("sandboxes/iso-bad").exists());
    assert!(!d.state.join("jail/agentvm/iso-bad").exists());
    assert!(!process_mentions("iso-bad"));
    let unimportable = wat::parse_str(r#"(module (import "env" "f" (func)))"#).unwrap();
    d.refused(
        "POST",
        "/sandboxes",
        Some(&isolate_create(
            "iso-bad",
            &unimportable,
            serde_json::json!({}),
        )),
        400,
        "cannot instantiate the module",
    );

    // The daemon dies, and one worker with it; the other is adopted with its store.
    let doomed = d
        .expect(
            "POST",
            "/sandboxes",
            Some(&isolate_create(
                "iso-doomed",
                &module,
                serde_json::json!({}),
            )),
            201,
        )
        .json();
    let doomed_pid = doomed["pid"].as_u64().unwrap() as u32;
    d.process.take().unwrap().signal(libc::SIGKILL).unwrap();
    kill_sandbox_process(doomed_pid);
    wait_until("the doomed worker to die", || !alive(doomed_pid));
    d.process = Some(d.spawn());
    let iso = d.sandbox("iso");
    assert_eq!(iso["state"], "running", "{iso}");
    assert_eq!(iso["pid"].as_u64(), Some(u64::from(iso_pid)));
    assert_eq!(d.sandbox("iso-doomed")["state"], "lost");
    assert_eq!(
        isolate_call(&d, r#"{"function": "get"}"#, 200)["results"][0]["value"],
        1234
    );

    // Stopping ends the worker and removes its module, keeping the record; deleting removes
    // the rest.
    let module_file = d.state.join("sandboxes/iso/module.wasm");
    assert!(module_file.is_file());
    let stopped = d.expect("POST", "/sandboxes/iso/stop", None, 200).json();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(!alive(iso_pid));
    assert!(!module_file.exists());
    d.refused(
        "POST",
        "/sandboxes/iso/call",
        Some(r#"{"function": "add"}"#),
        409,
        "sandbox iso is stopped",
    );
    d.expect("DELETE", "/sandboxes/iso", None, 204);
    assert!(!process_mentions(
        &d.state.join("sandboxes/iso/").display().to_string()
    ));
    assert!(!process_mentions("--id\0iso\0"));
    // (The same look finds a sandbox that runs: the probe's jailer, when jailed.)
    assert_eq!(process_mentions("--id\0vm\0"), is_root());
    for id in ["iso-doomed", "vm"] {
        d.expect("DELETE", &format!("/sandboxes/{id}"), None, 204);
    }
    assert_leftovers_gone(&d.state);
}

/// An isolate sandbox's `agentvm.fetch` goes through the egress policy given at create: an
/// allowed request reaches the upstream with the rule's credential (from the daemon's
/// environment) in place of the module's, a denied one gets -1 and a logged reason, each fetch is
/// in the sandbox's audit log without the secret; without a policy every fetch is denied. When
/// the daemon runs as root the worker is jailed, so this also shows the jail lets it resolve
/// names (/etc/hosts) and write its audit log.
#[test]
fn an_isolate_sandbox_fetches_what_its_egress_policy_allows() {
    if !require_kvm() {
        return;
    }
    const SECRET: &str = "daemon-isolate-secret-77c1";
    let d = Daemon::start_with_env(&[("DAEMON_ISOLATE_TOKEN", SECRET)]);
    let (port, seen) = integration_tests::upstream::hello_upstream();
    let allowed =
        format!("GET http://localhost:{port}/v1/items HTTP/1.1\r\nAuthorization: mine\r\n\r\n");
    let denied = "GET http://169.254.169.254/latest/ HTTP/1.1\r\n\r\n";
    let wat = format!(
        r#"(module
          (import "agentvm" "fetch" (func $fetch (param i32 i32 i32 i32) (result i32)))
          (import "agentvm" "log" (func $log (param i32 i32)))
          (memory (export "memory") 1)
          (data (i32.const 0) "{}")
          (data (i32.const 1024) "{}")
          (func $get (param $at i32) (param $len i32) (result i32) (local $n i32)
            (local.set $n (call $fetch (local.get $at) (local.get $len) (i32.const 8192) (i32.const 4096)))
            (if (i32.gt_s (local.get $n) (i32.const 0))
              (then (call $log (i32.const 8192) (local.get $n))))
            (local.get $n))
          (func (export "allowed") (result i32) (call $get (i32.const 0) (i32.const {})))
          (func (export "denied") (result i32) (call $get (i32.const 1024) (i32.const {}))))"#,
        allowed.replace("\r\n", "\\0d\\0a"),
        denied.replace("\r\n", "\\0d\\0a"),
        allowed.len(),
        denied.len()
    );
    let module = wat::parse_str(&wat).unwrap();
    let policy = serde_json::json!({"version": 1, "rules": [
        {"id": "loopback", "cidr": "127.0.0.1/32", "ports": [1]},
        {"id": "local-api", "domain": "localhost", "ports": [port],
         "inject_headers": [{"name": "Authorization", "prefix": "Bearer ",
                             "from_env": "DAEMON_ISOLATE_TOKEN"}]}]});

    // Mistakes in the policy are the create's 400s, and leave nothing behind.
    let file_secret = serde_json::json!({"egress_policy": {"rules": [{"domain": "localhost",
        "inject_headers": [{"name": "Authorization", "from_file": "/etc/shadow"}]}]}});
    d.refused(
        "POST",
        "/sandboxes",
        Some(&isolate_create("iso", &module, file_secret)),
        400,
        "from_file",
    );
    let bad_rule = serde_json::json!({"egress_policy": {"rules": [{"cidr": "10.0.0.0/33"}]}});
    d.refused(
        "POST",
        "/sandboxes",
        Some(&isolate_create("iso", &module, bad_rule)),
        400,
        "egress_policy: ",
    );
    d.refused(
        "POST",
        "/sandboxes",
        Some(&serde_json::json!({"id": "vm", "egress_policy": policy}).to_string()),
        400,
        "egress_policy is a field of tier isolate",
    );
    d.expect("GET", "/sandboxes/iso", None, 404);

    let info = d
        .expect(
            "POST",
            "/sandboxes",
            Some(&isolate_create(
                "iso",
                &module,
                serde_json::json!({"egress_policy": policy}),
            )),
            201,
        )
        .json();
    let audit = PathBuf::from(
        info["isolate"]["egress_audit"]
            .as_str()
            .unwrap_or_else(|| panic!("no egress_audit in {info}")),
    );
    let got = isolate_call(&d, r#"{"function": "allowed"}"#, 200);
    let response = integration_tests::upstream::HELLO_AS_FETCHED;
    assert_eq!(got["results"][0]["value"], response.len(), "{got}");
    assert_eq!(got["logs"], serde_json::json!([response]), "{got}");
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(
        requests[0].starts_with("GET /v1/items HTTP/1.1\r\n")
            && requests[0].contains(&format!("Authorization: Bearer {SECRET}\r\n"))
            && !requests[0].contains("mine"),
        "the rule's credential replaces the module's: {}",
        requests[0]
    );
    let refused = isolate_call(&d, r#"{"function": "denied"}"#, 200);
    assert_eq!(refused["results"][0]["value"], -1, "{refused}");
    assert!(
        refused["logs"].to_string().contains("169.254.169.254"),
        "the reason is logged: {refused}"
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "the denied fetch reached nothing"
    );
    let audit_text = std::fs::read_to_string(&audit).unwrap();
    assert!(audit_text.contains("local-api"), "{audit_text}");
    assert!(audit_text.contains("169.254.169.254"), "{audit_text}");
    assert!(!audit_text.contains(SECRET), "the secret is not audited");
    d.expect("DELETE", "/sandboxes/iso", None, 204);

    // Without a policy, nothing is fetched.
    d.expect(
        "POST",
        "/sandboxes",
        Some(&isolate_create("iso", &module, serde_json::json!({}))),
        201,
    );
    let refused = isolate_call(&d, r#"{"function": "allowed"}"#, 200);
    assert_eq!(refused["results"][0]["value"], -1, "{refused}");
    assert!(
        refused["logs"].to_string().contains("egress policy"),
        "{refused}"
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
    d.expect("DELETE", "/sandboxes/iso", None, 204);
}

/// The Python SDK against a real daemon: an isolate sandbox created from a module file, its
/// calls' results as Python numbers, a trap and a CPU limit as their exception classes, and the
/// sandbox gone when the `with` block ends.
#[test]
fn the_python_sdk_drives_isolate_sandboxes_of_a_real_daemon() {
    if !require_kvm() {
        return;
    }
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("module.wasm");
    std::fs::write(&module, wat::parse_str(ISOLATE_MODULE).unwrap()).unwrap();
    let script = r#"
import sys
from agentvm import Sandbox, TrapError, LimitExceededError
sock, module = sys.argv[1], sys.argv[2]
with Sandbox.create(tier="isolate", module=module, socket=sock, cpu_limit_ms=2000, id="py") as sbx:
    assert sbx.info().tier == "isolate", sbx.info()
    assert sbx.call("add", 2, 40) == [42]
    sbx.call("put", 7)
    result = sbx.invoke("get")
    assert result.results == [7] and result.logs == ["stored"], result
    try:
        sbx.call("boom")
        sys.exit("no TrapError")
    except TrapError as e:
        assert "unreachable" in e.fault_message, e.fault_message
    try:
        sbx.call("spin", cpu_limit_ms=100)
        sys.exit("no LimitExceededError")
    except LimitExceededError as e:
        assert e.kind == "cpu_limit_exceeded", e.kind
print("sdk ok")
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&d.sock)
        .arg(&module)
        .env(
            "PYTHONPATH",
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdk/python"),
        )
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python3 runs (scripts/test.sh installs it)");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("sdk ok"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    d.expect("GET", "/sandboxes/py", None, 404);
}
