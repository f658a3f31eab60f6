//! Snapshot and restore of a real Linux guest with an active virtio-vsock device: a guest booted
//! by `agentvm serve` runs an exec, is paused and snapshotted, its VMM ends; a new `serve` loads
//! the snapshot with `resume_vm`, and the restored guest's agent accepts a new vsock connection:
//! an exec sees the file written before the snapshot. Then the same snapshot is restored twice
//! with the uffd backend: the first records the working set (`mem.ws`, written once its first
//! exec is answered), the second prefetches it; both answer the exec. Then an external userfaultfd handler
//! process (`agentvm snapshot uffd-handler`, Firecracker's protocol) serves a restore's memory.
//! Last, two VMMs restore it at the same time (a fork), each with its own vsock socket and CID,
//! and diverge.
//!
//! When the network checks' upstream servers are up, the snapshotted guest also has a NIC behind
//! the egress filter: a load that names no egress policy is refused with a clear error, every
//! restore gives the policy again, and each fork reaches the upstream through its own new filter
//! (its own audit log, naming its own sandbox), with the sandbox CA the guest agent fetched
//! again after the restore replacing the snapshot's in the guest's trust store.
//!
//! The restores come at least [`RESTORE_GAP`] after the snapshot, and each one's first exec reads the
//! guest's wall clock and 16 bytes of `/dev/urandom`: the clock must be the host's (the VMM's
//! after-restore step set it; without it the guest lags by the gap), and the three restores of
//! the one snapshot must read different random bytes (the step credited fresh entropy; without
//! it each copy continues the snapshot's RNG state).

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::api::{request, ApiResponse};

use crate::api::{exec_events, exec_ok, expect_status};
use crate::{timed, Args};

type Check = Result<String, String>;

/// The guest boots at TCG speed: /sandbox requests answer 409 until the VM is built and 503
/// until its agent is up.
const AGENT_UP_TIMEOUT: Duration = Duration::from_secs(240);
/// How long a `serve` may take to end after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Between the snapshot and the first restore: a guest whose clock is not corrected lags by this
/// much (plus the VMM's start and the load), less the time from the load to its first exec's
/// `date`, which at TCG speed can take a few seconds; so well beyond that and
/// [`CLOCK_TOLERANCE_SECS`] together.
const RESTORE_GAP: Duration = Duration::from_secs(10);
/// How far the restored guest's clock may be from the host's while its first exec runs.
const CLOCK_TOLERANCE_SECS: f64 = 2.0;
/// The first exec after each restore: the file from before the snapshot, the wall clock (whole
/// seconds: busybox's `date` has no `%N`), and 16 random bytes as hex, one per line.
const FIRST_EXEC: &str =
    "cat /tmp/snap-file; date +%s; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'";

/// `agentvm serve`, killed when dropped (unless it ended already).
pub struct Serve(Child);

