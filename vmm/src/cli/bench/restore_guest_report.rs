//! `bench restore --guest-bound`'s part of the document: one section per way of bringing the
//! Linux guest up (the restore backends and the cold boot), labelled with where they were
//! measured, and what the guest and its snapshot were.

use serde::Serialize;

use super::guest_bound::L1Times;
use super::output::{Figure, Section, Unit};
use super::restore::Mode;
use super::restore_guest::GuestRestore;
use super::restore_inner::GuestRestoreSample;
use super::restore_report::{uffd_figures, UffdCounts};

#[derive(Debug, Clone, Serialize)]
pub struct LinuxGuestInfo {
    /// Where every Linux figure was measured (the nested test host, or this machine).
    pub measured_on: String,
    pub kernel: String,
    pub initrd: String,
    pub vcpus: u32,
    pub mem_mib: u64,
    /// The snapshotted guest: InstanceStart to its first exec result.
    pub boot_to_first_exec_ms: Option<f64>,
    pub snapshot_create_ms: Option<f64>,
    pub working_set_pages: Option<usize>,
    /// How long the nested test host took to come up (absent when measured directly).
    pub l1: Option<L1Times>,
}

impl LinuxGuestInfo {
    pub fn new(g: &GuestRestore, kernel: String, initrd: String, mem_mib: u64) -> Self {
        LinuxGuestInfo {
            measured_on: g.measured_on.to_string(),
            kernel,
            initrd,
            vcpus: 1,
            mem_mib,
            boot_to_first_exec_ms: g.runs.boot_to_first_exec_ms,
            snapshot_create_ms: g.runs.snapshot_create_ms,
            working_set_pages: g.runs.working_set_pages,
            l1: g.l1,
        }
    }
}

