//! `agentvm bench restore`: one guest booted under `agentvm serve`, paused and snapshotted once;
//! then, iteration by iteration, a restore of that snapshot by each memory backend (`file`,
//! `uffd` with no working set, `uffd+prefetch` with the set recorded by a first uffd restore) and
//! a cold boot of the same guest as the peer, each in a fresh `serve`; then N concurrent restores
//! of the snapshot (fork). By default the guest is the ring-3 probe (`count` mode), which runs on
//! any KVM host: the figures are the VMM's restore path and the guest's first step after it.
//! With `--guest-bound`, the same columns follow for the default Linux guest with its agent,
//! timed to its first exec result (measured where Linux guests run: see
//! [`restore_guest`](super::restore_guest)).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use hyper::Method;
use serde::Serialize;
use serde_json::json;
use tokio::runtime::Runtime;
use vmm::process_stats::monotonic_ns;

use super::local::GUEST_MEM_MIB;
use super::machine::MachineInfo;
use super::report::{rss_of, RssKib};
use super::restore_guest;
use super::restore_guest_report::{linux_sections, LinuxGuestInfo};
use super::restore_inner::RestoreRunArgs;
use super::restore_report::{RestoreDocument, RestoreGuest, SnapshotInfo};
use super::serve_vm::{self, pss_kib, ServeVm, VmMetrics};

/// Where `cargo test -p integration-tests` builds the probe guest, relative to the directory
/// that holds `target/x86_64-unknown-linux-gnu/release/agentvm`.
const PROBE_FROM_TARGET_DIR: &str = "guests/x86_64-unknown-linux-gnu/release/probe";
/// The guest's wait limits: the probe prints within milliseconds, a slow host within seconds.
const GUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Console lines the guest prints before it is snapshotted: it is well into its work.
const LINES_BEFORE_SNAPSHOT: usize = 3;
/// The vsock CID of the snapshotted guest; fork copies get their own from here on.
const GUEST_CID: u64 = 3;

#[derive(Args)]
pub struct RestoreArgs {
    /// Restores per backend (and cold boots), after one uncounted warm-up of each.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    iterations: u32,
    /// VMs restored at once from the snapshot (file backend) for the fork figures, one round
    /// per iteration; 0 skips them.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=500))]
    fork: u32,
    /// The guest to boot and snapshot (default: the ring-3 probe built by the integration
    /// tests, target/guests/x86_64-unknown-linux-gnu/release/probe). It must write lines to
    /// its serial console: 3 before the snapshot, and one after each restore or boot.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// The guest's command line.
    #[arg(long, value_name = "ARGS", default_value = "probe.mode=count")]
    boot_args: String,
    /// Guest memory.
    #[arg(long, value_name = "MIB", default_value_t = 128,
          value_parser = clap::value_parser!(u64).range(16..=16384))]
    mem_mib: u64,
    /// Also measure the default Linux guest with its agent (kernel + initramfs, not --kernel):
    /// each backend's restore and a cold boot to the first exec result, `--iterations` times.
    /// Where this host's KVM cannot run Linux that runs in the nested test host and takes
    /// minutes. (Opt-in, unlike `bench boot`'s `--no-nested`: the default stays probe-only and
    /// fast; and the name says what is measured, which runs directly on a VMX/SVM host.)
    #[arg(long)]
    guest_bound: bool,
    /// With --guest-bound: time limit of each Linux VM from its request to its first exec
    /// result, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 180, requires = "guest_bound",
          value_parser = clap::value_parser!(u64).range(10..=3600))]
    boot_timeout: u64,
    /// Print a JSON document instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON document to FILE.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// How a measured VM comes to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    File,
    Uffd,
    UffdPrefetch,
    ColdBoot,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::File, Mode::Uffd, Mode::UffdPrefetch, Mode::ColdBoot];

    pub fn name(self) -> &'static str {
        match self {
            Mode::File => "file",
            Mode::Uffd => "uffd",
            Mode::UffdPrefetch => "uffd+prefetch",
            Mode::ColdBoot => "cold boot",
        }
    }
}

