//! agent-e2e: the guest agent end to end with a real Linux guest, run inside the nested test host
//! (see `tests/tests/agent_e2e.rs`). It boots guests with `agentvm boot --vsock-uds`, drives them
//! with the host client library over vsock (and one with `agentvm serve` through the per-VM
//! API's `/sandbox/...` routes), and prints one line per check:
//!
//! ```text
//! E2E <check> ok <detail>
//! E2E <check> fail <why>
//! ```
//!
//! (details on one line, newlines escaped as `\n`), then `E2E-DONE`. Each check is independent:
//! one failing does not stop the others.

mod api;
mod checks;
mod cli;
mod daemon;
mod net;
mod snapshot;
mod soak;
mod vm;
mod watchdog;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm::{BootOptions, Guest};

pub struct Args {
    pub agentvm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub work_dir: PathBuf,
    /// `--only api`: run only the API, snapshot and daemon checks, for iterating on them.
    pub only_api: bool,
    /// `--only soak`: take a snapshot and run only the soak (tests/tests/soak.rs).
    pub only_soak: bool,
    /// `--soak-iterations N`: sandboxes the soak goes through.
    pub soak_iterations: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut agentvm, mut kernel, mut initrd, mut work_dir) = (None, None, None, None);
    let (mut only_api, mut only_soak) = (false, false);
    let mut soak_iterations = soak::DEFAULT_ITERATIONS;
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .map(PathBuf::from)
            .ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--soak-iterations" => {
                soak_iterations = value
                    .to_str()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("--soak-iterations {}: not a count", value.display()))?
            }
            "--only" if value.as_os_str() == "soak" => only_soak = true,
            "--agentvm" => agentvm = Some(value),
            "--kernel" => kernel = Some(value),
            "--initrd" => initrd = Some(value),
            "--work" => work_dir = Some(value),
            "--only" if value.as_os_str() == "api" => only_api = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let need = |v: Option<PathBuf>, name: &str| v.ok_or_else(|| format!("{name} is required"));
    Ok(Args {
        agentvm: need(agentvm, "--agentvm")?,
        kernel: need(kernel, "--kernel")?,
        initrd: need(initrd, "--initrd")?,
        work_dir: need(work_dir, "--work")?,
        only_api,
        only_soak,
        soak_iterations,
    })
}

/// Progress on stderr and, inside the nested test host, on L1's console (which the host keeps in
/// its console log while the scenario runs), so a slow check can be seen while it is slow.
pub fn progress(message: std::fmt::Arguments<'_>) {
    eprintln!("agent-e2e: {message}");
    if let Ok(mut console) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
        use std::io::Write;
        let _ = writeln!(console, "agent-e2e: {message}");
    }
}

pub fn report(name: &str, result: Result<String, String>) {
    let (verdict, detail) = match result {
        Ok(d) => ("ok", d),
        Err(d) => ("fail", d),
    };
    println!("E2E {name} {verdict} {}", detail.replace('\n', "\\n"));
}

/// Where the checks' guests write their consoles (the watchdog shows their tails).
static WORK_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Runs `check` under the [`watchdog`] and reports it with its duration.
pub fn timed(name: &str, check: impl FnOnce() -> Result<String, String>) {
    timed_within(name, watchdog::CHECK_LIMIT, check)
}