impl Serve {
    pub fn start(
        agentvm: &Path,
        dir: &Path,
        name: &str,
        config: Option<&Path>,
    ) -> Result<Self, String> {
        let sock = dir.join(format!("{name}.sock"));
        let mut command = Command::new(agentvm);
        command
            .arg("serve")
            .arg("--id")
            .arg(format!("e2e-{name}"))
            .arg("--api-sock")
            .arg(&sock)
            .arg("--console")
            .arg(dir.join(format!("{name}.console")));
        if let Some(config) = config {
            command.arg("--config-file").arg(config);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", agentvm.display()))?;
        let serve = Serve(child);
        // Connecting, not just seeing the file: between bind and listen a connect is refused
        // (and the API client panics on that).
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&sock).is_err() {
            if Instant::now() >= deadline {
                return Err(format!("the API socket {} did not answer", sock.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(serve)
    }

    /// Ends the VMM as an operator would (SIGTERM), so it removes its sockets.
    pub fn terminate(mut self) -> Result<(), String> {
        let pid = libc::pid_t::try_from(self.0.id()).map_err(|e| format!("pid: {e}"))?;
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(format!("SIGTERM: {}", std::io::Error::last_os_error()));
        }
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            match self.0.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Ok(None) => return Err("serve did not end after SIGTERM".into()),
                Err(e) => return Err(format!("wait for serve: {e}")),
            }
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where the guest keeps the sandbox CA the agent installed (`guest_agent::egress_ca::CA_FILE`).
const GUEST_CA_FILE: &str = "/etc/ssl/certs/agentvm-egress-ca.pem";

/// A snapshot later checks restore from (the soak): a guest that wrote `before-snapshot` to
/// /tmp/snap-file, and the egress policy its NIC needs, if it has one.
pub struct Template {
    pub state: std::path::PathBuf,
    pub mem: std::path::PathBuf,
    pub policy: Option<String>,
}

/// `upstreams`: the network checks' upstream servers are running, so the guest gets a NIC.
/// Returns the snapshot the checks took, if they got that far.
pub fn checks(args: &Args, upstreams: bool) -> Option<Template> {
    let mut template = None;
    timed("snapshot_restore", || {
        snapshot_restore(args, upstreams, &mut template)
    });
    template
}

/// Boots a guest under `serve`, writes /tmp/snap-file in it, and snapshots it into `dir` (the
/// `only soak` runs' template); the serve is ended.
pub fn make_template(args: &Args, dir: &Path) -> Result<Template, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (original, template, _, _) = boot_and_snapshot(args, dir, None)?;
    original.terminate()?;
    Ok(template)
}

/// The snapshotted guest's egress policy (`PUT /egress/policy` body): the web upstream by name,
/// and its address (one of the nested host's own, so only a CIDR rule naming it lets the filter
/// hand it out) on the discard port only.
fn egress_policy() -> serde_json::Value {
    serde_json::json!({
        "rules": [
            { "id": "web", "domain": "allowed.test", "ports": [crate::net::WEB_PORT] },
            { "id": "upstream-host", "cidr": format!("{}/32", crate::net::UPSTREAM_ADDR), "ports": [9] }
        ]
    })
}

fn snapshot_restore(args: &Args, upstreams: bool, template: &mut Option<Template>) -> Check {
    let dir = args.work_dir.join("snapshot");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let policy = upstreams.then(|| egress_policy().to_string());
    let (original, taken, ca_before, create_secs) =
        boot_and_snapshot(args, &dir, policy.as_deref())?;
    let (state, mem) = (taken.state.clone(), taken.mem.clone());
    *template = Some(taken);
    original.terminate()?;
    std::thread::sleep(RESTORE_GAP);

    let restored = Serve::start(&args.agentvm, &dir, "restored", None)?;
    let sock = dir.join("restored.sock");
    let nic_refusal = match &policy {
        Some(_) => Some(load_without_policy_refused(&sock, &state, &mem)?),
        None => None,
    };
    let started = load_snapshot(
        &sock,
        &state,
        &mem,
        "File",
        policy.as_deref(),
        "PUT /snapshot/load",
    )?;
    let file_restore = first_exec_after_restore(&sock, &dir, "restored")?;
    let first_exec_secs = started.elapsed().as_secs_f64();
    // A second connection after the restore works as well.
    exec_ok(&sock, "/sandbox", "echo after-restore > /tmp/snap-file")?;
    // Ended with SIGTERM so that it removes the vsock socket the uffd restores listen on.
    restored.terminate()?;

    let net = policy.as_deref();
    let recording = uffd_restore(args, &dir, "uffd-first", &state, &mem, net)?;
    if recording.prefetched != 0.0 || recording.faults < 1.0 {
        return Err(format!(
            "first uffd restore: expected faults and no prefetch, got {recording:?}"
        ));
    }
    let ws = dir.join("mem.ws");
    let ws_pages = std::fs::metadata(&ws)
        .map(|m| (m.len().saturating_sub(68)) / 8)
        .map_err(|e| {
            format!(
                "the first uffd restore recorded no working set {}: {e}",
                ws.display()
            )
        })?;
    let prefetching = uffd_restore(args, &dir, "uffd-second", &state, &mem, net)?;
    if prefetching.prefetched < 1.0 || prefetching.prefetched > ws_pages as f64 {
        return Err(format!(
            "second uffd restore: expected up to {ws_pages} pages prefetched, got {prefetching:?}"
        ));
    }
    let external = external_uffd_restore(args, &dir, &state, &mem, net)?;
    let forks = fork_two(args, &dir, &state, &mem, net.zip(ca_before.as_deref()))?;
    let views = [&file_restore, &recording.view, &prefetching.view];
    for (i, a) in views.iter().enumerate() {
        for b in &views[i + 1..] {
            if a.random == b.random {
                return Err(format!(
                    "two restores of one snapshot read the same /dev/urandom bytes {}: the \
                     guest's RNG was not reseeded after the restore",
                    a.random
                ));
            }
        }
    }
    let worst_skew = views.iter().map(|v| v.clock_skew_secs).fold(0.0, f64::max);
    let widest_window = views.iter().map(|v| v.window_secs).fold(0.0, f64::max);
    Ok(format!(
        "snapshot written in {create_secs:.1} s; restored {} s later, the guest's first exec result \
         {first_exec_secs:.1} s after the load saw the file written before the snapshot, its clock \
         at most {worst_skew:.2} s off the host's in all three restores (exec windows up to \
         {widest_window:.2} s), and three different \
         /dev/urandom reads; uffd restore: first exec \
         {:.1} s, {} faults, working set {ws_pages} pages; uffd + prefetch: first exec {:.1} s, \
         {} pages prefetched, {} faults; {external}; {forks}{}",
        RESTORE_GAP.as_secs(),
        recording.first_exec_secs,
        recording.faults,
        prefetching.first_exec_secs,
        prefetching.prefetched,
        prefetching.faults,
        nic_refusal
            .map(|why| format!("; with a NIC: a load naming no egress policy was refused ({why})"))
            .unwrap_or_default(),
    ))
}

/// Boots the snapshotted guest under `serve` in `dir` (with a NIC under `policy`), writes
/// /tmp/snap-file, pauses it and snapshots it; returns the paused serve, the snapshot, and the
/// sandbox CA the guest had installed (with a NIC), and the seconds the snapshot took.
fn boot_and_snapshot(
    args: &Args,
    dir: &Path,
    policy: Option<&str>,
) -> Result<(Serve, Template, Option<String>, f64), String> {
    let config = dir.join("vm.json");
    let mut vm = serde_json::json!({
        "boot-source": {"kernel_image_path": args.kernel, "initrd_path": args.initrd},
        "machine-config": {"vcpu_count": crate::GUEST_VCPUS, "mem_size_mib": 256},
        "vsock": {"guest_cid": 3, "uds_path": dir.join("v.sock")},
    });
    if let Some(policy) = policy {
        vm["egress-policy"] =
            serde_json::from_str(policy).map_err(|e| format!("the egress policy: {e}"))?;
    }
    std::fs::write(&config, vm.to_string()).map_err(|e| format!("vm.json: {e}"))?;
    let original = Serve::start(&args.agentvm, dir, "original", Some(&config))?;
    let sock = dir.join("original.sock");
    let write = serde_json::json!({"cmd": ["sh", "-c", "echo before-snapshot > /tmp/snap-file"]})
        .to_string();
    let first = until_agent_up(&sock, || {
        request(&sock, "POST", "/sandbox/exec", Some(&write))
    })?;
    let (_, _, last) = exec_events(&first)?;
    if last != serde_json::json!({"exit_code": 0, "timed_out": false}) {
        return Err(format!("exec before the snapshot: {last}"));
    }
    let ca_before = match policy {
        Some(_) => Some(guest_ca(&sock, "original")?),
        None => None,
    };

    let (state, mem) = (dir.join("state"), dir.join("mem"));
    expect_status(
        &request(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)),
        204,
        "PATCH /vm Paused",
    )?;
    let create = serde_json::json!({"snapshot_path": state, "mem_file_path": mem}).to_string();
    let started = Instant::now();
    expect_status(
        &request(&sock, "PUT", "/snapshot/create", Some(&create)),
        204,
        "PUT /snapshot/create",
    )?;
    let create_secs = started.elapsed().as_secs_f64();
    Ok((
        original,
        Template {
            state,
            mem,
            policy: policy.map(str::to_string),
        },
        ca_before,
        create_secs,
    ))
}

/// The sandbox CA installed in the guest behind `sock`.
fn guest_ca(sock: &Path, name: &str) -> Result<String, String> {
    let body = serde_json::json!({"cmd": ["cat", GUEST_CA_FILE]}).to_string();
    let (ca, _, last) = exec_events(&request(sock, "POST", "/sandbox/exec", Some(&body)))?;
    if last != serde_json::json!({"exit_code": 0, "timed_out": false})
        || !ca.starts_with("-----BEGIN CERTIFICATE-----")
    {
        return Err(format!("{name}: {GUEST_CA_FILE}: {ca:?}, {last}"));
    }
    Ok(ca)
}

/// A snapshot of a VM with a NIC loaded without PUT /egress/policy: 400 naming the missing
/// policy, and the VMM stays ready for a load that gives one.
fn load_without_policy_refused(sock: &Path, state: &Path, mem: &Path) -> Check {
    let load = serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
    })
    .to_string();
    let answer = request(sock, "PUT", "/snapshot/load", Some(&load));
    if answer.status == 400 && answer.body.contains("has a NIC") {
        let message: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_default();
        Ok(message["fault_message"]
            .as_str()
            .unwrap_or(&answer.body)
            .chars()
            .take(90)
            .collect::<String>()
            + "…")
    } else {
        Err(format!(
            "a load of a snapshot with a NIC and no egress policy: want 400 naming the NIC, got {answer:?}"
        ))
    }
}

