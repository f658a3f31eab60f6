//! The thread that makes an isolate's fetches. The job runs under the `isolate` seccomp filter,
//! which has no network syscalls and must not gain them (a compromised interpreter would get a
//! socket): the fetcher runs on a thread of its own under the `isolate_fetch` filter, and the
//! job's host call hands it each request over a channel and waits for the answer, at most until
//! the job's deadline.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Instant;

use egress::fetch::{FetchError, FetchRequest, FetchResponse, Fetcher, FetcherConfig};

use crate::seccomp::{SeccompLevel, ThreadKind};

type Answer = Result<FetchResponse, FetchError>;

struct Job {
    request: FetchRequest,
    deadline: Instant,
    reply: Sender<Answer>,
}

/// The running fetcher thread. Dropping it ends the thread (after the fetch in progress, which
/// its deadline bounds).
pub struct FetchThread {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl FetchThread {
    /// Builds the fetcher on the calling thread (its TLS roots are read here, before any filter)
    /// and starts the thread, which puts itself under the `isolate_fetch` filter at `level`.
    pub fn spawn(config: FetcherConfig, level: SeccompLevel) -> Result<FetchThread, String> {
        let mut fetcher = Fetcher::new(config).map_err(|e| format!("egress: {e}"))?;
        let (jobs, requests) = mpsc::channel::<Job>();
        let (started, start_result) = mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name("isolate-fetch".into())
            .spawn(move || {
                let filtered = crate::seccomp::install(ThreadKind::IsolateFetch, level)
                    .map_err(|e| e.to_string());
                let ok = filtered.is_ok();
                let _ = started.send(filtered);
                if !ok {
                    return;
                }
                for job in requests {
                    let answer = fetcher.fetch(&job.request, job.deadline);
                    // The waiter may have given up at the deadline; nothing to tell then.
                    let _ = job.reply.send(answer);
                }
            })
            .map_err(|e| format!("cannot start the fetch thread: {e}"))?;
        let mut this = FetchThread {
            jobs: Some(jobs),
            thread: Some(thread),
        };
        match start_result.recv() {
            Ok(Ok(())) => Ok(this),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                this.jobs = None;
                Err("the fetch thread ended before it started".into())
            }
        }
    }

    /// Makes `request` on the fetcher thread, waiting at most until `deadline`.
    pub fn fetch(&self, request: &FetchRequest, deadline: Instant) -> Answer {
        let gone = || FetchError::Network("the fetch thread has stopped".into());
        let (reply, answer) = mpsc::channel();
        let job = Job {
            request: request.clone(),
            deadline,
            reply,
        };
        self.jobs
            .as_ref()
            .ok_or_else(gone)?
            .send(job)
            .map_err(|_| gone())?;
        // recv_timeout resumes its wait after a signal (the limit timers' kick), so the wait
        // ends only at the answer or the deadline, which the fetcher itself also keeps.
        let wait = deadline.saturating_duration_since(Instant::now());
        match answer.recv_timeout(wait) {
            Ok(answer) => answer,
            Err(RecvTimeoutError::Timeout) => Err(FetchError::Timeout(format!(
                "waiting for {} {}",
                request.method, request.url
            ))),
            Err(RecvTimeoutError::Disconnected) => Err(gone()),
        }
    }
}

impl Drop for FetchThread {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
