//! Background processes (`ProcStart`, `ProcList`, `ProcWait`, `ProcKill`, `ProcLogs`): started by
//! one connection, they outlive it; any later connection can list, wait for, signal them and read
//! their output, kept in a bounded log per stream. The table lives in
//! [`Services`](super::Services).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentvm_protocol::{
    Command, Done, ErrorCode, ExitStatus, Exited, LogsStart, Message, ProcInfo, ProcKill,
    ProcListing, ProcLogs, ProcStart, ProcStarted, ProcWait, Stream, MAX_CHUNK,
};

use super::context::RequestContext;
use super::dispatch::HELPER_STACK;
use super::fd::{signal_group, Trigger};
use super::output::{pump, stop_after_grace, EXIT_GRACE};
use super::process_spec::{build_command, program_name};
use super::ring_log::RingLog;

/// Bytes kept per stream of each process.
pub const LOG_CAPACITY: usize = 1 << 20;
/// Exited processes kept for `ProcList`/`ProcWait`/`ProcLogs`; older ones are forgotten.
pub const MAX_EXITED_KEPT: usize = 64;
/// Running background processes at once.
pub const MAX_RUNNING: usize = 256;

/// Waits recheck their conditions this often; every change also notifies.
const RECHECK: Duration = Duration::from_secs(1);

pub struct ProcessTable {
    state: Mutex<TableState>,
    changed: Condvar,
}

#[derive(Default)]
struct TableState {
    next_id: u64,
    procs: BTreeMap<u64, BackgroundProcess>,
}

struct BackgroundProcess {
    pid: u32,
    command: Command,
    started_unix_ms: u64,
    status: Option<ExitStatus>,
    /// The spec's timeout killed it.
    timed_out: bool,
    stdout: RingLog,
    stderr: RingLog,
    /// Both output pumps finished: the logs are complete.
    output_done: bool,
}

impl BackgroundProcess {
    fn log(&self, stream: Stream) -> &RingLog {
        match stream {
            Stream::Stderr => &self.stderr,
            _ => &self.stdout,
        }
    }

    fn log_mut(&mut self, stream: Stream) -> &mut RingLog {
        match stream {
            Stream::Stderr => &mut self.stderr,
            _ => &mut self.stdout,
        }
    }
}

