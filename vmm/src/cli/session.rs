//! What `agentvm run` does with the guest agent once the VM is up: connect over vsock, publish
//! ports, run the command (plain, with stdin, or on a terminal) and return its exit status.

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentvm_client::{AgentClient, ClientError, ExecEvent, ForwardHandle, ProcessSpecExt};
use agentvm_protocol::{ExitStatus, ProcessSpec, AGENT_VSOCK_PORT};

use super::publish::{HostEndpoint, Publish};
use super::terminal;

/// Working directory of the command in the guest.
const GUEST_CWD: &str = "/root";
/// How long one connection attempt may take before the CLI looks at the VM again.
const CONNECT_SLICE: Duration = Duration::from_millis(500);

/// The guest command and how to attach to it, shared by `run` and `exec`.
#[derive(clap::Args)]
pub struct GuestCommand {
    /// Keep stdin open and forward it to the command.
    #[arg(short, long)]
    pub interactive: bool,
    /// Run the command on a terminal in the guest (with -i: the host terminal goes to raw mode
    /// and its size follows the host window).
    #[arg(short, long)]
    pub tty: bool,
    /// Forward a host port or Unix socket to a guest TCP port while the command runs: GUEST,
    /// HOST:GUEST, ADDR:HOST:GUEST or unix:PATH:GUEST (repeatable).
    #[arg(short, long, value_name = "SPEC")]
    pub publish: Vec<Publish>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Why the session ended without an exit status.
pub enum SessionError {
    /// The VM stopped (the caller reports why from its outcome).
    VmEnded,
    /// The connection to the agent broke: the guest is probably going down.
    ConnectionLost(String),
    Failed(String),
}

impl From<String> for SessionError {
    fn from(message: String) -> Self {
        SessionError::Failed(message)
    }
}

/// Connects to the agent, retrying while the guest boots; stops early with what `give_up` returns
/// (the VM is gone, or the agent said it cannot serve).
pub fn connect(
    uds: &Path,
    timeout: Duration,
    give_up: &dyn Fn() -> Option<SessionError>,
) -> Result<AgentClient, SessionError> {
    let deadline = Instant::now() + timeout;
    loop {
        let slice = CONNECT_SLICE.min(deadline.saturating_duration_since(Instant::now()));
        let e = match AgentClient::connect_vsock_uds(uds, AGENT_VSOCK_PORT, slice) {
            Ok(client) => return Ok(client),
            Err(e) => e,
        };
        if let Some(reason) = give_up() {
            return Err(reason);
        }
        if Instant::now() >= deadline {
            return Err(SessionError::Failed(format!(
                "the guest agent did not answer on vsock port {AGENT_VSOCK_PORT} within {:.0} s: {e}",
                timeout.as_secs_f64()
            )));
        }
        // Retrying cannot fix a version mismatch or an unusable socket.
        if matches!(e, ClientError::Handshake(_) | ClientError::Connect { .. }) {
            return Err(SessionError::Failed(e.to_string()));
        }
    }
}

/// Runs the session; returns the command's exit status.
pub fn run_session(
    client: &AgentClient,
    options: &GuestCommand,
) -> Result<ExitStatus, SessionError> {
    let _forwards = publish_ports(client, &options.publish)?;
    let spec = ProcessSpec::argv(options.command.iter().cloned()).cwd(GUEST_CWD);
    if options.tty {
        run_on_terminal(client, spec, options.interactive)
    } else {
        run_plain(client, spec, options.interactive)
    }
}

/// Forwards that end (and remove their Unix sockets) when dropped.
struct Forwards {
    handles: Vec<ForwardHandle>,
    unix_paths: Vec<PathBuf>,
}

impl Drop for Forwards {
    fn drop(&mut self) {
        for handle in self.handles.drain(..) {
            handle.stop();
        }
        for path in &self.unix_paths {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn publish_ports(client: &AgentClient, publish: &[Publish]) -> Result<Forwards, String> {
    let mut forwards = Forwards {
        handles: Vec::new(),
        unix_paths: Vec::new(),
    };
    for p in publish {
        let (handle, shown) = match &p.host {
            HostEndpoint::Tcp(addr) => {
                let listener = TcpListener::bind(addr)
                    .map_err(|e| format!("--publish: cannot listen on {addr}: {e}"))?;
                let bound = listener
                    .local_addr()
                    .map_err(|e| format!("--publish: {addr}: {e}"))?;
                (
                    client.forward_listener(listener, p.guest_port),
                    bound.to_string(),
                )
            }
            HostEndpoint::Unix(path) => {
                let listener = UnixListener::bind(path).map_err(|e| {
                    format!(
                        "--publish: cannot listen on Unix socket {}: {e}",
                        path.display()
                    )
                })?;
                forwards.unix_paths.push(path.clone());
                (
                    client.forward_listener(listener, p.guest_port),
                    format!("unix:{}", path.display()),
                )
            }
        };
        let handle =
            handle.map_err(|e| format!("--publish {shown} -> guest port {}: {e}", p.guest_port))?;
        eprintln!("agentvm: publishing {shown} -> guest port {}", p.guest_port);
        forwards.handles.push(handle);
    }
    Ok(forwards)
}

fn agent_error(e: ClientError) -> SessionError {
    match e {
        ClientError::ConnectionClosed(_) => SessionError::ConnectionLost(e.to_string()),
        other => SessionError::Failed(other.to_string()),
    }
}

fn run_plain(
    client: &AgentClient,
    spec: ProcessSpec,
    interactive: bool,
) -> Result<ExitStatus, SessionError> {
    let mut exec = client.exec(spec, interactive).map_err(agent_error)?;
    if let Some(mut stdin) = exec.take_stdin() {
        // Detached: a read from the host's stdin cannot be interrupted, and the process exits
        // right after the command ends anyway.
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                let _ = io::copy(&mut io::stdin().lock(), &mut stdin);
                let _ = stdin.close();
            })
            .map_err(|e| format!("cannot start the stdin thread: {e}"))?;
    }
    let mut stdout = io::stdout().lock();
    let mut stderr = io::stderr();
    loop {
        match exec.next_event().map_err(agent_error)? {
            Some(ExecEvent::Stdout(data)) => {
                // A closed host stdout (e.g. `| head`) must not stop the command's exit status.
                let _ = stdout.write_all(&data).and_then(|_| stdout.flush());
            }
            Some(ExecEvent::Stderr(data)) => {
                let _ = stderr.write_all(&data);
            }
            Some(ExecEvent::Exited { status, .. }) => return Ok(status),
            None => {
                return Err(SessionError::Failed(
                    "the guest agent ended the command without an exit status".into(),
                ))
            }
        }
    }
}

fn run_on_terminal(
    client: &AgentClient,
    spec: ProcessSpec,
    interactive: bool,
) -> Result<ExitStatus, SessionError> {
    let stdin = io::stdin();
    let stdout = io::stdout();
    let (rows, cols) = terminal::window_size(stdout.as_fd())
        .or_else(|| terminal::window_size(stdin.as_fd()))
        .unwrap_or((24, 80));
    let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
    let mut session = client
        .pty_open(spec, &term, rows, cols)
        .map_err(agent_error)?;
    let _raw = if interactive && terminal::is_terminal(stdin.as_fd()) {
        Some(
            terminal::RawMode::enter(stdin.as_fd())
                .map_err(|e| format!("cannot put the terminal in raw mode: {e}"))?,
        )
    } else {
        None
    };
    let resizer = session.input();
    terminal::on_resize(move || {
        if let Some((rows, cols)) = terminal::window_size(io::stdout().as_fd()) {
            let _ = resizer.resize(rows, cols);
        }
    })
    .map_err(|e| format!("cannot watch for terminal resizes: {e}"))?;
    if interactive {
        let mut input = session.input();
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                let _ = io::copy(&mut io::stdin().lock(), &mut input);
            })
            .map_err(|e| format!("cannot start the stdin thread: {e}"))?;
    }
    let mut out = stdout.lock();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match session.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let _ = out.write_all(&buf[..n]).and_then(|_| out.flush());
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {
                return Err(SessionError::ConnectionLost(format!(
                    "terminal session: {e}"
                )))
            }
            Err(e) => return Err(SessionError::Failed(format!("terminal session: {e}"))),
        }
    }
    session.exit().map(|(status, _)| status).ok_or_else(|| {
        SessionError::Failed("the terminal session ended without an exit status".into())
    })
}
