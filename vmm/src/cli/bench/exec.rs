//! `agentvm bench exec`: on a warm VM (booted once, client connected, warmed up), median and p99
//! of the exec round trip of `true`, of the protocol round trip (Ping), of streamed output
//! throughput, and the VMM's host CPU time per exec and per MiB streamed; for agentvm and, side
//! by side, QEMU microvm with vhost-vsock driven by the same client over AF_VSOCK.
//!
//! Where this host's KVM cannot run Linux, both are measured inside the nested test host (one L1
//! boot, one scenario per VMM) by the hidden `bench exec-runs` helper of this same binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use vmm::artefacts::Artefacts;
use vmm::nested::Scenario;

use super::exec_inner::{self, ExecRunArgs, ExecRuns, ExecSizes};
use super::exec_report;
use super::guest_bound::{parse_result, DIRECT_LABEL, NESTED_LABEL};
use super::inner::PeerStatus;
use super::local::GUEST_MEM_MIB;
use super::machine::MachineInfo;
use super::nested_bench::run_nested;
use super::peer::PEER_NAME;
use super::qemu_files::{self, L1_QEMU, L1_QEMU_LIB, L1_QEMU_SHARE};
use super::vhost_modules;

/// A scenario's time limit beyond the boot: helper start-up, warm-up, JSON output.
const SCENARIO_SLACK: Duration = Duration::from_secs(300);
/// Generous bounds for one round trip and one streamed MiB under TCG (where a round trip takes
/// ~0.3 s and a MiB ~1 s); they only bound how long a wedged L1 can hold the benchmark, never
/// what is measured.
const PER_ROUND_TRIP_BOUND: Duration = Duration::from_secs(1);
const PER_MIB_BOUND: Duration = Duration::from_secs(3);

#[derive(Args)]
pub struct ExecArgs {
    #[command(flatten)]
    sizes: ExecSizes,
    /// Print a JSON document instead of the table.
    #[arg(long)]
    json: bool,
    /// Skip the QEMU microvm peer.
    #[arg(long)]
    no_peer: bool,
    /// Also write the JSON document to FILE.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// How long each VM's guest agent may take to answer after its VMM started, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 180,
          value_parser = clap::value_parser!(u64).range(10..=3600))]
    boot_timeout: u64,
}

/// What the two VMMs gave, and where.
pub struct ExecResults {
    pub measured_on: &'static str,
    pub agentvm: ExecRuns,
    /// `None` when the peer was not asked for.
    pub peer: Option<ExecRuns>,
}

pub fn exec(args: ExecArgs) -> Result<ExitCode, String> {
    if let Some(out) = &args.out {
        super::check_writable(out)?;
    }
    vmm::host::check_kvm_access().map_err(|e| e.to_string())?;
    eprintln!("bench: preparing the default guest kernel and initramfs");
    let artefacts = vmm::artefacts::prepare_default().map_err(|e| e.to_string())?;
    let machine = MachineInfo::read();
    let helper = ExecRunArgs {
        kernel: artefacts.kernel.clone(),
        initrd: artefacts.initrd.clone(),
        sizes: args.sizes,
        mem_mib: GUEST_MEM_MIB,
        boot_timeout: args.boot_timeout,
        qemu: None,
        firmware_dir: None,
        lib_dir: None,
        vhost_modules: None,
    };
    let results = if vmm::host::can_run_linux() {
        eprintln!("bench: this host's KVM runs Linux guests: measuring here directly");
        measure_direct(&helper, !args.no_peer)
    } else {
        eprintln!("bench: measuring in the {NESTED_LABEL}; this takes minutes");
        measure_nested(&artefacts, &helper, !args.no_peer)
    };
    let doc = exec_report::document(&results, &args.sizes, machine, &artefacts);
    super::emit(&doc, args.json, args.out.as_deref())
}

fn measure_direct(helper: &ExecRunArgs, with_peer: bool) -> ExecResults {
    let agentvm = exec_inner::exec_runs(helper);
    let peer = with_peer.then(|| match qemu_files::locate_qemu() {
        Ok(qemu) => exec_inner::exec_runs(&ExecRunArgs {
            qemu: Some(qemu),
            ..helper.clone()
        }),
        Err(e) => peer_missing(PeerStatus::Unavailable, e),
    });
    ExecResults {
        measured_on: DIRECT_LABEL,
        agentvm,
        peer,
    }
}

fn peer_missing(status: PeerStatus, why: String) -> ExecRuns {
    ExecRuns {
        vmm: PEER_NAME.into(),
        status,
        error: Some(why),
        ..ExecRuns::default()
    }
}

fn agentvm_missing(why: String) -> ExecRuns {
    ExecRuns {
        vmm: "agentvm".into(),
        status: PeerStatus::Failed,
        error: Some(why),
        ..ExecRuns::default()
    }
}