impl Default for ProcessTable {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessTable {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(TableState {
                next_id: 1,
                procs: BTreeMap::new(),
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TableState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(
        &self,
        guard: MutexGuard<'a, TableState>,
        timeout: Duration,
    ) -> MutexGuard<'a, TableState> {
        self.changed
            .wait_timeout(guard, timeout)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    fn notify(&self) {
        self.changed.notify_all();
    }

    fn append(&self, proc_id: u64, stream: Stream, data: &[u8]) -> bool {
        let mut state = self.lock();
        let Some(process) = state.procs.get_mut(&proc_id) else {
            return false;
        };
        process.log_mut(stream).push(data);
        drop(state);
        self.notify();
        true
    }

    fn exited(&self, proc_id: u64, status: ExitStatus) {
        let mut state = self.lock();
        if let Some(process) = state.procs.get_mut(&proc_id) {
            process.status = Some(status);
        }
        let exited: Vec<u64> = state
            .procs
            .iter()
            .filter(|(_, p)| p.status.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in exited
            .iter()
            .take(exited.len().saturating_sub(MAX_EXITED_KEPT))
        {
            state.procs.remove(id);
        }
        drop(state);
        self.notify();
    }

    fn output_done(&self, proc_id: u64) {
        if let Some(process) = self.lock().procs.get_mut(&proc_id) {
            process.output_done = true;
        }
        self.notify();
    }
}

/// Longest command text per entry in a listing, so that a full table always fits in one frame.
const LISTED_COMMAND_BYTES: usize = 1024;

/// The command as listed: strings cut (at a char boundary) so that all of them together stay
/// within [`LISTED_COMMAND_BYTES`].
fn summarize(command: &Command) -> Command {
    fn cut(text: &str, budget: &mut usize) -> String {
        let mut end = text.len().min(*budget);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        *budget -= end;
        text[..end].to_string()
    }
    let mut budget = LISTED_COMMAND_BYTES;
    match command {
        Command::Shell(script) => Command::Shell(cut(script, &mut budget)),
        Command::Argv(argv) => {
            // argv[0] always stays (an empty argv is not a valid message).
            let mut listed = Vec::new();
            for arg in argv {
                if !listed.is_empty() && budget == 0 {
                    break;
                }
                listed.push(cut(arg, &mut budget));
            }
            Command::Argv(listed)
        }
    }
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn no_such_process(proc_id: u64) -> String {
    format!("no background process with proc_id {proc_id} (never started, or forgotten after it exited)")
}

pub(crate) fn start(ctx: RequestContext, request: ProcStart) {
    let table = Arc::clone(&ctx.services().processes);
    let mut command = match build_command(&request.spec) {
        Ok(command) => command,
        Err(e) => return ctx.fail(e.code, e.message),
    };
    let stop = match Trigger::new() {
        Ok(stop) => stop,
        Err(e) => {
            return ctx.fail(
                ErrorCode::ResourceLimit,
                format!("cannot set up ProcStart: {e}"),
            )
        }
    };
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);

    // The entry exists before the spawn, so the exit (reported on the reaper thread, possibly
    // before spawn_with returns) always finds it.
    let proc_id = {
        let mut state = table.lock();
        let running = state.procs.values().filter(|p| p.status.is_none()).count();
        if running >= MAX_RUNNING {
            drop(state);
            return ctx.fail(
                ErrorCode::ResourceLimit,
                format!("{running} background processes are already running (limit {MAX_RUNNING})"),
            );
        }
        let proc_id = state.next_id;
        state.next_id += 1;
        state.procs.insert(
            proc_id,
            BackgroundProcess {
                pid: 0,
                command: request.spec.command.clone(),
                started_unix_ms: unix_ms_now(),
                status: None,
                timed_out: false,
                stdout: RingLog::new(LOG_CAPACITY),
                stderr: RingLog::new(LOG_CAPACITY),
                output_done: false,
            },
        );
        proc_id
    };
    let (exit_tx, exit_rx) = mpsc::channel();
    let exit_table = Arc::clone(&table);
    let spawned = ctx
        .services()
        .reaper
        .spawn_with(&mut command, move |status| {
            exit_table.exited(proc_id, status);
            let _ = exit_tx.send(());
        });
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            table.lock().procs.remove(&proc_id);
            return ctx.fail(
                ErrorCode::SpawnFailed,
                format!("cannot run {}: {e}", program_name(&request.spec)),
            );
        }
    };
    let pid = child.id();
    let outputs = [
        (Stream::Stdout, child.stdout.take().map(OwnedFd::from)),
        (Stream::Stderr, child.stderr.take().map(OwnedFd::from)),
    ];
    drop(child);
    if let Some(process) = table.lock().procs.get_mut(&proc_id) {
        process.pid = pid;
    }
    let collector_table = Arc::clone(&table);
    let timeout = request.spec.timeout_ms.map(Duration::from_millis);
    let collector = std::thread::Builder::new()
        .name(format!("proc-{proc_id}"))
        .stack_size(HELPER_STACK)
        .spawn(move || {
            let watch = Watch {
                table: &collector_table,
                proc_id,
                pid,
                timeout,
            };
            watch.run(outputs, &stop, &exit_rx)
        });
    if let Err(e) = collector {
        let _ = signal_group(pid, libc::SIGKILL);
        return ctx.fail(
            ErrorCode::ResourceLimit,
            format!(
                "no thread to collect the output of {}: {e}",
                program_name(&request.spec)
            ),
        );
    }
    ctx.finish(Message::ProcStarted(ProcStarted {
        id: request.id,
        proc_id,
        pid,
    }));
}

/// Runs for the life of a background process: pumps its output into the table's logs, enforces
/// the spec's timeout, and marks the logs complete once it exited and the output drained.
struct Watch<'a> {
    table: &'a ProcessTable,
    proc_id: u64,
    pid: u32,
    timeout: Option<Duration>,
}

impl Watch<'_> {
    fn run(&self, outputs: [(Stream, Option<OwnedFd>); 2], stop: &Trigger, exit: &Receiver<()>) {
        let (table, proc_id) = (self.table, self.proc_id);
        std::thread::scope(|scope| {
            let (done_tx, done) = mpsc::channel();
            for (stream, source) in outputs {
                let Some(source) = source else { continue };
                let done_tx = done_tx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("proc-{proc_id}-{stream:?}"))
                    .stack_size(HELPER_STACK)
                    .spawn_scoped(scope, move || {
                        pump(source, stop, done_tx, |data| {
                            table.append(proc_id, stream, data)
                        })
                    });
                if let Err(e) = spawned {
                    eprintln!(
                        "agentvm-guest-agent: output of proc {proc_id} on {stream:?} lost: {e}"
                    );
                }
            }
            drop(done_tx);
            self.wait_for_exit(exit);
            stop_after_grace(&done, stop, EXIT_GRACE);
        });
        table.output_done(proc_id);
    }

    /// Returns once the reaper reported the exit (its sender goes away only after that).
    fn wait_for_exit(&self, exit: &Receiver<()>) {
        if let Some(timeout) = self.timeout {
            if let Err(RecvTimeoutError::Timeout) = exit.recv_timeout(timeout) {
                let mut state = self.table.lock();
                // An exit that raced the timeout is not a time-out.
                if let Some(process) = state.procs.get_mut(&self.proc_id) {
                    if process.status.is_none() {
                        process.timed_out = true;
                        let _ = signal_group(self.pid, libc::SIGKILL);
                    }
                }
            }
        }
        let _ = exit.recv();
    }
}

