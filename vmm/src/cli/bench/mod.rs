//! `agentvm bench boot`: boot N microVMs one after another and report median, p99, min, max of
//!
//! - VMM-side figures, measured on this machine directly: spawn → first KVM_RUN and the phases
//!   inside the VMM, and its memory before the guest runs. The guest is stopped at its first
//!   instruction (`agentvm boot --stop-at-first-run`), so these do not depend on guest speed.
//! - guest-bound figures (spawn → kernel entry → guest agent ready → command result, memory), for
//!   agentvm and side by side for QEMU microvm on the same kernel, initramfs and agent command.
//!   Where this host's KVM cannot run Linux they are measured in the nested test host, in one L1
//!   boot, by hidden helper commands of this same binary (`bench guest-runs`, `bench peer-run`).
//!
//! Every child process has a time limit and dies with the benchmark; temporary files live in
//! temporary directories removed on every path out.

mod child;
mod cpu_time;
mod exec;
mod exec_inner;
mod exec_measure;
mod exec_report;
mod guest_bound;
mod guest_vm;
mod inner;
mod isolate;
mod isolate_density;
mod local;
mod machine;
mod nested_bench;
mod net;
mod net_server;
mod output;
mod peer;
mod qemu_files;
mod report;
mod restore;
mod restore_guest;
mod restore_guest_report;
mod restore_inner;
mod restore_report;
mod serve_vm;
mod stats;
mod vhost_modules;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use vmm::artefacts::Artefacts;

use guest_bound::GuestBound;
use inner::{AgentvmRuns, PeerRuns};
use local::{LocalSample, GUEST_MEM_MIB};
use output::{Document, Figure, GuestInfo, PeerInfo, Section, Unit};
use peer::PEER_NAME;
use stats::span_ms;

/// The command every guest-bound boot runs: the cheapest possible result.
const GUEST_COMMAND: &str = "true";
/// Boots before the VMM-side measurements that are not counted (cold page cache, first exec).
const WARMUP_BOOTS: u32 = 1;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Boot benchmark: N boots one after another; medians and p99 of the VMM's start-up (on this
    /// machine) and of boot to guest agent and command result, beside QEMU microvm.
    Boot(BootArgs),
    /// Warm-VM benchmark: exec and protocol round trips, streamed output throughput and the VMM's
    /// CPU time per request (medians and p99), beside QEMU microvm with vhost-vsock.
    Exec(exec::ExecArgs),
    /// Snapshot restore benchmark: one guest snapshotted once, then restores by the `file`,
    /// `uffd` and `uffd+prefetch` backends beside a cold boot (medians and p99 of the VMM's
    /// load-to-first-KVM_RUN, the first guest output, uffd pages and RSS), and N concurrent
    /// restores (fork).
    Restore(restore::RestoreArgs),
    /// Isolate-tier benchmark: create + first call (from the pool and from scratch), calls per
    /// second, memory per isolate and how many fit, beside wasmi run directly in this process.
    Isolate(isolate::IsolateArgs),
    /// Egress filter benchmark: TCP connection setup (median, p99) and bulk throughput each way
    /// through the filter thread from a userspace guest, beside plain host loopback TCP.
    Net(net::NetArgs),
    /// Inside the nested test host: one warm VM (agentvm, or the peer with --qemu), exec figures
    /// as JSON on stdout.
    #[command(hide = true)]
    ExecRuns(exec_inner::ExecRunArgs),
    /// `bench isolate`'s density worker: creates N isolates, reports, holds them until stdin
    /// closes.
    #[command(hide = true)]
    IsolateDensityWorker(isolate_density::DensityWorkerArgs),
    /// Inside the nested test host: a Linux guest snapshotted once, then restores by each
    /// backend and cold boots to their first exec result, as JSON on stdout.
    #[command(hide = true)]
    RestoreRuns(restore_inner::RestoreRunArgs),
    /// Inside the nested test host: N × `agentvm run`, results as JSON on stdout.
    #[command(hide = true)]
    GuestRuns(inner::GuestArgs),
    /// Inside the nested test host: N × QEMU microvm, results as JSON on stdout.
    #[command(hide = true)]
    PeerRun(inner::PeerArgs),
}