/// One VM brought up and measured.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreSample {
    /// The client's PUT /snapshot/load (cold boot: PUT /actions InstanceStart) until its 204.
    pub request_ns: u64,
    /// Inside the VMM: the load (cold boot: the VM build) began to the first KVM_RUN.
    pub vmm_to_first_run_us: u64,
    /// Of which: to the VM created with guest memory registered (state file read and checked,
    /// memory mapped or registered with userfaultfd, working set prefetched; cold boot: VM and
    /// memory created).
    pub vmm_to_kvm_ready_us: u64,
    /// Of which: to the device, VM and vCPU state restored (cold boot: kernel loaded).
    pub vmm_to_loaded_us: u64,
    /// The client's request until the guest's first complete console line.
    pub request_to_console_line_ns: u64,
    /// Pages the uffd handler filled on demand (faults + zero pages), once the guest printed.
    pub uffd_on_demand_pages: Option<u64>,
    pub uffd_prefetched_pages: Option<u64>,
    pub uffd_fault_service_s: Option<f64>,
    /// The VMM process once the guest printed.
    pub rss: RssKib,
    pub pss_kib: Option<u64>,
}

/// One round of N concurrent restores.
#[derive(Debug, Clone, Serialize)]
pub struct ForkSample {
    pub vms: u32,
    /// All N loads sent at once until every one answered 204 (every VM running).
    pub all_loaded_ns: u64,
    /// Until every guest printed its first console line.
    pub all_console_line_ns: u64,
    pub rss_sum_kib: u64,
    pub pss_sum_kib: u64,
}

/// Files of the one snapshot every run restores.
struct Snapshot {
    state: PathBuf,
    mem: PathBuf,
    /// The working set a first uffd restore recorded, put in place before each prefetch run.
    recorded_ws: PathBuf,
}

struct Bench<'a> {
    exe: &'a Path,
    dir: &'a Path,
    rt: &'a Runtime,
    kernel: &'a Path,
    boot_args: &'a str,
    mem_mib: u64,
    snapshot: Snapshot,
    runs: u32,
}

