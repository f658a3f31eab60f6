//! `agentvm bench net`: the egress filter thread and the userspace guest in one process, beside
//! host loopback TCP. A small run (three runs of 2 MiB) whose JSON is checked for its shape and
//! for numbers that are there and ordered, never for speed. No VM boots, so no KVM is needed.

use std::time::Duration;

use integration_tests::agentvm::run_agentvm;
use serde_json::Value;

/// Hang detector for the whole benchmark (it takes well under a second).
const BENCH_TIMEOUT: Duration = Duration::from_secs(120);

fn figure<'a>(doc: &'a Value, id: &str) -> &'a Value {
    doc["figures"]
        .as_array()
        .unwrap_or_else(|| panic!("no figures in {doc:#}"))
        .iter()
        .find(|f| f["id"] == id)
        .unwrap_or_else(|| panic!("no figure {id} in {doc:#}"))
}

/// A summary over `n` samples, positive and ordered.
fn check_summary(summary: &Value, n: u64, what: &str) {
    assert_eq!(summary["n"], n, "{what}: {summary}");
    let get = |k: &str| {
        summary[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}: no {k} in {summary}"))
    };
    assert!(get("min") > 0.0, "{what}: {summary}");
    assert!(
        get("min") <= get("median") && get("median") <= get("p99") && get("p99") <= get("max"),
        "{what}: {summary}"
    );
}

#[test]
fn net_bench_reports_setup_and_throughput_beside_host_loopback() {
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let out = run_agentvm(
        [
            "bench",
            "net",
            "--runs",
            "3",
            "--mib",
            "2",
            "--json",
            "--out",
            out_file.path().to_str().unwrap(),
        ],
        BENCH_TIMEOUT,
    )
    .expect("run agentvm bench net");
    let err = out.stderr_text();
    assert!(
        out.status.success(),
        "bench failed ({}):\n{err}",
        out.status
    );
    assert!(
        err.contains("bench net: run 3/3 done"),
        "progress on stderr:\n{err}"
    );
    let doc: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    let written: Value = serde_json::from_slice(&std::fs::read(out_file.path()).unwrap()).unwrap();
    assert_eq!(doc, written, "--out holds the same document");

    assert_eq!(doc["benchmark"], "agentvm bench net");
    assert_eq!(
        (doc["runs"].as_u64(), doc["mib_per_transfer"].as_u64()),
        (Some(3), Some(2))
    );
    assert!(doc["machine"]["cpus"].as_u64().unwrap() >= 1);
    assert_eq!(doc["target_gbit_per_s"], 2.0);
    assert!(doc["target_met"].is_boolean());
    assert!(doc["filtered"].as_str().unwrap().contains("egress filter"));
    assert!(doc["notes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n.as_str().unwrap().contains("userspace TCP stack")));
    for (id, unit) in [
        ("connect_setup", "us"),
        ("connect_first_reply", "us"),
        ("guest_to_upstream", "gbit_per_s"),
        ("upstream_to_guest", "gbit_per_s"),
    ] {
        let f = figure(&doc, id);
        assert_eq!(f["unit"], unit, "{id}");
        check_summary(&f["agentvm"], 3, &format!("{id} through the filter"));
        check_summary(&f["peer"], 3, &format!("{id} on host loopback"));
    }
}

#[test]
fn net_bench_refuses_bad_sizes_and_an_unwritable_out() {
    for (args, expected) in [
        (&["--runs", "0"][..], "--runs"),
        (&["--mib", "0"][..], "--mib"),
        (&["--mib", "lots"][..], "--mib"),
        (
            &["--out", "/nonexistent-dir/net.json"][..],
            "does not exist",
        ),
    ] {
        let out = run_agentvm(["bench", "net"].iter().chain(args), BENCH_TIMEOUT).unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = out.stderr_text();
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}
