//! `vm_superio::Trigger` implementations: how a legacy device signals the outside world.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Raises an interrupt by writing an `EventFd` registered with KVM as an irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    pub fn event(&self) -> &EventFd {
        &self.0
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Runs a callback: the i8042 reset line goes straight to the VMM's exit path this way, without
/// a file descriptor and an event loop round trip in between.
#[derive(Clone)]
pub struct CallbackTrigger(Arc<dyn Fn() + Send + Sync>);

impl CallbackTrigger {
    pub fn new(callback: impl Fn() + Send + Sync + 'static) -> Self {
        Self(Arc::new(callback))
    }
}

impl std::fmt::Debug for CallbackTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallbackTrigger")
    }
}

impl vm_superio::Trigger for CallbackTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        (self.0)();
        Ok(())
    }
}
