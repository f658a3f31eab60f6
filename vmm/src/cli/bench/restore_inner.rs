//! `agentvm bench restore-runs` (hidden): the guest-bound part of `bench restore`, where Linux
//! guests can run (inside the nested test host, or directly on a VMX/SVM host). The default
//! Linux guest with its agent is booted under `agentvm serve`, answers a first exec, is paused
//! and snapshotted once; then, per iteration, each backend (`file`, `uffd` with no working set,
//! `uffd+prefetch` with the recorded one) restores it in a fresh `serve`, and a cold boot of the
//! same guest comes up in another: each is timed from its request (load, or InstanceStart) to
//! the first successful `POST /sandbox/exec` result of `true`. JSON ([`GuestRestoreRuns`]) on
//! stdout.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agentvm_daemon::vm_client;
use clap::Args;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::runtime::Runtime;
use vmm::process_stats::monotonic_ns;

use super::report::{rss_of, RssKib};
use super::restore::Mode;
use super::serve_vm::{ServeVm, VmMetrics};

/// The vsock CID of the snapshotted guest; every restore keeps it (one VM runs at a time).
const GUEST_CID: u64 = 3;
/// The command whose first result is timed: the cheapest possible one.
const FIRST_EXEC: &str = "true";
/// Between two exec attempts while the agent is not up yet (409 before the VM is built, 503
/// until the agent answers): short against a restore's few milliseconds on a VMX host, then
/// doubling up to [`MAX_RETRY_GAP`], so a slow cold boot is not flooded with vsock connection
/// attempts (at most 16 ms of resolution against a cold boot's ~100 ms there).
const FIRST_RETRY_GAP: Duration = Duration::from_millis(1);
const MAX_RETRY_GAP: Duration = Duration::from_millis(16);

#[derive(Args, Debug, Clone)]
pub struct RestoreRunArgs {
    /// Guest kernel (ELF vmlinux).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Guest initramfs with the agent as /init.
    #[arg(long)]
    pub initrd: PathBuf,
    /// Restores per backend (and cold boots), after one uncounted warm-up of each.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub iterations: u32,
    /// Guest memory in MiB.
    #[arg(long = "mem-mib", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(16..=16384))]
    pub mem_mib: u64,
    /// How long each VM may take from its request to the first exec result, in seconds.
    #[arg(long, default_value_t = 180, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
}

/// One VM brought up (restored or cold booted) and asked for its first exec result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestRestoreSample {
    /// The client's PUT /snapshot/load (cold boot: PUT /actions InstanceStart) until its 204.
    pub request_ns: u64,
    /// The same request sent until the first `POST /sandbox/exec` of `true` answered exit 0.
    pub request_to_first_exec_ns: u64,
    /// Exec requests sent until one succeeded (the others answered 409 or 503).
    pub exec_attempts: u32,
    /// Inside the VMM: the load (cold boot: the VM build) began to the first KVM_RUN.
    pub vmm_to_first_run_us: u64,
    /// Pages the uffd handler filled on demand (faults + zero pages) up to the first result.
    pub uffd_on_demand_pages: Option<u64>,
    pub uffd_prefetched_pages: Option<u64>,
    pub uffd_fault_service_s: Option<f64>,
    /// The VMM process once the first result was in.
    pub rss: Option<RssKib>,
}

/// The helper's results: per way of bringing the VM up, the counted samples.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GuestRestoreRuns {
    /// The snapshotted guest: InstanceStart to its first exec result.
    pub boot_to_first_exec_ms: Option<f64>,
    /// PUT /snapshot/create of the paused guest, as the client saw it.
    pub snapshot_create_ms: Option<f64>,
    /// Pages in the working set the first uffd restore recorded.
    pub working_set_pages: Option<usize>,
    pub file: Vec<GuestRestoreSample>,
    pub uffd: Vec<GuestRestoreSample>,
    pub uffd_prefetch: Vec<GuestRestoreSample>,
    pub cold_boot: Vec<GuestRestoreSample>,
    /// Why the runs stopped early (the samples taken until then are kept).
    pub error: Option<String>,
}

impl GuestRestoreRuns {
    pub fn samples(&self, mode: Mode) -> &[GuestRestoreSample] {
        match mode {
            Mode::File => &self.file,
            Mode::Uffd => &self.uffd,
            Mode::UffdPrefetch => &self.uffd_prefetch,
            Mode::ColdBoot => &self.cold_boot,
        }
    }

