//! After a snapshot restore, the guest wakes up with the wall clock and the RNG state of the
//! moment the snapshot was taken: its clock lags by the gap, and every restore of one snapshot
//! would produce the same random numbers. Once a VM loaded by `PUT /snapshot/load` runs, a job
//! thread tells the guest agent the host's `CLOCK_REALTIME` and hands it fresh entropy
//! (`AfterRestore`); until that ended, every `/sandbox/...` request waits ([`AfterRestoreGate`]),
//! so the first exec after a restore always sees the corrected clock.
//!
//! The outcome (done, skipped: no agent can be there, failed) is counted for `GET /metrics` and
//! logged once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentvm_client::{AgentClient, ClientError};
use agentvm_protocol::AGENT_VSOCK_PORT;

/// How long the step waits for the guest agent to accept a connection: it must first see the
/// vsock transport reset of the restore and listen again. A hang detector, not a performance
/// bound (a healthy guest answers within milliseconds).
pub const AFTER_RESTORE_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of host entropy handed to the guest (credited in full by the agent).
pub const ENTROPY_BYTES: usize = 64;
/// The longest a `/sandbox/...` request waits for the step: its connect deadline, one agent call
/// and a margin. The step ends by then on its own; this only bounds a wait on a lost wake-up.
pub const GATE_WAIT_LIMIT: Duration = Duration::from_secs(
    AFTER_RESTORE_CONNECT_TIMEOUT.as_secs() + agentvm_client::DEFAULT_CALL_TIMEOUT.as_secs() + 5,
);

/// How the step ended, as the metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRestoreOutcome {
    /// The guest agent set its clock and took the entropy.
    Done,
    /// No guest agent can be there: no vsock device, or its driver was never set up.
    Skipped,
    /// The agent did not answer within [`AFTER_RESTORE_CONNECT_TIMEOUT`], or refused.
    Failed,
}

impl AfterRestoreOutcome {
    pub const ALL: [AfterRestoreOutcome; 3] = [
        AfterRestoreOutcome::Done,
        AfterRestoreOutcome::Skipped,
        AfterRestoreOutcome::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AfterRestoreOutcome::Done => "done",
            AfterRestoreOutcome::Skipped => "skipped",
            AfterRestoreOutcome::Failed => "failed",
        }
    }
}

/// Where the guest agent of a restored VM is reached, as the VMM saw it at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentRoute {
    /// Through this vsock Unix socket.
    Vsock(PathBuf),
    /// Nowhere: why not.
    None(&'static str),
}

pub const NO_VSOCK: &str = "the microVM has no vsock device";
pub const NO_VSOCK_DRIVER: &str =
    "the guest had not set up its vsock device when the snapshot was taken (no driver, so no agent)";

#[derive(Default)]
struct Counters {
    outcomes: [AtomicU64; AfterRestoreOutcome::ALL.len()],
    /// Of the last step, from the VM running to its end.
    last_duration_us: AtomicU64,
}

/// The step's counters: shared by the controller (which reads them) and the job. Cheap to clone.
#[derive(Clone, Default)]
pub struct AfterRestoreMetrics(Arc<Counters>);

/// The counters at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct AfterRestoreCounts {
    pub outcomes: Vec<(AfterRestoreOutcome, u64)>,
    /// None: no step has ended yet.
    pub last_duration_seconds: Option<f64>,
}

