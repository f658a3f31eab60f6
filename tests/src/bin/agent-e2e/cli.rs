//! The `agentvm run` CLI over vsock: exit status and stream separation, `-i`, `--publish`, `-it`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::agentvm::VmProcess;

use crate::{timed, Args};

type Check = Result<String, String>;

/// `agentvm run` with the test guest; its console goes to `<work>/cli-<name>.console`.
fn run_cmd(args: &Args, name: &str) -> Command {
    let mut cmd = Command::new(&args.agentvm);
    cmd.arg("run")
        .arg("--kernel")
        .arg(&args.kernel)
        .arg("--initrd")
        .arg(&args.initrd)
        .arg("--console")
        .arg(args.work_dir.join(format!("cli-{name}.console")))
        .args(["--vcpus", &crate::GUEST_VCPUS.to_string()])
        .args(["--mem-mib", "256"]);
    cmd
}

/// Kills the child when dropped (a check that fails half-way leaves no VM behind).
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_with_deadline(
    child: &mut Child,
    limit: Duration,
) -> Result<std::process::ExitStatus, String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let what = format!("agentvm run still running after {limit:?}");
            crate::watchdog::describe_stall(&what);
            return Err(what);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn checks(args: &Args) {
    timed("cli_exit_status", || exit_status(args));
    timed("cli_stdin", || stdin(args));
    timed("cli_publish", || publish(args));
    timed("cli_tty", || tty(args));
}

fn exit_status(args: &Args) -> Check {
    let mut cmd = run_cmd(args, "exit-status");
    cmd.args(["--", "sh", "-c", "echo out; echo err >&2; exit 5"]);
    // A hang detector, not a performance limit: the VM is killed if it never ends.
    let out = VmProcess::spawn(cmd)
        .and_then(|vm| vm.wait(Duration::from_secs(300)))
        .map_err(|e| format!("agentvm run: {e}"))?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    if out.status.code() != Some(5) || stdout != "out\n" || !stderr.ends_with("err\n") {
        return Err(format!(
            "status {:?}, stdout {stdout:?}, stderr {stderr:?}",
            out.status
        ));
    }
    Ok("stdout \"out\", stderr \"err\", exit 5".into())
}

