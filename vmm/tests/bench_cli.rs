//! `agentvm bench boot`: argument errors (no KVM needed), a small VMM-side run on hosts with
//! /dev/kvm whose JSON is checked for structure and sane values (never for speed), and, on
//! request only (`cargo test -p vmm --test bench_cli -- --ignored`), the guest-bound part, which
//! boots the nested test host and takes minutes.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn agentvm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentvm"))
        .args(args)
        .env("AGENTVM_LOG", "off")
        .output()
        .expect("run agentvm")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_clear_error(out: &Output, expected: &[&str]) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected failure, got {:?}",
        out.status
    );
    for e in expected {
        assert!(err.contains(e), "stderr lacks {e:?}:\n{err}");
    }
    assert!(!err.contains("panicked"), "agentvm panicked:\n{err}");
    assert!(out.stdout.is_empty(), "stdout should stay empty on errors");
}

#[test]
fn zero_runs_are_refused() {
    let out = agentvm(&["bench", "boot", "--runs", "0", "--no-nested"]);
    assert_clear_error(&out, &["--runs", "0"]);
    assert_eq!(out.status.code(), Some(2), "clap's usage error status");
}

#[test]
fn runs_must_be_a_number() {
    let out = agentvm(&["bench", "boot", "--runs", "many"]);
    assert_clear_error(&out, &["--runs", "many"]);
}

#[test]
fn unknown_flags_and_subcommands_are_refused() {
    let out = agentvm(&["bench", "boot", "--fast"]);
    assert_clear_error(&out, &["--fast"]);
    let out = agentvm(&["bench", "reboot"]);
    assert_clear_error(&out, &["reboot"]);
    let out = agentvm(&["bench"]);
    assert_clear_error(&out, &["boot"]);
}

#[test]
fn too_short_boot_timeout_is_refused() {
    let out = agentvm(&["bench", "boot", "--boot-timeout", "1"]);
    assert_clear_error(&out, &["--boot-timeout", "1"]);
}

#[test]
fn out_file_in_a_missing_directory_is_refused_before_any_boot() {
    let out = agentvm(&[
        "bench",
        "boot",
        "--no-nested",
        "--out",
        "/nonexistent-agentvm-dir/bench.json",
    ]);
    assert_clear_error(
        &out,
        &["--out", "/nonexistent-agentvm-dir", "does not exist"],
    );
    assert_eq!(out.status.code(), Some(125));
    let out = agentvm(&["bench", "boot", "--no-nested", "--out", "/tmp"]);
    assert_clear_error(&out, &["is a directory"]);
}

#[test]
fn hidden_helpers_check_their_arguments() {
    let out = agentvm(&[
        "bench", "peer-run", "--kernel", "/k", "--initrd", "/i", "--", "true",
    ]);
    assert_clear_error(&out, &["--qemu"]);
    let out = agentvm(&[
        "bench",
        "guest-runs",
        "--kernel",
        "/k",
        "--initrd",
        "/i",
        "--runs",
        "0",
        "--",
        "true",
    ]);
    assert_clear_error(&out, &["--runs"]);
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// `None` (after saying why) when this host has no /dev/kvm and the test may skip.
fn kvm_or_skip(test: &str) -> Option<()> {
    if Path::new("/dev/kvm").exists() {
        return Some(());
    }
    assert!(
        !in_ci(),
        "{test}: /dev/kvm is missing (CI=true: KVM tests must not be skipped)"
    );
    eprintln!("skipping {test}: /dev/kvm is missing on this host");
    None
}

fn figure<'a>(section: &'a Value, id: &str) -> &'a Value {
    section["figures"]
        .as_array()
        .expect("figures array")
        .iter()
        .find(|f| f["id"] == id)
        .unwrap_or_else(|| panic!("no figure {id} in {section:#}"))
}