pub fn restore(args: RestoreArgs) -> Result<ExitCode, String> {
    if let Some(out) = &args.out {
        super::check_writable(out)?;
    }
    let kernel = match &args.kernel {
        Some(k) if !k.is_file() => return Err(format!("--kernel {}: no such file", k.display())),
        Some(k) => std::path::absolute(k).map_err(|e| format!("--kernel {}: {e}", k.display()))?,
        None => default_probe()?,
    };
    vmm::host::check_kvm_access().map_err(|e| e.to_string())?;
    // Before the probe runs, so a missing kernel fails the benchmark at once.
    let artefacts = if args.guest_bound {
        eprintln!("bench: preparing the default guest kernel and initramfs");
        Some(vmm::artefacts::prepare_default().map_err(|e| e.to_string())?)
    } else {
        None
    };
    let (exe, dir) = super::child::self_and_workdir()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let snapshot = Snapshot {
        state: dir.path().join("vm.state"),
        mem: dir.path().join("vm.mem"),
        recorded_ws: dir.path().join("recorded.ws"),
    };
    let mut bench = Bench {
        exe: &exe,
        dir: dir.path(),
        rt: &rt,
        kernel: &kernel,
        boot_args: &args.boot_args,
        mem_mib: args.mem_mib,
        snapshot,
        runs: 0,
    };

    eprintln!("bench: booting {} and snapshotting it", kernel.display());
    let create_ns = bench.create_snapshot()?;
    eprintln!("bench: recording the working set (a first uffd restore)");
    bench.record_working_set()?;
    let ws_pages = snapshot::read_working_set(&bench.snapshot.recorded_ws)
        .map_err(|e| e.to_string())?
        .map_or(0, |set| set.pages.len());

    let mut samples: Vec<Vec<RestoreSample>> = vec![Vec::new(); Mode::ALL.len()];
    for i in 0..=args.iterations {
        for (m, mode) in Mode::ALL.iter().enumerate() {
            let sample = bench.run_once(*mode)?;
            if i == 0 {
                continue; // warm-up: page cache, first mappings
            }
            eprintln!(
                "bench: {}/{} {}: VMM load -> first KVM_RUN {:.3} ms, -> console line {:.2} ms",
                i,
                args.iterations,
                mode.name(),
                sample.vmm_to_first_run_us as f64 / 1000.0,
                sample.request_to_console_line_ns as f64 / 1e6
            );
            samples[m].push(sample);
        }
    }

    let mut forks = Vec::new();
    if args.fork > 0 {
        for round in 1..=args.iterations {
            let sample = bench.fork_once(args.fork)?;
            eprintln!(
                "bench: fork {round}/{}: {} VMs loaded in {:.1} ms, PSS {:.1} MiB",
                args.iterations,
                args.fork,
                sample.all_loaded_ns as f64 / 1e6,
                sample.pss_sum_kib as f64 / 1024.0
            );
            forks.push(sample);
        }
    }

    let mem_file_allocated_kib = allocated_kib(&bench.snapshot.mem);
    let doc = RestoreDocument::new(
        args.iterations,
        args.fork,
        MachineInfo::read(),
        RestoreGuest {
            kernel: kernel.display().to_string(),
            boot_args: args.boot_args.clone(),
            vcpus: 1,
            mem_mib: args.mem_mib,
        },
        SnapshotInfo {
            create_ms: create_ns as f64 / 1e6,
            mem_file_allocated_mib: mem_file_allocated_kib as f64 / 1024.0,
            working_set_pages: ws_pages,
        },
        &samples,
        &forks,
    );
    let doc = match &artefacts {
        None => doc,
        Some(artefacts) => {
            let helper = RestoreRunArgs {
                kernel: artefacts.kernel.clone(),
                initrd: artefacts.initrd.clone(),
                iterations: args.iterations,
                mem_mib: GUEST_MEM_MIB,
                timeout: args.boot_timeout,
            };
            let measured = restore_guest::measure(artefacts, &helper);
            let info = LinuxGuestInfo::new(
                &measured,
                artefacts.kernel.display().to_string(),
                artefacts.initrd.display().to_string(),
                helper.mem_mib,
            );
            doc.with_linux(info, linux_sections(&measured))
        }
    };
    super::emit_json_or_table(
        &doc,
        &doc.to_table(),
        doc.errors(),
        args.json,
        args.out.as_deref(),
    )
}

/// The probe guest next to this binary's target directory.
fn default_probe() -> Result<PathBuf, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the agentvm binary: {e}"))?;
    // target/<triple>/release/agentvm -> target/
    let probe = exe
        .ancestors()
        .nth(3)
        .map(|target| target.join(PROBE_FROM_TARGET_DIR));
    match probe {
        Some(p) if p.is_file() => Ok(p),
        _ => Err(format!(
            "no guest to snapshot: pass --kernel PATH (the default, the ring-3 probe guest, is \
             built by `cargo test --release -p integration-tests` into target/{PROBE_FROM_TARGET_DIR}, \
             which is not there next to {})",
            exe.display()
        )),
    }
}

/// Blocks actually allocated to `path` (the memory file is sparse: zero pages are holes).
fn allocated_kib(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() / 2)
}

