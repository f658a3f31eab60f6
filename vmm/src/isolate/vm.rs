//! One isolate: a KVM VM with one vCPU over [`GuestRam`], and its run loop.

use std::fs::File;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use isolate_abi::{layout, BootInfo, Call, Job, Value, ABI_VERSION, FAULT_PORT, HYPERCALL_PORT};
use kvm_bindings::{
    kvm_fpu, kvm_regs, kvm_sregs, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::hostcalls::{self, After, HostContext};
use super::limits::{Exceeded, RunLimits};
use super::machine;
use super::ram::GuestRam;
use super::{image, IsolateConfig, IsolateError, JobSpec};

/// Where KVM may put its real-mode TSS on Intel hosts: above anything an isolate maps.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Room in the input region beyond the module, for the function name and arguments.
const JOB_OVERHEAD: usize = 64 << 10;
/// Heap beyond the module's linear memory: the interpreter's compiled code, the module bytes it
/// keeps, its stacks and tables.
const HEAP_OVERHEAD: usize = 48 << 20;
const ALIGN: usize = 2 << 20;
/// Limits of the boot, up to the guest's "ready" (creating the interpreter takes well under a
/// millisecond natively; these only catch a broken guest).
const BOOT_CPU_LIMIT: Duration = Duration::from_secs(5);
const BOOT_WALL_LIMIT: Duration = Duration::from_secs(30);

fn kvm() -> Result<&'static Kvm, IsolateError> {
    static KVM: OnceLock<Result<Kvm, String>> = OnceLock::new();
    KVM.get_or_init(|| {
        Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e} (isolates need KVM)"))
    })
    .as_ref()
    .map_err(|e| IsolateError::Setup(e.clone()))
}

fn supported_cpuid() -> Result<&'static CpuId, IsolateError> {
    static CPUID: OnceLock<Result<CpuId, String>> = OnceLock::new();
    let kvm = kvm()?;
    CPUID
        .get_or_init(|| {
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))
        })
        .as_ref()
        .map_err(|e| IsolateError::Setup(e.clone()))
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> IsolateError {
    move |e| IsolateError::Kvm(format!("{what}: {e}"))
}

/// Sizes derived from a config: the input region, then the heap, then the total.
struct Sizes {
    input: usize,
    heap: usize,
    ram: usize,
}

fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

fn sizes(config: &IsolateConfig) -> Sizes {
    let input = align_up(config.max_module_bytes + JOB_OVERHEAD);
    let heap = align_up(config.max_wasm_mib as usize * (1 << 20) + HEAP_OVERHEAD);
    Sizes {
        input,
        heap,
        ram: layout::INPUT as usize + input + heap,
    }
}

/// An isolate frozen when its guest became ready: RAM contents (a memfd no VM writes to any
/// more) and vCPU registers. Isolates made from it share its pages until they write.
pub struct Template {
    config: IsolateConfig,
    ram_size: usize,
    ram: Arc<File>,
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
}

impl Template {
    /// Boots one isolate to ready and keeps its state.
    pub fn new(config: IsolateConfig) -> Result<Arc<Template>, IsolateError> {
        let booted = Isolate::boot(config)?;
        let regs = booted.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = booted.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let fpu = booted.vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
        Ok(Arc::new(Template {
            config,
            ram_size: booted.ram.size(),
            ram: booted.ram.file().clone(),
            regs,
            sregs,
            fpu,
        }))
    }

    pub fn config(&self) -> &IsolateConfig {
        &self.config
    }

