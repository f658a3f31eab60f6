//! `agentvm bench restore` with the ring-3 probe guest on this machine's KVM: a small run (two
//! iterations, a fork of two) whose JSON is checked for its shape and for numbers that are there
//! and positive where they must be, never for speed.

use std::time::Duration;

use integration_tests::agentvm::{require_kvm, run_agentvm};
use integration_tests::probe::probe_elf;
use serde_json::Value;

/// Hang detector for the whole benchmark (it takes a few seconds).
const BENCH_TIMEOUT: Duration = Duration::from_secs(180);

/// The element of `parent[list]` whose `id` is `id`.
fn by_id<'a>(parent: &'a Value, list: &str, id: &str) -> &'a Value {
    parent[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {parent:#}"))
        .iter()
        .find(|e| e["id"] == id)
        .unwrap_or_else(|| panic!("no {id} in {list} of {parent:#}"))
}

fn section<'a>(doc: &'a Value, id: &str) -> &'a Value {
    by_id(doc, "sections", id)
}

fn figure<'a>(section: &'a Value, id: &str) -> &'a Value {
    by_id(section, "figures", id)
}

/// The figure's summary over `n` samples, ordered, with a positive minimum; returns its median.
fn positive(section: &Value, id: &str, n: u64) -> f64 {
    let s = &figure(section, id)["agentvm"];
    let what = format!("{} {id}: {s}", section["id"]);
    assert_eq!(s["n"], n, "{what}");
    let get = |k: &str| s[k].as_f64().unwrap_or_else(|| panic!("{k} of {what}"));
    assert!(get("min") > 0.0, "{what}");
    assert!(
        get("min") <= get("median") && get("median") <= get("p99") && get("p99") <= get("max"),
        "{what}"
    );
    get("median")
}

fn absent(section: &Value, id: &str) {
    assert!(
        figure(section, id)["agentvm"].is_null(),
        "{} {id} should not apply: {section:#}",
        section["id"]
    );
}

#[test]
fn restore_bench_reports_every_backend_the_cold_boot_and_the_fork() {
    if !require_kvm() {
        return;
    }
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let out = run_agentvm(
        [
            "bench",
            "restore",
            "--iterations",
            "2",
            "--fork",
            "2",
            "--mem-mib",
            "64",
            "--json",
            "--kernel",
            probe_elf().to_str().unwrap(),
            "--out",
            out_file.path().to_str().unwrap(),
        ],
        BENCH_TIMEOUT,
    )
    .expect("run agentvm bench restore");
    let err = out.stderr_text();
    assert!(
        out.status.success(),
        "bench failed ({}):\n{err}",
        out.status
    );
    assert!(
        err.contains("bench: 2/2 uffd+prefetch"),
        "progress on stderr:\n{err}"
    );
    let doc: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    let written: Value = serde_json::from_slice(&std::fs::read(out_file.path()).unwrap()).unwrap();
    assert_eq!(doc, written, "--out holds the same document");

    assert_eq!(doc["benchmark"], "agentvm bench restore");
    assert_eq!(
        (doc["iterations"].as_u64(), doc["fork"].as_u64()),
        (Some(2), Some(2))
    );
    assert!(doc["machine"]["cpus"].as_u64().unwrap() >= 1);
    assert!(!doc["machine"]["cpu_model"].as_str().unwrap().is_empty());
    assert_eq!(doc["guest"]["mem_mib"], 64);
    assert!(doc["snapshot"]["create_ms"].as_f64().unwrap() > 0.0);
    let ws_pages = doc["snapshot"]["working_set_pages"].as_u64().unwrap();
    assert!(ws_pages > 0, "the first uffd restore recorded pages");
    let ids: Vec<&str> = doc["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["file", "uffd", "uffd_prefetch", "cold_boot", "fork"]);

    for id in ["file", "uffd", "uffd_prefetch", "cold_boot"] {
        let s = section(&doc, id);
        assert!(s["error"].is_null(), "{s:#}");
        assert_eq!(s["samples"].as_array().unwrap().len(), 2, "{id}");
        positive(s, "vmm_load_to_first_run", 2);
        positive(s, "request_round_trip", 2);
        positive(s, "request_to_console_line", 2);
        positive(s, "vmm_load_to_kvm_ready", 2);
        for phase in ["vmm_kvm_ready_to_loaded", "vmm_loaded_to_first_run"] {
            assert_eq!(figure(s, phase)["agentvm"]["n"], 2, "{id} {phase}: {s:#}");
        }
        for sample in s["samples"].as_array().unwrap() {
            let ns = |k: &str| {
                sample[k]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{k}: {sample}"))
            };
            assert!(
                ns("vmm_to_kvm_ready_us") <= ns("vmm_to_loaded_us")
                    && ns("vmm_to_loaded_us") <= ns("vmm_to_first_run_us"),
                "the VMM's phases in order: {sample}"
            );
            assert!(
                ns("request_ns") <= ns("request_to_console_line_ns"),
                "the guest printed after the request was answered: {sample}"
            );
        }
        for rss in ["rss_total", "rss_anon", "rss_file", "pss_total"] {
            positive(s, rss, 2);
        }
    }
    for id in ["file", "cold_boot"] {
        let s = section(&doc, id);
        for uffd in [
            "uffd_on_demand_pages",
            "uffd_prefetched_pages",
            "uffd_faults_per_s",
        ] {
            absent(s, uffd);
        }
    }
    // Without a working set every page comes on demand and none is prefetched.
    let uffd = section(&doc, "uffd");
    positive(uffd, "uffd_on_demand_pages", 2);
    positive(uffd, "uffd_faults_per_s", 2);
    for sample in uffd["samples"].as_array().unwrap() {
        assert_eq!(sample["uffd_prefetched_pages"], 0, "{sample}");
    }
    // With it, the whole recorded set is copied in before the vCPUs run.
    let prefetch = section(&doc, "uffd_prefetch");
    for sample in prefetch["samples"].as_array().unwrap() {
        assert_eq!(sample["uffd_prefetched_pages"], ws_pages, "{sample}");
    }

    let fork = section(&doc, "fork");
    assert!(fork["error"].is_null(), "{fork:#}");
    positive(fork, "fork_all_loaded", 2);
    positive(fork, "fork_all_console_line", 2);
    positive(fork, "fork_rss_sum", 2);
    positive(fork, "fork_pss_sum", 2);
    for sample in fork["samples"].as_array().unwrap() {
        assert_eq!(sample["vms"], 2);
        assert!(
            sample["all_loaded_ns"].as_u64() <= sample["all_console_line_ns"].as_u64(),
            "every guest printed after it was loaded: {sample}"
        );
        let rss = sample["rss_sum_kib"].as_u64().unwrap();
        let pss = sample["pss_sum_kib"].as_u64().unwrap();
        assert!(
            0 < pss && pss < rss,
            "two VMMs share pages (binary, memory file), so PSS < RSS: {sample}"
        );
    }
}
