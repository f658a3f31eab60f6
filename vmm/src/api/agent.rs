//! The guest agent as the API reaches it: one lazily made [`AgentClient`] per VM, used from job
//! threads under their own seccomp filter (`agent_jobs`).
//!
//! Why threads: the client is blocking and starts a reader thread per connection, and the API
//! thread's filter forbids creating threads. So `serve` starts the [`AgentWorker`]'s spawner
//! thread before the API thread's filter goes on; the spawner puts itself under the
//! `agent_jobs` filter (threads, AF_UNIX connect and socket I/O; no execve, no file opening),
//! which every job thread and client reader thread it starts inherits, and starts one job thread
//! per `/sandbox/...` request, at most [`MAX_JOBS`] at a time. The API thread hands jobs over a
//! channel and awaits their answers on tokio channels, which only need the eventfd write its
//! filter already allows.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentvm_client::{AgentClient, ClientError, ErrorCode};
use agentvm_protocol::AGENT_VSOCK_PORT;

use super::after_restore::{self, AfterRestoreGate, AfterRestoreStep};
use super::fault::Fault;
use crate::seccomp::{ThreadKind, ThreadSeccomp};

/// How long a `/sandbox/...` request waits for the guest agent to accept a connection.
pub const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent `/sandbox/...` jobs (each a thread; a streaming exec holds one while it runs).
pub const MAX_JOBS: usize = 64;

type Job = Box<dyn FnOnce() + Send>;

/// Starts job threads for the API thread. Cheap to clone.
#[derive(Clone)]
pub struct AgentWorker {
    jobs: Sender<Job>,
    running: Arc<AtomicUsize>,
    agent: Arc<Mutex<Option<(PathBuf, AgentClient)>>>,
    /// Closed while a restored VM's after-restore step runs (see [`after_restore`]).
    after_restore: AfterRestoreGate,
}

impl AgentWorker {
    /// Starts the spawner thread, which installs the `agent_jobs` filter before it takes a job;
    /// call it before the caller's thread installs a filter that forbids creating threads.
    pub fn start(seccomp: ThreadSeccomp) -> Result<Self, String> {
        let (jobs, queue) = channel::<Job>();
        let (filtered, filter_result) = channel();
        std::thread::Builder::new()
            .name("agent-jobs".into())
            .spawn(move || {
                let entered = seccomp
                    .enter(ThreadKind::AgentJobs)
                    .map_err(|e| e.to_string());
                let ok = entered.is_ok();
                let _ = filtered.send(entered);
                if !ok {
                    return;
                }
                for job in queue {
                    if let Err(e) = std::thread::Builder::new()
                        .name("agent-job".into())
                        .spawn(job)
                    {
                        // The job (and the reply channel it owns) is dropped: its request gets
                        // a "job ended without an answer" fault.
                        tracing::warn!("cannot start a guest agent job thread: {e}");
                    }
                }
            })
            .map_err(|e| format!("cannot start the guest agent job thread: {e}"))?;
        filter_result
            .recv()
            .map_err(|_| "the guest agent job thread ended at start".to_string())??;
        Ok(Self {
            jobs,
            running: Arc::new(AtomicUsize::new(0)),
            agent: Arc::new(Mutex::new(None)),
            after_restore: AfterRestoreGate::default(),
        })
    }

    /// Starts a restored VM's after-restore step on a job thread; `/sandbox/...` requests wait for
    /// it from now on. Call it under the controller's lock, as the VM becomes Running.
    pub fn begin_after_restore(&self, step: AfterRestoreStep) {
        self.after_restore.close();
        // Opens the gate however the step ends: run, panicked, or never started (the job is
        // dropped when no job thread can take it).
        struct StepEnd {
            gate: AfterRestoreGate,
            metrics: after_restore::AfterRestoreMetrics,
            ran: bool,
        }
        impl Drop for StepEnd {
            fn drop(&mut self) {
                if !self.ran {
                    self.metrics.record(
                        after_restore::AfterRestoreOutcome::Failed,
                        std::time::Duration::ZERO,
                    );
                    tracing::warn!(
                        "after restore: failed: its job did not run (no job thread); the \
                         guest's clock and RNG stay as snapshotted"
                    );
                }
                self.gate.open();
            }
        }
        let mut end = StepEnd {
            gate: self.after_restore.clone(),
            metrics: step.metrics.clone(),
            ran: false,
        };
        let cache = self.agent.clone();
        let route = step.route.clone();
        // An Err here dropped the job, and with it `end`, which counted and logged it.
        let _ = self.submit(move || {
            end.ran = true;
            let client = after_restore::run(step, after_restore::AFTER_RESTORE_CONNECT_TIMEOUT);
            // The first request after the restore reuses the step's connection (set before the
            // gate opens).
            if let (Some(client), after_restore::AgentRoute::Vsock(uds)) = (client, route) {
                *cache.lock().unwrap_or_else(|e| e.into_inner()) = Some((uds, client));
            }
            drop(end);
        });
    }