fn measure_nested(artefacts: &Artefacts, helper: &ExecRunArgs, with_peer: bool) -> ExecResults {
    let failed = |why: String| ExecResults {
        measured_on: NESTED_LABEL,
        agentvm: agentvm_missing(why),
        peer: None,
    };
    // The nested host runs on QEMU too; installing it here serves both.
    let qemu = match qemu_files::locate_qemu() {
        Ok(q) => q,
        Err(e) => return failed(format!("the nested test host needs QEMU: {e}")),
    };
    let peer = with_peer.then(|| {
        let extra = format!(
            "--qemu {L1_QEMU} --firmware-dir {L1_QEMU_SHARE} --lib-dir {L1_QEMU_LIB} \
             --vhost-modules {} ",
            vhost_modules::L1_DIR
        );
        vec![scenario(&format!("{PEER_NAME}-exec"), &extra, helper)]
    });
    let agentvm_scenario = scenario("agentvm-exec", "", helper);
    let outcome = match run_nested(
        artefacts,
        &qemu,
        helper.mem_mib,
        None,
        &[agentvm_scenario],
        peer,
    ) {
        Ok(outcome) => outcome,
        Err(e) => return failed(e),
    };
    let run = outcome.run;
    let peer_hang = outcome.peer_hang.map(|hang| {
        peer_missing(
            PeerStatus::Failed,
            format!(
                "'{}' wedged the nested test host (no report within {} s); L1 was restarted for \
                 agentvm alone\n{}",
                hang.name,
                hang.waited.as_secs(),
                hang.tail
            ),
        )
    });
    let mut agentvm = None;
    let mut peer = None;
    for r in &run.results {
        if r.name.starts_with(PEER_NAME) {
            peer = Some(
                parse_result::<ExecRuns>(r).unwrap_or_else(|e| peer_missing(PeerStatus::Failed, e)),
            );
        } else {
            agentvm = Some(parse_result::<ExecRuns>(r).unwrap_or_else(agentvm_missing));
        }
    }
    let peer = if !with_peer {
        None
    } else if let Some(e) = outcome.peer_setup_error {
        Some(peer_missing(PeerStatus::Unavailable, e))
    } else {
        peer_hang.or(peer).or_else(|| {
            Some(peer_missing(
                PeerStatus::Failed,
                "the nested host returned no result for the peer".into(),
            ))
        })
    };
    ExecResults {
        measured_on: NESTED_LABEL,
        agentvm: agentvm.unwrap_or_else(|| {
            agentvm_missing("the nested host returned no agentvm results".into())
        }),
        peer,
    }
}

/// The scenario script: the hidden helper of this same binary, on the L2 files.
fn scenario(name: &str, extra: &str, helper: &ExecRunArgs) -> Scenario {
    let s = &helper.sizes;
    let script = format!(
        "agentvm bench exec-runs {extra}--kernel \"$AGENTVM_L2_KERNEL\" --initrd \
         \"$AGENTVM_L2_INITRD\" --runs {} --stream-mib {} --stream-runs {} --mem-mib {} \
         --boot-timeout {}",
        s.runs, s.stream_mib, s.stream_runs, helper.mem_mib, helper.boot_timeout
    );
    Scenario::new(name, script, scenario_limit(helper))
}

fn scenario_limit(helper: &ExecRunArgs) -> Duration {
    let s = &helper.sizes;
    // A peer may try every variant before one comes up.
    let boots = super::peer::VARIANTS.len() as u32;
    Duration::from_secs(helper.boot_timeout) * boots
        + PER_ROUND_TRIP_BOUND * (2 * s.runs)
        + PER_MIB_BOUND * (s.stream_mib * (s.stream_runs + 1))
        + SCENARIO_SLACK
}

#[cfg(test)]
mod tests {
    use super::*;

    fn helper() -> ExecRunArgs {
        ExecRunArgs {
            kernel: "/k".into(),
            initrd: "/i".into(),
            sizes: ExecSizes {
                runs: 200,
                stream_mib: 256,
                stream_runs: 3,
            },
            mem_mib: 256,
            boot_timeout: 180,
            qemu: None,
            firmware_dir: None,
            lib_dir: None,
            vhost_modules: None,
        }
    }

    #[test]
    fn the_scenario_runs_the_helper_on_the_l2_files() {
        let s = scenario("agentvm-exec", "", &helper());
        assert_eq!(s.name, "agentvm-exec");
        assert_eq!(
            s.script,
            "agentvm bench exec-runs --kernel \"$AGENTVM_L2_KERNEL\" --initrd \
             \"$AGENTVM_L2_INITRD\" --runs 200 --stream-mib 256 --stream-runs 3 --mem-mib 256 \
             --boot-timeout 180"
        );
        let p = scenario("qemu-microvm-exec", "--qemu /q ", &helper());
        assert!(p
            .script
            .starts_with("agentvm bench exec-runs --qemu /q --kernel"));
    }

    #[test]
    fn the_scenario_limit_grows_with_the_work() {
        let base = scenario_limit(&helper());
        let mut more = helper();
        more.sizes.stream_mib = 512;
        assert!(scenario_limit(&more) > base);
        more.sizes.runs = 1000;
        assert!(scenario_limit(&more) > base);
        assert!(base >= Duration::from_secs(3 * 180));
    }

    #[test]
    fn missing_parts_say_why() {
        let p = peer_missing(PeerStatus::Unavailable, "no QEMU".into());
        assert_eq!(
            (p.vmm.as_str(), p.status),
            (PEER_NAME, PeerStatus::Unavailable)
        );
        let a = agentvm_missing("L1 did not boot".into());
        assert_eq!(a.status, PeerStatus::Failed);
        assert_eq!(a.error.as_deref(), Some("L1 did not boot"));
    }
}