impl Bench<'_> {
    fn next_name(&mut self, what: &str) -> String {
        self.runs += 1;
        format!("{what}-{}", self.runs)
    }

    fn vsock_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.vsock"))
    }

    /// The guest configured (machine, vsock, kernel) but not started.
    fn configure(&self, vm: &ServeVm, name: &str) -> Result<(), String> {
        vm.call(
            self.rt,
            Method::PUT,
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": self.mem_mib}),
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
            json!({"kernel_image_path": self.kernel, "boot_args": self.boot_args}),
        )
    }

    /// Boots the guest, lets it run a little, pauses and snapshots it; returns how long
    /// `PUT /snapshot/create` took.
    fn create_snapshot(&mut self) -> Result<u64, String> {
        let name = self.next_name("snapshotted");
        let mut vm = ServeVm::start(self.exe, self.dir, &name)?;
        self.configure(&vm, &name)?;
        vm.call(
            self.rt,
            Method::PUT,
            "/actions",
            json!({"action_type": "InstanceStart"}),
        )?;
        vm.wait_console_lines(LINES_BEFORE_SNAPSHOT, GUEST_TIMEOUT)?;
        vm.call(self.rt, Method::PATCH, "/vm", json!({"state": "Paused"}))?;
        let start = monotonic_ns();
        vm.call(
            self.rt,
            Method::PUT,
            "/snapshot/create",
            json!({
                "snapshot_path": self.snapshot.state,
                "mem_file_path": self.snapshot.mem,
                "snapshot_type": "Full",
            }),
        )?;
        let took = monotonic_ns().saturating_sub(start);
        vm.stop()?;
        Ok(took)
    }

    fn ws_in_place(&self) -> PathBuf {
        snapshot::working_set_path(&self.snapshot.mem)
    }

    /// A uffd restore with no working set records one (what the guest touched until its VMM
    /// ended); it is kept aside for the prefetch runs.
    fn record_working_set(&mut self) -> Result<(), String> {
        self.run_once(Mode::Uffd)?;
        keep_recorded_working_set(&self.ws_in_place(), &self.snapshot.recorded_ws)
    }

    /// The working set the next restore finds: none for `uffd` (every page on demand), the
    /// recorded one for `uffd+prefetch`.
    fn prepare_working_set(&self, mode: Mode) -> Result<(), String> {
        put_working_set_in_place(mode, &self.ws_in_place(), &self.snapshot.recorded_ws)
    }

    fn load_body(&self, mode: Mode, vsock: &Path, cid: u64) -> serde_json::Value {
        let backend = if mode == Mode::File { "File" } else { "Uffd" };
        json!({
            "snapshot_path": self.snapshot.state,
            "mem_backend": {"backend_type": backend, "backend_path": self.snapshot.mem},
            "resume_vm": true,
            "vsock_override": {"uds_path": vsock, "guest_cid": cid},
        })
    }

    fn run_once(&mut self, mode: Mode) -> Result<RestoreSample, String> {
        self.prepare_working_set(mode)?;
        let name = self.next_name(&mode.name().replace([' ', '+'], "-"));
        let mut vm = ServeVm::start(self.exe, self.dir, &name)?;
        let (method, path, body) = match mode {
            Mode::ColdBoot => {
                self.configure(&vm, &name)?;
                (
                    Method::PUT,
                    "/actions",
                    json!({"action_type": "InstanceStart"}),
                )
            }
            _ => (
                Method::PUT,
                "/snapshot/load",
                self.load_body(mode, &self.vsock_path(&name), GUEST_CID),
            ),
        };
        let start = monotonic_ns();
        vm.call(self.rt, method, path, body)?;
        let answered = monotonic_ns();
        vm.wait_console_lines(1, GUEST_TIMEOUT)?;
        let printed = monotonic_ns();
        let metrics = vm.wait_first_run(self.rt, GUEST_TIMEOUT)?;
        let sample = sample_of(&vm, &metrics, mode, start, answered, printed)?;
        vm.stop()?;
        Ok(sample)
    }

    /// N serves started, then N loads sent at once (file backend, each VM its own vsock path
    /// and CID).
    fn fork_once(&mut self, n: u32) -> Result<ForkSample, String> {
        let mut vms = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let name = self.next_name("fork");
            vms.push((ServeVm::start(self.exe, self.dir, &name)?, name));
        }
        let start = monotonic_ns();
        let results = self.rt.block_on(async {
            let tasks: Vec<_> = (0u64..)
                .zip(&vms)
                .map(|(i, (vm, name))| {
                    tokio::spawn(serve_vm::call(
                        vm.sock.clone(),
                        Method::PUT,
                        "/snapshot/load".to_string(),
                        self.load_body(Mode::File, &self.vsock_path(name), GUEST_CID + 1 + i),
                    ))
                })
                .collect();
            let mut results = Vec::with_capacity(tasks.len());
            for task in tasks {
                results.push(
                    task.await
                        .map_err(|e| format!("load task: {e}"))
                        .and_then(|r| r),
                );
            }
            results
        });
        let loaded = monotonic_ns();
        for ((vm, _), result) in vms.iter().zip(results) {
            result.map_err(|e| vm.failure(&e))?;
        }
        for (vm, _) in &mut vms {
            vm.wait_console_lines(1, GUEST_TIMEOUT)?;
        }
        let printed = monotonic_ns();
        let mut rss_sum_kib = 0;
        let mut pss_sum_kib = 0;
        for (vm, _) in &vms {
            rss_sum_kib += rss_of(vm.pid())
                .ok_or_else(|| vm.failure("its memory cannot be read"))?
                .total_kib;
            pss_sum_kib += pss_kib(vm.pid()).ok_or_else(|| vm.failure("no PSS"))?;
        }
        // SIGTERM to all first, so their teardowns overlap.
        for (vm, _) in &vms {
            vm.terminate();
        }
        for (vm, _) in vms {
            vm.wait_stopped()?;
        }
        Ok(ForkSample {
            vms: n,
            all_loaded_ns: loaded.saturating_sub(start),
            all_console_line_ns: printed.saturating_sub(start),
            rss_sum_kib,
            pss_sum_kib,
        })
    }
}