impl AfterRestoreMetrics {
    pub fn record(&self, outcome: AfterRestoreOutcome, took: Duration) {
        let index = AfterRestoreOutcome::ALL
            .iter()
            .position(|&o| o == outcome)
            .unwrap_or(0);
        self.0
            .last_duration_us
            .store(took.as_micros() as u64, Ordering::Relaxed);
        self.0.outcomes[index].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> AfterRestoreCounts {
        let outcomes: Vec<_> = AfterRestoreOutcome::ALL
            .iter()
            .zip(&self.0.outcomes)
            .map(|(&o, n)| (o, n.load(Ordering::Relaxed)))
            .collect();
        let ended = outcomes.iter().any(|&(_, n)| n > 0);
        AfterRestoreCounts {
            outcomes,
            last_duration_seconds: ended
                .then(|| self.0.last_duration_us.load(Ordering::Relaxed) as f64 / 1e6),
        }
    }
}

/// The step for one restored VM, handed from the controller (which knows when the VM runs) to a
/// job thread.
pub struct AfterRestoreStep {
    pub route: AgentRoute,
    pub metrics: AfterRestoreMetrics,
}

/// Holds `/sandbox/...` requests while a step runs. Cheap to clone.
#[derive(Clone, Default)]
pub struct AfterRestoreGate(Arc<(Mutex<bool>, Condvar)>);

impl AfterRestoreGate {
    /// A step is about to run: requests from now on wait. Called under the controller's lock,
    /// together with the state change to Running, so no request slips in between.
    pub fn close(&self) {
        *self.0 .0.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    pub fn open(&self) {
        *self.0 .0.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.0 .1.notify_all();
    }

    /// Waits until no step runs, at most `limit`; false if the limit passed first.
    pub fn wait_open(&self, limit: Duration) -> bool {
        let (closed, changed) = &*self.0;
        let guard = closed.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = changed
            .wait_timeout_while(guard, limit, |closed| *closed)
            .unwrap_or_else(|e| e.into_inner());
        !*guard
    }
}

/// Runs the step (on a job thread): connects to the agent, retrying until the connect deadline,
/// and sends it the host's time and fresh entropy. Records and logs the outcome. Returns the
/// agent connection when it worked, for the requests that follow to reuse.
pub fn run(step: AfterRestoreStep, connect_timeout: Duration) -> Option<AgentClient> {
    let began = Instant::now();
    let mut connected = None;
    let (outcome, detail) = match &step.route {
        AgentRoute::None(why) => (AfterRestoreOutcome::Skipped, (*why).to_string()),
        AgentRoute::Vsock(uds) => match refresh_guest(uds, connect_timeout) {
            Ok(client) => {
                connected = Some(client);
                (
                    AfterRestoreOutcome::Done,
                    "the guest agent set its clock to the host's and took fresh entropy".into(),
                )
            }
            Err(why) => (AfterRestoreOutcome::Failed, why),
        },
    };
    let took = began.elapsed();
    step.metrics.record(outcome, took);
    match outcome {
        AfterRestoreOutcome::Done => {
            tracing::info!("after restore: {detail} ({took:?})")
        }
        // A warning: whoever relies on the guest's clock or randomness should know it is stale.
        AfterRestoreOutcome::Skipped => tracing::warn!(
            "after restore: skipped: {detail}; the guest's clock and RNG stay as snapshotted"
        ),
        AfterRestoreOutcome::Failed => tracing::warn!(
            "after restore: failed after {took:?}: {detail}; the guest's clock and RNG stay as \
             snapshotted"
        ),
    }
    connected
}

/// How long to wait before connecting again after the agent closed a fresh connection.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// Whether a connect that reached a listener but then lost the connection is worth repeating:
/// right after a restore the guest's vsock transport reset can close a connection its agent had
/// just accepted, before the agent's Hello.
fn closed_early(e: &ClientError) -> bool {
    match e {
        ClientError::Handshake(agentvm_protocol::Error::ClosedBeforeHello)
        | ClientError::ConnectionClosed(_) => true,
        ClientError::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        _ => false,
    }
}

/// Connects and sends AfterRestore, again (until `connect_timeout`) whenever the connection is
/// lost early: right after a restore the guest's vsock transport reset can close a connection
/// its agent had just accepted.
fn refresh_guest(uds: &Path, connect_timeout: Duration) -> Result<AgentClient, String> {
    let deadline = Instant::now() + connect_timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let result = AgentClient::connect_vsock_uds(uds, AGENT_VSOCK_PORT, left)
            .map_err(|e| {
                let why = format!(
                    "the guest agent does not answer (vsock port {AGENT_VSOCK_PORT} via {}): {e}",
                    uds.display()
                );
                (closed_early(&e), why)
            })
            .and_then(|client| send_after_restore(&client).map(|()| client));
        match result {
            Ok(client) => return Ok(client),
            Err((true, why)) if Instant::now() + RECONNECT_PAUSE < deadline => {
                tracing::debug!("after restore: {why}; connecting again");
                std::thread::sleep(RECONNECT_PAUSE);
            }
            Err((_, why)) => return Err(why),
        }
    }
}

/// The AfterRestore call; the error says whether the connection was lost (worth a new one).
fn send_after_restore(client: &AgentClient) -> Result<(), (bool, String)> {
    let entropy = host_entropy().map_err(|e| (false, e))?;
    // Read as late as possible: the guest's clock is set to this instant plus the call's
    // one-way latency (well under a millisecond over vsock).
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| {
        (
            false,
            format!("the host clock is before the Unix epoch: {e}"),
        )
    })?;
    let realtime_ns = i64::try_from(now.as_nanos()).map_err(|_| {
        (
            false,
            "the host clock is past what fits in 64-bit nanoseconds".to_string(),
        )
    })?;
    client.after_restore(realtime_ns, &entropy).map_err(|e| {
        (
            closed_early(&e),
            format!("the guest agent refused AfterRestore: {e}"),
        )
    })
}

