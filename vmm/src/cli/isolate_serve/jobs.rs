//! The worker's job thread: the one thread that runs calls, one at a time, in its one isolate
//! (reset to the template after each call), under the `isolate` seccomp filter.
//!
//! Calls are serialised: the guest's key/value store is the sandbox's, and a call holds it
//! (`HostContext` borrows it mutably) for as long as it runs, so two calls could not run at once
//! without one waiting for the other anyway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use vmm::isolate::{
    FetchError, FetchThread, HostContext, Isolate, IsolateError, JobSpec, KvStore, Value,
    NO_FETCH_POLICY,
};
use vmm::seccomp::{SeccompLevel, ThreadKind};

/// Calls waiting for the job thread beyond the one it runs; more are refused (503).
pub const QUEUE_DEPTH: usize = 16;
/// Log lines a call keeps (and their total size); the rest are counted, not kept.
const MAX_LOG_LINES: usize = 1000;
const MAX_LOG_BYTES: usize = 1 << 20;
/// How long the thread may take to put itself under its filter, beyond checking the module.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The function the module check calls: no module exports it (its name is not one a producer
/// writes), so a module the guest accepts answers "missing export".
const CHECK_FUNCTION: &str = "\u{0}agentvm: module check";

#[derive(Debug)]
pub enum StartError {
    /// The module is not one the isolate runs: invalid, or it cannot be instantiated (its start
    /// function trapped, or it imports what the isolate does not offer).
    ModuleRefused(IsolateError),
    Failed(String),
}

pub struct Call {
    pub function: String,
    pub args: Vec<String>,
    pub cpu_limit: Duration,
    pub wall_limit: Duration,
}

pub struct Outcome {
    pub result: Result<Vec<Value>, IsolateError>,
    pub logs: Vec<String>,
    pub duration: Duration,
}

type Queued = (Call, oneshot::Sender<Outcome>);

#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// [`QUEUE_DEPTH`] calls are waiting already.
    Busy,
    /// The job thread has ended (its isolate failed): the worker is ending.
    Gone,
}

#[derive(Clone)]
pub struct Jobs {
    queue: SyncSender<Queued>,
    served: Arc<AtomicU64>,
}

impl Jobs {
    /// Starts the job thread with `isolate` (ready for a job) and the module every call runs.
    /// The thread first checks the module in the isolate (see [`check_module`]); then it runs
    /// calls until every [`Jobs`] is dropped, or until its isolate cannot be reset (the
    /// thread's result says why it ended).
    pub fn start(
        isolate: Isolate,
        module: Vec<u8>,
        kv_max_bytes: usize,
        check_limits: (Duration, Duration),
        fetcher: Option<FetchThread>,
        seccomp: SeccompLevel,
    ) -> Result<(Jobs, JoinHandle<Result<(), String>>), StartError> {
        let (queue, calls) = mpsc::sync_channel::<Queued>(QUEUE_DEPTH);
        let served = Arc::new(AtomicU64::new(0));
        let counter = served.clone();
        let (started_tx, started) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("isolate-job".into())
            .spawn(move || {
                let mut isolate = isolate;
                let checked = vmm::seccomp::install(ThreadKind::Isolate, seccomp)
                    .map_err(|e| StartError::Failed(format!("job thread: {e}")))
                    .and_then(|()| check_module(&mut isolate, &module, check_limits));
                let ok = checked.is_ok();
                let _ = started_tx.send(checked);
                if !ok {
                    return Ok(());
                }
                let kv = KvStore::new(kv_max_bytes);
                serve_calls(isolate, module, kv, fetcher.as_ref(), calls, &counter)
            })
            .map_err(|e| StartError::Failed(format!("cannot start the job thread: {e}")))?;
        let wait = START_TIMEOUT + check_limits.1;
        match started.recv_timeout(wait) {
            Ok(Ok(())) => Ok((Jobs { queue, served }, thread)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StartError::Failed(format!(
                "the job thread did not check the module within {wait:?}"
            ))),
        }
    }

    /// Queues `call`; the answer arrives on the returned receiver.
    pub fn submit(&self, call: Call) -> Result<oneshot::Receiver<Outcome>, Refused> {
        let (reply, answer) = oneshot::channel();
        match self.queue.try_send((call, reply)) {
            Ok(()) => Ok(answer),
            Err(TrySendError::Full(_)) => Err(Refused::Busy),
            Err(TrySendError::Disconnected(_)) => Err(Refused::Gone),
        }
    }

