//! Credential values: read from the host (an environment variable or a file) when the policy is
//! loaded, held only in the VMM, and never printed.

use std::fmt;
use std::path::Path;

/// A credential value. `Debug` and `Display` print `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret from a value the caller already holds (tests, the API).
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that writes it into an upstream request.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `prefix` + the value of environment variable `name`.
    pub fn from_env(name: &str, prefix: &str) -> Result<Self, String> {
        match std::env::var(name) {
            Ok(value) if !value.is_empty() => {
                Self::checked(prefix, &value, || format!("environment variable {name}"))
            }
            Ok(_) => Err(format!("environment variable {name} is empty")),
            Err(std::env::VarError::NotPresent) => {
                Err(format!("environment variable {name} is not set"))
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(format!("environment variable {name} is not valid UTF-8"))
            }
        }
    }

    /// `prefix` + the contents of `path`, without its trailing newline.
    pub fn from_file(path: &Path, prefix: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
        let value = text.strip_suffix('\n').unwrap_or(&text);
        let value = value.strip_suffix('\r').unwrap_or(value);
        if value.is_empty() {
            return Err(format!("secret file {} is empty", path.display()));
        }
        Self::checked(prefix, value, || format!("secret file {}", path.display()))
    }

    /// A header value must not end the header early (CR/LF would let it add headers of its own).
    fn checked(prefix: &str, value: &str, source: impl Fn() -> String) -> Result<Self, String> {
        let joined = format!("{prefix}{value}");
        if joined.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(format!(
                "{} holds a line break or NUL, which a header value cannot carry",
                source()
            ));
        }
        Ok(Self(joined))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let secret = Secret::new("tok-123");
        assert_eq!(format!("{secret:?} {secret}"), "<redacted> <redacted>");
        assert_eq!(secret.expose(), "tok-123");
    }

    #[test]
    fn from_file_trims_one_newline_and_refuses_line_breaks() {
        let dir = std::env::temp_dir().join(format!("egress-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, "abc\n").unwrap();
        assert_eq!(
            Secret::from_file(&good, "Bearer ").unwrap().expose(),
            "Bearer abc"
        );
        let bad = dir.join("bad");
        std::fs::write(&bad, "abc\nX-Evil: 1\n").unwrap();
        let err = Secret::from_file(&bad, "").unwrap_err();
        assert!(err.contains("line break") && !err.contains("abc"), "{err}");
        let err = Secret::from_file(&dir.join("missing"), "").unwrap_err();
        assert!(err.contains("cannot read secret file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn from_env_names_the_variable_not_the_value() {
        let err = Secret::from_env("AGENTVM_EGRESS_TEST_UNSET_VARIABLE", "").unwrap_err();
        assert!(
            err.contains("AGENTVM_EGRESS_TEST_UNSET_VARIABLE is not set"),
            "{err}"
        );
    }
}
