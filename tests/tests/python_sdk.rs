//! The Python SDK's unit tests (`sdk/python/tests`: the SDK against a fake daemon on a Unix
//! socket, no VM), run with the machine's python3 so that `cargo test` covers them. The SDK
//! against a real daemon and a real Linux guest is `sdk_e2e.rs`.
//!
//!     cargo test --release -p integration-tests --test python_sdk

use std::path::PathBuf;
use std::process::Command;

fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdk/python")
}

#[test]
fn python_sdk_unit_tests_pass() {
    let output = Command::new("python3")
        .args(["-m", "unittest", "discover", "-v"])
        .current_dir(sdk_dir())
        // No __pycache__ directories in the source tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run python3 ({e}): the Python SDK's tests need python3 3.9 or later \
                 (scripts/test.sh installs it)"
            )
        });
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Python SDK's unit tests failed ({}):\n{report}",
        output.status
    );
    // A discovery that found nothing also "succeeds": make sure the tests ran.
    let ran: usize = report
        .lines()
        .find_map(|l| {
            l.strip_prefix("Ran ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    assert!(ran > 0, "no Python SDK tests were found:\n{report}");
    eprintln!("{report}");
}