fn summary_is_sane(summary: &Value, n: u64, what: &str) {
    assert_eq!(summary["n"], n, "{what}: {summary}");
    let get = |k: &str| {
        summary[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}: {k} missing in {summary}"))
    };
    let (min, median, p99, max) = (get("min"), get("median"), get("p99"), get("max"));
    assert!(min.is_finite() && min >= 0.0, "{what}: {summary}");
    assert!(
        min <= median && median <= p99 && p99 <= max,
        "{what}: {summary}"
    );
}

#[test]
fn vmm_side_run_reports_ordered_phases_and_memory() {
    if kvm_or_skip("vmm_side_run_reports_ordered_phases_and_memory").is_none() {
        return;
    }
    let out_file = std::env::temp_dir().join(format!("agentvm-bench-{}.json", std::process::id()));
    let out = agentvm(&[
        "bench",
        "boot",
        "--runs",
        "2",
        "--no-nested",
        "--json",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert!(
        out.status.success(),
        "bench failed ({:?}):\n{err}",
        out.status
    );
    assert!(
        err.contains("bench: boot 2/2"),
        "progress lines go to stderr:\n{err}"
    );
    let doc: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    let written: Value =
        serde_json::from_slice(&std::fs::read(&out_file).expect("--out file")).unwrap();
    std::fs::remove_file(&out_file).unwrap();
    assert_eq!(doc, written, "--out holds the same document");

    assert_eq!(doc["runs"], 2);
    assert!(doc["machine"]["cpus"].as_u64().unwrap() >= 1);
    assert!(!doc["machine"]["cpu_model"].as_str().unwrap().is_empty());
    assert!(!doc["machine"]["host_kernel"].as_str().unwrap().is_empty());
    assert!(doc["guest"]["kernel"]
        .as_str()
        .unwrap()
        .ends_with("vmlinux"));
    let sections = doc["sections"].as_array().unwrap();
    assert_eq!(sections.len(), 1, "--no-nested leaves only the VMM side");
    let s = &sections[0];
    assert_eq!(s["id"], "vmm_side");
    assert!(s["error"].is_null(), "{s:#}");

    for id in [
        "spawn_to_first_kvm_run",
        "spawn_to_process_start",
        "process_start_to_kvm_ready",
        "kvm_ready_to_kernel_loaded",
        "kernel_loaded_to_first_kvm_run",
        "rss_before_guest_anon",
        "rss_before_guest_shmem",
        "rss_before_guest_total",
    ] {
        let f = figure(s, id);
        assert!(f["peer"].is_null(), "no peer on the VMM side: {f}");
        summary_is_sane(&f["agentvm"], 2, id);
    }
    assert_eq!(figure(s, "spawn_to_first_kvm_run")["unit"], "ms");
    assert_eq!(figure(s, "rss_before_guest_total")["unit"], "mib");
    assert!(
        figure(s, "spawn_to_first_kvm_run")["agentvm"]["min"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(
        figure(s, "rss_before_guest_anon")["agentvm"]["min"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    let samples = s["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2);
    for sample in samples {
        let t = |k: &str| {
            sample[k]
                .as_u64()
                .unwrap_or_else(|| panic!("{k} in {sample}"))
        };
        let order = [
            t("spawn_ns"),
            t("process_start_ns"),
            t("kvm_ready_ns"),
            t("kernel_loaded_ns"),
            t("first_kvm_run_ns"),
        ];
        assert!(order[0] > 0);
        assert!(
            order.windows(2).all(|w| w[0] <= w[1]),
            "phases out of order: {sample}"
        );
        assert!(order[4] > order[0], "no time passed: {sample}");
        assert!(sample["rss_before_guest"]["total_kib"].as_u64().unwrap() > 0);
    }
}

#[test]
fn vmm_side_table_names_where_it_was_measured() {
    if kvm_or_skip("vmm_side_table_names_where_it_was_measured").is_none() {
        return;
    }
    let out = agentvm(&["bench", "boot", "--runs", "1", "--no-nested"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "machine: ",
        "measured on: this machine",
        "spawn -> first KVM_RUN (ms)",
        "RSS before guest: anon",
        "n=1",
    ] {
        assert!(
            table.contains(expected),
            "table lacks {expected:?}:\n{table}"
        );
    }
}

/// The whole benchmark, guest-bound part included (nested test host on hosts whose KVM cannot
/// run Linux). Slow: run it on request.
#[test]
#[ignore = "boots the nested test host (minutes); run with --ignored"]
fn guest_bound_run_measures_agentvm_and_reports_the_peer() {
    if kvm_or_skip("guest_bound_run_measures_agentvm_and_reports_the_peer").is_none() {
        return;
    }
    let out = agentvm(&["bench", "boot", "--runs", "1", "--json"]);
    let err = stderr(&out);
    assert!(
        out.status.success(),
        "bench failed ({:?}):\n{err}",
        out.status
    );
    let doc: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    let g = doc["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "guest_bound")
        .expect("guest-bound section");
    assert!(g["error"].is_null(), "{g:#}");
    for id in [
        "spawn_to_kernel_entry",
        "spawn_to_agent_ready",
        "spawn_to_result",
    ] {
        summary_is_sane(&figure(g, id)["agentvm"], 1, id);
    }
    let entry = figure(g, "spawn_to_kernel_entry")["agentvm"]["median"]
        .as_f64()
        .unwrap();
    let ready = figure(g, "spawn_to_agent_ready")["agentvm"]["median"]
        .as_f64()
        .unwrap();
    let result = figure(g, "spawn_to_result")["agentvm"]["median"]
        .as_f64()
        .unwrap();
    assert!(0.0 < entry && entry <= ready && ready <= result);
    let peer = &g["peer"];
    match peer["status"].as_str().unwrap() {
        "ok" => summary_is_sane(&figure(g, "spawn_to_agent_ready")["peer"], 1, "peer ready"),
        other => assert!(
            peer["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "peer status {other} without a reason: {peer}"
        ),
    }
    if !doc["machine"]["kvm"].as_str().unwrap().contains("hardware") {
        assert!(g["measured_on"]
            .as_str()
            .unwrap()
            .contains("not a VMX host"));
    }
}

#[test]
fn exec_bench_refuses_bad_sizes() {
    for (flag, value) in [
        ("--runs", "0"),
        ("--runs", "lots"),
        ("--stream-mib", "0"),
        ("--stream-mib", "70000"),
        ("--stream-runs", "0"),
        ("--boot-timeout", "1"),
    ] {
        let out = agentvm(&["bench", "exec", flag, value]);
        assert_clear_error(&out, &[flag, value]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: usage error");
    }
    let out = agentvm(&["bench", "exec", "--fast"]);
    assert_clear_error(&out, &["--fast"]);
}

#[test]
fn exec_bench_checks_its_out_file_before_any_boot() {
    let out = agentvm(&[
        "bench",
        "exec",
        "--out",
        "/nonexistent-agentvm-dir/exec.json",
    ]);
    assert_clear_error(
        &out,
        &["--out", "/nonexistent-agentvm-dir", "does not exist"],
    );
    assert_eq!(out.status.code(), Some(125));
}

#[test]
fn exec_helper_checks_its_arguments() {
    let out = agentvm(&["bench", "exec-runs", "--kernel", "/k"]);
    assert_clear_error(&out, &["--initrd"]);
    let out = agentvm(&[
        "bench",
        "exec-runs",
        "--kernel",
        "/k",
        "--initrd",
        "/i",
        "--firmware-dir",
        "/f",
    ]);
    assert_clear_error(&out, &["--firmware-dir", "--qemu"]);
}

fn exec_helper_json(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no JSON on stdout; stderr:\n{}", stderr(out)));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[test]
fn exec_helper_reports_a_guest_that_cannot_boot_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("no-vmlinux");
    let initrd = dir.path().join("no-initrd");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "bench",
            "exec-runs",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--runs",
            "1",
            "--boot-timeout",
            "5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| {
        Command::new(env!("CARGO_BIN_EXE_agentvm"))
            .args(a)
            .env("AGENTVM_LOG", "off")
            .output()
            .expect("run agentvm")
    };

    // agentvm itself failing fails the helper, with the reason both in the JSON and on stderr.
    let out = run(args(&[]));
    assert!(!out.status.success());
    let doc = exec_helper_json(&out);
    assert_eq!(doc["vmm"], "agentvm");
    assert_eq!(doc["status"], "failed");
    assert!(doc["samples"].is_null());
    let err = doc["error"].as_str().unwrap();
    assert!(err.contains("exited"), "{err}");
    assert!(stderr(&out).contains("exited"));

    // The peer failing is a finding: the helper succeeds and says why, per variant tried.
    let qemu = dir.path().join("no-qemu");
    let out = run(args(&["--qemu", qemu.to_str().unwrap()]));
    assert!(out.status.success(), "{}", stderr(&out));
    let doc = exec_helper_json(&out);
    assert_eq!(doc["vmm"], "qemu-microvm");
    assert_eq!(doc["status"], "did-not-boot");
    let tried = doc["tried"].as_array().unwrap();
    assert!(!tried.is_empty());
    assert!(tried
        .iter()
        .all(|t| t["outcome"].as_str().unwrap().contains("cannot start")));
}

/// The whole exec benchmark with small sizes (nested test host on hosts whose KVM cannot run
/// Linux). Slow: run it on request.
#[test]
#[ignore = "boots the nested test host (minutes); run with --ignored"]
fn exec_bench_measures_agentvm_and_reports_the_peer() {
    if kvm_or_skip("exec_bench_measures_agentvm_and_reports_the_peer").is_none() {
        return;
    }
    let out = agentvm(&[
        "bench",
        "exec",
        "--runs",
        "3",
        "--stream-mib",
        "1",
        "--stream-runs",
        "2",
        "--json",
    ]);
    let err = stderr(&out);
    assert!(
        out.status.success(),
        "bench failed ({:?}):\n{err}",
        out.status
    );
    let doc: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    assert_eq!(doc["benchmark"], "agentvm bench exec");
    let s = &doc["sections"][0];
    assert_eq!(s["id"], "exec");
    assert!(s["error"].is_null(), "{s:#}");
    for (id, n) in [
        ("exec_true_round_trip", 3),
        ("ping_round_trip", 3),
        ("stream_throughput", 2),
        ("vmm_cpu_per_exec_host", 3),
        ("vmm_cpu_per_exec_all", 3),
        ("vmm_cpu_per_mib_host", 2),
    ] {
        summary_is_sane(&figure(s, id)["agentvm"], n, id);
    }
    let peer = &s["peer"];
    match peer["status"].as_str().unwrap() {
        "ok" => summary_is_sane(&figure(s, "exec_true_round_trip")["peer"], 3, "peer exec"),
        other => assert!(
            peer["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "peer status {other} without a reason: {peer}"
        ),
    }
}

#[test]
fn restore_bench_refuses_bad_arguments_before_any_boot() {
    for (flag, value) in [
        ("--iterations", "0"),
        ("--iterations", "some"),
        ("--fork", "501"),
        ("--mem-mib", "8"),
    ] {
        let out = agentvm(&["bench", "restore", flag, value]);
        assert_clear_error(&out, &[flag, value]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: usage error");
    }
    let out = agentvm(&["bench", "restore", "--kernel", "/nonexistent-agentvm-guest"]);
    assert_clear_error(
        &out,
        &["--kernel /nonexistent-agentvm-guest", "no such file"],
    );
    assert_eq!(out.status.code(), Some(125));
    let out = agentvm(&[
        "bench",
        "restore",
        "--out",
        "/nonexistent-agentvm-dir/restore.json",
    ]);
    assert_clear_error(
        &out,
        &["--out", "/nonexistent-agentvm-dir", "does not exist"],
    );
}