    /// Runs `job` on a job thread, unless [`MAX_JOBS`] are running (503).
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) -> Result<(), Fault> {
        if self.running.fetch_add(1, Ordering::AcqRel) >= MAX_JOBS {
            self.running.fetch_sub(1, Ordering::AcqRel);
            return Err(Fault::unavailable(format!(
                "{MAX_JOBS} guest agent requests are already running; retry when one ended"
            )));
        }
        let running = self.running.clone();
        let job: Job = Box::new(move || {
            struct Done(Arc<AtomicUsize>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::AcqRel);
                }
            }
            let _done = Done(running);
            // The filter came with the thread; the label is per thread and must be set again.
            crate::seccomp::violation::label_current_thread(ThreadKind::AgentJobs);
            job();
        });
        self.jobs.send(job).map_err(|_| {
            self.running.fetch_sub(1, Ordering::AcqRel);
            Fault::internal("the guest agent job thread has ended")
        })
    }

    /// The VM's agent client (on a job thread): the cached one while its connection is up,
    /// otherwise a new connection through `uds` within [`AGENT_CONNECT_TIMEOUT`].
    /// After a restore, first waits for the after-restore step, so that the guest's clock is
    /// right before anything runs there.
    pub fn client(&self, uds: &Path) -> Result<AgentClient, Fault> {
        if !self.after_restore.wait_open(after_restore::GATE_WAIT_LIMIT) {
            tracing::warn!(
                "the after-restore step still runs after {:?}; going on without it",
                after_restore::GATE_WAIT_LIMIT
            );
        }
        let mut cached = self.agent.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((path, client)) = cached.as_ref() {
            if path == uds && client.closed_reason().is_none() {
                return Ok(client.clone());
            }
        }
        *cached = None;
        let client = AgentClient::connect_vsock_uds(uds, AGENT_VSOCK_PORT, AGENT_CONNECT_TIMEOUT)
            .map_err(|e| {
            Fault::unavailable(format!(
                "the guest agent does not answer (vsock port {AGENT_VSOCK_PORT} via {}): {e}",
                uds.display()
            ))
        })?;
        *cached = Some((uds.to_path_buf(), client.clone()));
        Ok(client)
    }
}

/// A failed agent call as an API fault: the agent's own refusals are the client's fault (4xx,
/// 404 for a missing path), a broken or silent connection is 503.
pub fn agent_fault(what: &str, error: ClientError) -> Fault {
    let message = format!("{what}: {error}");
    match &error {
        ClientError::Agent { code, .. } => match code {
            ErrorCode::NotFound => Fault::not_found(message),
            ErrorCode::AlreadyExists => Fault::conflict(message),
            ErrorCode::PermissionDenied => Fault {
                status: hyper::StatusCode::FORBIDDEN,
                message,
            },
            ErrorCode::ResourceLimit => Fault::unavailable(message),
            ErrorCode::Internal | ErrorCode::Protocol => Fault::internal(message),
            _ => Fault::bad_request(message),
        },
        ClientError::InvalidArgument(_) => Fault::bad_request(message),
        _ => Fault::unavailable(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::after_restore::tests::fake_agent;
    use crate::api::after_restore::{AfterRestoreMetrics, AfterRestoreOutcome, AgentRoute};
    use crate::seccomp::SeccompLevel;

    #[test]
    fn requests_wait_for_the_after_restore_step_and_reuse_its_connection() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        // It accepts one connection only: a request that did not wait for the step (or did not
        // reuse its connection) finds nobody answering its own.
        let agent = fake_agent(&uds, None);
        // Under the real `agent_jobs` filter: the step's syscalls (connect, getrandom, ...) are
        // allowed there, or the test process dies of SIGSYS.
        let worker = AgentWorker::start(ThreadSeccomp {
            level: SeccompLevel::Enforce,
            test_violation: false,
        })
        .unwrap();
        let metrics = AfterRestoreMetrics::default();
        worker.begin_after_restore(AfterRestoreStep {
            route: AgentRoute::Vsock(uds.clone()),
            metrics: metrics.clone(),
        });
        let client = worker.client(&uds);
        assert_eq!(
            metrics.snapshot().outcomes[0],
            (AfterRestoreOutcome::Done, 1),
            "the request went ahead before the step ended"
        );
        assert!(client.is_ok(), "{:?}", client.err());
        drop(client);
        drop(worker);
        agent.join().unwrap();
    }
}
