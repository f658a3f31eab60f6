//! The after-restore handler: `AfterRestore` → `Done` once the clock is set and the entropy
//! credited (logic in `services::after_restore`).

use std::path::Path;

use agentvm_protocol::{AfterRestore, Done, Message};

use super::context::RequestContext;
use crate::services::after_restore::{after_restore, RANDOM_DEVICE};

pub fn after_restore_request(ctx: RequestContext, request: AfterRestore) {
    let id = ctx.id();
    match after_restore(
        request.realtime_ns,
        &request.entropy,
        Path::new(RANDOM_DEVICE),
    ) {
        Ok(()) => ctx.finish(Message::Done(Done { id })),
        Err(e) => ctx.fail(e.code, e.message),
    }
}
