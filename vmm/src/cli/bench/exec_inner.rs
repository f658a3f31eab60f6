//! `agentvm bench exec-runs` (hidden): boots one warm guest where Linux guests can run (inside the
//! nested test host, or directly), agentvm or with `--qemu` the QEMU microvm peer, takes the
//! [`exec_measure`](super::exec_measure) figures on it and prints them as JSON ([`ExecRuns`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use super::cpu_time::{cpu_time_of, vhost_workers};
use super::exec_measure::{self, ExecOptions, ExecSamples};
use super::guest_vm::{agentvm_command, GuestVm, Transport};
use super::inner::{qemu_command, qemu_version, Attempt, PeerStatus};
use super::peer::{self, GUEST_CID, PEER_NAME, VARIANTS};
use super::stats::span_ms;
use super::vhost_modules;

/// agentvm stops its VM after this long whatever happens (the measurements take minutes at most).
const VM_LIMIT_SECS: u64 = 3600;

#[derive(Args, Debug, Clone)]
pub struct ExecRunArgs {
    /// Guest kernel (ELF vmlinux).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Guest initramfs with the agent as /init.
    #[arg(long)]
    pub initrd: PathBuf,
    #[command(flatten)]
    pub sizes: ExecSizes,
    /// Guest memory in MiB.
    #[arg(long = "mem-mib", default_value_t = 256)]
    pub mem_mib: u64,
    /// How long the guest agent may take to answer after the VMM started, in seconds.
    #[arg(long, default_value_t = 180, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub boot_timeout: u64,
    /// Measure the QEMU microvm peer with this qemu-system-x86_64 instead of agentvm.
    #[arg(long)]
    pub qemu: Option<PathBuf>,
    /// QEMU's firmware directory (`-L`).
    #[arg(long, requires = "qemu")]
    pub firmware_dir: Option<PathBuf>,
    /// QEMU's shared libraries (LD_LIBRARY_PATH).
    #[arg(long, requires = "qemu")]
    pub lib_dir: Option<PathBuf>,
    /// Load the vhost-vsock modules (`<name>.ko`) from this directory first.
    #[arg(long, requires = "qemu", value_name = "DIR")]
    pub vhost_modules: Option<PathBuf>,
}

/// How much to measure; shared by `bench exec` and its helper.
#[derive(Args, Debug, Clone, Copy)]
pub struct ExecSizes {
    /// Exec round trips (and as many ping round trips) to measure.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub runs: u32,
    /// MiB of output per streaming run.
    #[arg(long, value_name = "M", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub stream_mib: u32,
    /// Streaming runs.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub stream_runs: u32,
}

impl ExecSizes {
    pub fn options(self) -> ExecOptions {
        ExecOptions {
            runs: self.runs,
            stream_mib: self.stream_mib,
            stream_runs: self.stream_runs,
        }
    }
}

/// One VMM's results.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecRuns {
    /// "agentvm" or the peer's name.
    pub vmm: String,
    /// For the peer: whether it could be measured (agentvm: always `Ok` unless `error`).
    pub status: PeerStatus,
    /// Spawn of the VMM to the client's completed handshake with the agent (this one boot).
    pub boot_to_agent_ms: Option<f64>,
    pub samples: Option<ExecSamples>,
    pub qemu_version: Option<String>,
    pub variant: Option<String>,
    pub args: Vec<String>,
    pub tried: Vec<Attempt>,
    pub error: Option<String>,
}

pub fn exec_runs_cmd(args: ExecRunArgs) -> Result<ExitCode, String> {
    let runs = exec_runs(&args);
    let json = serde_json::to_string(&runs).map_err(|e| format!("cannot encode results: {e}"))?;
    println!("{json}");
    match (&runs.error, args.qemu.is_some()) {
        // The peer failing is a finding, not a failure of this command.
        (Some(e), false) => Err(e.clone()),
        _ => Ok(ExitCode::SUCCESS),
    }
}

pub fn exec_runs(args: &ExecRunArgs) -> ExecRuns {
    match &args.qemu {
        None => agentvm_exec_runs(args),
        Some(qemu) => peer_exec_runs(args, qemu),
    }
}

fn agentvm_exec_runs(args: &ExecRunArgs) -> ExecRuns {
    let mut out = ExecRuns {
        vmm: "agentvm".into(),
        ..ExecRuns::default()
    };
    let result = (|| -> Result<(), String> {
        let (exe, dir) = super::child::self_and_workdir()?;
        let uds = dir.path().join("vsock.sock");
        let cmd = agentvm_command(
            &exe,
            &args.kernel,
            &args.initrd,
            args.mem_mib,
            &uds,
            VM_LIMIT_SECS,
        );
        eprintln!("bench: booting agentvm");
        let vm = GuestVm::start(
            cmd,
            &Transport::HybridUds(uds),
            Duration::from_secs(args.boot_timeout),
            &dir.path().join("agentvm.log"),
        )?;
        out.boot_to_agent_ms = span_ms(vm.spawn_ns, vm.connected_ns);
        let pid = vm.pid;
        out.samples = Some(measure_on(&vm, &|| cpu_time_of(pid, &[]), args, "agentvm")?);
        Ok(())
    })();
    match result {
        Ok(()) => out.status = PeerStatus::Ok,
        Err(e) => {
            out.status = PeerStatus::Failed;
            out.error = Some(format!("agentvm: {e}"));
        }
    }
    out
}