fn stdin(args: &Args) -> Check {
    let mut child = Reap(
        run_cmd(args, "stdin")
            .args(["-i", "--", "sh", "-c", "wc -c; echo done >&2"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // Not piped: nobody would read it, and it carries agentvm's own log.
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("agentvm run -i: {e}"))?,
    );
    let mut input = child.0.stdin.take().ok_or("no stdin pipe")?;
    let writer = std::thread::spawn(move || input.write_all(&vec![b'x'; 100_000]));
    let mut stdout = String::new();
    child
        .0
        .stdout
        .take()
        .ok_or("no stdout pipe")?
        .read_to_string(&mut stdout)
        .map_err(|e| e.to_string())?;
    let status = wait_with_deadline(&mut child.0, Duration::from_secs(300))?;
    let _ = writer.join();
    if stdout.trim() != "100000" || !status.success() {
        return Err(format!("status {status:?}, stdout {stdout:?}"));
    }
    Ok("100000 bytes of stdin counted by the guest".into())
}

fn publish(args: &Args) -> Check {
    const HOST: &str = "127.0.0.1:18080";
    let mut child = Reap(
        run_cmd(args, "publish")
            .args(["--publish", &format!("{HOST}:8000"), "--"])
            .args(["httpd", "-f", "-p", "8000", "-h", "/etc"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("agentvm run --publish: {e}"))?,
    );
    let deadline = Instant::now() + Duration::from_secs(240);
    let page = loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect(HOST)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(b"GET /passwd HTTP/1.0\r\n\r\n")?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            Ok(reply)
        })();
        match attempt {
            Ok(reply) if reply.contains("root:") => break reply,
            other => {
                if Instant::now() > deadline {
                    return Err(format!("no page on {HOST}: {other:?}"));
                }
                if let Ok(Some(status)) = child.0.try_wait() {
                    return Err(format!("agentvm run exited early: {status:?}"));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    // SAFETY: kill() takes no pointers; the pid is our own child's.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = wait_with_deadline(&mut child.0, Duration::from_secs(60))?;
    if TcpStream::connect(HOST).is_ok() {
        return Err(format!("{HOST} still accepts after agentvm exited"));
    }
    Ok(format!(
        "{} from guest httpd via {HOST}; agentvm ended with {status:?} on SIGTERM",
        page.lines().next().unwrap_or("")
    ))
}

fn set_winsize(fd: &OwnedFd, rows: u16, cols: u16) -> Result<(), String> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, on a valid terminal fd.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) } != 0 {
        return Err(format!("TIOCSWINSZ: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A pseudo-terminal pair: (master, slave).
fn open_pty() -> Result<(OwnedFd, OwnedFd), String> {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors into the ints; the name/termios/winsize pointers
    // may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!("openpty: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: openpty succeeded; both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) })
}

fn read_until(
    master: &mut File,
    seen: &mut String,
    needle: &str,
    deadline: Instant,
) -> Result<(), String> {
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        if Instant::now() > deadline {
            return Err(format!("no {needle:?} in terminal output {seen:?}"));
        }
        let mut pfd = libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 1000) } <= 0 {
            continue;
        }
        match master.read(&mut buf) {
            Ok(0) | Err(_) => {
                return Err(format!(
                    "terminal closed before {needle:?}; output {seen:?}"
                ))
            }
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    Ok(())
}

/// `agentvm run -it` on a terminal: raw mode, the size at start, a resize (SIGWINCH to agentvm)
/// forwarded to the guest, and the exit status.
fn tty(args: &Args) -> Check {
    let (master, slave) = open_pty()?;
    set_winsize(&master, 30, 90)?;
    let slave_raw = slave.as_raw_fd();
    let mut cmd = run_cmd(args, "tty");
    cmd.args(["-it", "--", "sh"]);
    let dup = |fd: &OwnedFd| -> Result<Stdio, String> {
        Ok(Stdio::from(fd.try_clone().map_err(|e| e.to_string())?))
    };
    cmd.stdin(dup(&slave)?)
        .stdout(dup(&slave)?)
        .stderr(dup(&slave)?);
    // SAFETY: between fork and exec only async-signal-safe calls: setsid and ioctl.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::ioctl(slave_raw, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Reap(cmd.spawn().map_err(|e| format!("agentvm run -it: {e}"))?);
    drop(slave);
    let mut master = File::from(master);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut seen = String::new();
    // Typed before the guest is up: the bytes wait in the terminal until agentvm reads them.
    master
        .write_all(b"echo T-$(tty)-T S-$(stty size)-S\r")
        .map_err(|e| e.to_string())?;
    read_until(&mut master, &mut seen, "S-30 90-S", deadline)?;
    let master_fd: OwnedFd = master.try_clone().map_err(|e| e.to_string())?.into();
    set_winsize(&master_fd, 33, 111)?;
    // The resize reaches the guest asynchronously; ask until the new size shows.
    let mut asked = 0;
    while !seen.contains("S2-33 111-S2") {
        if asked > 20 || Instant::now() > deadline {
            return Err(format!("resize never reached the guest: {seen:?}"));
        }
        master
            .write_all(b"echo S2-$(stty size)-S2\r")
            .map_err(|e| e.to_string())?;
        asked += 1;
        let _ = read_until(
            &mut master,
            &mut seen,
            "S2-33 111-S2",
            Instant::now() + Duration::from_secs(5),
        );
    }
    master.write_all(b"exit 3\r").map_err(|e| e.to_string())?;
    let status = wait_with_deadline(&mut child.0, Duration::from_secs(120))?;
    if status.code() != Some(3) {
        return Err(format!("exit status {status:?}; output {seen:?}"));
    }
    if !seen.contains("T-/dev/pts/") {
        return Err(format!("tty is not a /dev/pts terminal: {seen:?}"));
    }
    Ok("guest tty /dev/pts, size 30x90 then 33x111 after a host resize, exit 3".into())
}
