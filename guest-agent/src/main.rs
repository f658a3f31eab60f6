//! agentvm-guest-agent: the guest's /init.
//!
//! Boot sequence: watch signals, mount devtmpfs, take over the console (raw), mount the rest, load
//! the initramfs modules with their command-line parameters, set hostname and environment, print
//! the ready marker, run `agentvm.cmd` (or idle until a poweroff signal), power off. No step is
//! fatal: each failure is an `@@agentvm:error` line and the boot goes on as far as it can.

use std::ffi::OsString;
use std::io::{self, Write};
use std::path::Path;

use guest_agent::cmdline::{KernelCmdline, PROC_CMDLINE};
use guest_agent::console::{self, ConsoleWriter};
use guest_agent::console_protocol::{decode_cmd, ExitStatus, Marker, CMD_PARAM, EXEC_FAILURE_CODE};
use guest_agent::exec::{run_command, ExecOptions, ExecOutcome};
use guest_agent::modules::{load_modules, FinitModule, ModuleOutcome, MODULE_DIR};
use guest_agent::mounts;
use guest_agent::power::{self, signal_name, SignalWatcher};
use guest_agent::server::unix_listener::serve_unix_socket;

const DEFAULT_HOSTNAME: &str = "agentvm";
const HOSTNAME_PARAM: &str = "agentvm.hostname";
const DEBUG_PARAM: &str = "agentvm.debug";
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

    let ready_ns = boottime_ns();
    out.debug(format_args!(
        "ready after {:.1} ms in the agent",
        ms_since(started_ns)
    ));
    out.marker(&Marker::Ready { boot_ns: ready_ns });

    let power_signal = match cmdline.get(CMD_PARAM) {
        None => {
            out.info(format_args!(
                "no {CMD_PARAM} on the kernel command line; waiting for a poweroff signal"
            ));
            Some(power::idle_until_power_signal(
                signals.as_mut().ok(),
                &mut out,
            ))
        }
        Some(param) => match decode_cmd(param.value.as_deref().unwrap_or("")) {
            Err(e) => {
                out.error(format_args!("bad {CMD_PARAM}: {e}"));
                out.marker(&Marker::Exit(ExitStatus::Code(EXEC_FAILURE_CODE)));
                None
            }
            Ok(argv) => run(&argv, signals.as_mut().ok(), &mut out),
        },
    };
    if let Some(signal) = power_signal {
        out.info(format_args!(
            "received {}: powering off",
            signal_name(signal)
        ));
    }
    power::power_off(&mut out)
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

/// Runs the command; returns the power signal if one interrupted it.
fn run<W: Write>(
    argv: &[OsString],
    signals: Option<&mut SignalWatcher>,
    out: &mut ConsoleWriter<W>,
) -> Option<libc::c_int> {
    if out.debug_enabled() {
        out.debug(format_args!("exec {argv:?}"));
    }
    let options = ExecOptions {
        cwd: Some(HOME.into()),
        reap_orphans: true,
    };
    let start = boottime_ns();
    let outcome = run_command(argv, &options, out, signals);
    out.debug(format_args!(
        "command finished after {:.1} ms",
        ms_since(start)
    ));
    match outcome {
        ExecOutcome::Exited(_) => None,
        ExecOutcome::PowerRequested(signal) => Some(signal),
    }
}
