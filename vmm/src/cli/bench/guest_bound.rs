//! The guest-bound part: boots that run the guest to the agent's result. On hosts whose KVM
//! cannot run Linux (this project's development machines) they run inside the nested test host,
//! in one L1 boot: first N × agentvm, then N × the QEMU microvm peer, each boot its own scenario
//! (so a boot that wedges L1 is noticed after one boot's time limit, not after all of them).
//! Elsewhere they run directly.

use std::time::Duration;

use serde::Serialize;
use vmm::artefacts::Artefacts;
use vmm::nested::{NestedRun, Scenario, ScenarioResult};

use super::inner::{self, AgentvmRuns, GuestArgs, PeerArgs, PeerRuns, PeerStatus};
use super::nested_bench::{run_nested, PeerHang};
use super::peer::{PEER_NAME, VARIANTS};
use super::qemu_files::{self, L1_QEMU, L1_QEMU_LIB, L1_QEMU_SHARE};
use super::vhost_modules;

pub const NESTED_LABEL: &str = "nested test host (QEMU TCG + kvm-amd), not a VMX host";
pub const DIRECT_LABEL: &str = "this machine (KVM)";
/// What a scenario gets beyond its boots' own limits (helper start-up, JSON output).
const SCENARIO_SLACK: Duration = Duration::from_secs(60);
/// Per boot, beyond its own limit: the watcher's kill grace and the helper's start-up.
const PER_BOOT_SLACK: Duration = Duration::from_secs(50);
/// Where the peer helper remembers, across scenarios, which QEMU variant boots.
const L1_VARIANT_FILE: &str = "/tmp/bench-peer-variant";

pub struct Options {
    pub runs: u32,
    pub boot_timeout_secs: u64,
    pub with_peer: bool,
    pub mem_mib: u64,
    pub command: Vec<String>,
}

/// How long the nested host took to come up, for the record.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct L1Times {
    pub l1_boot_s: f64,
    pub kvm_ready_s: f64,
}

pub struct GuestBound {
    pub measured_on: &'static str,
    pub agentvm: AgentvmRuns,
    /// `None` when the peer was not asked for.
    pub peer: Option<PeerRuns>,
    pub l1: Option<L1Times>,
}

pub fn measure(artefacts: &Artefacts, opts: &Options) -> Result<GuestBound, String> {
    let guest = GuestArgs {
        kernel: artefacts.kernel.clone(),
        initrd: artefacts.initrd.clone(),
        runs: opts.runs,
        timeout: opts.boot_timeout_secs,
        mem_mib: opts.mem_mib,
        command: opts.command.clone(),
    };
    if vmm::host::can_run_linux() {
        eprintln!("bench: this host's KVM runs Linux guests: guest-bound boots run here directly");
        return Ok(measure_direct(guest, opts.with_peer));
    }
    eprintln!("bench: guest-bound boots run in the {NESTED_LABEL}; this takes minutes");
    measure_nested(artefacts, guest, opts.with_peer)
}

fn measure_direct(guest: GuestArgs, with_peer: bool) -> GuestBound {
    let agentvm = inner::agentvm_runs(&guest);
    let peer = with_peer.then(|| match qemu_files::locate_qemu() {
        Ok(qemu) => inner::peer_runs(&PeerArgs {
            qemu,
            firmware_dir: None,
            lib_dir: None,
            variant_file: None,
            vhost_modules: None,
            guest,
        }),
        Err(e) => peer_without_results(PeerStatus::Unavailable, e),
    });
    GuestBound {
        measured_on: DIRECT_LABEL,
        agentvm,
        peer,
        l1: None,
    }
}

fn peer_without_results(status: PeerStatus, why: String) -> PeerRuns {
    PeerRuns {
        status,
        error: Some(why),
        ..PeerRuns::default()
    }
}

