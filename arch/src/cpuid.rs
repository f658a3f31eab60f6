//! Guest CPUID: what KVM supports, adjusted per vCPU so the guest sees its own APIC id and a
//! consistent topology of `cpu_count` single-threaded cores in one package.
//!
//! Linux derives its topology from different leaves depending on the vendor: leaf 1 and leaf 4
//! (and leaf 0xb/0x1f when present) on Intel, leaf 0x8000_0008 ECX and, with TOPOEXT,
//! 0x8000_001e/0x8000_001d plus leaf 0xb on AMD. All of them are made to agree here. The KVM
//! paravirtual leaves (0x4000_0000..) are passed through untouched so the guest finds kvm-clock.

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

use crate::{kvm_err, Error, Result};

/// Leaf 1 ECX: TSC-deadline mode of the LAPIC timer.
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: running under a hypervisor.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: leaf 1 EBX[23:16] holds a valid logical-processor count.
pub const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX: CmpLegacy, HTT counts cores, not hyper-threads (AMD).
pub const LEAF_8000_0001_ECX_CMP_LEGACY: u32 = 1 << 1;
/// Leaf 0x8000_0001 ECX: topology extensions, leaves 0x8000_001d/0x8000_001e valid (AMD).
pub const LEAF_8000_0001_ECX_TOPOEXT: u32 = 1 << 22;

/// Level type "SMT" in leaf 0xb/0x1f ECX[15:8].
const LEVEL_TYPE_SMT: u32 = 1;
/// Level type "core" in leaf 0xb/0x1f ECX[15:8].
const LEVEL_TYPE_CORE: u32 = 2;

/// Highest vCPU count: xAPIC ids are 8 bits, 0xff is the broadcast id, and the MP table's
/// IOAPIC takes the id after the last vCPU.
pub const MAX_CPU_COUNT: u8 = 254;

/// The CPU vendor named by leaf 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// GenuineIntel.
    Intel,
    /// AuthenticAMD or HygonGenuine (Hygon uses AMD's topology leaves).
    Amd,
    /// Anything else, or no leaf 0.
    Other,
}

