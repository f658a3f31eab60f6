//! The per-VM API's agent extensions with a real guest: `agentvm serve --config-file` boots a
//! guest with a vsock device, and `/sandbox/exec`, `/sandbox/files`, `/sandbox/watch`,
//! `/sandbox/pty` and `/sandbox/ports` go through its agent; the execs show in the exec audit
//! log (`--audit-log`) and in `GET /metrics`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use integration_tests::api::{
    header, request, request_bytes, stream_lines, upgrade, wait_for_listener, ApiResponse, Upgrade,
};
use integration_tests::prometheus;

use crate::{timed, Args};

type Check = Result<String, String>;

/// The guest boots at TCG speed: /sandbox requests answer 409 until the VM is built and 503
/// until its agent is up.
const AGENT_UP_TIMEOUT: Duration = Duration::from_secs(240);

/// `agentvm serve`, killed when dropped.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `upstreams`: the network checks' upstream servers and names are up, so the runtime policy
/// change can be seen from the guest.
pub fn checks(args: &Args, upstreams: bool) {
    timed("api_sandbox", || api_sandbox(args, upstreams));
}

fn api_sandbox(args: &Args, upstreams: bool) -> Check {
    let dir = args.work_dir.join("api");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let sock = dir.join("api.sock");
    let config = dir.join("vm.json");
    let vm = serde_json::json!({
        "boot-source": {"kernel_image_path": args.kernel, "initrd_path": args.initrd},
        "machine-config": {"vcpu_count": crate::GUEST_VCPUS, "mem_size_mib": 256},
        "vsock": {"guest_cid": 3, "uds_path": dir.join("v.sock")},
        // A NIC that allows nothing yet; the policy is changed at run time below.
        "egress-policy": {"rules": []},
    });
    std::fs::write(&config, vm.to_string()).map_err(|e| format!("vm.json: {e}"))?;
    let audit = dir.join("audit.log");
    let child = Command::new(&args.agentvm)
        .arg("serve")
        .arg("--id")
        .arg("e2e-api")
        .arg("--audit-log")
        .arg(&audit)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&config)
        .arg("--console")
        .arg(dir.join("console"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", args.agentvm.display()))?;
    let _serve = Serve(child);
    if !wait_for_listener(&sock, Duration::from_secs(30)) {
        return Err("nothing listens on the API socket".into());
    }

    let exec = r#"{"cmd": ["sh", "-c", "echo out; echo err >&2; exit 3"]}"#;
    let answer = until_agent_up(&sock, || {
        request(&sock, "POST", "/sandbox/exec", Some(exec))
    })?;
    let (stdout, stderr, last) = exec_events(&answer)?;
    if (stdout.as_str(), stderr.as_str()) != ("out\n", "err\n")
        || last != serde_json::json!({"exit_code": 3, "timed_out": false})
    {
        return Err(format!(
            "exec: stdout {stdout:?}, stderr {stderr:?}, last {last}"
        ));
    }

    let stdin_exec = r#"{"cmd": ["cat"], "stdin": "piped"}"#;
    let (piped, _, _) = exec_events(&request(&sock, "POST", "/sandbox/exec", Some(stdin_exec)))?;
    if piped != "piped" {
        return Err(format!("exec with stdin: stdout {piped:?}"));
    }
    let audited = check_audit_log(&audit)?;
    let metrics = check_metrics(&sock)?;

    let content = "hello from the API\n";
    let put = request_bytes(
        &sock,
        "PUT",
        "/sandbox/files?path=/tmp/api-file",
        "application/octet-stream",
        content.as_bytes(),
    );
    expect_status(&put, 204, "PUT /sandbox/files")?;
    let got = request(&sock, "GET", "/sandbox/files?path=/tmp/api-file", None);
    expect_status(&got, 200, "GET /sandbox/files")?;
    if got.body != content {
        return Err(format!("GET /sandbox/files: {:?}", got.body));
    }
    let list = request(&sock, "GET", "/sandbox/files/list?path=/tmp", None);
    expect_status(&list, 200, "GET /sandbox/files/list")?;
    let entry = list
        .json()
        .as_array()
        .and_then(|entries| entries.iter().find(|e| e["name"] == "api-file").cloned())
        .ok_or_else(|| format!("api-file not listed: {}", list.body))?;
    if entry["type"] != "file" || entry["size"] != content.len() {
        return Err(format!("listed entry: {entry}"));
    }
    let missing = request(&sock, "GET", "/sandbox/files?path=/tmp/no-such-file", None);
    expect_status(&missing, 404, "GET of a missing file")?;
    let dir_read = request(&sock, "GET", "/sandbox/files?path=/tmp", None);
    expect_status(&dir_read, 400, "GET of a directory")?;
    let watched = watch_sees_exec(&sock, "/sandbox")?;
    let terminal = pty_session(&sock, "/sandbox")?;
    let tunnel = port_tunnel(&sock, "/sandbox")?;
    let egress = if upstreams {
        runtime_policy_change(&sock)?
    } else {
        "egress policy change not checked (no upstream servers with --only api)".into()
    };
    // Every stream above ended; the API still answers.
    expect_status(&request(&sock, "GET", "/", None), 200, "GET / at the end")?;
    Ok(format!(
        "exec streamed out/err/exit 3, file round trip and list ok; missing file: {}; {audited}; \
         {metrics}; {watched}; {terminal}; {tunnel}; {egress}",
        missing.fault()
    ))
}

/// The guest's NIC started with a policy that allows nothing: a name of the network checks'
/// upstream is unresolvable; `PUT /egress/policy` allows it at run time and the next fetch works.
fn runtime_policy_change(sock: &Path) -> Check {
    use crate::net::{UPSTREAM_ADDR, WEB_PORT};
    let fetch = format!(
        r#"{{"cmd": ["sh", "-c", "timeout 60 wget -q -O - http://allowed.test:{WEB_PORT}/hello"]}}"#
    );
    let (out, err, last) = exec_events(&request(sock, "POST", "/sandbox/exec", Some(&fetch)))?;
    if last["exit_code"] == 0 || !err.contains("bad address") {
        return Err(format!(
            "before the change: want an unresolvable name, got {last}, stdout {out:?}, stderr {err:?}"
        ));
    }
    let policy = serde_json::json!({"rules": [
        {"id": "web", "domain": "allowed.test", "ports": [WEB_PORT]},
        {"id": "upstream-host", "cidr": format!("{UPSTREAM_ADDR}/32"), "ports": [9]},
    ]});
    let put = request(sock, "PUT", "/egress/policy", Some(&policy.to_string()));
    expect_status(&put, 204, "PUT /egress/policy at run time")?;
    let (out, err, last) = exec_events(&request(sock, "POST", "/sandbox/exec", Some(&fetch)))?;
    if last["exit_code"] != 0 || !out.contains("hello from upstream") {
        return Err(format!(
            "after the change: got {last}, stdout {out:?}, stderr {err:?}"
        ));
    }
    let got = request(sock, "GET", "/egress/policy", None);
    expect_status(&got, 200, "GET /egress/policy")?;
    if got.json()["rules"][0]["id"] != "web" {
        return Err(format!("GET /egress/policy: {}", got.body));
    }
    Ok("egress: refused under the boot policy, fetched after PUT /egress/policy".into())
}

/// A watch streams the creation of a file that an exec makes.
pub fn watch_sees_exec(sock: &Path, prefix: &str) -> Check {
    exec_ok(sock, prefix, "mkdir -p /tmp/watched")?;
    let mut events = stream_lines(
        sock,
        &format!("{prefix}/watch?path=/tmp/watched&recursive=true"),
    )
    .map_err(|answer| format!("GET /sandbox/watch: {answer:?}"))?;
    exec_ok(sock, prefix, "echo x > /tmp/watched/new-file")?;
    let mut seen = Vec::new();
    loop {
        let line = events
            .next_line()
            .ok_or_else(|| format!("the watch stream ended after {seen:?}"))?;
        let event: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("watch line {line:?}: {e}"))?;
        if event.get("error").is_some() {
            return Err(format!("watch: {event}"));
        }
        if event["type"] == "created" && event["path"] == "/tmp/watched/new-file" {
            return Ok(format!("watch saw {event}"));
        }
        seen.push(event);
    }
}