pub(crate) fn list(ctx: RequestContext, id: u64) {
    let procs = ctx
        .services()
        .processes
        .lock()
        .procs
        .iter()
        .map(|(proc_id, p)| ProcInfo {
            proc_id: *proc_id,
            pid: p.pid,
            command: summarize(&p.command),
            started_unix_ms: p.started_unix_ms,
            status: p.status,
            stdout_bytes: p.stdout.end(),
            stderr_bytes: p.stderr.end(),
        })
        .collect();
    ctx.finish(Message::ProcListing(ProcListing { id, procs }));
}

pub(crate) fn wait(ctx: RequestContext, request: ProcWait) {
    let table = Arc::clone(&ctx.services().processes);
    let waker = Arc::clone(&table);
    ctx.on_control(move |_| waker.notify());
    let deadline = request
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let mut state = table.lock();
    loop {
        let Some(process) = state.procs.get(&request.proc_id) else {
            drop(state);
            return ctx.fail(ErrorCode::NotFound, no_such_process(request.proc_id));
        };
        if let Some(status) = process.status {
            let timed_out = process.timed_out;
            drop(state);
            return ctx.finish(Message::Exited(Exited {
                id: request.id,
                status,
                timed_out,
            }));
        }
        let pid = process.pid;
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left.is_some_and(|left| left.is_zero()) || ctx.closed() {
            drop(state);
            let why = if ctx.closed() {
                "the wait was closed".to_string()
            } else {
                format!("{} ms passed", request.timeout_ms.unwrap_or(0))
            };
            return ctx.fail(
                ErrorCode::TimedOut,
                format!(
                    "background process {} (pid {pid}) is still running: {why}",
                    request.proc_id
                ),
            );
        }
        state = table.wait(state, left.map_or(RECHECK, |left| left.min(RECHECK)));
    }
}

pub(crate) fn kill(ctx: RequestContext, request: ProcKill) {
    let found = ctx
        .services()
        .processes
        .lock()
        .procs
        .get(&request.proc_id)
        .map(|p| (p.pid, p.status.is_some()));
    let (pid, exited) = match found {
        Some(found) => found,
        None => return ctx.fail(ErrorCode::NotFound, no_such_process(request.proc_id)),
    };
    if !exited {
        match signal_group(pid, request.signal) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => {
                return ctx.fail(
                    ErrorCode::from_io(&e),
                    format!(
                        "cannot send signal {} to background process {} (pid {pid}): {e}",
                        request.signal, request.proc_id
                    ),
                )
            }
        }
    }
    ctx.finish(Message::Done(Done { id: request.id }));
}

pub(crate) fn logs(ctx: RequestContext, request: ProcLogs) {
    let table = Arc::clone(&ctx.services().processes);
    let waker = Arc::clone(&table);
    ctx.on_control(move |_| waker.notify());
    let stream = request.stream;
    let first = table
        .lock()
        .procs
        .get(&request.proc_id)
        .map(|p| request.offset.max(p.log(stream).start()));
    let Some(mut position) = first else {
        return ctx.fail(ErrorCode::NotFound, no_such_process(request.proc_id));
    };
    if ctx
        .send(&Message::LogsStart(LogsStart {
            id: request.id,
            offset: position,
        }))
        .is_err()
    {
        return ctx.finish(Message::Done(Done { id: request.id }));
    }
    let done = Message::Done(Done { id: request.id });
    loop {
        let mut state = table.lock();
        let Some(process) = state.procs.get(&request.proc_id) else {
            // Forgotten (many newer processes exited): its log ends here.
            drop(state);
            return ctx.finish(done);
        };
        let (from, data) = process.log(stream).read_from(position, 4 * MAX_CHUNK);
        if from > position {
            drop(state);
            return ctx.fail(
                ErrorCode::ResourceLimit,
                format!(
                    "the {stream:?} log of background process {} dropped bytes {position}..{from} \
                     before they could be sent; ask again from offset {from}",
                    request.proc_id
                ),
            );
        }
        if !data.is_empty() {
            drop(state);
            if ctx.send_data(stream, &data).is_err() {
                return ctx.finish(done);
            }
            position += data.len() as u64;
            continue;
        }
        if !request.follow || process.output_done || ctx.closed() {
            drop(state);
            return ctx.finish(done);
        }
        state = table.wait(state, RECHECK);
        drop(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_commands_are_bounded() {
        let long = "é".repeat(LISTED_COMMAND_BYTES);
        let Command::Shell(script) = summarize(&Command::Shell(long.clone())) else {
            panic!()
        };
        assert!(script.len() <= LISTED_COMMAND_BYTES && long.starts_with(&script));
        let argv = vec!["x".repeat(2 * LISTED_COMMAND_BYTES), "y".into()];
        let Command::Argv(listed) = summarize(&Command::Argv(argv)) else {
            panic!()
        };
        assert_eq!(listed, vec!["x".repeat(LISTED_COMMAND_BYTES)]);
        let short = Command::Argv(vec!["echo".into(), "hi".into()]);
        assert_eq!(summarize(&short), short);
    }
}