/// A fork with a NIC: it reaches the upstream through its own new egress filter, whose audit log
/// names the fork's sandbox; its agent fetched the new filter's CA after the restore, which
/// replaced `ca_before` (the snapshot's) in the trust store. Returns the fork's CA.
fn fork_network(sock: &Path, name: &str, audit: &Path, ca_before: &str) -> Result<String, String> {
    let url = format!("http://allowed.test:{}/hello", crate::net::WEB_PORT);
    let script = format!(
        "timeout 60 wget -q -O - {url} && echo '==served' && \
         timeout 30 wget -q -O - http://10.0.2.2/agentvm/egress-ca.pem && echo '==bundle' && \
         cat /etc/ssl/certs/ca-certificates.crt"
    );
    let body = serde_json::json!({"cmd": ["sh", "-c", script]}).to_string();
    let (out, err, last) = exec_events(&request(sock, "POST", "/sandbox/exec", Some(&body)))?;
    let failed =
        || format!("{name}: network after the restore: stdout {out:?}, stderr {err:?}, {last}");
    if last != serde_json::json!({"exit_code": 0, "timed_out": false}) {
        return Err(failed());
    }
    let (hello, rest) = out.split_once("==served").ok_or_else(failed)?;
    let (served, bundle) = rest.split_once("==bundle").ok_or_else(failed)?;
    if !hello.contains("hello from upstream, host allowed.test") {
        return Err(failed());
    }
    let installed = guest_ca(sock, name)?;
    let body_of = |pem: &str| pem.trim().to_string();
    if body_of(&installed) != body_of(served) {
        return Err(format!(
            "{name}: the guest trusts {installed:?}, but the restored egress filter serves {served:?}: \
             the agent did not fetch the new CA after the restore"
        ));
    }
    if body_of(&installed) == body_of(ca_before) || bundle.contains(body_of(ca_before).as_str()) {
        return Err(format!(
            "{name}: the snapshot's sandbox CA is still trusted after the restore (new CA equal: {}, \
             old CA in the bundle: {})",
            body_of(&installed) == body_of(ca_before),
            bundle.contains(body_of(ca_before).as_str())
        ));
    }
    if !bundle.contains(body_of(&installed).as_str()) {
        return Err(format!(
            "{name}: the new CA is not in the bundle: {bundle:?}"
        ));
    }
    let log = std::fs::read_to_string(audit).map_err(|e| format!("{}: {e}", audit.display()))?;
    let sandbox = format!("\"e2e-{name}\"");
    if !log
        .lines()
        .any(|l| l.contains(&sandbox) && l.contains("allowed.test"))
    {
        return Err(format!(
            "{name}: its audit log {} has no line for sandbox {sandbox} and allowed.test:\n{log}",
            audit.display()
        ));
    }
    Ok(installed)
}

