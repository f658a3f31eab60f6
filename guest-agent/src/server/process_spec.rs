//! Turning a protocol [`ProcessSpec`] into a `std::process::Command`: argv or shell string,
//! environment, working directory and user. Callers add stdio and the process group or session.

use std::path::Path;
use std::process::Command;

use agentvm_protocol::{Command as SpecCommand, ErrorCode, ProcessSpec};

use std::os::unix::process::CommandExt;

const PASSWD: &str = "/etc/passwd";

/// A spec that cannot be run, with the code and message for the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub code: ErrorCode,
    pub message: String,
}

impl SpecError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The program a spec runs, for messages: `argv[0]` or `/bin/sh`.
pub fn program_name(spec: &ProcessSpec) -> &str {
    match &spec.command {
        SpecCommand::Argv(argv) => argv.first().map_or("", String::as_str),
        SpecCommand::Shell(_) => "/bin/sh",
    }
}

/// Builds the command for `spec`, checking what would otherwise fail obscurely in the child.
pub fn build_command(spec: &ProcessSpec) -> Result<Command, SpecError> {
    let mut command = match &spec.command {
        SpecCommand::Argv(argv) => {
            let (program, args) = argv
                .split_first()
                .ok_or_else(|| SpecError::new(ErrorCode::InvalidArgument, "empty argv"))?;
            if program.is_empty() {
                return Err(SpecError::new(
                    ErrorCode::InvalidArgument,
                    "argv[0] is an empty string",
                ));
            }
            let mut command = Command::new(program);
            command.args(args);
            command
        }
        SpecCommand::Shell(script) => {
            let mut command = Command::new("/bin/sh");
            command.arg("-c").arg(script);
            command
        }
    };
    if spec.clear_env {
        command.env_clear();
    }
    for (key, value) in &spec.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(SpecError::new(
                ErrorCode::InvalidArgument,
                format!("invalid environment variable {key:?}: names must be non-empty without '=' or NUL, values without NUL"),
            ));
        }
        command.env(key, value);
    }
    let cwd = spec.cwd.as_deref().unwrap_or("/");
    match std::fs::metadata(cwd) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(SpecError::new(
                ErrorCode::SpawnFailed,
                format!("cannot use {cwd} as the working directory: not a directory"),
            ))
        }
        Err(e) => {
            return Err(SpecError::new(
                ErrorCode::SpawnFailed,
                format!("cannot use {cwd} as the working directory: {e}"),
            ))
        }
    }
    command.current_dir(cwd);
    // PID 1 keeps its power signals and SIGCHLD blocked in every thread; a child inheriting that
    // mask could not be stopped by `kill -TERM`. std clears the mask on some spawn paths only.
    // SAFETY: sigemptyset and pthread_sigmask are async-signal-safe and only touch the closure's
    // own stack.
    unsafe {
        command.pre_exec(|| {
            let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(empty.as_mut_ptr());
            let rc = libc::pthread_sigmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut());
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            Ok(())
        });
    }
    if let Some(user) = &spec.user {
        let (uid, gid) = resolve_user(user, Path::new(PASSWD))?;
        // std drops supplementary groups (setgroups) when root switches uid.
        command.gid(gid).uid(uid);
    }
    Ok(command)
}

/// A user as the spec names it: `uid:gid`, a numeric uid (its passwd group if listed, else the
/// same number), or a name from `passwd`.
///
/// Parsed by hand: glibc's getpwnam goes through NSS, which a static binary cannot load, and the
/// file format is three colons deep.
pub fn resolve_user(user: &str, passwd: &Path) -> Result<(u32, u32), SpecError> {
    let bad = |why: String| SpecError::new(ErrorCode::InvalidArgument, why);
    if let Some((uid, gid)) = user.split_once(':') {
        let uid = uid
            .parse()
            .map_err(|_| bad(format!("user {user:?}: uid {uid:?} is not a number")))?;
        let gid = gid
            .parse()
            .map_err(|_| bad(format!("user {user:?}: gid {gid:?} is not a number")))?;
        return Ok((uid, gid));
    }
    let entries = std::fs::read_to_string(passwd).unwrap_or_default();
    let entry = |matches: &dyn Fn(&str, u32) -> bool| {
        entries.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            let (name, uid, gid) = (fields.first()?, fields.get(2)?, fields.get(3)?);
            let (uid, gid) = (uid.parse::<u32>().ok()?, gid.parse::<u32>().ok()?);
            matches(name, uid).then_some((uid, gid))
        })
    };
    if let Ok(uid) = user.parse::<u32>() {
        return Ok(entry(&|_, u| u == uid).unwrap_or((uid, uid)));
    }
    entry(&|name, _| name == user).ok_or_else(|| {
        SpecError::new(
            ErrorCode::NotFound,
            format!("no user named {user:?} in {}", passwd.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passwd() -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("agentvm-passwd-test-{}", std::process::id()));
        std::fs::write(
            &path,
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65533:nobody:/:/bin/false\nbroken\n",
        )
        .unwrap();
        path
    }

    #[test]
    fn users_by_name_uid_and_pair() {
        let path = passwd();
        assert_eq!(resolve_user("nobody", &path), Ok((65534, 65533)));
        assert_eq!(resolve_user("65534", &path), Ok((65534, 65533)));
        assert_eq!(resolve_user("1234", &path), Ok((1234, 1234)));
        assert_eq!(resolve_user("12:34", &path), Ok((12, 34)));
        let missing = resolve_user("alice", &path).unwrap_err();
        assert_eq!(missing.code, ErrorCode::NotFound);
        assert!(missing.message.contains("alice"));
        assert_eq!(
            resolve_user("1:x", &path).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn bad_env_and_cwd_are_refused() {
        let mut spec = ProcessSpec::new(SpecCommand::Shell("true".into()));
        spec.env.push(("A=B".into(), "c".into()));
        assert_eq!(
            build_command(&spec).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        let mut spec = ProcessSpec::new(SpecCommand::Shell("true".into()));
        spec.cwd = Some("/nonexistent-agentvm-dir".into());
        let e = build_command(&spec).unwrap_err();
        assert_eq!(e.code, ErrorCode::SpawnFailed);
        assert!(e.message.contains("/nonexistent-agentvm-dir"));
    }
}