/// Reads the vendor string of leaf 0 in `cpuid`.
pub fn vendor(cpuid: &CpuId) -> Vendor {
    let Some(leaf0) = find(cpuid, 0, 0) else {
        return Vendor::Other;
    };
    let mut id = [0u8; 12];
    id[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    id[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// The entry for `function`/`index`. Leaves without a significant index match any `index`.
pub fn find(cpuid: &CpuId, function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid.as_slice().iter().find(|e| {
        e.function == function
            && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == index)
    })
}

/// Number of APIC-id bits that number `cpu_count` cores: ceil(log2(cpu_count)).
pub fn core_id_bits(cpu_count: u8) -> u32 {
    match cpu_count {
        0 | 1 => 0,
        n => u32::from(n - 1).ilog2() + 1,
    }
}

fn check_topology(cpu_index: u8, cpu_count: u8) -> Result<()> {
    if cpu_count == 0 || cpu_count > MAX_CPU_COUNT {
        return Err(Error::InvalidCpuCount(u32::from(cpu_count)));
    }
    if cpu_index >= cpu_count {
        return Err(Error::InvalidCpuIndex {
            index: cpu_index,
            count: cpu_count,
        });
    }
    Ok(())
}

/// Adjusts the KVM-supported CPUID in `cpuid` for vCPU `cpu_index` of `cpu_count`: APIC ids in
/// every leaf that reports one, one thread per core, `cpu_count` cores in a single package, the
/// hypervisor bit set. Leaves not named here, including the KVM paravirtual leaves, are kept.
pub fn normalize_cpuid(cpuid: &mut CpuId, cpu_index: u8, cpu_count: u8) -> Result<()> {
    check_topology(cpu_index, cpu_count)?;
    let vendor = vendor(cpuid);
    let max_basic = find(cpuid, 0, 0).map_or(0, |e| e.eax);
    let max_extended = find(cpuid, 0x8000_0000, 0).map_or(0, |e| e.eax);
    let apic_id = u32::from(cpu_index);
    let count = u32::from(cpu_count);

    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (count << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                e.edx |= LEAF1_EDX_HTT;
            }
            0x4 if vendor == Vendor::Intel => update_cache_sharing(e, count, 26),
            0x8000_0001 if vendor == Vendor::Amd => {
                if cpu_count > 1 {
                    e.ecx |= LEAF_8000_0001_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !LEAF_8000_0001_ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 if vendor == Vendor::Amd => {
                // ECX[7:0] NC = cores - 1, ECX[15:12] ApicIdSize = bits of core id in the APIC id.
                e.ecx = (e.ecx & !0xf0ff) | (core_id_bits(cpu_count) << 12) | (count - 1);
            }
            0x8000_001d if vendor == Vendor::Amd => update_cache_sharing(e, count, 0),
            _ => {}
        }
    }

    if max_basic >= 0xb {
        replace_topology_leaf(cpuid, 0xb, apic_id, cpu_count)?;
    }
    // Linux prefers leaf 0x1f over 0xb; rewrite it only where KVM offers it, so it stays absent
    // (and ignored) elsewhere.
    if max_basic >= 0x1f && cpuid.as_slice().iter().any(|e| e.function == 0x1f) {
        replace_topology_leaf(cpuid, 0x1f, apic_id, cpu_count)?;
    }

    if vendor == Vendor::Amd && max_extended >= 0x8000_001e {
        let topoext =
            find(cpuid, 0x8000_0001, 0).is_some_and(|e| e.ecx & LEAF_8000_0001_ECX_TOPOEXT != 0);
        let present = find(cpuid, 0x8000_001e, 0).is_some();
        if topoext || present {
            cpuid.retain(|e| e.function != 0x8000_001e);
            push(
                cpuid,
                kvm_cpuid_entry2 {
                    function: 0x8000_001e,
                    // Extended APIC id.
                    eax: apic_id,
                    // Core id in [7:0]; threads per core - 1 = 0 in [15:8].
                    ebx: apic_id & 0xff,
                    // Node 0, one node per package.
                    ecx: 0,
                    ..Default::default()
                },
            )?;
        }
    }
    Ok(())
}

/// Rewrites the "logical processors sharing this cache" field EAX[25:14] of a deterministic
/// cache leaf (Intel leaf 4, AMD 0x8000_001d): private L1/L2, an L3 shared by all vCPUs. On Intel
/// leaf 4 also rewrites EAX[31:26], cores per package - 1 (`cores_shift` = 26); AMD keeps those
/// bits reserved (`cores_shift` = 0 leaves them alone).
fn update_cache_sharing(e: &mut kvm_cpuid_entry2, cpu_count: u32, cores_shift: u32) {
    let cache_type = e.eax & 0x1f;
    if cache_type == 0 {
        return;
    }
    let level = (e.eax >> 5) & 0x7;
    let sharing = if level >= 3 {
        (cpu_count - 1).min(0xfff)
    } else {
        0
    };
    e.eax = (e.eax & !(0xfff << 14)) | (sharing << 14);
    if cores_shift != 0 {
        e.eax = (e.eax & !(0x3f << cores_shift)) | ((cpu_count - 1).min(0x3f) << cores_shift);
    }
}

/// Replaces all subleaves of extended topology leaf `function` (0xb or 0x1f) with: SMT level of
/// one thread, core level of `cpu_count` cores, then the terminating invalid level. EDX holds
/// the x2APIC id in every subleaf.
fn replace_topology_leaf(
    cpuid: &mut CpuId,
    function: u32,
    apic_id: u32,
    cpu_count: u8,
) -> Result<()> {
    cpuid.retain(|e| e.function != function);
    let levels = [
        // (EAX: id bits below the next level, EBX: logical processors at this level, type)
        (0, 1, LEVEL_TYPE_SMT),
        (
            core_id_bits(cpu_count),
            u32::from(cpu_count),
            LEVEL_TYPE_CORE,
        ),
        (0, 0, 0),
    ];
    for (index, (eax, ebx, level_type)) in (0u32..).zip(levels) {
        push(
            cpuid,
            kvm_cpuid_entry2 {
                function,
                index,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax,
                ebx,
                ecx: (level_type << 8) | index,
                edx: apic_id,
                ..Default::default()
            },
        )?;
    }
    Ok(())
}

fn push(cpuid: &mut CpuId, entry: kvm_cpuid_entry2) -> Result<()> {
    cpuid.push(entry).map_err(|source| Error::FamStruct {
        what: "CPUID",
        source,
    })
}

/// Advertises the LAPIC timer's TSC-deadline mode, which KVM emulates with the in-kernel LAPIC
/// but leaves out of KVM_GET_SUPPORTED_CPUID (it is gated on KVM_CAP_TSC_DEADLINE_TIMER).
pub fn enable_tsc_deadline(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
        e.ecx |= LEAF1_ECX_TSC_DEADLINE;
    }
}

/// Reads KVM_GET_SUPPORTED_CPUID, normalises it for vCPU `cpu_index` of `cpu_count` and sets it
/// on `vcpu` with KVM_SET_CPUID2.
pub fn setup_cpuid(kvm: &Kvm, vcpu: &VcpuFd, cpu_index: u8, cpu_count: u8) -> Result<()> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    normalize_cpuid(&mut cpuid, cpu_index, cpu_count)?;
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        enable_tsc_deadline(&mut cpuid);
    }
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: 0,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn subleaf(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            ..leaf(function, index, eax, ebx, ecx, edx)
        }
    }

    fn vendor_leaf(max: u32, id: &[u8; 12]) -> kvm_cpuid_entry2 {
        let word = |i: usize| u32::from_le_bytes(id[i..i + 4].try_into().unwrap());
        leaf(0, 0, max, word(0), word(8), word(4))
    }

    /// An Intel-like host: 2 threads per core, 8 cores, leaf 4 with L1d/L2/L3, leaf 0xb.
    fn intel() -> CpuId {
        CpuId::from_entries(&[
            vendor_leaf(0x1f, b"GenuineIntel"),
            leaf(
                1,
                0,
                0x906ea,
                0x0710_0800 | 0x12,
                0x7ffa_3203,
                0x0f8b_fbff & !LEAF1_EDX_HTT,
            ),
            subleaf(4, 0, 0x1c00_4121, 0x01c0_003f, 0x3f, 0),
            subleaf(4, 1, 0x1c00_4143, 0x00c0_003f, 0x3ff, 0),
            subleaf(4, 2, 0x1c03_c163, 0x02c0_003f, 0x3fff, 6),
            subleaf(4, 3, 0, 0, 0, 0),
            subleaf(0xb, 0, 1, 2, 0x100, 7),
            subleaf(0xb, 1, 4, 16, 0x201, 7),
            leaf(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            leaf(0x4000_0001, 0, 0x0100_7afb, 0, 0, 0),
            leaf(0x8000_0000, 0, 0x8000_0008, 0, 0, 0),
            leaf(0x8000_0008, 0, 0x3027, 0, 0, 0),
        ])
        .unwrap()
    }

    /// An AMD-like host with TOPOEXT but no 0x8000_001e entry, and no leaf 0xb (max basic 0xd).
    fn amd() -> CpuId {
        CpuId::from_entries(&[
            vendor_leaf(0xd, b"AuthenticAMD"),
            leaf(1, 0, 0x830f10, 0x0002_0800, 0x7ed8_320b, 0x178b_fbff),
            leaf(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            leaf(0x8000_0000, 0, 0x8000_001f, 0, 0, 0),
            leaf(
                0x8000_0001,
                0,
                0,
                0,
                0x75c2_37ff | LEAF_8000_0001_ECX_TOPOEXT,
                0,
            ),
            leaf(0x8000_0008, 0, 0x3030, 0, 0x0001_7007, 0),
            subleaf(0x8000_001d, 0, 0x0000_4121, 0x01c0_003f, 0x3f, 0),
            subleaf(0x8000_001d, 1, 0x0000_4143, 0x01c0_003f, 0x3ff, 2),
            subleaf(0x8000_001d, 2, 0x0001_c163, 0x03c0_003f, 0x3fff, 1),
            subleaf(0x8000_001d, 3, 0, 0, 0, 0),
        ])
        .unwrap()
    }

    fn get(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *find(c, f, i).unwrap_or_else(|| panic!("leaf {f:#x}.{i} missing"))
    }

    #[test]
    fn detects_vendor() {
        assert_eq!(vendor(&intel()), Vendor::Intel);
        assert_eq!(vendor(&amd()), Vendor::Amd);
        let hygon = CpuId::from_entries(&[vendor_leaf(0xd, b"HygonGenuine")]).unwrap();
        assert_eq!(vendor(&hygon), Vendor::Amd);
        assert_eq!(vendor(&CpuId::new(0).unwrap()), Vendor::Other);
    }

    #[test]
    fn core_bits() {
        let expect = [
            (1, 0),
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 3),
            (8, 3),
            (9, 4),
            (128, 7),
            (129, 8),
            (254, 8),
        ];
        for (count, bits) in expect {
            assert_eq!(core_id_bits(count), bits, "count {count}");
        }
    }

    #[test]
    fn leaf1_apic_id_count_and_flags() {
        let mut c = intel();
        normalize_cpuid(&mut c, 3, 4).unwrap();
        let l1 = get(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3, "initial APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processor count");
        assert_eq!(l1.ebx & 0xffff, 0x0812, "CLFLUSH size and brand index kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        // Other feature bits untouched.
        assert_eq!(l1.ecx & !LEAF1_ECX_HYPERVISOR, 0x7ffa_3203);
    }

    #[test]
    fn intel_leaf4_cores_and_sharing() {
        let mut c = intel();
        normalize_cpuid(&mut c, 0, 6).unwrap();
        for i in 0..3 {
            let e = get(&c, 4, i);
            assert_eq!(e.eax >> 26, 5, "cores per package - 1, subleaf {i}");
            let sharing = (e.eax >> 14) & 0xfff;
            let level = (e.eax >> 5) & 7;
            assert_eq!(sharing, if level == 3 { 5 } else { 0 }, "subleaf {i}");
            // Type, level and the low descriptor bits are kept.
            assert_eq!(e.eax & 0x3fff, [0x121, 0x143, 0x163][i as usize]);
        }
        // The null terminator subleaf stays null.
        assert_eq!(get(&c, 4, 3).eax, 0);
    }

    #[test]
    fn leaf_b_topology_per_vcpu() {
        let mut c = intel();
        normalize_cpuid(&mut c, 5, 6).unwrap();
        let subleaves: Vec<_> = c.as_slice().iter().filter(|e| e.function == 0xb).collect();
        assert_eq!(subleaves.len(), 3);
        let smt = get(&c, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
        let core = get(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        let end = get(&c, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 5));
        for e in subleaves {
            assert_eq!(e.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        }
        // Max basic leaf is 0x1f but KVM did not offer 0x1f: it stays absent.
        assert!(c.as_slice().iter().all(|e| e.function != 0x1f));
    }

    #[test]
    fn leaf_1f_rewritten_when_present() {
        let mut c = intel();
        c.push(subleaf(0x1f, 0, 1, 2, 0x100, 9)).unwrap();
        c.push(subleaf(0x1f, 1, 4, 16, 0x201, 9)).unwrap();
        c.push(subleaf(0x1f, 2, 7, 32, 0x502, 9)).unwrap();
        c.push(subleaf(0x1f, 3, 0, 0, 3, 9)).unwrap();
        normalize_cpuid(&mut c, 1, 2).unwrap();
        let sub: Vec<_> = c.as_slice().iter().filter(|e| e.function == 0x1f).collect();
        assert_eq!(sub.len(), 3, "die level and old terminator dropped");
        assert_eq!(get(&c, 0x1f, 1).eax, 1);
        assert_eq!(get(&c, 0x1f, 1).ebx, 2);
        assert!(sub.iter().all(|e| e.edx == 1));
    }

    #[test]
    fn single_vcpu_topology() {
        let mut c = intel();
        normalize_cpuid(&mut c, 0, 1).unwrap();
        assert_eq!(get(&c, 0xb, 1).eax, 0);
        assert_eq!(get(&c, 0xb, 1).ebx, 1);
        assert_eq!(get(&c, 4, 2).eax >> 26, 0);
        assert_eq!((get(&c, 1, 0).ebx >> 16) & 0xff, 1);
    }

    #[test]
    fn amd_leaves() {
        let mut c = amd();
        normalize_cpuid(&mut c, 2, 3).unwrap();
        let e8 = get(&c, 0x8000_0008, 0);
        assert_eq!(e8.ecx & 0xff, 2, "NC = cores - 1");
        assert_eq!((e8.ecx >> 12) & 0xf, 2, "ApicIdSize");
        assert_eq!(e8.ecx & 0xffff_0000, 0x0001_0000, "PerfTscSize etc. kept");
        assert_ne!(
            get(&c, 0x8000_0001, 0).ecx & LEAF_8000_0001_ECX_CMP_LEGACY,
            0
        );

        let l3 = get(&c, 0x8000_001d, 2);
        assert_eq!((l3.eax >> 14) & 0xfff, 2, "L3 shared by all vCPUs");
        assert_eq!(l3.eax & 0x3fff, 0x163);
        assert_eq!((get(&c, 0x8000_001d, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((get(&c, 0x8000_001d, 1).eax >> 14) & 0xfff, 0);

        let e1e = get(&c, 0x8000_001e, 0);
        assert_eq!(e1e.eax, 2, "extended APIC id");
        assert_eq!(e1e.ebx, 2, "core id 2, one thread per core");
        assert_eq!(e1e.ecx, 0);

        // Max basic leaf 0xd covers leaf 0xb, which Linux reads on AMD with TOPOEXT: it is
        // filled in. Intel's leaf 4 is not invented.
        assert_eq!(get(&c, 0xb, 1).ebx, 3);
        assert_eq!(get(&c, 0xb, 0).edx, 2);
        assert!(c.as_slice().iter().all(|e| e.function != 4));
    }

    #[test]
    fn no_topology_leaf_beyond_max_basic_leaf() {
        let mut c = amd();
        c.as_mut_slice()[0].eax = 0x7;
        normalize_cpuid(&mut c, 0, 2).unwrap();
        assert!(c.as_slice().iter().all(|e| e.function != 0xb));
    }

    #[test]
    fn amd_single_vcpu_clears_cmp_legacy() {
        let mut c = amd();
        c.as_mut_slice()
            .iter_mut()
            .find(|e| e.function == 0x8000_0001)
            .unwrap()
            .ecx |= LEAF_8000_0001_ECX_CMP_LEGACY;
        normalize_cpuid(&mut c, 0, 1).unwrap();
        assert_eq!(
            get(&c, 0x8000_0001, 0).ecx & LEAF_8000_0001_ECX_CMP_LEGACY,
            0
        );
        assert_eq!(get(&c, 0x8000_0008, 0).ecx & 0xf0ff, 0);
    }

    #[test]
    fn amd_existing_8000_001e_replaced_once() {
        let mut c = amd();
        c.push(leaf(0x8000_001e, 0, 0x77, 0x0101, 0x0300, 0))
            .unwrap();
        normalize_cpuid(&mut c, 1, 2).unwrap();
        let all: Vec<_> = c
            .as_slice()
            .iter()
            .filter(|e| e.function == 0x8000_001e)
            .collect();
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].eax, all[0].ebx, all[0].ecx), (1, 1, 0));
    }

    #[test]
    fn paravirt_leaves_kept() {
        let mut c = amd();
        let before: Vec<_> = c
            .as_slice()
            .iter()
            .filter(|e| e.function >= 0x4000_0000 && e.function < 0x8000_0000)
            .copied()
            .collect();
        normalize_cpuid(&mut c, 0, 2).unwrap();
        let after: Vec<_> = c
            .as_slice()
            .iter()
            .filter(|e| e.function >= 0x4000_0000 && e.function < 0x8000_0000)
            .copied()
            .collect();
        assert_eq!(before, after);
        assert_eq!(get(&c, 0x4000_0000, 0).ebx, 0x4b4d_564b);
    }

    #[test]
    fn invalid_topology_rejected() {
        let mut c = intel();
        assert!(matches!(
            normalize_cpuid(&mut c, 0, 0),
            Err(Error::InvalidCpuCount(0))
        ));
        assert!(matches!(
            normalize_cpuid(&mut c, 0, 255),
            Err(Error::InvalidCpuCount(255))
        ));
        assert!(matches!(
            normalize_cpuid(&mut c, 2, 2),
            Err(Error::InvalidCpuIndex { index: 2, count: 2 })
        ));
    }

    #[test]
    fn normalising_twice_is_stable() {
        let mut once = intel();
        normalize_cpuid(&mut once, 1, 4).unwrap();
        let mut twice = once.clone();
        normalize_cpuid(&mut twice, 1, 4).unwrap();
        assert_eq!(once.as_slice(), twice.as_slice());
    }

    #[test]
    fn tsc_deadline_bit() {
        let mut c = amd();
        enable_tsc_deadline(&mut c);
        assert_ne!(get(&c, 1, 0).ecx & LEAF1_ECX_TSC_DEADLINE, 0);
    }
}
