//! `bench exec`'s results as the benchmark document (the table and `--json`).

use vmm::artefacts::Artefacts;

use super::exec::ExecResults;
use super::exec_inner::{ExecRuns, ExecSizes};
use super::exec_measure::ExecSamples;
use super::guest_bound::NESTED_LABEL;
use super::guest_info;
use super::local::GUEST_MEM_MIB;
use super::machine::MachineInfo;
use super::output::{Document, Figure, PeerInfo, Section, Unit};
use super::peer::PEER_NAME;

pub fn document(
    r: &ExecResults,
    sizes: &ExecSizes,
    machine: MachineInfo,
    artefacts: &Artefacts,
) -> Document {
    Document {
        benchmark: "agentvm bench exec",
        agentvm_version: env!("CARGO_PKG_VERSION"),
        runs: sizes.runs,
        machine,
        guest: guest_info(artefacts, "true"),
        sections: vec![section(r, sizes)],
    }
}

type Pick = fn(&ExecSamples) -> &[f64];

pub fn section(r: &ExecResults, sizes: &ExecSizes) -> Section {
    let a = r.agentvm.samples.as_ref();
    let p = r.peer.as_ref().and_then(|p| p.samples.as_ref());
    let fig = |id, label, unit, pick: Pick| {
        Figure::new(id, label, unit, a.map(pick).unwrap_or(&[]))
            .with_peer(p.map(pick).unwrap_or(&[]))
    };
    let one = |runs: Option<&ExecRuns>, f: fn(&ExecRuns) -> Option<f64>| -> Vec<f64> {
        runs.and_then(f).into_iter().collect()
    };
    let mean_host: fn(&ExecRuns) -> Option<f64> =
        |x| x.samples.as_ref().and_then(|s| s.exec_cpu_host_mean_us);
    let mean_all: fn(&ExecRuns) -> Option<f64> =
        |x| x.samples.as_ref().and_then(|s| s.exec_cpu_all_mean_us);
    let peer = r.peer.as_ref();
    let figures = vec![
        fig(
            "exec_true_round_trip",
            "exec round trip of `true`",
            Unit::Us,
            |s| &s.exec_us,
        ),
        fig(
            "ping_round_trip",
            "protocol round trip (Ping)",
            Unit::Us,
            |s| &s.ping_us,
        ),
        fig(
            "stream_throughput",
            "streamed output (head -c M MiB /dev/zero)",
            Unit::MibPerS,
            |s| &s.stream_mib_s,
        ),
        fig(
            "vmm_cpu_per_exec_host",
            "VMM CPU per exec, non-vCPU threads",
            Unit::Us,
            |s| &s.exec_cpu_host_us,
        ),
        Figure::new(
            "vmm_cpu_per_exec_host_mean",
            "  mean: total over the N execs / N",
            Unit::Us,
            &one(Some(&r.agentvm), mean_host),
        )
        .with_peer(&one(peer, mean_host)),
        fig(
            "vmm_cpu_per_exec_all",
            "VMM CPU per exec, all threads",
            Unit::Us,
            |s| &s.exec_cpu_all_us,
        ),
        Figure::new(
            "vmm_cpu_per_exec_all_mean",
            "  mean: total over the N execs / N",
            Unit::Us,
            &one(Some(&r.agentvm), mean_all),
        )
        .with_peer(&one(peer, mean_all)),
        fig(
            "vmm_cpu_per_mib_host",
            "VMM CPU per MiB streamed, non-vCPU threads",
            Unit::Ms,
            |s| &s.stream_cpu_host_ms_per_mib,
        ),
        fig(
            "vmm_cpu_per_mib_all",
            "VMM CPU per MiB streamed, all threads",
            Unit::Ms,
            |s| &s.stream_cpu_all_ms_per_mib,
        ),
        Figure::new(
            "boot_to_agent",
            "spawn -> agent connected (the one boot)",
            Unit::Ms,
            &one(Some(&r.agentvm), |x| x.boot_to_agent_ms),
        )
        .with_peer(&one(peer, |x| x.boot_to_agent_ms)),
    ];
    let mut notes = vec![
        format!(
            "one warm VM per VMM (1 vCPU, {GUEST_MEM_MIB} MiB), the same kernel, initramfs, agent \
             and client; agentvm over its hybrid vsock Unix socket, {PEER_NAME} over vhost-vsock \
             (AF_VSOCK); 10 exec + 10 ping round trips and one short stream of warm-up first"
        ),
        format!(
            "{} exec round trips of `true` (Exec to exit status), {} pings (Ping to Done), {} \
             streams of M = {} MiB read to the last byte",
            sizes.runs, sizes.runs, sizes.stream_runs, sizes.stream_mib
        ),
        "VMM CPU: sum over the VMM's threads of /proc/PID/task/*/schedstat, read around each \
         exec or stream; 'non-vCPU threads' is the VMM's own work (devices, vsock backend; for \
         QEMU also its vhost-<pid> kernel worker), which does not depend on guest speed; 'all \
         threads' adds the vCPU threads, whose time includes the guest's"
            .into(),
    ];
    if r.measured_on == NESTED_LABEL {
        notes.push(
            "UNDER TCG: everything ran inside the nested test host (QEMU TCG with SVM, kvm-amd \
             in L1): round trips and throughput mostly measure emulation speed, and CPU times are \
             L1's, inflated alike for both VMMs; compare the columns, not the absolute values \
             with bare-metal figures"
                .into(),
        );
    }
    let error = match &r.agentvm.error {
        Some(e) => Some(e.clone()),
        None if a.is_none() => Some("agentvm was not measured".into()),
        None => None,
    };
    Section {
        id: "exec",
        title: "Warm VM: exec and protocol round trips, streamed output, VMM CPU time",
        measured_on: r.measured_on.to_string(),
        figures,
        notes,
        peer: r.peer.as_ref().map(peer_info),
        error,
        samples: serde_json::json!({
            "agentvm": r.agentvm,
            "peer": r.peer,
        }),
    }
}

