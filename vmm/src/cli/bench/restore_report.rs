//! `agentvm bench restore`'s results: one section per way of bringing the VM up (the restore
//! backends and the cold boot peer) with the same figures, rendered side by side, and the fork
//! section.

use std::fmt::Write as _;

use serde::Serialize;

use super::machine::MachineInfo;
use super::output::{num, section_errors, Figure, Section, Unit};
use super::restore::{ForkSample, Mode, RestoreSample};
use super::restore_guest_report::{linux_notes, LinuxGuestInfo};
use super::stats::Summary;

#[derive(Debug, Clone, Serialize)]
pub struct RestoreGuest {
    pub kernel: String,
    pub boot_args: String,
    pub vcpus: u32,
    pub mem_mib: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// PUT /snapshot/create of the paused guest, as the client saw it.
    pub create_ms: f64,
    /// The memory file's allocated size (it is sparse: zero pages are holes).
    pub mem_file_allocated_mib: f64,
    /// Pages in the working set the first uffd restore recorded.
    pub working_set_pages: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreDocument {
    pub benchmark: &'static str,
    pub agentvm_version: &'static str,
    pub iterations: u32,
    pub fork: u32,
    pub machine: MachineInfo,
    pub guest: RestoreGuest,
    pub snapshot: SnapshotInfo,
    /// The Linux guest of the guest-bound figures (`--guest-bound`), and where they were
    /// measured.
    pub linux_guest: Option<LinuxGuestInfo>,
    /// `file`, `uffd`, `uffd_prefetch`, `cold_boot`, then with `--guest-bound` `linux_file`,
    /// `linux_uffd`, `linux_uffd_prefetch`, `linux_cold_boot`, then `fork` (when asked for).
    pub sections: Vec<Section>,
    /// What the backend columns' figures mean.
    pub notes: Vec<String>,
}

fn notes() -> Vec<String> {
    vec![
        "every column: a fresh `agentvm serve` per run (its start-up not counted); restores: PUT \
         /snapshot/load with resume_vm; cold boot: the same guest configured, then PUT /actions \
         InstanceStart"
            .into(),
        "VMM: load -> first KVM_RUN is measured inside the VMM (GET /metrics boot_time_us): from \
         the VMM thread taking the load (state file read, memory mapped or registered with \
         userfaultfd, working set prefetched, devices, VM and vCPU state restored) to a vCPU \
         entering the guest; cold boot: from the VM build (kernel loaded) to the first KVM_RUN. It \
         does not depend on guest speed"
            .into(),
        "request -> first console line is guest-bound: after a restore the probe guest is in the \
         middle of its spin loop between two `count` lines, so it includes up to one such period; \
         a cold boot's first line is the probe's banner. The Linux guest's restore-to-first-exec \
         figure is measured with --guest-bound (below the probe's columns when asked for)"
            .into(),
        "uffd figures come from GET /metrics once the guest printed: pages served on demand = \
         faults + zero pages; uffd = no working set (each page on first touch), uffd+prefetch = \
         the set recorded by a first uffd restore copied in before the vCPUs run; per second = \
         on-demand pages / the handler's service time"
            .into(),
        "RSS (/proc/PID/status) and PSS (/proc/PID/smaps_rollup) of the VMM once the guest printed"
            .into(),
    ]
}

fn section_id(mode: Mode) -> &'static str {
    match mode {
        Mode::File => "file",
        Mode::Uffd => "uffd",
        Mode::UffdPrefetch => "uffd_prefetch",
        Mode::ColdBoot => "cold_boot",
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// `to - from` (µs) in ms; `None` for a span that ran backwards (a broken report).
fn span_us_ms(from: u64, to: u64) -> Option<f64> {
    to.checked_sub(from).map(|d| d as f64 / 1000.0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

const MEASURED_ON: &str = "this machine, directly";

/// One restore's userfaultfd counters (None: not a uffd restore).
pub struct UffdCounts {
    pub on_demand_pages: Option<u64>,
    pub prefetched_pages: Option<u64>,
    pub fault_service_s: Option<f64>,
}

/// The uffd figures of a backend's samples: pages on demand, pages prefetched, on-demand pages
/// served per second.
pub fn uffd_figures(counts: &[UffdCounts]) -> Vec<Figure> {
    let some = |f: fn(&UffdCounts) -> Option<f64>| counts.iter().filter_map(f).collect::<Vec<_>>();
    vec![
        Figure::new(
            "uffd_on_demand_pages",
            "uffd: pages served on demand",
            Unit::Pages,
            &some(|c| c.on_demand_pages.map(|p| p as f64)),
        ),
        Figure::new(
            "uffd_prefetched_pages",
            "uffd: pages prefetched",
            Unit::Pages,
            &some(|c| c.prefetched_pages.map(|p| p as f64)),
        ),
        Figure::new(
            "uffd_faults_per_s",
            "uffd: on-demand pages served per second",
            Unit::PerS,
            &some(|c| match (c.on_demand_pages, c.fault_service_s) {
                (Some(pages), Some(secs)) if pages > 0 && secs > 0.0 => Some(pages as f64 / secs),
                _ => None,
            }),
        ),
    ]
}

fn mode_section(mode: Mode, samples: &[RestoreSample]) -> Section {
    let all = |f: fn(&RestoreSample) -> f64| samples.iter().map(f).collect::<Vec<_>>();
    let some =
        |f: fn(&RestoreSample) -> Option<f64>| samples.iter().filter_map(f).collect::<Vec<_>>();
    let mut figures = vec![
        Figure::new(
            "vmm_load_to_first_run",
            "VMM: load (cold: build) -> first KVM_RUN",
            Unit::Ms,
            &all(|s| s.vmm_to_first_run_us as f64 / 1000.0),
        ),
        Figure::new(
            "vmm_load_to_kvm_ready",
            "  load -> VM + guest memory ready",
            Unit::Ms,
            &all(|s| s.vmm_to_kvm_ready_us as f64 / 1000.0),
        ),
        Figure::new(
            "vmm_kvm_ready_to_loaded",
            "  memory ready -> device/VM/vCPU state in",
            Unit::Ms,
            &some(|s| span_us_ms(s.vmm_to_kvm_ready_us, s.vmm_to_loaded_us)),
        ),
        Figure::new(
            "vmm_loaded_to_first_run",
            "  state in -> first KVM_RUN (vCPU threads)",
            Unit::Ms,
            &some(|s| span_us_ms(s.vmm_to_loaded_us, s.vmm_to_first_run_us)),
        ),
        Figure::new(
            "request_round_trip",
            "client: load/InstanceStart request -> 204",
            Unit::Ms,
            &all(|s| ms(s.request_ns)),
        ),
        Figure::new(
            "request_to_console_line",
            "client: request -> guest's first console line",
            Unit::Ms,
            &all(|s| ms(s.request_to_console_line_ns)),
        ),
    ];
    let counts: Vec<UffdCounts> = samples
        .iter()
        .map(|s| UffdCounts {
            on_demand_pages: s.uffd_on_demand_pages,
            prefetched_pages: s.uffd_prefetched_pages,
            fault_service_s: s.uffd_fault_service_s,
        })
        .collect();
    figures.extend(uffd_figures(&counts));
    figures.extend([
        Figure::new(
            "rss_total",
            "VMM RSS after restore: total",
            Unit::Mib,
            &all(|s| mib(s.rss.total_kib)),
        ),
        Figure::new(
            "rss_anon",
            "VMM RSS after restore: anon",
            Unit::Mib,
            &all(|s| mib(s.rss.anon_kib)),
        ),
        Figure::new(
            "rss_file",
            "VMM RSS after restore: file",
            Unit::Mib,
            &all(|s| mib(s.rss.file_kib)),
        ),
        Figure::new(
            "pss_total",
            "VMM PSS after restore",
            Unit::Mib,
            &some(|s| s.pss_kib.map(mib)),
        ),
    ]);
    Section {
        id: section_id(mode),
        title: mode.name(),
        measured_on: MEASURED_ON.into(),
        figures,
        notes: Vec::new(),
        peer: None,
        error: samples
            .is_empty()
            .then(|| format!("no {} run was measured", mode.name())),
        samples: serde_json::to_value(samples).unwrap_or_default(),
    }
}

fn fork_section(forks: &[ForkSample], n: u32) -> Section {
    let all = |f: fn(&ForkSample) -> f64| forks.iter().map(f).collect::<Vec<_>>();
    Section {
        id: "fork",
        title: "fork",
        measured_on: MEASURED_ON.into(),
        figures: vec![
            Figure::new(
                "fork_all_loaded",
                "N loads sent at once -> all answered (running)",
                Unit::Ms,
                &all(|f| ms(f.all_loaded_ns)),
            ),
            Figure::new(
                "fork_all_console_line",
                "N loads sent at once -> every guest printed",
                Unit::Ms,
                &all(|f| ms(f.all_console_line_ns)),
            ),
            Figure::new(
                "fork_rss_sum",
                "RSS of the N VMMs, summed",
                Unit::Mib,
                &all(|f| mib(f.rss_sum_kib)),
            ),
            Figure::new(
                "fork_pss_sum",
                "PSS of the N VMMs, summed (shared pages once)",
                Unit::Mib,
                &all(|f| mib(f.pss_sum_kib)),
            ),
        ],
        notes: vec![format!(
            "{n} concurrent `serve` processes each load the one snapshot (file backend: the \
             memory file mapped MAP_PRIVATE, so untouched guest pages are shared through the \
             page cache), each with its own vsock socket path and CID; serve start-up is not \
             counted"
        )],
        peer: None,
        error: forks
            .is_empty()
            .then(|| "no fork round was measured".to_string()),
        samples: serde_json::to_value(forks).unwrap_or_default(),
    }
}

impl RestoreDocument {
    pub fn new(
        iterations: u32,
        fork: u32,
        machine: MachineInfo,
        guest: RestoreGuest,
        snapshot: SnapshotInfo,
        samples: &[Vec<RestoreSample>],
        forks: &[ForkSample],
    ) -> RestoreDocument {
        let mut sections: Vec<Section> = Mode::ALL
            .iter()
            .zip(samples)
            .map(|(mode, s)| mode_section(*mode, s))
            .collect();
        if fork > 0 {
            sections.push(fork_section(forks, fork));
        }
        RestoreDocument {
            benchmark: "agentvm bench restore",
            agentvm_version: env!("CARGO_PKG_VERSION"),
            iterations,
            fork,
            machine,
            guest,
            snapshot,
            linux_guest: None,
            sections,
            notes: notes(),
        }
    }

    /// Adds the Linux guest's sections (`--guest-bound`), before the fork section.
    pub fn with_linux(mut self, info: LinuxGuestInfo, sections: Vec<Section>) -> Self {
        let at = self
            .sections
            .iter()
            .position(|s| s.id == "fork")
            .unwrap_or(self.sections.len());
        self.sections.splice(at..at, sections);
        self.linux_guest = Some(info);
        self
    }

    pub fn errors(&self) -> Vec<String> {
        section_errors(&self.sections)
    }

    /// The backends and the cold boot side by side (median / p99 per cell), then the fork
    /// figures.
    pub fn to_table(&self) -> String {
        let mut t = String::new();
        let m = &self.machine;
        let g = &self.guest;
        let _ = writeln!(
            t,
            "{}: median / p99 (nearest rank); {} runs per column after one warm-up",
            self.benchmark, self.iterations
        );
        let _ = writeln!(t, "{}", m.describe());
        let _ = writeln!(
            t,
            "guest:   {} `{}`, {} vCPU, {} MiB; snapshot: created in {:.1} ms, memory file {:.1} \
             MiB allocated, working set {} pages",
            g.kernel,
            g.boot_args,
            g.vcpus,
            g.mem_mib,
            self.snapshot.create_ms,
            self.snapshot.mem_file_allocated_mib,
            self.snapshot.working_set_pages
        );
        let modes: Vec<&Section> = self
            .sections
            .iter()
            .filter(|s| s.id != "fork" && !s.id.starts_with("linux_"))
            .collect();
        render_columns(&mut t, &modes);
        for n in &self.notes {
            let _ = writeln!(t, "note: {n}");
        }
        if let Some(linux) = &self.linux_guest {
            render_linux(&mut t, linux, &self.sections);
        }
        if let Some(fork) = self.sections.iter().find(|s| s.id == "fork") {
            let _ = writeln!(t);
            let _ = writeln!(t, "fork of {} VMs from the one snapshot", self.fork);
            render_columns(&mut t, &[fork]);
            for n in &fork.notes {
                let _ = writeln!(t, "note: {n}");
            }
        }
        for e in self.errors() {
            let _ = writeln!(t, "ERROR: {e}");
        }
        t
    }
}

/// The Linux guest's columns, the same modes in the same order as the probe's above them.
fn render_linux(t: &mut String, linux: &LinuxGuestInfo, sections: &[Section]) {
    let _ = writeln!(t);
    let opt_ms = |v: Option<f64>| v.map_or("-".to_string(), |ms| format!("{ms:.1} ms"));
    let _ = writeln!(
        t,
        "Linux guest, measured on: {}\nguest:   {} + {}, {} vCPU, {} MiB; boot -> first exec \
         result {}; snapshot: created in {}, working set {} pages",
        linux.measured_on,
        linux.kernel,
        linux.initrd,
        linux.vcpus,
        linux.mem_mib,
        opt_ms(linux.boot_to_first_exec_ms),
        opt_ms(linux.snapshot_create_ms),
        linux
            .working_set_pages
            .map_or("-".to_string(), |p| p.to_string())
    );
    let columns: Vec<&Section> = sections
        .iter()
        .filter(|s| s.id.starts_with("linux_"))
        .collect();
    render_columns(t, &columns);
    for n in linux_notes(linux) {
        let _ = writeln!(t, "note: {n}");
    }
}

fn cell(s: Option<Summary>, unit: Unit) -> String {
    match s {
        None => "-".to_string(),
        Some(s) => format!("{} / {}", num(s.median, unit), num(s.p99, unit)),
    }
}

/// One row per figure of the first section, one column per section.
fn render_columns(t: &mut String, sections: &[&Section]) {
    let Some(first) = sections.first() else {
        return;
    };
    let label = |f: &Figure| format!("{} ({})", f.label, f.unit.label());
    let label_width = first
        .figures
        .iter()
        .map(|f| label(f).chars().count() + 2)
        .max()
        .unwrap_or(0);
    let width = sections
        .iter()
        .flat_map(|s| s.figures.iter().map(|f| cell(f.agentvm, f.unit)))
        .chain(sections.iter().map(|s| s.title.to_string()))
        .map(|c| c.chars().count() + 2)
        .max()
        .unwrap_or(0);
    let _ = writeln!(t);
    let mut head = format!("{:<label_width$}", "");
    for s in sections {
        let _ = write!(head, "{:>width$}", s.title);
    }
    let _ = writeln!(t, "{}", head.trim_end());
    for (i, f) in first.figures.iter().enumerate() {
        let mut row = format!("{:<label_width$}", label(f));
        for s in sections {
            let summary = s.figures.get(i).and_then(|f| f.agentvm);
            let _ = write!(row, "{:>width$}", cell(summary, f.unit));
        }
        let _ = writeln!(t, "{}", row.trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::bench::report::RssKib;

    fn sample(ms: u64, uffd: bool) -> RestoreSample {
        RestoreSample {
            request_ns: ms * 1_000_000,
            vmm_to_first_run_us: ms * 500,
            vmm_to_kvm_ready_us: ms * 200,
            vmm_to_loaded_us: ms * 300,
            request_to_console_line_ns: ms * 2_000_000,
            uffd_on_demand_pages: uffd.then_some(100),
            uffd_prefetched_pages: uffd.then_some(0),
            uffd_fault_service_s: uffd.then_some(0.01),
            rss: RssKib {
                total_kib: 4096,
                anon_kib: 1024,
                file_kib: 3072,
                shmem_kib: 0,
            },
            pss_kib: Some(2048),
        }
    }

    fn doc(forks: &[ForkSample]) -> RestoreDocument {
        let samples: Vec<Vec<RestoreSample>> = Mode::ALL
            .iter()
            .map(|m| {
                let uffd = matches!(m, Mode::Uffd | Mode::UffdPrefetch);
                vec![sample(2, uffd), sample(4, uffd)]
            })
            .collect();
        RestoreDocument::new(
            2,
            3,
            MachineInfo {
                cpu_model: "AMD EPYC".into(),
                cpus: 2,
                host_kernel: "6.18".into(),
                kvm: "nested".into(),
            },
            RestoreGuest {
                kernel: "/probe".into(),
                boot_args: "probe.mode=count".into(),
                vcpus: 1,
                mem_mib: 128,
            },
            SnapshotInfo {
                create_ms: 12.0,
                mem_file_allocated_mib: 1.5,
                working_set_pages: 40,
            },
            &samples,
            forks,
        )
    }

    #[test]
    fn backends_side_by_side_with_uffd_figures_only_where_they_apply() {
        let fork = ForkSample {
            vms: 3,
            all_loaded_ns: 9_000_000,
            all_console_line_ns: 12_000_000,
            rss_sum_kib: 3 * 4096,
            pss_sum_kib: 5000,
        };
        let d = doc(&[fork]);
        assert!(d.errors().is_empty());
        let ids: Vec<_> = d.sections.iter().map(|s| s.id).collect();
        assert_eq!(ids, ["file", "uffd", "uffd_prefetch", "cold_boot", "fork"]);
        let file = &d.sections[0];
        let f = super::super::output::figure(file, "vmm_load_to_first_run");
        assert_eq!(f.agentvm.unwrap().median, 1.5);
        assert!(super::super::output::figure(file, "uffd_faults_per_s")
            .agentvm
            .is_none());
        let uffd = super::super::output::figure(&d.sections[1], "uffd_faults_per_s");
        assert_eq!(uffd.agentvm.unwrap().median, 10_000.0);
        let table = d.to_table();
        let header = table.lines().find(|l| l.contains("uffd+prefetch")).unwrap();
        assert!(header.contains("file") && header.contains("cold boot"));
        assert!(table.contains("VMM: load (cold: build) -> first KVM_RUN (ms)"));
        assert!(table.contains("1.50 / 2.00"), "{table}");
        assert!(table.contains("fork of 3 VMs"));
    }

    #[test]
    fn linux_columns_come_before_the_fork_under_their_own_label() {
        use crate::cli::bench::guest_bound::{L1Times, NESTED_LABEL};
        use crate::cli::bench::restore_guest::GuestRestore;
        use crate::cli::bench::restore_guest_report::linux_sections;
        use crate::cli::bench::restore_inner::{GuestRestoreRuns, GuestRestoreSample};

        let linux = |ms: u64| GuestRestoreSample {
            request_ns: 1_000_000,
            request_to_first_exec_ns: ms * 1_000_000,
            exec_attempts: 1,
            vmm_to_first_run_us: 2_000,
            uffd_on_demand_pages: None,
            uffd_prefetched_pages: None,
            uffd_fault_service_s: None,
            rss: None,
        };
        let measured = GuestRestore {
            measured_on: NESTED_LABEL,
            runs: GuestRestoreRuns {
                boot_to_first_exec_ms: Some(25_000.0),
                snapshot_create_ms: Some(300.0),
                working_set_pages: Some(5000),
                file: vec![linux(700)],
                uffd: vec![linux(900)],
                uffd_prefetch: vec![linux(800)],
                cold_boot: vec![linux(20_000)],
                error: None,
            },
            l1: Some(L1Times {
                l1_boot_s: 30.0,
                kvm_ready_s: 31.0,
            }),
        };
        let info = LinuxGuestInfo::new(&measured, "/vmlinux".into(), "/initrd".into(), 256);
        let fork = ForkSample {
            vms: 3,
            all_loaded_ns: 9_000_000,
            all_console_line_ns: 12_000_000,
            rss_sum_kib: 3 * 4096,
            pss_sum_kib: 5000,
        };
        let d = doc(&[fork]).with_linux(info, linux_sections(&measured));
        assert!(d.errors().is_empty(), "{:?}", d.errors());
        let ids: Vec<_> = d.sections.iter().map(|s| s.id).collect();
        assert_eq!(
            ids,
            [
                "file",
                "uffd",
                "uffd_prefetch",
                "cold_boot",
                "linux_file",
                "linux_uffd",
                "linux_uffd_prefetch",
                "linux_cold_boot",
                "fork"
            ]
        );
        let table = d.to_table();
        let probe_rows = table.find("VMM: load (cold: build)").unwrap();
        let linux_block = table.find(&format!("Linux guest, measured on: {NESTED_LABEL}"));
        let linux_block = linux_block.unwrap_or_else(|| panic!("{table}"));
        let fork_block = table.find("fork of 3 VMs").unwrap();
        assert!(
            probe_rows < linux_block && linux_block < fork_block,
            "{table}"
        );
        assert!(
            table.contains("client: request -> first exec result (`true`) (ms)"),
            "{table}"
        );
        assert!(table.contains("700.0 / 700.0"), "{table}");
        assert!(table.contains("working set 5000 pages"), "{table}");
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["linux_guest"]["measured_on"], NESTED_LABEL);
    }

    #[test]
    fn a_missing_fork_round_is_an_error() {
        let d = doc(&[]);
        assert_eq!(d.errors(), ["fork: no fork round was measured"]);
        assert!(d.to_table().contains("ERROR: fork"));
    }
}