#[derive(Args)]
pub struct BootArgs {
    /// Boots per VMM and part.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
    /// Print a JSON document instead of the table.
    #[arg(long)]
    json: bool,
    /// Only the VMM-side figures: skip the guest-bound boots (which on hosts whose KVM cannot
    /// run Linux need the nested test host and take minutes).
    #[arg(long)]
    no_nested: bool,
    /// Skip the QEMU microvm peer.
    #[arg(long)]
    no_peer: bool,
    /// Also write the JSON document to FILE.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Time limit of each guest-bound boot, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 180,
          value_parser = clap::value_parser!(u64).range(10..=3600))]
    boot_timeout: u64,
}

pub fn run(command: BenchCommand) -> Result<ExitCode, String> {
    match command {
        BenchCommand::Boot(args) => boot(args),
        BenchCommand::Exec(args) => exec::exec(args),
        BenchCommand::Restore(args) => restore::restore(args),
        BenchCommand::Isolate(args) => isolate::isolate(args),
        BenchCommand::Net(args) => net::net(args),
        BenchCommand::ExecRuns(args) => exec_inner::exec_runs_cmd(args),
        BenchCommand::IsolateDensityWorker(args) => isolate_density::worker(args),
        BenchCommand::RestoreRuns(args) => restore_inner::restore_runs_cmd(args),
        BenchCommand::GuestRuns(args) => inner::guest_runs_cmd(args),
        BenchCommand::PeerRun(args) => inner::peer_run_cmd(args),
    }
}

fn boot(args: BootArgs) -> Result<ExitCode, String> {
    if let Some(out) = &args.out {
        check_writable(out)?;
    }
    vmm::host::check_kvm_access().map_err(|e| e.to_string())?;
    eprintln!("bench: preparing the default guest kernel and initramfs");
    let artefacts = vmm::artefacts::prepare_default().map_err(|e| e.to_string())?;
    let machine = machine::MachineInfo::read();

    eprintln!(
        "bench: VMM side: {WARMUP_BOOTS} warm-up + {} boot(s) stopped at the guest's first instruction",
        args.runs
    );
    let samples = local::run(
        &artefacts.kernel,
        &artefacts.initrd,
        args.runs,
        WARMUP_BOOTS,
    )?;
    let mut sections = vec![local_section(&samples)];

    if !args.no_nested {
        let opts = guest_bound::Options {
            runs: args.runs,
            boot_timeout_secs: args.boot_timeout,
            with_peer: !args.no_peer,
            mem_mib: GUEST_MEM_MIB,
            command: vec![GUEST_COMMAND.to_string()],
        };
        sections.push(match guest_bound::measure(&artefacts, &opts) {
            Ok(g) => guest_section(&g),
            Err(e) => failed_guest_section(e),
        });
    }

    let doc = Document {
        benchmark: "agentvm bench boot",
        agentvm_version: env!("CARGO_PKG_VERSION"),
        runs: args.runs,
        machine,
        guest: guest_info(&artefacts, GUEST_COMMAND),
        sections,
    };
    emit(&doc, args.json, args.out.as_deref())
}

/// The guest every benchmark boots: the artefacts' kernel and initramfs, one vCPU, running
/// `command`.
fn guest_info(artefacts: &Artefacts, command: &str) -> GuestInfo {
    GuestInfo {
        kernel_version: artefacts.version.clone(),
        kernel: artefacts.kernel.display().to_string(),
        initrd: artefacts.initrd.display().to_string(),
        vcpus: 1,
        mem_mib: GUEST_MEM_MIB,
        command: vec![command.to_string()],
    }
}

/// Prints the document (table or JSON), writes it to `out`; fails when a part was not measured.
fn emit(doc: &Document, json_output: bool, out: Option<&Path>) -> Result<ExitCode, String> {
    emit_json_or_table(doc, &doc.to_table(), doc.errors(), json_output, out)
}

/// Prints `doc` as JSON or `table`, writes the JSON to `out`; fails with `errors` (the parts
/// that were not measured) when there are any.
fn emit_json_or_table<T: serde::Serialize>(
    doc: &T,
    table: &str,
    errors: Vec<String>,
    json_output: bool,
    out: Option<&Path>,
) -> Result<ExitCode, String> {
    let json =
        serde_json::to_string_pretty(doc).map_err(|e| format!("cannot encode the results: {e}"))?;
    if json_output {
        println!("{json}");
    } else {
        print!("{table}");
    }
    if let Some(out) = out {
        std::fs::write(out, format!("{json}\n"))
            .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
        eprintln!("bench: wrote {}", out.display());
    }
    if errors.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(errors.join("\n"))
    }
}