fn measure_nested(
    artefacts: &Artefacts,
    guest: GuestArgs,
    with_peer: bool,
) -> Result<GuestBound, String> {
    // The nested host runs on QEMU too; installing it here serves both.
    let qemu = qemu_files::locate_qemu()?;
    let peer = with_peer.then(|| peer_scenarios(&guest));
    let outcome = run_nested(
        artefacts,
        &qemu,
        guest.mem_mib,
        None,
        &agentvm_scenarios(&guest),
        peer,
    )?;
    let run = outcome.run;
    let (agentvm, peer_results) = split_results(&run, guest.runs)?;
    let peer = if !with_peer {
        None
    } else if let Some(e) = outcome.peer_setup_error {
        Some(peer_without_results(PeerStatus::Unavailable, e))
    } else if let Some(hang) = outcome.peer_hang {
        Some(peer_hang_report(&hang))
    } else {
        Some(peer_results)
    };
    Ok(GuestBound {
        measured_on: NESTED_LABEL,
        agentvm,
        peer,
        l1: Some(L1Times {
            l1_boot_s: run.l1_boot.as_secs_f64(),
            kvm_ready_s: run.kvm_ready.as_secs_f64(),
        }),
    })
}

fn agentvm_scenarios(guest: &GuestArgs) -> Vec<Scenario> {
    (1..=guest.runs)
        .map(|k| {
            Scenario::new(
                format!("agentvm-{k}"),
                inner_command("guest-runs", "", guest),
                boots_limit(1, guest.timeout),
            )
        })
        .collect()
}

fn peer_scenarios(guest: &GuestArgs) -> Vec<Scenario> {
    let extra = format!(
        "--qemu {L1_QEMU} --firmware-dir {L1_QEMU_SHARE} --lib-dir {L1_QEMU_LIB} \
         --variant-file {L1_VARIANT_FILE} --vhost-modules {} ",
        vhost_modules::L1_DIR
    );
    (1..=guest.runs)
        .map(|k| {
            // The first boot may try every variant.
            let boots = if k == 1 { VARIANTS.len() as u32 } else { 1 };
            Scenario::new(
                format!("{PEER_NAME}-{k}"),
                inner_command("peer-run", &extra, guest),
                boots_limit(boots, guest.timeout),
            )
        })
        .collect()
}

pub fn boots_limit(boots: u32, boot_timeout_secs: u64) -> Duration {
    (Duration::from_secs(boot_timeout_secs) + PER_BOOT_SLACK) * boots + SCENARIO_SLACK
}

/// The scenario script: one boot by the hidden helper of this same binary, on the L2 files.
fn inner_command(helper: &str, extra: &str, guest: &GuestArgs) -> String {
    let mut line = format!(
        "agentvm bench {helper} {extra}--kernel \"$AGENTVM_L2_KERNEL\" --initrd \
         \"$AGENTVM_L2_INITRD\" --runs 1 --timeout {} --mem-mib {} --",
        guest.timeout, guest.mem_mib
    );
    for arg in &guest.command {
        line.push_str(&format!(" '{}'", arg.replace('\'', r"'\''")));
    }
    line
}

/// Merges the per-boot results of the agentvm scenarios and of the peer scenarios.
fn split_results(run: &NestedRun, runs: u32) -> Result<(AgentvmRuns, PeerRuns), String> {
    let mut agentvm = AgentvmRuns::default();
    let mut peer = PeerRuns {
        status: PeerStatus::Ok,
        ..PeerRuns::default()
    };
    let mut agentvm_seen = 0;
    for r in &run.results {
        if r.name.starts_with(PEER_NAME) {
            let part = parse_result::<PeerRuns>(r)
                .unwrap_or_else(|e| peer_without_results(PeerStatus::Failed, e));
            merge_peer(&mut peer, part, &r.name, runs);
        } else {
            agentvm_seen += 1;
            let part = parse_result::<AgentvmRuns>(r).unwrap_or_else(|e| AgentvmRuns {
                samples: Vec::new(),
                error: Some(e),
            });
            agentvm.samples.extend(part.samples);
            if agentvm.error.is_none() {
                agentvm.error = part.error.map(|e| format!("{}/{runs}: {e}", r.name));
            }
        }
    }
    if agentvm_seen == 0 {
        return Err("the nested host returned no agentvm results".into());
    }
    Ok((agentvm, peer))
}

