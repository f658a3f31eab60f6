//! The checks against one running guest, through the client library.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentvm_client::{
    AgentClient, ExecEvent, ExitStatus, ProcessSpec, ProcessSpecExt, Stream, WatchEvent,
    WriteOptions,
};
use sha2::{Digest, Sha256};

use crate::vm::Guest;
use crate::{timed, Args};

type Check = Result<String, String>;

/// The longest a check waits for the next event of a process (TCG guests are slow, not dead).
const EVENT_WAIT: Duration = Duration::from_secs(180);

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn expect<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

fn shell(client: &AgentClient, script: &str) -> Result<agentvm_client::Output, String> {
    client
        .exec_output(ProcessSpec::shell(script))
        .map_err(err(script))
}

pub fn run_all(client: &AgentClient, _args: &Args) {
    timed("ping", || ping(client));
    timed("output_separation", || output_separation(client));
    timed("exit_codes_and_signals", || exit_codes_and_signals(client));
    timed("env_cwd_user", || env_cwd_user(client));
    timed("spawn_failure", || spawn_failure(client));
    timed("timeout_kills_group", || timeout_kills_group(client));
    timed("stdin_pipe", || stdin_pipe(client));
    timed("concurrent_execs", || concurrent_execs(client));
    timed("stream_200mib", || stream_200mib(client));
    timed("pty", || pty(client));
    timed("watch", || watch(client));
    timed("file_roundtrip_50mib", || file_roundtrip(client));
    timed("file_ops", || file_ops(client));
    timed("background_processes", || background_processes(client));
    timed("port_forward", || port_forward(client));
    timed("after_restore", || after_restore(client));
    timed("guest_oom", || guest_oom(client));
}

/// The hook a restored snapshot gets: the guest clock jumps to the host's idea of now (here a
/// day ahead, to be visible) and the entropy is accepted.
fn after_restore(client: &AgentClient) -> Check {
    const DAY_S: i64 = 86_400;
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(err("host clock"))?
        .as_secs() as i64;
    let target_s = now_s + DAY_S;
    let entropy: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(151) ^ 0x5a).collect();
    client
        .after_restore(target_s * 1_000_000_000, &entropy)
        .map_err(err("after_restore"))?;
    let out = shell(client, "date +%s")?;
    let guest_s: i64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(err("date output"))?;
    if (guest_s - target_s).abs() > 120 {
        return Err(format!(
            "guest clock {guest_s} after setting {target_s} (host now {now_s})"
        ));
    }
    Ok(format!(
        "guest clock set a day ahead ({guest_s}), 64 bytes of entropy accepted"
    ))
}

