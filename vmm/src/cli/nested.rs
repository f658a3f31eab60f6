//! `agentvm run --nested`: the same run, inside the nested test host.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::MachineArgs;

pub fn run_nested(
    _machine: &MachineArgs,
    _kernel: &Path,
    _initrd: &Path,
    _command: &[String],
    _limit: Option<Duration>,
) -> Result<ExitCode, String> {
    Err("the nested test host is not wired into the CLI yet".into())
}
