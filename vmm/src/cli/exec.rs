//! `agentvm exec`: run a command in a VM that is already running (started by `agentvm boot
//! --vsock-uds`, possibly under the jailer), through its guest agent.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use super::session::{self, GuestCommand, SessionError};
use super::signal_exit_code;
use agentvm_protocol::ExitStatus;

#[derive(Args)]
pub struct ExecArgs {
    /// The VM's vsock Unix socket (the `--vsock-uds` it was booted with; for a jailed VM, the
    /// path as seen from the host).
    #[arg(long, value_name = "PATH")]
    vsock_uds: PathBuf,
    /// How long to wait for the guest agent to answer (it may still be booting), in seconds.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    connect_timeout: f64,
    #[command(flatten)]
    guest: GuestCommand,
}

/// How long a missing socket may take to appear (a VMM started just before).
const SOCKET_APPEAR_TIMEOUT: Duration = Duration::from_secs(10);

pub fn exec(args: ExecArgs) -> Result<ExitCode, String> {
    if !args.connect_timeout.is_finite() || args.connect_timeout <= 0.0 {
        return Err(format!(
            "--connect-timeout must be a number of seconds > 0, got {}",
            args.connect_timeout
        ));
    }
    let timeout = Duration::from_secs_f64(args.connect_timeout);
    let uds = &args.vsock_uds;
    // The VMM creates the socket as it starts, so a missing one may only mean "not yet"; but a
    // mistyped path must not cost the whole connect timeout.
    let socket_deadline = Instant::now() + timeout.min(SOCKET_APPEAR_TIMEOUT);
    let give_up = || {
        (uds.symlink_metadata().is_err() && Instant::now() >= socket_deadline).then(|| {
            SessionError::Failed(format!(
                "{} does not exist: no VM is running with that --vsock-uds",
                uds.display()
            ))
        })
    };
    let result = session::connect(uds, timeout, &give_up).and_then(|client| {
        let status = session::run_session(&client, &args.guest);
        client.shutdown();
        status
    });
    match result {
        Ok(ExitStatus::Code(code)) => Ok(ExitCode::from(code.clamp(0, 255) as u8)),
        Ok(ExitStatus::Signal(sig)) => {
            eprintln!("agentvm: the command was killed by signal {sig}");
            Ok(signal_exit_code(sig))
        }
        Err(SessionError::Failed(message)) => Err(message),
        Err(SessionError::ConnectionLost(message)) => Err(format!(
            "the connection to the guest agent broke before the command finished (the VM may \
             have stopped): {message}"
        )),
        Err(SessionError::VmEnded) => Err("the VM stopped before the command finished".into()),
    }
}