fn merge_peer(into: &mut PeerRuns, part: PeerRuns, name: &str, runs: u32) {
    if into.qemu_version.is_none() {
        into.qemu_version = part.qemu_version;
    }
    into.tried.extend(part.tried);
    if into.variant.is_none() {
        into.variant = part.variant;
        into.args = part.args;
    }
    into.samples.extend(part.samples);
    // The first failure explains the rest (later boots are skipped once none booted).
    if into.status == PeerStatus::Ok && part.status != PeerStatus::Ok {
        into.status = part.status;
        into.error = part.error.map(|e| format!("{name}/{runs}: {e}"));
    }
}

fn peer_hang_report(hang: &PeerHang) -> PeerRuns {
    let first = hang.name == format!("{PEER_NAME}-1");
    peer_without_results(
        if first {
            PeerStatus::DidNotBoot
        } else {
            PeerStatus::Failed
        },
        format!(
            "'{}' wedged the nested test host (no report within {} s); its L1 was restarted \
             for agentvm alone, so the peer's results from it are lost\n{}",
            hang.name,
            hang.waited.as_secs(),
            hang.tail
        ),
    )
}

/// The helper's JSON (its last stdout line); its progress lines are passed on to our stderr.
pub fn parse_result<T: serde::de::DeserializeOwned>(r: &ScenarioResult) -> Result<T, String> {
    for line in r.stderr_text().lines().filter(|l| !l.trim().is_empty()) {
        eprintln!("  [L1 {}] {line}", r.name);
    }
    let stdout = r.stdout_text();
    let json = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'));
    match json.map(serde_json::from_str::<T>) {
        Some(Ok(value)) => Ok(value),
        Some(Err(e)) => Err(format!("malformed results from the nested host: {e}")),
        None => {
            let status = if r.timed_out {
                format!("timed out after {:.0} s", r.duration.as_secs_f64())
            } else {
                format!("exit code {}", r.exit_code)
            };
            let stderr = r.stderr_text();
            let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
            Err(format!(
                "no results from the nested host ({status})\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest() -> GuestArgs {
        GuestArgs {
            kernel: "/k".into(),
            initrd: "/i".into(),
            runs: 3,
            timeout: 100,
            mem_mib: 256,
            command: vec!["sh".into(), "-c".into(), "echo it's".into()],
        }
    }

    #[test]
    fn one_scenario_per_boot_using_the_l2_files() {
        let a = agentvm_scenarios(&guest());
        assert_eq!(a.len(), 3);
        assert_eq!(a[2].name, "agentvm-3");
        assert!(
            a[0].script
                .starts_with("agentvm bench guest-runs --kernel \"$AGENTVM_L2_KERNEL\" --initrd"),
            "{}",
            a[0].script
        );
        assert!(a[0]
            .script
            .contains("--runs 1 --timeout 100 --mem-mib 256 --"));
        assert!(
            a[0].script.ends_with(r" -- 'sh' '-c' 'echo it'\''s'"),
            "{}",
            a[0].script
        );
        assert_eq!(a[0].timeout, boots_limit(1, 100));

        let p = peer_scenarios(&guest());
        assert_eq!(p[0].name, "qemu-microvm-1");
        assert!(p[0].script.contains(&format!("--qemu {L1_QEMU} ")));
        assert!(p[0].script.contains("--vhost-modules /lib/modules/vhost "));
        assert!(p[1]
            .script
            .contains(&format!("--variant-file {L1_VARIANT_FILE} ")));
        assert_eq!(p[0].timeout, boots_limit(VARIANTS.len() as u32, 100));
        assert_eq!(p[1].timeout, boots_limit(1, 100));
    }

    #[test]
    fn scenario_limits_cover_every_boot() {
        assert_eq!(
            boots_limit(3, 100),
            Duration::from_secs(3 * 150) + SCENARIO_SLACK
        );
    }

    fn result(name: &str, stdout: &str, stderr: &str, timed_out: bool) -> ScenarioResult {
        ScenarioResult {
            name: name.into(),
            exit_code: if timed_out { 137 } else { 0 },
            timed_out,
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.as_bytes().to_vec(),
            duration: Duration::from_secs(5),
        }
    }

    #[test]
    fn helper_output_is_parsed_or_explained() {
        let ok = result(
            "a",
            "noise\n{\"samples\":[],\"error\":null}\n",
            "bench: x\n",
            false,
        );
        let runs: AgentvmRuns = parse_result(&ok).unwrap();
        assert!(runs.samples.is_empty() && runs.error.is_none());

        let err = parse_result::<AgentvmRuns>(&result("a", "", "boom\n", true)).unwrap_err();
        assert!(err.contains("timed out") && err.contains("boom"), "{err}");
        let bad = result("a", "{\"samples\":7}\n", "", false);
        let err = parse_result::<AgentvmRuns>(&bad).unwrap_err();
        assert!(err.contains("malformed"), "{err}");
    }

    fn nested_run(results: Vec<ScenarioResult>) -> NestedRun {
        NestedRun {
            results,
            l1_boot: Duration::from_secs(3),
            kvm_ready: Duration::from_secs(4),
            total: Duration::from_secs(60),
        }
    }

    const SAMPLE: &str = r#"{"spawn_ns":1,"process_start_ns":2,"first_kvm_run_ns":3,
        "agent_ready_ns":4,"result_ns":5,"peak_rss":null,
        "rss_before_guest":{"total_kib":1,"anon_kib":1,"file_kib":0,"shmem_kib":0},
        "rss_end":{"total_kib":1,"anon_kib":1,"file_kib":0,"shmem_kib":0}}"#;

    #[test]
    fn per_boot_results_are_merged_and_the_first_failure_kept() {
        let sample = SAMPLE.replace('\n', "");
        let good = format!("{{\"samples\":[{sample}],\"error\":null}}\n");
        let peer_ok = r#"{"status":"ok","qemu_version":"QEMU 7.2","tried":[{"variant":"v",
            "machine":"microvm","outcome":"booted"}],"variant":"v","args":["-M","microvm"],
            "samples":[{"spawn_ns":1,"agent_ready_ns":2,"result_ns":3,"peak_rss":null}],
            "error":null}"#
            .replace('\n', "");
        let peer_failed = r#"{"status":"failed","qemu_version":null,"tried":[],"variant":"v",
            "args":[],"samples":[],"error":"no result within 100 s"}"#
            .replace('\n', "");
        let run = nested_run(vec![
            result("agentvm-1", &good, "", false),
            result("agentvm-2", "", "L2 hung\n", true),
            result("agentvm-3", &good, "", false),
            result("qemu-microvm-1", &format!("{peer_ok}\n"), "", false),
            result("qemu-microvm-2", &format!("{peer_failed}\n"), "", false),
        ]);
        let (agentvm, peer) = split_results(&run, 3).unwrap();
        assert_eq!(agentvm.samples.len(), 2);
        let err = agentvm.error.unwrap();
        assert!(
            err.starts_with("agentvm-2/3: no results") && err.contains("L2 hung"),
            "{err}"
        );
        assert_eq!(peer.status, PeerStatus::Failed);
        assert_eq!(peer.samples.len(), 1);
        assert_eq!(peer.qemu_version.as_deref(), Some("QEMU 7.2"));
        assert_eq!(peer.args, ["-M", "microvm"]);
        assert_eq!(
            peer.error.as_deref(),
            Some("qemu-microvm-2/3: no result within 100 s")
        );

        assert!(split_results(&nested_run(vec![]), 3).is_err());
    }

    #[test]
    fn a_wedged_l1_is_reported_against_the_peer() {
        let hang = |name: &str, tail: &str| PeerHang {
            name: name.into(),
            waited: Duration::from_secs(300),
            tail: tail.into(),
        };
        let first = peer_hang_report(&hang("qemu-microvm-1", "a\nb"));
        assert_eq!(first.status, PeerStatus::DidNotBoot);
        let e = first.error.unwrap();
        assert!(e.contains("wedged") && e.ends_with("a\nb"), "{e}");
        let later = peer_hang_report(&hang("qemu-microvm-4", ""));
        assert_eq!(later.status, PeerStatus::Failed);
    }
}
