//! `agentvm bench isolate`'s density figure: how many isolates are alive at once, and what each
//! costs. The isolates are held by worker processes of this same binary (the hidden
//! `bench isolate-density-worker`), as a sandbox host holds them in its isolate workers: each
//! isolate is two descriptors (VM, vCPU), so one process holds at most half its hard
//! `RLIMIT_NOFILE`, and a count above that is spread over several workers. Every worker boots
//! its own template, creates its share from it copy-on-write, runs one job in each, reports, and
//! keeps them until the benchmark closes its stdin; the figures are taken while all of them are
//! alive.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::{Deserialize, Serialize};
use vmm::isolate::{HostContext, Isolate, IsolateConfig, KvStore, Template};

use super::child::die_with_parent;

/// Descriptors each worker keeps for itself beyond its isolates' (stdio, the template, KVM).
const FD_RESERVE: u64 = 256;
/// How long one worker may take to create its isolates: KVM_CREATE_VM slows as VMs accumulate,
/// ~10 ms each past several thousand on the slowest machine we measured.
const WORKER_LIMIT: Duration = Duration::from_secs(20 * 60);
/// How long a worker may take to end once told to (dropping thousands of VMs).
const EXIT_LIMIT: Duration = Duration::from_secs(5 * 60);

#[derive(Args)]
pub struct DensityWorkerArgs {
    /// Isolates this worker creates and holds.
    #[arg(long)]
    count: u32,
}

/// A worker's one line on stdout, once its isolates are alive and each ran a job.
#[derive(Debug, Serialize, Deserialize)]
struct WorkerReport {
    isolates: u32,
    create_seconds: f64,
    /// Growth of the worker's Private_Dirty from before the first isolate to after the last job.
    private_kib: f64,
    fds: u64,
    guest_ram_bytes: u64,
}

/// What the benchmark reports.
#[derive(Debug, Serialize)]
pub struct Density {
    pub isolates: u32,
    /// Worker processes that held them.
    pub processes: u32,
    /// From the first worker's start (its template boot included) until every isolate was
    /// alive and had run a job.
    pub create_seconds: f64,
    pub private_per_isolate_kib: f64,
    /// Growth of the kernel's unreclaimable slab and page tables (KVM's per-VM and per-vCPU
    /// structures, the isolates' page tables) per isolate, host-wide: other activity on the
    /// machine adds noise.
    pub kernel_per_isolate_kib: f64,
    /// Guest RAM each isolate maps (shared with its worker's template until written).
    pub guest_ram_mib: f64,
    pub fds_per_isolate: f64,
    /// 4 GiB / (private + kernel memory per isolate).
    pub fit_in_4_gib: f64,
}

/// The hidden worker command.
pub fn worker(args: DensityWorkerArgs) -> Result<std::process::ExitCode, String> {
    super::isolate::raise_fd_limit(u64::from(args.count) * 2 + FD_RESERVE);
    let spec = super::isolate::job()?;
    let template = Template::new(IsolateConfig::default()).map_err(|e| e.to_string())?;
    let (private0, fds0) = (
        super::isolate::private_dirty_kib(),
        super::isolate::open_fds(),
    );
    let t0 = Instant::now();
    let mut held = Vec::with_capacity(args.count as usize);
    for i in 0..args.count {
        held.push(Isolate::from_template(&template).map_err(|e| {
            format!(
                "isolate {i} of this worker's {} could not be created: {e}",
                args.count
            )
        })?);
    }
    let mut kv = KvStore::new(0);
    let mut log = |_: &str| {};
    let mut ctx = HostContext {
        kv: &mut kv,
        log: &mut log,
        fetch: None,
    };
    for iso in held.iter_mut() {
        super::isolate::check(iso.run(&spec, &mut ctx))?;
    }
    let report = WorkerReport {
        isolates: args.count,
        create_seconds: t0.elapsed().as_secs_f64(),
        private_kib: super::isolate::private_dirty_kib() - private0,
        fds: super::isolate::open_fds().saturating_sub(fds0) as u64,
        guest_ram_bytes: template.ram_size() as u64,
    };
    let line = serde_json::to_string(&report).map_err(|e| e.to_string())?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("cannot report to the benchmark: {e}"))?;
    drop(stdout);
    // Held until the benchmark has measured the whole machine with every worker's isolates alive.
    let mut rest = Vec::new();
    let _ = std::io::stdin().lock().read_to_end(&mut rest);
    drop(held);
    Ok(std::process::ExitCode::SUCCESS)
}