    fn samples_mut(&mut self, mode: Mode) -> &mut Vec<GuestRestoreSample> {
        match mode {
            Mode::File => &mut self.file,
            Mode::Uffd => &mut self.uffd,
            Mode::UffdPrefetch => &mut self.uffd_prefetch,
            Mode::ColdBoot => &mut self.cold_boot,
        }
    }

    /// Runs without results, saying why.
    pub fn failed(why: String) -> GuestRestoreRuns {
        GuestRestoreRuns {
            error: Some(why),
            ..GuestRestoreRuns::default()
        }
    }
}

pub fn restore_runs_cmd(args: RestoreRunArgs) -> Result<ExitCode, String> {
    let runs = restore_runs(&args);
    let json = serde_json::to_string(&runs).map_err(|e| format!("cannot encode results: {e}"))?;
    println!("{json}");
    match runs.error {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}

pub fn restore_runs(args: &RestoreRunArgs) -> GuestRestoreRuns {
    let mut out = GuestRestoreRuns::default();
    if let Err(e) = measure(args, &mut out) {
        out.error = Some(e);
    }
    out
}

fn measure(args: &RestoreRunArgs, out: &mut GuestRestoreRuns) -> Result<(), String> {
    for (flag, file) in [("--kernel", &args.kernel), ("--initrd", &args.initrd)] {
        if !file.is_file() {
            return Err(format!("{flag} {}: no such file", file.display()));
        }
    }
    // Removed (with every socket, console and snapshot file in it) on every path out.
    let (exe, dir) = super::child::self_and_workdir()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let mut bench = LinuxBench {
        exe: &exe,
        dir: dir.path(),
        rt: &rt,
        args,
        state: dir.path().join("vm.state"),
        mem: dir.path().join("vm.mem"),
        recorded_ws: dir.path().join("recorded.ws"),
        runs: 0,
    };
    eprintln!("bench: booting the Linux guest under serve and snapshotting it");
    let (boot_ms, create_ms) = bench.create_snapshot()?;
    out.boot_to_first_exec_ms = Some(boot_ms);
    out.snapshot_create_ms = Some(create_ms);
    eprintln!("bench: recording the working set (a first uffd restore)");
    bench.record_working_set()?;
    out.working_set_pages = Some(
        snapshot::read_working_set(&bench.recorded_ws)
            .map_err(|e| e.to_string())?
            .map_or(0, |set| set.pages.len()),
    );
    for i in 0..=args.iterations {
        for mode in Mode::ALL {
            let sample = bench.run_once(mode)?;
            if i == 0 {
                continue; // warm-up: page cache, first mappings
            }
            eprintln!(
                "bench: {i}/{} {}: request -> first exec result {:.1} ms ({} attempts), VMM \
                 load -> first KVM_RUN {:.3} ms",
                args.iterations,
                mode.name(),
                sample.request_to_first_exec_ns as f64 / 1e6,
                sample.exec_attempts,
                sample.vmm_to_first_run_us as f64 / 1000.0
            );
            out.samples_mut(mode).push(sample);
        }
    }
    Ok(())
}

struct LinuxBench<'a> {
    exe: &'a Path,
    dir: &'a Path,
    rt: &'a Runtime,
    args: &'a RestoreRunArgs,
    state: PathBuf,
    mem: PathBuf,
    /// The working set a first uffd restore recorded, put in place before each prefetch run.
    recorded_ws: PathBuf,
    runs: u32,
}

