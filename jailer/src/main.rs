//! `agentvm-jailer`: see the crate documentation and `agentvm-jailer --help`.

use std::process::ExitCode;

use clap::Parser;
use jailer::config::{Args, JailConfig};
use jailer::{exit_code, supervise};

fn main() -> ExitCode {
    init_logging();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(exit_code::USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = JailConfig::from_args(args).and_then(|config| supervise::run(&config));
    match result {
        Ok(outcome) => {
            if let Some(message) = outcome.message {
                eprintln!("agentvm-jailer: {message}");
            }
            ExitCode::from(outcome.exit_code)
        }
        Err(e) => {
            eprintln!("agentvm-jailer: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Same switch as the VMM: AGENTVM_LOG=debug shows the jailer's steps.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AGENTVM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