/// Per-process isolate capacity: half the hard descriptor limit, less the worker's own.
fn per_process_capacity() -> u32 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid resource and a pointer to a local.
    let hard = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_max
    } else {
        1024
    };
    let usable = hard.saturating_sub(FD_RESERVE) / 2;
    u32::try_from(usable).unwrap_or(u32::MAX).max(1)
}

/// `total` split into `parts` nearly equal shares.
fn shares(total: u32, parts: u32) -> Vec<u32> {
    (0..parts)
        .map(|i| total / parts + u32::from(i < total % parts))
        .collect()
}

/// Unreclaimable slab + page tables (incl. KVM's secondary ones), in KiB, host-wide.
fn kernel_kib() -> f64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            matches!(key, "SUnreclaim" | "PageTables" | "SecPageTables").then(|| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<f64>()
                    .ok()
            })?
        })
        .sum()
}

/// Workers that are killed (and reaped) however the measurement ends.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Creates `total` isolates across as many workers as the descriptor limit needs and measures
/// them while all are alive.
pub fn measure(total: u32, progress: &dyn Fn(&str)) -> Result<Density, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the agentvm binary: {e}"))?;
    let processes = total.div_ceil(per_process_capacity());
    let kernel0 = kernel_kib();
    let t0 = Instant::now();
    let mut workers = Workers(Vec::new());
    let (tx, rx) = mpsc::channel();
    for (index, count) in shares(total, processes).into_iter().enumerate() {
        let mut cmd = Command::new(&exe);
        cmd.args(["bench", "isolate-density-worker", "--count"])
            .arg(count.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start isolate worker {index}: {e}"))?;
        let stdout = child.stdout.take();
        workers.0.push(child);
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            if let Some(stdout) = stdout {
                let _ = BufReader::new(stdout).read_line(&mut line);
            }
            let _ = tx.send((index, line));
        });
    }
    drop(tx);
    progress(&format!(
        "{total} isolates alive at once, held by {processes} worker process(es)"
    ));
    let deadline = t0 + WORKER_LIMIT;
    let mut reports = Vec::with_capacity(processes as usize);
    for _ in 0..processes {
        let wait = deadline.saturating_duration_since(Instant::now());
        let (index, line) = rx.recv_timeout(wait).map_err(|_| {
            format!(
                "the isolate workers did not all report within {}s",
                WORKER_LIMIT.as_secs()
            )
        })?;
        let report: WorkerReport = serde_json::from_str(line.trim()).map_err(|_| {
            let status = workers.0[index]
                .try_wait()
                .ok()
                .flatten()
                .map_or("still running".to_string(), |s| s.to_string());
            format!("isolate worker {index} failed ({status}; its error is above)")
        })?;
        reports.push(report);
    }
    let create_seconds = t0.elapsed().as_secs_f64();
    let kernel_total = (kernel_kib() - kernel0).max(0.0);
    for child in &mut workers.0 {
        drop(child.stdin.take());
    }
    let exit_deadline = Instant::now() + EXIT_LIMIT;
    for child in &mut workers.0 {
        while child.try_wait().ok().flatten().is_none() && Instant::now() < exit_deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(workers);

    let n = f64::from(total);
    let private_total: f64 = reports.iter().map(|r| r.private_kib).sum();
    let fds_total: u64 = reports.iter().map(|r| r.fds).sum();
    let private_per = private_total / n;
    let kernel_per = kernel_total / n;
    Ok(Density {
        isolates: total,
        processes,
        create_seconds,
        private_per_isolate_kib: private_per,
        kernel_per_isolate_kib: kernel_per,
        guest_ram_mib: reports.first().map_or(0.0, |r| r.guest_ram_bytes as f64) / (1 << 20) as f64,
        fds_per_isolate: fds_total as f64 / n,
        fit_in_4_gib: 4.0 * (1u64 << 30) as f64 / ((private_per + kernel_per) * 1024.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_total_and_differ_by_at_most_one() {
        for (total, parts) in [(10_000, 2), (9_999, 3), (7, 7), (5, 1)] {
            let s = shares(total, parts);
            assert_eq!(s.len(), parts as usize);
            assert_eq!(s.iter().sum::<u32>(), total);
            let (min, max) = (s.iter().min().unwrap(), s.iter().max().unwrap());
            assert!(max - min <= 1, "{s:?}");
        }
    }
}
