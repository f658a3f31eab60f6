//! Creates the guest's devices, puts them on the port-I/O and MMIO buses, wires their interrupts
//! (irqfd) and queue notifications (ioeventfd) into KVM, and runs the device event loop.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::legacy::{
    CallbackTrigger, EventFdTrigger, Serial, I8042, I8042_PORT_BASE, I8042_PORT_LEN,
    SERIAL_COM1_BASE, SERIAL_COM1_IRQ, SERIAL_PORT_LEN,
};
use devices::virtio::net::{Net, NetState};
use devices::virtio::rng::Rng;
use devices::virtio::vsock::{Vsock, VsockMetrics};
use devices::virtio::{kernel_cmdline_device, MmioTransport, QUEUE_NOTIFY_OFFSET};
use devices::GuestMemoryMmap;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{NetConfig, VsockConfig};
use crate::exit::VmmEvent;
use crate::seccomp::{ThreadKind, ThreadSeccomp};

/// How long the device thread may take to put itself under its seccomp filter.
const FILTER_START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd for {what}: {source}")]
    EventFd {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot register {what} with KVM: {source}")]
    Kvm {
        what: String,
        source: kvm_ioctls::Error,
    },
    #[error("cannot place {what} on the I/O bus: {source}")]
    Bus {
        what: String,
        source: vm_device::bus::Error,
    },
    #[error("cannot create the {what} device: {reason}")]
    Create { what: &'static str, reason: String },
    #[error("no free GSI for another virtio-mmio device (max {0})")]
    OutOfIrqs(u32),
    #[error("cannot start the device event loop: {0}")]
    EventLoop(String),
    #[error("device event loop: {0}")]
    Seccomp(String),
    #[error("snapshot device state: {0}")]
    Restore(String),
}

/// Every device's state in a snapshot: COM1, the virtio-mmio slots in slot order (the i8042
/// has none worth keeping: it only forwards the reset line), and the NIC's own part if the VM
/// has one. The NIC's egress filter is not saved: its policy may hold credentials, which never
/// go to disk, so the restore names the policy again and starts a fresh filter (see
/// `crate::guest_nic`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    pub serial: devices::legacy::SerialSnapshot,
    pub virtio: Vec<devices::virtio::MmioTransportState>,
    pub net: Option<NetState>,
}

/// The vsock device's name among the virtio-mmio transports.
const VSOCK_NAME: &str = "virtio-vsock";
/// The NIC's name among the virtio-mmio transports.
const NET_NAME: &str = "virtio-net";

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

pub struct DeviceManager {
    io: Arc<IoManager>,
    serial: Arc<Mutex<Serial>>,
    event_manager: Option<EventManager<Subscriber>>,
    event_loop: Option<EventLoop>,
    cmdline_args: Vec<String>,
    acpi_devices: Vec<arch::AcpiMmioDevice>,
    vsock_metrics: Option<VsockMetrics>,
    /// The NIC's egress filter thread, if the VM has a NIC.
    egress: Option<egress::EgressHandle>,
    net_metrics: Option<devices::virtio::net::NetMetrics>,
    /// The NIC itself, for its part of a snapshot.
    net_device: Option<Arc<Mutex<Net>>>,
    /// The virtio-mmio transports in slot order, for snapshots.
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Their device names, in the same order (for diagnostics).
    transport_names: Vec<&'static str>,
}

