//! A check that never ends would hold the whole scenario until its time limit and take every
//! later check with it. The watchdog gives each check [`CHECK_LIMIT`]; past it, it describes
//! every `agentvm` process (threads, their kernel wait points and syscalls), asks each for its
//! state dump (SIGUSR1: ring positions, interrupt status, vsock credit), shows the tails of the
//! guest consoles the check wrote, and then kills those processes so the check fails with what
//! it saw and the others still run. A check that fails in time gets the same description
//! (its processes are left alone): its own timeouts are often what ends a stall.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crate::progress;

/// A hang detector, not a performance limit: the slowest check takes under a minute in the
/// nested test host.
pub const CHECK_LIMIT: Duration = Duration::from_secs(300);
/// Time the processes get to write their state dumps before they are killed.
const DUMP_WAIT: Duration = Duration::from_secs(3);

pub struct Watchdog {
    done: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    work_dir: PathBuf,
    started: SystemTime,
}

impl Watchdog {
    /// Starts watching check `name`, whose guests write their consoles into `work_dir`, for
    /// `limit` ([`CHECK_LIMIT`] but for checks that run longer by design: the soak).
    pub fn start_with_limit(name: &str, work_dir: &Path, limit: Duration) -> Watchdog {
        let (done, finished) = channel::<()>();
        let (name, work_dir) = (name.to_string(), work_dir.to_path_buf());
        let started = SystemTime::now();
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Some((work_dir.clone(), started));
        let thread = {
            let work_dir = work_dir.clone();
            std::thread::spawn(move || {
                if let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(limit) {
                    progress(format_args!(
                        "WATCHDOG: {name} still running after {limit:?}; diagnosing"
                    ));
                    let killed = diagnose(&work_dir, started, true);
                    progress(format_args!(
                        "WATCHDOG: {name}: described and killed agentvm process(es) {killed:?}; \
                         details on the driver's stderr"
                    ));
                }
            })
        };
        Watchdog {
            done: Some(done),
            thread: Some(thread),
            work_dir,
            started,
        }
    }

    /// Ends the watch; for a failed check, describes the processes it left running (often none:
    /// checks kill their VMs as they fail, so a check that sees a stall calls
    /// [`describe_stall`] first).
    pub fn finish(mut self, failed: bool) {
        self.stop();
        if failed {
            eprintln!("agent-e2e: the check failed; the agentvm processes still running:");
            diagnose(&self.work_dir, self.started, false);
        }
    }

    fn stop(&mut self) {
        CURRENT.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where the running check's guests write their consoles and when it started.
static CURRENT: std::sync::Mutex<Option<(PathBuf, SystemTime)>> = std::sync::Mutex::new(None);

/// Describes the agentvm processes now (they are left running), for a check that found one
/// stalled (`what`) before it kills it.
pub fn describe_stall(what: &str) {
    let current = CURRENT.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let Some((work_dir, started)) = current else {
        return;
    };
    eprintln!("agent-e2e: stalled: {what}; the agentvm processes:");
    diagnose(&work_dir, started, false);
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Describes every agentvm process and the consoles written since `started` on stderr; kills
/// the processes when `kill`. Returns their pids.
fn diagnose(work_dir: &Path, started: SystemTime, kill: bool) -> Vec<i32> {
    let pids = agentvm_pids();
    for &pid in &pids {
        eprintln!("{}", describe_process(pid));
    }
    for &pid in pids.iter().filter(|&&pid| catches_sigusr1(pid)) {
        // SAFETY: kill() takes no pointers.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
    }
    std::thread::sleep(DUMP_WAIT);
    for console in consoles_since(work_dir, started) {
        eprintln!(
            "--- {} (last 25 lines) ---\n{}",
            console.display(),
            tail(&std::fs::read_to_string(&console).unwrap_or_default(), 25)
        );
    }
    if kill {
        for &pid in &pids {
            // SAFETY: kill() takes no pointers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    pids
}

fn agentvm_pids() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .and_then(|exe| exe.file_name().map(|n| n == "agentvm"))
                .unwrap_or(false)
        })
        .collect();
    pids.sort();
    pids
}

/// Whether `pid` handles SIGUSR1 (a VM process; the daemon, or a VMM still starting, would be
/// ended by it).
fn catches_sigusr1(pid: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGUSR1 - 1)) != 0)
}

fn read(path: String) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(|e| format!("({e})"))
}

/// Each thread: name, state, kernel wait point, current syscall and kernel stack.
fn describe_process(pid: i32) -> String {
    let cmdline = read(format!("/proc/{pid}/cmdline")).replace('\0', " ");
    let mut out = format!("=== agentvm pid {pid}: {cmdline}");
    let mut tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    tids.sort();
    for tid in tids {
        let task = format!("/proc/{pid}/task/{tid}");
        let stat = read(format!("{task}/stat"));
        // The state is the first field after the parenthesised name.
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').next())
            .unwrap_or("?");
        out.push_str(&format!(
            "\n--- thread {tid} {:?} state {state} wchan {} syscall {}\n{}",
            read(format!("{task}/comm")),
            read(format!("{task}/wchan")),
            read(format!("{task}/syscall")),
            read(format!("{task}/stack"))
        ));
    }
    out
}

fn consoles_since(dir: &Path, since: SystemTime) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                dirs.push(path);
            } else if path.to_string_lossy().ends_with("console")
                && meta.modified().is_ok_and(|m| m >= since)
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
