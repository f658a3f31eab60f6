//! KVM state: the VM file descriptor, the vCPU threads and their pause gate.

pub mod exit_counts;
pub mod pause;
pub mod vcpu;
pub mod vm;