/// A terminal session runs `sh`: a command's output comes back, a resize shows in `stty size`,
/// `exit 7` ends the stream and the status says 7.
pub fn pty_session(sock: &Path, prefix: &str) -> Check {
    let body = r#"{"cmd": ["sh"], "cols": 80, "rows": 24}"#;
    let (head, mut terminal) = match upgrade(
        sock,
        "POST",
        &format!("{prefix}/pty"),
        "agentvm-pty",
        Some(body),
    ) {
        Upgrade::Switched { head, stream } => (head, stream),
        Upgrade::Refused(answer) => return Err(format!("POST /sandbox/pty: {answer:?}")),
    };
    let id = header(&head, "x-agentvm-pty-id")
        .ok_or_else(|| format!("no X-Agentvm-Pty-Id in {head:?}"))?;
    let send = |terminal: &mut UnixStream, text: &str| {
        terminal
            .write_all(text.as_bytes())
            .map_err(|e| format!("terminal input {text:?}: {e}"))
    };
    // The terminal echoes the typed line; only the shell's expansion prints A-42-A.
    send(&mut terminal, "echo A-$((6*7))-A\n")?;
    read_until(&mut terminal, "A-42-A").map_err(|e| {
        let status = request(sock, "GET", &format!("{prefix}/pty/{id}"), None);
        format!("{e}; session {id}: {}", status.body)
    })?;
    let resize = request(
        sock,
        "POST",
        &format!("{prefix}/pty/{id}/resize"),
        Some(r#"{"cols": 100, "rows": 40}"#),
    );
    expect_status(&resize, 204, "POST /sandbox/pty/{id}/resize")?;
    send(&mut terminal, "echo S-$(stty size)-S\n")?;
    read_until(&mut terminal, "S-40 100-S")?;
    let running = request(sock, "GET", &format!("{prefix}/pty/{id}"), None);
    expect_status(&running, 200, "GET /sandbox/pty/{id}")?;
    if running.json()["running"] != true {
        return Err(format!("session {id} while running: {}", running.body));
    }
    send(&mut terminal, "exit 7\n")?;
    let mut rest = Vec::new();
    terminal
        .read_to_end(&mut rest)
        .map_err(|e| format!("the terminal stream did not end after exit: {e}"))?;
    let ended = request(sock, "GET", &format!("{prefix}/pty/{id}"), None);
    let status = ended.json();
    if status["running"] != false || status["exit_code"] != 7 {
        return Err(format!("session {id} after exit 7: {}", ended.body));
    }
    let late = request(
        sock,
        "POST",
        &format!("{prefix}/pty/{id}/resize"),
        Some(r#"{"cols": 100, "rows": 40}"#),
    );
    expect_status(&late, 409, "resize after the end")?;
    let hung_up = hang_up(sock, prefix)?;
    Ok(format!(
        "pty {id}: echo, resize to 40x100, exit 7; closing the input: {hung_up}"
    ))
}

/// Closing the client's write half hangs up the terminal: the stream ends and the session with it.
fn hang_up(sock: &Path, prefix: &str) -> Check {
    let (head, mut terminal) = match upgrade(
        sock,
        "POST",
        &format!("{prefix}/pty"),
        "agentvm-pty",
        Some(r#"{"cmd": ["sh"]}"#),
    ) {
        Upgrade::Switched { head, stream } => (head, stream),
        Upgrade::Refused(answer) => return Err(format!("POST /sandbox/pty: {answer:?}")),
    };
    let id = header(&head, "x-agentvm-pty-id")
        .ok_or_else(|| format!("no X-Agentvm-Pty-Id in {head:?}"))?;
    terminal
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut rest = Vec::new();
    terminal
        .read_to_end(&mut rest)
        .map_err(|e| format!("the terminal stream did not end after the hang-up: {e}"))?;
    let ended = request(sock, "GET", &format!("{prefix}/pty/{id}"), None);
    if ended.json()["running"] != false {
        return Err(format!("session {id} after the hang-up: {}", ended.body));
    }
    Ok(ended.body)
}

/// A tunnel reaches an HTTP server started in the guest; a closed port is a 502.
pub fn port_tunnel(sock: &Path, prefix: &str) -> Check {
    // busybox httpd without -f backgrounds itself once it listens.
    exec_ok(
        sock,
        prefix,
        "mkdir -p /www-api && echo hello-port > /www-api/index.html && httpd -p 8100 -h /www-api",
    )?;
    let mut tunnel = match upgrade(
        sock,
        "POST",
        &format!("{prefix}/ports/8100/connect"),
        "agentvm-tcp",
        None,
    ) {
        Upgrade::Switched { stream, .. } => stream,
        Upgrade::Refused(answer) => {
            return Err(format!("POST /sandbox/ports/8100/connect: {answer:?}"))
        }
    };
    tunnel
        .write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
        .map_err(|e| format!("tunnel write: {e}"))?;
    let mut reply = String::new();
    tunnel
        .read_to_string(&mut reply)
        .map_err(|e| format!("tunnel read (so far {reply:?}): {e}"))?;
    if !reply.contains("hello-port") {
        return Err(format!("through the tunnel: {reply:?}"));
    }
    let closed = match upgrade(
        sock,
        "POST",
        &format!("{prefix}/ports/8101/connect"),
        "agentvm-tcp",
        None,
    ) {
        Upgrade::Refused(answer) => answer,
        Upgrade::Switched { .. } => return Err("port 8101 (nothing listens) was tunnelled".into()),
    };
    expect_status(&closed, 502, "a closed guest port")?;
    Ok(format!(
        "tunnel: {}; closed port: {}",
        reply.lines().next().unwrap_or(""),
        closed.fault()
    ))
}

/// Runs `sh -c script` through `/sandbox/exec`; it must exit 0.
pub fn exec_ok(sock: &Path, prefix: &str, script: &str) -> Result<(), String> {
    let body = serde_json::json!({"cmd": ["sh", "-c", script]}).to_string();
    let (stdout, stderr, last) = exec_events(&request(
        sock,
        "POST",
        &format!("{prefix}/exec"),
        Some(&body),
    ))?;
    if last != serde_json::json!({"exit_code": 0, "timed_out": false}) {
        return Err(format!(
            "{script:?}: {last}, stdout {stdout:?}, stderr {stderr:?}"
        ));
    }
    Ok(())
}

/// Reads the terminal until its output contains `needle` (the stream's read timeout is the
/// hang detector).
fn read_until(terminal: &mut UnixStream, needle: &str) -> Result<(), String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        match terminal.read(&mut buf) {
            Ok(0) => {
                return Err(format!(
                    "the terminal ended before {needle:?}: {:?}",
                    String::from_utf8_lossy(&seen)
                ))
            }
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) => {
                return Err(format!(
                    "no {needle:?} on the terminal ({e}): {:?}",
                    String::from_utf8_lossy(&seen)
                ))
            }
        }
    }
    Ok(())
}

