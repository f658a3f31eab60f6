//! vCPU threads: run KVM_RUN, dispatch port and MMIO exits to the device buses, and report every
//! exit the VMM cannot handle as a precise reason (exit kind + guest RIP).

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Once, OnceLock};
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};

use crate::exit::{VcpuStop, VmmEvent};
use crate::process_stats::monotonic_ns;
use crate::seccomp::{ThreadKind, ThreadSeccomp};
use crate::vstate::exit_counts::{ExitCounts, ExitReason};
use crate::vstate::pause::RunSwitches;
use crate::vstate::vcpu_state::VcpuState;

/// Work a parked vCPU thread does with its own fd (see `VcpuGate::park_while_paused`).
pub enum VcpuRequest {
    /// Read the vCPU's state for a snapshot; `msr_indices` is KVM's list of MSRs to save.
    SaveState {
        msr_indices: Arc<[u32]>,
        /// This host's XSAVE area size (`Vm::xsave_size`).
        xsave_size: usize,
        reply: Sender<Result<VcpuState, String>>,
    },
}

/// Real-time signal used to knock a vCPU thread out of KVM_RUN when the VM is being torn down.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the (empty) handler for the kick signal once per process: its only job is to make
/// KVM_RUN return EINTR instead of killing the process.
pub(crate) fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop) {
            tracing::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

/// How a vCPU thread and the VMM talk: events out (the vCPU stopped, first entry), requests in.
pub struct VcpuChannels {
    pub events: Sender<VmmEvent>,
    pub requests: Receiver<VcpuRequest>,
}

pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    io: Arc<IoManager>,
    events: Sender<VmmEvent>,
    switches: RunSwitches,
    /// Set once, by whichever vCPU enters KVM_RUN first: the end of the VMM's own boot work.
    first_run: Arc<OnceLock<u64>>,
    seccomp: ThreadSeccomp,
    requests: Receiver<VcpuRequest>,
}

impl Vcpu {
    pub fn new(
        index: u8,
        fd: VcpuFd,
        io: Arc<IoManager>,
        channels: VcpuChannels,
        switches: RunSwitches,
        first_run: Arc<OnceLock<u64>>,
        seccomp: ThreadSeccomp,
    ) -> Self {
        let VcpuChannels { events, requests } = channels;
        Self {
            index,
            fd,
            io,
            events,
            switches,
            first_run,
            seccomp,
            requests,
        }
    }

    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        install_kick_handler();
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || self.run())
    }

    fn run(mut self) {
        // Before the first KVM_RUN: the guest never runs beside an unfiltered vCPU thread.
        let outcome = match self.seccomp.enter(ThreadKind::Vcpu) {
            Ok(()) => self.run_until_stop(),
            Err(e) => VcpuStop::Seccomp(e.to_string()),
        };
        let _ = self.events.send(VmmEvent::VcpuStopped {
            index: self.index,
            outcome,
        });
    }

    fn run_until_stop(&mut self) -> VcpuStop {
        loop {
            let gate = self.switches.gate.clone();
            gate.park_while_paused(&self.switches.stop, || self.serve_requests());
            if self.switches.stop.load(Ordering::Acquire) {
                return VcpuStop::Requested;
            }
            if self.first_run.get().is_none() && self.first_run.set(monotonic_ns()).is_ok() {
                let _ = self.events.send(VmmEvent::FirstKvmRun);
            }
            let exits = &self.switches.exits;
            let ended = match self.fd.run() {
                Ok(exit) => handle_exit(self.index, &self.io, exit, exits),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    exits.add(ExitReason::Interrupted);
                    None
                }
                Err(e) => Some(Ended::RunFailed(e.to_string())),
            };
            if ended.is_some() {
                exits.add(ExitReason::Fatal);
            }
            if let Some(ended) = ended {
                return self.describe(ended);
            }
        }
    }

    fn serve_requests(&self) {
        while let Ok(request) = self.requests.try_recv() {
            match request {
                VcpuRequest::SaveState {
                    msr_indices,
                    xsave_size,
                    reply,
                } => {
                    let state = VcpuState::save(self.index, &self.fd, &msr_indices, xsave_size)
                        .map_err(|e| e.to_string());
                    let _ = reply.send(state);
                }
            }
        }
    }

    /// Adds the guest RIP (and for internal errors the suberror) once the exit's borrow of the
    /// vCPU is over.
    fn describe(&mut self, ended: Ended) -> VcpuStop {
        let rip = self.rip();
        match ended {
            Ended::Shutdown => VcpuStop::Shutdown { rip },
            Ended::Halted => VcpuStop::Halted { rip },
            Ended::FailEntry(reason) => VcpuStop::FailEntry { reason, rip },
            Ended::InternalError => {
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal` member of
                // the kvm_run union; reading its u32 suberror is valid.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                VcpuStop::InternalError { suberror, rip }
            }
            Ended::SystemEvent(kind) => VcpuStop::SystemEvent { kind, rip },
            Ended::Unexpected(exit) => VcpuStop::Unexpected { exit, rip },
            Ended::RunFailed(error) => VcpuStop::RunFailed { error, rip },
        }
    }

    fn rip(&self) -> Option<u64> {
        self.fd.get_regs().ok().map(|r| r.rip)
    }
}

/// An exit that ends the vCPU, before the guest RIP is attached.
enum Ended {
    Shutdown,
    Halted,
    FailEntry(u64),
    InternalError,
    SystemEvent(u32),
    Unexpected(String),
    RunFailed(String),
}

/// Serves device exits; returns `Some` for exits that end this vCPU.
fn handle_exit(index: u8, io: &IoManager, exit: VcpuExit<'_>, exits: &ExitCounts) -> Option<Ended> {
    let reason = match &exit {
        VcpuExit::IoIn(..) => Some(ExitReason::IoIn),
        VcpuExit::IoOut(..) => Some(ExitReason::IoOut),
        VcpuExit::MmioRead(..) => Some(ExitReason::MmioRead),
        VcpuExit::MmioWrite(..) => Some(ExitReason::MmioWrite),
        VcpuExit::Intr => Some(ExitReason::Interrupted),
        // Counted as fatal by the caller.
        _ => None,
    };
    if let Some(reason) = reason {
        exits.add(reason);
    }
    match exit {
        VcpuExit::IoIn(port, data) => {
            if io.pio_read(PioAddress(port), data).is_err() {
                // Nothing decodes this port: reads float high, as on a real ISA bus.
                data.fill(0xff);
            }
            None
        }
        VcpuExit::IoOut(port, data) => {
            // Writes to absent ports (POST codes on 0x80, probes) are dropped silently.
            let _ = io.pio_write(PioAddress(port), data);
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            if io.mmio_read(MmioAddress(addr), data).is_err() {
                tracing::debug!("vcpu{index}: read of unmapped MMIO {addr:#x}");
                data.fill(0xff);
            }
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            if io.mmio_write(MmioAddress(addr), data).is_err() {
                tracing::debug!("vcpu{index}: write to unmapped MMIO {addr:#x}");
            }
            None
        }
        VcpuExit::Intr => None,
        VcpuExit::Shutdown => Some(Ended::Shutdown),
        VcpuExit::Hlt => Some(Ended::Halted),
        VcpuExit::FailEntry(reason, _cpu) => Some(Ended::FailEntry(reason)),
        VcpuExit::InternalError => Some(Ended::InternalError),
        VcpuExit::SystemEvent(kind, _) => Some(Ended::SystemEvent(kind)),
        other => Some(Ended::Unexpected(format!("{other:?}"))),
    }
}
