//! The port-forward handler: `Connect` → `Ready`, bytes both ways, `Done` (logic in
//! `services::port_forward`).

use std::net::Shutdown;

use agentvm_protocol::{Connect, Done, Message, Ready, Stream};

use super::context::RequestContext;
use crate::services::port_forward::{connect_loopback, pump, CONNECT_TIMEOUT};

pub fn connect(ctx: RequestContext, request: Connect) {
    let id = ctx.id();
    let socket = match connect_loopback(request.port, CONNECT_TIMEOUT) {
        Ok(socket) => socket,
        Err(e) => return ctx.fail(e.code, e.message),
    };
    if ctx.send(&Message::Ready(Ready { id })).is_ok() {
        let close = ctx.on_close();
        pump(
            &socket,
            &**ctx.input(),
            close.fd(),
            |data| ctx.send_data(Stream::Stdout, data),
            || ctx.send_eof(Stream::Stdout),
        );
    }
    // The guest server sees the connection end before the host sees Done.
    let _ = socket.shutdown(Shutdown::Both);
    drop(socket);
    ctx.finish(Message::Done(Done { id }))
}
