//! The guest agent over virtio-vsock, end to end with a real Linux guest: the `agent-e2e` driver
//! (src/bin/agent-e2e) runs inside the nested test host, boots guests with `agentvm boot
//! --vsock-uds` and `agentvm run`, drives them through the host client library, and prints one
//! `E2E <check> ok|fail <detail>` line per check; each test here asserts one of them.
//!
//! One L1 boot serves every test (three L2 guests for the client checks and the version
//! mismatch, four for the `agentvm run` checks). Locally the tests skip (saying why) when the
//! nested host cannot run; with CI=true they fail instead. Run with:
//!
//!     cargo build --release -p vmm -p integration-tests && \
//!     cargo test --release -p integration-tests --test agent_e2e -- --nocapture
//!
//! `AGENT_E2E_ONLY_API=1` passes the driver `--only api`, which runs just the API checks: the
//! per-VM `/sandbox/...` routes, `snapshot_restore` (a guest snapshotted under `serve` and
//! restored by a second one) and the daemon (its sandbox hibernated and restored), when
//! iterating on them.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use integration_tests::jailer::jailer_bin;
use integration_tests::nested::{describe, run_scenarios_with_files, Outcome};
use vmm::nested::{Scenario, L1_AGENTVM, L1_L2_INITRD, L1_L2_KERNEL};

const L1_DRIVER: &str = "/bin/agent-e2e";
const SCENARIO: &str = "agent-e2e";

fn outcome() -> &'static Outcome {
    static RUN: OnceLock<Outcome> = OnceLock::new();
    RUN.get_or_init(|| {
        let driver = PathBuf::from(env!("CARGO_BIN_EXE_agent-e2e"));
        let mut script = format!(
            "{L1_DRIVER} --agentvm {L1_AGENTVM} --kernel {L1_L2_KERNEL} --initrd {L1_L2_INITRD} \
             --work /tmp/e2e"
        );
        // For iterating on the API checks only (the other tests then fail as not run).
        if std::env::var_os("AGENT_E2E_ONLY_API").is_some() {
            script.push_str(" --only api");
        }
        run_scenarios_with_files(
            &[Scenario::new(SCENARIO, script, Duration::from_secs(1500))],
            vec![
                (driver, L1_DRIVER.to_string()),
                // The daemon jails its sandboxes with the jailer beside agentvm.
                (jailer_bin(), "/bin/agentvm-jailer".to_string()),
                // The HTTPS client the network checks copy into the guest.
                (
                    PathBuf::from(env!("CARGO_BIN_EXE_tls-get")),
                    "/bin/tls-get".to_string(),
                ),
            ],
        )
    })
}

/// Asserts that check `name` ran and passed; returns its detail.
fn check(name: &str) -> Option<String> {
    let r = outcome().scenario(SCENARIO)?;
    let stdout = r.stdout_text();
    let prefix = format!("E2E {name} ");
    let Some(line) = stdout.lines().find(|l| l.starts_with(&prefix)) else {
        panic!("check '{name}' did not run\n{}", describe(r));
    };
    let rest = &line[prefix.len()..];
    match rest.split_once(' ') {
        Some(("ok", detail)) => {
            eprintln!("{name}: {}", detail.replace("\\n", "\n"));
            Some(detail.to_string())
        }
        _ => panic!(
            "check '{name}' failed: {}\n--- driver stderr ---\n{}",
            rest.replace("\\n", "\n"),
            r.stderr_text()
        ),
    }
}

#[test]
fn driver_ran_to_the_end() {
    let Some(r) = outcome().scenario(SCENARIO) else {
        return;
    };
    assert!(
        r.stdout_text().contains("E2E-DONE") && r.exit_code == 0,
        "{}",
        describe(r)
    );
}

macro_rules! e2e_checks {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check(stringify!($name));
            }
        )*
    };
}

e2e_checks!(
    boot,
    ping,
    output_separation,
    exit_codes_and_signals,
    env_cwd_user,
    spawn_failure,
    timeout_kills_group,
    stdin_pipe,
    concurrent_execs,
    stream_200mib,
    pty,
    watch,
    file_roundtrip_50mib,
    file_ops,
    background_processes,
    port_forward,
    after_restore,
    guest_oom,
    net_configured,
    net_egress_ca_installed,
    net_allowed_domain,
    net_denied_domain,
    net_ip_literal_refused,
    net_unlisted_address_refused,
    net_metadata_refused,
    net_private_refused,
    net_host_header_checked,
    net_credential_injection,
    net_https_credential_injection,
    net_download_100mib,
    net_rate_limit,
    net_audit_log,
    agent_gone,
    cli_exit_status,
    cli_stdin,
    cli_publish,
    cli_tty,
    api_sandbox,
    snapshot_restore,
    soak,
    daemon,
    version_mismatch,
);
