//! VMM-side figures on this machine: `agentvm boot --stop-at-first-run` of the default kernel
//! and initramfs, timed from the spawn to the guest's first instruction. Nothing here depends on
//! how fast the host runs guest code, so any KVM host gives meaningful numbers.

use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::child::{self, Ended, Watch};
use super::inner::check_order;
use super::report::{read_report, RssKib};
use super::stats::span_ms;

/// `agentvm boot` stops itself after this long; the watcher kills it a little later.
const BOOT_LIMIT_SECS: u64 = 60;
const KILL_AFTER: Duration = Duration::from_secs(BOOT_LIMIT_SECS + 30);
pub const GUEST_MEM_MIB: u64 = 256;

/// One boot's milestones (CLOCK_MONOTONIC ns).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalSample {
    /// Taken by the benchmark right before it spawned the VMM.
    pub spawn_ns: u64,
    pub process_start_ns: u64,
    pub kvm_ready_ns: u64,
    pub kernel_loaded_ns: u64,
    pub first_kvm_run_ns: u64,
    pub rss_before_guest: RssKib,
}

impl LocalSample {
    pub fn spawn_to_first_run_ms(&self) -> f64 {
        span_ms(self.spawn_ns, self.first_kvm_run_ns).unwrap_or(f64::NAN)
    }
}

/// `warmup` discarded boots, then `runs` measured ones; stops at the first failure.
pub fn run(
    kernel: &Path,
    initrd: &Path,
    runs: u32,
    warmup: u32,
) -> Result<Vec<LocalSample>, String> {
    let (exe, dir) = super::child::self_and_workdir()?;
    let mut samples = Vec::with_capacity(runs as usize);
    for i in 0..warmup + runs {
        let sample = boot_once(&exe, kernel, initrd, dir.path(), i)?;
        if i < warmup {
            eprintln!(
                "bench: warm-up boot: spawn -> first KVM_RUN {:.2} ms (not counted)",
                sample.spawn_to_first_run_ms()
            );
            continue;
        }
        eprintln!(
            "bench: boot {}/{runs}: spawn -> first KVM_RUN {:.2} ms",
            i - warmup + 1,
            sample.spawn_to_first_run_ms()
        );
        samples.push(sample);
    }
    Ok(samples)
}

fn boot_once(
    exe: &Path,
    kernel: &Path,
    initrd: &Path,
    dir: &Path,
    i: u32,
) -> Result<LocalSample, String> {
    let report_path = dir.join(format!("boot{i}.json"));
    let stderr_path = dir.join(format!("boot{i}.stderr"));
    let stderr = File::create(&stderr_path)
        .map_err(|e| format!("cannot create {}: {e}", stderr_path.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("boot")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .arg("--mem-mib")
        .arg(GUEST_MEM_MIB.to_string())
        .arg("--stop-at-first-run")
        .arg("--timeout")
        .arg(BOOT_LIMIT_SECS.to_string())
        .arg("--report-timings")
        .arg(&report_path)
        .stderr(stderr);
    let watch = Watch { limit: KILL_AFTER };
    let run = child::watch(cmd, &watch).map_err(|e| format!("agentvm boot: {e}"))?;
    let fail = |what: String| {
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        format!(
            "agentvm boot --stop-at-first-run {what}\n{}",
            stderr.trim_end()
        )
    };
    match &run.ended {
        Ended::Exited(status) if status.success() => {}
        Ended::Exited(status) => return Err(fail(format!("failed ({status})"))),
        Ended::TimedOut => {
            return Err(fail(format!(
                "did not end within {} s",
                KILL_AFTER.as_secs()
            )))
        }
    }
    let report = read_report(&report_path)?;
    let sample = LocalSample {
        spawn_ns: run.spawn_ns,
        process_start_ns: report.process_start_ns,
        kvm_ready_ns: report.vmm.kvm_ready_ns,
        kernel_loaded_ns: report.vmm.kernel_loaded_ns,
        first_kvm_run_ns: report
            .vmm
            .first_kvm_run_ns
            .ok_or("agentvm ended without entering the guest (no first KVM_RUN in its report)")?,
        rss_before_guest: report.vmm.rss_before_guest,
    };
    check_order(&[
        ("spawn", sample.spawn_ns),
        ("process start", sample.process_start_ns),
        ("build start", report.vmm.build_start_ns),
        ("KVM ready", sample.kvm_ready_ns),
        ("kernel loaded", sample.kernel_loaded_ns),
        ("first KVM_RUN", sample.first_kvm_run_ns),
    ])?;
    Ok(sample)
}
