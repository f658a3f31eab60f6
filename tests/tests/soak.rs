//! The long soak (issue "Reliability and security testing"): inside the nested test host, the
//! agent-e2e driver snapshots one Linux guest, then 4 workers take 200 sandboxes through their
//! whole life each (restored from that snapshot, exec'd, snapshotted, restored from their own
//! snapshot, exec'd, destroyed) and it asserts that nothing leaked: processes, descriptors,
//! threads, files, snapshot temporaries, host memory (see src/bin/agent-e2e/soak.rs).
//!
//! Not in the default test run (it takes most of an hour at TCG speed); agent-e2e runs a bounded
//! soak of 4 sandboxes in every run. Run the long one with:
//!
//!     cargo build --release -p vmm -p integration-tests && \
//!     cargo test --release -p integration-tests --test soak -- --ignored --nocapture
//!
//! `AGENTVM_SOAK_ITERATIONS=N` changes the number of sandboxes.

use std::path::PathBuf;
use std::time::Duration;

use integration_tests::nested::{describe, run_scenarios_with_files};
use vmm::nested::{Scenario, L1_AGENTVM, L1_L2_INITRD, L1_L2_KERNEL};

const L1_DRIVER: &str = "/bin/agent-e2e";

#[test]
#[ignore = "the long soak takes most of an hour in the nested test host; agent-e2e runs a bounded one"]
fn two_hundred_sandboxes_leave_nothing_behind() {
    let iterations: usize = std::env::var("AGENTVM_SOAK_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let driver = PathBuf::from(env!("CARGO_BIN_EXE_agent-e2e"));
    let script = format!(
        "{L1_DRIVER} --agentvm {L1_AGENTVM} --kernel {L1_L2_KERNEL} --initrd {L1_L2_INITRD} \
         --work /tmp/soak --only soak --soak-iterations {iterations}"
    );
    // At TCG speed a round takes tens of seconds, and one L1 CPU runs the 4 workers' guests.
    let timeout = Duration::from_secs(600 + 40 * iterations as u64);
    let outcome = run_scenarios_with_files(
        &[Scenario::new("soak", script, timeout)],
        vec![(driver, L1_DRIVER.to_string())],
    );
    let Some(r) = outcome.scenario("soak") else {
        return;
    };
    let stdout = r.stdout_text();
    let line = stdout
        .lines()
        .find(|l| l.starts_with("E2E soak "))
        .unwrap_or_else(|| panic!("the soak did not report\n{}", describe(r)));
    assert!(
        line.starts_with("E2E soak ok "),
        "{}\n--- driver stderr ---\n{}",
        line.replace("\\n", "\n"),
        r.stderr_text()
    );
    eprintln!("{line}");
}