fn ping(client: &AgentClient) -> Check {
    let mut times = Vec::new();
    for _ in 0..50 {
        let start = Instant::now();
        client.ping().map_err(err("ping"))?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(format!(
        "50 pings, median {:.2} ms, max {:.2} ms",
        times[25].as_secs_f64() * 1e3,
        times[49].as_secs_f64() * 1e3
    ))
}

fn output_separation(client: &AgentClient) -> Check {
    let out = shell(
        client,
        "for i in 1 2 3; do echo out$i; echo err$i >&2; done; exit 3",
    )?;
    expect("stdout", out.stdout.as_slice(), b"out1\nout2\nout3\n")?;
    expect("stderr", out.stderr.as_slice(), b"err1\nerr2\nerr3\n")?;
    expect("status", out.status, ExitStatus::Code(3))?;
    // Interleaving across the two streams is kept in the order of events within each stream;
    // the events of one exec arrive in the order the agent read them.
    let mut exec = client
        .exec(ProcessSpec::shell("echo a; echo b >&2; echo c"), false)
        .map_err(err("exec"))?;
    let mut events = Vec::new();
    while let Some(ev) = exec.next_event_timeout(EVENT_WAIT).map_err(err("event"))? {
        let done = matches!(ev, ExecEvent::Exited { .. });
        events.push(ev);
        if done {
            break;
        }
    }
    match events.last() {
        Some(ExecEvent::Exited { .. }) => {}
        other => return Err(format!("last event is not Exited: {other:?}")),
    }
    Ok("stdout/stderr separate and in order, exit 3".into())
}

fn exit_codes_and_signals(client: &AgentClient) -> Check {
    for code in [0, 1, 42, 255] {
        let out = shell(client, &format!("exit {code}"))?;
        expect("exit code", out.status, ExitStatus::Code(code))?;
    }
    let out = shell(client, "kill -TERM $$")?;
    expect("signal", out.status, ExitStatus::Signal(libc::SIGTERM))?;
    let mut exec = client
        .exec(ProcessSpec::argv(["sleep", "1000"]), false)
        .map_err(err("exec sleep"))?;
    exec.kill(libc::SIGKILL).map_err(err("kill"))?;
    loop {
        match exec.next_event_timeout(EVENT_WAIT).map_err(err("event"))? {
            Some(ExecEvent::Exited { status, .. }) => {
                expect("killed sleep", status, ExitStatus::Signal(libc::SIGKILL))?;
                break;
            }
            Some(_) => {}
            None => return Err("no exit status after kill".into()),
        }
    }
    Ok("codes 0/1/42/255, SIGTERM, Kill -> SIGKILL".into())
}

fn env_cwd_user(client: &AgentClient) -> Check {
    let out = client
        .exec_output(
            ProcessSpec::shell("echo $FOO; pwd; id -u")
                .env("FOO", "bar baz")
                .cwd("/tmp")
                .user("nobody"),
        )
        .map_err(err("exec"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    expect("env", lines.first().copied(), Some("bar baz"))?;
    expect("cwd", lines.get(1).copied(), Some("/tmp"))?;
    if lines.get(2).copied() == Some("0") {
        return Err(format!("user nobody ran as root: {text}"));
    }
    Ok(format!(
        "env, cwd, user: {}",
        text.trim().replace('\n', " | ")
    ))
}

/// A process that eats memory is killed by the guest kernel's OOM killer: the exec reports
/// SIGKILL, the kernel log names the kill, and the agent goes on answering. The hog runs in a
/// 16 MiB memory cgroup: filling the whole 512 MiB guest through a shell pipe takes longer than
/// the check's five minutes at TCG speed (each guest page is a shadow-paging fault in L1).
fn guest_oom(client: &AgentClient) -> Check {
    const HOG: &str = "grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts || \
        mount -t cgroup2 none /sys/fs/cgroup; \
        echo +memory > /sys/fs/cgroup/cgroup.subtree_control && \
        mkdir -p /sys/fs/cgroup/hog && echo 16M > /sys/fs/cgroup/hog/memory.max && \
        echo $$ > /sys/fs/cgroup/hog/cgroup.procs && \
        x=$(head -c 400000000 /dev/zero | tr '\\0' a); echo survived";
    let start = Instant::now();
    let out = client
        .exec_output(ProcessSpec::shell(HOG).timeout(Duration::from_secs(240)))
        .map_err(err("exec the memory hog"))?;
    let took = start.elapsed().as_secs_f64();
    if out.status != ExitStatus::Signal(libc::SIGKILL) {
        return Err(format!(
            "the memory hog ended {:?} (stdout {:?}, stderr {:?}), not killed by SIGKILL",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let log = client
        .exec_output(ProcessSpec::shell(
            "dmesg | grep -i 'out of memory' | grep -o 'Killed process [0-9]* ([^)]*)'",
        ))
        .map_err(err("dmesg"))?;
    let kills: Vec<String> = String::from_utf8_lossy(&log.stdout)
        .lines()
        .map(|l| l.trim_start_matches("Killed process ").to_string())
        .collect();
    if kills.is_empty() {
        return Err("no OOM kill in the kernel log".into());
    }
    let line = format!("OOM kills: {}", kills.join(", "));
    client.ping().map_err(err("ping after the OOM kill"))?;
    let alive = client
        .exec_output(ProcessSpec::argv(["echo", "alive"]))
        .map_err(err("exec after the OOM kill"))?;
    expect(
        "exec after the OOM kill",
        String::from_utf8_lossy(&alive.stdout).trim(),
        "alive",
    )?;
    Ok(format!(
        "the hog was killed by SIGKILL after {took:.1} s ({line}); the agent answered on"
    ))
}

fn spawn_failure(client: &AgentClient) -> Check {
    match client.exec(ProcessSpec::argv(["/no/such/program"]), false) {
        Ok(_) => Err("a missing program started".into()),
        Err(e) if e.to_string().contains("/no/such/program") => Ok(e.to_string()),
        Err(e) => Err(format!("error does not name the program: {e}")),
    }
}

fn timeout_kills_group(client: &AgentClient) -> Check {
    let start = Instant::now();
    let mut exec = client
        .exec(
            ProcessSpec::shell("sleep 1000 & echo child=$!; sleep 1000")
                .timeout(Duration::from_secs(3)),
            false,
        )
        .map_err(err("exec"))?;
    let mut stdout = Vec::new();
    let (status, timed_out) = loop {
        match exec.next_event_timeout(EVENT_WAIT).map_err(err("event"))? {
            Some(ExecEvent::Stdout(d)) => stdout.extend(d),
            Some(ExecEvent::Exited { status, timed_out }) => break (status, timed_out),
            Some(_) => {}
            None => return Err("no exit".into()),
        }
    };
    let waited = start.elapsed();
    if !timed_out {
        return Err(format!("timed_out not reported (status {status:?})"));
    }
    let text = String::from_utf8_lossy(&stdout).to_string();
    let child = text
        .trim()
        .strip_prefix("child=")
        .ok_or_else(|| format!("no child pid in {text:?}"))?
        .to_string();
    // The child was in the process group: it must be gone (reaped by PID 1) shortly.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = shell(
            client,
            &format!("test -d /proc/{child} && cat /proc/{child}/stat"),
        )?;
        if out.status == ExitStatus::Code(1) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "child {child} of the timed-out command still exists: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(format!(
        "timed out after {:.1} s with {status:?}; background child {child} gone",
        waited.as_secs_f64()
    ))
}

fn stdin_pipe(client: &AgentClient) -> Check {
    let data: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i * 7 % 251) as u8).collect();
    let mut exec = client
        .exec(ProcessSpec::argv(["cat"]), true)
        .map_err(err("exec cat"))?;
    let mut stdin = exec.take_stdin().ok_or("no stdin writer")?;
    let to_send = data.clone();
    let writer = std::thread::spawn(move || -> Result<(), String> {
        stdin.write_all(&to_send).map_err(err("stdin write"))?;
        stdin.close().map_err(err("stdin close"))
    });
    let mut got = Vec::new();
    loop {
        match exec.next_event_timeout(EVENT_WAIT).map_err(err("event"))? {
            Some(ExecEvent::Stdout(d)) => got.extend(d),
            Some(ExecEvent::Stderr(d)) => {
                return Err(format!("stderr: {}", String::from_utf8_lossy(&d)))
            }
            Some(ExecEvent::Exited { status, .. }) => {
                expect("cat status", status, ExitStatus::Code(0))?;
                break;
            }
            None => return Err("no exit".into()),
        }
    }
    writer.join().map_err(|_| "writer panicked")??;
    if got != data {
        return Err(format!(
            "cat returned {} bytes, sent {}",
            got.len(),
            data.len()
        ));
    }
    Ok(format!("{} bytes through cat", data.len()))
}

fn concurrent_execs(client: &AgentClient) -> Check {
    const N: usize = 100;
    let client = Arc::new(client.clone());
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let client = client.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let out = client
                    .exec_output(ProcessSpec::argv(["echo".to_string(), format!("n{i}")]))
                    .map_err(err("exec"))?;
                expect("output", out.stdout, format!("n{i}\n").into_bytes())?;
                expect("status", out.status, ExitStatus::Code(0))
            })
        })
        .collect();
    let mut failures = Vec::new();
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(e),
            Err(_) => failures.push("thread panicked".into()),
        }
    }
    if failures.is_empty() {
        Ok(format!("{N} concurrent execs, all correct"))
    } else {
        Err(format!(
            "{} of {N} failed, first: {}",
            failures.len(),
            failures[0]
        ))
    }
}

