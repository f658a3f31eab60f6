//! The after-restore handler: `AfterRestore` → `Done` once the clock is set and the entropy
//! credited (logic in `services::after_restore`) and, in a guest with a NIC, the egress CA
//! fetched again: the restoring VMM's egress filter is a new one, with a new sandbox CA, so the
//! one installed at boot would fail every intercepted HTTPS connection.

use std::path::Path;

use agentvm_protocol::{AfterRestore, Done, ErrorCode, Message};

use super::context::RequestContext;
use crate::egress_ca;
use crate::network::nic_configured;
use crate::services::after_restore::{after_restore, RANDOM_DEVICE};

pub fn after_restore_request(ctx: RequestContext, request: AfterRestore) {
    let id = ctx.id();
    if let Err(e) = after_restore(
        request.realtime_ns,
        &request.entropy,
        Path::new(RANDOM_DEVICE),
    ) {
        return ctx.fail(e.code, e.message);
    }
    if nic_configured() {
        let store = egress_ca::TrustStore::system();
        if let Err(e) = egress_ca::install_egress_ca(egress_ca::gateway_endpoint(), &store) {
            return ctx.fail(
                ErrorCode::from_io(&e),
                format!(
                    "after restore, the clock and RNG are refreshed, but the egress CA is not: {e}"
                ),
            );
        }
    }
    ctx.finish(Message::Done(Done { id }))
}
