//! `agentvm kernel ...`

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum KernelCommand {
    /// Download and prepare the default guest kernel and initramfs (cached), and print their paths.
    Prepare,
}

pub fn run(command: KernelCommand) -> Result<ExitCode, String> {
    match command {
        KernelCommand::Prepare => {
            let a = vmm::artefacts::prepare_default().map_err(|e| e.to_string())?;
            println!("version={}", a.version);
            println!("kernel={}", a.kernel.display());
            println!("initrd={}", a.initrd.display());
            println!("vmlinuz={}", a.vmlinuz.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}