/// Peak resident memory of this process (VmHWM), in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn stream_200mib(client: &AgentClient) -> Check {
    const TOTAL: u64 = 200 << 20;
    let before = peak_rss_kib();
    let start = Instant::now();
    let mut exec = client
        .exec(
            ProcessSpec::shell(format!("head -c {TOTAL} /dev/zero")),
            false,
        )
        .map_err(err("exec"))?;
    let mut received = 0u64;
    loop {
        match exec.next_event_timeout(EVENT_WAIT).map_err(err("event"))? {
            Some(ExecEvent::Stdout(d)) => {
                if d.iter().any(|&b| b != 0) {
                    return Err("corrupt data".into());
                }
                let before = received;
                received += d.len() as u64;
                if before >> 24 != received >> 24 {
                    crate::progress(format_args!(
                        "  {} MiB after {:.1} s",
                        received >> 20,
                        start.elapsed().as_secs_f64()
                    ));
                }
            }
            Some(ExecEvent::Stderr(d)) => {
                return Err(format!("stderr: {}", String::from_utf8_lossy(&d)))
            }
            Some(ExecEvent::Exited { status, .. }) => {
                expect("status", status, ExitStatus::Code(0))?;
                break;
            }
            None => return Err("no exit".into()),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    expect("bytes", received, TOTAL)?;
    let growth_mib = peak_rss_kib().saturating_sub(before) / 1024;
    // The client holds at most one window (256 KiB) per stream; 200 MiB through it must not
    // show up in the peak RSS of the process that holds the VMM's client side.
    if growth_mib > 32 {
        return Err(format!(
            "peak RSS grew by {growth_mib} MiB while streaming 200 MiB"
        ));
    }
    Ok(format!(
        "200 MiB in {secs:.1} s ({:.1} MiB/s), peak RSS growth {growth_mib} MiB",
        200.0 / secs
    ))
}

/// Reads terminal output until `needle` appears (or the deadline passes).
fn read_until(
    session: &mut agentvm_client::PtySession,
    seen: &mut String,
    needle: &str,
    deadline: Instant,
) -> Result<(), String> {
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        if Instant::now() > deadline {
            return Err(format!("no {needle:?} in terminal output {seen:?}"));
        }
        let n = session.read(&mut buf).map_err(err("pty read"))?;
        if n == 0 {
            return Err(format!("terminal ended before {needle:?}; output {seen:?}"));
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    Ok(())
}

fn pty(client: &AgentClient) -> Check {
    let mut session = client
        .pty_open(ProcessSpec::argv(["sh"]), "xterm", 24, 80)
        .map_err(err("pty_open"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = String::new();
    session
        .write_input(b"trap 'echo GOT-WINCH' WINCH; echo T-$(tty)-T; echo S-$(stty size)-S\n")
        .map_err(err("input"))?;
    read_until(&mut session, &mut seen, "S-24 80-S", deadline)?;
    let tty_line = seen
        .split("T-")
        .find(|s| s.starts_with("/dev/pts/"))
        .and_then(|s| s.split("-T").next())
        .ok_or_else(|| format!("tty did not print a /dev/pts path: {seen:?}"))?
        .to_string();
    session.resize(40, 100).map_err(err("resize"))?;
    read_until(&mut session, &mut seen, "GOT-WINCH", deadline)?;
    session
        .write_input(b"echo S2-$(stty size)-S2; exit 7\n")
        .map_err(err("input"))?;
    read_until(&mut session, &mut seen, "S2-40 100-S2", deadline)?;
    let mut rest = Vec::new();
    session.read_to_end(&mut rest).map_err(err("pty drain"))?;
    let exit = session.exit();
    expect("exit", exit.map(|e| e.0), Some(ExitStatus::Code(7)))?;
    Ok(format!(
        "tty {tty_line}, 24x80 then SIGWINCH and 40x100, exit 7"
    ))
}

fn watch(client: &AgentClient) -> Check {
    shell(client, "rm -rf /tmp/w && mkdir /tmp/w")?;
    let mut watch = client
        .watch("/tmp/w", true, &[], &["**/*.skip"])
        .map_err(err("watch"))?;
    // The subdirectory first: changes inside a new directory before the agent has put its watch
    // on it can only be seen by the scan that follows (as Created), which inotify makes a race.
    // The agent reports the directory once its watch is in place.
    shell(client, "mkdir /tmp/w/sub")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut events = Vec::new();
    let sub_created = |events: &[WatchEvent]| {
        events.iter().any(
            |e| matches!(e, WatchEvent::Created { path, is_dir: true } if path == "/tmp/w/sub"),
        )
    };
    while !sub_created(&events) && Instant::now() < deadline {
        events.extend(
            watch
                .next_events(Duration::from_secs(2))
                .map_err(err("events"))?,
        );
    }
    let out = shell(
        client,
        "echo hi > /tmp/w/sub/f && echo more >> /tmp/w/sub/f \
         && touch /tmp/w/sub/x.skip && mv /tmp/w/sub/f /tmp/w/sub/g && rm /tmp/w/sub/g",
    )?;
    expect("script", out.status, ExitStatus::Code(0))?;
    let done = |events: &[WatchEvent]| {
        events
            .iter()
            .any(|e| matches!(e, WatchEvent::Deleted { path, .. } if path == "/tmp/w/sub/g"))
    };
    while !done(&events) && Instant::now() < deadline {
        events.extend(
            watch
                .next_events(Duration::from_secs(2))
                .map_err(err("events"))?,
        );
    }
    watch.stop().map_err(err("stop"))?;
    let has = |pred: &dyn Fn(&WatchEvent) -> bool| events.iter().any(pred);
    let checks: [(&str, bool); 6] = [
        (
            "created sub",
            has(
                &|e| matches!(e, WatchEvent::Created { path, is_dir: true } if path == "/tmp/w/sub"),
            ),
        ),
        (
            "created sub/f",
            has(
                &|e| matches!(e, WatchEvent::Created { path, is_dir: false } if path == "/tmp/w/sub/f"),
            ),
        ),
        (
            "modified sub/f",
            has(&|e| matches!(e, WatchEvent::Modified { path } if path == "/tmp/w/sub/f")),
        ),
        (
            "moved f -> g",
            has(
                &|e| matches!(e, WatchEvent::Moved { from, to, .. } if from == "/tmp/w/sub/f" && to == "/tmp/w/sub/g"),
            ),
        ),
        (
            "deleted sub/g",
            has(&|e| matches!(e, WatchEvent::Deleted { path, .. } if path == "/tmp/w/sub/g")),
        ),
        (
            "excluded x.skip",
            !has(&|e| format!("{e:?}").contains("x.skip")),
        ),
    ];
    let missing: Vec<&str> = checks.iter().filter(|c| !c.1).map(|c| c.0).collect();
    if missing.is_empty() {
        Ok(format!(
            "{} events incl. create/modify/move/delete in a new subdirectory",
            events.len()
        ))
    } else {
        Err(format!("missing {missing:?}; events {events:?}"))
    }
}

fn file_roundtrip(client: &AgentClient) -> Check {
    const SIZE: usize = 50 << 20;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<u8> = (0..SIZE / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect();
    let want = hex(&Sha256::digest(&data));
    let start = Instant::now();
    let written = client
        .write_file(
            "/root/big.bin",
            &mut data.as_slice(),
            WriteOptions {
                mode: Some(0o600),
                create_parents: true,
                atomic: true,
            },
        )
        .map_err(err("write_file"))?;
    let up = start.elapsed().as_secs_f64();
    expect("written", written, SIZE as u64)?;
    let out = shell(client, "sha256sum /root/big.bin; stat -c %a /root/big.bin")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !text.starts_with(&want) || !text.contains("\n600") {
        return Err(format!("guest says {text:?}, host sha256 {want}"));
    }
    let start = Instant::now();
    let mut back = Vec::new();
    let meta = client
        .read_file("/root/big.bin", 0, None, &mut back)
        .map_err(err("read_file"))?;
    let down = start.elapsed().as_secs_f64();
    expect("metadata size", meta.size, SIZE as u64)?;
    expect("read back sha256", hex(&Sha256::digest(&back)), want)?;
    Ok(format!(
        "50 MiB up in {up:.1} s, down in {down:.1} s, sha256 matches"
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn file_ops(client: &AgentClient) -> Check {
    client
        .mkdir("/tmp/ops/a/b", true, None)
        .map_err(err("mkdir -p"))?;
    client
        .write_file(
            "/tmp/ops/a/b/f",
            &mut &b"hello"[..],
            WriteOptions::default(),
        )
        .map_err(err("write"))?;
    let entries = client.list_dir("/tmp/ops/a/b").map_err(err("list"))?;
    expect(
        "listing",
        entries.iter().map(|e| e.name.clone()).collect::<Vec<_>>(),
        vec!["f".to_string()],
    )?;
    let meta = client.stat("/tmp/ops/a/b/f", true).map_err(err("stat"))?;
    expect("size", meta.size, 5)?;
    let missing = client.read_to_vec("/tmp/ops/nope");
    let Err(e) = missing else {
        return Err("reading a missing file succeeded".into());
    };
    if !e.to_string().contains("/tmp/ops/nope") {
        return Err(format!("error does not name the path: {e}"));
    }
    if client.remove("/tmp/ops/a", false).is_ok() {
        return Err("non-recursive remove of a non-empty dir succeeded".into());
    }
    client.remove("/tmp/ops", true).map_err(err("remove -r"))?;
    if client.stat("/tmp/ops", false).is_ok() {
        return Err("/tmp/ops still exists".into());
    }
    Ok(format!("mkdir/write/list/stat/remove; missing file: {e}"))
}

fn background_processes(client: &AgentClient) -> Check {
    let p = client
        .proc_start(ProcessSpec::shell(
            "echo first; sleep 1; echo second >&2; exit 4",
        ))
        .map_err(err("proc_start"))?;
    let listed = client.proc_list().map_err(err("proc_list"))?;
    if !listed.iter().any(|i| i.proc_id == p.proc_id) {
        return Err(format!("proc {} not listed: {listed:?}", p.proc_id));
    }
    let exit = client
        .proc_wait(p.proc_id, Some(Duration::from_secs(60)))
        .map_err(err("proc_wait"))?;
    expect("status", exit.status, ExitStatus::Code(4))?;
    let mut out = String::new();
    client
        .proc_logs(p.proc_id, Stream::Stdout, 0, false)
        .map_err(err("logs"))?
        .read_to_string(&mut out)
        .map_err(err("read logs"))?;
    let mut errs = String::new();
    client
        .proc_logs(p.proc_id, Stream::Stderr, 0, false)
        .map_err(err("logs"))?
        .read_to_string(&mut errs)
        .map_err(err("read logs"))?;
    expect("stdout log", out.as_str(), "first\n")?;
    expect("stderr log", errs.as_str(), "second\n")?;
    let sleeper = client
        .proc_start(ProcessSpec::argv(["sleep", "1000"]))
        .map_err(err("proc_start"))?;
    client
        .proc_kill(sleeper.proc_id, libc::SIGKILL)
        .map_err(err("proc_kill"))?;
    let exit = client
        .proc_wait(sleeper.proc_id, Some(Duration::from_secs(30)))
        .map_err(err("proc_wait"))?;
    expect("killed", exit.status, ExitStatus::Signal(libc::SIGKILL))?;
    Ok("start/list/wait/logs/kill".into())
}

fn port_forward(client: &AgentClient) -> Check {
    client
        .write_file(
            "/www/index.html",
            &mut &b"hello from the guest\n"[..],
            WriteOptions {
                create_parents: true,
                ..WriteOptions::default()
            },
        )
        .map_err(err("write index"))?;
    let server = client
        .proc_start(ProcessSpec::argv([
            "httpd", "-f", "-p", "8000", "-h", "/www",
        ]))
        .map_err(err("start httpd"))?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(err("bind"))?;
    let addr = listener.local_addr().map_err(err("addr"))?;
    let forward = client
        .forward_listener(listener, 8000)
        .map_err(err("forward"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        let attempt = (|| -> Result<String, String> {
            let mut s = TcpStream::connect(addr).map_err(err("connect"))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .map_err(err("timeout"))?;
            s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
                .map_err(err("send"))?;
            let mut reply = String::new();
            s.read_to_string(&mut reply).map_err(err("read"))?;
            Ok(reply)
        })();
        match attempt {
            Ok(reply) if reply.contains("hello from the guest") => break Ok(reply),
            other if Instant::now() > deadline => {
                break Err(format!("no page through the forward: {other:?}"))
            }
            _ => std::thread::sleep(Duration::from_millis(300)),
        }
    };
    forward.stop();
    let _ = client.proc_kill(server.proc_id, libc::SIGKILL);
    let reply = result?;
    let refused = client.connect_port(8001);
    let refused = match refused {
        Ok(_) => return Err("connecting to a port nobody listens on succeeded".into()),
        Err(e) => e.to_string(),
    };
    Ok(format!(
        "{} via {addr}; closed port: {refused}",
        reply.lines().next().unwrap_or("")
    ))
}

/// Crashes the guest kernel while an exec is pending: the client must fail promptly with a clear
/// error, not hang.
pub fn agent_gone(client: &AgentClient, guest: &mut Guest) -> Check {
    let mut pending = client
        .exec(ProcessSpec::argv(["sleep", "1000"]), false)
        .map_err(err("exec sleep"))?;
    // A background process, so that nothing closes it before it has written.
    client
        .proc_start(ProcessSpec::shell(
            "sleep 0.5; echo c > /proc/sysrq-trigger",
        ))
        .map_err(err("start the crash"))?;
    let start = Instant::now();
    let result = loop {
        match pending.next_event_timeout(Duration::from_secs(120)) {
            Ok(Some(ExecEvent::Exited { status, .. })) => {
                break Err(format!("sleep exited ({status:?}) instead of an error"))
            }
            Ok(Some(_)) => continue,
            Ok(None) => break Err("event stream ended without an error".into()),
            Err(e) => break Ok(e.to_string()),
        }
    };
    let after = start.elapsed().as_secs_f64();
    let vm_exit = guest.wait_exit(Duration::from_secs(60));
    let message = result?;
    if !message.contains("closed") {
        return Err(format!("unclear error: {message}"));
    }
    if client.ping().is_ok() {
        return Err("ping succeeded after the guest died".into());
    }
    Ok(format!(
        "pending exec failed after {after:.1} s: {message}; VMM exit {vm_exit:?}"
    ))
}
