//! Real Linux end to end: Debian's cloud kernel with the guest agent as /init, booted by `agentvm
//! run` on the nested test host's /dev/kvm (QEMU TCG, `-cpu EPYC,+svm`, kvm-amd in L1).
//!
//! One L1 boot serves every test here, and each L2 boot checks as much as it can, because under
//! TCG every boot is slow. Locally the tests skip (saying why) when the nested host cannot run; with
//! CI=true they fail instead. Run with:
//!
//!     cargo build -p vmm && cargo test -p integration-tests --test nested_linux -- --nocapture

use std::sync::OnceLock;
use std::time::Duration;

use integration_tests::nested::{
    describe, l2_scenario, l2_scenario_with_kernel, run_scenarios, split_l2_console, Outcome,
    L1_L2_BZIMAGE,
};
use vmm::nested::Scenario;

/// Generous: L2 runs at TCG speed, and the machine's two cores are shared.
const L2_TIMEOUT: Duration = Duration::from_secs(300);
const GUEST_MEM_MIB: u64 = 256;

/// The isolate tier on an ordinary (SVM) KVM, where L1's kvm-amd runs the isolate guest: a
/// result with a log line, and the CPU limit.
const ISOLATE_SCRIPT: &str = r#"cat > /tmp/add.wat <<'WAT'
(module (import "agentvm" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1) (data (i32.const 0) "isolate-log")
  (func (export "add") (param i32 i32) (result i32)
    (call $log (i32.const 0) (i32.const 11)) local.get 0 local.get 1 i32.add)
  (func (export "spin") (loop br 0)))
WAT
echo "sum=$(agentvm isolate run /tmp/add.wat --invoke add --arg 2 --arg 40)"
agentvm isolate run /tmp/add.wat --invoke spin --cpu-limit-ms 300
echo "spin_status=$?"
"#;

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new(
            "l1-kvm",
            "test -c /dev/kvm && echo kvm-char-device; grep -c svm /proc/cpuinfo",
            Duration::from_secs(30),
        ),
        Scenario::new("isolate", ISOLATE_SCRIPT, Duration::from_secs(120)),
        // One boot for output, exit status, vCPUs, memory and the virtio-rng device.
        l2_scenario(
            "exec",
            "echo hello-from-l2; \
             echo nproc=$(nproc); \
             grep MemTotal /proc/meminfo; \
             echo rng_available=$(cat /sys/class/misc/hw_random/rng_available); \
             echo hwrng_bytes=$(head -c 64 /dev/hwrng | wc -c); \
             exit 7",
            L2_TIMEOUT,
        ),
        l2_scenario(
            "poweroff",
            "echo before-poweroff; poweroff; sleep 60; echo after-poweroff",
            L2_TIMEOUT,
        ),
        // The distribution bzImage through the bzImage loader (64-bit entry after the decompressor).
        l2_scenario_with_kernel(
            "bzimage",
            L1_L2_BZIMAGE,
            "echo bzimage-kernel=$(uname -r); exit 4",
            L2_TIMEOUT,
        ),
        l2_scenario(
            "panic",
            // The pause lets the agent forward "before-panic" to the console: the crash stops
            // the guest kernel at once, with whatever is still in the pipe.
            "echo before-panic; sleep 2; echo c > /proc/sysrq-trigger; sleep 60; echo after-panic",
            L2_TIMEOUT,
        ),
    ]
}

fn outcome() -> &'static Outcome {
    static RUN: OnceLock<Outcome> = OnceLock::new();
    RUN.get_or_init(|| run_scenarios(&scenarios()))
}

/// The value of the first "key=value" line of `output` for `key`.
fn value<'a>(output: &'a str, key: &str) -> Option<&'a str> {
    output
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .map(str::trim)
}

#[test]
fn l1_has_a_working_nested_kvm() {
    let Some(r) = outcome().scenario("l1-kvm") else {
        return;
    };
    assert_eq!(r.exit_code, 0, "{}", describe(r));
    let out = r.stdout_text();
    assert!(out.contains("kvm-char-device"), "{}", describe(r));
    let svm_cpus: u32 = out
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        svm_cpus >= 1,
        "no svm flag in L1's cpuinfo: {}",
        describe(r)
    );
}

