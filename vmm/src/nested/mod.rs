//! The nested test host: real Linux guests end to end on a machine whose own KVM cannot run them.
//!
//! QEMU with TCG and `-cpu EPYC,+svm` boots the distribution kernel ("L1") from an initramfs that
//! this module writes: busybox, the kvm modules (irqbypass, kvm, kvm-amd), the `agentvm` binary
//! and the L2 kernel + initramfs. L1's init loads the modules (kvm-amd with `npt=0`: with nested
//! paging the L2 sometimes never retires its first instruction), which gives it a real /dev/kvm,
//! then runs each [`Scenario`] (a shell script, typically calling `agentvm run ...`) with a
//! timeout, and reports exit code, stdout and stderr over a second serial port (see
//! `protocol.rs`). Inside a scenario, `$AGENTVM_L2_KERNEL` and `$AGENTVM_L2_INITRD` name the L2
//! files ([`L1_L2_KERNEL`], [`L1_L2_INITRD`]) and `agentvm` is on PATH ([`L1_AGENTVM`]).
//!
//! QEMU and the temporary files are cleaned up on every path out of [`NestedHost::run`], panics
//! included; QEMU also dies with this process (PR_SET_PDEATHSIG).

mod error;
mod hmp;
mod initramfs;
mod liveness;
mod protocol;
mod qemu;
mod script;

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

pub use error::NestedError;

/// qemu-system-x86_64 from PATH, installed with apt-get (Debian's qemu-system-x86,
/// non-interactive) when missing and `install` is set.
pub fn locate_qemu(install: bool) -> Result<PathBuf, NestedError> {
    qemu::locate(None, install)
}
pub use script::{L1_AGENTVM, L1_L2_INITRD, L1_L2_KERNEL};

use initramfs::FileEntry;
use protocol::{Event, Parser, RawResult};

/// The files a nested host is built from.
#[derive(Debug, Clone)]
pub struct NestedInputs {
    /// L1 kernel: the distribution bzImage (`vmlinuz`).
    pub l1_kernel: PathBuf,
    /// The extracted kernel package of the same kernel (`lib/modules/<ver>/kernel/...`), for
    /// irqbypass.ko, kvm.ko and kvm-amd.ko.
    pub pkg_dir: PathBuf,
    /// A static busybox (L1's shell and tools).
    pub busybox: PathBuf,
    /// The static `agentvm` binary, installed as /bin/agentvm in L1.
    pub agentvm: PathBuf,
    /// L2 kernel (ELF vmlinux), at /l2/vmlinux in L1.
    pub l2_kernel: PathBuf,
    /// L2 initramfs, at /l2/initramfs.cpio in L1.
    pub l2_initrd: PathBuf,
}

/// A configured nested test host. Each [`NestedHost::run`] boots one fresh L1.
#[derive(Debug, Clone)]
pub struct NestedHost {
    pub inputs: NestedInputs,
    /// More files for L1: (host path, absolute L1 path).
    pub extra_files: Vec<(PathBuf, String)>,
    /// L1 memory; it holds the unpacked initramfs (~150 MiB) plus every L2 guest's memory.
    pub l1_mem_mib: u32,
    pub l1_cpus: u32,
    /// Options for `insmod kvm-amd.ko`.
    pub kvm_amd_options: String,
    /// From starting QEMU to /dev/kvm being ready in L1.
    pub boot_timeout: Duration,
    /// QEMU binary; `None` looks up qemu-system-x86_64 on PATH.
    pub qemu: Option<PathBuf>,
    /// Install Debian's qemu-system-x86 with apt-get when QEMU is missing.
    pub install_qemu: bool,
    /// Print "nested: ..." progress lines on stderr.
    pub progress: bool,
}

/// A shell script run by L1's /bin/sh, as root, in `/`, stdin from /dev/null.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub script: String,
    /// After this, L1 kills the scenario's whole process group and reports it as timed out.
    pub timeout: Duration,
}