fn section_id(mode: Mode) -> &'static str {
    match mode {
        Mode::File => "linux_file",
        Mode::Uffd => "linux_uffd",
        Mode::UffdPrefetch => "linux_uffd_prefetch",
        Mode::ColdBoot => "linux_cold_boot",
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// The four Linux sections, in [`Mode::ALL`]'s order. The helper's error (it stops at the first
/// failure) goes on the first section; a later section without samples says so only when there
/// was no such error to explain it.
pub fn linux_sections(g: &GuestRestore) -> Vec<Section> {
    Mode::ALL
        .iter()
        .enumerate()
        .map(|(i, mode)| {
            let samples = g.runs.samples(*mode);
            let error = match (&g.runs.error, i) {
                (Some(e), 0) => Some(format!("Linux guest: {e}")),
                (Some(_), _) => None,
                (None, _) => samples
                    .is_empty()
                    .then(|| format!("no Linux {} run was measured", mode.name())),
            };
            mode_section(*mode, samples, g.measured_on, error)
        })
        .collect()
}

fn mode_section(
    mode: Mode,
    samples: &[GuestRestoreSample],
    measured_on: &str,
    error: Option<String>,
) -> Section {
    let all = |f: fn(&GuestRestoreSample) -> f64| samples.iter().map(f).collect::<Vec<_>>();
    let some = |f: fn(&GuestRestoreSample) -> Option<f64>| {
        samples.iter().filter_map(f).collect::<Vec<_>>()
    };
    let mut figures = vec![
        Figure::new(
            "request_to_first_exec",
            "client: request -> first exec result (`true`)",
            Unit::Ms,
            &all(|s| ms(s.request_to_first_exec_ns)),
        ),
        Figure::new(
            "vmm_load_to_first_run",
            "VMM: load (cold: build) -> first KVM_RUN",
            Unit::Ms,
            &all(|s| s.vmm_to_first_run_us as f64 / 1000.0),
        ),
        Figure::new(
            "request_round_trip",
            "client: load/InstanceStart request -> 204",
            Unit::Ms,
            &all(|s| ms(s.request_ns)),
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
    figures.extend([Figure::new(
        "rss_total",
        "VMM RSS after the first exec: total",
        Unit::Mib,
        &some(|s| s.rss.map(|r| r.total_kib as f64 / 1024.0)),
    )]);
    Section {
        id: section_id(mode),
        title: mode.name(),
        measured_on: measured_on.to_string(),
        figures,
        notes: Vec::new(),
        peer: None,
        error,
        samples: serde_json::to_value(samples).unwrap_or_default(),
    }
}

/// What the Linux columns' figures mean.
pub fn linux_notes(info: &LinuxGuestInfo) -> Vec<String> {
    let mut notes = vec![
        format!(
            "Linux figures: measured in the {}; the guest-bound ones go with that host's speed",
            info.measured_on
        ),
        "the default kernel + agent initramfs booted under `agentvm serve` answered a first exec, \
         was paused and snapshotted once; each column: a fresh `serve` per run (its start-up not \
         counted), one uncounted warm-up; restores: PUT /snapshot/load with resume_vm and their \
         own vsock_override; cold boot: configured, then PUT /actions InstanceStart"
            .into(),
        "request -> first exec result: from sending the load (cold boot: InstanceStart) to the \
         first POST /sandbox/exec of `true` answering exit status 0, retried while it answers \
         409 or 503 (after 1 ms, doubling up to 16 ms); after a restore the VMM holds the first request until its \
         after-restore step (clock, entropy) is done, so that is included"
            .into(),
    ];
    if let Some(l1) = info.l1 {
        notes.push(format!(
            "nested test host: L1 up after {:.1} s, /dev/kvm ready after {:.1} s",
            l1.l1_boot_s, l1.kvm_ready_s
        ));
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::bench::guest_bound::NESTED_LABEL;
    use crate::cli::bench::output::figure;
    use crate::cli::bench::restore_inner::GuestRestoreRuns;

    fn sample(ms: u64, uffd: bool) -> GuestRestoreSample {
        GuestRestoreSample {
            request_ns: ms * 100_000,
            request_to_first_exec_ns: ms * 1_000_000,
            exec_attempts: 1,
            vmm_to_first_run_us: ms * 100,
            uffd_on_demand_pages: uffd.then_some(500),
            uffd_prefetched_pages: uffd.then_some(0),
            uffd_fault_service_s: uffd.then_some(0.05),
            rss: None,
        }
    }

    fn restore(runs: GuestRestoreRuns) -> GuestRestore {
        GuestRestore {
            measured_on: NESTED_LABEL,
            runs,
            l1: Some(L1Times {
                l1_boot_s: 20.0,
                kvm_ready_s: 25.0,
            }),
        }
    }

    #[test]
    fn each_mode_gets_its_own_figures_labelled_where_measured() {
        let runs = GuestRestoreRuns {
            file: vec![sample(800, false), sample(1200, false)],
            uffd: vec![sample(2000, true)],
            uffd_prefetch: vec![sample(1500, true)],
            cold_boot: vec![sample(30_000, false)],
            ..GuestRestoreRuns::default()
        };
        let sections = linux_sections(&restore(runs));
        let ids: Vec<_> = sections.iter().map(|s| s.id).collect();
        assert_eq!(
            ids,
            [
                "linux_file",
                "linux_uffd",
                "linux_uffd_prefetch",
                "linux_cold_boot"
            ]
        );
        assert!(sections.iter().all(|s| s.error.is_none()));
        assert!(sections.iter().all(|s| s.measured_on == NESTED_LABEL));
        let first = figure(&sections[0], "request_to_first_exec")
            .agentvm
            .unwrap();
        assert_eq!((first.n, first.median, first.p99), (2, 1000.0, 1200.0));
        assert!(figure(&sections[0], "uffd_faults_per_s").agentvm.is_none());
        let rate = figure(&sections[1], "uffd_faults_per_s").agentvm.unwrap();
        assert_eq!(rate.median, 10_000.0);
        assert_eq!(
            figure(&sections[3], "vmm_load_to_first_run")
                .agentvm
                .unwrap()
                .median,
            3000.0
        );
    }

    #[test]
    fn the_helpers_error_is_reported_once() {
        let runs = GuestRestoreRuns {
            file: vec![sample(800, false)],
            ..GuestRestoreRuns::failed("uffd-3: no answer".into())
        };
        let sections = linux_sections(&restore(runs));
        assert_eq!(
            sections[0].error.as_deref(),
            Some("Linux guest: uffd-3: no answer")
        );
        assert!(sections[1..].iter().all(|s| s.error.is_none()));

        let empty = linux_sections(&restore(GuestRestoreRuns::default()));
        assert_eq!(
            empty[3].error.as_deref(),
            Some("no Linux cold boot run was measured")
        );
    }

    #[test]
    fn notes_name_the_nested_host() {
        let g = restore(GuestRestoreRuns::default());
        let info = LinuxGuestInfo::new(&g, "/k".into(), "/i".into(), 256);
        let notes = linux_notes(&info);
        assert!(notes[0].contains("not a VMX host"), "{}", notes[0]);
        assert!(notes.last().unwrap().contains("L1 up after 20.0 s"));
    }
}
