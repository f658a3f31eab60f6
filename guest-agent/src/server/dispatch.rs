//! Routes each message the host sends: requests to a handler on a thread of its own, stream and
//! control messages to the live request they name.
//!
//! Adding a service is one arm in [`dispatch`]: `start(conn, m.id, Some(Features::X), move |ctx|
//! module::handler(ctx, m))`, plus its bit in [`Services::features`](super::Services::features).

use std::sync::Arc;

use agentvm_protocol::{Data, Eof, ErrorCode, Features, Message, Stream, Window};

use super::connection::ConnectionShared;
use super::context::{Control, RequestContext, RequestState};
use super::registry::RegisterError;
use super::{after_restore, exec, files, port_forward, processes, pty, watch};

/// Handler threads need little stack, and 100 concurrent execs run four threads each; generous
/// still for unoptimised builds. Only touched pages cost memory.
const HANDLER_STACK: usize = 512 * 1024;
/// Stack of the helper threads handlers start (output pumps, input feeders, log collectors).
pub(crate) const HELPER_STACK: usize = 256 * 1024;

pub(crate) fn dispatch(message: Message, conn: &Arc<ConnectionShared>) {
    match message {
        Message::Ping(m) => start(conn, m.id, None, move |ctx| {
            ctx.finish(Message::Done(agentvm_protocol::Done { id: m.id }))
        }),

        Message::Exec(m) => start(conn, m.id, Some(Features::EXEC), move |ctx| {
            exec::run_exec(ctx, m)
        }),
        Message::ProcStart(m) => start(conn, m.id, Some(Features::PROCESSES), move |ctx| {
            processes::start(ctx, m)
        }),
        Message::ProcList(m) => start(conn, m.id, Some(Features::PROCESSES), move |ctx| {
            processes::list(ctx, m.id)
        }),
        Message::ProcWait(m) => start(conn, m.id, Some(Features::PROCESSES), move |ctx| {
            processes::wait(ctx, m)
        }),
        Message::ProcKill(m) => start(conn, m.id, Some(Features::PROCESSES), move |ctx| {
            processes::kill(ctx, m)
        }),
        Message::ProcLogs(m) => start(conn, m.id, Some(Features::PROCESSES), move |ctx| {
            processes::logs(ctx, m)
        }),
        Message::PtyOpen(m) => start(conn, m.id, Some(Features::PTY), move |ctx| {
            pty::run_pty(ctx, m)
        }),
        Message::WatchStart(m) => start(conn, m.id, Some(Features::WATCH), move |ctx| {
            watch::watch(ctx, m)
        }),
        Message::ReadFile(m) => start(conn, m.id, Some(Features::FILES), move |ctx| {
            files::read_file(ctx, m)
        }),
        Message::WriteFile(m) => start(conn, m.id, Some(Features::FILES), move |ctx| {
            files::write_file(ctx, m)
        }),
        Message::ListDir(m) => start(conn, m.id, Some(Features::FILES), move |ctx| {
            files::list_dir(ctx, m)
        }),
        Message::StatPath(m) => start(conn, m.id, Some(Features::FILES), move |ctx| {
            files::stat_path(ctx, m)
        }),
        Message::MakeDir(m) => start(conn, m.id, Some(Features::FILES), move |ctx| {
            files::make_dir(ctx, m)
        }),
        Message::RemovePath(m) => start(conn, m.id, Some(Features::FILES), move |ctx| {
            files::remove_path(ctx, m)
        }),
        Message::Connect(m) => start(conn, m.id, Some(Features::PORT_FORWARD), move |ctx| {
            port_forward::connect(ctx, m)
        }),
        Message::AfterRestore(m) => start(conn, m.id, Some(Features::AFTER_RESTORE), move |ctx| {
            after_restore::after_restore_request(ctx, m)
        }),

        Message::Data(Data { id, stream, data }) => {
            if stream != Stream::Stdin {
                return wrong_stream(conn, id, stream, "Data");
            }
            if let Some(request) = conn.registry.get(id) {
                if let Err(e) = request.push_input(data) {
                    conn.send_error(0, ErrorCode::Protocol, e);
                }
            }
        }
        Message::Eof(Eof { id, stream }) => {
            if stream != Stream::Stdin {
                return wrong_stream(conn, id, stream, "Eof");
            }
            if let Some(request) = conn.registry.get(id) {
                if let Err(e) = request.input_eof() {
                    conn.send_error(0, ErrorCode::Protocol, e);
                }
            }
        }
        Message::Window(Window { id, stream, bytes }) => {
            if stream == Stream::Stdin {
                return wrong_stream(conn, id, stream, "Window");
            }
            if let Some(request) = conn.registry.get(id) {
                if let Err(e) = request.grant(stream, bytes) {
                    conn.send_error(0, ErrorCode::Protocol, format!("request {id}: {e}"));
                }
            }
        }
        Message::Close(m) => {
            if let Some(request) = conn.registry.get(m.id) {
                request.close();
            }
        }
        Message::Kill(m) => control(conn, m.id, Control::Kill { signal: m.signal }),
        Message::Resize(m) => control(
            conn,
            m.id,
            Control::Resize {
                rows: m.rows,
                cols: m.cols,
            },
        ),

        // Hello twice, or a message only the guest sends.
        other => conn.send_error(
            0,
            ErrorCode::Protocol,
            format!(
                "the host may not send {} here (request {})",
                other.name(),
                other.request_id().unwrap_or(0)
            ),
        ),
    }
}

/// Registers request `id` and runs `handler` on its own thread, after checking that the
/// connection negotiated `feature` and that the id is free.
fn start(
    conn: &Arc<ConnectionShared>,
    id: u64,
    feature: Option<Features>,
    handler: impl FnOnce(RequestContext) + Send + 'static,
) {
    if let Some(feature) = feature {
        if !conn.features.contains(feature) {
            return conn.send_error(
                id,
                ErrorCode::Unsupported,
                format!(
                    "request {id} needs feature bits {:#x}, which this connection did not \
                     negotiate (agent offers {:#x}, both sides agreed on {:#x})",
                    feature.0,
                    conn.services.features().0,
                    conn.features.0
                ),
            );
        }
    }
    let state = match RequestState::new(id, Arc::clone(&conn.writer)) {
        Ok(state) => state,
        Err(e) => {
            return conn.send_error(
                id,
                ErrorCode::ResourceLimit,
                format!("request {id}: cannot set it up: {e}"),
            )
        }
    };
    match conn.registry.register(Arc::clone(&state)) {
        Ok(()) => {}
        Err(RegisterError::DuplicateId) => {
            return conn.send_error(
                id,
                ErrorCode::DuplicateId,
                format!("request id {id} is already in use by a running request"),
            )
        }
        Err(RegisterError::ConnectionGone) => return,
    }
    let ctx = RequestContext::new(state, Arc::clone(conn));
    let spawned = std::thread::Builder::new()
        .name(format!("request-{id}"))
        .stack_size(HANDLER_STACK)
        .spawn(move || handler(ctx));
    if let Err(e) = spawned {
        // The context went down with the closure and already answered `Internal`.
        eprintln!("agentvm-guest-agent: no thread for request {id}: {e}");
    }
}

fn control(conn: &ConnectionShared, id: u64, control: Control) {
    if let Some(request) = conn.registry.get(id) {
        request.control(control);
    }
}

fn wrong_stream(conn: &ConnectionShared, id: u64, stream: Stream, what: &str) {
    conn.send_error(
        0,
        ErrorCode::Protocol,
        format!("request {id}: the host may not send {what} on {stream:?}"),
    );
}