/// The snapshot restored through an external userfaultfd handler (`agentvm snapshot
/// uffd-handler --once`, Firecracker's protocol: the VMM sends it the uffd and the memory
/// mappings over its Unix socket): the agent answers, and when the VM ends the handler reports
/// the faults it served and exits by itself.
fn external_uffd_restore(
    args: &Args,
    dir: &Path,
    state: &Path,
    mem: &Path,
    policy: Option<&str>,
) -> Check {
    let socket = dir.join("uffd-handler.sock");
    let log = dir.join("uffd-handler.out");
    let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let handler = Command::new(&args.agentvm)
        .args(["snapshot", "uffd-handler", "--once", "--socket"])
        .arg(&socket)
        .arg("--mem-file")
        .arg(mem)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the uffd handler: {e}"))?;
    // Killed and reaped on every path out; after --once it has ended by itself.
    let mut handler = Serve(handler);
    let printed = || std::fs::read_to_string(&log).unwrap_or_default();
    // Not a connect: the handler would take a probe connection for a VMM (and, with --once,
    // end after it). It says when it listens.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !printed().contains("listening on") {
        if Instant::now() >= deadline {
            return Err(format!("the uffd handler did not start: {:?}", printed()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let name = "uffd-external";
    let serve = Serve::start(&args.agentvm, dir, name, None)?;
    let sock = dir.join(format!("{name}.sock"));
    let started = load_snapshot(
        &sock,
        state,
        &socket,
        "Uffd",
        policy,
        &format!("PUT /snapshot/load ({name}, backend_path = the handler's socket)"),
    )?;
    first_exec_after_restore(&sock, dir, name)?;
    let first_exec_secs = started.elapsed().as_secs_f64();
    serve.terminate()?;
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        match handler.0.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Ok(None) => return Err("the --once uffd handler did not exit after its VM".into()),
            Err(e) => return Err(format!("wait for the uffd handler: {e}")),
        }
    };
    let report = printed();
    let faults = report
        .lines()
        .find_map(|l| l.split("faults=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| format!("the uffd handler reported no faults: {report:?}"))?;
    if !status.success() || faults == 0 {
        return Err(format!(
            "the uffd handler ended with {status} after serving {faults} faults: {report:?}"
        ));
    }
    Ok(format!(
        "external uffd handler: first exec {first_exec_secs:.1} s, {faults} faults served by it"
    ))
}

/// Fork: two VMMs restore the one snapshot at the same time, each with its own vsock socket and
/// CID (`vsock_override`), their memory shared copy-on-write through the page cache; both agents
/// answer, and a write in one is not seen in the other. With `net` (the policy and the
/// snapshot's sandbox CA), each also gets its own audit log and [`fork_network`] checks it.
fn fork_two(args: &Args, dir: &Path, state: &Path, mem: &Path, net: Option<(&str, &str)>) -> Check {
    let started = Instant::now();
    let names = ["fork-a", "fork-b"];
    let mut serves = Vec::new();
    for (name, cid) in names.iter().zip([7u32, 8]) {
        let serve = Serve::start(&args.agentvm, dir, name, None)?;
        let sock = dir.join(format!("{name}.sock"));
        put_policy(&sock, net.map(|(policy, _)| policy))?;
        if net.is_some() {
            let audit = serde_json::json!({"path": dir.join(format!("{name}.audit"))}).to_string();
            expect_status(
                &request(&sock, "PUT", "/egress/audit-log", Some(&audit)),
                204,
                &format!("PUT /egress/audit-log ({name})"),
            )?;
        }
        load_with_own_vsock(&sock, dir, name, state, mem, u64::from(cid))?;
        serves.push(serve);
    }
    // Both guests come up at once: their first execs run concurrently.
    let firsts: Vec<Result<RestoredView, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = names
            .iter()
            .map(|name| {
                let sock = dir.join(format!("{name}.sock"));
                scope.spawn(move || first_exec_after_restore(&sock, dir, name))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("fork thread panicked".into()))
            })
            .collect()
    });
    for first in firsts {
        first?;
    }
    let up_secs = started.elapsed().as_secs_f64();
    for name in names {
        exec_ok(
            &dir.join(format!("{name}.sock")),
            "/sandbox",
            &format!("echo {name} > /tmp/snap-file"),
        )?;
    }
    for name in names {
        let sock = dir.join(format!("{name}.sock"));
        let body = serde_json::json!({"cmd": ["cat", "/tmp/snap-file"]}).to_string();
        let (stdout, _, _) = exec_events(&request(&sock, "POST", "/sandbox/exec", Some(&body)))?;
        if stdout.trim() != name {
            return Err(format!(
                "{name}: /tmp/snap-file holds {stdout:?} after each fork wrote its own name: \
                 the forks do not diverge independently"
            ));
        }
    }
    let mut network = String::new();
    if let Some((_, ca_before)) = net {
        let mut cas = Vec::new();
        for name in names {
            let sock = dir.join(format!("{name}.sock"));
            let audit = dir.join(format!("{name}.audit"));
            cas.push(fork_network(&sock, name, &audit, ca_before)?);
        }
        if cas[0].trim() == cas[1].trim() {
            return Err("the two forks' egress filters have the same sandbox CA".into());
        }
        network = "; each reached allowed.test through its own egress filter (own audit log \
                   naming its sandbox), and trusts its own new sandbox CA instead of the \
                   snapshot's"
            .into();
    }
    for serve in serves {
        serve.terminate()?;
    }
    Ok(format!(
        "fork: 2 concurrent restores (CIDs 7 and 8, own vsock sockets) both answered {up_secs:.1} s \
         after the first load and kept their own /tmp writes{network}"
    ))
}