impl DeviceManager {
    pub fn new(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        console: Box<dyn Write + Send>,
        events: Sender<VmmEvent>,
        vsock: Option<&VsockConfig>,
        net: Option<(&NetConfig, ThreadSeccomp)>,
        restore: Option<&DeviceStates>,
    ) -> Result<Self, DeviceError> {
        let mut io = IoManager::new();
        let mut event_manager = EventManager::<Subscriber>::new()
            .map_err(|e| DeviceError::EventLoop(format!("{e:?}")))?;

        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
            what: "the serial interrupt",
            source,
        })?;
        vm.register_irqfd(&serial_irq, SERIAL_COM1_IRQ)
            .map_err(|source| DeviceError::Kvm {
                what: "the serial irqfd".into(),
                source,
            })?;
        let serial = match restore {
            Some(states) => {
                Serial::from_snapshot(&states.serial, EventFdTrigger::new(serial_irq), console)
                    .map_err(DeviceError::Restore)?
            }
            None => Serial::new(EventFdTrigger::new(serial_irq), console),
        };
        let serial = Arc::new(Mutex::new(serial));
        io.register_pio(
            PioRange::new(PioAddress(SERIAL_COM1_BASE), SERIAL_PORT_LEN).map_err(|source| {
                DeviceError::Bus {
                    what: "COM1".into(),
                    source,
                }
            })?,
            serial.clone(),
        )
        .map_err(|source| DeviceError::Bus {
            what: "COM1".into(),
            source,
        })?;

        let i8042 = I8042::new(CallbackTrigger::new(move || {
            let _ = events.send(VmmEvent::GuestReset);
        }));
        io.register_pio(
            PioRange::new(PioAddress(I8042_PORT_BASE), I8042_PORT_LEN).map_err(|source| {
                DeviceError::Bus {
                    what: "i8042".into(),
                    source,
                }
            })?,
            Arc::new(Mutex::new(i8042)),
        )
        .map_err(|source| DeviceError::Bus {
            what: "i8042".into(),
            source,
        })?;

        let mut manager = Self {
            io: Arc::new(IoManager::new()),
            serial,
            event_manager: None,
            event_loop: None,
            cmdline_args: Vec::new(),
            acpi_devices: Vec::new(),
            vsock_metrics: None,
            egress: None,
            net_metrics: None,
            net_device: None,
            transports: Vec::new(),
            transport_names: Vec::new(),
        };

        let rng = Arc::new(Mutex::new(Rng::new().map_err(|e| DeviceError::Create {
            what: "virtio-rng",
            reason: e.to_string(),
        })?));
        event_manager.add_subscriber(rng.clone());
        manager.add_virtio_mmio(vm, mem, &mut io, rng, "virtio-rng")?;

        if let Some(config) = vsock {
            let device = Vsock::new(config.guest_cid, &config.uds_path).map_err(|e| {
                DeviceError::Create {
                    what: "virtio-vsock",
                    reason: e.to_string(),
                }
            })?;
            manager.vsock_metrics = Some(device.metrics());
            let device = Arc::new(Mutex::new(device));
            event_manager.add_subscriber(device.clone());
            manager.add_virtio_mmio(vm, mem, &mut io, device, VSOCK_NAME)?;
        }

        if let Some((config, seccomp)) = net {
            let saved = restore.and_then(|states| states.net.as_ref());
            let (device, egress) = crate::guest_nic::create(config, seccomp, saved)?;
            manager.net_metrics = Some(device.metrics());
            manager.egress = Some(egress);
            let device = Arc::new(Mutex::new(device));
            manager.net_device = Some(device.clone());
            event_manager.add_subscriber(device.clone());
            manager.add_virtio_mmio(vm, mem, &mut io, device, NET_NAME)?;
        }

        if let Some(states) = restore {
            manager.restore_virtio(&states.virtio)?;
        }
        manager.io = Arc::new(io);
        manager.event_manager = Some(event_manager);
        Ok(manager)
    }

    /// Each virtio-mmio transport with its device's name, in slot order.
    pub fn named_transports(&self) -> Vec<(&'static str, Arc<Mutex<MmioTransport>>)> {
        self.transport_names
            .iter()
            .copied()
            .zip(self.transports.iter().cloned())
            .collect()
    }

    /// Whether the guest's driver has activated the vsock device (false without one): without a
    /// driver no guest agent can answer over vsock.
    pub fn vsock_driver_ready(&self) -> bool {
        self.named_transports()
            .into_iter()
            .filter(|(name, _)| *name == VSOCK_NAME)
            .any(|(_, transport)| {
                let transport = transport.lock().unwrap_or_else(|e| e.into_inner());
                let device = transport.device().lock().unwrap_or_else(|e| e.into_inner());
                device.is_activated()
            })
    }

    /// The vsock device's traffic counters, if the VM has one.
    pub fn vsock_metrics(&self) -> Option<VsockMetrics> {
        self.vsock_metrics.clone()
    }

    /// Whether the VM has a NIC (and so an egress filter).
    pub fn has_nic(&self) -> bool {
        self.egress.is_some()
    }

    /// Replaces the egress policy; new connections and DNS answers follow it. False when the VM
    /// has no NIC.
    pub fn set_egress_policy(&self, policy: egress::policy::Policy) -> bool {
        match &self.egress {
            Some(egress) => {
                egress.set_policy(policy);
                true
            }
            None => false,
        }
    }

    /// The NIC's frame counters and the egress filter's connection counters, if the VM has a NIC.
    pub fn net_counts(&self) -> Option<(devices::virtio::net::NetCounts, egress::EgressStats)> {
        self.net_counts_reader().map(|reader| reader.read())
    }

    /// [`DeviceManager::net_counts`] for other threads, if the VM has a NIC.
    pub fn net_counts_reader(&self) -> Option<crate::guest_nic::NetCountsReader> {
        Some(crate::guest_nic::NetCountsReader {
            device: self.net_metrics.clone()?,
            egress: self.egress.as_ref()?.stats_reader(),
        })
    }

    /// Puts saved transport state into the (fresh) virtio slots, which must be the same devices
    /// in the same order; re-activates those the guest had activated.
    fn restore_virtio(
        &self,
        states: &[devices::virtio::MmioTransportState],
    ) -> Result<(), DeviceError> {
        if states.len() != self.transports.len() {
            return Err(DeviceError::Restore(format!(
                "the snapshot has {} virtio devices, this VM has {}",
                states.len(),
                self.transports.len()
            )));
        }
        for (slot, (transport, state)) in self.transports.iter().zip(states).enumerate() {
            transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore_state(state)
                .map_err(|e| DeviceError::Restore(format!("virtio slot {slot}: {e}")))?;
        }
        Ok(())
    }

    /// Every device's state, then `while_quiet` (saving guest memory) before any device may run
    /// again: the device thread serves queues on its own, so without holding every device's lock
    /// across both, a request served in between would be in memory but not in the ring positions
    /// (and served twice after a restore). The vCPUs must be parked, so no register access is in
    /// flight either.
    pub fn save_state_quiesced<R>(&self, while_quiet: impl FnOnce() -> R) -> (DeviceStates, R) {
        // Taken before the transports' locks (the device's own lock is among those): its MAC and
        // MTU never change after creation, so the moment does not matter.
        let net = self
            .net_device
            .as_ref()
            .map(|net| net.lock().unwrap_or_else(|e| e.into_inner()).save_state());
        let transports: Vec<_> = self
            .transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let devices: Vec<_> = transports.iter().map(|t| t.device().clone()).collect();
        let device_guards: Vec<_> = devices
            .iter()
            .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let states = DeviceStates {
            serial: serial.save_state(),
            virtio: transports
                .iter()
                .zip(&device_guards)
                .map(|(t, d)| t.save_state_with(&**d))
                .collect(),
            net,
        };
        let result = while_quiet();
        (states, result)
    }

    /// Puts a virtio device behind the next virtio-mmio slot: bus registration, ioeventfds for its
    /// queues, irqfd for its interrupt, and the kernel command-line declaration.
    fn add_virtio_mmio<D>(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        io: &mut IoManager,
        device: Arc<Mutex<D>>,
        name: &'static str,
    ) -> Result<(), DeviceError>
    where
        D: devices::virtio::VirtioDevice + Send + 'static,
    {
        let slot = self.cmdline_args.len() as u64;
        let gsi = arch::layout::IRQ_BASE + slot as u32;
        if gsi > arch::layout::IRQ_MAX {
            return Err(DeviceError::OutOfIrqs(arch::layout::IRQ_MAX));
        }
        let base = arch::layout::VIRTIO_MMIO_BASE + slot * arch::layout::VIRTIO_MMIO_SIZE;
        let transport =
            MmioTransport::new(mem.clone(), device).map_err(|e| DeviceError::Create {
                what: name,
                reason: e.to_string(),
            })?;
        for (queue, evt) in transport.queue_notify_events() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                queue,
            )
            .map_err(|source| DeviceError::Kvm {
                what: format!("{name} queue {queue} ioeventfd"),
                source,
            })?;
        }
        vm.register_irqfd(transport.interrupt_event(), gsi)
            .map_err(|source| DeviceError::Kvm {
                what: format!("{name} irqfd"),
                source,
            })?;
        let range = MmioRange::new(MmioAddress(base), arch::layout::VIRTIO_MMIO_SIZE).map_err(
            |source| DeviceError::Bus {
                what: name.into(),
                source,
            },
        )?;
        let transport = Arc::new(Mutex::new(transport));
        self.transports.push(transport.clone());
        self.transport_names.push(name);
        io.register_mmio(range, transport)
            .map_err(|source| DeviceError::Bus {
                what: name.into(),
                source,
            })?;
        // Both declarations: ACPI for kernels like Debian's (no command-line devices), the command
        // line for minimal kernels built without ACPI.
        self.cmdline_args.push(kernel_cmdline_device(base, gsi));
        self.acpi_devices.push(arch::AcpiMmioDevice {
            base,
            size: arch::layout::VIRTIO_MMIO_SIZE,
            gsi,
        });
        Ok(())
    }

    /// Kernel command-line arguments that declare the virtio-mmio devices (no ACPI/DT here).
    pub fn cmdline_device_args(&self) -> Vec<String> {
        self.cmdline_args.clone()
    }

    /// The virtio-mmio devices, for the ACPI DSDT.
    pub fn acpi_devices(&self) -> &[arch::AcpiMmioDevice] {
        &self.acpi_devices
    }

    pub fn io_manager(&self) -> Arc<IoManager> {
        self.io.clone()
    }

    pub fn start_event_loop(&mut self, seccomp: ThreadSeccomp) -> Result<(), DeviceError> {
        if let Some(em) = self.event_manager.take() {
            self.event_loop = Some(EventLoop::start(em, seccomp)?);
        }
        Ok(())
    }

    pub fn shutdown(&mut self) {
        if let Some(event_loop) = self.event_loop.take() {
            event_loop.stop();
        }
        if let Some(egress) = self.egress.take() {
            egress.shutdown();
        }
        if let Ok(mut serial) = self.serial.lock() {
            let _ = serial.flush();
        }
    }
}

