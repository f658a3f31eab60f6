//! The guest-bound measurements, run where Linux guests can boot: inside the nested test host
//! (through the hidden `agentvm bench guest-runs` / `bench peer-run` commands, which print JSON),
//! or directly on hosts with hardware virtualisation. Both boot the same kernel and initramfs with
//! the same agent, time from the moment the VMM process is spawned to the moment the host's client
//! has connected to the agent (over vsock) and to the command's result, and then stop the VM.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use agentvm_client::{ProcessSpec, ProcessSpecExt};
use clap::Args;
use serde::{Deserialize, Serialize};
use vmm::process_stats::monotonic_ns;

use super::child::{self, Ended, Watch, Watched};
use super::guest_vm::{GuestVm, Transport};
use super::peer::{self, Variant, GUEST_CID, PEER_NAME, VARIANTS};
use super::report::{read_report, RssKib};
use super::stats::span_ms;
use super::vhost_modules;

/// What a boot gets beyond its own limit before the watcher kills it (agentvm stops itself at
/// `--timeout`; this only catches a VMM that does not).
const KILL_GRACE: Duration = Duration::from_secs(30);
const TAIL_LINES: usize = 12;

/// What the guest-bound measurements need besides the VMM.
#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// Guest kernel (ELF vmlinux).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Guest initramfs with the agent as /init.
    #[arg(long)]
    pub initrd: PathBuf,
    /// Boots to measure.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,
    /// Time limit of each boot, in seconds.
    #[arg(long, default_value_t = 180, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
    /// Guest memory in MiB.
    #[arg(long = "mem-mib", default_value_t = 256)]
    pub mem_mib: u64,
    /// The command the guest agent runs.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct PeerArgs {
    /// qemu-system-x86_64 to run.
    #[arg(long)]
    pub qemu: PathBuf,
    /// Directory with QEMU's firmware (qboot, pvh.bin), passed as `-L`.
    #[arg(long)]
    pub firmware_dir: Option<PathBuf>,
    /// Directory with QEMU's shared libraries (LD_LIBRARY_PATH).
    #[arg(long)]
    pub lib_dir: Option<PathBuf>,
    /// Remembers across invocations which variant boots (its index, or "none"), so that a series
    /// of single-boot invocations tries the variants only once.
    #[arg(long)]
    pub variant_file: Option<PathBuf>,
    /// Load the vhost-vsock modules (`<name>.ko`) from this directory first.
    #[arg(long, value_name = "DIR")]
    pub vhost_modules: Option<PathBuf>,
    #[command(flatten)]
    pub guest: GuestArgs,
}

/// One `agentvm run` (CLOCK_MONOTONIC ns of the machine it ran on).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentvmSample {
    pub spawn_ns: u64,
    pub process_start_ns: u64,
    pub first_kvm_run_ns: u64,
    pub agent_ready_ns: u64,
    pub result_ns: u64,
    /// Sampled every 20 ms from /proc while it ran.
    pub peak_rss: Option<RssKib>,
    pub rss_before_guest: RssKib,
    /// agentvm's own reading after the VM was torn down.
    pub rss_end: RssKib,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentvmRuns {
    pub samples: Vec<AgentvmSample>,
    pub error: Option<String>,
}

/// One QEMU boot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerSample {
    pub spawn_ns: u64,
    /// The client's handshake with the agent completed (over AF_VSOCK).
    pub agent_ready_ns: u64,
    /// The command's exit status arrived.
    pub result_ns: u64,
    /// Sampled while waiting for the agent and after the result.
    pub peak_rss: Option<RssKib>,
}

