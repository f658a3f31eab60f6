//! `agentvm serve`: the per-VM API over a real Unix socket, with the ring-3 probe guest.
//!
//! Error classes before InstanceStart need no KVM; the tests that boot need /dev/kvm (skipped
//! without it, failing instead under CI=true) and the agentvm binary of the same profile.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::agentvm::{require_kvm, VmOutput, VmProcess};
use integration_tests::api::{
    connect, raw, read_response, request, stream_lines, upgrade, wait_for_path, wait_for_text,
    ApiResponse,
};
use integration_tests::probe::probe_elf;
use integration_tests::prometheus::{self, Exposition};

/// Hang detectors, not performance limits.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a paused guest is watched for progress; the running probe prints a line every few
/// milliseconds, so any progress would show.
const PAUSE_WINDOW: Duration = Duration::from_millis(300);

struct Serve {
    process: VmProcess,
    sock: PathBuf,
    dir: tempfile::TempDir,
}

impl Serve {
    fn start(extra: &[&str]) -> Self {
        Self::start_with_env(extra, &[])
    }

    /// [`Serve::start`] with these environment variables added to the VMM process's.
    fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("api.sock");
        let console = dir.path().join("console");
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "serve".as_ref(),
            "--api-sock".as_ref(),
            sock.as_os_str(),
            "--console".as_ref(),
            console.as_os_str(),
        ];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        let mut command = std::process::Command::new(integration_tests::agentvm::agentvm_bin());
        command.args(&args).envs(env.iter().copied());
        let process = VmProcess::spawn(command).expect("start agentvm serve");
        assert!(
            wait_for_path(&sock, START_TIMEOUT),
            "the API socket {} did not appear",
            sock.display()
        );
        Self { process, sock, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> ApiResponse {
        request(&self.sock, method, path, body)
    }

    /// Asserts a 204.
    fn ok(&self, method: &str, path: &str, body: &str) {
        let answer = self.call(method, path, Some(body));
        assert_eq!(answer.status, 204, "{method} {path} {body}: {answer:?}");
    }

    /// Asserts a 4xx `status` whose fault_message contains `needle`.
    fn refused(&self, method: &str, path: &str, body: Option<&str>, status: u16, needle: &str) {
        let answer = self.call(method, path, body);
        assert_eq!(
            answer.status, status,
            "{method} {path} {body:?}: {answer:?}"
        );
        let fault = answer.fault();
        assert!(
            fault.contains(needle),
            "{method} {path} {body:?}: {fault:?} lacks {needle:?}"
        );
    }

    /// An upgrade request (`Connection: Upgrade`, `Upgrade: protocol`) that must be refused.
    fn refused_upgrade(
        &self,
        path: &str,
        protocol: &str,
        body: Option<&str>,
        status: u16,
        needle: &str,
    ) {
        let answer = upgrade(&self.sock, "POST", path, protocol, body).expect_refused(path);
        assert_eq!(answer.status, status, "POST {path} {body:?}: {answer:?}");
        let fault = answer.fault();
        assert!(
            fault.contains(needle),
            "POST {path} {body:?}: {fault:?} lacks {needle:?}"
        );
    }

    fn state(&self) -> String {
        let answer = self.call("GET", "/", None);
        assert_eq!(answer.status, 200, "{answer:?}");
        answer.json()["state"].as_str().expect("state").to_string()
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.path("console")).unwrap_or_default()
    }

    fn wait_console(&self, needle: &str) -> String {
        wait_for_text(&self.path("console"), needle, GUEST_TIMEOUT)
            .unwrap_or_else(|| panic!("{needle:?} not on the console:\n{}", self.console()))
    }

    fn boot_source(&self, boot_args: &str) {
        let body = serde_json::json!({
            "kernel_image_path": probe_elf(),
            "boot_args": boot_args,
        })
        .to_string();
        self.ok("PUT", "/boot-source", &body);
    }

    /// Waits for the process to end; the directory (socket path, console) stays until the
    /// returned [`Ended`] is dropped.
    fn finish(self) -> Ended {
        let out = self
            .process
            .wait(EXIT_TIMEOUT)
            .expect("agentvm serve exits");
        Ended {
            out,
            sock: self.sock,
            _dir: self.dir,
        }
    }
}

struct Ended {
    out: VmOutput,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

/// `GET /metrics`, checked as Prometheus text.
fn scrape(s: &Serve) -> Exposition {
    let answer = s.call("GET", "/metrics", None);
    assert_eq!(answer.status, 200, "{answer:?}");
    prometheus::parse(&answer.body).unwrap_or_else(|e| {
        panic!(
            "GET /metrics is not good Prometheus text: {e}\n{}",
            answer.body
        )
    })
}

/// The last `PROBE count <n>` on the console.
fn last_count(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("PROBE count "))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
        .unwrap_or(0)
}

