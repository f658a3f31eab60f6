//! The per-VM API's agent extensions with a real guest: `agentvm serve --config-file` boots a
//! guest with a vsock device, and `/sandbox/exec` and `/sandbox/files` go through its agent;
//! the execs show in the exec audit log (`--audit-log`) and in `GET /metrics`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use integration_tests::api::{request, request_bytes, wait_for_path, ApiResponse};
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

pub fn checks(args: &Args) {
    timed("api_sandbox", || api_sandbox(args));
}

fn api_sandbox(args: &Args) -> Check {
    let dir = args.work_dir.join("api");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let sock = dir.join("api.sock");
    let config = dir.join("vm.json");
    let vm = serde_json::json!({
        "boot-source": {"kernel_image_path": args.kernel, "initrd_path": args.initrd},
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
        "vsock": {"guest_cid": 3, "uds_path": dir.join("v.sock")},
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
    if !wait_for_path(&sock, Duration::from_secs(30)) {
        return Err("the API socket did not appear".into());
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
    Ok(format!(
        "exec streamed out/err/exit 3, file round trip and list ok; missing file: {}; {audited}; \
         {metrics}",
        missing.fault()
    ))
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

fn expect_status(answer: &ApiResponse, status: u16, what: &str) -> Result<(), String> {
    if answer.status == status {
        Ok(())
    } else {
        Err(format!("{what}: want {status}, got {answer:?}"))
    }
}

/// The decoded stdout and stderr of a `/sandbox/exec` answer, and its last line.
fn exec_events(answer: &ApiResponse) -> Result<(String, String, serde_json::Value), String> {
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