/// [`ENTROPY_BYTES`] from the getrandom(2) syscall. rustix's rather than the getrandom crate's:
/// in this static build that crate cannot find glibc's `getrandom` (dlsym) and falls back to
/// opening `/dev/urandom`, which the `agent_jobs` filter forbids.
fn host_entropy() -> Result<[u8; ENTROPY_BYTES], String> {
    let mut entropy = [0u8; ENTROPY_BYTES];
    let mut filled = 0;
    // Requests up to 256 bytes are served whole once the pool is initialised; the loop covers a
    // signal arriving first.
    while filled < entropy.len() {
        match rustix::rand::getrandom(
            &mut entropy[filled..],
            rustix::rand::GetRandomFlags::empty(),
        ) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(format!("cannot read host entropy (getrandom): {e}")),
        }
    }
    Ok(entropy)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn outcomes_are_counted_with_the_last_duration() {
        let metrics = AfterRestoreMetrics::default();
        assert_eq!(metrics.snapshot().last_duration_seconds, None);
        metrics.record(AfterRestoreOutcome::Failed, Duration::from_millis(1500));
        let counts = metrics.snapshot();
        assert_eq!(
            counts.outcomes,
            vec![
                (AfterRestoreOutcome::Done, 0),
                (AfterRestoreOutcome::Skipped, 0),
                (AfterRestoreOutcome::Failed, 1),
            ]
        );
        assert_eq!(counts.last_duration_seconds, Some(1.5));
    }

    #[test]
    fn a_vm_without_an_agent_route_is_skipped_at_once() {
        let metrics = AfterRestoreMetrics::default();
        run(
            AfterRestoreStep {
                route: AgentRoute::None(NO_VSOCK),
                metrics: metrics.clone(),
            },
            AFTER_RESTORE_CONNECT_TIMEOUT,
        );
        assert_eq!(
            metrics.snapshot().outcomes[1],
            (AfterRestoreOutcome::Skipped, 1)
        );
    }

    #[test]
    fn an_agent_that_never_answers_fails_within_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = AfterRestoreMetrics::default();
        run(
            AfterRestoreStep {
                route: AgentRoute::Vsock(dir.path().join("missing.sock")),
                metrics: metrics.clone(),
            },
            Duration::from_millis(200),
        );
        let counts = metrics.snapshot();
        assert_eq!(counts.outcomes[2], (AfterRestoreOutcome::Failed, 1));
        assert!(counts.last_duration_seconds.is_some());
    }

    /// A guest agent behind a hybrid-vsock socket at `uds` that answers one `AfterRestore` with
    /// `answer` (None: Done) and, once the host hung up, returns what it was sent.
    pub(crate) fn fake_agent(
        uds: &Path,
        answer: Option<agentvm_protocol::ErrorCode>,
    ) -> std::thread::JoinHandle<agentvm_protocol::AfterRestore> {
        fake_agent_after_drops(uds, answer, 0)
    }

    /// [`fake_agent`] that first closes `drops` connections right after the vsock `OK` line, as
    /// a guest's transport reset can just after a restore.
    fn fake_agent_after_drops(
        uds: &Path,
        answer: Option<agentvm_protocol::ErrorCode>,
        drops: usize,
    ) -> std::thread::JoinHandle<agentvm_protocol::AfterRestore> {
        use agentvm_protocol::{Done, ErrorMsg, Features, FrameReader, FrameWriter, Hello};
        use agentvm_protocol::{Message, Role};
        use std::io::{Read, Write};
        let listener = std::os::unix::net::UnixListener::bind(uds).unwrap();
        std::thread::spawn(move || {
            for _ in 0..drops {
                let (mut stream, _) = listener.accept().unwrap();
                let mut byte = [0u8; 1];
                while byte[0] != b'\n' {
                    stream.read_exact(&mut byte).unwrap();
                }
                stream.write_all(b"OK 1073741824\n").unwrap();
            }
            let (mut stream, _) = listener.accept().unwrap();
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while byte[0] != b'\n' {
                stream.read_exact(&mut byte).unwrap();
                line.push(byte[0]);
            }
            assert_eq!(line, format!("CONNECT {AGENT_VSOCK_PORT}\n").as_bytes());
            stream.write_all(b"OK 1073741824\n").unwrap();
            // Hang detector: a host that never hangs up fails the test instead of stalling it.
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut reader = FrameReader::new(stream.try_clone().unwrap());
            let mut writer = FrameWriter::new(stream);
            let hello = Hello::new(Role::Guest, "fake-agent", Features::ALL);
            agentvm_protocol::handshake(&mut reader, &mut writer, &hello).unwrap();
            let request = match reader.read_message().unwrap() {
                Some(Message::AfterRestore(request)) => request,
                other => panic!("expected AfterRestore, got {other:?}"),
            };
            let id = request.id;
            let reply = match answer {
                None => Message::Done(Done { id }),
                Some(code) => Message::ErrorMsg(ErrorMsg {
                    id,
                    code,
                    message: "cannot set the guest clock".into(),
                }),
            };
            writer.write_message(&reply).unwrap();
            writer.flush().unwrap();
            // Like a real agent, it keeps the connection until the host hangs up.
            while let Ok(Some(_)) = reader.read_message() {}
            request
        })
    }

    fn now_ns() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64
    }

    #[test]
    fn the_agent_gets_the_host_clock_and_fresh_entropy() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let metrics = AfterRestoreMetrics::default();
        let mut sent = Vec::new();
        for _ in 0..2 {
            let _ = std::fs::remove_file(&uds);
            let agent = fake_agent(&uds, None);
            let before = now_ns();
            let client = run(
                AfterRestoreStep {
                    route: AgentRoute::Vsock(uds.clone()),
                    metrics: metrics.clone(),
                },
                AFTER_RESTORE_CONNECT_TIMEOUT,
            );
            let after = now_ns();
            assert!(client.is_some(), "the connection is handed on");
            drop(client);
            let request = agent.join().unwrap();
            assert!(
                (before..=after).contains(&request.realtime_ns),
                "{before} <= {} <= {after}",
                request.realtime_ns
            );
            assert_eq!(request.entropy.len(), ENTROPY_BYTES);
            sent.push(request.entropy);
        }
        assert_ne!(sent[0], sent[1], "each restore gets its own entropy");
        assert_eq!(
            metrics.snapshot().outcomes[0],
            (AfterRestoreOutcome::Done, 2)
        );
    }

    #[test]
    fn connections_closed_by_the_transport_reset_are_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let agent = fake_agent_after_drops(&uds, None, 2);
        let client = refresh_guest(&uds, Duration::from_secs(10));
        assert!(client.is_ok(), "{:?}", client.err());
        drop(client);
        assert_eq!(agent.join().unwrap().entropy.len(), ENTROPY_BYTES);
    }

    #[test]
    fn an_agent_refusal_fails_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let agent = fake_agent(&uds, Some(agentvm_protocol::ErrorCode::PermissionDenied));
        let metrics = AfterRestoreMetrics::default();
        let client = run(
            AfterRestoreStep {
                route: AgentRoute::Vsock(uds),
                metrics: metrics.clone(),
            },
            AFTER_RESTORE_CONNECT_TIMEOUT,
        );
        agent.join().unwrap();
        assert!(client.is_none());
        assert_eq!(
            metrics.snapshot().outcomes[2],
            (AfterRestoreOutcome::Failed, 1)
        );
    }

    #[test]
    fn the_gate_holds_requests_until_opened() {
        let gate = AfterRestoreGate::default();
        assert!(gate.wait_open(Duration::ZERO), "open at first");
        gate.close();
        assert!(!gate.wait_open(Duration::from_millis(10)));
        let opener = gate.clone();
        let thread = std::thread::spawn(move || opener.open());
        assert!(gate.wait_open(Duration::from_secs(10)));
        thread.join().unwrap();
    }
}
