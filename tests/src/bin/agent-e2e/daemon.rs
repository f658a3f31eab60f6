//! `agentvm daemon` with a real Linux guest: a jailed sandbox created from a template, exec,
//! files, watch, a PTY session and a port tunnel forwarded to its agent (upgraded connections
//! spliced through the daemon), the daemon killed and restarted (the sandbox adopted and still
//! usable), hibernated and restored by its next exec, then destroyed with nothing left running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::api::{request, request_bytes, ApiResponse};
use vmm::config::LINUX_BASE_CMDLINE;

use crate::api::{exec_events, expect_status, port_tunnel, pty_session, watch_sees_exec};
use crate::{timed, Args};

type Check = Result<String, String>;

/// `agentvm daemon`, killed when dropped (its sandboxes are destroyed by the check itself).
struct Daemon {
    child: Option<Child>,
    sock: PathBuf,
    state: PathBuf,
    agentvm: PathBuf,
}

impl Daemon {
    fn start(&mut self) -> Result<(), String> {
        let child = Command::new(&self.agentvm)
            .arg("daemon")
            .arg("--sock")
            .arg(&self.sock)
            .arg("--state-dir")
            .arg(&self.state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the daemon: {e}"))?;
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&self.sock).is_err() {
            if Instant::now() > until {
                return Err("the daemon did not answer on its socket".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> ApiResponse {
        request(&self.sock, method, path, body)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn checks(args: &Args) {
    timed("daemon", || daemon(args));
}

/// PIDs of `agentvm serve` processes (the sandboxes' VMMs).
fn serve_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|b| *b == 0).any(|arg| arg == b"serve"))
                .unwrap_or(false)
        })
        .collect()
}

fn exec(d: &Daemon, body: &str) -> Result<(String, String, serde_json::Value), String> {
    exec_events(&d.call("POST", "/sandboxes/e2e/exec", Some(body)))
}

fn daemon(args: &Args) -> Check {
    let dir = args.work_dir.join("daemon");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut d = Daemon {
        child: None,
        sock: dir.join("d.sock"),
        state: dir.join("s"),
        agentvm: args.agentvm.clone(),
    };
    d.start()?;
    let template = serde_json::json!({
        "kernel_image_path": args.kernel,
        "initrd_path": args.initrd,
        "boot_args": format!("{LINUX_BASE_CMDLINE} quiet"),
        "mem_size_mib": 256,
    });
    expect_status(
        &d.call("PUT", "/templates/linux", Some(&template.to_string())),
        204,
        "PUT /templates/linux",
    )?;
    let started = Instant::now();
    let created = d.call(
        "POST",
        "/sandboxes",
        Some(r#"{"template": "linux", "id": "e2e", "timeout_s": 300}"#),
    );
    expect_status(&created, 201, "POST /sandboxes")?;
    let boot = started.elapsed();
    let info = created.json();
    if info["state"] != "running" || info["jailed"] != true {
        return Err(format!("created sandbox: {info}"));
    }

    let (out, err, last) = exec(
        &d,
        r#"{"cmd": ["sh", "-c", "echo hi; echo oops >&2; exit 4"]}"#,
    )?;
    if (out.as_str(), err.as_str()) != ("hi\n", "oops\n") || last["exit_code"] != 4 {
        return Err(format!("exec: stdout {out:?}, stderr {err:?}, last {last}"));
    }
    let put = request_bytes(
        &d.sock,
        "PUT",
        "/sandboxes/e2e/files?path=/tmp/daemon-file",
        "application/octet-stream",
        b"through the daemon",
    );
    expect_status(&put, 204, "PUT files")?;
    let got = d.call("GET", "/sandboxes/e2e/files?path=/tmp/daemon-file", None);
    expect_status(&got, 200, "GET files")?;
    if got.body != "through the daemon" {
        return Err(format!("GET files: {:?}", got.body));
    }

    // The streaming routes, upgrades spliced through the daemon.
    let prefix = "/sandboxes/e2e";
    let watched = watch_sees_exec(&d.sock, prefix)?;
    let terminal = pty_session(&d.sock, prefix)?;
    let tunnel = port_tunnel(&d.sock, prefix)?;

    // The daemon dies and comes back: the sandbox is adopted and still answers.
    let vmms_before = serve_pids();
    d.kill();
    d.start()?;
    let adopted = d.call("GET", "/sandboxes/e2e", None);
    expect_status(&adopted, 200, "GET after restart")?;
    if adopted.json()["state"] != "running" {
        return Err(format!("after a daemon restart: {}", adopted.body));
    }
    let (out, _, last) = exec(&d, r#"{"cmd": ["cat", "/tmp/daemon-file"]}"#)?;
    if out != "through the daemon" || last["exit_code"] != 0 {
        return Err(format!("exec after restart: {out:?}, {last}"));
    }
    if serve_pids() != vmms_before {
        return Err(format!(
            "the VMMs changed across the restart: {vmms_before:?} -> {:?}",
            serve_pids()
        ));
    }
    let hibernation = hibernate_and_exec(&d)?;

    expect_status(&d.call("DELETE", "/sandboxes/e2e", None), 204, "DELETE")?;
    expect_status(
        &d.call("GET", "/sandboxes/e2e", None),
        404,
        "GET after DELETE",
    )?;
    let until = Instant::now() + Duration::from_secs(10);
    while !serve_pids().is_empty() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !serve_pids().is_empty() {
        return Err(format!("VMMs left after DELETE: {:?}", serve_pids()));
    }
    let jails = d.state.join("jail/agentvm");
    if jails.join("e2e").exists() || d.state.join("sandboxes/e2e").exists() {
        return Err("the sandbox's files were left behind".into());
    }
    // SIGTERM ends the daemon cleanly and removes its socket.
    if let Some(child) = d.child.take() {
        let pid = child.id() as i32;
        // SAFETY: kill(2) with integers only, on the daemon this check started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = wait_with_timeout(child, Duration::from_secs(10))?;
        if !status.success() || Path::new(&d.sock).exists() {
            return Err(format!(
                "daemon after SIGTERM: {status:?}, socket left: {}",
                d.sock.exists()
            ));
        }
    }
    Ok(format!(
        "jailed sandbox up with its agent in {:.1} s; exec, files; {watched}; {terminal}; \
         {tunnel}; restart adoption; {hibernation}; destroy",
        boot.as_secs_f64()
    ))
}

/// Hibernation: the sandbox's VMM ends; the next exec restores it in a new VMM and sees the
/// file written before.
fn hibernate_and_exec(d: &Daemon) -> Check {
    let started = Instant::now();
    let hibernated = d.call("POST", "/sandboxes/e2e/hibernate", None);
    expect_status(&hibernated, 200, "POST /sandboxes/e2e/hibernate")?;
    let hibernate_secs = started.elapsed().as_secs_f64();
    if hibernated.json()["state"] != "hibernated" || !serve_pids().is_empty() {
        return Err(format!(
            "hibernated: {}, VMMs still running: {:?}",
            hibernated.body,
            serve_pids()
        ));
    }
    let snapshot = d.state.join("sandboxes/e2e/snapshot");
    if !snapshot.join("state").is_file() || !snapshot.join("mem").is_file() {
        return Err(format!("no snapshot in {}", snapshot.display()));
    }
    let started = Instant::now();
    let (out, _, last) = exec(d, r#"{"cmd": ["cat", "/tmp/daemon-file"]}"#)?;
    let restore_secs = started.elapsed().as_secs_f64();
    if out != "through the daemon" || last["exit_code"] != 0 {
        return Err(format!("exec after hibernation: {out:?}, {last}"));
    }
    let resumed = d.call("GET", "/sandboxes/e2e", None);
    if resumed.json()["state"] != "running" || serve_pids().is_empty() {
        return Err(format!(
            "after the restoring exec: {}, VMMs {:?}",
            resumed.body,
            serve_pids()
        ));
    }
    Ok(format!(
        "hibernated in {hibernate_secs:.1} s, the next exec restored it and answered in \
         {restore_secs:.1} s"
    ))
}

fn wait_with_timeout(
    mut child: Child,
    timeout: Duration,
) -> Result<std::process::ExitStatus, String> {
    let until = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(status);
        }
        if Instant::now() > until {
            let _ = child.kill();
            return Err("the daemon did not end after SIGTERM".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
