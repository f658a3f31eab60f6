//! One nested-test-host run of agentvm's scenarios and, where asked for, the QEMU microvm peer's,
//! as `bench boot` and `bench exec` both need it. L1 carries this binary and, for the peer, QEMU
//! and the vhost-vsock modules. A peer that wedges L1 takes everything L1 measured with it, and
//! agentvm's figures are the point of the benchmark: they are measured again in a fresh L1.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm::artefacts::Artefacts;
use vmm::nested::{NestedError, NestedHost, NestedInputs, NestedRun, Scenario};

use super::peer::PEER_NAME;
use super::{qemu_files, vhost_modules};

/// L1 holds its initramfs (~200 MiB with QEMU) and one guest at a time.
const L1_MEM_MIB: u32 = 2048;
/// How many of L1's last console lines a wedged peer's report keeps.
const HANG_TAIL_LINES: usize = 12;

/// A peer scenario after which L1 stopped responding.
pub struct PeerHang {
    pub name: String,
    pub waited: Duration,
    /// L1's last console lines, oldest first.
    pub tail: String,
}

pub struct NestedOutcome {
    pub run: NestedRun,
    /// Why the peer could not be carried into L1; its scenarios were not run.
    pub peer_setup_error: Option<String>,
    /// Set when a peer scenario wedged L1; `run` is then agentvm's second, peer-less L1.
    pub peer_hang: Option<PeerHang>,
}

/// Boots L1 once with `agentvm` and, when `peer` is given and QEMU can be carried in, the peer
/// scenarios after them. `qemu` runs L1 and is also what the peer gets. `l1_cpus` overrides
/// L1's CPU count (the nested host's default when `None`).
pub fn run_nested(
    artefacts: &Artefacts,
    qemu: &Path,
    guest_mem_mib: u64,
    l1_cpus: Option<u32>,
    agentvm: &[Scenario],
    peer: Option<Vec<Scenario>>,
) -> Result<NestedOutcome, String> {
    let agentvm_bin = std::env::current_exe()
        .map_err(|e| format!("cannot find the agentvm binary to copy into the nested host: {e}"))?;
    let mut host = NestedHost::new(NestedInputs {
        l1_kernel: artefacts.vmlinuz.clone(),
        pkg_dir: artefacts.pkg_dir.clone(),
        busybox: artefacts.busybox.clone(),
        agentvm: agentvm_bin,
        l2_kernel: artefacts.kernel.clone(),
        l2_initrd: artefacts.initrd.clone(),
    });
    host.qemu = Some(qemu.to_path_buf());
    host.install_qemu = false;
    host.l1_mem_mib = L1_MEM_MIB.max(guest_mem_mib as u32 + 1024);
    if let Some(cpus) = l1_cpus {
        host.l1_cpus = cpus;
    }

    let mut scenarios = agentvm.to_vec();
    let mut peer_setup_error = None;
    if let Some(peer) = peer {
        match peer_files(qemu, &artefacts.pkg_dir) {
            Ok(files) => {
                host.extra_files = files;
                scenarios.extend(peer);
            }
            Err(e) => {
                peer_setup_error = Some(format!(
                    "cannot carry QEMU and the vhost-vsock modules into the nested host: {e}"
                ))
            }
        }
    }

    let mut peer_hang = None;
    let run = match host.run(&scenarios) {
        Ok(run) => run,
        Err(
            NestedError::ScenarioStuck { name, waited, tail }
            | NestedError::L1Wedged {
                name,
                silent: waited,
                tail,
                ..
            },
        ) if name.starts_with(PEER_NAME) => {
            eprintln!(
                "bench: the nested host stopped responding while '{name}' ran; booting it again \
                 for agentvm alone"
            );
            let last: Vec<&str> = tail.lines().rev().take(HANG_TAIL_LINES).collect();
            peer_hang = Some(PeerHang {
                name,
                waited,
                tail: last.into_iter().rev().collect::<Vec<_>>().join("\n"),
            });
            host.extra_files.clear();
            host.run(agentvm)
                .map_err(|e| format!("the nested test host failed: {e}"))?
        }
        // A wedged L1 (QEMU TCG with nested SVM froze, timers and all) is a fault of this test
        // host, not of what ran in it: the scenarios get one fresh L1, as in the tests.
        Err(e) if e.is_l1_wedged() => {
            eprintln!(
                "bench: NOTE: the nested test host wedged; running the scenarios again in a \
                 fresh L1 (once). What the wedge looked like:\n{e}"
            );
            host.run(&scenarios)
                .map_err(|e| format!("the nested test host failed (a second time): {e}"))?
        }
        Err(e) => return Err(format!("the nested test host failed: {e}")),
    };
    Ok(NestedOutcome {
        run,
        peer_setup_error,
        peer_hang,
    })
}

/// What the peer needs in L1: QEMU (binary, libraries, firmware) and the vhost-vsock modules.
fn peer_files(qemu: &Path, pkg_dir: &Path) -> Result<Vec<(PathBuf, String)>, String> {
    let mut files = qemu_files::bundle(qemu)?;
    files.extend(vhost_modules::files_for_l1(pkg_dir)?);
    Ok(files)
}