    /// Bytes of guest RAM each isolate maps (shared with the template until written).
    pub fn ram_size(&self) -> usize {
        self.ram_size
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Stopped where the guest waits for its job.
    Ready,
    /// A job ran (or failed); only a reset makes it usable again.
    Used,
}

pub struct Isolate {
    // Field order is drop order: the vCPU and VM go before the RAM they map.
    vcpu: VcpuFd,
    vm: VmFd,
    ram: GuestRam,
    config: IsolateConfig,
    template: Option<Arc<Template>>,
    state: State,
}

impl Isolate {
    /// A new isolate from scratch, run until its guest is ready for a job.
    pub fn boot(config: IsolateConfig) -> Result<Isolate, IsolateError> {
        let image = image::flat_image().map_err(IsolateError::Setup)?;
        let s = sizes(&config);
        let mut ram = GuestRam::new(s.ram).map_err(|e| IsolateError::Setup(e.to_string()))?;
        let boot = BootInfo {
            magic: BootInfo::MAGIC,
            abi_version: ABI_VERSION,
            max_wasm_pages: config.max_wasm_mib.saturating_mul(16),
            mailbox: layout::MAILBOX,
            mailbox_size: layout::MAILBOX_SIZE,
            input: layout::INPUT,
            input_size: s.input as u64,
            heap: layout::INPUT + s.input as u64,
            heap_size: s.heap as u64,
        };
        machine::write_boot_memory(&mut ram, &image.bytes, &image.header, &boot)
            .map_err(|e| IsolateError::Setup(e.to_string()))?;
        let (vm, vcpu) = new_vm(&ram, false)?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&machine::boot_sregs(sregs))
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&machine::boot_regs(&image.header))
            .map_err(kvm_err("KVM_SET_REGS"))?;
        vcpu.set_fpu(&arch::regs::boot_fpu())
            .map_err(kvm_err("KVM_SET_FPU"))?;
        let mut isolate = Isolate {
            vcpu,
            vm,
            ram,
            config,
            template: None,
            state: State::Used,
        };
        let limits = RunLimits::start(BOOT_CPU_LIMIT, BOOT_WALL_LIMIT)
            .map_err(|e| IsolateError::Setup(format!("cannot arm the boot's timers: {e}")))?;
        // Before it is ready the guest has no job, so its only legitimate calls are ready and
        // (from a panic) error; a log line goes nowhere.
        let mut kv = super::KvStore::new(0);
        let mut discard = |_: &str| {};
        let mut boot_calls = |call: u32, ram: &mut GuestRam, deadline| {
            let mut ctx = HostContext {
                kv: &mut kv,
                log: &mut discard,
                fetch: None,
            };
            hostcalls::handle(call, ram, &mut ctx, deadline)
        };
        match isolate.drive(&limits, true, &mut boot_calls)? {
            Stop::Ready => {
                isolate.state = State::Ready;
                Ok(isolate)
            }
            Stop::Finished(Err(e)) => Err(IsolateError::Setup(format!(
                "the isolate guest failed before it was ready: {e}"
            ))),
            Stop::Finished(Ok(_)) => Err(IsolateError::Setup(
                "the isolate guest reported a result before it was given a job".into(),
            )),
        }
    }

    /// A new isolate showing `template` copy-on-write, ready for a job.
    pub fn from_template(template: &Arc<Template>) -> Result<Isolate, IsolateError> {
        let ram = GuestRam::from_template(&template.ram, template.ram_size)
            .map_err(|e| IsolateError::Setup(e.to_string()))?;
        let (vm, vcpu) = new_vm(&ram, true)?;
        let mut isolate = Isolate {
            vcpu,
            vm,
            ram,
            config: template.config,
            template: Some(template.clone()),
            state: State::Used,
        };
        isolate.load_template_registers()?;
        isolate.state = State::Ready;
        Ok(isolate)
    }

    fn load_template_registers(&mut self) -> Result<(), IsolateError> {
        let t = self.template.as_ref().ok_or_else(|| {
            IsolateError::Setup("this isolate has no template to reset to".into())
        })?;
        self.vcpu
            .set_sregs(&t.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        self.vcpu
            .set_regs(&t.regs)
            .map_err(kvm_err("KVM_SET_REGS"))?;
        self.vcpu.set_fpu(&t.fpu).map_err(kvm_err("KVM_SET_FPU"))
    }

    /// Back to the template's state: its private pages dropped, its registers reloaded.
    pub fn reset(&mut self) -> Result<(), IsolateError> {
        if self.template.is_none() {
            return Err(IsolateError::Setup(
                "a one-off isolate cannot be reset".into(),
            ));
        }
        // Only the pages written since the last reset are dropped; the ones only read stay mapped.
        let bitmap = self
            .vm
            .get_dirty_log(0, self.ram.size())
            .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
        let written = bitmap.iter().enumerate().flat_map(|(word, bits)| {
            (0..64)
                .filter(move |bit| bits & (1u64 << bit) != 0)
                .map(move |bit| word * 64 + bit)
        });
        self.ram
            .discard(written)
            .map_err(|e| IsolateError::Setup(e.to_string()))?;
        self.load_template_registers()?;
        self.state = State::Ready;
        Ok(())
    }

    pub fn config(&self) -> &IsolateConfig {
        &self.config
    }

    /// Runs one job. An isolate runs one job between resets.
    pub fn run(
        &mut self,
        job: &JobSpec,
        ctx: &mut HostContext<'_>,
    ) -> Result<Vec<Value>, IsolateError> {
        if self.state != State::Ready {
            return Err(IsolateError::Setup(
                "this isolate already ran a job; reset it (or take another from the pool)".into(),
            ));
        }
        if job.module.len() > self.config.max_module_bytes {
            return Err(IsolateError::ModuleTooLarge {
                size: job.module.len(),
                max: self.config.max_module_bytes,
            });
        }
        let s = sizes(&self.config);
        let mut encoded = vec![0u8; Job::encoded_len(&job.module, &job.function, &job.args)];
        Job::encode(&mut encoded, &job.module, &job.function, &job.args)
            .map_err(|_| IsolateError::BadArguments("the job does not encode".into()))?;
        if encoded.len() > s.input {
            return Err(IsolateError::BadArguments(format!(
                "the function name and arguments take {} bytes beyond the module; at most {} fit",
                encoded.len() - job.module.len(),
                JOB_OVERHEAD
            )));
        }
        self.state = State::Used;
        self.ram
            .write(layout::INPUT, &encoded)
            .map_err(|e| IsolateError::Setup(e.to_string()))?;
        let limits = RunLimits::start(job.cpu_limit, job.wall_limit)
            .map_err(|e| IsolateError::Setup(format!("cannot arm the run's timers: {e}")))?;
        let mut calls =
            |call: u32, ram: &mut GuestRam, deadline| hostcalls::handle(call, ram, ctx, deadline);
        match self.drive(&limits, false, &mut calls)? {
            Stop::Finished(result) => result,
            Stop::Ready => Err(IsolateError::Crashed(
                "the guest asked for a job again".into(),
            )),
        }
    }

    /// KVM_RUN until the guest is ready (when `booting`) or its job is finished, passing host
    /// calls to `hostcall`.
    fn drive(
        &mut self,
        limits: &RunLimits,
        booting: bool,
        hostcall: &mut dyn FnMut(u32, &mut GuestRam, Instant) -> After,
    ) -> Result<Stop, IsolateError> {
        let limit_error = |x: Exceeded| match x {
            Exceeded::Cpu => IsolateError::CpuLimitExceeded {
                limit: limits.cpu_limit(),
            },
            Exceeded::Wall => IsolateError::WallLimitExceeded {
                limit: limits.wall_limit(),
            },
        };
        loop {
            let exit = match self.vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if let Some(x) = limits.exceeded() {
                        return Err(limit_error(x));
                    }
                    continue;
                }
                Err(e) => return Err(IsolateError::Kvm(format!("KVM_RUN: {e}"))),
            };
            match exit {
                VcpuExit::IoOut(HYPERCALL_PORT, data) => {
                    let call = port_value(data);
                    if booting && call == Call::Ready as u32 {
                        return Ok(Stop::Ready);
                    }
                    match hostcall(call, &mut self.ram, limits.wall_deadline()) {
                        After::Resume => {
                            if let Some(x) = limits.exceeded() {
                                return Err(limit_error(x));
                            }
                        }
                        After::Finished(r) => return Ok(Stop::Finished(r)),
                    }
                }
                VcpuExit::IoOut(FAULT_PORT, data) => {
                    let vector = port_value(data) as u8;
                    return Err(IsolateError::Crashed(self.describe_fault(vector)));
                }
                VcpuExit::IoOut(port, _) | VcpuExit::IoIn(port, _) => {
                    return Err(IsolateError::Crashed(format!(
                        "the guest used I/O port {port:#x}"
                    )));
                }
                VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _) => {
                    return Err(IsolateError::Crashed(format!(
                        "the guest touched {addr:#x}, beyond its {} MiB of RAM",
                        self.ram.size() >> 20
                    )));
                }
                VcpuExit::Intr => {
                    if let Some(x) = limits.exceeded() {
                        return Err(limit_error(x));
                    }
                }
                VcpuExit::Shutdown => {
                    return Err(IsolateError::Crashed(
                        "triple fault (the fault handler itself faulted)".into(),
                    ))
                }
                VcpuExit::Hlt => return Err(IsolateError::Crashed("the guest halted".into())),
                VcpuExit::FailEntry(reason, _) => {
                    return Err(IsolateError::Kvm(format!(
                        "VM entry failed (hardware reason {reason:#x})"
                    )))
                }
                VcpuExit::InternalError => {
                    return Err(IsolateError::Kvm("KVM internal error".into()))
                }
                other => return Err(IsolateError::Crashed(format!("unexpected exit {other:?}"))),
            }
        }
    }

    fn describe_fault(&self, vector: u8) -> String {
        let name = isolate_abi::vector_name(vector);
        let frame = match machine::read_fault_frame(&self.ram, vector) {
            Ok(f) => f,
            Err(e) => return format!("{name} (frame unreadable: {e})"),
        };
        let mut s = format!("{name} at rip {:#x}", frame.rip);
        if let Some(code) = frame.error_code {
            s.push_str(&format!(", error code {code:#x}"));
        }
        if vector == 14 {
            if let Ok(sregs) = self.vcpu.get_sregs() {
                s.push_str(&format!(", address {:#x}", sregs.cr2));
            }
        }
        s
    }
}

enum Stop {
    Ready,
    Finished(Result<Vec<Value>, IsolateError>),
}

fn port_value(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

/// `track_writes`: KVM logs the guest's writes (the pages [`Isolate::reset`] drops).
fn new_vm(ram: &GuestRam, track_writes: bool) -> Result<(VmFd, VcpuFd), IsolateError> {
    let kvm = kvm()?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: if track_writes {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: 0,
        memory_size: ram.size() as u64,
        userspace_addr: ram.host_addr(),
    };
    // SAFETY: the region is `ram`'s mapping, which outlives the VM (Isolate drops the VM first)
    // and is never unmapped or moved while the VM exists (resets only drop private pages).
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    vcpu.set_cpuid2(supported_cpuid()?)
        .map_err(kvm_err("KVM_SET_CPUID2"))?;
    Ok((vm, vcpu))
}
