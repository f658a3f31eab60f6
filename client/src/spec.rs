//! Builder methods for [`ProcessSpec`], which the protocol crate keeps as a plain data type.

use std::time::Duration;

use agentvm_protocol::{Command, ProcessSpec};

/// Builds a [`ProcessSpec`]: `ProcessSpec::argv(["ls", "-l"]).cwd("/tmp").env("K", "v")`.
pub trait ProcessSpecExt: Sized {
    /// Runs `argv` directly (`PATH` lookup when `argv[0]` has no `/`).
    fn argv<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>;
    /// Runs `script` with `/bin/sh -c`.
    fn shell(script: impl Into<String>) -> Self;
    /// Adds an environment variable (applied in order, after the agent's environment).
    fn env(self, key: impl Into<String>, value: impl Into<String>) -> Self;
    /// Starts from an empty environment instead of the agent's.
    fn clear_env(self) -> Self;
    fn cwd(self, dir: impl Into<String>) -> Self;
    /// A user name, a numeric uid, or `uid:gid`.
    fn user(self, user: impl Into<String>) -> Self;
    /// The agent kills the process group after this long and reports `timed_out`.
    fn timeout(self, timeout: Duration) -> Self;
}

impl ProcessSpecExt for ProcessSpec {
    fn argv<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ProcessSpec::new(Command::Argv(argv.into_iter().map(Into::into).collect()))
    }

    fn shell(script: impl Into<String>) -> Self {
        ProcessSpec::new(Command::Shell(script.into()))
    }

    fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    fn clear_env(mut self) -> Self {
        self.clear_env = true;
        self
    }

    fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_fills_every_field() {
        let spec = ProcessSpec::argv(["ls", "-l"])
            .env("A", "1")
            .env("B", "2")
            .clear_env()
            .cwd("/tmp")
            .user("1000:1000")
            .timeout(Duration::from_millis(1500));
        assert_eq!(spec.command, Command::Argv(vec!["ls".into(), "-l".into()]));
        assert_eq!(
            spec.env,
            vec![("A".into(), "1".into()), ("B".into(), "2".into())]
        );
        assert!(spec.clear_env);
        assert_eq!(spec.cwd.as_deref(), Some("/tmp"));
        assert_eq!(spec.user.as_deref(), Some("1000:1000"));
        assert_eq!(spec.timeout_ms, Some(1500));
        assert_eq!(
            ProcessSpec::shell("echo hi").command,
            Command::Shell("echo hi".into())
        );
    }
}