fn peer_info(p: &ExecRuns) -> PeerInfo {
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

#[cfg(test)]
mod tests {
    use super::super::output::figure;
    use super::*;
    use crate::cli::bench::inner::PeerStatus;

    fn samples(scale: f64) -> ExecSamples {
        ExecSamples {
            exec_us: vec![100.0 * scale, 300.0 * scale, 200.0 * scale],
            ping_us: vec![50.0 * scale],
            stream_mib_s: vec![400.0 / scale, 500.0 / scale],
            exec_cpu_host_us: vec![10.0 * scale, 30.0 * scale],
            exec_cpu_all_us: vec![40.0 * scale],
            stream_cpu_host_ms_per_mib: vec![0.5 * scale],
            stream_cpu_all_ms_per_mib: vec![1.5 * scale],
            exec_cpu_host_mean_us: Some(20.0 * scale),
            exec_cpu_all_mean_us: Some(40.0 * scale),
        }
    }

    fn runs(vmm: &str, s: Option<ExecSamples>, error: Option<&str>) -> ExecRuns {
        ExecRuns {
            vmm: vmm.into(),
            status: if s.is_some() {
                PeerStatus::Ok
            } else {
                PeerStatus::DidNotBoot
            },
            boot_to_agent_ms: s.as_ref().map(|_| 900.0),
            samples: s,
            error: error.map(String::from),
            ..ExecRuns::default()
        }
    }

    fn sizes() -> ExecSizes {
        ExecSizes {
            runs: 3,
            stream_mib: 16,
            stream_runs: 2,
        }
    }

    #[test]
    fn both_vmms_side_by_side() {
        let r = ExecResults {
            measured_on: NESTED_LABEL,
            agentvm: runs("agentvm", Some(samples(1.0)), None),
            peer: Some(runs(PEER_NAME, Some(samples(2.0)), None)),
        };
        let s = section(&r, &sizes());
        assert!(s.error.is_none());
        let exec = figure(&s, "exec_true_round_trip");
        assert_eq!(exec.agentvm.unwrap().median, 200.0);
        assert_eq!(exec.agentvm.unwrap().p99, 300.0);
        assert_eq!(exec.peer.unwrap().median, 400.0);
        assert_eq!(
            figure(&s, "stream_throughput").agentvm.unwrap().median,
            450.0
        );
        assert_eq!(
            figure(&s, "vmm_cpu_per_exec_host").agentvm.unwrap().median,
            20.0
        );
        let mean = figure(&s, "vmm_cpu_per_exec_all_mean");
        assert_eq!(
            (mean.agentvm.unwrap().n, mean.agentvm.unwrap().median),
            (1, 40.0)
        );
        assert_eq!(mean.peer.unwrap().median, 80.0);
        assert!(s.notes.iter().any(|n| n.starts_with("UNDER TCG")));
        assert!(s.notes.iter().any(|n| n.contains("M = 16 MiB")));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["samples"]["agentvm"]["samples"]["ping_us"][0], 50.0);
        assert_eq!(json["peer"]["status"], "ok");
        assert_eq!(json["figures"][2]["unit"], "mib_per_s");
    }

    #[test]
    fn a_missing_peer_is_explained_and_agentvm_still_reported() {
        let r = ExecResults {
            measured_on: "this machine (KVM)",
            agentvm: runs("agentvm", Some(samples(1.0)), None),
            peer: Some(runs(PEER_NAME, None, Some("no variant came up"))),
        };
        let s = section(&r, &sizes());
        assert!(s.error.is_none());
        assert!(figure(&s, "ping_round_trip").peer.is_none());
        assert!(figure(&s, "ping_round_trip").agentvm.is_some());
        let peer = s.peer.as_ref().unwrap();
        assert_eq!(peer.status, PeerStatus::DidNotBoot);
        assert_eq!(peer.detail.as_deref(), Some("no variant came up"));
        assert!(!s.notes.iter().any(|n| n.starts_with("UNDER TCG")));
    }

    #[test]
    fn a_failed_agentvm_is_the_section_error() {
        let r = ExecResults {
            measured_on: NESTED_LABEL,
            agentvm: runs("agentvm", None, Some("agentvm: the VMM exited")),
            peer: None,
        };
        let s = section(&r, &sizes());
        assert_eq!(s.error.as_deref(), Some("agentvm: the VMM exited"));
        assert!(s.peer.is_none());
        assert!(s.figures.iter().all(|f| f.agentvm.is_none()));
    }
}
