//! Snapshot files from an untrusted place (a snapshot directory someone else can write): the
//! state file decoded into `MicrovmState` and put through the checks a restore makes before it
//! touches KVM, and the working-set file reader. Payloads usually get a valid header (magic,
//! version, length, SHA-256) so the fuzzer reaches the decoder behind the checksum.
#![no_main]

use std::path::Path;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use snapshot::state_file::{decode, encode, FORMAT_VERSION, MAGIC};
use snapshot::{MemoryKind, MemoryLayout, MemoryRegion, PageRun, WorkingSet};
use vmm::device_manager::DeviceStates;
use vmm::persist::MicrovmState;
use vmm::vstate::vcpu_state::VcpuState;
use vmm::vstate::vm_state::KvmVmState;

/// One memory region as (guest address, size, file offset).
type Region = (u64, u64, u64);

#[derive(Arbitrary, Debug)]
enum Input {
    /// A well-formed state whose counts, memory layout and diff runs are the fuzzer's (the KVM
    /// and device state zeroed): what a hand-made or buggy writer's file decodes to.
    State {
        vcpu_count: u8,
        vcpu_indices: Vec<u8>,
        mem_mib: u64,
        regions: Vec<Region>,
        dirty: Option<Vec<(u64, u64)>>,
    },
    /// A state file payload behind a valid header.
    Payload(Vec<u8>),
    /// A whole state file, header and all.
    StateFile(Vec<u8>),
    /// A working set as the VMM writes one (any lengths and pages).
    WorkingSet {
        mem_file_len: u64,
        mem_file_mtime_ns: u64,
        pages: Vec<u64>,
    },
    /// A whole working-set file.
    WorkingSetFile(Vec<u8>),
}

const PAGE: u64 = 4096;

fn with_header(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(52 + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(payload));
    out.extend_from_slice(payload);
    out
}

/// What `restore` checks on a decoded state before it builds anything, then a re-encode: the
/// encoding of a decoded state must decode to a state that encodes the same.
fn check_state(bytes: &[u8]) {
    let path = Path::new("fuzz.snap");
    let Ok(state) = decode::<MicrovmState>(path, bytes) else {
        return;
    };
    let _ = state.check_consistent();
    if state.memory.validate().is_ok() {
        if let MemoryKind::Diff { dirty, .. } = &state.memory_kind {
            let _ = state.memory.check_runs(dirty);
        }
    }
    let once = encode(&state).expect("a decoded state encodes");
    let again: MicrovmState = decode(path, &once).expect("a re-encoded state decodes");
    assert_eq!(
        encode(&again).expect("encodes"),
        once,
        "decode/encode is not stable"
    );
}

fn vcpu(index: u8) -> VcpuState {
    VcpuState {
        index,
        cpuid: Vec::new(),
        mp_state: Default::default(),
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debug_regs: Default::default(),
        lapic: Default::default(),
        msrs: Vec::new(),
        vcpu_events: Default::default(),
        tsc_khz: None,
    }
}

fn state(
    vcpu_count: u8,
    vcpu_indices: Vec<u8>,
    mem_mib: u64,
    regions: Vec<Region>,
    dirty: Option<Vec<(u64, u64)>>,
) -> MicrovmState {
    MicrovmState {
        vcpu_count,
        mem_mib,
        memory: MemoryLayout {
            regions: regions
                .into_iter()
                .map(|(guest_addr, size, file_offset)| MemoryRegion {
                    guest_addr,
                    size,
                    file_offset,
                })
                .collect(),
        },
        memory_kind: match dirty {
            None => MemoryKind::Full,
            Some(runs) => MemoryKind::Diff {
                base: [7; 32],
                dirty: runs
                    .into_iter()
                    .map(|(first_page, pages)| PageRun { first_page, pages })
                    .collect(),
            },
        },
        merged_from: None,
        vsock: None,
        vm: KvmVmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        vcpus: vcpu_indices.into_iter().take(8).map(vcpu).collect(),
        devices: DeviceStates {
            serial: devices::legacy::SerialSnapshot {
                baud_divisor_low: 0,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 0,
                line_control: 0,
                line_status: 0,
                modem_control: 0,
                modem_status: 0,
                scratch: 0,
                in_buffer: Vec::new(),
            },
            virtio: Vec::new(),
            net: None,
        },
    }
}

fuzz_target!(|input: Input| {
    let path = Path::new("fuzz.mem.ws");
    match input {
        Input::State {
            vcpu_count,
            vcpu_indices,
            mem_mib,
            regions,
            dirty,
        } => {
            let state = state(vcpu_count, vcpu_indices, mem_mib, regions, dirty);
            check_state(&encode(&state).expect("a state encodes"));
        }
        Input::Payload(payload) => check_state(&with_header(&payload)),
        Input::StateFile(bytes) => check_state(&bytes),
        Input::WorkingSet {
            mem_file_len,
            mem_file_mtime_ns,
            pages,
        } => {
            let set = WorkingSet {
                mem_file_len,
                mem_file_mtime_ns,
                pages,
            };
            let fits = set.pages.iter().all(|&p| p < mem_file_len / PAGE);
            match WorkingSet::decode(path, &set.encode()) {
                Ok(decoded) => {
                    assert!(fits, "a page past the memory file was accepted");
                    assert_eq!(decoded, set, "round trip changed the working set");
                }
                Err(e) => assert!(!fits, "a well-formed working set was refused: {e}"),
            }
        }
        Input::WorkingSetFile(bytes) => {
            let _ = WorkingSet::decode(path, &bytes);
        }
    }
});
