//! The isolate tier: WebAssembly in a hardware-isolated guest with no operating system.
//!
//! Each isolate is a KVM VM with one vCPU and a few MiB of RAM running the isolate guest
//! (guest-agent/isolate, embedded in this binary): a freestanding program that runs wasmi at CPL 3
//! and reaches the host only through hypercalls (port I/O exits; the contract is `isolate_abi`).
//! Ring 0 runs one instruction per isolate (the `iretq` into ring 3), which keeps the tier fast
//! both on hosts where guest ring 0 is emulated and on ordinary VMX/SVM hosts.
//!
//! - [`Isolate::boot`] creates one from scratch: VM, RAM, tables, image; it runs until the guest
//!   says it is ready for a job.
//! - A [`Template`] is such an isolate frozen at that point (its RAM file and vCPU registers);
//!   [`Isolate::from_template`] maps the template's RAM copy-on-write into a new VM and sets the
//!   registers, and [`Isolate::reset`] drops the private pages again: that is the pool (pool.rs).
//! - [`Isolate::run`] writes a [`JobSpec`] into the guest and runs it under CPU-time and
//!   wall-clock limits, answering the guest's host calls (log, key/value, fetch) on the way;
//!   fetches go through the egress policy on a [`FetchThread`].

mod fetch_thread;
mod hostcalls;
mod image;
mod limits;
mod machine;
mod pool;
mod ram;
mod vm;

use std::time::Duration;

pub use egress::fetch::{FetchError, FetchRequest, FetchResponse, FetcherConfig};
pub use fetch_thread::FetchThread;
pub use hostcalls::{FetchFn, HostContext, KvStore, FETCH_MAX_RESPONSE_BYTES, NO_FETCH_POLICY};
pub use isolate_abi::Value;
pub use pool::Pool;
pub use vm::{Isolate, Template};

/// What every isolate of a template (or a one-off isolate) gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IsolateConfig {
    /// Largest linear memory a module may have (its `memory.grow` fails beyond it).
    pub max_wasm_mib: u32,
    /// Largest module (WebAssembly binary) a job may carry.
    pub max_module_bytes: usize,
}

impl Default for IsolateConfig {
    fn default() -> Self {
        IsolateConfig {
            max_wasm_mib: 64,
            max_module_bytes: 8 << 20,
        }
    }
}

/// One job: call `function` of `module` with `args` (numbers as text, parsed by the parameter
/// types), within the limits.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub module: Vec<u8>,
    pub function: String,
    pub args: Vec<String>,
    pub cpu_limit: Duration,
    pub wall_limit: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum IsolateError {
    #[error("cannot create the isolate: {0}")]
    Setup(String),
    #[error("the module is {size} bytes; this isolate takes at most {max}")]
    ModuleTooLarge { size: usize, max: usize },
    #[error("invalid WebAssembly module: {0}")]
    InvalidModule(String),
    #[error("cannot instantiate the module: {0}")]
    Instantiate(String),
    #[error("{0}")]
    MissingExport(String),
    #[error("bad arguments: {0}")]
    BadArguments(String),
    #[error("the function trapped: {0}")]
    Trap(String),
    #[error("CPU time limit exceeded ({limit:?})")]
    CpuLimitExceeded { limit: Duration },
    #[error("wall-clock limit exceeded ({limit:?})")]
    WallLimitExceeded { limit: Duration },
    #[error("the isolate ran out of memory: {0}")]
    OutOfMemory(String),
    /// The guest runtime itself failed: a CPU exception, a panic, a call it should not make.
    #[error("the isolate guest crashed: {0}")]
    Crashed(String),
    #[error("KVM failed while running the isolate: {0}")]
    Kvm(String),
}

impl IsolateError {
    /// A short, stable name of the error's kind (the API's `error.kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            IsolateError::Setup(_) => "setup",
            IsolateError::ModuleTooLarge { .. } => "module_too_large",
            IsolateError::InvalidModule(_) => "invalid_module",
            IsolateError::Instantiate(_) => "instantiate",
            IsolateError::MissingExport(_) => "missing_export",
            IsolateError::BadArguments(_) => "bad_arguments",
            IsolateError::Trap(_) => "trap",
            IsolateError::CpuLimitExceeded { .. } => "cpu_limit_exceeded",
            IsolateError::WallLimitExceeded { .. } => "wall_limit_exceeded",
            IsolateError::OutOfMemory(_) => "out_of_memory",
            IsolateError::Crashed(_) => "crashed",
            IsolateError::Kvm(_) => "kvm",
        }
    }
}
