//! The sandboxes' VMM processes as seen from outside: spawning them detached from the daemon (so
//! they outlive a daemon restart), recognising them again by PID and start time, signalling them.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Starts `command` in its own process group (a Ctrl-C at the daemon's terminal does not reach
/// the sandboxes), stdin from /dev/null and stdout/stderr appended to `log`: no pipe ties its life
/// to the daemon's.
pub fn spawn_detached(mut command: Command, log: &Path) -> Result<Child, String> {
    let open_log = || {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("cannot open {}: {e}", log.display()))
    };
    command
        .stdin(Stdio::null())
        .stdout(open_log()?)
        .stderr(open_log()?)
        .process_group(0);
    let program = command.get_program().to_owned();
    command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", Path::new(&program).display()))
}

/// The start time of process `pid` (clock ticks after boot, field 22 of /proc/<pid>/stat), or
/// `None` when there is no such process or it is a zombie.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_ticks(&stat)
}

fn parse_start_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may itself hold spaces or ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // Fields 4..=22 follow the state (field 3); the start time is the 19th of them.
    fields.nth(18)?.parse().ok()
}

/// Whether `pid` is still the process that was started at `ticks`.
pub fn is_same_process(pid: u32, ticks: u64) -> bool {
    start_ticks(pid) == Some(ticks)
}

/// Sends `signal` to `pid`; a process that is already gone is not an error.
pub fn signal(pid: u32, signal: i32) -> Result<(), String> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| format!("pid {pid} is out of range"))?;
    // SAFETY: kill(2) takes no pointers.
    if unsafe { libc::kill(pid, signal) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        return Ok(());
    }
    Err(format!("cannot signal process {pid}: {e}"))
}

/// How a VMM (or jailer) exit status reads to a person.
pub fn describe_exit(status: std::process::ExitStatus, jailed: bool) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        return format!("the VMM process was killed by signal {sig}");
    }
    match status.code() {
        Some(0) => "the guest shut down".to_string(),
        Some(110) if jailed => "the jailer's lifetime limit passed".to_string(),
        Some(111) if jailed => "the sandbox hit its memory limit".to_string(),
        Some(112) if jailed => "the sandbox hit its process limit".to_string(),
        Some(code) if code > 128 => format!("the VMM was stopped by signal {}", code - 128),
        Some(code) => format!("the VMM exited with status {code}"),
        None => "the VMM ended".to_string(),
    }
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_come_from_field_22_even_with_odd_names() {
        let stat = "123 (a) b (c)) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 \
                    1000 10 18446744073709551615";
        assert_eq!(parse_start_ticks(stat), Some(98765));
        let zombie = "5 (x) Z 1 5 5 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 42 0 0";
        assert_eq!(parse_start_ticks(zombie), None);
        assert_eq!(parse_start_ticks("garbage"), None);
    }

    #[test]
    fn this_process_is_recognised_and_a_wrong_start_time_is_not() {
        let me = std::process::id();
        let ticks = start_ticks(me).expect("our own start time");
        assert!(is_same_process(me, ticks));
        assert!(!is_same_process(me, ticks + 1));
        signal(me, 0).unwrap();
    }
}
