//! `agentvm run --nested`: the same run, inside the nested test host (QEMU TCG with SVM, which
//! gives a /dev/kvm that runs Linux guests on hosts whose own KVM cannot). This binary is static,
//! so it is copied into the nested host as is and does the inner run itself.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::{MachineArgs, EXIT_AGENTVM_FAILURE};
use vmm::nested::{NestedHost, NestedInputs, Scenario};

/// Where the inner run keeps the L2 console when `--console` was asked for.
const L1_CONSOLE_LOG: &str = "/tmp/l2-console.log";
/// A run with no --timeout still must not hang the nested host forever.
const DEFAULT_NESTED_LIMIT: Duration = Duration::from_secs(900);

pub fn run_nested(
    machine: &MachineArgs,
    kernel: &Path,
    initrd: &Path,
    command: &[String],
    limit: Option<Duration>,
) -> Result<ExitCode, String> {
    let artefacts = vmm::artefacts::prepare_default().map_err(|e| e.to_string())?;
    let agentvm = std::env::current_exe()
        .map_err(|e| format!("cannot find the agentvm binary to copy into the nested host: {e}"))?;
    let inputs = NestedInputs {
        l1_kernel: artefacts.vmlinuz,
        pkg_dir: artefacts.pkg_dir,
        busybox: artefacts.busybox,
        agentvm,
        l2_kernel: kernel.to_path_buf(),
        l2_initrd: initrd.to_path_buf(),
    };
    let mut host = NestedHost::new(inputs);
    // L1 holds its own initramfs (~150 MiB unpacked) besides the L2 guest's memory.
    host.l1_mem_mib = (machine.mem_mib + 1024).max(2048) as u32;
    host.l1_cpus = machine.vcpus.clamp(1, 2) as u32;

    let mut scenarios = vec![Scenario::new(
        "run",
        inner_command(machine, command, limit),
        limit.unwrap_or(DEFAULT_NESTED_LIMIT) + Duration::from_secs(30),
    )];
    if machine.console.is_some() {
        scenarios.push(Scenario::new(
            "console",
            format!("cat {L1_CONSOLE_LOG}"),
            Duration::from_secs(60),
        ));
    }
    let run = host.run(&scenarios).map_err(|e| e.to_string())?;
    let result = run
        .results
        .first()
        .ok_or("the nested host returned no result")?;
    let _ = std::io::stdout().write_all(&result.stdout);
    let _ = std::io::stderr().write_all(&result.stderr);
    if let (Some(path), Some(console)) = (&machine.console, run.results.get(1)) {
        std::fs::write(path, &console.stdout)
            .map_err(|e| format!("cannot write console file {}: {e}", path.display()))?;
    }
    if result.timed_out {
        return Err("the nested run timed out".into());
    }
    Ok(ExitCode::from(
        u8::try_from(result.exit_code).unwrap_or(EXIT_AGENTVM_FAILURE),
    ))
}

/// The `agentvm run` command line for inside the nested host.
fn inner_command(machine: &MachineArgs, command: &[String], limit: Option<Duration>) -> String {
    let mut line = format!(
        "agentvm run --kernel \"$AGENTVM_L2_KERNEL\" --initrd \"$AGENTVM_L2_INITRD\" --vcpus {} --mem-mib {}",
        machine.vcpus, machine.mem_mib
    );
    if let Some(limit) = limit {
        line.push_str(&format!(" --timeout {}", limit.as_secs_f64()));
    }
    if machine.console.is_some() {
        line.push_str(&format!(" --console {L1_CONSOLE_LOG}"));
    }
    if machine.no_seccomp {
        line.push_str(" --no-seccomp");
    }
    line.push_str(" --");
    for arg in command {
        line.push(' ');
        line.push_str(&shell_quote(arg));
    }
    line
}

fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_survive_the_shell() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        let machine = MachineArgs {
            vcpus: 2,
            mem_mib: 256,
            console: None,
            timeout: 0.0,
            no_seccomp: false,
        };
        let line = inner_command(
            &machine,
            &["sh".into(), "-c".into(), "echo $HOME; exit 3".into()],
            None,
        );
        assert!(
            line.ends_with(r"-- 'sh' '-c' 'echo $HOME; exit 3'"),
            "{line}"
        );
        assert!(line.contains("--vcpus 2 --mem-mib 256"));
        assert!(!line.contains("--no-seccomp"));
        let unfiltered = MachineArgs {
            no_seccomp: true,
            ..machine
        };
        let line = inner_command(&unfiltered, &["true".into()], None);
        assert!(line.contains(" --no-seccomp --"), "{line}");
    }
}
