//! KVM state: the VM file descriptor, the vCPU threads and their pause gate, and the VM's and
//! vCPUs' state as snapshots save and restore it.

pub mod exit_counts;
pub mod pause;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;
pub mod xsave;
