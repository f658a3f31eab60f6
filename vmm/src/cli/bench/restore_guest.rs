//! `bench restore --guest-bound`: runs the hidden `bench restore-runs` helper
//! ([`restore_inner`](super::restore_inner)) where a Linux guest can run: directly on a host whose
//! KVM runs Linux guests, else inside the nested test host (one L1 boot, one scenario; no peer).

use std::time::Duration;

use vmm::artefacts::Artefacts;
use vmm::nested::{NestedRun, Scenario};

use super::guest_bound::{parse_result, L1Times, DIRECT_LABEL, NESTED_LABEL};
use super::nested_bench::run_nested;
use super::qemu_files;
use super::restore_inner::{self, GuestRestoreRuns, RestoreRunArgs};

/// The one scenario's name in the nested host.
const SCENARIO: &str = "agentvm-restore";
/// One L1 CPU, as the nested tests use: with two, TCG's emulation of nested SVM wedged L1 in
/// about one run in four (one CPU stopped taking interrupts while the other spun in the VMM's
/// vCPU thread), and this benchmark's first nested run did just that during its first cold boot.
const L1_CPUS: u32 = 1;
/// Beyond the VMs' own limits: helper start-up, snapshot writing, JSON output.
const SCENARIO_SLACK: Duration = Duration::from_secs(300);

/// What the helper gave, and where.
pub struct GuestRestore {
    pub measured_on: &'static str,
    pub runs: GuestRestoreRuns,
    pub l1: Option<L1Times>,
}

pub fn measure(artefacts: &Artefacts, helper: &RestoreRunArgs) -> GuestRestore {
    if vmm::host::can_run_linux() {
        eprintln!("bench: this host's KVM runs Linux guests: guest-bound restores run here");
        return GuestRestore {
            measured_on: DIRECT_LABEL,
            runs: restore_inner::restore_runs(helper),
            l1: None,
        };
    }
    eprintln!("bench: guest-bound restores run in the {NESTED_LABEL}; this takes minutes");
    let failed = |why: String| GuestRestore {
        measured_on: NESTED_LABEL,
        runs: GuestRestoreRuns::failed(why),
        l1: None,
    };
    // The nested host runs on QEMU.
    let qemu = match qemu_files::locate_qemu() {
        Ok(q) => q,
        Err(e) => return failed(format!("the nested test host needs QEMU: {e}")),
    };
    let outcome = match run_nested(
        artefacts,
        &qemu,
        helper.mem_mib,
        Some(L1_CPUS),
        &[scenario(helper)],
        None,
    ) {
        Ok(outcome) => outcome,
        Err(e) => return failed(e),
    };
    GuestRestore {
        measured_on: NESTED_LABEL,
        runs: runs_of(&outcome.run),
        l1: Some(L1Times {
            l1_boot_s: outcome.run.l1_boot.as_secs_f64(),
            kvm_ready_s: outcome.run.kvm_ready.as_secs_f64(),
        }),
    }
}

/// The helper's results from the nested run, or why there are none.
fn runs_of(run: &NestedRun) -> GuestRestoreRuns {
    match run.results.iter().find(|r| r.name == SCENARIO) {
        None => GuestRestoreRuns::failed("the nested host returned no restore results".into()),
        Some(r) => parse_result::<GuestRestoreRuns>(r).unwrap_or_else(GuestRestoreRuns::failed),
    }
}

/// The scenario script: the hidden helper of this same binary, on the L2 files.
fn scenario(helper: &RestoreRunArgs) -> Scenario {
    let script = format!(
        "agentvm bench restore-runs --kernel \"$AGENTVM_L2_KERNEL\" --initrd \
         \"$AGENTVM_L2_INITRD\" --iterations {} --mem-mib {} --timeout {}",
        helper.iterations, helper.mem_mib, helper.timeout
    );
    Scenario::new(SCENARIO, script, scenario_limit(helper))
}

/// Every VM the helper brings up may take its whole limit: the snapshotted one, the recording
/// restore, and four per iteration with the warm-up.
fn scenario_limit(helper: &RestoreRunArgs) -> Duration {
    let vms = 2 + 4 * (helper.iterations + 1);
    Duration::from_secs(helper.timeout) * vms + SCENARIO_SLACK
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::nested::ScenarioResult;

    fn helper() -> RestoreRunArgs {
        RestoreRunArgs {
            kernel: "/k".into(),
            initrd: "/i".into(),
            iterations: 3,
            mem_mib: 256,
            timeout: 100,
        }
    }

    #[test]
    fn the_scenario_runs_the_helper_on_the_l2_files() {
        let s = scenario(&helper());
        assert_eq!(s.name, SCENARIO);
        assert_eq!(
            s.script,
            "agentvm bench restore-runs --kernel \"$AGENTVM_L2_KERNEL\" --initrd \
             \"$AGENTVM_L2_INITRD\" --iterations 3 --mem-mib 256 --timeout 100"
        );
        assert_eq!(s.timeout, Duration::from_secs(18 * 100) + SCENARIO_SLACK);
    }

    fn nested_run(results: Vec<ScenarioResult>) -> NestedRun {
        NestedRun {
            results,
            l1_boot: Duration::from_secs(3),
            kvm_ready: Duration::from_secs(4),
            total: Duration::from_secs(60),
        }
    }

    fn result(stdout: &str, stderr: &str, timed_out: bool) -> ScenarioResult {
        ScenarioResult {
            name: SCENARIO.into(),
            exit_code: if timed_out { 137 } else { 0 },
            timed_out,
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.as_bytes().to_vec(),
            duration: Duration::from_secs(5),
        }
    }

    #[test]
    fn nested_results_are_parsed_or_explained() {
        let good = r#"{"boot_to_first_exec_ms":900.0,"snapshot_create_ms":40.0,
            "working_set_pages":1200,"file":[{"request_ns":1,"request_to_first_exec_ns":2,
            "exec_attempts":1,"vmm_to_first_run_us":3,"uffd_on_demand_pages":null,
            "uffd_prefetched_pages":null,"uffd_fault_service_s":null,"rss":null}],
            "uffd":[],"uffd_prefetch":[],"cold_boot":[],"error":"cold boot 1: no answer"}"#
            .replace('\n', "");
        let runs = runs_of(&nested_run(vec![result(&format!("{good}\n"), "", false)]));
        assert_eq!(runs.file.len(), 1);
        assert_eq!(runs.working_set_pages, Some(1200));
        assert_eq!(runs.error.as_deref(), Some("cold boot 1: no answer"));

        let hung = runs_of(&nested_run(vec![result("", "L2 hung\n", true)]));
        let e = hung.error.unwrap();
        assert!(e.contains("timed out") && e.contains("L2 hung"), "{e}");
        assert!(hung.file.is_empty());

        let none = runs_of(&nested_run(vec![]));
        assert!(none.error.unwrap().contains("no restore results"));
    }
}
