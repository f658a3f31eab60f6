//! Everything that can go wrong in the jailer, each naming the thing it is about.

use std::io;
use std::path::PathBuf;

use crate::exit_code;

#[derive(Debug, thiserror::Error)]
pub enum JailerError {
    /// A bad command line value, found before anything was created.
    #[error("{0}")]
    Usage(String),
    #[error(
        "a jail for id {id} already exists at {}: another sandbox is using it, or a previous one \
         was not cleaned up",
        path.display()
    )]
    JailExists { id: String, path: PathBuf },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup: {0}")]
    Cgroup(String),
    #[error("{call} failed: {source}")]
    Syscall {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("setting up the jail failed: {0}")]
    ChildSetup(String),
    #[error("the jail was not ready within {0} s (its setup hung); killed it")]
    SetupTimeout(u64),
    /// Waiting for the VMM, or signalling it, failed; the sandbox was killed.
    #[error("supervising the VMM failed: {0}; killed the sandbox")]
    Supervise(Box<JailerError>),
}

impl JailerError {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// The error of the last failed libc call.
    pub fn last_os(call: &'static str) -> Self {
        Self::Syscall {
            call,
            source: io::Error::last_os_error(),
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) | Self::JailExists { .. } => exit_code::USAGE,
            Self::Supervise(_) => exit_code::SUPERVISE,
            _ => exit_code::SETUP,
        }
    }
}

pub type Result<T> = std::result::Result<T, JailerError>;
