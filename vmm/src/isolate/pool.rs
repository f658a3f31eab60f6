//! Pre-created isolates of one template. Taking one is popping a ready VM (or, when the pool is
//! empty, mapping the template into a new VM); giving it back resets it in place (its private
//! pages dropped, its registers reloaded), so the next job starts from the template's state with
//! nothing left of the previous one.

use std::sync::{Arc, Mutex};

use super::hostcalls::HostContext;
use super::{Isolate, IsolateConfig, IsolateError, JobSpec, Template, Value};

pub struct Pool {
    template: Arc<Template>,
    idle: Mutex<Vec<Isolate>>,
    /// How many idle isolates the pool keeps.
    capacity: usize,
}

impl Pool {
    /// Boots the template and pre-creates `warm` isolates from it; keeps up to `capacity` idle.
    pub fn new(config: IsolateConfig, warm: usize, capacity: usize) -> Result<Pool, IsolateError> {
        let template = Template::new(config)?;
        let idle = (0..warm.min(capacity))
            .map(|_| Isolate::from_template(&template))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Pool {
            template,
            idle: Mutex::new(idle),
            capacity,
        })
    }

    pub fn template(&self) -> &Arc<Template> {
        &self.template
    }

    pub fn idle(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// A ready isolate: an idle one, or a new one mapped from the template.
    pub fn take(&self) -> Result<Isolate, IsolateError> {
        let pooled = self.idle.lock().ok().and_then(|mut v| v.pop());
        match pooled {
            Some(isolate) => Ok(isolate),
            None => Isolate::from_template(&self.template),
        }
    }

    /// Resets `isolate` and keeps it if there is room; an isolate that cannot be reset is dropped.
    pub fn give_back(&self, mut isolate: Isolate) {
        if isolate.reset().is_err() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.capacity {
                idle.push(isolate);
            }
        }
    }

    /// Takes an isolate, runs `job` in it and gives it back.
    pub fn run(
        &self,
        job: &JobSpec,
        ctx: &mut HostContext<'_>,
    ) -> Result<Vec<Value>, IsolateError> {
        let mut isolate = self.take()?;
        let result = isolate.run(job, ctx);
        self.give_back(isolate);
        result
    }
}