/// The device thread: one epoll loop (event-manager) for every device's queue eventfds.
struct EventLoop {
    exit: Arc<EventFd>,
    handle: JoinHandle<()>,
}

/// Wakes the loop so it can see the stop flag.
struct ExitSubscriber {
    evt: Arc<EventFd>,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for ExitSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped.store(true, Ordering::Release);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.evt.as_ref(), EventSet::IN)) {
            tracing::error!("device event loop cannot watch its exit event: {e:?}");
        }
    }
}

impl EventLoop {
    fn start(
        mut em: EventManager<Subscriber>,
        seccomp: ThreadSeccomp,
    ) -> Result<Self, DeviceError> {
        let exit = Arc::new(
            EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
                what: "the device loop exit",
                source,
            })?,
        );
        let stopped = Arc::new(AtomicBool::new(false));
        em.add_subscriber(Arc::new(Mutex::new(ExitSubscriber {
            evt: exit.clone(),
            stopped: stopped.clone(),
        })));
        let (filtered_tx, filtered) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                let entered = seccomp
                    .enter(ThreadKind::Devices)
                    .map_err(|e| e.to_string());
                let ok = entered.is_ok();
                let _ = filtered_tx.send(entered);
                if !ok {
                    return;
                }
                while !stopped.load(Ordering::Acquire) {
                    if let Err(e) = em.run() {
                        tracing::error!("device event loop failed: {e:?}");
                        break;
                    }
                }
            })
            .map_err(|e| DeviceError::EventLoop(e.to_string()))?;
        // Known before the VM runs: a device thread without its filter is a failed boot.
        match filtered.recv_timeout(FILTER_START_TIMEOUT) {
            Ok(Ok(())) => Ok(Self { exit, handle }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(DeviceError::Seccomp(e))
            }
            Err(_) => {
                let _ = exit.write(1);
                Err(DeviceError::Seccomp(format!(
                    "the thread did not install its seccomp filter within {FILTER_START_TIMEOUT:?}"
                )))
            }
        }
    }

    fn stop(self) {
        let _ = self.exit.write(1);
        let _ = self.handle.join();
    }
}