/// One way of starting QEMU that was tried for the first boot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    pub variant: String,
    pub machine: String,
    /// "booted" or why not.
    pub outcome: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerStatus {
    /// Every boot gave its result.
    Ok,
    /// No variant booted the guest.
    DidNotBoot,
    /// It booted, then a later boot failed.
    Failed,
    /// Not run: no usable QEMU, or an earlier boot already found that no variant boots.
    #[default]
    Unavailable,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerRuns {
    pub status: PeerStatus,
    pub qemu_version: Option<String>,
    pub tried: Vec<Attempt>,
    /// The variant all samples were taken with.
    pub variant: Option<String>,
    pub args: Vec<String>,
    pub samples: Vec<PeerSample>,
    /// Why the status is not `Ok`.
    pub error: Option<String>,
}

/// `agentvm bench guest-runs`: prints [`AgentvmRuns`] as JSON.
pub fn guest_runs_cmd(args: GuestArgs) -> Result<ExitCode, String> {
    let runs = agentvm_runs(&args);
    print_json(&runs, runs.error.as_deref())
}

/// `agentvm bench peer-run`: prints [`PeerRuns`] as JSON.
pub fn peer_run_cmd(args: PeerArgs) -> Result<ExitCode, String> {
    let runs = peer_runs(&args);
    // The peer not booting is a finding, not a failure of this command.
    print_json(&runs, None)
}

fn print_json<T: Serialize>(value: &T, error: Option<&str>) -> Result<ExitCode, String> {
    let json = serde_json::to_string(value).map_err(|e| format!("cannot encode results: {e}"))?;
    println!("{json}");
    match error {
        Some(e) => Err(e.to_string()),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// N × `agentvm run --report-timings` of the command; stops at the first failed run.
pub fn agentvm_runs(args: &GuestArgs) -> AgentvmRuns {
    let mut out = AgentvmRuns::default();
    if let Err(e) = agentvm_runs_into(args, &mut out) {
        out.error = Some(e);
    }
    out
}

fn agentvm_runs_into(args: &GuestArgs, out: &mut AgentvmRuns) -> Result<(), String> {
    let (exe, dir) = super::child::self_and_workdir()?;
    for i in 1..=args.runs {
        let report = dir.path().join(format!("run{i}.json"));
        let stderr_path = dir.path().join(format!("run{i}.stderr"));
        let stderr = File::create(&stderr_path)
            .map_err(|e| format!("cannot create {}: {e}", stderr_path.display()))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("run")
            .arg("--kernel")
            .arg(&args.kernel)
            .arg("--initrd")
            .arg(&args.initrd)
            .arg("--mem-mib")
            .arg(args.mem_mib.to_string())
            .arg("--timeout")
            .arg(args.timeout.to_string())
            .arg("--report-timings")
            .arg(&report)
            .arg("--")
            .args(&args.command)
            .stderr(stderr);
        let watch = Watch {
            limit: Duration::from_secs(args.timeout) + KILL_GRACE,
        };
        let who = which("agentvm", i, args.runs);
        let run = child::watch(cmd, &watch).map_err(|e| format!("{who}: {e}"))?;
        let failure = |what: String| {
            let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            format!("{who}: {what}\n{}", last_lines(&stderr, TAIL_LINES))
        };
        match &run.ended {
            Ended::Exited(status) if status.success() => {}
            Ended::Exited(status) => return Err(failure(format!("agentvm run failed ({status})"))),
            Ended::TimedOut => {
                return Err(failure(format!(
                    "agentvm did not end within {} s",
                    watch.limit.as_secs()
                )))
            }
        }
        let sample = agentvm_sample(&run, &report).map_err(failure)?;
        progress(
            &who,
            sample.spawn_ns,
            sample.agent_ready_ns,
            sample.result_ns,
        );
        out.samples.push(sample);
    }
    Ok(())
}

fn agentvm_sample(run: &Watched, report_path: &Path) -> Result<AgentvmSample, String> {
    let report = read_report(report_path)?;
    let guest = report
        .guest
        .ok_or("the timing report has no guest milestones")?;
    let missing = |what: &str| format!("the timing report has no {what}");
    let sample = AgentvmSample {
        spawn_ns: run.spawn_ns,
        process_start_ns: report.process_start_ns,
        first_kvm_run_ns: report
            .vmm
            .first_kvm_run_ns
            .ok_or_else(|| missing("first KVM_RUN"))?,
        agent_ready_ns: guest
            .agent_ready_ns
            .ok_or_else(|| missing("guest agent ready time"))?,
        result_ns: guest
            .result_ns
            .ok_or_else(|| missing("command result time"))?,
        peak_rss: run.peak_rss,
        rss_before_guest: report.vmm.rss_before_guest,
        rss_end: report.rss_end,
    };
    let order = [
        ("spawn", sample.spawn_ns),
        ("process start", sample.process_start_ns),
        ("first KVM_RUN", sample.first_kvm_run_ns),
        ("agent ready", sample.agent_ready_ns),
        ("command result", sample.result_ns),
    ];
    check_order(&order)?;
    Ok(sample)
}

/// Milestones must not go back in time; if they do, the report is not to be trusted.
pub fn check_order(milestones: &[(&str, u64)]) -> Result<(), String> {
    for pair in milestones.windows(2) {
        let ((a, ta), (b, tb)) = (pair[0], pair[1]);
        if tb < ta {
            return Err(format!(
                "inconsistent timings: {b} ({tb} ns) is before {a} ({ta} ns)"
            ));
        }
    }
    Ok(())
}

/// N × QEMU microvm. The first boot tries the [`VARIANTS`] in order (unless `--variant-file`
/// already names the one that boots); the rest use the one that booted. If none does, the result
/// says so ("did not boot") instead of failing.
pub fn peer_runs(args: &PeerArgs) -> PeerRuns {
    let mut out = PeerRuns {
        qemu_version: qemu_version(&args.qemu, args.lib_dir.as_deref()),
        ..PeerRuns::default()
    };
    if let Err((status, error)) = peer_runs_into(args, &mut out) {
        out.status = status;
        out.error = Some(error);
    } else {
        out.status = PeerStatus::Ok;
    }
    out
}

type PeerFailure = (PeerStatus, String);

fn peer_runs_into(args: &PeerArgs, out: &mut PeerRuns) -> Result<(), PeerFailure> {
    let guest = &args.guest;
    let unavailable = |e: String| (PeerStatus::Unavailable, e);
    if let Some(dir) = &args.vhost_modules {
        vhost_modules::load(dir)
            .map_err(|e| unavailable(format!("cannot load the vhost-vsock modules: {e}")))?;
    }
    let cmdline = peer::cmdline();
    let dir = tempfile::Builder::new()
        .prefix("agentvm-bench-peer-")
        .tempdir()
        .map_err(|e| unavailable(format!("cannot create a temporary directory: {e}")))?;
    let mut chosen = match &args.variant_file {
        Some(file) => read_variant_file(file).map_err(unavailable)?,
        None => None,
    };
    for i in 1..=guest.runs {
        let who = which(PEER_NAME, i, guest.runs);
        let log_path = dir.path().join(format!("qemu{i}.log"));
        let boot = |variant: &Variant| {
            let qemu_args = peer::qemu_args(
                variant,
                args.firmware_dir.as_deref(),
                &guest.kernel,
                &guest.initrd,
                guest.mem_mib,
                &cmdline,
                GUEST_CID,
            );
            let sample = peer_boot(args, &qemu_args, &log_path);
            (qemu_args, sample)
        };
        let sample = match chosen {
            Some(idx) => {
                let (qemu_args, sample) = boot(&VARIANTS[idx]);
                if out.variant.is_none() {
                    out.variant = Some(VARIANTS[idx].name.to_string());
                    out.args = qemu_args;
                }
                sample.map_err(|why| (PeerStatus::Failed, format!("{who}: {why}")))?
            }
            None => {
                let mut booted = None;
                for (idx, variant) in VARIANTS.iter().enumerate() {
                    let (qemu_args, sample) = boot(variant);
                    match sample {
                        Ok(sample) => {
                            out.tried.push(attempt(variant, "booted".into()));
                            out.variant = Some(variant.name.to_string());
                            out.args = qemu_args;
                            booted = Some((idx, sample));
                            break;
                        }
                        Err(why) => {
                            eprintln!(
                                "bench: {PEER_NAME} ({}) did not boot: {}",
                                variant.name,
                                why.lines().next().unwrap_or_default()
                            );
                            out.tried.push(attempt(variant, why));
                        }
                    }
                }
                let found = booted.as_ref().map(|(idx, _)| *idx);
                if let Some(file) = &args.variant_file {
                    write_variant_file(file, found).map_err(unavailable)?;
                }
                let Some((idx, sample)) = booted else {
                    return Err((
                        PeerStatus::DidNotBoot,
                        did_not_boot(&out.tried, guest.timeout),
                    ));
                };
                chosen = Some(idx);
                sample
            }
        };
        progress(
            &who,
            sample.spawn_ns,
            sample.agent_ready_ns,
            sample.result_ns,
        );
        out.samples.push(sample);
    }
    Ok(())
}

fn did_not_boot(tried: &[Attempt], timeout_secs: u64) -> String {
    let lines: Vec<String> = tried
        .iter()
        .map(|a| format!("-M {}: {}", a.machine, a.outcome))
        .collect();
    format!(
        "{PEER_NAME} did not boot with any of {} variants (each limited to {timeout_secs} s):\n{}",
        VARIANTS.len(),
        lines.join("\n")
    )
}

const NO_VARIANT: &str = "none";

/// `Ok(None)`: no earlier boot has tried the variants yet.
fn read_variant_file(file: &Path) -> Result<Option<usize>, String> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
    };
    match text.trim() {
        NO_VARIANT => Err(format!(
            "skipped: an earlier boot found that no variant of {PEER_NAME} boots"
        )),
        t => match t.parse::<usize>() {
            Ok(idx) if idx < VARIANTS.len() => Ok(Some(idx)),
            _ => Err(format!("{} holds {t:?}, not a variant", file.display())),
        },
    }
}

fn write_variant_file(file: &Path, found: Option<usize>) -> Result<(), String> {
    let text = found.map_or(NO_VARIANT.to_string(), |i| i.to_string());
    std::fs::write(file, text).map_err(|e| format!("cannot write {}: {e}", file.display()))
}

fn attempt(variant: &Variant, outcome: String) -> Attempt {
    Attempt {
        variant: variant.name.to_string(),
        machine: variant.machine.to_string(),
        outcome,
    }
}

pub fn qemu_command(qemu: &Path, lib_dir: Option<&Path>) -> Command {
    let mut cmd = Command::new(qemu);
    if let Some(lib) = lib_dir {
        cmd.env("LD_LIBRARY_PATH", lib);
    }
    cmd
}

pub fn qemu_version(qemu: &Path, lib_dir: Option<&Path>) -> Option<String> {
    let mut cmd = qemu_command(qemu, lib_dir);
    cmd.arg("--version");
    let out = child::run_tool(cmd, "qemu --version", Duration::from_secs(60)).ok()?;
    out.stdout.lines().next().map(|l| l.trim().to_string())
}

/// One QEMU boot: spawn → client connected to the agent over AF_VSOCK → the command's exit
/// status; then QEMU is killed.
fn peer_boot(args: &PeerArgs, qemu_args: &[String], log: &Path) -> Result<PeerSample, String> {
    let mut cmd = qemu_command(&args.qemu, args.lib_dir.as_deref());
    cmd.args(qemu_args);
    let transport = Transport::Vsock { cid: GUEST_CID };
    let limit = Duration::from_secs(args.guest.timeout);
    let mut vm = GuestVm::start(cmd, &transport, limit, log)?;
    let spec = ProcessSpec::argv(args.guest.command.iter().cloned());
    let out = vm
        .client
        .exec_output(spec)
        .map_err(|e| format!("the command failed to run in the guest: {e}"))?;
    let result_ns = monotonic_ns();
    vm.sample_rss();
    if !out.success() {
        return Err(format!(
            "the command did not succeed in the guest ({:?}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let sample = PeerSample {
        spawn_ns: vm.spawn_ns,
        agent_ready_ns: vm.connected_ns,
        result_ns,
        peak_rss: vm.peak_rss,
    };
    check_order(&[
        ("spawn", sample.spawn_ns),
        ("agent ready", sample.agent_ready_ns),
        ("command result", sample.result_ns),
    ])?;
    Ok(sample)
}

/// "agentvm run 2/5", or just "agentvm" for a single run.
fn which(who: &str, i: u32, n: u32) -> String {
    if n > 1 {
        format!("{who} run {i}/{n}")
    } else {
        who.to_string()
    }
}

fn progress(who: &str, spawn: u64, ready: u64, result: u64) {
    let ms = |t| span_ms(spawn, t).unwrap_or(f64::NAN);
    eprintln!(
        "bench: {who}: agent ready {:.0} ms, result {:.0} ms after spawn",
        ms(ready),
        ms(result)
    );
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_check_names_the_offender() {
        assert!(check_order(&[("a", 1), ("b", 1), ("c", 5)]).is_ok());
        let err = check_order(&[("a", 1), ("b", 7), ("c", 5)]).unwrap_err();
        assert!(err.contains("c (5 ns) is before b (7 ns)"), "{err}");
    }

    #[test]
    fn last_lines_keeps_the_end() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("", 3), "");
    }

    #[test]
    fn a_peer_that_cannot_start_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let args = PeerArgs {
            qemu: dir.path().join("no-qemu"),
            firmware_dir: None,
            lib_dir: None,
            variant_file: Some(dir.path().join("variant")),
            vhost_modules: None,
            guest: GuestArgs {
                kernel: dir.path().join("vmlinux"),
                initrd: dir.path().join("initrd"),
                runs: 2,
                timeout: 5,
                mem_mib: 256,
                command: vec!["true".into()],
            },
        };
        let out = peer_runs(&args);
        assert_eq!(out.status, PeerStatus::DidNotBoot);
        assert!(out.samples.is_empty());
        assert_eq!(out.tried.len(), VARIANTS.len());
        let err = out.error.unwrap();
        assert!(
            err.contains("did not boot") && err.contains("cannot start"),
            "{err}"
        );

        // The next invocation learns from the first one instead of trying everything again.
        let again = peer_runs(&args);
        assert_eq!(again.status, PeerStatus::Unavailable);
        assert!(again.tried.is_empty());
        assert!(again.error.unwrap().contains("skipped"));
    }

    #[test]
    fn variant_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("v");
        assert_eq!(read_variant_file(&file), Ok(None));
        write_variant_file(&file, Some(1)).unwrap();
        assert_eq!(read_variant_file(&file), Ok(Some(1)));
        std::fs::write(&file, "99").unwrap();
        assert!(read_variant_file(&file).is_err());
    }

    #[test]
    fn single_runs_are_not_numbered() {
        assert_eq!(which("agentvm", 2, 5), "agentvm run 2/5");
        assert_eq!(which("agentvm", 1, 1), "agentvm");
    }
}
