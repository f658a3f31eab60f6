//! Audit events stamped with this sandbox's name.

use crate::audit::{AuditEvent, AuditLog};

#[derive(Clone)]
pub struct Recorder {
    log: AuditLog,
    sandbox: String,
}

impl Recorder {
    pub fn new(log: AuditLog, sandbox: String) -> Self {
        Self { log, sandbox }
    }

    pub fn record(&self, mut event: AuditEvent) {
        event.sandbox.clone_from(&self.sandbox);
        self.log.record(&event);
    }
}
