//! The one owner of `waitpid`. The agent is PID 1 in the guest and inherits every orphan, and many
//! requests spawn at once, so a single thread reaps every child and hands each status to whoever
//! registered that pid; orphans are just reaped.
//!
//! Never call `std::process::Child::wait`/`try_wait` elsewhere: it would race this thread. One
//! `Reaper` per process (it lives in [`Services`](super::Services)).
//!
//! std's `Command::spawn` itself waits for a child whose exec failed. To keep that from racing,
//! the reaper first waits with `WNOWAIT` (the child stays waitable), then takes the registry lock,
//! which every spawn holds from fork to registration, and only then reaps: a failed spawn has
//! reaped its own child by the time the reaper gets the lock, and a successful one has
//! registered its pid.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use agentvm_protocol::ExitStatus;

type ExitHandler = Box<dyn FnOnce(ExitStatus) + Send>;

pub struct Reaper {
    state: Mutex<ReaperState>,
    spawned: Condvar,
}

#[derive(Default)]
struct ReaperState {
    waiting: HashMap<u32, ExitHandler>,
    /// Counts spawns, so the thread sleeping on "no children" knows when one appeared.
    spawns: u64,
}

impl Reaper {
    /// Starts the reaper thread.
    pub fn start() -> io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper {
            state: Mutex::new(ReaperState::default()),
            spawned: Condvar::new(),
        });
        let thread_reaper = Arc::clone(&reaper);
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || thread_reaper.run())?;
        Ok(reaper)
    }

    fn lock(&self) -> MutexGuard<'_, ReaperState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `command` and calls `on_exit` (on the reaper thread: it must not block) with its
    /// exit status.
    pub fn spawn_with(
        &self,
        command: &mut Command,
        on_exit: impl FnOnce(ExitStatus) + Send + 'static,
    ) -> io::Result<Child> {
        let mut state = self.lock();
        let child = command.spawn()?;
        state.waiting.insert(child.id(), Box::new(on_exit));
        state.spawns += 1;
        self.spawned.notify_all();
        Ok(child)
    }

    /// Spawns `command`; its exit status arrives on the receiver.
    pub fn spawn(&self, command: &mut Command) -> io::Result<(Child, Receiver<ExitStatus>)> {
        let (tx, rx) = mpsc::channel();
        let child = self.spawn_with(command, move |status| {
            let _ = tx.send(status);
        })?;
        Ok((child, rx))
    }

    fn run(&self) {
        loop {
            let spawns_before = self.lock().spawns;
            match wait_any_nowait() {
                Ok(pid) => self.reap(pid),
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                    let state = self.lock();
                    // Sleep until the next spawn; the timeout is only a safety net.
                    let _ = self
                        .spawned
                        .wait_timeout_while(state, Duration::from_secs(10), |s| {
                            s.spawns == spawns_before
                        });
                }
                Err(e) => {
                    eprintln!("agentvm-guest-agent: waitid failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn reap(&self, pid: u32) {
        let mut state = self.lock();
        let mut raw_status = 0;
        // SAFETY: waitpid writes the status into the integer it is given.
        let reaped = unsafe { libc::waitpid(pid as libc::pid_t, &mut raw_status, libc::WNOHANG) };
        if reaped != pid as libc::pid_t {
            // A failed spawn reaped its own child while we waited for the lock.
            return;
        }
        let handler = state.waiting.remove(&pid);
        drop(state);
        if let (Some(handler), Some(status)) = (handler, decode_status(raw_status)) {
            handler(status);
        }
    }
}

/// Blocks until some child is waitable and returns its pid, leaving it unreaped.
fn wait_any_nowait() -> io::Result<u32> {
    loop {
        // SAFETY: siginfo_t is plain data; waitid fills it in.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes into the siginfo it is given.
        let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: after a successful waitid with WEXITED the pid field is set.
        let pid = unsafe { info.si_pid() };
        if pid > 0 {
            return Ok(pid as u32);
        }
    }
}

fn decode_status(status: libc::c_int) -> Option<ExitStatus> {
    if libc::WIFEXITED(status) {
        Some(ExitStatus::Code(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(ExitStatus::Signal(libc::WTERMSIG(status)))
    } else {
        None
    }
}
