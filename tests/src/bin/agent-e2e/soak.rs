//! The soak: many sandboxes created from one snapshot, each exec'd, snapshotted, restored from its
//! own snapshot, exec'd again and destroyed, by [`WORKERS`] threads at once; then nothing may be
//! left: no process of ours, no more descriptors or threads in this driver than before, no file
//! under the soak's directory, no snapshot temporary file, and the host's available memory back
//! within [`MEMORY_GROWTH_LIMIT_MIB`] of where it was (after dropping the page cache).
//!
//! agent-e2e runs a bounded soak (`--soak-iterations`, default [`DEFAULT_ITERATIONS`]) after the
//! snapshot checks; `tests/tests/soak.rs` runs the long one (200) on its own.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use integration_tests::api::request;

use crate::api::{exec_events, expect_status};
use crate::snapshot::{
    console_tail, load_with_own_vsock, put_policy, until_agent_up, Serve, Template,
};
use crate::{progress, timed_within, Args};

/// Sandboxes at once, as the issue asks.
pub const WORKERS: usize = 4;
/// The bounded soak inside the full agent-e2e run: one round per worker.
pub const DEFAULT_ITERATIONS: usize = 4;
/// How much less memory the host may have available after the soak than before it.
const MEMORY_GROWTH_LIMIT_MIB: i64 = 64;

pub fn checks(args: &Args, template: &Template) {
    // A round takes a few seconds to tens of seconds at TCG speed, WORKERS at a time.
    let limit = Duration::from_secs(240 + 20 * args.soak_iterations as u64);
    timed_within("soak", limit, || soak(args, template, args.soak_iterations));
}

/// What this process holds and what the host has, before and after.
#[derive(Debug, Clone, PartialEq)]
struct Footprint {
    fds: usize,
    threads: usize,
    children: Vec<String>,
    available_mib: i64,
}

fn footprint() -> Result<Footprint, String> {
    let count = |dir: &str| {
        std::fs::read_dir(dir)
            .map(|entries| entries.count())
            .map_err(|e| format!("{dir}: {e}"))
    };
    // Settles what the kernel counts as available (page cache of the snapshots' files).
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("meminfo: {e}"))?;
    let available_kib: i64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or("no MemAvailable in /proc/meminfo")?;
    Ok(Footprint {
        fds: count("/proc/self/fd")?,
        threads: count("/proc/self/task")?,
        children: children()?,
        available_mib: available_kib / 1024,
    })
}

/// The processes whose parent is this one (pid and command), reaped or not.
fn children() -> Result<Vec<String>, String> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after its last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if rest.split_whitespace().nth(1) == Some(me.as_str()) {
            out.push(format!(
                "{name} {}",
                head.split_once('(').map_or("", |h| h.1)
            ));
        }
    }
    out.sort();
    Ok(out)
}

fn soak(args: &Args, template: &Template, iterations: usize) -> Result<String, String> {
    let root = args.work_dir.join("soak");
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let before = footprint()?;
    let next = AtomicUsize::new(0);
    let durations = Mutex::new(Vec::new());
    let started = Instant::now();
    let failures: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= iterations {
                        return Ok(());
                    }
                    let one = Instant::now();
                    round(args, template, &root, i).map_err(|e| format!("round {i}: {e}"))?;
                    let secs = one.elapsed().as_secs_f64();
                    durations
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(secs);
                    if (i + 1).is_multiple_of(10) || i + 1 == iterations {
                        progress(format_args!("  soak: round {} of {iterations} done", i + 1));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .filter_map(|w| match w.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("a soak worker panicked".into()),
            })
            .collect()
    });
    if let Some(first) = failures.first() {
        return Err(format!(
            "{} worker(s) failed; first: {first}",
            failures.len()
        ));
    }
    let total_secs = started.elapsed().as_secs_f64();
    let after = footprint()?;
    let mut leaks = Vec::new();
    if after.fds != before.fds {
        leaks.push(format!("descriptors {} -> {}", before.fds, after.fds));
    }
    if after.threads != before.threads {
        leaks.push(format!("threads {} -> {}", before.threads, after.threads));
    }
    if after.children != before.children {
        leaks.push(format!(
            "child processes {:?} -> {:?}",
            before.children, after.children
        ));
    }
    let left = files_under(&root)?;
    if !left.is_empty() {
        leaks.push(format!("files left under {}: {left:?}", root.display()));
    }
    let snapshot_dir = template.state.parent().unwrap_or(Path::new("/"));
    let temporaries: Vec<PathBuf> = files_under(snapshot_dir)?
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".tmp-"))
        .collect();
    if !temporaries.is_empty() {
        leaks.push(format!("snapshot temporaries left: {temporaries:?}"));
    }
    let growth = before.available_mib - after.available_mib;
    if growth > MEMORY_GROWTH_LIMIT_MIB {
        leaks.push(format!(
            "the host's available memory fell by {growth} MiB ({} -> {} MiB), more than \
             {MEMORY_GROWTH_LIMIT_MIB} MiB",
            before.available_mib, after.available_mib
        ));
    }
    if !leaks.is_empty() {
        return Err(format!("after {iterations} rounds: {}", leaks.join("; ")));
    }
    let _ = std::fs::remove_dir(&root);
    let mut secs = durations.into_inner().unwrap_or_else(|e| e.into_inner());
    secs.sort_by(f64::total_cmp);
    let median = secs.get(secs.len() / 2).copied().unwrap_or(0.0);
    Ok(format!(
        "{iterations} sandboxes by {WORKERS} workers in {total_secs:.0} s (round median \
         {median:.1} s: restore, exec, snapshot, restore its snapshot, exec, destroy); no leaked \
         descriptors ({}), threads ({}), processes, files or snapshot temporaries; available \
         memory {:+} MiB",
        after.fds, after.threads, -growth
    ))
}

