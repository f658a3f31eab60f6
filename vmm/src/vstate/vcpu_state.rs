//! One vCPU's architectural state for a snapshot: read while the vCPU is parked outside KVM_RUN
//! (on its own thread, which owns the fd) and written to a fresh vCPU before it first runs.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// IA32_TSC_DEADLINE: KVM arms the LAPIC timer from it against the current TSC, so it is written
/// after IA32_TSC or a restored deadline may be judged already past (a lost timer interrupt).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// How far a host's TSC frequency may differ from the snapshot's before the restore asks KVM to
/// scale the guest's TSC: KVM's own tolerance (its `tsc_tolerance_ppm`), within which it does not
/// scale either.
const TSC_TOLERANCE_PPM: u64 = 250;
/// KVM_GET_MSRS / KVM_SET_MSRS take at most this many entries per call.
const MSR_BATCH: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vCPU {index}: {what} failed: {source}")]
    Kvm {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: {what}: {reason}")]
    Invalid {
        index: u8,
        what: &'static str,
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The XSAVE area as KVM copied it: 4 KiB, or more with dynamically enabled features
    /// (see [`super::xsave`]).
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// (index, value), TSC_DEADLINE last.
    pub msrs: Vec<(u32, u64)>,
    pub vcpu_events: kvm_vcpu_events,
    /// The guest's TSC frequency in kHz; None where KVM cannot tell (no KVM_CAP_GET_TSC_KHZ, or
    /// an unknown host TSC frequency). A guest kernel calibrates its clock against it once, at
    /// boot, so a restore on a host of another frequency must keep it (TSC scaling) or the
    /// guest's clock runs fast or slow.
    pub tsc_khz: Option<u32>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("index", &self.index)
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

impl VcpuState {
    /// Reads every piece of state. `msr_indices` is KVM's list of MSRs to save
    /// (KVM_GET_MSR_INDEX_LIST); those this vCPU cannot read are left out (KVM lists some that
    /// KVM_GET_MSRS refuses for this guest's CPUID). `xsave_size`: this host's XSAVE area size
    /// ([`super::xsave::host_xsave_size`]).
    pub fn save(
        index: u8,
        fd: &VcpuFd,
        msr_indices: &[u32],
        xsave_size: usize,
    ) -> Result<Self, VcpuStateError> {
        let kvm = |what| {
            move |source| VcpuStateError::Kvm {
                index,
                what,
                source,
            }
        };
        Ok(Self {
            index,
            cpuid: fd
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(kvm("KVM_GET_CPUID2"))?
                .as_slice()
                .to_vec(),
            mp_state: fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: super::xsave::save(fd, xsave_size).map_err(|e| xsave_error(index, e))?,
            xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            debug_regs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            msrs: read_msrs(index, fd, msr_indices)?,
            vcpu_events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            tsc_khz: fd.get_tsc_khz().ok().filter(|&khz| khz > 0),
        })
    }

    /// Writes the state to a vCPU that has not run yet, in the order KVM needs: the TSC frequency
    /// first (the TSC value among the MSRs is in its units), CPUID (it decides which MSRs and
    /// XSAVE features exist), sregs before the LAPIC (the APIC base lives in sregs), MSRs before
    /// the vCPU events. `xsave_size`: this host's XSAVE area size.
    pub fn restore(&self, fd: &VcpuFd, xsave_size: usize) -> Result<(), VcpuStateError> {
        let index = self.index;
        let kvm = |what| {
            move |source| VcpuStateError::Kvm {
                index,
                what,
                source,
            }
        };
        let invalid = |what, reason: String| VcpuStateError::Invalid {
            index,
            what,
            reason,
        };
        self.restore_tsc_khz(fd)?;
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|e| invalid("CPUID", format!("{} entries: {e:?}", self.cpuid.len())))?;
        fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        super::xsave::restore(fd, &self.xsave, xsave_size).map_err(|e| xsave_error(index, e))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        write_msrs(index, fd, &self.msrs)?;
        fd.set_vcpu_events(&self.vcpu_events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// Gives the vCPU the snapshot's TSC frequency when this host's differs beyond KVM's
    /// tolerance; a host that cannot scale the TSC refuses the restore rather than run a guest
    /// whose clock drifts.
    fn restore_tsc_khz(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        let Some(saved) = self.tsc_khz else {
            return Ok(());
        };
        let here = fd.get_tsc_khz().ok();
        if here.is_some_and(|here| tsc_within_tolerance(here, saved)) {
            return Ok(());
        }
        fd.set_tsc_khz(saved).map_err(|e| VcpuStateError::Invalid {
            index: self.index,
            what: "TSC frequency",
            reason: format!(
                "the snapshot's guest TSC runs at {saved} kHz, this host's at {}, and KVM \
                     cannot scale it (KVM_SET_TSC_KHZ: {e}); restore on a host of the same TSC \
                     frequency or one with TSC scaling",
                here.map_or("an unknown frequency".to_string(), |k| format!("{k} kHz"))
            ),
        })
    }
}

fn xsave_error(index: u8, error: super::xsave::XsaveError) -> VcpuStateError {
    match error {
        super::xsave::XsaveError::Kvm { what, source } => VcpuStateError::Kvm {
            index,
            what,
            source,
        },
        super::xsave::XsaveError::Invalid(reason) => VcpuStateError::Invalid {
            index,
            what: "XSAVE",
            reason,
        },
    }
}

fn tsc_within_tolerance(here_khz: u32, saved_khz: u32) -> bool {
    let diff = u64::from(here_khz.abs_diff(saved_khz));
    diff * 1_000_000 <= u64::from(saved_khz) * TSC_TOLERANCE_PPM
}

/// Reads the MSRs of `indices` that this vCPU has. KVM's save list can name MSRs that
/// KVM_GET_MSRS then refuses for this guest's CPUID (PMU counters with the PMU hidden, MCE banks):
/// the ioctl stops at the first one it cannot read and returns how many it did, so that one is
/// skipped and the read resumes after it.
fn read_msrs(index: u8, fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| VcpuStateError::Invalid {
            index,
            what: "MSR list",
            reason: format!("{e:?}"),
        })?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(|source| VcpuStateError::Kvm {
                index,
                what: "KVM_GET_MSRS",
                source,
            })?;
        out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        // `read < batch.len()`: entry `read` is unreadable; skip it.
        let consumed = if read < batch.len() { read + 1 } else { read };
        rest = &rest[consumed..];
    }
    // TSC_DEADLINE after TSC, whatever order KVM listed them in.
    out.sort_by_key(|&(msr, _)| msr == MSR_IA32_TSC_DEADLINE);
    Ok(out)
}

fn write_msrs(index: u8, fd: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), VcpuStateError> {
    for batch in msrs.chunks(MSR_BATCH) {
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let kvm_msrs = Msrs::from_entries(&entries).map_err(|e| VcpuStateError::Invalid {
            index,
            what: "MSR list",
            reason: format!("{e:?}"),
        })?;
        let written = fd
            .set_msrs(&kvm_msrs)
            .map_err(|source| VcpuStateError::Kvm {
                index,
                what: "KVM_SET_MSRS",
                source,
            })?;
        if written < batch.len() {
            return Err(VcpuStateError::Invalid {
                index,
                what: "KVM_SET_MSRS",
                reason: format!(
                    "KVM refused MSR {:#x} (wrote {written} of {})",
                    batch[written].0,
                    batch.len()
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::vm::Vm;
    use crate::vstate::vm_state::KvmVmState;
    use devices::GuestMemoryMmap;
    use vm_memory::GuestAddress;

    const MSR_IA32_TSC: u32 = 0x10;

    /// A VM with 64 MiB, or None (with a message) without /dev/kvm; with CI=true a missing
    /// /dev/kvm fails the test instead.
    fn kvm_vm(test: &str) -> Option<(Vm, GuestMemoryMmap)> {
        let vm = match Vm::new() {
            Ok(vm) => vm,
            Err(e) => {
                if std::env::var("CI").as_deref() == Ok("true") {
                    panic!("{test}: KVM is required when CI=true: {e}");
                }
                eprintln!("skipping {test}: {e}");
                return None;
            }
        };
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        vm.register_memory(&mem, false).unwrap();
        Some((vm, mem))
    }

    /// [`kvm_vm`] with vCPU 0 configured for boot.
    fn vm_with_vcpu(test: &str) -> Option<(Vm, GuestMemoryMmap, VcpuFd)> {
        let (vm, mem) = kvm_vm(test)?;
        let fd = vm.fd().create_vcpu(0).unwrap();
        arch::configure_vcpu(
            vm.kvm(),
            &fd,
            &mem,
            0,
            1,
            GuestAddress(0x100_0000),
            GuestAddress(arch::layout::ZERO_PAGE_START),
        )
        .unwrap();
        Some((vm, mem, fd))
    }

    #[test]
    fn vcpu_and_vm_state_come_back_in_a_fresh_vm() {
        let Some((vm, _mem, fd)) = vm_with_vcpu("vcpu_and_vm_state_come_back_in_a_fresh_vm") else {
            return;
        };
        let mut regs = fd.get_regs().unwrap();
        regs.rax = 0x1234_5678_9abc_def0;
        regs.r15 = 42;
        fd.set_regs(&regs).unwrap();
        let saved = VcpuState::save(0, &fd, &vm.msrs_to_save(), vm.xsave_size()).unwrap();
        assert!(
            saved.msrs.iter().any(|&(msr, _)| msr == MSR_IA32_TSC),
            "the TSC is among the saved MSRs"
        );
        let host_tsc_khz = saved.tsc_khz;
        let vm_state = KvmVmState::save(vm.fd()).unwrap();
        // Through the state file's encoding, as a snapshot carries them.
        let path = std::path::Path::new("vcpu.snap");
        let bytes = snapshot::state_file::encode(&(&saved, &vm_state)).unwrap();
        let (saved, vm_state): (VcpuState, KvmVmState) =
            snapshot::state_file::decode(path, &bytes).unwrap();

        let Some((vm2, _mem2)) = kvm_vm("vcpu_and_vm_state_come_back_in_a_fresh_vm") else {
            return;
        };
        let fd2 = vm2.fd().create_vcpu(0).unwrap();
        vm_state.restore(vm2.fd()).unwrap();
        saved.restore(&fd2, vm2.xsave_size()).unwrap();
        let again = VcpuState::save(0, &fd2, &vm2.msrs_to_save(), vm2.xsave_size()).unwrap();
        assert_eq!(again.tsc_khz, host_tsc_khz);
        assert_eq!(again.regs.rax, 0x1234_5678_9abc_def0);
        assert_eq!(again.regs.r15, 42);
        assert_eq!(again.regs.rip, saved.regs.rip);
        assert_eq!(
            (
                again.sregs.cr0,
                again.sregs.cr3,
                again.sregs.cr4,
                again.sregs.efer
            ),
            (
                saved.sregs.cr0,
                saved.sregs.cr3,
                saved.sregs.cr4,
                saved.sregs.efer
            )
        );
        assert_eq!(again.lapic.regs[..], saved.lapic.regs[..]);
        assert_eq!(again.cpuid.len(), saved.cpuid.len());
        let indices = |s: &VcpuState| s.msrs.iter().map(|&(i, _)| i).collect::<Vec<_>>();
        assert_eq!(indices(&again), indices(&saved));
        for (&(msr, value), &(_, before)) in again.msrs.iter().zip(&saved.msrs) {
            if msr != MSR_IA32_TSC {
                assert_eq!(value, before, "MSR {msr:#x}");
            }
        }
    }

    #[test]
    fn tsc_frequencies_within_kvms_tolerance_count_as_equal() {
        assert!(tsc_within_tolerance(2_000_000, 2_000_000));
        assert!(tsc_within_tolerance(2_000_500, 2_000_000), "250 ppm");
        assert!(!tsc_within_tolerance(2_000_501, 2_000_000));
        assert!(!tsc_within_tolerance(1_000_000, 2_000_000));
    }

    /// A snapshot from a host whose TSC runs at another frequency: the restored vCPU either runs
    /// at the snapshot's frequency (KVM scales the TSC) or the restore is refused by name.
    #[test]
    fn a_snapshot_of_another_tsc_frequency_is_scaled_or_refused() {
        let test = "a_snapshot_of_another_tsc_frequency_is_scaled_or_refused";
        let Some((vm, _mem, fd)) = vm_with_vcpu(test) else {
            return;
        };
        let mut saved = VcpuState::save(0, &fd, &vm.msrs_to_save(), vm.xsave_size()).unwrap();
        let Some(khz) = saved.tsc_khz else {
            eprintln!("skipping {test}: this KVM does not report the TSC frequency");
            return;
        };
        saved.tsc_khz = Some(khz / 2);
        let Some((vm2, _mem2)) = kvm_vm(test) else {
            return;
        };
        let fd2 = vm2.fd().create_vcpu(0).unwrap();
        match saved.restore(&fd2, vm2.xsave_size()) {
            Ok(()) => assert_eq!(fd2.get_tsc_khz().unwrap(), khz / 2),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("TSC frequency"), "{e}");
                assert!(e.contains(&format!("{} kHz", khz / 2)), "{e}");
            }
        }
    }

    #[test]
    fn a_state_with_a_foreign_msr_is_refused_by_name() {
        let Some((vm, _mem, fd)) = vm_with_vcpu("a_state_with_a_foreign_msr_is_refused_by_name")
        else {
            return;
        };
        let mut saved = VcpuState::save(0, &fd, &vm.msrs_to_save(), vm.xsave_size()).unwrap();
        // An MSR index no CPU has.
        saved.msrs.push((0x4000_ffff, 1));
        let err = saved.restore(&fd, vm.xsave_size()).unwrap_err().to_string();
        assert!(
            err.contains("0x4000ffff") || err.contains("KVM_SET_MSRS"),
            "{err}"
        );
    }
}
