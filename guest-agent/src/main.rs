//! agentvm-guest-agent: the guest's /init.
//!
//! Boot sequence: watch signals, mount devtmpfs, take over the console (raw), mount the rest, load
//! the initramfs modules with their command-line parameters, set hostname and environment, start
//! the protocol server on vsock port [`AGENT_VSOCK_PORT`] (the host drives everything through
//! it), print the ready marker, wait for a poweroff signal, power off. No step is fatal: each
//! failure is an `@@agentvm:error` line and the boot goes on as far as it can.

use std::ffi::OsString;
use std::io::{self, Write};
use std::path::Path;

use agentvm_protocol::{Version, AGENT_VSOCK_PORT};
use guest_agent::cmdline::{KernelCmdline, PROC_CMDLINE};
use guest_agent::console::{self, ConsoleWriter};
use guest_agent::console_protocol::{Marker, NO_SERVER};
use guest_agent::egress_ca;
use guest_agent::loopback;
use guest_agent::modules::{load_modules, FinitModule, ModuleOutcome, MODULE_DIR};
use guest_agent::mounts;
use guest_agent::network::{self, NicOutcome};
use guest_agent::power::{self, signal_name, SignalWatcher};
use guest_agent::server::unix_listener::serve_unix_socket;
use guest_agent::server::{self, Services};
use guest_agent::vsock::VsockListener;

const DEFAULT_HOSTNAME: &str = "agentvm";
const HOSTNAME_PARAM: &str = "agentvm.hostname";
const DEBUG_PARAM: &str = "agentvm.debug";
const TEST_PROTOCOL_VERSION_PARAM: &str = "agentvm.test_protocol_version";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const HOME: &str = "/root";

fn main() {
    if std::process::id() != 1 {
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        if let [flag, path] = args.as_slice() {
            if flag == "--listen-unix" {
                let error = serve_unix_socket(Path::new(path), || {
                    // Tests and scripts wait for this line before connecting.
                    println!(
                        "agentvm-guest-agent: listening on {}",
                        path.to_string_lossy()
                    );
                });
                eprintln!("agentvm-guest-agent: {error}");
                std::process::exit(1);
            }
        }
        eprintln!(
            "agentvm-guest-agent: this is the agentvm guest's init and must run as PID 1; \
             its logic is exercised on the host through the guest_agent library tests, and \
             `agentvm-guest-agent --listen-unix PATH` serves the agent protocol on a Unix socket"
        );
        std::process::exit(2);
    }
    init()
}

fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

fn ms_since(start_ns: u64) -> f64 {
    boottime_ns().saturating_sub(start_ns) as f64 / 1e6
}

fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: sethostname reads exactly `len` bytes from the pointer.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn init() -> ! {
    let started_ns = boottime_ns();
    // Before anything else: a poweroff signal sent during boot must stay pending until we look.
    let mut signals = SignalWatcher::install();
    let mut early_errors = Vec::new();
    if let Err(e) = mounts::mount(&mounts::DEVTMPFS) {
        early_errors.push(e.to_string());
    }
    let sink: Box<dyn Write> = match console::open_console() {
        Ok(file) => {
            if let Err(e) = console::set_raw(&file) {
                early_errors.push(format!("cannot put {} in raw mode: {e}", console::CONSOLE));
            }
            Box::new(file)
        }
        Err(e) => {
            early_errors.push(format!("cannot open {}: {e}", console::CONSOLE));
            Box::new(io::stdout())
        }
    };
    let mut out = ConsoleWriter::new(sink);
    for message in early_errors {
        out.error(message);
    }
    if let Err(e) = &signals {
        out.error(format!("cannot watch signals: {e}"));
    }

    for spec in mounts::SYSTEM_MOUNTS {
        if let Err(e) = mounts::mount(spec) {
            out.error(e);
        }
    }
    for e in mounts::create_dev_symlinks() {
        out.error(e);
    }

    let cmdline = match std::fs::read(PROC_CMDLINE) {
        Ok(bytes) => KernelCmdline::parse(&String::from_utf8_lossy(&bytes)),
        Err(e) => {
            out.error(format!("cannot read {PROC_CMDLINE}: {e}"));
            KernelCmdline::default()
        }
    };
    out.set_debug(cmdline.flag(DEBUG_PARAM));
    out.debug(format_args!(
        "started at {:.1} ms after boot; {} command-line items",
        started_ns as f64 / 1e6,
        cmdline.params().len()
    ));

    load_guest_modules(&cmdline, &mut out);

    let hostname = cmdline.value(HOSTNAME_PARAM).unwrap_or(DEFAULT_HOSTNAME);
    if let Err(e) = set_hostname(hostname) {
        out.error(format!("cannot set hostname {hostname}: {e}"));
    }
    if let Err(e) = loopback::bring_up_loopback() {
        out.error(format!("cannot bring up the loopback interface: {e}"));
    }
    match network::configure_nic(Path::new(network::RESOLV_CONF)) {
        Ok(NicOutcome::Configured) => {
            out.debug(format_args!("network: eth0 configured"));
            // Without it intercepted HTTPS fails verification; everything else still works.
            let store = egress_ca::TrustStore::system();
            match egress_ca::install_egress_ca(egress_ca::gateway_endpoint(), &store) {
                Ok(()) => out.debug(format_args!(
                    "network: egress CA installed in {}",
                    store.bundle.display()
                )),
                Err(e) => out.error(format!("network: {e}")),
            }
        }
        Ok(NicOutcome::Absent) => {}
        Err(e) => out.error(format!("network: {e}")),
    }
    // Still single-threaded: nothing else reads the environment concurrently.
    std::env::set_var("PATH", PATH);
    std::env::set_var("HOME", HOME);
    if std::env::var_os("TERM").is_none() {
        std::env::set_var("TERM", "linux");
    }
    if !Path::new(HOME).is_dir() {
        if let Err(e) = std::fs::create_dir_all(HOME) {
            out.error(format!("cannot create {HOME}: {e}"));
        }
    }

    if let Some(param) = cmdline.get(TEST_PROTOCOL_VERSION_PARAM) {
        match parse_version(param.value.as_deref().unwrap_or("")) {
            Some(version) => server::advertise_protocol_version(version),
            None => out.error(format_args!(
                "bad {TEST_PROTOCOL_VERSION_PARAM}: expected MAJOR.MINOR"
            )),
        }
    }
    start_server(&mut out);

    let ready_ns = boottime_ns();
    out.debug(format_args!(
        "ready after {:.1} ms in the agent",
        ms_since(started_ns)
    ));
    out.marker(&Marker::Ready { boot_ns: ready_ns });

    let signal = power::wait_for_power_signal(signals.as_mut().ok(), &mut out);
    out.info(format_args!(
        "received {}: powering off",
        signal_name(signal)
    ));
    power::power_off(&mut out)
}

/// Listens on the agent's vsock port and serves host connections on background threads. A
/// failure is reported on the console; the guest then stays up without an agent, which the host
/// sees as a connection timeout with this console line in its diagnostics.
fn start_server<W: Write>(out: &mut ConsoleWriter<W>) {
    let services = match Services::new() {
        Ok(services) => services,
        Err(e) => {
            return out.error(format_args!(
                "{NO_SERVER}cannot start the agent's services: {e}"
            ))
        }
    };
    let listener = match VsockListener::bind(AGENT_VSOCK_PORT) {
        Ok(listener) => listener,
        Err(e) => {
            return out.error(format_args!(
            "{NO_SERVER}cannot listen on vsock port {AGENT_VSOCK_PORT} (is there a virtio-vsock device?): {e}"
        ))
        }
    };
    let spawned = std::thread::Builder::new()
        .name("vsock-accept".into())
        .spawn(move || {
            let error = server::serve_listener_forever(|| listener.accept(), &services);
            eprintln!("@@agentvm:error accepting vsock connections failed: {error}");
        });
    if let Err(e) = spawned {
        out.error(format_args!("cannot start the vsock accept thread: {e}"));
    }
}

fn parse_version(text: &str) -> Option<Version> {
    let (major, minor) = text.split_once('.')?;
    Some(Version {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
    })
}

fn load_guest_modules<W: Write>(cmdline: &KernelCmdline, out: &mut ConsoleWriter<W>) {
    let start = boottime_ns();
    let report = match load_modules(Path::new(MODULE_DIR), cmdline, &mut FinitModule) {
        Ok(report) => report,
        Err(e) => {
            out.error(format_args!("modules: {e}"));
            return;
        }
    };
    for module in &report.modules {
        match &module.outcome {
            ModuleOutcome::Failed(reason) => {
                out.error(format_args!("module {}: {reason}", module.name));
            }
            outcome => out.debug(format_args!(
                "module {} {}{}",
                module.name,
                if *outcome == ModuleOutcome::Loaded {
                    "loaded"
                } else {
                    "already present"
                },
                if module.params.is_empty() {
                    String::new()
                } else {
                    format!(" with {}", module.params)
                }
            )),
        }
    }
    out.info(format_args!(
        "modules: {} loaded, {} failed, {} total in {:.1} ms",
        report.loaded_count(),
        report.failures().count(),
        report.modules.len(),
        ms_since(start)
    ));
}
