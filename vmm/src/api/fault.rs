//! API errors: an HTTP status and Firecracker's `{"fault_message": "..."}` body.

use hyper::StatusCode;

/// Firecracker's wording for a pre-boot-only request after InstanceStart.
pub const AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub status: StatusCode,
    pub message: String,
}

#[derive(serde::Serialize)]
struct FaultBody<'a> {
    fault_message: &'a str,
}

impl Fault {
    /// 400: the request is well-formed HTTP but its body, values or timing are wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: message.into(),
        }
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: message.into(),
        }
    }

    /// 409: the request is valid but the microVM is not in a state to serve it.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::CONFLICT,
            message: message.into(),
        }
    }

    /// 503: something the request needs (the guest agent) does not answer now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
        }
    }

    /// 500: the VMM failed doing something the request was entitled to.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
        }
    }

    /// A pre-boot-only request (named by `what`) after InstanceStart.
    pub fn after_start(what: &str) -> Self {
        Self::bad_request(format!(
            "{AFTER_START} ({what} configures the microVM before InstanceStart)"
        ))
    }

    pub fn body(&self) -> String {
        serde_json::to_string(&FaultBody {
            fault_message: &self.message,
        })
        // Serialising a struct holding one string cannot fail; keep a valid body regardless.
        .unwrap_or_else(|_| String::from("{\"fault_message\":\"internal error\"}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_firecrackers_shape_and_escapes_quotes() {
        let fault = Fault::bad_request("bad \"x\"");
        let value: serde_json::Value = serde_json::from_str(&fault.body()).unwrap();
        assert_eq!(value, serde_json::json!({"fault_message": "bad \"x\""}));
        assert_eq!(fault.status, StatusCode::BAD_REQUEST);
        assert!(Fault::after_start("PUT /boot-source")
            .message
            .starts_with(AFTER_START));
    }
}
