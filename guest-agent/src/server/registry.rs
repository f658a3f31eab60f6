//! The live requests of one connection, by id: what the reading loop routes `Data`, `Eof`,
//! `Window`, `Kill`, `Resize` and `Close` to, and what the connection's teardown closes.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::context::RequestState;

#[derive(Default)]
pub(crate) struct Registry {
    state: Mutex<RegistryState>,
}

#[derive(Default)]
struct RegistryState {
    requests: HashMap<u64, Arc<RequestState>>,
    /// Once the connection is gone, no new request may register.
    gone: bool,
}

/// Why a request could not be registered.
pub(crate) enum RegisterError {
    DuplicateId,
    ConnectionGone,
}

impl Registry {
    pub(crate) fn register(&self, request: Arc<RequestState>) -> Result<(), RegisterError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.gone {
            return Err(RegisterError::ConnectionGone);
        }
        match state.requests.entry(request.id()) {
            Entry::Occupied(_) => Err(RegisterError::DuplicateId),
            Entry::Vacant(slot) => {
                slot.insert(request);
                Ok(())
            }
        }
    }

    pub(crate) fn get(&self, id: u64) -> Option<Arc<RequestState>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.requests.get(&id).cloned()
    }

    pub(crate) fn contains(&self, id: u64) -> bool {
        self.get(id).is_some()
    }

    pub(crate) fn remove(&self, id: u64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.requests.remove(&id);
    }

    /// The connection ended: every live request is closed (execs and PTYs kill their processes)
    /// and no new one may start.
    pub(crate) fn close_all(&self) {
        let requests: Vec<_> = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.gone = true;
            state.requests.values().cloned().collect()
        };
        for request in requests {
            request.close();
        }
    }
}