fn sample_of(
    vm: &ServeVm,
    metrics: &VmMetrics,
    mode: Mode,
    start: u64,
    answered: u64,
    printed: u64,
) -> Result<RestoreSample, String> {
    let uffd = matches!(mode, Mode::Uffd | Mode::UffdPrefetch);
    if uffd && metrics.uffd_faults.is_none() {
        return Err(vm.failure("a uffd restore reports no uffd counters in GET /metrics"));
    }
    Ok(RestoreSample {
        request_ns: answered.saturating_sub(start),
        vmm_to_first_run_us: metrics.build_to_first_run_us.unwrap_or_default(),
        vmm_to_kvm_ready_us: metrics
            .build_to_kvm_ready_us
            .ok_or_else(|| vm.failure("GET /metrics has no agentvm_boot_kvm_ready_seconds"))?,
        vmm_to_loaded_us: metrics
            .build_to_loaded_us
            .ok_or_else(|| vm.failure("GET /metrics has no agentvm_boot_loaded_seconds"))?,
        request_to_console_line_ns: printed.saturating_sub(start),
        uffd_on_demand_pages: metrics
            .uffd_faults
            .map(|f| f + metrics.uffd_zero_pages.unwrap_or(0)),
        uffd_prefetched_pages: metrics.uffd_prefetched_pages,
        uffd_fault_service_s: metrics.uffd_fault_service_s,
        rss: rss_of(vm.pid()).ok_or_else(|| vm.failure("its memory cannot be read"))?,
        pss_kib: pss_kib(vm.pid()),
    })
}

/// Moves the working set a first uffd restore wrote at `in_place` aside to `recorded`, for the
/// prefetch runs.
pub(super) fn keep_recorded_working_set(in_place: &Path, recorded: &Path) -> Result<(), String> {
    std::fs::rename(in_place, recorded).map_err(|e| {
        format!(
            "the first uffd restore left no working set at {}: {e}",
            in_place.display()
        )
    })
}

/// The working set the next restore finds at `in_place`: none for `uffd` (every page on
/// demand), a copy of `recorded` for `uffd+prefetch`; none for `file` and the cold boot, which do
/// not read it.
pub(super) fn put_working_set_in_place(
    mode: Mode,
    in_place: &Path,
    recorded: &Path,
) -> Result<(), String> {
    match std::fs::remove_file(in_place) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove {}: {e}", in_place.display())),
    }
    if mode == Mode::UffdPrefetch {
        std::fs::copy(recorded, in_place)
            .map_err(|e| format!("cannot put the working set in place: {e}"))?;
    }
    Ok(())
}
