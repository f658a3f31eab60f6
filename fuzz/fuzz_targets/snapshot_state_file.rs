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
use snapshot::{MemoryKind, WorkingSet};
use vmm::persist::MicrovmState;

#[derive(Arbitrary, Debug)]
enum Input {
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

fuzz_target!(|input: Input| {
    let path = Path::new("fuzz.mem.ws");
    match input {
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