#[test]
fn every_error_class_before_start_is_a_4xx_with_a_fault_message() {
    let serve = Serve::start(&[]);
    let s = &serve;
    assert_eq!(s.state(), "Not started");
    // Malformed JSON, empty body, unknown field, wrong type, missing field.
    s.refused(
        "PUT",
        "/machine-config",
        Some("{\"vcpu_count\": 1,"),
        400,
        "PUT /machine-config",
    );
    s.refused("PUT", "/actions", None, 400, "needs a JSON body");
    let unknown = r#"{"vcpu_count": 1, "mem_size_mib": 64, "cpus": 2}"#;
    s.refused(
        "PUT",
        "/machine-config",
        Some(unknown),
        400,
        "unknown field `cpus`",
    );
    let wrong_type = r#"{"vcpu_count": "one", "mem_size_mib": 64}"#;
    s.refused(
        "PUT",
        "/machine-config",
        Some(wrong_type),
        400,
        "invalid type",
    );
    s.refused(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1}"#),
        400,
        "missing field `mem_size_mib`",
    );
    // Values out of range.
    for body in [
        r#"{"vcpu_count": 0, "mem_size_mib": 64}"#,
        r#"{"vcpu_count": 17, "mem_size_mib": 64}"#,
    ] {
        s.refused(
            "PUT",
            "/machine-config",
            Some(body),
            400,
            "vcpu_count must be between 1 and 16",
        );
    }
    s.refused(
        "PATCH",
        "/machine-config",
        Some(r#"{"mem_size_mib": 8}"#),
        400,
        "mem_size_mib must be at least 16",
    );
    s.refused(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "smt": true}"#),
        400,
        "smt",
    );
    let vsock = s.path("v.sock");
    let cid2 = serde_json::json!({"guest_cid": 2, "uds_path": vsock}).to_string();
    s.refused("PUT", "/vsock", Some(&cid2), 400, "CID 2 is reserved");
    s.refused(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#),
        400,
        "/nonexistent/vmlinux: no such file",
    );
    // Wrong state.
    s.refused(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        400,
        "PUT /boot-source",
    );
    s.refused(
        "PATCH",
        "/vm",
        Some(r#"{"state": "Paused"}"#),
        400,
        "not running yet",
    );
    s.refused(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
        400,
        "PUT /metrics",
    );
    s.refused(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "Reboot"}"#),
        400,
        "unknown variant `Reboot`",
    );
    // Features that are not there yet: the body is checked first.
    s.refused(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        400,
        "i8042",
    );
    s.refused(
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#),
        400,
        "no host-interface NICs: the guest's only network is a NIC behind the VMM's egress \
         filter, which the microVM gets when PUT /egress/policy is given before InstanceStart",
    );
    s.refused(
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth1", "host_dev_name": "tap0"}"#),
        400,
        "does not match",
    );
    s.refused(
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}"#),
        400,
        "snapshot",
    );
    s.refused(
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_path": "/tmp/s"}"#),
        400,
        "missing field `mem_file_path`",
    );
    s.refused("PUT", "/snapshot/load", Some(r#"{"snapshot_path": "/tmp/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/x"}}"#), 400, "snapshot");
    s.refused(
        "PUT",
        "/logger",
        Some(r#"{"level": "Loud"}"#),
        400,
        "\"loud\"",
    );
    // Unknown path, wrong method.
    s.refused("GET", "/drives/rootfs", None, 404, "/drives/rootfs");
    s.refused("DELETE", "/machine-config", None, 405, "GET, PUT, PATCH");

    // A body over the limit is refused from its Content-Length, without waiting for it.
    let huge = raw(
        &s.sock,
        b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n{",
    );
    assert_eq!(huge.status, 413, "{huge:?}");
    assert!(huge.fault().contains("body limit"), "{huge:?}");
    // ... and so is one without a Content-Length that crosses it.
    let mut chunked =
        b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..60 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.extend_from_slice(&[b' '; 0x400]);
        chunked.extend_from_slice(b"\r\n");
    }
    let over = raw(&s.sock, &chunked);
    assert_eq!(over.status, 413, "{over:?}");

    // A client that sends half a request and stalls blocks no one else.
    let mut stalled = connect(&s.sock);
    stalled
        .write_all(b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"vcpu")
        .unwrap();
    let mut half_head = connect(&s.sock);
    half_head.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
    assert_eq!(s.state(), "Not started");
    // The stalled body gets its timeout answer instead of hanging forever.
    let late = read_response(&mut stalled);
    assert_eq!(late.status, 408, "{late:?}");
    drop(half_head);

    // A start that fails on the VMM thread (here: the vsock path was taken after PUT /vsock) is
    // a 400 with the reason, and leaves the VM configurable.
    let kernel = s.path("kernel");
    std::fs::write(&kernel, b"not started").unwrap();
    let taken = s.path("taken.sock");
    s.ok(
        "PUT",
        "/vsock",
        &serde_json::json!({"guest_cid": 3, "uds_path": taken}).to_string(),
    );
    s.ok(
        "PUT",
        "/boot-source",
        &serde_json::json!({"kernel_image_path": kernel}).to_string(),
    );
    std::fs::write(&taken, b"").unwrap();
    s.refused(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        400,
        "already exists",
    );
    assert_eq!(s.state(), "Not started");

    let metrics = s.call("GET", "/metrics", None);
    assert_eq!(metrics.status, 200, "{metrics:?}");
    assert!(
        metrics
            .body
            .contains("agentvm_vm_state{id=\"anonymous-instance\",state=\"Not started\"} 1\n"),
        "{metrics:?}"
    );

    // Nothing was half-applied.
    let config = s.call("GET", "/machine-config", None).json();
    assert_eq!(config["vcpu_count"], 1);
    assert_eq!(config["mem_size_mib"], 128);

    s.process.signal(libc::SIGTERM).unwrap();
    let Ended { out, sock, _dir } = serve.finish();
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{out:?}");
    assert!(!sock.exists(), "the API socket was not removed");
}

/// A policy whose credential header comes from the VMM's environment.
const TOKEN_ENV: &str = "AGENTVM_API_TEST_EGRESS_TOKEN";
const TOKEN_VALUE: &str = "tok-api-egress-s3cr3t";

#[test]
fn egress_policy_mistakes_are_named_400s_and_never_a_sigsys() {
    let serve = Serve::start(&[]);
    let s = &serve;
    let put = "/egress/policy";
    s.refused(
        "PUT",
        put,
        None,
        400,
        "PUT /egress/policy: the request needs a JSON body",
    );
    s.refused(
        "PUT",
        put,
        Some("{"),
        400,
        "egress policy is not valid JSON",
    );
    let cases = [
        (
            r#"{"rules": [{"id": "x", "cidr": "10.0.0.1/8"}]}"#,
            "PUT /egress/policy: egress policy: rule 1 (`x`): `cidr` `10.0.0.1/8` has host bits set",
        ),
        (r#"{"rules": [{"domian": "a.com"}]}"#, "unknown field `domian`"),
        (
            r#"{"rules": [{"domain": "a.com"}, {"id": "r", "domain": "*.com"}]}"#,
            "rule 2 (`r`): `*.com` would match every name under a top-level domain",
        ),
        (
            r#"{"rules": [{"domain": "a.com", "rate_limit": {"connections": 0}}]}"#,
            "`rate_limit.connections` must be at least 1",
        ),
        (
            r#"{"rules": [{"domain": "a.com", "inject_headers": [{"name": "Authorization", "from_env": "AGENTVM_TEST_NEVER_SET"}]}]}"#,
            "environment variable AGENTVM_TEST_NEVER_SET is not set",
        ),
        (r#"{"version": 2}"#, "policy format version 2 is not supported"),
    ];
    for (body, needle) in cases {
        s.refused("PUT", put, Some(body), 400, needle);
    }
    // Reading the secret file would open a file on the API thread, which its seccomp filter
    // kills by SIGSYS: refused by name instead, and the server goes on answering.
    let secret = s.path("secret");
    std::fs::write(&secret, "file-secret-value\n").unwrap();
    let from_file = serde_json::json!({"rules": [{"id": "api", "domain": "api.example.com",
        "inject_headers": [{"name": "Authorization", "from_file": secret}]}]})
    .to_string();
    s.refused(
        "PUT",
        put,
        Some(&from_file),
        400,
        "rule 1 (`api`): header `Authorization`: from_file secrets can only be used in a policy \
         file given on the command line; use from_env through the API",
    );
    assert_eq!(s.state(), "Not started");
    s.refused("GET", put, None, 404, "no egress policy was given");

    s.refused(
        "PUT",
        "/egress/audit-log",
        Some(r#"{"path": "/nonexistent/dir/egress.jsonl"}"#),
        400,
        "PUT /egress/audit-log: audit log /nonexistent/dir/egress.jsonl",
    );
    s.refused(
        "PUT",
        "/egress/audit-log",
        Some(r#"{"file": "/tmp/x"}"#),
        400,
        "unknown field `file`",
    );
    let audit = s.path("egress.jsonl");
    s.ok(
        "PUT",
        "/egress/audit-log",
        &serde_json::json!({"path": audit}).to_string(),
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&audit)
            .expect("the VMM thread creates the audit log")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the egress audit log is private");
    s.boot_source("probe.mode=count");
    s.refused(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        400,
        "PUT /egress/audit-log was given but no PUT /egress/policy",
    );

    // A good policy (listing the host's addresses on this thread would be a netlink socket,
    // which its filter forbids too) is kept for the boot, or for a snapshot load.
    s.ok(
        "PUT",
        put,
        r#"{"rules": [{"id": "web", "cidr": "0.0.0.0/0", "ports": [443]}]}"#,
    );
    let shown = s.call("GET", put, None);
    assert_eq!(shown.status, 200, "{shown:?}");
    assert_eq!(shown.json()["rules"][0]["cidr"], "0.0.0.0/0");
    s.refused(
        "PUT",
        "/snapshot/load",
        Some(r#"{"snapshot_path": "/x", "mem_backend": {"backend_type": "File", "backend_path": "/y"}}"#),
        400,
        "snapshot_path /x: no such file",
    );
    assert_eq!(s.state(), "Not started");

    s.process.signal(libc::SIGTERM).unwrap();
    let Ended { out, .. } = serve.finish();
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{out:?}");
}

#[test]
fn egress_policy_through_the_api_gives_a_nic_and_changes_at_run_time() {
    if !require_kvm() {
        return;
    }
    let serve = Serve::start_with_env(&["--id", "sbx-net"], &[(TOKEN_ENV, TOKEN_VALUE)]);
    let s = &serve;
    let policy = serde_json::json!({"version": 1, "rules": [
        {"id": "api", "domain": "api.example.com", "ports": [443, "8000-8010"],
         "inject_headers": [{"name": "Authorization", "prefix": "Bearer ", "from_env": TOKEN_ENV}],
         "rate_limit": {"connections": 5, "per_seconds": 10}, "byte_cap": 1048576},
        {"id": "db", "cidr": "10.1.2.0/24", "ports": [5432]}]})
    .to_string();
    s.ok("PUT", "/egress/policy", &policy);
    let audit = s.path("egress.jsonl");
    s.ok(
        "PUT",
        "/egress/audit-log",
        &serde_json::json!({"path": audit}).to_string(),
    );
    let before = s.call("GET", "/egress/policy", None);
    assert_eq!(before.status, 200, "{before:?}");
    assert!(
        !before.body.contains(TOKEN_VALUE) && !before.body.contains("Bearer"),
        "{before:?}"
    );
    assert_eq!(
        before.json(),
        serde_json::json!({"version": 1, "rules": [
            {"id": "api", "domain": "api.example.com", "ports": [443, "8000-8010"],
             "protocol": "tcp", "inject_header_names": ["Authorization"],
             "rate_limit": {"connections": 5, "per_seconds": 10}, "byte_cap": 1048576},
            {"id": "db", "cidr": "10.1.2.0/24", "ports": [5432], "protocol": "tcp",
             "inject_header_names": []}]})
    );

    s.boot_source("probe.mode=count");
    s.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    assert_eq!(s.state(), "Running");
    s.wait_console("PROBE count 3\n");
    // The VM has a NIC: its counters and the egress filter's are scraped (the probe drives no
    // NIC, so they are zero).
    let metrics = scrape(s);
    for (name, labels) in [
        ("agentvm_net_frames_total", [("direction", "tx")]),
        ("agentvm_net_bytes_total", [("direction", "rx")]),
        ("agentvm_egress_connections_total", [("decision", "denied")]),
    ] {
        assert_eq!(
            metrics.value(name, &labels),
            Some(0.0),
            "{name}: {metrics:?}"
        );
    }
    assert_eq!(
        metrics.value("agentvm_egress_dns_queries_total", &[]),
        Some(0.0)
    );
    assert!(audit.exists());

    // At run time: a new policy is taken (also while paused) and shown; mistakes change nothing.
    s.ok(
        "PUT",
        "/egress/policy",
        r#"{"rules": [{"id": "pypi", "domain": "*.pypi.org", "ports": [443]}]}"#,
    );
    let after = s.call("GET", "/egress/policy", None).json();
    assert_eq!(after["rules"].as_array().map(Vec::len), Some(1), "{after}");
    assert_eq!(after["rules"][0]["id"], "pypi");
    assert_eq!(after["rules"][0]["domain"], "*.pypi.org");
    s.refused(
        "PUT",
        "/egress/policy",
        Some(r#"{"rules": [{"id": "x"}]}"#),
        400,
        "rule 1 (`x`): a rule needs a `domain` or a `cidr`",
    );
    let secret = s.path("secret");
    std::fs::write(&secret, "file-secret\n").unwrap();
    let from_file = serde_json::json!({"rules": [{"id": "f", "domain": "a.example.com",
        "inject_headers": [{"name": "X-Key", "from_file": secret}]}]})
    .to_string();
    s.refused(
        "PUT",
        "/egress/policy",
        Some(&from_file),
        400,
        "from_file secrets can only be used in a policy file",
    );
    assert_eq!(s.call("GET", "/egress/policy", None).json(), after);
    s.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    s.ok("PUT", "/egress/policy", &policy);
    assert_eq!(s.call("GET", "/egress/policy", None).json(), before.json());
    s.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    s.refused(
        "PUT",
        "/egress/audit-log",
        Some(r#"{"path": "/tmp/x"}"#),
        400,
        "not supported after starting the microVM",
    );
    assert_eq!(s.state(), "Running");

    s.process.signal(libc::SIGTERM).unwrap();
    let Ended { out, sock, _dir } = serve.finish();
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{out:?}");
    assert!(!sock.exists(), "the API socket was not removed");
    let audited = std::fs::read_to_string(&audit).unwrap_or_default();
    assert!(!audited.contains(TOKEN_VALUE), "{audited}");
}

#[test]
fn sandbox_requests_need_a_running_vm_with_vsock_and_good_bodies() {
    let serve = Serve::start(&[]);
    let s = &serve;
    let exec = r#"{"cmd": ["sh", "-c", "echo hi"]}"#;
    s.refused("POST", "/sandbox/exec", Some(exec), 409, "no vsock device");
    s.refused(
        "GET",
        "/sandbox/files?path=/etc/hostname",
        None,
        409,
        "no vsock device",
    );
    s.refused(
        "GET",
        "/sandbox/files/list?path=/",
        None,
        409,
        "no vsock device",
    );
    s.refused(
        "GET",
        "/sandbox/watch?path=/tmp",
        None,
        409,
        "no vsock device",
    );
    let pty = r#"{"cmd": ["sh"], "cols": 80, "rows": 24}"#;
    s.refused_upgrade(
        "/sandbox/pty",
        "agentvm-pty",
        Some(pty),
        409,
        "no vsock device",
    );
    s.refused_upgrade(
        "/sandbox/ports/8080/connect",
        "agentvm-tcp",
        None,
        409,
        "no vsock device",
    );
    s.ok(
        "PUT",
        "/vsock",
        &serde_json::json!({"guest_cid": 3, "uds_path": s.path("v.sock")}).to_string(),
    );
    s.refused("POST", "/sandbox/exec", Some(exec), 409, "not running yet");
    s.refused(
        "PUT",
        "/sandbox/files?path=/tmp/x",
        Some("data"),
        409,
        "not running yet",
    );
    s.refused(
        "GET",
        "/sandbox/watch?path=/tmp&recursive=true",
        None,
        409,
        "not running yet",
    );
    s.refused_upgrade(
        "/sandbox/pty",
        "agentvm-pty",
        Some(pty),
        409,
        "not running yet",
    );
    s.refused_upgrade(
        "/sandbox/ports/8080/connect",
        "agentvm-tcp",
        None,
        409,
        "not running yet",
    );

    // Upgrades need their headers, and the right protocol.
    let headers = "`Connection: Upgrade` and `Upgrade: agentvm-pty`";
    s.refused("POST", "/sandbox/pty", Some(pty), 400, headers);
    s.refused_upgrade("/sandbox/pty", "agentvm-tcp", Some(pty), 400, headers);
    s.refused(
        "POST",
        "/sandbox/ports/8080/connect",
        None,
        400,
        "`Upgrade: agentvm-tcp`",
    );
    // Bad ports and terminal bodies.
    for port in ["0", "65536", "http"] {
        s.refused_upgrade(
            &format!("/sandbox/ports/{port}/connect"),
            "agentvm-tcp",
            None,
            400,
            "must be a number from 1 to 65535",
        );
    }
    for (body, needle) in [
        (r#"{"cmd": []}"#, "non-empty argv"),
        (r#"{"cols": 0, "rows": 24}"#, "at least 1"),
        (r#"{"cols": 70000}"#, "invalid value"),
        (r#"{"shell": "bash"}"#, "unknown field `shell`"),
        (r#"{"cwd": "tmp"}"#, "must be absolute"),
        ("{", "EOF while parsing"),
    ] {
        s.refused_upgrade("/sandbox/pty", "agentvm-pty", Some(body), 400, needle);
    }
    s.refused_upgrade(
        "/sandbox/pty",
        "agentvm-pty",
        None,
        400,
        "needs a JSON body",
    );
    s.refused(
        "GET",
        "/sandbox/watch?path=/tmp&recursive=yes",
        None,
        400,
        "must be true or false",
    );
    s.refused(
        "GET",
        "/sandbox/watch?path=tmp",
        None,
        400,
        "must be absolute",
    );
    let watch = stream_lines(&s.sock, "/sandbox/watch")
        .err()
        .expect("a refusal");
    assert_eq!(watch.status, 400, "{watch:?}");
    assert!(watch.fault().contains("?path="), "{watch:?}");
    // Terminal sessions by id.
    s.refused("GET", "/sandbox/pty/1", None, 404, "no terminal session 1");
    s.refused(
        "GET",
        "/sandbox/pty/one",
        None,
        400,
        "not a terminal session id",
    );
    s.refused(
        "POST",
        "/sandbox/pty/1/resize",
        Some(r#"{"cols": 100, "rows": 40}"#),
        404,
        "no terminal session 1",
    );
    s.refused(
        "POST",
        "/sandbox/pty/1/resize",
        Some(r#"{"cols": 100}"#),
        400,
        "missing field `rows`",
    );
    s.refused(
        "POST",
        "/sandbox/pty/1/resize",
        Some(r#"{"cols": 0, "rows": 1}"#),
        400,
        "at least 1",
    );
    s.refused("GET", "/sandbox/pty", None, 405, "POST");

    // Bad bodies and paths are refused before the VM state matters.
    s.refused(
        "POST",
        "/sandbox/exec",
        Some(r#"{"cmd": []}"#),
        400,
        "non-empty argv",
    );
    s.refused(
        "POST",
        "/sandbox/exec",
        Some(r#"{"cmd": ["ls"], "shell": true}"#),
        400,
        "unknown field `shell`",
    );
    s.refused(
        "POST",
        "/sandbox/exec",
        Some(r#"{"cmd": "ls"}"#),
        400,
        "invalid type",
    );
    s.refused(
        "POST",
        "/sandbox/exec",
        Some(r#"{"cmd": ["ls"], "timeout_ms": 0}"#),
        400,
        "timeout_ms",
    );
    s.refused(
        "POST",
        "/sandbox/exec",
        Some(r#"{"cmd": ["ls"], "cwd": "tmp"}"#),
        400,
        "must be absolute",
    );
    s.refused("POST", "/sandbox/exec", None, 400, "needs a JSON body");
    s.refused(
        "GET",
        "/sandbox/files?path=etc/passwd",
        None,
        400,
        "must be absolute",
    );
    s.refused("GET", "/sandbox/files", None, 400, "?path=");
    s.refused(
        "GET",
        "/sandbox/files/list?path=x",
        None,
        400,
        "must be absolute",
    );
    s.refused(
        "PUT",
        "/sandbox/files?path=rel",
        Some("x"),
        400,
        "must be absolute",
    );
    s.refused("DELETE", "/sandbox/files", None, 405, "GET, PUT");
    s.refused("GET", "/sandbox/exec", None, 405, "POST");

    // The upload limit is 64 MiB, checked from Content-Length before anything is read.
    let answer = raw(
        &s.sock,
        b"PUT /sandbox/files?path=/tmp/big HTTP/1.1\r\nHost: localhost\r\n\
          Connection: close\r\nContent-Length: 67108865\r\n\r\n",
    );
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(answer.fault().contains("upload limit"), "{answer:?}");
    // A body over the other routes' limit is still refused there.
    let big = format!(r#"{{"cmd": ["{}"]}}"#, "x".repeat(60 * 1024));
    s.refused("POST", "/sandbox/exec", Some(&big), 413, "body limit");
    assert_eq!(s.state(), "Not started");
}

#[test]
fn api_configures_boots_pauses_resumes_and_flushes_metrics() {
    if !require_kvm() {
        return;
    }
    let serve = Serve::start(&["--id", "sbx-1", "--log-format", "json"]);
    let s = &serve;
    let info = s.call("GET", "/", None).json();
    assert_eq!(info["id"], "sbx-1");
    assert_eq!(info["app_name"], "agentvm");
    assert_eq!(info["state"], "Not started");

    let log = s.path("vmm.log");
    let metrics = s.path("metrics.json");
    let audit = s.path("audit.log");
    // No "format": the log file takes the process's --log-format json.
    s.ok("PUT", "/logger", &serde_json::json!({"log_path": log, "level": "Info", "show_level": true, "show_log_origin": false}).to_string());
    s.ok(
        "PUT",
        "/audit-log",
        &serde_json::json!({"path": audit}).to_string(),
    );
    s.ok(
        "PUT",
        "/metrics",
        &serde_json::json!({"metrics_path": metrics}).to_string(),
    );
    s.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 64}"#,
    );
    s.ok("PATCH", "/machine-config", r#"{"mem_size_mib": 96}"#);
    let config = s.call("GET", "/machine-config", None).json();
    assert_eq!(
        config,
        serde_json::json!({"vcpu_count": 2, "mem_size_mib": 96, "smt": false, "track_dirty_pages": false})
    );
    let vsock = s.path("v.sock");
    s.ok(
        "PUT",
        "/vsock",
        &serde_json::json!({"guest_cid": 3, "uds_path": vsock, "vsock_id": "vsock0"}).to_string(),
    );
    s.boot_source("probe.mode=count");
    s.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    assert_eq!(s.state(), "Running");
    s.wait_console("PROBE count 3\n");

    // Pre-boot resources and a second start are refused in Firecracker's words.
    let after = "not supported after starting the microVM";
    s.refused(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        400,
        after,
    );
    s.refused(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/x"}"#),
        400,
        after,
    );
    s.refused(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
        400,
        after,
    );
    s.refused(
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid": 4, "uds_path": "/tmp/x"}"#),
        400,
        after,
    );
    s.refused("PUT", "/logger", Some(r#"{"level": "Debug"}"#), 400, after);
    s.refused(
        "PUT",
        "/audit-log",
        Some(r#"{"path": "/tmp/x"}"#),
        400,
        after,
    );
    let first = scrape(s);
    // Booted without PUT /egress/policy: no NIC, so no net counters and no policy to change.
    assert!(
        first.value("agentvm_net_frames_total", &[]).is_none(),
        "{first:?}"
    );
    s.refused(
        "PUT",
        "/egress/policy",
        Some(r#"{"rules": []}"#),
        400,
        "PUT /egress/policy: this microVM has no NIC: PUT /egress/policy before InstanceStart",
    );
    s.refused(
        "GET",
        "/egress/policy",
        None,
        404,
        "no egress policy was given",
    );

    // The probe has no guest agent: /sandbox requests wait for it, then answer 503; the failed
    // exec is audited as an error, with the asking process and without stdin or env values.
    let exec = r#"{"cmd": ["true"]}"#;
    s.refused(
        "POST",
        "/sandbox/exec",
        Some(
            r#"{"cmd": ["true", "a b"], "stdin": "stdin-secret", "env": {"TOKEN": "env-secret"}}"#,
        ),
        503,
        "the guest agent does not answer",
    );
    let audited = std::fs::read_to_string(&audit).unwrap();
    assert!(
        !audited.contains("secret"),
        "the audit log holds stdin or env values:\n{audited}"
    );
    let lines: Vec<serde_json::Value> = audited
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert_eq!(lines.len(), 1, "{audited}");
    let record = &lines[0];
    assert_eq!(record["sandbox_id"], "sbx-1", "{record}");
    assert_eq!(
        record["argv"],
        serde_json::json!(["true", "a b"]),
        "{record}"
    );
    assert_eq!(record["env_keys"], serde_json::json!(["TOKEN"]), "{record}");
    assert_eq!(record["stdin_bytes"], "stdin-secret".len(), "{record}");
    assert_eq!(record["outcome"], "error", "{record}");
    assert!(
        record["error"]
            .as_str()
            .is_some_and(|e| e.contains("does not answer")),
        "{record}"
    );
    assert!(record["duration_ms"].as_u64().is_some(), "{record}");
    assert!(
        record["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{record}"
    );
    assert_eq!(record["peer"]["pid"], std::process::id(), "{record}");
    // SAFETY: getuid has no arguments and cannot fail.
    assert_eq!(record["peer"]["uid"], unsafe { libc::getuid() }, "{record}");

    // Paused: the guest makes no progress.
    s.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(s.state(), "Paused");
    s.refused("POST", "/sandbox/exec", Some(exec), 409, "paused");
    s.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let frozen = s.console();
    std::thread::sleep(PAUSE_WINDOW);
    assert_eq!(
        s.console(),
        frozen,
        "the console grew while the VM was paused"
    );

    // Resumed: it goes on from where it stopped.
    s.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(s.state(), "Running");
    let next = last_count(&frozen) + 2;
    s.wait_console(&format!("PROBE count {next}\n"));

    // Read before the counters: the console only grows, and each byte in it was a port write.
    let printed = s.console().len();
    let second = scrape(s);
    let exits = |e: &Exposition| {
        e.value("agentvm_vcpu_exits_total", &[("reason", "io_out")])
            .expect("io_out exits")
    };
    assert!(
        exits(&second) > exits(&first),
        "vCPU exits did not grow: {} then {}",
        exits(&first),
        exits(&second)
    );
    let id = [("id", "sbx-1")];
    assert_eq!(
        second.value("agentvm_exec_total", &[("outcome", "error")]),
        Some(1.0)
    );
    assert_eq!(
        second.value("agentvm_exec_total", &[("outcome", "exited_zero")]),
        Some(0.0)
    );
    assert_eq!(
        second.value("agentvm_exec_duration_seconds_count", &id),
        Some(1.0)
    );
    let route = |method, route, status| {
        second.value(
            "agentvm_api_requests_total",
            &[("method", method), ("route", route), ("status", status)],
        )
    };
    assert_eq!(route("POST", "/sandbox/exec", "503"), Some(1.0));
    assert_eq!(route("POST", "/sandbox/exec", "409"), Some(1.0));
    assert!(route("PUT", "/actions", "204").is_some());
    assert!(route("PUT", "/actions", "400").is_some());
    assert!(second
        .value("agentvm_start_to_running_seconds", &id)
        .is_some_and(|s| s > 0.0));
    assert_eq!(
        second.value("agentvm_start_to_first_exec_seconds", &id),
        None
    );
    for direction in ["tx", "rx"] {
        let labels = [("device", "vsock"), ("direction", direction)];
        assert!(second
            .value("agentvm_device_bytes_total", &labels)
            .is_some());
        assert!(second
            .value("agentvm_device_packets_total", &labels)
            .is_some());
    }
    let prometheus = s.call("GET", "/metrics", None);
    let text = &prometheus.body;
    assert!(
        text.contains("agentvm_vm_state{id=\"sbx-1\",state=\"Running\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("agentvm_boot_time_seconds{id=\"sbx-1\"} "),
        "{text}"
    );
    let io_out: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("agentvm_vcpu_exits_total{id=\"sbx-1\",reason=\"io_out\"} "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no io_out exit count in {text}"));
    assert!(
        io_out as usize >= printed,
        "{io_out} exits, {printed} bytes\n{text}"
    );

    s.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let line = std::fs::read_to_string(&metrics).unwrap();
    let flushed: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert_eq!(flushed["id"], "sbx-1");
    assert_eq!(flushed["state"], "Running");
    let us = |k: &str| {
        flushed[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k}: {flushed}"))
    };
    assert!(
        us("boot_kvm_ready_us") <= us("boot_loaded_us")
            && us("boot_loaded_us") <= us("boot_time_us"),
        "boot phases in order: {flushed}"
    );
    assert!(flushed["api_requests"].as_u64().unwrap() > 10, "{flushed}");
    assert!(
        flushed["vcpu_exits"]["io_out"].as_u64().unwrap() >= io_out,
        "{flushed}"
    );
    assert_eq!(flushed["exec"]["outcomes"]["error"], 1, "{flushed}");
    assert!(
        flushed["vsock"]["tx_packets"].as_u64().is_some(),
        "{flushed}"
    );
    assert!(
        flushed["api_requests_by_route"]
            .as_array()
            .is_some_and(|routes| routes.iter().any(|r| r["route"] == "/vm")),
        "{flushed}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(after),
        "the refusals were not logged to {}:\n{logged}",
        log.display()
    );
    for line in logged.lines() {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("--log-format json wrote a non-JSON line {line:?}: {e}"));
        assert!(
            event["level"].is_string()
                && event["message"].is_string()
                && event["timestamp"].is_string(),
            "{line}"
        );
    }

    s.process.signal(libc::SIGTERM).unwrap();
    let Ended { out, sock, _dir } = serve.finish();
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{out:?}");
    assert!(!sock.exists(), "the API socket was not removed");
    assert!(!vsock.exists(), "the vsock socket was not removed");
}

#[test]
fn guest_reset_ends_serve_with_success_and_removes_the_socket() {
    if !require_kvm() {
        return;
    }
    let serve = Serve::start(&[]);
    serve.boot_source("probe.token=api");
    serve.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let console = serve.path("console");
    let Ended { out, sock, _dir } = serve.finish();
    assert!(out.status.success(), "{out:?}");
    assert!(!sock.exists(), "the API socket was not removed");
    let text = std::fs::read_to_string(console).unwrap();
    assert!(text.contains("PROBE done"), "{text}");
    assert!(!text.contains(" fail "), "{text}");
}

#[test]
fn guest_triple_fault_ends_serve_with_the_reason() {
    if !require_kvm() {
        return;
    }
    let serve = Serve::start(&[]);
    serve.boot_source("probe.mode=triple-fault");
    serve.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let Ended { out, sock, _dir } = serve.finish();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(out.stderr_text().contains("triple fault"), "{out:?}");
    assert!(!sock.exists());
}

fn write_config(dir: &Path, config: &serde_json::Value) -> PathBuf {
    let path = dir.join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

#[test]
fn config_file_boots_without_api_calls() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.json");
    let audit = dir.path().join("audit.log");
    let config = write_config(
        dir.path(),
        &serde_json::json!({
            "boot-source": {"kernel_image_path": probe_elf(), "boot_args": "probe.token=file"},
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 64},
            "metrics": {"metrics_path": metrics},
            "audit-log": {"path": audit},
        }),
    );
    let out = VmProcess::agentvm([
        "serve".as_ref(),
        "--no-api".as_ref(),
        "--config-file".as_ref(),
        config.as_os_str(),
    ])
    .unwrap()
    .wait(GUEST_TIMEOUT)
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = out.stdout_text();
    assert!(
        stdout.contains("PROBE mptable ok") && stdout.contains("cpus=2"),
        "{out:?}"
    );
    assert!(
        stdout.contains("probe.token=file") && stdout.contains("PROBE done"),
        "{out:?}"
    );
    assert!(metrics.exists(), "the metrics file was not created");
    assert!(audit.exists(), "the audit log was not created");

    // With --api-sock too, the API answers for the VM the file booted.
    let dir2 = tempfile::tempdir().unwrap();
    let config = write_config(
        dir2.path(),
        &serde_json::json!({"boot-source": {"kernel_image_path": probe_elf(), "boot_args": "probe.mode=count"}}),
    );
    let flag_audit = dir2.path().join("flag-audit.log");
    let serve = Serve::start(&[
        "--config-file",
        config.to_str().unwrap(),
        "--audit-log",
        flag_audit.to_str().unwrap(),
    ]);
    serve.wait_console("PROBE count 1\n");
    assert!(flag_audit.exists(), "--audit-log did not create its file");
    assert_eq!(serve.state(), "Running");
    serve.refused(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/x"}"#),
        400,
        "after starting",
    );
    serve.process.signal(libc::SIGTERM).unwrap();
    let Ended { out, sock, _dir } = serve.finish();
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{out:?}");
    assert!(!sock.exists());
}

#[test]
fn bad_config_files_name_the_section_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let run = |config: &serde_json::Value| {
        let path = write_config(dir.path(), config);
        VmProcess::agentvm([
            "serve".as_ref(),
            "--no-api".as_ref(),
            "--config-file".as_ref(),
            path.as_os_str(),
        ])
        .unwrap()
        .wait(EXIT_TIMEOUT)
        .unwrap()
    };
    let kernel = probe_elf();
    for (config, needles) in [
        (
            serde_json::json!({"boot-source": {"kernel_image_path": kernel}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T2"}}),
            vec!["\"machine-config\"", "cpu_template"],
        ),
        (
            serde_json::json!({"boot-source": {"kernel_image_path": kernel}, "machine-config": {"vcpu_count": 99, "mem_size_mib": 64}}),
            vec!["\"machine-config\"", "vcpu_count"],
        ),
        (
            serde_json::json!({"boot-source": {"kernel_image_path": "/nonexistent/k"}}),
            vec!["\"boot-source\"", "/nonexistent/k"],
        ),
        (
            serde_json::json!({"boot-source": {"kernel_image_path": kernel}, "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}]}),
            vec!["\"network-interfaces\"", "PUT /egress/policy"],
        ),
        (
            serde_json::json!({"boot-source": {"kernel_image_path": kernel}, "egress-policy": {"rules": [{"cidr": "10.0.0.1/8"}]}}),
            vec!["\"egress-policy\"", "host bits set"],
        ),
        (
            serde_json::json!({"drives": []}),
            vec!["unknown section \"drives\""],
        ),
    ] {
        let out = run(&config);
        assert_eq!(out.status.code(), Some(125), "{config}: {out:?}");
        let stderr = out.stderr_text();
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{config}: {needle:?} not in {stderr}"
            );
        }
    }
    let missing =
        VmProcess::agentvm(["serve", "--no-api", "--config-file", "/nonexistent/vm.json"])
            .unwrap()
            .wait(EXIT_TIMEOUT)
            .unwrap();
    assert_eq!(missing.status.code(), Some(125));
    assert!(
        missing.stderr_text().contains("/nonexistent/vm.json"),
        "{missing:?}"
    );
}

#[test]
fn a_forbidden_syscall_on_the_api_thread_kills_by_sigsys() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let serve = |extra: &str| {
        VmProcess::agentvm([
            "serve".as_ref(),
            "--api-sock".as_ref(),
            sock.as_os_str(),
            "--seccomp-test-violation".as_ref(),
            "api".as_ref(),
            extra.as_ref(),
        ])
        .unwrap()
    };
    let out = serve("--id=hook").wait(EXIT_TIMEOUT).unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{out:?}");
    assert!(
        out.stderr_text()
            .contains("thread api (api filter) made forbidden syscall 157 (prctl)"),
        "{out:?}"
    );
    // The socket of a process killed by SIGSYS stays behind; a restart must not reuse it blindly.
    assert!(sock.exists());
    let taken = serve("--no-seccomp").wait(EXIT_TIMEOUT).unwrap();
    assert_eq!(taken.status.code(), Some(125), "{taken:?}");
    assert!(taken.stderr_text().contains("already exists"), "{taken:?}");

    std::fs::remove_file(&sock).unwrap();
    let unfiltered = serve("--no-seccomp");
    assert!(wait_for_path(&sock, START_TIMEOUT));
    assert_eq!(request(&sock, "GET", "/", None).status, 200);
    unfiltered.signal(libc::SIGTERM).unwrap();
    let out = unfiltered.wait(EXIT_TIMEOUT).unwrap();
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{out:?}");
    assert!(!sock.exists());
}

#[test]
fn a_forbidden_syscall_on_the_agent_job_thread_kills_by_sigsys() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let out = VmProcess::agentvm([
        "serve".as_ref(),
        "--api-sock".as_ref(),
        sock.as_os_str(),
        "--seccomp-test-violation".as_ref(),
        "agent-jobs".as_ref(),
    ])
    .unwrap()
    .wait(EXIT_TIMEOUT)
    .unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{out:?}");
    assert!(
        out.stderr_text()
            .contains("thread agent-jobs (agent_jobs filter) made forbidden syscall 157 (prctl)"),
        "{out:?}"
    );
}

#[test]
fn serve_refuses_bad_arguments_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let run = |args: &[&std::ffi::OsStr]| {
        VmProcess::agentvm(args)
            .unwrap()
            .wait(EXIT_TIMEOUT)
            .unwrap()
    };
    let bad_id = run(&[
        "serve".as_ref(),
        "--api-sock".as_ref(),
        sock.as_os_str(),
        "--id".as_ref(),
        "a b".as_ref(),
    ]);
    assert_eq!(bad_id.status.code(), Some(125), "{bad_id:?}");
    assert!(bad_id.stderr_text().contains("--id \"a b\""), "{bad_id:?}");
    let no_dir = dir.path().join("missing/api.sock");
    let unbound = run(&["serve".as_ref(), "--api-sock".as_ref(), no_dir.as_os_str()]);
    assert_eq!(unbound.status.code(), Some(125), "{unbound:?}");
    assert!(
        unbound
            .stderr_text()
            .contains("cannot listen on the API socket"),
        "{unbound:?}"
    );
    let no_api = run(&["serve".as_ref(), "--no-api".as_ref()]);
    assert_eq!(no_api.status.code(), Some(2), "{no_api:?}");
    assert!(no_api.stderr_text().contains("--config-file"), "{no_api:?}");
    assert!(!sock.exists());
}

#[test]
fn log_format_json_writes_one_json_object_per_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut command = std::process::Command::new(integration_tests::agentvm::agentvm_bin());
    command
        .env("AGENTVM_LOG", "info")
        .args(["--log-format", "json", "serve", "--api-sock"])
        .arg(&sock);
    let process = VmProcess::spawn(command).expect("start agentvm serve");
    assert!(wait_for_path(&sock, START_TIMEOUT), "no API socket");
    assert_eq!(request(&sock, "GET", "/no-such-thing", None).status, 404);
    process.signal(libc::SIGTERM).unwrap();
    let out = process.wait(EXIT_TIMEOUT).unwrap();
    let stderr = out.stderr_text();
    // `agentvm: ...` lines are the CLI's own messages, not log lines.
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with("agentvm: "))
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line:?}\n{stderr}"))
        })
        .collect();
    let refused = events
        .iter()
        .find(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("API request refused") && m.contains("no-such-thing"))
        })
        .unwrap_or_else(|| panic!("the 404 was not logged:\n{stderr}"));
    assert_eq!(refused["level"], "INFO", "{refused}");
    assert!(refused["timestamp"].is_string(), "{refused}");
}
