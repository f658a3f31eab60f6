//! The rlimits the VMM starts with (`--resource-limit NAME=VALUE`).

use crate::config::usage;
use crate::error::Result;
use crate::sys;

/// Firecracker's jailer default: enough for a VMM's devices and sockets, small enough to bound
/// an fd leak.
pub const DEFAULT_NO_FILE: u64 = 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceLimits {
    pub no_file: u64,
    /// None: unlimited (inherited).
    pub fsize: Option<u64>,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        Self {
            no_file: DEFAULT_NO_FILE,
            fsize: None,
        }
    }
}

impl ResourceLimits {
    /// Applies one `no-file=N` or `fsize=BYTES`.
    pub fn apply_spec(&mut self, spec: &str) -> Result<()> {
        let bad = || {
            usage(format!(
                "--resource-limit {spec:?} is not no-file=N or fsize=BYTES (N at least 1)"
            ))
        };
        let (name, value) = spec.split_once('=').ok_or_else(bad)?;
        let value: u64 = value.parse().map_err(|_| bad())?;
        match name {
            "no-file" if value > 0 => self.no_file = value,
            "fsize" => self.fsize = Some(value),
            _ => return Err(bad()),
        }
        Ok(())
    }

    /// Sets soft and hard limits alike, so the VMM cannot raise them again.
    pub fn apply(&self) -> Result<()> {
        sys::setrlimit(libc::RLIMIT_NOFILE, self.no_file)?;
        // A VMM killed by its seccomp filter (SIGSYS) or any crash would otherwise dump core:
        // guest memory included, into the jail, at the size of the guest.
        sys::setrlimit(libc::RLIMIT_CORE, 0)?;
        if let Some(fsize) = self.fsize {
            sys::setrlimit(libc::RLIMIT_FSIZE, fsize)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let mut limits = ResourceLimits::default();
        limits.apply_spec("no-file=64").unwrap();
        limits.apply_spec("fsize=1048576").unwrap();
        assert_eq!(
            limits,
            ResourceLimits {
                no_file: 64,
                fsize: Some(1 << 20)
            }
        );
        for bad in [
            "no-file",
            "no-file=0",
            "no-file=-1",
            "nofile=5",
            "fsize=1k",
            "=3",
        ] {
            let err = limits.apply_spec(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }
}