#[test]
fn isolates_run_on_an_svm_kvm_too() {
    let Some(r) = outcome().scenario("isolate") else {
        return;
    };
    assert!(!r.timed_out, "{}", describe(r));
    let out = r.stdout_text();
    let err = r.stderr_text();
    assert_eq!(value(&out, "sum"), Some("42"), "{}", describe(r));
    assert!(err.contains("isolate: isolate-log"), "{}", describe(r));
    assert_eq!(value(&out, "spin_status"), Some("1"), "{}", describe(r));
    assert!(err.contains("CPU time limit exceeded"), "{}", describe(r));
}

/// The command's output (without the L2 console tail) of the "exec" scenario.
fn exec_output() -> Option<(String, &'static vmm::nested::ScenarioResult)> {
    let r = outcome().scenario("exec")?;
    assert!(!r.timed_out, "{}", describe(r));
    Some((split_l2_console(r).0, r))
}

#[test]
fn command_output_and_exit_code_propagate() {
    let Some((out, r)) = exec_output() else {
        return;
    };
    assert!(out.starts_with("hello-from-l2\n"), "{}", describe(r));
    assert_eq!(
        r.exit_code,
        7,
        "guest exit status must propagate: {}",
        describe(r)
    );
}

#[test]
fn guest_sees_the_configured_vcpus() {
    let Some((out, r)) = exec_output() else {
        return;
    };
    assert_eq!(value(&out, "nproc"), Some("2"), "{}", describe(r));
}

#[test]
fn guest_memory_matches_mem_mib() {
    let Some((out, r)) = exec_output() else {
        return;
    };
    let mem_kib: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal line: {}", describe(r)));
    // MemTotal is RAM minus what the kernel reserves for itself (its image, early allocations):
    // below --mem-mib, but most of it.
    let configured_kib = GUEST_MEM_MIB * 1024;
    assert!(
        mem_kib <= configured_kib && mem_kib >= configured_kib * 3 / 4,
        "MemTotal {mem_kib} kB does not match --mem-mib {GUEST_MEM_MIB}: {}",
        describe(r)
    );
}

#[test]
fn virtio_rng_is_a_working_hwrng() {
    let Some((out, r)) = exec_output() else {
        return;
    };
    let rng = value(&out, "rng_available").unwrap_or_default();
    assert!(
        rng.split_whitespace().any(|d| d == "virtio_rng.0"),
        "virtio-rng not registered with hw_random: {}",
        describe(r)
    );
    assert_eq!(value(&out, "hwrng_bytes"), Some("64"), "{}", describe(r));
}

#[test]
fn guest_poweroff_ends_the_vmm_cleanly() {
    let Some(r) = outcome().scenario("poweroff") else {
        return;
    };
    assert!(!r.timed_out, "{}", describe(r));
    let (out, _console) = split_l2_console(r);
    assert!(out.contains("before-poweroff"), "{}", describe(r));
    assert!(!out.contains("after-poweroff"), "{}", describe(r));
    assert_eq!(r.exit_code, 0, "{}", describe(r));
}

#[test]
fn a_bzimage_kernel_boots_too() {
    let Some(r) = outcome().scenario("bzimage") else {
        return;
    };
    assert!(!r.timed_out, "{}", describe(r));
    let (out, _console) = split_l2_console(r);
    assert!(out.starts_with("bzimage-kernel=6."), "{}", describe(r));
    assert_eq!(r.exit_code, 4, "{}", describe(r));
}

#[test]
fn guest_kernel_panic_is_a_clear_vmm_error() {
    let Some(r) = outcome().scenario("panic") else {
        return;
    };
    assert!(!r.timed_out, "{}", describe(r));
    let (out, _console) = split_l2_console(r);
    assert!(out.contains("before-panic"), "{}", describe(r));
    assert!(!out.contains("after-panic"), "{}", describe(r));
    assert_ne!(
        r.exit_code,
        0,
        "a panicked guest must fail the run: {}",
        describe(r)
    );
    // Only agentvm's own stderr is here (the console tail went to stdout).
    assert!(
        r.stderr_text().to_lowercase().contains("panic"),
        "agentvm's error does not mention the panic: {}",
        describe(r)
    );
}
