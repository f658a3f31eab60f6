//! `Exec`: run a process in its own process group, stream its stdout and stderr separately under
//! their windows, feed it the host's stdin, and report its exit after all its output.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use agentvm_protocol::{ErrorCode, Exec, Message, Started, Stream};

use super::context::RequestContext;
use super::dispatch::HELPER_STACK;
use super::fd::{signal_group, Trigger};
use super::input::spawn_input_feeder;
use super::output::{pump, stop_after_grace, EXIT_GRACE};
use super::process_spec::{build_command, program_name};
use super::supervise::{finish, spawn_supervised, supervise, Event, OnClose};

pub(crate) fn run_exec(ctx: RequestContext, request: Exec) {
    let id = ctx.id();
    let mut command = match build_command(&request.spec) {
        Ok(command) => command,
        Err(e) => return ctx.fail(e.code, e.message),
    };
    let stop = match Trigger::new() {
        Ok(stop) => stop,
        Err(e) => return ctx.fail(ErrorCode::ResourceLimit, format!("cannot set up exec: {e}")),
    };
    command
        .stdin(if request.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let (events_tx, events) = mpsc::channel();
    let spawned = spawn_supervised(&ctx, &mut command, &events_tx);
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            return ctx.fail(
                ErrorCode::SpawnFailed,
                format!("cannot run {}: {e}", program_name(&request.spec)),
            )
        }
    };
    let pid = child.id();
    let stdout = child.stdout.take().map(OwnedFd::from);
    let stderr = child.stderr.take().map(OwnedFd::from);
    let stdin = child.stdin.take().map(OwnedFd::from);
    // `child` is never waited for: the reaper owns that.
    drop(child);

    let _ = ctx.send(&Message::Started(Started { id, pid }));
    ctx.on_control(move |control| {
        let _ = events_tx.send(Event::Control(control));
    });
    if let Some(stdin) = stdin {
        if let Err(e) = spawn_input_feeder(ctx.input().clone(), ctx.on_close(), stdin) {
            // Without a feeder the process would wait for input for ever.
            let _ = signal_group(pid, libc::SIGKILL);
            eprintln!("agentvm-guest-agent: no stdin thread for request {id}: {e}");
        }
    }

    let timeout = request.spec.timeout_ms.map(Duration::from_millis);
    let outcome = std::thread::scope(|scope| {
        let (done_tx, done) = mpsc::channel();
        for (stream, source) in [(Stream::Stdout, stdout), (Stream::Stderr, stderr)] {
            let Some(source) = source else { continue };
            let (ctx, stop, done_tx) = (&ctx, &stop, done_tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("exec-{id}-{stream:?}"))
                .stack_size(HELPER_STACK)
                .spawn_scoped(scope, move || {
                    pump(source, stop, done_tx, |data| {
                        ctx.send_data(stream, data).is_ok()
                    })
                });
            if let Err(e) = spawned {
                let _ = signal_group(pid, libc::SIGKILL);
                eprintln!("agentvm-guest-agent: no output thread for request {id}: {e}");
            }
        }
        drop(done_tx);
        let outcome = supervise(&ctx, pid, &events, timeout, OnClose::Kill);
        stop_after_grace(&done, &stop, EXIT_GRACE);
        outcome
    });
    finish(ctx, pid, outcome, "request");
}
