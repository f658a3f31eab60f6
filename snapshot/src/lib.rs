//! The on-disk form of a microVM snapshot, independent of what the VMM puts in it:
//!
//! * the **state file** ([`state_file`]): magic, format version, payload length, SHA-256 of the
//!   payload, then the payload (any serde type, postcard-encoded). Written to a temporary file,
//!   fsynced and renamed into place, so a crash never leaves a half-written state file under the
//!   final name. Loading checks every header field before decoding and names what is wrong.
//! * the **memory file** ([`memory_file`]): guest RAM regions back to back, raw, sparse where a
//!   page is all zeroes; its [`MemoryLayout`] (region guest addresses and sizes) travels in the
//!   state file, and loading checks that the memory file is exactly that long.
//! * the **working-set file** ([`working_set`]): the pages a userfaultfd restore faulted in first,
//!   prefetched in one pass by later restores.

pub mod atomic_write;
pub mod error;
pub mod memory_file;
pub mod state_file;
pub mod working_set;

pub use error::SnapshotError;
pub use memory_file::{open_memory_file, write_memory_file, MemoryLayout, MemoryRegion};
pub use state_file::{read_state_file, write_state_file, FORMAT_VERSION, MAGIC};
pub use working_set::{
    memory_file_identity, read_working_set, working_set_path, write_working_set, WorkingSet,
};