/// The two execs' audit lines: argv, exit code, duration and output sizes, and no stdin or
/// output content (here both are "piped").
fn check_audit_log(path: &Path) -> Check {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if text.contains("piped") {
        return Err(format!(
            "the audit log holds stdin or output content:\n{text}"
        ));
    }
    let records = text
        .lines()
        .map(|line| serde_json::from_str(line).map_err(|e| format!("audit line {line:?}: {e}")))
        .collect::<Result<Vec<serde_json::Value>, String>>()?;
    let find = |argv: serde_json::Value| {
        records
            .iter()
            .find(|r| r["argv"] == argv && r["outcome"] != "error")
            .ok_or_else(|| format!("no audit line for {argv} in:\n{text}"))
    };
    let first = find(serde_json::json!([
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3"
    ]))?;
    let piped = find(serde_json::json!(["cat"]))?;
    let expect = |record: &serde_json::Value, key: &str, want: serde_json::Value| {
        if record[key] == want {
            Ok(())
        } else {
            Err(format!("audit {key}: want {want}, got {record}"))
        }
    };
    expect(first, "sandbox_id", "e2e-api".into())?;
    expect(first, "outcome", "exited_nonzero".into())?;
    expect(first, "exit_code", 3.into())?;
    expect(first, "stdout_bytes", 4.into())?;
    expect(first, "stderr_bytes", 4.into())?;
    expect(piped, "outcome", "exited_zero".into())?;
    expect(piped, "exit_code", 0.into())?;
    expect(piped, "stdin_bytes", 5.into())?;
    for record in [first, piped] {
        if record["duration_ms"].as_u64().is_none()
            || !record["time"].as_str().is_some_and(|t| t.ends_with('Z'))
            || record["peer"]["pid"].as_u64().is_none()
        {
            return Err(format!(
                "audit line without duration, time or peer: {record}"
            ));
        }
    }
    Ok(format!("{} audit lines", records.len()))
}

