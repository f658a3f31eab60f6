//! `agentvm boot --egress-policy` on this host's KVM with the ring-3 probe (no Linux, so no
//! driver uses the NIC): the NIC and its egress thread come up under their seccomp filters and
//! go away cleanly; bad policies and audit paths are refused up front with a clear message.
//! Traffic through the filter is tested in the egress crate (a userspace guest peer) and end
//! to end with a Linux guest in agent_e2e (net_* checks).

use std::ffi::OsStr;
use std::time::Duration;

use integration_tests::agentvm::{require_kvm, run_agentvm, VmOutput};
use integration_tests::probe::probe_elf;

/// Hang detector, not a performance limit.
const TIMEOUT: Duration = Duration::from_secs(60);

fn boot(extra: &[&OsStr]) -> VmOutput {
    let probe = probe_elf();
    let mut args: Vec<&OsStr> = vec![
        "boot".as_ref(),
        "--kernel".as_ref(),
        probe.as_os_str(),
        "--no-base-cmdline".as_ref(),
        "--cmdline".as_ref(),
        "hello".as_ref(),
    ];
    args.extend_from_slice(extra);
    run_agentvm(args, TIMEOUT).unwrap_or_else(|e| panic!("agentvm boot: {e}"))
}

#[test]
fn a_vm_with_a_nic_boots_and_ends_cleanly() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rules]]\ndomain = \"example.com\"\nports = [443]\n",
    )
    .unwrap();
    let audit = dir.path().join("audit.jsonl");
    let out = boot(&[
        "--egress-policy".as_ref(),
        policy.as_os_str(),
        "--egress-audit".as_ref(),
        audit.as_os_str(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let stdout = out.stdout_text();
    // The NIC is the probe's second virtio slot (after the entropy device).
    assert!(stdout.contains("PROBE done"), "{out:?}");
    assert!(
        audit.exists(),
        "the audit log is opened before the guest runs"
    );
}

#[test]
fn bad_policies_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        (
            "p.json",
            r#"{"rules": [{"id": "x", "cidr": "10.0.0.1/8"}]}"#,
            "rule 1 (`x`): `cidr` `10.0.0.1/8` has host bits set",
        ),
        ("p.json", "{", "egress policy is not valid JSON"),
        (
            "p.toml",
            "[[rules]]\nport = 1\n",
            "egress policy is not valid TOML",
        ),
        (
            "p.json",
            r#"{"rules": [{"domain": "a.com", "inject_headers": [{"name": "Authorization", "from_env": "AGENTVM_TEST_NEVER_SET"}]}]}"#,
            "environment variable AGENTVM_TEST_NEVER_SET is not set",
        ),
    ];
    for (name, text, want) in cases {
        let policy = dir.path().join(name);
        std::fs::write(&policy, text).unwrap();
        let out = boot(&["--egress-policy".as_ref(), policy.as_os_str()]);
        assert!(!out.status.success(), "{text}: {out:?}");
        assert!(
            out.stderr_text().contains(want),
            "{text}: want {want:?}\n{out:?}"
        );
    }
    let out = boot(&[
        "--egress-policy".as_ref(),
        "/nonexistent/policy.json".as_ref(),
    ]);
    assert!(
        out.stderr_text()
            .contains("cannot read egress policy /nonexistent/policy.json"),
        "{out:?}"
    );

    let policy = dir.path().join("ok.json");
    std::fs::write(&policy, r#"{"rules": []}"#).unwrap();
    let out = boot(&[
        "--egress-policy".as_ref(),
        policy.as_os_str(),
        "--egress-audit".as_ref(),
        "/nonexistent/dir/audit.jsonl".as_ref(),
    ]);
    assert!(
        out.stderr_text()
            .contains("directory /nonexistent/dir does not exist"),
        "{out:?}"
    );
    let out = boot(&["--egress-audit".as_ref(), "/tmp/a.jsonl".as_ref()]);
    assert!(
        !out.status.success() && out.stderr_text().contains("--egress-policy"),
        "{out:?}"
    );
    let not_a_certificate = dir.path().join("roots.pem");
    std::fs::write(&not_a_certificate, "not a certificate\n").unwrap();
    let out = boot(&[
        "--egress-policy".as_ref(),
        policy.as_os_str(),
        "--egress-upstream-ca".as_ref(),
        not_a_certificate.as_os_str(),
    ]);
    assert!(
        !out.status.success()
            && out.stderr_text().contains("--egress-upstream-ca")
            && out.stderr_text().contains("holds no PEM certificate"),
        "{out:?}"
    );
}
