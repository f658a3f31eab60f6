//! PID 1 behaviour that needs a process of its own: this test makes itself a child subreaper (so
//! orphans are reparented to it, as they are to PID 1 in the guest), blocks the watched signals
//! in its only thread, and runs a command that leaves an orphan behind. The command then waits
//! until the orphan's /proc entry is gone, which only happens once run_command has reaped it
//! through SIGCHLD; with reaping broken the command exits 99 instead of 7.

use std::ffi::OsString;

use guest_agent::console::ConsoleWriter;
use guest_agent::console_protocol::ExitStatus;
use guest_agent::exec::{run_command, ExecOptions, ExecOutcome};
use guest_agent::power::{reap_all, SignalWatcher};

const SCRIPT: &str = r#"
(sh -c 'exit 0' & echo $! > "$PIDFILE")
orphan=$(cat "$PIDFILE")
echo "orphan $orphan"
i=0
while [ -e "/proc/$orphan" ]; do
    i=$((i + 1))
    # Turns a reaping failure into a failed test instead of a hang.
    [ $i -gt 3000 ] && exit 99
    sleep 0.01
done
exit 7
"#;

fn main() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) only changes how this process inherits orphans.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER failed");
    let mut watcher = SignalWatcher::install().expect("signal watcher");

    let pidfile = std::env::temp_dir().join(format!("agentvm-reap-{}", std::process::id()));
    std::env::set_var("PIDFILE", &pidfile);
    let argv: Vec<OsString> = ["sh", "-c", SCRIPT].iter().map(OsString::from).collect();
    let options = ExecOptions {
        cwd: None,
        reap_orphans: true,
    };
    let mut console = ConsoleWriter::new(Vec::new());
    let outcome = run_command(&argv, &options, &mut console, Some(&mut watcher));
    let text = String::from_utf8_lossy(&console.into_inner()).into_owned();
    let _ = std::fs::remove_file(&pidfile);

    assert_eq!(
        outcome,
        ExecOutcome::Exited(ExitStatus::Code(7)),
        "console: {text}"
    );
    assert!(text.starts_with("@@agentvm:exec-start\norphan "), "{text}");
    assert!(text.ends_with("\n\n@@agentvm:exit code=7\n"), "{text}");
    // Everything was reaped: nothing is left for a final sweep.
    assert!(reap_all().is_empty());
    println!("pid1_reaping: ok");
}