impl LinuxBench<'_> {
    fn next_name(&mut self, what: &str) -> String {
        self.runs += 1;
        format!("{what}-{}", self.runs)
    }

    fn vsock_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.vsock"))
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.args.timeout)
    }

    /// The guest configured (machine, vsock, kernel + initramfs) but not started.
    fn configure(&self, vm: &ServeVm, name: &str) -> Result<(), String> {
        vm.call(
            self.rt,
            Method::PUT,
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": self.args.mem_mib}),
        )?;
        vm.call(
            self.rt,
            Method::PUT,
            "/vsock",
            json!({"guest_cid": GUEST_CID, "uds_path": self.vsock_path(name)}),
        )?;
        vm.call(
            self.rt,
            Method::PUT,
            "/boot-source",
            json!({"kernel_image_path": self.args.kernel, "initrd_path": self.args.initrd}),
        )
    }

    /// Boots the guest until its agent answered an exec, pauses and snapshots it; returns the
    /// boot to that first result and the `PUT /snapshot/create`, in ms.
    fn create_snapshot(&mut self) -> Result<(f64, f64), String> {
        let name = self.next_name("snapshotted");
        let vm = ServeVm::start(self.exe, self.dir, &name)?;
        self.configure(&vm, &name)?;
        let start = monotonic_ns();
        vm.call(
            self.rt,
            Method::PUT,
            "/actions",
            json!({"action_type": "InstanceStart"}),
        )?;
        first_exec_result(self.rt, &vm, Instant::now() + self.timeout())?;
        let booted = monotonic_ns().saturating_sub(start);
        vm.call(self.rt, Method::PATCH, "/vm", json!({"state": "Paused"}))?;
        let start = monotonic_ns();
        vm.call(
            self.rt,
            Method::PUT,
            "/snapshot/create",
            json!({
                "snapshot_path": self.state,
                "mem_file_path": self.mem,
                "snapshot_type": "Full",
            }),
        )?;
        let created = monotonic_ns().saturating_sub(start);
        vm.stop()?;
        Ok((booted as f64 / 1e6, created as f64 / 1e6))
    }

    fn ws_in_place(&self) -> PathBuf {
        snapshot::working_set_path(&self.mem)
    }

    /// A uffd restore with no working set records one (what the guest touched until its first
    /// exec result); it is kept aside for the prefetch runs.
    fn record_working_set(&mut self) -> Result<(), String> {
        self.run_once(Mode::Uffd)?;
        super::restore::keep_recorded_working_set(&self.ws_in_place(), &self.recorded_ws)
    }

    /// The working set the next restore finds: none for `uffd` (every page on demand), the
    /// recorded one for `uffd+prefetch`; none for `file` and the cold boot, which do not read it.
    fn prepare_working_set(&self, mode: Mode) -> Result<(), String> {
        super::restore::put_working_set_in_place(mode, &self.ws_in_place(), &self.recorded_ws)
    }

    fn run_once(&mut self, mode: Mode) -> Result<GuestRestoreSample, String> {
        self.prepare_working_set(mode)?;
        let name = self.next_name(&mode.name().replace([' ', '+'], "-"));
        let vm = ServeVm::start(self.exe, self.dir, &name)?;
        let (path, body) = match mode {
            Mode::ColdBoot => {
                self.configure(&vm, &name)?;
                ("/actions", json!({"action_type": "InstanceStart"}))
            }
            _ => {
                let backend = if mode == Mode::File { "File" } else { "Uffd" };
                (
                    "/snapshot/load",
                    json!({
                        "snapshot_path": self.state,
                        "mem_backend": {"backend_type": backend, "backend_path": self.mem},
                        "resume_vm": true,
                        "vsock_override": {"uds_path": self.vsock_path(&name), "guest_cid": GUEST_CID},
                    }),
                )
            }
        };
        let deadline = Instant::now() + self.timeout();
        let start = monotonic_ns();
        vm.call(self.rt, Method::PUT, path, body)?;
        let answered = monotonic_ns();
        let exec_attempts = first_exec_result(self.rt, &vm, deadline)?;
        let result = monotonic_ns();
        let metrics = vm.metrics(self.rt)?;
        let sample = sample_of(&vm, &metrics, mode, start, answered, result, exec_attempts)?;
        vm.stop()?;
        Ok(sample)
    }
}

fn sample_of(
    vm: &ServeVm,
    metrics: &VmMetrics,
    mode: Mode,
    start: u64,
    answered: u64,
    result: u64,
    exec_attempts: u32,
) -> Result<GuestRestoreSample, String> {
    let uffd = matches!(mode, Mode::Uffd | Mode::UffdPrefetch);
    if uffd && metrics.uffd_faults.is_none() {
        return Err(vm.failure("a uffd restore reports no uffd counters in GET /metrics"));
    }
    Ok(GuestRestoreSample {
        request_ns: answered.saturating_sub(start),
        request_to_first_exec_ns: result.saturating_sub(start),
        exec_attempts,
        vmm_to_first_run_us: metrics
            .build_to_first_run_us
            .ok_or_else(|| vm.failure("GET /metrics has no agentvm_boot_time_seconds"))?,
        uffd_on_demand_pages: metrics
            .uffd_faults
            .map(|f| f + metrics.uffd_zero_pages.unwrap_or(0)),
        uffd_prefetched_pages: metrics.uffd_prefetched_pages,
        uffd_fault_service_s: metrics.uffd_fault_service_s,
        rss: rss_of(vm.pid()),
    })
}

