//! A tiny program the jailer tests run as the jailed "VMM", to see the jail from the inside.
//!
//! `jail-inspect report <host path>`: prints what the jail looks like, one `key=value` a line
//!   (ids, pid, hostname, directory listings, open fds, rlimits, privileges, cgroups, whether
//!   `<host path>` can be seen, whether /, /run and the temporary directory are writable), then `END`, and exits 0.
//! `jail-inspect hold <stop file>`: `report`s, listens on the Unix socket /run/inspect.sock (as a
//!   VMM does for its API), prints `READY`, and exits 0 once `<stop file>` exists.
//! `jail-inspect seccomp-violation`: installs a seccomp filter that kills the process on
//!   getppid (which works only under no_new_privs, as in the jail), then calls getppid.
//! `jail-inspect forkbomb <stop file>`: starts threads until the kernel refuses one, prints
//!   `forkbomb refused after <n> threads`, and exits 1 once `<stop file>` exists.
//!
//! It reads everything from /proc, so it needs no unsafe code; and it waits at most
//! [`HOLD_LIMIT`] for the stop file, so a broken test cannot leave it running.

use std::fs;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

const HOLD_LIMIT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(20);
const SOCKET: &str = "/run/inspect.sock";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["report", host_path] => {
            report(Path::new(host_path));
            ExitCode::SUCCESS
        }
        ["hold", stop] => {
            report(Path::new("/nonexistent"));
            let listener = match UnixListener::bind(SOCKET) {
                Ok(listener) => listener,
                Err(e) => {
                    eprintln!("jail-inspect: cannot listen on {SOCKET}: {e}");
                    return ExitCode::from(4);
                }
            };
            println!("READY");
            let _ = std::io::stdout().flush();
            let code = wait_for(Path::new(stop));
            drop(listener);
            code
        }
        ["seccomp-violation"] => seccomp_violation(),
        ["forkbomb", stop] => {
            let started = forkbomb();
            println!("forkbomb refused after {started} threads");
            let _ = std::io::stdout().flush();
            match wait_for(Path::new(stop)) {
                code if code == ExitCode::SUCCESS => ExitCode::from(1),
                other => other,
            }
        }
        _ => {
            eprintln!(
                "usage: jail-inspect report <host path> | hold <stop file> | seccomp-violation | \
                 forkbomb <stop file>"
            );
            ExitCode::from(2)
        }
    }
}

fn report(host_path: &Path) {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| "?".into())
    };
    println!("uid={}", field("Uid"));
    println!("gid={}", field("Gid"));
    println!("groups={}", field("Groups"));
    println!("cap_eff={}", field("CapEff"));
    println!("no_new_privs={}", field("NoNewPrivs"));
    println!("pid={}", std::process::id());
    println!(
        "hostname={}",
        fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
    );
    println!("root={}", listing("/"));
    println!("dev={}", listing("/dev"));
    println!("fds={}", listing("/proc/self/fd"));
    let limits = fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let limit = |name: &str| {
        limits
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| "?".into())
    };
    println!("nofile={}", limit("Max open files"));
    println!("fsize={}", limit("Max file size"));
    println!("core={}", limit("Max core file size"));
    let cgroup = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    println!("cgroup={}", cgroup.trim().replace('\n', ";"));
    println!(
        "host_path={}",
        if host_path.exists() {
            "visible"
        } else {
            "absent"
        }
    );
    println!("root_writable={}", writable(Path::new("/inspect-probe")));
    println!("run_writable={}", writable(Path::new("/run/inspect-probe")));
    println!(
        "tmp_writable={}",
        writable(&std::env::temp_dir().join("inspect-probe"))
    );
    println!("END");
    let _ = std::io::stdout().flush();
}

fn listing(dir: &str) -> String {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort_by_key(|n| (n.parse::<u64>().unwrap_or(u64::MAX), n.clone()));
    names.join(",")
}

fn writable(path: &Path) -> &'static str {
    match fs::write(path, b"x") {
        Ok(()) => {
            let _ = fs::remove_file(path);
            "yes"
        }
        Err(_) => "no",
    }
}

fn wait_for(stop: &Path) -> ExitCode {
    let deadline = Instant::now() + HOLD_LIMIT;
    while !stop.exists() {
        if Instant::now() >= deadline {
            eprintln!("jail-inspect: {} never appeared", stop.display());
            return ExitCode::from(3);
        }
        thread::sleep(POLL);
    }
    ExitCode::SUCCESS
}

/// Starts sleeping threads until the kernel refuses one (the pids limit counts threads), and
/// keeps them: the sandbox stays at its limit while the test looks at its neighbour.
fn forkbomb() -> usize {
    let mut started = 0;
    loop {
        let spawned = thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(|| thread::sleep(HOLD_LIMIT));
        match spawned {
            Ok(_) => started += 1,
            Err(_) => return started,
        }
    }
}

/// Dies of SIGSYS the way a VMM thread making a forbidden syscall does.
fn seccomp_violation() -> ExitCode {
    let rules = [(libc::SYS_getppid, Vec::new())].into_iter().collect();
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::KillProcess,
        seccompiler::TargetArch::x86_64,
    );
    let program: Result<seccompiler::BpfProgram, _> = match filter {
        Ok(filter) => filter.try_into(),
        Err(e) => {
            eprintln!("jail-inspect: cannot build the seccomp filter: {e}");
            return ExitCode::from(5);
        }
    };
    let applied = program
        .map_err(|e| e.to_string())
        .and_then(|p| seccompiler::apply_filter(&p).map_err(|e| e.to_string()));
    if let Err(e) = applied {
        eprintln!("jail-inspect: cannot install the seccomp filter: {e}");
        return ExitCode::from(5);
    }
    println!("filter installed");
    let _ = std::io::stdout().flush();
    let parent = std::os::unix::process::parent_id();
    eprintln!("jail-inspect: getppid returned {parent} despite the filter");
    ExitCode::from(6)
}
