//! agentvm's VMM: a KVM microVM built from rust-vmm crates.
//!
//! [`vmm::boot`] turns a [`config::VmConfig`] into a running VM, [`vmm::restore`] builds one from a
//! snapshot ([`persist::MicrovmState`], files in the `snapshot` crate's formats);
//! [`vmm::Vmm::wait`] blocks until it ends and says why ([`exit::VmOutcome`]).
//!
//! Every VMM thread runs under a seccomp filter for its kind ([`seccomp`]); the filters live in
//! `vmm/seccomp/<target>.json` and are described in `vmm/seccomp/README.md`.

pub mod api;
pub mod artefacts;
pub mod config;
pub mod device_manager;
pub mod diagnostics;
pub mod exit;
pub mod guest_nic;
pub mod host;
pub mod image_map;
pub mod isolate;
pub mod kernel;
pub mod logging;
pub mod memory;
pub mod nested;
pub mod persist;
pub mod process_stats;
pub mod seccomp;
pub mod snapshot_merge;
pub mod uffd;
pub mod vmm;
pub mod vstate;