fn measure_on(
    vm: &GuestVm,
    cpu: exec_measure::CpuReader<'_>,
    args: &ExecRunArgs,
    who: &str,
) -> Result<ExecSamples, String> {
    let opts = args.sizes.options();
    eprintln!(
        "bench: {who}: {} exec + {} ping round trips, {} x {} MiB streamed",
        opts.runs, opts.runs, opts.stream_runs, opts.stream_mib
    );
    exec_measure::measure(&vm.client, cpu, &opts)
}

fn peer_exec_runs(args: &ExecRunArgs, qemu: &Path) -> ExecRuns {
    let lib_dir = args.lib_dir.as_deref();
    let mut out = ExecRuns {
        vmm: PEER_NAME.into(),
        qemu_version: qemu_version(qemu, lib_dir),
        ..ExecRuns::default()
    };
    if let Some(dir) = &args.vhost_modules {
        if let Err(e) = vhost_modules::load(dir) {
            out.status = PeerStatus::Unavailable;
            out.error = Some(format!("cannot load the vhost-vsock modules: {e}"));
            return out;
        }
    }
    let dir = match tempfile::Builder::new()
        .prefix("agentvm-bench-peer-")
        .tempdir()
    {
        Ok(d) => d,
        Err(e) => {
            out.status = PeerStatus::Unavailable;
            out.error = Some(format!("cannot create a temporary directory: {e}"));
            return out;
        }
    };
    let cmdline = peer::cmdline();
    let mut booted = None;
    for (idx, variant) in VARIANTS.iter().enumerate() {
        let qemu_args = peer::qemu_args(
            variant,
            args.firmware_dir.as_deref(),
            &args.kernel,
            &args.initrd,
            args.mem_mib,
            &cmdline,
            GUEST_CID,
        );
        let mut cmd = qemu_command(qemu, lib_dir);
        cmd.args(&qemu_args);
        eprintln!("bench: booting {PEER_NAME} ({})", variant.name);
        let log = dir.path().join(format!("qemu{idx}.log"));
        let attempt = |outcome: String| Attempt {
            variant: variant.name.to_string(),
            machine: variant.machine.to_string(),
            outcome,
        };
        match GuestVm::start(
            cmd,
            &Transport::Vsock { cid: GUEST_CID },
            Duration::from_secs(args.boot_timeout),
            &log,
        ) {
            Ok(vm) => {
                out.tried.push(attempt("booted".into()));
                out.variant = Some(variant.name.to_string());
                out.args = qemu_args;
                booted = Some(vm);
                break;
            }
            Err(why) => {
                eprintln!(
                    "bench: {PEER_NAME} ({}) did not come up: {}",
                    variant.name,
                    why.lines().next().unwrap_or_default()
                );
                out.tried.push(attempt(why));
            }
        }
    }
    let Some(vm) = booted else {
        out.status = PeerStatus::DidNotBoot;
        out.error = Some(format!(
            "{PEER_NAME} did not come up with any of {} variants (each limited to {} s):\n{}",
            VARIANTS.len(),
            args.boot_timeout,
            out.tried
                .iter()
                .map(|a| format!("-M {}: {}", a.machine, a.outcome))
                .collect::<Vec<_>>()
                .join("\n")
        ));
        return out;
    };
    out.boot_to_agent_ms = span_ms(vm.spawn_ns, vm.connected_ns);
    // Before Linux 6.4 the vhost worker is a kernel thread of its own, not one of QEMU's; it
    // exists once the guest driver started the device, which it has by now.
    let helpers = vhost_workers(vm.pid);
    let pid = vm.pid;
    match measure_on(&vm, &|| cpu_time_of(pid, &helpers), args, PEER_NAME) {
        Ok(samples) => {
            out.samples = Some(samples);
            out.status = PeerStatus::Ok;
        }
        Err(e) => {
            out.status = PeerStatus::Failed;
            out.error = Some(format!("{PEER_NAME}: {e}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(qemu: Option<PathBuf>) -> ExecRunArgs {
        ExecRunArgs {
            kernel: "/nonexistent/vmlinux".into(),
            initrd: "/nonexistent/initrd".into(),
            sizes: ExecSizes {
                runs: 2,
                stream_mib: 1,
                stream_runs: 1,
            },
            mem_mib: 256,
            boot_timeout: 5,
            qemu,
            firmware_dir: None,
            lib_dir: None,
            vhost_modules: None,
        }
    }

    #[test]
    fn a_peer_that_cannot_start_says_why_for_every_variant() {
        let out = exec_runs(&args(Some("/nonexistent/qemu-system-x86_64".into())));
        assert_eq!(out.status, PeerStatus::DidNotBoot);
        assert_eq!(out.vmm, PEER_NAME);
        assert_eq!(out.tried.len(), VARIANTS.len());
        assert!(out.samples.is_none());
        let err = out.error.unwrap();
        assert!(
            err.contains("did not come up") && err.contains("cannot start"),
            "{err}"
        );
    }

    #[test]
    fn missing_vhost_modules_make_the_peer_unavailable() {
        let mut a = args(Some("/nonexistent/qemu".into()));
        a.vhost_modules = Some("/nonexistent/modules".into());
        let out = exec_runs(&a);
        // Either this kernel already has them all (then QEMU fails to start), or insmod fails.
        match out.status {
            PeerStatus::Unavailable => {
                assert!(out.error.unwrap().contains("vhost-vsock modules"))
            }
            PeerStatus::DidNotBoot => assert!(out.tried.len() == VARIANTS.len()),
            other => panic!("unexpected status {other:?}"),
        }
    }
}
