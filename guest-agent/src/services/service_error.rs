//! A failed request as the host will see it: an [`ErrorCode`] and a message naming the thing
//! that failed.

use std::fmt;
use std::io;
use std::path::Path;

use agentvm_protocol::ErrorCode;

/// What a service answers instead of its result; becomes the request's final `ErrorMsg`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    pub code: ErrorCode,
    pub message: String,
}

impl ServiceError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    /// "cannot `action` `path`: `reason`", with the code the OS error maps to.
    pub fn io(action: &str, path: &Path, error: &io::Error) -> Self {
        Self::new(
            ErrorCode::from_io(error),
            format!("cannot {action} {}: {}", path.display(), os_reason(error)),
        )
    }
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ServiceError {}

/// Why a streaming service stopped: the request failed (answer the host with an `ErrorMsg`),
/// or the sink taking its output failed (typically the connection is gone: nothing to answer).
#[derive(Debug)]
pub enum StreamFailure<E> {
    Request(ServiceError),
    Sink(E),
}

impl<E> From<ServiceError> for StreamFailure<E> {
    fn from(error: ServiceError) -> Self {
        StreamFailure::Request(error)
    }
}

/// The OS's text for an error without std's " (os error N)" suffix and what follows it: the host
/// shows the message to people, and the code already travels as the `ErrorCode`.
pub fn os_reason(error: &io::Error) -> String {
    // Wrapped errors (e.g. tempfile's) append more after the suffix: the path, which the
    // caller's message names already.
    let text = error.to_string();
    match text.find(" (os error ") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

/// Paths in requests are absolute guest paths: a relative one would silently depend on the
/// agent's working directory.
pub fn require_absolute<'a>(path: &'a str, what: &str) -> Result<&'a Path, ServiceError> {
    if path.is_empty() {
        return Err(ServiceError::invalid(format!("cannot {what}: empty path")));
    }
    if path.contains('\0') {
        return Err(ServiceError::invalid(format!(
            "cannot {what} {path:?}: the path contains a NUL byte"
        )));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(ServiceError::invalid(format!(
            "cannot {what} {path}: the path must be absolute"
        )));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_name_the_action_and_path_without_the_os_error_suffix() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        let err = ServiceError::io("read", Path::new("/x"), &e);
        assert_eq!(err.code, ErrorCode::NotFound);
        assert_eq!(err.message, "cannot read /x: No such file or directory");
        let custom = io::Error::other("weird");
        assert_eq!(os_reason(&custom), "weird");
    }

    #[test]
    fn relative_empty_and_nul_paths_are_invalid() {
        for bad in ["", "rel/path", "./x", "/a\0b"] {
            let err = require_absolute(bad, "read").unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidArgument, "{bad:?}");
        }
        assert_eq!(
            require_absolute("x", "stat").unwrap_err().message,
            "cannot stat x: the path must be absolute"
        );
        assert_eq!(require_absolute("/a/b", "read").unwrap(), Path::new("/a/b"));
    }
}