/// What one uffd restore showed.
#[derive(Debug)]
struct UffdRestore {
    first_exec_secs: f64,
    faults: f64,
    prefetched: f64,
    view: RestoredView,
}

/// What a restored guest's first exec showed.
#[derive(Debug)]
struct RestoredView {
    /// |guest wall clock - host wall clock| while the exec ran.
    clock_skew_secs: f64,
    /// 16 bytes of the guest's /dev/urandom, in hex.
    random: String,
    /// From sending the exec to its answer: the host-side window the guest's `date` fell in.
    window_secs: f64,
}

/// Seconds since the Unix epoch on this host (L1).
fn host_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Runs [`FIRST_EXEC`] in the guest restored under the serve `name` (waiting for its agent),
/// checks that it sees the file from before the snapshot and that the guest's clock is the
/// host's, and that the VMM's after-restore step is counted as done.
fn first_exec_after_restore(sock: &Path, dir: &Path, name: &str) -> Result<RestoredView, String> {
    let body = serde_json::json!({"cmd": ["sh", "-c", FIRST_EXEC]}).to_string();
    // The host's clock just before the answering attempt was sent, and after its answer.
    let sent = std::cell::Cell::new(0.0);
    let answer = until_agent_up(sock, || {
        sent.set(host_now());
        request(sock, "POST", "/sandbox/exec", Some(&body))
    });
    let answered = host_now();
    let (stdout, _, last) = answer
        .and_then(|answer| exec_events(&answer))
        .map_err(|e| {
            format!(
                "{name}: {e}\n{}",
                console_tail(&dir.join(format!("{name}.console")))
            )
        })?;
    let lines: Vec<&str> = stdout.lines().collect();
    if last != serde_json::json!({"exit_code": 0, "timed_out": false})
        || lines.len() != 3
        || lines[0] != "before-snapshot"
    {
        return Err(format!(
            "{name}: first exec after the restore: stdout {stdout:?}, last {last}"
        ));
    }
    // First, so that a failed step is reported as such (its reason is in serve's log).
    let metrics = request(sock, "GET", "/metrics", None).body;
    if !metrics.lines().any(|l| {
        l.starts_with("agentvm_after_restore_total{") && l.ends_with("outcome=\"done\"} 1")
    }) {
        return Err(format!(
            "{name}: the after-restore step is not counted as done:\n{metrics}"
        ));
    }
    let guest: f64 = lines[1]
        .parse()
        .map_err(|e| format!("{name}: guest date {:?}: {e}", lines[1]))?;
    let (earliest, latest) = (sent.get(), answered);
    // Whole seconds: the guest's instant lies in [guest, guest + 1).
    if guest + 1.0 < earliest - CLOCK_TOLERANCE_SECS || guest > latest + CLOCK_TOLERANCE_SECS {
        return Err(format!(
            "{name}: the restored guest's clock reads {guest:.3} during an exec the host ran \
             from {earliest:.3} to {latest:.3} ({:+.3} s from the host's): the clock was not \
             set after the restore",
            guest - earliest
        ));
    }
    let random = lines[2].to_string();
    if random.len() != 32 {
        return Err(format!("{name}: /dev/urandom read {random:?}"));
    }
    let clock_skew_secs = if guest + 1.0 < earliest {
        earliest - (guest + 1.0)
    } else {
        (guest - latest).max(0.0)
    };
    Ok(RestoredView {
        clock_skew_secs,
        random,
        window_secs: latest - earliest,
    })
}