/// Sends `POST /sandbox/exec` of `true` until one answers with exit status 0, retrying while
/// the VMM says the VM or its agent is not up yet (409, 503), until `deadline`; returns how many
/// requests it took.
fn first_exec_result(rt: &Runtime, vm: &ServeVm, deadline: Instant) -> Result<u32, String> {
    let body = json!({"cmd": [FIRST_EXEC]});
    let mut attempts = 0u32;
    let mut gap = FIRST_RETRY_GAP;
    loop {
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let answer = rt
            .block_on(vm_client::call(
                &vm.sock,
                Method::POST,
                "/sandbox/exec",
                Some(body.clone()),
                left.max(Duration::from_millis(1)),
            ))
            .map_err(|e| vm.failure(&e))?;
        if answer.status == StatusCode::OK {
            return exec_succeeded(&answer.body)
                .map(|()| attempts)
                .map_err(|e| vm.failure(&e));
        }
        let retry = matches!(
            answer.status,
            StatusCode::CONFLICT | StatusCode::SERVICE_UNAVAILABLE
        );
        if !retry || Instant::now() >= deadline {
            return Err(vm.failure(&format!(
                "POST /sandbox/exec `{FIRST_EXEC}` after {attempts} attempt(s): {} {}",
                answer.status.as_u16(),
                answer.fault_message()
            )));
        }
        std::thread::sleep(gap);
        gap = (gap * 2).min(MAX_RETRY_GAP);
    }
}

/// Whether a `POST /sandbox/exec` answer's last event (newline-delimited JSON) is exit status 0.
fn exec_succeeded(body: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(body);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or("POST /sandbox/exec answered 200 with no events")?;
    let event: serde_json::Value = serde_json::from_str(last)
        .map_err(|e| format!("POST /sandbox/exec: malformed last event {last:?}: {e}"))?;
    if event["exit_code"] == 0 && event["timed_out"] == false {
        Ok(())
    } else {
        Err(format!(
            "POST /sandbox/exec `{FIRST_EXEC}` ended with {event}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exit_status_zero_is_a_result() {
        assert!(exec_succeeded(b"{\"exit_code\":0,\"timed_out\":false}\n").is_ok());
        let out = b"{\"stdout\":\"eA==\"}\n{\"exit_code\":0,\"timed_out\":false}\n\n";
        assert!(exec_succeeded(out).is_ok());
        let e = exec_succeeded(b"{\"exit_code\":1,\"timed_out\":false}\n").unwrap_err();
        assert!(e.contains("exit_code"), "{e}");
        assert!(exec_succeeded(b"{\"error\":\"agent gone\"}\n").is_err());
        assert!(exec_succeeded(b"").unwrap_err().contains("no events"));
        assert!(exec_succeeded(b"{nope\n")
            .unwrap_err()
            .contains("malformed"));
    }

    #[test]
    fn runs_round_trip_through_json_by_mode() {
        let sample = GuestRestoreSample {
            request_ns: 1,
            request_to_first_exec_ns: 2,
            exec_attempts: 1,
            vmm_to_first_run_us: 3,
            uffd_on_demand_pages: Some(4),
            uffd_prefetched_pages: None,
            uffd_fault_service_s: Some(0.5),
            rss: None,
        };
        let mut runs = GuestRestoreRuns::default();
        runs.samples_mut(Mode::UffdPrefetch).push(sample);
        let json = serde_json::to_string(&runs).unwrap();
        let back: GuestRestoreRuns = serde_json::from_str(&json).unwrap();
        assert_eq!(back.samples(Mode::UffdPrefetch).len(), 1);
        assert!(back.samples(Mode::File).is_empty());
        assert_eq!(back.uffd_prefetch[0].uffd_on_demand_pages, Some(4));
        let failed = GuestRestoreRuns::failed("L2 hung".into());
        assert_eq!(failed.error.as_deref(), Some("L2 hung"));
    }
}
