//! The nested test host from tests: real Linux guests under `agentvm`, inside QEMU/TCG with a
//! nested-SVM `/dev/kvm` (see `vmm::nested`).
//!
//! Every L1 boot costs seconds and every L2 boot more, so a test binary boots L1 once, runs all its
//! scenarios there, and its `#[test]`s check their own scenario's result:
//!
//! ```ignore
//! static RUN: OnceLock<Outcome> = OnceLock::new();
//! fn outcome() -> &'static Outcome { RUN.get_or_init(|| run_scenarios(&scenarios())) }
//! #[test] fn foo() { let Some(r) = outcome().scenario("foo") else { return }; ... }
//! ```

use std::time::Duration;

use vmm::nested::{
    NestedError, NestedHost, NestedInputs, NestedRun, Scenario, ScenarioResult, L1_L2_INITRD,
    L1_L2_KERNEL,
};

use crate::agentvm::agentvm_bin;

/// Separates a scenario's own stdout from the L2 console tail [`l2_scenario`] appends.
pub const L2_CONSOLE_MARKER: &str = "@@nested-test:l2-console";

/// What the one nested-host boot of a test binary gave.
pub enum Outcome {
    Ran(NestedRun),
    /// This machine cannot provide a nested test host (why).
    Unavailable(String),
    /// The nested host itself failed (the full error, with L1's console tail).
    Failed(String),
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

impl Outcome {
    /// The result of scenario `name`. Returns `None` (after printing why) when the nested host is
    /// unavailable and the test may skip; panics when it failed, or is unavailable under CI=true.
    pub fn scenario(&self, name: &str) -> Option<&ScenarioResult> {
        match self {
            Outcome::Ran(run) => Some(
                run.results
                    .iter()
                    .find(|r| r.name == name)
                    .unwrap_or_else(|| panic!("no scenario named '{name}' was run")),
            ),
            Outcome::Unavailable(why) if in_ci() => {
                panic!(
                    "nested test host unavailable: {why} (CI=true: KVM tests must not be skipped)"
                )
            }
            Outcome::Unavailable(why) => {
                eprintln!("skipping nested test '{name}': nested test host unavailable: {why}");
                None
            }
            Outcome::Failed(err) => panic!("nested test host failed: {err}"),
        }
    }
}

/// Prepares the default artefacts, boots one L1 with the `agentvm` binary of this build, runs the
/// scenarios, and prints the measured times.
pub fn run_scenarios(scenarios: &[Scenario]) -> Outcome {
    run_scenarios_with_files(scenarios, Vec::new())
}

/// Runs of the scenarios when L1 keeps wedging: the first and two more in fresh L1s (with one
/// retry, two wedges in a row still failed CI runs of agent-e2e).
const WEDGE_ATTEMPTS: u32 = 3;

/// [`run_scenarios`] with more files in L1: (host path, absolute L1 path).
pub fn run_scenarios_with_files(
    scenarios: &[Scenario],
    extra_files: Vec<(std::path::PathBuf, String)>,
) -> Outcome {
    let artefacts = match vmm::artefacts::prepare_default() {
        Ok(a) => a,
        Err(e) => return Outcome::Unavailable(format!("cannot prepare the guest artefacts: {e}")),
    };
    let mut host = NestedHost::new(NestedInputs {
        l1_kernel: artefacts.vmlinuz.clone(),
        pkg_dir: artefacts.pkg_dir.clone(),
        busybox: artefacts.busybox.clone(),
        agentvm: agentvm_bin(),
        l2_kernel: artefacts.kernel.clone(),
        l2_initrd: artefacts.initrd.clone(),
    });
    // One L1 CPU. With two, L1 wedged in roughly one agent-e2e run in four (here and in CI): one
    // CPU stopped taking interrupts while the other spun in the VMM's vCPU thread, printing
    // soft-lockup reports for ever (TCG's multi-threaded emulation of nested SVM). With one: no
    // wedge in 4 runs of agent-e2e on a loaded machine, 284-403 s each (two CPUs: ~210-350 s).
    host.l1_cpus = 1;
    // The distribution bzImage too, to boot it as an L2 kernel through the bzImage loader.
    host.extra_files
        .push((artefacts.vmlinuz.clone(), L1_L2_BZIMAGE.to_string()));
    host.extra_files.extend(extra_files);
    // A wedged L1 (QEMU TCG with nested SVM froze, timers and all; see NestedError::L1Wedged) is
    // a fault of this test host, not of what ran in it: the scenarios get a fresh L1, up to
    // WEDGE_ATTEMPTS runs in all. Any other failure, and a last wedge, stands.
    let mut result = host.run(scenarios);
    for attempt in 2..=WEDGE_ATTEMPTS {
        match &result {
            Err(e) if e.is_l1_wedged() => {
                eprintln!(
                    "nested: NOTE: the nested test host wedged; running the scenarios again in a \
                     fresh L1 (attempt {attempt} of {WEDGE_ATTEMPTS}). What the wedge looked \
                     like:\n{e}"
                );
                result = host.run(scenarios);
            }
            _ => break,
        }
    }
    match result {
        Ok(run) => {
            eprintln!(
                "nested host ({}): L1 boot {:.2} s, /dev/kvm ready {:.2} s, all scenarios {:.2} s",
                artefacts.version,
                run.l1_boot.as_secs_f64(),
                run.kvm_ready.as_secs_f64(),
                run.total.as_secs_f64()
            );
            for r in &run.results {
                eprintln!(
                    "  scenario '{}': exit {}{} in {:.2} s",
                    r.name,
                    r.exit_code,
                    if r.timed_out { " (timed out)" } else { "" },
                    r.duration.as_secs_f64()
                );
            }
            Outcome::Ran(run)
        }
        Err(e @ NestedError::QemuMissing { .. }) | Err(e @ NestedError::KvmUnavailable { .. }) => {
            Outcome::Unavailable(e.to_string())
        }
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// Quotes `s` as one word for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A scenario that runs `sh -c <guest_cmd>` in a fresh L2 guest with `agentvm run`
/// (`--vcpus 2 --mem-mib 256`), exits with agentvm's exit code, keeps agentvm's stderr as the
/// scenario's stderr, and appends the tail of the L2 serial console to stdout after
/// [`L2_CONSOLE_MARKER`] (see [`split_l2_console`]) so failures can be diagnosed.
pub fn l2_scenario(name: &str, guest_cmd: &str, timeout: Duration) -> Scenario {
    l2_scenario_with_kernel(name, L1_L2_KERNEL, guest_cmd, timeout)
}

/// Where [`run_scenarios`] puts the distribution bzImage in L1.
pub const L1_L2_BZIMAGE: &str = "/l2/vmlinuz";

/// [`l2_scenario`] with another L2 kernel (a path inside L1).
pub fn l2_scenario_with_kernel(
    name: &str,
    kernel: &str,
    guest_cmd: &str,
    timeout: Duration,
) -> Scenario {
    let console = format!(
        "/tmp/{}.l2-console",
        name.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    );
    let script = format!(
        "agentvm run --console {console} --kernel {kernel} --initrd {L1_L2_INITRD} \
         --vcpus 2 --mem-mib 256 -- sh -c {cmd}\n\
         rc=$?\n\
         echo\n\
         echo {L2_CONSOLE_MARKER}\n\
         tail -n 60 {console}\n\
         exit $rc\n",
        cmd = sh_quote(guest_cmd),
    );
    Scenario::new(name, script, timeout)
}

/// Splits an [`l2_scenario`]'s stdout into (the guest command's output, the L2 console tail).
/// The "\n" the script writes before the marker is not part of the command's output.
pub fn split_l2_console(r: &ScenarioResult) -> (String, String) {
    let text = r.stdout_text();
    let needle = format!("\n{L2_CONSOLE_MARKER}\n");
    match text.rfind(&needle) {
        Some(pos) => (
            text[..pos].to_string(),
            text[pos + needle.len()..].to_string(),
        ),
        None => (text, String::new()),
    }
}

/// Everything about a scenario, for assertion messages.
pub fn describe(r: &ScenarioResult) -> String {
    format!(
        "scenario '{}': exit {}{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        r.name,
        r.exit_code,
        if r.timed_out { " (TIMED OUT)" } else { "" },
        r.stdout_text(),
        r.stderr_text()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(stdout: &str) -> ScenarioResult {
        ScenarioResult {
            name: "t".into(),
            exit_code: 0,
            timed_out: false,
            stdout: stdout.as_bytes().to_vec(),
            stderr: vec![],
            duration: Duration::ZERO,
        }
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(sh_quote("echo 'a b'"), r"'echo '\''a b'\'''");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn console_tail_is_split_off() {
        let r = result(&format!("out\nmore\n\n{L2_CONSOLE_MARKER}\n[ 0.1] boot\n"));
        assert_eq!(
            split_l2_console(&r),
            ("out\nmore\n".to_string(), "[ 0.1] boot\n".to_string())
        );
        let r = result("no marker");
        assert_eq!(split_l2_console(&r), ("no marker".into(), String::new()));
    }

    #[test]
    fn l2_scenario_quotes_the_guest_command() {
        let s = l2_scenario("a b", "echo 'x'", Duration::from_secs(1));
        assert!(s.script.contains(r"sh -c 'echo '\''x'\'''"), "{}", s.script);
        assert!(s.script.contains("/tmp/a_b.l2-console"));
        assert!(s.script.contains("--vcpus 2 --mem-mib 256"));
    }
}