/// Fails before minutes of boots rather than after them.
fn check_writable(out: &Path) -> Result<(), String> {
    if out.is_dir() {
        return Err(format!("--out {} is a directory", out.display()));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(format!(
            "--out {}: directory {} does not exist",
            out.display(),
            parent.display()
        ));
    }
    Ok(())
}

fn ms_of(
    samples: &[LocalSample],
    from: fn(&LocalSample) -> u64,
    to: fn(&LocalSample) -> u64,
) -> Vec<f64> {
    samples
        .iter()
        .filter_map(|s| span_ms(from(s), to(s)))
        .collect()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn local_section(samples: &[LocalSample]) -> Section {
    let rss = |f: fn(&LocalSample) -> u64| samples.iter().map(|s| mib(f(s))).collect::<Vec<_>>();
    let figures = vec![
        Figure::new(
            "spawn_to_first_kvm_run",
            "spawn -> first KVM_RUN",
            Unit::Ms,
            &ms_of(samples, |s| s.spawn_ns, |s| s.first_kvm_run_ns),
        ),
        Figure::new(
            "spawn_to_process_start",
            "  spawn -> process start (fork+exec)",
            Unit::Ms,
            &ms_of(samples, |s| s.spawn_ns, |s| s.process_start_ns),
        ),
        Figure::new(
            "process_start_to_kvm_ready",
            "  process start -> KVM ready",
            Unit::Ms,
            &ms_of(samples, |s| s.process_start_ns, |s| s.kvm_ready_ns),
        ),
        Figure::new(
            "kvm_ready_to_kernel_loaded",
            "  KVM ready -> kernel loaded",
            Unit::Ms,
            &ms_of(samples, |s| s.kvm_ready_ns, |s| s.kernel_loaded_ns),
        ),
        Figure::new(
            "kernel_loaded_to_first_kvm_run",
            "  kernel loaded -> first KVM_RUN",
            Unit::Ms,
            &ms_of(samples, |s| s.kernel_loaded_ns, |s| s.first_kvm_run_ns),
        ),
        Figure::new(
            "rss_before_guest_anon",
            "RSS before guest: anon (VMM's own)",
            Unit::Mib,
            &rss(|s| s.rss_before_guest.anon_kib),
        ),
        Figure::new(
            "rss_before_guest_shmem",
            "RSS before guest: shmem (guest RAM)",
            Unit::Mib,
            &rss(|s| s.rss_before_guest.shmem_kib),
        ),
        Figure::new(
            "rss_before_guest_file",
            "RSS before guest: file (binary, kernel)",
            Unit::Mib,
            &rss(|s| s.rss_before_guest.file_kib),
        ),
        Figure::new(
            "rss_before_guest_total",
            "RSS before guest: total",
            Unit::Mib,
            &rss(|s| s.rss_before_guest.total_kib),
        ),
    ];
    Section {
        id: "vmm_side",
        title: "VMM side: process spawn to the guest's first instruction",
        measured_on: "this machine, directly (does not depend on guest speed)".into(),
        figures,
        notes: vec![
            format!(
                "agentvm boot --stop-at-first-run of the default kernel + initramfs; {WARMUP_BOOTS} \
                 warm-up boot not counted"
            ),
            "phases: KVM ready = VM created and guest memory registered; kernel loaded = devices, \
             kernel, initramfs, command line and boot tables in guest memory"
                .into(),
            "anon = the VMM's own heap and stacks; shmem = guest RAM written before the first \
             instruction (guest RAM is a memfd); file = the binary and the kernel/initramfs pages \
             mapped privately into guest memory"
                .into(),
        ],
        peer: None,
        error: None,
        samples: serde_json::to_value(samples).unwrap_or_default(),
    }
}

fn guest_section(g: &GuestBound) -> Section {
    let a = &g.agentvm.samples;
    let span = |f: fn(&inner::AgentvmSample) -> (u64, u64)| -> Vec<f64> {
        a.iter()
            .filter_map(|s| {
                let (from, to) = f(s);
                span_ms(from, to)
            })
            .collect()
    };
    let peer_samples = g.peer.as_ref().map(|p| p.samples.as_slice()).unwrap_or(&[]);
    let peer_span = |f: fn(&inner::PeerSample) -> (u64, u64)| -> Vec<f64> {
        peer_samples
            .iter()
            .filter_map(|s| {
                let (from, to) = f(s);
                span_ms(from, to)
            })
            .collect()
    };
    let a_rss = |f: fn(&report::RssKib) -> u64| -> Vec<f64> {
        a.iter()
            .filter_map(|s| s.peak_rss.map(|r| mib(f(&r))))
            .collect()
    };
    let p_rss = |f: fn(&report::RssKib) -> u64| -> Vec<f64> {
        peer_samples
            .iter()
            .filter_map(|s| s.peak_rss.map(|r| mib(f(&r))))
            .collect()
    };
    let figures = vec![
        Figure::new(
            "spawn_to_kernel_entry",
            "spawn -> kernel entry (first KVM_RUN)",
            Unit::Ms,
            &span(|s| (s.spawn_ns, s.first_kvm_run_ns)),
        ),
        Figure::new(
            "spawn_to_agent_ready",
            "spawn -> guest agent ready",
            Unit::Ms,
            &span(|s| (s.spawn_ns, s.agent_ready_ns)),
        )
        .with_peer(&peer_span(|s| (s.spawn_ns, s.agent_ready_ns))),
        Figure::new(
            "spawn_to_result",
            "spawn -> command result",
            Unit::Ms,
            &span(|s| (s.spawn_ns, s.result_ns)),
        )
        .with_peer(&peer_span(|s| (s.spawn_ns, s.result_ns))),
        Figure::new(
            "kernel_entry_to_agent_ready",
            "  kernel entry -> guest agent ready",
            Unit::Ms,
            &span(|s| (s.first_kvm_run_ns, s.agent_ready_ns)),
        ),
        Figure::new(
            "agent_ready_to_result",
            "  guest agent ready -> command result",
            Unit::Ms,
            &span(|s| (s.agent_ready_ns, s.result_ns)),
        )
        .with_peer(&peer_span(|s| (s.agent_ready_ns, s.result_ns))),
        Figure::new(
            "peak_rss_total",
            "peak RSS: total",
            Unit::Mib,
            &a_rss(|r| r.total_kib),
        )
        .with_peer(&p_rss(|r| r.total_kib)),
        Figure::new(
            "peak_rss_anon",
            "peak RSS: anon",
            Unit::Mib,
            &a_rss(|r| r.anon_kib),
        )
        .with_peer(&p_rss(|r| r.anon_kib)),
        Figure::new(
            "rss_end_anon",
            "VMM RSS at the end: anon",
            Unit::Mib,
            &a.iter()
                .map(|s| mib(s.rss_end.anon_kib))
                .collect::<Vec<_>>(),
        ),
        Figure::new(
            "rss_end_total",
            "VMM RSS at the end: total",
            Unit::Mib,
            &a.iter()
                .map(|s| mib(s.rss_end.total_kib))
                .collect::<Vec<_>>(),
        ),
    ];
    let mut notes = vec![
        format!(
            "all figures: {}; every boot is timed from the spawn (fork+exec) of the VMM process",
            g.measured_on
        ),
        format!(
            "command `{GUEST_COMMAND}`; ready = the host's client finished the handshake with the \
             guest agent over vsock (agentvm: hybrid vsock Unix socket; QEMU: vhost-vsock, \
             AF_VSOCK); result = the command's exit status arrived"
        ),
        "peak RSS sampled from /proc/PID/status (agentvm: every 20 ms; QEMU: about every second \
         until the agent answered, and after the result); total compares like with like. \
         agentvm: guest RAM is a memfd (shmem) with the kernel and initramfs mapped privately \
         over it, so anon = the VMM's own plus the kernel/initramfs pages the guest wrote to. \
         QEMU: anon includes guest RAM. 'At the end' = agentvm's own reading after teardown"
            .into(),
    ];
    if let Some(l1) = g.l1 {
        notes.push(format!(
            "nested test host: L1 up after {:.1} s, /dev/kvm ready after {:.1} s",
            l1.l1_boot_s, l1.kvm_ready_s
        ));
    }
    let error = match (&g.agentvm.error, a.is_empty()) {
        (Some(e), _) => Some(e.clone()),
        (None, true) => Some("no agentvm boot was measured".to_string()),
        (None, false) => None,
    };
    Section {
        id: "guest_bound",
        title: "Guest-bound: boot to guest agent and command result",
        measured_on: g.measured_on.to_string(),
        figures,
        notes,
        peer: g.peer.as_ref().map(peer_info),
        error,
        samples: serde_json::json!({
            "agentvm": g.agentvm.samples,
            "peer": g.peer.as_ref().map(|p| &p.samples),
        }),
    }
}

fn peer_info(p: &PeerRuns) -> PeerInfo {
    PeerInfo {
        name: PEER_NAME,
        status: p.status,
        detail: p.error.clone(),
        qemu_version: p.qemu_version.clone(),
        variant: p.variant.clone(),
        args: p.args.clone(),
        tried: p.tried.clone(),
    }
}

fn failed_guest_section(error: String) -> Section {
    let empty = AgentvmRuns {
        samples: Vec::new(),
        error: Some(error),
    };
    let measured_on = if vmm::host::can_run_linux() {
        guest_bound::DIRECT_LABEL
    } else {
        guest_bound::NESTED_LABEL
    };
    guest_section(&GuestBound {
        measured_on,
        agentvm: empty,
        peer: None,
        l1: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use output::figure;
    use report::RssKib;

    fn local(spawn: u64) -> LocalSample {
        LocalSample {
            spawn_ns: spawn,
            process_start_ns: spawn + 1_000_000,
            kvm_ready_ns: spawn + 3_000_000,
            kernel_loaded_ns: spawn + 10_000_000,
            first_kvm_run_ns: spawn + 12_000_000,
            rss_before_guest: RssKib {
                total_kib: 4096,
                anon_kib: 1024,
                file_kib: 1024,
                shmem_kib: 2048,
            },
        }
    }

    #[test]
    fn local_phases_add_up() {
        let s = local_section(&[local(0), local(100)]);
        assert_eq!(
            figure(&s, "spawn_to_first_kvm_run").agentvm.unwrap().median,
            12.0
        );
        assert_eq!(
            figure(&s, "kvm_ready_to_kernel_loaded")
                .agentvm
                .unwrap()
                .median,
            7.0
        );
        assert_eq!(
            figure(&s, "rss_before_guest_shmem").agentvm.unwrap().median,
            2.0
        );
        assert_eq!(s.samples.as_array().unwrap().len(), 2);
    }

    #[test]
    fn guest_section_puts_the_peer_beside_agentvm() {
        let rss = Some(RssKib {
            total_kib: 10240,
            anon_kib: 2048,
            file_kib: 0,
            shmem_kib: 8192,
        });
        let g = GuestBound {
            measured_on: guest_bound::NESTED_LABEL,
            agentvm: AgentvmRuns {
                samples: vec![inner::AgentvmSample {
                    spawn_ns: 0,
                    process_start_ns: 1_000_000,
                    first_kvm_run_ns: 20_000_000,
                    agent_ready_ns: 900_000_000,
                    result_ns: 950_000_000,
                    peak_rss: rss,
                    rss_before_guest: RssKib::default(),
                    rss_end: RssKib::default(),
                }],
                error: None,
            },
            peer: Some(PeerRuns {
                status: inner::PeerStatus::Ok,
                samples: vec![inner::PeerSample {
                    spawn_ns: 0,
                    agent_ready_ns: 1_500_000_000,
                    result_ns: 1_600_000_000,
                    peak_rss: rss,
                }],
                tried: vec![],
                ..PeerRuns::default()
            }),
            l1: None,
        };
        let s = guest_section(&g);
        assert!(s.error.is_none());
        assert_eq!(s.peer.as_ref().unwrap().status, inner::PeerStatus::Ok);
        let ready = figure(&s, "spawn_to_agent_ready");
        assert_eq!(ready.agentvm.unwrap().median, 900.0);
        assert_eq!(ready.peer.unwrap().median, 1500.0);
        assert!(figure(&s, "spawn_to_kernel_entry").peer.is_none());
        assert!(s.notes[0].contains("not a VMX host"));
    }

    #[test]
    fn failed_guest_part_is_an_error_section() {
        let s = failed_guest_section("L1 did not come up".into());
        assert_eq!(s.error.as_deref(), Some("L1 did not come up"));
        assert!(s.figures.iter().all(|f| f.agentvm.is_none()));
    }

    #[test]
    fn out_must_be_creatable() {
        assert!(check_writable(Path::new("/nonexistent-dir/x.json")).is_err());
        assert!(check_writable(Path::new("/tmp")).is_err());
        assert!(check_writable(Path::new("bench.json")).is_ok());
    }
}
