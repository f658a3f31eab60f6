//! The on-disk form of a microVM snapshot, independent of what the VMM puts in it:
//!
//! * the **state file** ([`state_file`]): magic, format version, payload length, SHA-256 of the
//!   payload, then the payload (any serde type, postcard-encoded). Written to a temporary file,
//!   fsynced and renamed into place, so a crash never leaves a half-written state file under the
//!   final name. Loading checks every header field before decoding and names what is wrong.
//! * the **memory file** ([`memory_file`]): guest RAM regions back to back, raw, sparse where a
//!   page is all zeroes; its [`MemoryLayout`] (region guest addresses and sizes) travels in the
//!   state file, and loading checks that the memory file is exactly that long. A diff memory file
//!   ([`MemoryKind::Diff`]) has the same size but holds only the pages dirtied since its base
//!   snapshot; [`merge_memory_files`] applies it onto the base's memory file.
//! * the **working-set file** ([`working_set`]): the pages a userfaultfd restore faulted in first,
//!   prefetched in one pass by later restores.
//!
//! A snapshot is written as two temporary files and committed by [`commit_snapshot`]: an existing
//! state file is removed first, then the memory file and the state file are renamed into place,
//! so neither a failed write nor a crash at any point pairs a new memory file with an old state
//! file.

pub mod atomic_write;
pub mod commit;
pub mod error;
pub mod memory_file;
pub mod state_file;
pub mod working_set;

pub use atomic_write::AtomicFile;
pub use commit::{commit_snapshot, retire_state_file};
pub use error::SnapshotError;
pub use memory_file::{
    merge_memory_files, open_memory_file, prepare_memory_file, write_memory_file, MemoryKind,
    MemoryLayout, MemoryRegion, PageRun,
};
pub use state_file::{
    prepare_state_file, read_state_file, read_state_file_with_checksum, write_state_file,
    FORMAT_VERSION, MAGIC,
};
pub use working_set::{
    memory_file_identity, read_working_set, working_set_path, write_working_set, WorkingSet,
};