impl Scenario {
    pub fn new(name: impl Into<String>, script: impl Into<String>, timeout: Duration) -> Self {
        Scenario {
            name: name.into(),
            script: script.into(),
            timeout,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioResult {
    pub name: String,
    /// The script's exit status as the shell reports it (128 + n when killed by signal n).
    pub exit_code: i32,
    /// The scenario hit its timeout and was killed (`exit_code` is then 137).
    pub timed_out: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Measured inside L1 (10 ms resolution).
    pub duration: Duration,
}

impl ScenarioResult {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Everything one L1 boot produced.
#[derive(Debug, Clone)]
pub struct NestedRun {
    pub results: Vec<ScenarioResult>,
    /// From starting QEMU until L1's init ran.
    pub l1_boot: Duration,
    /// From starting QEMU until /dev/kvm was usable in L1.
    pub kvm_ready: Duration,
    /// From starting QEMU until L1 reported the last result.
    pub total: Duration,
}

/// Time L1 gets beyond a scenario's own timeout to kill it and send its output.
const REPORT_GRACE: Duration = Duration::from_secs(60);
/// Time L1 gets to power off after the last result.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);
const TAIL_LINES: usize = 30;
/// L1's init writes a heartbeat on its console every few seconds (see script.rs); this long
/// without one, and without progress on the results port, means L1 has stopped running (a wedge
/// of the emulation: QEMU TCG with nested SVM has frozen whole L1s, or left their kernel printing
/// soft-lockup reports while no process ran, so even a scenario's own watchdog cannot act).
const L1_SILENCE_LIMIT: Duration = Duration::from_secs(90);
/// `no_timer_check`: Linux checks at boot that the PIT's interrupt reaches the IO-APIC within a
/// few loops, which an emulated CPU on a busy host can miss ("IO-APIC + timer doesn't work!", a
/// panic seen here while other builds ran); the timer is QEMU's and works, so the check only
/// adds a spurious failure, as for other virtual machines.
const L1_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 quiet mitigations=off no_timer_check";

#[derive(Clone, Copy)]
enum Phase {
    Booting,
    LoadingKvm,
    Scenario(usize),
    ShuttingDown,
}

impl NestedHost {
    pub fn new(inputs: NestedInputs) -> Self {
        NestedHost {
            inputs,
            extra_files: Vec::new(),
            l1_mem_mib: 2048,
            l1_cpus: 2,
            kvm_amd_options: "npt=0".to_string(),
            boot_timeout: Duration::from_secs(180),
            qemu: None,
            install_qemu: true,
            progress: true,
        }
    }

    /// Boots L1, runs the scenarios in order, and returns their results. A scenario failing or
    /// timing out is a result, not an error; errors mean the nested host itself failed.
    pub fn run(&self, scenarios: &[Scenario]) -> Result<NestedRun, NestedError> {
        let timeouts = validate_scenarios(scenarios)?;
        if !script::is_shell_safe_options(&self.kvm_amd_options) {
            return Err(NestedError::MissingInput {
                what: "kvm-amd options",
                path: PathBuf::new(),
                reason: format!(
                    "{:?} contains characters other than letters, digits, space and _=,.-",
                    self.kvm_amd_options
                ),
            });
        }
        let files = self.l1_files(scenarios, &timeouts)?;
        let qemu_bin = qemu::locate(self.qemu.as_deref(), self.install_qemu)?;

        let work = tempfile::Builder::new()
            .prefix("agentvm-nested-")
            .tempdir()
            .map_err(|e| NestedError::io("creating the nested host's work directory", e))?;
        let cpio = work.path().join("l1.cpio");
        let size = initramfs::write(&cpio, &files)?;
        self.say(format_args!(
            "L1 initramfs: {} MiB, {} scenario(s)",
            size >> 20,
            scenarios.len()
        ));

        let logs = Logs {
            console: work.path().join("console.log"),
            results: work.path().join("results.log"),
            qemu_stderr: work.path().join("qemu.stderr"),
            monitor: work.path().join("monitor.sock"),
        };
        let args = self.qemu_args(&cpio, &logs);
        self.say(format_args!(
            "booting L1 ({} TCG, -cpu EPYC,+svm, {} MiB, {} vCPU(s))",
            qemu_bin.display(),
            self.l1_mem_mib,
            self.l1_cpus
        ));
        let mut vm = qemu::Qemu::spawn(&qemu_bin, &args, &logs.qemu_stderr)?;
        let result = self.monitor(&mut vm, scenarios, &timeouts, &logs);
        vm.kill();
        result
    }

    fn say(&self, msg: std::fmt::Arguments<'_>) {
        if self.progress {
            eprintln!("nested: {msg}");
        }
    }

    fn qemu_args(&self, cpio: &Path, logs: &Logs) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(OsString::from(s));
        // The pc machine rather than microvm: under a loaded host, microvm's PIT-only TSC
        // calibration fails and the L1 kernel hangs in early boot; pc has HPET/ACPI PM timer.
        for s in [
            "-M",
            "pc",
            "-nodefaults",
            "-no-user-config",
            "-accel",
            "tcg",
            "-cpu",
            "EPYC,+svm",
            "-no-reboot",
            "-display",
            "none",
        ] {
            push(s);
        }
        push("-m");
        push(&self.l1_mem_mib.to_string());
        push("-smp");
        push(&self.l1_cpus.to_string());
        push("-append");
        push(L1_CMDLINE);
        // Read only when L1 wedges (see hmp.rs).
        let mut monitor = OsString::from("unix:");
        monitor.push(qemu::opt_escape(&logs.monitor));
        monitor.push(",server=on,wait=off");
        a.push("-monitor".into());
        a.push(monitor);
        a.push("-kernel".into());
        a.push(self.inputs.l1_kernel.clone().into_os_string());
        a.push("-initrd".into());
        a.push(cpio.as_os_str().to_owned());
        for (id, path) in [("con0", &logs.console), ("res0", &logs.results)] {
            let mut chardev = OsString::from(format!("file,id={id},path="));
            chardev.push(qemu::opt_escape(path));
            a.push("-chardev".into());
            a.push(chardev);
            a.push("-serial".into());
            a.push(format!("chardev:{id}").into());
        }
        a
    }

    fn l1_files(
        &self,
        scenarios: &[Scenario],
        timeouts: &[u64],
    ) -> Result<Vec<FileEntry>, NestedError> {
        let i = &self.inputs;
        for (what, path) in [
            ("L1 kernel (vmlinuz)", &i.l1_kernel),
            ("busybox", &i.busybox),
            ("agentvm binary", &i.agentvm),
            ("L2 kernel", &i.l2_kernel),
            ("L2 initramfs", &i.l2_initrd),
        ] {
            require_file(what, path)?;
        }
        let modules = find_kvm_modules(&i.pkg_dir)?;

        let mut files = vec![
            FileEntry::inline(
                "/init",
                0o755,
                script::init_script(&self.kvm_amd_options, timeouts),
            ),
            FileEntry::host("/bin/busybox", 0o755, &i.busybox),
            FileEntry::host(L1_AGENTVM, 0o755, &i.agentvm),
            FileEntry::host(L1_L2_KERNEL, 0o644, &i.l2_kernel),
            FileEntry::host(L1_L2_INITRD, 0o644, &i.l2_initrd),
        ];
        for (name, path) in script::KVM_MODULES.iter().zip(&modules) {
            files.push(FileEntry::host(
                &format!("/lib/modules/{name}.ko"),
                0o644,
                path,
            ));
        }
        for (idx, s) in scenarios.iter().enumerate() {
            files.push(FileEntry::inline(
                &format!("/scenarios/{idx}.sh"),
                0o644,
                s.script.clone(),
            ));
        }
        for (host, l1_path) in &self.extra_files {
            require_file("extra file", host)?;
            let p = Path::new(l1_path);
            let reserved = files.iter().any(|f| f.path == *l1_path);
            if !p.is_absolute()
                || p.components().any(|c| matches!(c, Component::ParentDir))
                || reserved
            {
                return Err(NestedError::MissingInput {
                    what: "extra file",
                    path: host.clone(),
                    reason: format!(
                        "L1 path {l1_path:?} must be absolute, without '..', and not one of the \
                         nested host's own files"
                    ),
                });
            }
            files.push(FileEntry::host(l1_path, 0o755, host));
        }
        Ok(files)
    }

    fn monitor(
        &self,
        vm: &mut qemu::Qemu,
        scenarios: &[Scenario],
        timeouts: &[u64],
        logs: &Logs,
    ) -> Result<NestedRun, NestedError> {
        let t0 = Instant::now();
        let mut results_tail = qemu::Tail::new(&logs.results);
        let mut parser = Parser::default();
        let mut phase = Phase::Booting;
        let mut deadline = t0 + self.boot_timeout;
        let mut results: Vec<ScenarioResult> = Vec::with_capacity(scenarios.len());
        let mut l1_boot = Duration::ZERO;
        let mut kvm_ready = Duration::ZERO;
        let mut total = Duration::ZERO;
        let mut console_tail = qemu::Tail::new(&logs.console);
        let mut liveness = liveness::Liveness::new();

        loop {
            let exited = vm.try_wait()?;
            // Read after try_wait so that everything QEMU wrote before exiting is seen.
            let bytes = results_tail.read_new()?;
            liveness.observe(&console_tail.read_new()?, &bytes);
            if let (Phase::Scenario(idx), None) = (&phase, &exited) {
                if liveness.silent_for() >= L1_SILENCE_LIMIT {
                    let cpus = hmp::cpu_summary(&logs.monitor);
                    vm.kill();
                    return Err(NestedError::L1Wedged {
                        name: scenarios[*idx].name.clone(),
                        silent: L1_SILENCE_LIMIT,
                        cpus,
                        tail: logs.tail(),
                    });
                }
            }
            let events = parser.feed(&bytes).map_err(|detail| NestedError::Framing {
                detail,
                tail: logs.tail(),
            })?;
            for event in events {
                match event {
                    Event::Up(uptime) => {
                        l1_boot = t0.elapsed();
                        phase = Phase::LoadingKvm;
                        self.say(format_args!(
                            "L1 up after {:.2} s (L1 uptime {:.2} s), loading kvm modules",
                            l1_boot.as_secs_f64(),
                            uptime.as_secs_f64()
                        ));
                    }
                    Event::KvmReady(uptime) => {
                        kvm_ready = t0.elapsed();
                        self.say(format_args!(
                            "/dev/kvm ready after {:.2} s (L1 uptime {:.2} s, kvm-amd {})",
                            kvm_ready.as_secs_f64(),
                            uptime.as_secs_f64(),
                            self.kvm_amd_options
                        ));
                    }
                    Event::Error(detail) => {
                        return Err(NestedError::KvmUnavailable {
                            detail,
                            tail: logs.tail(),
                        });
                    }
                    Event::Started(idx) => {
                        let s = scenarios.get(idx).ok_or_else(|| NestedError::Framing {
                            detail: format!("L1 started scenario {idx}, which does not exist"),
                            tail: logs.tail(),
                        })?;
                        phase = Phase::Scenario(idx);
                        deadline =
                            Instant::now() + Duration::from_secs(timeouts[idx]) + REPORT_GRACE;
                        self.say(format_args!(
                            "scenario '{}' running (timeout {} s)",
                            s.name, timeouts[idx]
                        ));
                    }
                    Event::Finished(raw) => {
                        let r = self.finish(scenarios, &results, raw, logs)?;
                        results.push(r);
                    }
                    Event::Done => {
                        total = t0.elapsed();
                        if results.len() != scenarios.len() {
                            return Err(NestedError::Framing {
                                detail: format!(
                                    "L1 finished after {} of {} scenarios",
                                    results.len(),
                                    scenarios.len()
                                ),
                                tail: logs.tail(),
                            });
                        }
                        phase = Phase::ShuttingDown;
                        deadline = Instant::now() + SHUTDOWN_GRACE;
                        self.say(format_args!(
                            "all {} scenario(s) done after {:.2} s",
                            results.len(),
                            total.as_secs_f64()
                        ));
                    }
                }
            }

            if matches!(phase, Phase::ShuttingDown) {
                if exited.is_none() && Instant::now() < deadline {
                    std::thread::sleep(POLL);
                    continue;
                }
                if exited.is_none() {
                    self.say(format_args!("L1 did not power off in time; killing QEMU"));
                }
                return Ok(NestedRun {
                    results,
                    l1_boot,
                    kvm_ready,
                    total,
                });
            }

            if let Some(status) = exited {
                let phase = self.describe(phase, scenarios);
                let tail = logs.tail();
                if parser.is_mid_message() {
                    return Err(NestedError::Framing {
                        detail: format!("QEMU exited ({status}) in the middle of a message"),
                        tail,
                    });
                }
                if logs.console_text().contains("Kernel panic") {
                    return Err(NestedError::L1Panic { phase, tail });
                }
                return Err(NestedError::L1Exited {
                    status: status.to_string(),
                    phase,
                    tail,
                });
            }
            if Instant::now() >= deadline {
                vm.kill();
                let tail = logs.tail();
                return Err(match phase {
                    Phase::Booting => NestedError::L1NotUp {
                        waited: self.boot_timeout,
                        tail,
                    },
                    Phase::LoadingKvm => NestedError::KvmUnavailable {
                        detail: format!(
                            "L1 came up but /dev/kvm was not ready within {:?} of starting QEMU",
                            self.boot_timeout
                        ),
                        tail,
                    },
                    Phase::Scenario(idx) => NestedError::ScenarioStuck {
                        name: scenarios[idx].name.clone(),
                        waited: Duration::from_secs(timeouts[idx]) + REPORT_GRACE,
                        tail,
                    },
                    // ShuttingDown returned above; kept total for the compiler.
                    Phase::ShuttingDown => NestedError::L1Exited {
                        status: "killed after shutdown timeout".into(),
                        phase: self.describe(phase, scenarios),
                        tail,
                    },
                });
            }
            std::thread::sleep(POLL);
        }
    }

    fn finish(
        &self,
        scenarios: &[Scenario],
        done: &[ScenarioResult],
        raw: RawResult,
        logs: &Logs,
    ) -> Result<ScenarioResult, NestedError> {
        // L1 runs the scenarios in order; anything else means the stream is corrupt.
        if raw.idx != done.len() {
            return Err(NestedError::Framing {
                detail: format!(
                    "L1 reported scenario {} while expecting {}",
                    raw.idx,
                    done.len()
                ),
                tail: logs.tail(),
            });
        }
        let name = scenarios[raw.idx].name.clone();
        if raw.timed_out {
            self.say(format_args!(
                "scenario '{name}' TIMED OUT after {:.2} s (killed)",
                raw.duration.as_secs_f64()
            ));
        } else {
            self.say(format_args!(
                "scenario '{name}' exit={} in {:.2} s",
                raw.exit_code,
                raw.duration.as_secs_f64()
            ));
        }
        Ok(ScenarioResult {
            name,
            exit_code: raw.exit_code,
            timed_out: raw.timed_out,
            stdout: raw.stdout,
            stderr: raw.stderr,
            duration: raw.duration,
        })
    }

    fn describe(&self, phase: Phase, scenarios: &[Scenario]) -> String {
        match phase {
            Phase::Booting => "booting L1".into(),
            Phase::LoadingKvm => "loading the kvm modules in L1".into(),
            Phase::Scenario(idx) => format!("running scenario '{}'", scenarios[idx].name),
            Phase::ShuttingDown => "shutting L1 down".into(),
        }
    }
}

struct Logs {
    console: PathBuf,
    results: PathBuf,
    qemu_stderr: PathBuf,
    /// QEMU's human monitor socket.
    monitor: PathBuf,
}

impl Logs {
    fn console_text(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The end of L1's console and of QEMU's stderr, for error messages.
    fn tail(&self) -> String {
        let console = qemu::log_tail(&self.console, TAIL_LINES, &|l| {
            l.starts_with(script::HEARTBEAT_PREFIX)
        });
        let stderr = qemu::log_tail(&self.qemu_stderr, TAIL_LINES, &|l| {
            l.contains("TCG doesn't support requested feature")
        });
        let console = if console.is_empty() {
            "(nothing yet)".to_string()
        } else {
            console
        };
        let mut s = String::new();
        let _ = write!(s, "--- L1 console (last lines) ---\n{console}");
        if !stderr.is_empty() {
            let _ = write!(s, "\n--- QEMU stderr ---\n{stderr}");
        }
        s
    }
}

fn require_file(what: &'static str, path: &Path) -> Result<(), NestedError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(NestedError::MissingInput {
            what,
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        }),
        Err(e) => Err(NestedError::MissingInput {
            what,
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Paths of irqbypass.ko, kvm.ko and kvm-amd.ko (in [`script::KVM_MODULES`] order) in an extracted
/// kernel package.
fn find_kvm_modules(pkg_dir: &Path) -> Result<[PathBuf; 3], NestedError> {
    let modules_dir = pkg_dir.join("lib/modules");
    let missing = |reason: String| NestedError::MissingInput {
        what: "kvm modules",
        path: modules_dir.clone(),
        reason,
    };
    let entries = std::fs::read_dir(&modules_dir).map_err(|e| missing(e.to_string()))?;
    let mut versions: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    versions.sort();
    for v in &versions {
        let k = v.join("kernel");
        let found = [
            k.join("virt/lib/irqbypass.ko"),
            k.join("arch/x86/kvm/kvm.ko"),
            k.join("arch/x86/kvm/kvm-amd.ko"),
        ];
        if found.iter().all(|p| p.is_file()) {
            return Ok(found);
        }
    }
    Err(missing(format!(
        "no <version>/kernel/{{virt/lib/irqbypass.ko,arch/x86/kvm/kvm.ko,arch/x86/kvm/kvm-amd.ko}} \
         (uncompressed) among {} kernel version(s)",
        versions.len()
    )))
}

/// Whole-second timeouts for L1 (rounded up), rejecting ones that cannot work.
fn validate_scenarios(scenarios: &[Scenario]) -> Result<Vec<u64>, NestedError> {
    scenarios
        .iter()
        .map(|s| {
            if s.timeout.is_zero() {
                return Err(NestedError::InvalidScenario {
                    name: s.name.clone(),
                    reason: "timeout is zero".into(),
                });
            }
            let secs = s.timeout.as_secs() + u64::from(s.timeout.subsec_nanos() > 0);
            Ok(secs)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(dir: &Path) -> NestedInputs {
        let f = |name: &str| {
            let p = dir.join(name);
            std::fs::write(&p, name).unwrap();
            p
        };
        let pkg = dir.join("pkg");
        let k = pkg.join("lib/modules/6.1.0-test/kernel");
        std::fs::create_dir_all(k.join("virt/lib")).unwrap();
        std::fs::create_dir_all(k.join("arch/x86/kvm")).unwrap();
        for m in [
            "virt/lib/irqbypass.ko",
            "arch/x86/kvm/kvm.ko",
            "arch/x86/kvm/kvm-amd.ko",
        ] {
            std::fs::write(k.join(m), m).unwrap();
        }
        NestedInputs {
            l1_kernel: f("vmlinuz"),
            pkg_dir: pkg,
            busybox: f("busybox"),
            agentvm: f("agentvm"),
            l2_kernel: f("vmlinux"),
            l2_initrd: f("initramfs.cpio"),
        }
    }

    #[test]
    fn timeouts_round_up_and_zero_is_rejected() {
        let ok = [
            Scenario::new("a", "true", Duration::from_millis(1500)),
            Scenario::new("b", "true", Duration::from_secs(2)),
        ];
        assert_eq!(validate_scenarios(&ok).unwrap(), vec![2, 2]);
        let bad = [Scenario::new("z", "true", Duration::ZERO)];
        assert!(matches!(
            validate_scenarios(&bad),
            Err(NestedError::InvalidScenario { name, .. }) if name == "z"
        ));
    }

    #[test]
    fn l1_file_list_has_everything_at_the_documented_paths() {
        let dir = tempfile::tempdir().unwrap();
        let host = NestedHost::new(inputs(dir.path()));
        let scenarios = [Scenario::new("s", "echo hi", Duration::from_secs(5))];
        let files = host.l1_files(&scenarios, &[5]).unwrap();
        let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        for p in [
            "/init",
            "/bin/busybox",
            L1_AGENTVM,
            L1_L2_KERNEL,
            L1_L2_INITRD,
            "/lib/modules/irqbypass.ko",
            "/lib/modules/kvm.ko",
            "/lib/modules/kvm-amd.ko",
            "/scenarios/0.sh",
        ] {
            assert!(paths.contains(&p), "{p} missing from {paths:?}");
        }
    }

    #[test]
    fn missing_inputs_and_bad_extra_paths_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut host = NestedHost::new(inputs(dir.path()));
        host.inputs.agentvm = dir.path().join("no-agentvm");
        let err = host.l1_files(&[], &[]).unwrap_err();
        assert!(err.to_string().contains("agentvm binary"), "{err}");

        let mut host = NestedHost::new(inputs(dir.path()));
        std::fs::remove_file(
            dir.path()
                .join("pkg/lib/modules/6.1.0-test/kernel/arch/x86/kvm/kvm-amd.ko"),
        )
        .unwrap();
        let err = host.l1_files(&[], &[]).unwrap_err();
        assert!(err.to_string().contains("kvm modules"), "{err}");

        host = NestedHost::new(inputs(dir.path()));
        host.extra_files = vec![(dir.path().join("busybox"), "relative/x".into())];
        assert!(host.l1_files(&[], &[]).is_err());
        host.extra_files = vec![(dir.path().join("busybox"), "/init".into())];
        assert!(host.l1_files(&[], &[]).is_err());
    }

    #[test]
    fn unsafe_module_options_are_rejected_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut host = NestedHost::new(inputs(dir.path()));
        host.kvm_amd_options = "npt=0; reboot".into();
        host.qemu = Some(dir.path().join("no-qemu"));
        let err = host.run(&[]).unwrap_err();
        assert!(err.to_string().contains("kvm-amd options"), "{err}");
    }
}