/// Restores the snapshot with the uffd backend in a new serve, checks that its agent answers an
/// exec that sees the file written before the snapshot (and, when there was no working set yet,
/// that this restore wrote one once that exec was answered), reads the uffd counters, and ends
/// it with SIGTERM.
fn uffd_restore(
    args: &Args,
    dir: &Path,
    name: &str,
    state: &Path,
    mem: &Path,
    policy: Option<&str>,
) -> Result<UffdRestore, String> {
    let serve = Serve::start(&args.agentvm, dir, name, None)?;
    let sock = dir.join(format!("{name}.sock"));
    let started = load_snapshot(
        &sock,
        state,
        mem,
        "Uffd",
        policy,
        &format!("PUT /snapshot/load ({name})"),
    )?;
    let recording = !working_set_path(mem).exists();
    let view = first_exec_after_restore(&sock, dir, name)?;
    let first_exec_secs = started.elapsed().as_secs_f64();
    if recording {
        // Written once the first exec result is in, while the VM runs on.
        let ws = working_set_path(mem);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ws.exists() {
            if Instant::now() >= deadline {
                return Err(format!(
                    "{name}: no working set at {} 10 s after the first exec result, while the \
                     VM still runs",
                    ws.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let metrics = request(&sock, "GET", "/metrics", None).body;
    let metric = |family: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{family}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("{name}: no {family} in GET /metrics:\n{metrics}"))
    };
    let restore = UffdRestore {
        first_exec_secs,
        faults: metric("agentvm_uffd_faults_total")?,
        prefetched: metric("agentvm_uffd_prefetched_pages_total")?,
        view,
    };
    serve.terminate()?;
    Ok(restore)
}

/// Where a uffd restore of `mem` records its working set (`<memory file>.ws`, as README's
/// `PUT /snapshot/load` says; the `snapshot` crate is not a dependency of this binary).
fn working_set_path(mem: &Path) -> std::path::PathBuf {
    let mut name = mem.as_os_str().to_os_string();
    name.push(".ws");
    std::path::PathBuf::from(name)
}

/// `PUT /snapshot/load` of `state` + `mem` (File backend), resumed, with the vsock socket
/// `<dir>/<name>.v.sock` and `cid` instead of the snapshot's, so it runs beside other restores.
pub fn load_with_own_vsock(
    sock: &Path,
    dir: &Path,
    name: &str,
    state: &Path,
    mem: &Path,
    cid: u64,
) -> Result<(), String> {
    let load = serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "vsock_override": {"uds_path": dir.join(format!("{name}.v.sock")), "guest_cid": cid},
        "resume_vm": true,
    })
    .to_string();
    expect_status(
        &request(sock, "PUT", "/snapshot/load", Some(&load)),
        204,
        &format!("PUT /snapshot/load ({name}, CID {cid})"),
    )
}

/// `PUT /egress/policy` before a load, when the snapshot's guest has a NIC.
pub fn put_policy(sock: &Path, policy: Option<&str>) -> Result<(), String> {
    match policy {
        Some(policy) => expect_status(
            &request(sock, "PUT", "/egress/policy", Some(policy)),
            204,
            "PUT /egress/policy (before the load)",
        ),
        None => Ok(()),
    }
}

pub fn until_agent_up(sock: &Path, call: impl Fn() -> ApiResponse) -> Result<ApiResponse, String> {
    let deadline = Instant::now() + AGENT_UP_TIMEOUT;
    loop {
        let answer = call();
        if !matches!(answer.status, 409 | 503) || Instant::now() >= deadline {
            return Ok(answer);
        }
        if !sock.exists() {
            return Err(format!(
                "serve ended while waiting for the agent: {answer:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn console_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "console of the restored guest (last 30 lines):\n{}",
        lines[lines.len().saturating_sub(30)..].join("\n")
    )
}

/// `PUT /snapshot/load` of `state` + `mem` through `backend`, resumed, after `PUT
/// /egress/policy` with `policy` if given; when the load was sent.
fn load_snapshot(
    sock: &Path,
    state: &Path,
    mem: &Path,
    backend: &str,
    policy: Option<&str>,
    what: &str,
) -> Result<Instant, String> {
    put_policy(sock, policy)?;
    let load = serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": backend, "backend_path": mem},
        "resume_vm": true,
    })
    .to_string();
    let started = Instant::now();
    expect_status(
        &request(sock, "PUT", "/snapshot/load", Some(&load)),
        204,
        what,
    )?;
    Ok(started)
}