/// `GET /metrics` after the execs: outcomes, latency histogram, vsock traffic, first exec time.
fn check_metrics(sock: &Path) -> Check {
    let answer = request(sock, "GET", "/metrics", None);
    expect_status(&answer, 200, "GET /metrics")?;
    let metrics = prometheus::parse(&answer.body)
        .map_err(|e| format!("GET /metrics: {e}\n{}", answer.body))?;
    let value = |name: &str, labels: &[(&str, &str)]| {
        metrics
            .value(name, labels)
            .ok_or_else(|| format!("no {name}{labels:?} in:\n{}", answer.body))
    };
    let zero = value("agentvm_exec_total", &[("outcome", "exited_zero")])?;
    let nonzero = value("agentvm_exec_total", &[("outcome", "exited_nonzero")])?;
    let count = value("agentvm_exec_duration_seconds_count", &[])?;
    let to_guest = value(
        "agentvm_device_bytes_total",
        &[("device", "vsock"), ("direction", "rx")],
    )?;
    let from_guest = value(
        "agentvm_device_bytes_total",
        &[("device", "vsock"), ("direction", "tx")],
    )?;
    let first_exec = value("agentvm_start_to_first_exec_seconds", &[])?;
    if zero < 1.0 || nonzero < 1.0 || count < 2.0 || to_guest <= 0.0 || from_guest <= 0.0 {
        return Err(format!("exec or vsock counters too low:\n{}", answer.body));
    }
    Ok(format!(
        "metrics: {count} execs, vsock {to_guest} bytes in / {from_guest} out, first exec \
         result {first_exec:.3} s after start"
    ))
}

fn until_agent_up(sock: &Path, call: impl Fn() -> ApiResponse) -> Result<ApiResponse, String> {
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

pub fn expect_status(answer: &ApiResponse, status: u16, what: &str) -> Result<(), String> {
    if answer.status == status {
        Ok(())
    } else {
        Err(format!("{what}: want {status}, got {answer:?}"))
    }
}

/// The decoded stdout and stderr of a `/sandbox/exec` answer, and its last line.
pub fn exec_events(answer: &ApiResponse) -> Result<(String, String, serde_json::Value), String> {
    expect_status(answer, 200, "POST /sandbox/exec")?;
    let (mut stdout, mut stderr, mut last) = (Vec::new(), Vec::new(), serde_json::Value::Null);
    for line in answer.body.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("line {line:?}: {e}"))?;
        let decode = |v: &serde_json::Value| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap_or_default())
                .map_err(|e| format!("line {line:?}: {e}"))
        };
        if let Some(data) = event.get("stdout") {
            stdout.extend(decode(data)?);
        } else if let Some(data) = event.get("stderr") {
            stderr.extend(decode(data)?);
        } else {
            last = event;
        }
    }
    Ok((
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
        last,
    ))
}