    /// Calls answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

/// Compiles and instantiates `module` in `isolate` (then resets it), so that a module every call
/// would fail with is refused before the worker serves any.
fn check_module(
    isolate: &mut Isolate,
    module: &[u8],
    (cpu_limit, wall_limit): (Duration, Duration),
) -> Result<(), StartError> {
    let job = JobSpec {
        module: module.to_vec(),
        function: CHECK_FUNCTION.into(),
        args: Vec::new(),
        cpu_limit,
        wall_limit,
    };
    // A start function's host calls go nowhere: the sandbox's store and its fetches are for
    // its calls.
    let mut kv = KvStore::new(0);
    let mut discard = |_: &str| {};
    let result = isolate.run(
        &job,
        &mut HostContext {
            kv: &mut kv,
            log: &mut discard,
            fetch: None,
        },
    );
    match result {
        Ok(_) | Err(IsolateError::MissingExport(_)) => {}
        Err(e @ (IsolateError::Setup(_) | IsolateError::Kvm(_))) => {
            return Err(StartError::Failed(format!("checking the module: {e}")))
        }
        Err(e) => return Err(StartError::ModuleRefused(e)),
    }
    isolate
        .reset()
        .map_err(|e| StartError::Failed(format!("cannot reset the isolate after the check: {e}")))
}

fn serve_calls(
    mut isolate: Isolate,
    module: Vec<u8>,
    mut kv: KvStore,
    fetcher: Option<&FetchThread>,
    calls: Receiver<Queued>,
    served: &AtomicU64,
) -> Result<(), String> {
    let mut fetch = |request: &_, deadline| match fetcher {
        Some(thread) => thread.fetch(request, deadline),
        None => Err(FetchError::Denied(NO_FETCH_POLICY.into())),
    };
    let mut job = JobSpec {
        module,
        function: String::new(),
        args: Vec::new(),
        cpu_limit: Duration::ZERO,
        wall_limit: Duration::ZERO,
    };
    for (call, reply) in calls {
        job.function = call.function;
        job.args = call.args;
        job.cpu_limit = call.cpu_limit;
        job.wall_limit = call.wall_limit;
        let mut logs = LogLines::default();
        let start = Instant::now();
        let result = {
            let mut log = |line: &str| logs.push(line);
            isolate.run(
                &job,
                &mut HostContext {
                    kv: &mut kv,
                    log: &mut log,
                    fetch: Some(&mut fetch),
                },
            )
        };
        let duration = start.elapsed();
        // Reset before answering: the next call must find the template's state, and a reset
        // that fails ends the worker before anyone is told a call could follow.
        let reset = isolate.reset();
        served.fetch_add(1, Ordering::Relaxed);
        let _ = reply.send(Outcome {
            result,
            logs: logs.finish(),
            duration,
        });
        reset.map_err(|e| format!("cannot reset the isolate after a call: {e}"))?;
    }
    Ok(())
}

/// A call's log lines, bounded: a module that logs in a loop cannot grow the worker.
#[derive(Default)]
struct LogLines {
    lines: Vec<String>,
    bytes: usize,
    dropped: usize,
}

impl LogLines {
    fn push(&mut self, line: &str) {
        if self.lines.len() >= MAX_LOG_LINES || self.bytes + line.len() > MAX_LOG_BYTES {
            self.dropped += 1;
            return;
        }
        self.bytes += line.len();
        self.lines.push(line.to_string());
    }

    fn finish(mut self) -> Vec<String> {
        if self.dropped > 0 {
            self.lines.push(format!(
                "({} more log lines dropped: a call keeps at most {MAX_LOG_LINES} lines, \
                 {MAX_LOG_BYTES} bytes)",
                self.dropped
            ));
        }
        self.lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_beyond_the_bound_are_counted_not_kept() {
        let mut logs = LogLines::default();
        for i in 0..MAX_LOG_LINES + 5 {
            logs.push(&format!("line {i}"));
        }
        let lines = logs.finish();
        assert_eq!(lines.len(), MAX_LOG_LINES + 1);
        assert_eq!(lines[0], "line 0");
        assert!(lines[MAX_LOG_LINES].starts_with("(5 more log lines dropped"));
    }
}
