//! KVM state: the VM file descriptor and the vCPU threads.

pub mod vcpu;
pub mod vm;
