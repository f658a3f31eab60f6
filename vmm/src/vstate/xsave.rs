//! A vCPU's XSAVE area (FPU, SSE, AVX and later register state) for snapshots. KVM_GET_XSAVE
//! copies a fixed 4 KiB; features a process enables dynamically (AMX tile data, through
//! `arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)`) make the area larger, and KVM then reports the size
//! through KVM_CAP_XSAVE2 and copies the whole area with KVM_GET_XSAVE2 (Linux 5.17+). Both the
//! save and the restore size their buffer by what this host's KVM reports, because KVM copies
//! that many bytes whatever the caller allocated.

use std::mem::size_of;

use kvm_bindings::{kvm_xsave, Xsave};
use kvm_ioctls::{Cap, VcpuFd, VmFd};

/// The size of the classic area: KVM_GET_XSAVE's, and KVM_CAP_XSAVE2's minimum.
pub const LEGACY_XSAVE_BYTES: usize = size_of::<kvm_xsave>();
const WORD: usize = size_of::<u32>();

#[derive(Debug, thiserror::Error)]
pub enum XsaveError {
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// How many bytes this host's KVM copies for a vCPU's XSAVE area: KVM_CAP_XSAVE2's answer, or
/// the classic 4 KiB when KVM predates it (the answer is 0) or nothing larger is enabled.
pub fn host_xsave_size(vm: &VmFd) -> usize {
    usize::try_from(vm.check_extension_int(Cap::Xsave2))
        .unwrap_or(0)
        .max(LEGACY_XSAVE_BYTES)
}

/// The vCPU's XSAVE area as 32-bit words, `host_size` bytes (from [`host_xsave_size`]).
pub fn save(fd: &VcpuFd, host_size: usize) -> Result<Vec<u32>, XsaveError> {
    if host_size <= LEGACY_XSAVE_BYTES {
        let xsave = fd.get_xsave().map_err(|source| XsaveError::Kvm {
            what: "KVM_GET_XSAVE",
            source,
        })?;
        return Ok(xsave.region.to_vec());
    }
    let mut xsave = large_area(host_size)?;
    // SAFETY: `xsave` holds `host_size` bytes, what KVM_CAP_XSAVE2 said KVM copies out.
    unsafe { fd.get_xsave2(&mut xsave) }.map_err(|source| XsaveError::Kvm {
        what: "KVM_GET_XSAVE2",
        source,
    })?;
    let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(xsave.as_slice());
    Ok(words)
}

/// Writes a saved area (`words`) to a vCPU that has not run yet. An area larger than this host
/// takes (`host_size`) holds state of features not enabled here: refused rather than cut.
pub fn restore(fd: &VcpuFd, words: &[u32], host_size: usize) -> Result<(), XsaveError> {
    let saved_bytes = words.len() * WORD;
    if saved_bytes < LEGACY_XSAVE_BYTES {
        return Err(XsaveError::Invalid(format!(
            "the XSAVE area is {saved_bytes} bytes, less than the {LEGACY_XSAVE_BYTES} every \
             KVM saves"
        )));
    }
    if saved_bytes > host_size {
        return Err(XsaveError::Invalid(format!(
            "the snapshot's XSAVE area is {saved_bytes} bytes (features such as AMX were \
             enabled where it was taken); this host's KVM takes {host_size} (KVM_CAP_XSAVE2)"
        )));
    }
    let (region, extra) = words.split_at(LEGACY_XSAVE_BYTES / WORD);
    if host_size <= LEGACY_XSAVE_BYTES {
        let mut xsave = kvm_xsave::default();
        xsave.region.copy_from_slice(region);
        // SAFETY: this host's KVM copies LEGACY_XSAVE_BYTES (no KVM_CAP_XSAVE2 size above it),
        // exactly the size of `xsave`.
        return unsafe { fd.set_xsave(&xsave) }.map_err(|source| XsaveError::Kvm {
            what: "KVM_SET_XSAVE",
            source,
        });
    }
    let mut xsave = large_area(host_size)?;
    // SAFETY: only the fixed region is written, never the length the wrapper's entries depend
    // on (`len`).
    unsafe { xsave.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(region);
    // The words past the saved area stay zero: no state of those features was saved.
    xsave.as_mut_slice()[..extra.len()].copy_from_slice(extra);
    // SAFETY: `xsave` holds `host_size` bytes, what KVM_CAP_XSAVE2 said KVM copies in.
    unsafe { fd.set_xsave2(&xsave) }.map_err(|source| XsaveError::Kvm {
        what: "KVM_SET_XSAVE",
        source,
    })
}

/// A zeroed area of `bytes` (above the classic size) for KVM_GET_XSAVE2 / KVM_SET_XSAVE.
fn large_area(bytes: usize) -> Result<Xsave, XsaveError> {
    let extra_words = (bytes - LEGACY_XSAVE_BYTES).div_ceil(WORD);
    Xsave::new(extra_words).map_err(|e| {
        XsaveError::Invalid(format!("cannot allocate a {bytes}-byte XSAVE area: {e:?}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::vm::Vm;

    /// A vCPU, or None (with a message) without /dev/kvm; with CI=true a missing /dev/kvm fails.
    fn vcpu(test: &str) -> Option<(Vm, VcpuFd)> {
        match Vm::new() {
            Ok(vm) => {
                let fd = vm.fd().create_vcpu(0).unwrap();
                let cpuid = vm
                    .kvm()
                    .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                    .unwrap();
                fd.set_cpuid2(&cpuid).unwrap();
                Some((vm, fd))
            }
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("{test}: KVM is required when CI=true: {e}")
            }
            Err(e) => {
                eprintln!("skipping {test}: {e}");
                None
            }
        }
    }

    /// Both paths, whatever this host's KVM_CAP_XSAVE2 says: a buffer larger than KVM copies is
    /// safe for both ioctls, so the large path is taken with twice the classic size.
    #[test]
    fn the_area_comes_back_through_the_classic_and_the_large_path() {
        let Some((vm, fd)) = vcpu("the_area_comes_back_through_the_classic_and_the_large_path")
        else {
            return;
        };
        let host = host_xsave_size(vm.fd());
        assert!(host >= LEGACY_XSAVE_BYTES);
        let classic = save(&fd, LEGACY_XSAVE_BYTES).unwrap();
        assert_eq!(classic.len(), LEGACY_XSAVE_BYTES / WORD);
        // Change the x87 control word (bytes 0-1 of the legacy region: FCW) and mark the x87
        // state as not in its initial configuration (XSTATE_BV bit 0, in the header at byte
        // 512), or KVM loads the initial FCW instead; then restore.
        let mut changed = classic.clone();
        changed[0] = (changed[0] & !0xffff) | 0x027f;
        changed[512 / WORD] |= 1;
        let large = 2 * LEGACY_XSAVE_BYTES.max(host);
        let mut long = changed.clone();
        long.resize(large / WORD, 0);
        restore(&fd, &long, large).unwrap();
        let read_back = save(&fd, large).unwrap();
        assert_eq!(read_back.len(), large / WORD);
        assert_eq!(
            read_back[0] & 0xffff,
            0x027f,
            "FCW set through the large path"
        );
        restore(&fd, &classic, LEGACY_XSAVE_BYTES.max(host)).unwrap();
        assert_eq!(save(&fd, host).unwrap()[0], classic[0]);
    }

    #[test]
    fn an_area_larger_than_this_host_takes_or_shorter_than_any_is_refused() {
        let Some((_vm, fd)) =
            vcpu("an_area_larger_than_this_host_takes_or_shorter_than_any_is_refused")
        else {
            return;
        };
        let amx_sized = vec![0u32; 11008 / WORD];
        let error = restore(&fd, &amx_sized, LEGACY_XSAVE_BYTES)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("XSAVE area is 11008 bytes") && error.contains("takes 4096"),
            "{error}"
        );
        let error = restore(&fd, &[0u32; 16], LEGACY_XSAVE_BYTES)
            .unwrap_err()
            .to_string();
        assert!(error.contains("less than the 4096"), "{error}");
    }
}