/// Every file (not directory) under `dir`, recursively.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(path);
            } else {
                out.push(path);
            }
        }
    }
    Ok(out)
}

/// One sandbox's life: restored from the template, exec'd (it writes its round number),
/// snapshotted and ended; restored from its own snapshot, exec'd (it still has its number), ended;
/// its files removed.
fn round(args: &Args, template: &Template, root: &Path, i: usize) -> Result<(), String> {
    let dir = root.join(format!("r{i}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let cid = 100 + i as u64;
    let first = start_restored(
        args,
        &dir,
        "a",
        &template.state,
        &template.mem,
        template,
        cid,
    )?;
    let sock = dir.join("a.sock");
    let write = format!("cat /tmp/snap-file && echo soak-{i} > /tmp/soak");
    let out = exec(&sock, &dir, "a", &write)?;
    if out.trim() != "before-snapshot" {
        return Err(format!(
            "the restored guest read {out:?} from /tmp/snap-file"
        ));
    }
    expect_status(
        &request(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)),
        204,
        "PATCH /vm Paused",
    )?;
    let (state, mem) = (dir.join("state"), dir.join("mem"));
    let create = serde_json::json!({"snapshot_path": state, "mem_file_path": mem}).to_string();
    expect_status(
        &request(&sock, "PUT", "/snapshot/create", Some(&create)),
        204,
        "PUT /snapshot/create",
    )?;
    first.terminate()?;
    let second = start_restored(args, &dir, "b", &state, &mem, template, cid)?;
    let out = exec(&dir.join("b.sock"), &dir, "b", "cat /tmp/soak")?;
    if out.trim() != format!("soak-{i}") {
        return Err(format!(
            "restored from its own snapshot, the sandbox read {out:?} instead of soak-{i}"
        ));
    }
    second.terminate()?;
    std::fs::remove_dir_all(&dir).map_err(|e| format!("remove {}: {e}", dir.display()))
}

/// A serve named `name` in `dir` that loaded `state` + `mem` (with the template's egress policy,
/// its own vsock socket and `cid`) and runs.
fn start_restored(
    args: &Args,
    dir: &Path,
    name: &str,
    state: &Path,
    mem: &Path,
    template: &Template,
    cid: u64,
) -> Result<Serve, String> {
    let serve = Serve::start(&args.agentvm, dir, name, None)?;
    let sock = dir.join(format!("{name}.sock"));
    put_policy(&sock, template.policy.as_deref())?;
    load_with_own_vsock(&sock, dir, name, state, mem, cid)?;
    Ok(serve)
}

/// Runs `script` in the sandbox behind `sock` (waiting for its agent); its stdout.
fn exec(sock: &Path, dir: &Path, name: &str, script: &str) -> Result<String, String> {
    let body = serde_json::json!({"cmd": ["sh", "-c", script]}).to_string();
    let answer = until_agent_up(sock, || request(sock, "POST", "/sandbox/exec", Some(&body)))?;
    let (stdout, stderr, last) = exec_events(&answer).map_err(|e| {
        format!(
            "{name}: {e}\n{}",
            console_tail(&dir.join(format!("{name}.console")))
        )
    })?;
    if last != serde_json::json!({"exit_code": 0, "timed_out": false}) {
        return Err(format!(
            "{name}: {script}: stdout {stdout:?}, stderr {stderr:?}, {last}"
        ));
    }
    Ok(stdout)
}