/// [`timed`] with the watchdog's limit set to `limit`.
pub fn timed_within(name: &str, limit: Duration, check: impl FnOnce() -> Result<String, String>) {
    let start = Instant::now();
    progress(format_args!("{name} ..."));
    let work_dir = WORK_DIR.get().map_or(Path::new("/tmp"), |p| p.as_path());
    let watchdog = watchdog::Watchdog::start_with_limit(name, work_dir, limit);
    let result = check();
    watchdog.finish(result.is_err());
    let secs = start.elapsed().as_secs_f64();
    match &result {
        Ok(_) => progress(format_args!("{name} ok after {secs:.1} s")),
        Err(why) => progress(format_args!("{name} FAILED after {secs:.1} s: {why}")),
    }
    report(
        name,
        result
            .map(|d| format!("{d} ({secs:.1} s)"))
            .map_err(|d| format!("{d} ({secs:.1} s)")),
    );
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("agent-e2e: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = std::fs::create_dir_all(&args.work_dir) {
        eprintln!("agent-e2e: cannot create {}: {e}", args.work_dir.display());
        std::process::exit(2);
    }
    let _ = WORK_DIR.set(args.work_dir.clone());
    if args.only_soak {
        match snapshot::make_template(&args, &args.work_dir.join("soak-template")) {
            Ok(template) => soak::checks(&args, &template),
            Err(e) => report("soak", Err(format!("the template snapshot: {e}"))),
        }
    } else if args.only_api {
        api::checks(&args, false);
        snapshot::checks(&args, false);
        daemon::checks(&args);
    } else {
        let upstreams = client_checks(&args);
        cli::checks(&args);
        api::checks(&args, upstreams);
        if let Some(template) = snapshot::checks(&args, upstreams) {
            soak::checks(&args, &template);
        }
        daemon::checks(&args);
        version_mismatch(&args);
    }
    println!("E2E-DONE");
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// vCPUs of every guest the checks boot. One: L1 has a single CPU, and with two-vCPU guests the
/// emulation froze in most runs (the "wedge"), QEMU's monitor showing the guest spinning at one
/// kernel address with interrupts enabled, as a vCPU waiting on its descheduled sibling would
/// (an IPI or lock wait that only the sibling can end). Multi-vCPU snapshots are tested on this
/// machine's KVM (tests/tests/snapshot.rs).
pub const GUEST_VCPUS: u32 = 1;

/// The main guest's memory (the network checks scan all of it for a leaked secret).
const MAIN_MEM_MIB: u32 = 512;

/// Runs the checks on the main guest; true when the network checks' upstream servers are up
/// (later checks reuse them).
fn client_checks(args: &Args) -> bool {
    // The main guest also has a NIC behind the egress filter, for the network checks.
    let net = net::NetFixture::prepare(&args.work_dir);
    if let Err(e) = &net {
        report("net_setup", Err(e.clone()));
    }
    let mut guest = match Guest::boot(&BootOptions {
        agentvm: &args.agentvm,
        kernel: &args.kernel,
        initrd: &args.initrd,
        work_dir: &args.work_dir,
        name: "main",
        extra_cmdline: "",
        mem_mib: MAIN_MEM_MIB,
        extra_args: net.as_ref().map(|n| n.boot_args()).unwrap_or_default(),
        env: net.as_ref().map(|n| n.boot_env()).unwrap_or_default(),
    }) {
        Ok(g) => g,
        Err(e) => {
            report("boot", Err(e));
            return net.is_ok();
        }
    };
    let start = Instant::now();
    let client = match guest.connect(BOOT_TIMEOUT) {
        Ok(c) => c.with_call_timeout(Duration::from_secs(120)),
        Err(e) => {
            report(
                "boot",
                Err(format!("{e}\nconsole:\n{}", guest.console_tail(40))),
            );
            return net.is_ok();
        }
    };
    report(
        "boot",
        Ok(format!(
            "agent {} answered after {:.1} s",
            client.negotiated().peer.software_version,
            start.elapsed().as_secs_f64()
        )),
    );
    checks::run_all(&client, args);
    if let Ok(net) = &net {
        net::checks(&client, net, guest.child.id(), MAIN_MEM_MIB);
    }
    timed("agent_gone", || checks::agent_gone(&client, &mut guest));
    net.is_ok()
}

fn version_mismatch(args: &Args) {
    timed("version_mismatch", || {
        let mut guest = Guest::boot(&BootOptions {
            agentvm: &args.agentvm,
            kernel: &args.kernel,
            initrd: &args.initrd,
            work_dir: &args.work_dir,
            name: "mismatch",
            extra_cmdline: "agentvm.test_protocol_version=9.0",
            mem_mib: 256,
            extra_args: Vec::new(),
            env: Vec::new(),
        })?;
        match guest.connect(BOOT_TIMEOUT) {
            Ok(_) => Err("the client accepted an agent speaking protocol v9.0".into()),
            Err(e) => {
                let text = e.to_string();
                if text.contains("version mismatch") && text.contains("v9.0") {
                    Ok(text)
                } else {
                    Err(format!(
                        "unclear error: {text}\nconsole:\n{}",
                        guest.console_tail(20)
                    ))
                }
            }
        }
    });
}
