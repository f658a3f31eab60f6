//! The isolate tier on this machine's KVM: WebAssembly jobs in no-OS guests (vmm::isolate).

use std::time::{Duration, Instant};

use integration_tests::agentvm::require_kvm;
use vmm::isolate::{
    HostContext, Isolate, IsolateConfig, IsolateError, JobSpec, KvStore, Pool, Value,
};

fn job(wat_src: &str, function: &str, args: &[&str]) -> JobSpec {
    JobSpec {
        module: wat::parse_str(wat_src).expect("test WAT parses"),
        function: function.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        cpu_limit: Duration::from_secs(5),
        wall_limit: Duration::from_secs(20),
    }
}

/// Runs `f` with a host context over `kv` whose log lines are dropped.
fn with_host<R>(kv: &mut KvStore, f: impl FnOnce(&mut HostContext<'_>) -> R) -> R {
    let mut log = |_: &str| {};
    f(&mut HostContext {
        kv,
        log: &mut log,
        fetch: None,
    })
}

fn run_once(job: &JobSpec) -> (Result<Vec<Value>, IsolateError>, Vec<String>, KvStore) {
    let mut kv = KvStore::new(1 << 20);
    let mut logs = Vec::new();
    let mut log = |l: &str| logs.push(l.to_string());
    let mut isolate = Isolate::boot(IsolateConfig::default()).expect("isolate boots");
    let result = isolate.run(
        job,
        &mut HostContext {
            kv: &mut kv,
            log: &mut log,
            fetch: None,
        },
    );
    (result, logs, kv)
}

/// A function that never returns.
fn spin_job() -> JobSpec {
    job(
        r#"(module (func (export "spin") (loop br 0)))"#,
        "spin",
        &[],
    )
}

const ADD: &str = r#"(module (func (export "add") (param i32 i32) (result i32)
    local.get 0 local.get 1 i32.add))"#;

#[test]
fn a_function_computes_its_result() {
    if !require_kvm() {
        return;
    }
    let (result, _, _) = run_once(&job(ADD, "add", &["2", "40"]));
    assert_eq!(result.unwrap(), vec![Value::I32(42)]);
}

#[test]
fn host_calls_round_trip_log_and_key_value() {
    if !require_kvm() {
        return;
    }
    let wat_src = r#"(module
      (import "agentvm" "log" (func $log (param i32 i32)))
      (import "agentvm" "kv_put" (func $put (param i32 i32 i32 i32) (result i32)))
      (import "agentvm" "kv_get" (func $get (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 0) "hello from wasm")
      (data (i32.const 32) "answer")
      (data (i32.const 48) "forty-two")
      (func (export "main") (result i32 i32)
        (call $log (i32.const 0) (i32.const 15))
        (drop (call $put (i32.const 32) (i32.const 6) (i32.const 48) (i32.const 9)))
        ;; read it back to offset 100 and return (length, first byte)
        (call $get (i32.const 32) (i32.const 6) (i32.const 100) (i32.const 64))
        (i32.load8_u (i32.const 100))))"#;
    let (result, logs, kv) = run_once(&job(wat_src, "main", &[]));
    assert_eq!(
        result.unwrap(),
        vec![Value::I32(9), Value::I32(i32::from(b'f'))]
    );
    assert_eq!(logs, vec!["hello from wasm".to_string()]);
    assert_eq!(kv.get(b"answer"), Some(&b"forty-two"[..]));
}

#[test]
fn a_missing_key_reads_as_minus_one_and_a_full_store_refuses() {
    if !require_kvm() {
        return;
    }
    let wat_src = r#"(module
      (import "agentvm" "kv_put" (func $put (param i32 i32 i32 i32) (result i32)))
      (import "agentvm" "kv_get" (func $get (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "main") (result i32 i32)
        (call $get (i32.const 0) (i32.const 3) (i32.const 100) (i32.const 10))
        (call $put (i32.const 0) (i32.const 3) (i32.const 0) (i32.const 60000))))"#;
    let mut kv = KvStore::new(1000);
    let mut isolate = Isolate::boot(IsolateConfig::default()).unwrap();
    let result = with_host(&mut kv, |ctx| isolate.run(&job(wat_src, "main", &[]), ctx));
    assert_eq!(result.unwrap(), vec![Value::I32(-1), Value::I32(-1)]);
    assert!(kv.is_empty());
}

#[test]
fn an_infinite_loop_is_stopped_by_the_cpu_limit() {
    if !require_kvm() {
        return;
    }
    let mut spin = spin_job();
    spin.cpu_limit = Duration::from_millis(200);
    let (result, _, _) = run_once(&spin);
    match result {
        Err(IsolateError::CpuLimitExceeded { limit }) => {
            assert_eq!(limit, Duration::from_millis(200))
        }
        other => panic!("expected the CPU limit, got {other:?}"),
    }
}

#[test]
fn the_wall_clock_limit_applies_too() {
    if !require_kvm() {
        return;
    }
    let mut spin = spin_job();
    spin.cpu_limit = Duration::from_secs(60);
    spin.wall_limit = Duration::from_millis(150);
    let (result, _, _) = run_once(&spin);
    assert!(
        matches!(result, Err(IsolateError::WallLimitExceeded { .. })),
        "{result:?}"
    );
}

#[test]
fn memory_growth_beyond_the_limit_is_refused() {
    if !require_kvm() {
        return;
    }
    let grow = r#"(module (memory 1)
      (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0))))"#;
    let config = IsolateConfig {
        max_wasm_mib: 2,
        ..IsolateConfig::default()
    };
    let mut kv = KvStore::new(0);
    let mut log = |_: &str| {};
    let mut ctx = HostContext {
        kv: &mut kv,
        log: &mut log,
        fetch: None,
    };
    // 1 page + 31 pages = 2 MiB: allowed; one page more is not.
    let mut isolate = Isolate::boot(config).unwrap();
    assert_eq!(
        isolate.run(&job(grow, "grow", &["31"]), &mut ctx).unwrap(),
        vec![Value::I32(1)]
    );
    let mut isolate = Isolate::boot(config).unwrap();
    assert_eq!(
        isolate.run(&job(grow, "grow", &["32"]), &mut ctx).unwrap(),
        vec![Value::I32(-1)]
    );
    // A module whose initial memory is over the limit does not instantiate.
    let mut isolate = Isolate::boot(config).unwrap();
    let big = r#"(module (memory 64) (func (export "f")))"#;
    let err = isolate.run(&job(big, "f", &[]), &mut ctx).unwrap_err();
    assert!(matches!(err, IsolateError::Instantiate(_)), "{err}");
}

/// A module that fills the guest's heap (every table grown as far as the heap allows, whatever
/// its size) and then needs more stack: the isolate reports that it ran out of memory, not a
/// trap or a crash, and the next isolate of the pool is unaffected.
#[test]
fn a_module_that_exhausts_the_guest_heap_gets_out_of_memory() {
    if !require_kvm() {
        return;
    }
    const TABLES: usize = 8;
    let tables: String = (0..TABLES)
        .map(|t| format!("(table $t{t} 0 funcref)"))
        .collect();
    let grow_all: String = (0..TABLES)
        .map(|t| {
            format!(
                "(local.set $d (i32.const 0x1000000))
                 (block $done{t} (loop $try{t}
                   (br_if $done{t} (i32.eqz (local.get $d)))
                   (if (i32.eq (table.grow $t{t} (ref.null func) (local.get $d)) (i32.const -1))
                     (then (local.set $d (i32.shr_u (local.get $d) (i32.const 1)))))
                   (br $try{t})))"
            )
        })
        .collect();
    let locals = vec!["i64"; 100].join(" ");
    let wat = format!(
        "(module {tables}
          (func $deep (param $n i32) (result i32) (local {locals})
            (if (result i32) (i32.eqz (local.get $n)) (then (i32.const 0))
              (else (i32.add (i32.const 1) (call $deep (i32.sub (local.get $n) (i32.const 1)))))))
          (func (export \"main\") (result i32) (local $d i32)
            {grow_all}
            (call $deep (i32.const 900))))"
    );
    let pool = Pool::new(IsolateConfig::default(), 1, 1).unwrap();
    let mut kv = KvStore::new(0);
    let err = with_host(&mut kv, |ctx| pool.run(&job(&wat, "main", &[]), ctx)).unwrap_err();
    assert!(matches!(err, IsolateError::OutOfMemory(_)), "{err}");
    assert_eq!(err.kind(), "out_of_memory");
    assert!(err.to_string().contains("heap is exhausted"), "{err}");
    let again = with_host(&mut kv, |ctx| pool.run(&job(ADD, "add", &["2", "40"]), ctx));
    assert_eq!(again.unwrap(), vec![Value::I32(42)]);
}

#[test]
fn bad_modules_exports_arguments_and_traps_are_named() {
    if !require_kvm() {
        return;
    }
    let cases: Vec<(JobSpec, &str, &str)> = vec![
        (
            JobSpec {
                module: b"\0asm\x01\0\0\0garbage".to_vec(),
                ..job(ADD, "add", &[])
            },
            "invalid_module",
            "",
        ),
        (job(ADD, "sub", &["1", "2"]), "missing_export", "add"),
        (job(ADD, "add", &["1"]), "bad_arguments", "takes 2 argument"),
        (job(ADD, "add", &["1", "x"]), "bad_arguments", "argument 2"),
        (
            job(
                r#"(module (func (export "boom") unreachable))"#,
                "boom",
                &[],
            ),
            "trap",
            "unreachable",
        ),
        (
            job(
                r#"(module (func (export "div") (param i32) (result i32)
                    i32.const 1 local.get 0 i32.div_s))"#,
                "div",
                &["0"],
            ),
            "trap",
            "divi",
        ),
        (
            job(
                r#"(module (import "env" "nope" (func)) (func (export "f")))"#,
                "f",
                &[],
            ),
            "instantiate",
            "nope",
        ),
    ];
    for (spec, kind, needle) in cases {
        let (result, _, _) = run_once(&spec);
        let err = result.expect_err(kind);
        assert_eq!(err.kind(), kind, "{err}");
        assert!(
            err.to_string().to_lowercase().contains(needle),
            "{kind}: {err:?} does not mention {needle:?}"
        );
    }
}

#[test]
fn a_module_larger_than_the_isolate_takes_is_refused_before_it_runs() {
    if !require_kvm() {
        return;
    }
    let config = IsolateConfig {
        max_module_bytes: 1024,
        ..IsolateConfig::default()
    };
    let mut spec = job(ADD, "add", &["1", "2"]);
    spec.module.resize(4096, 0);
    let mut isolate = Isolate::boot(config).unwrap();
    let err = with_host(&mut KvStore::new(0), |ctx| isolate.run(&spec, ctx)).unwrap_err();
    assert!(
        matches!(
            err,
            IsolateError::ModuleTooLarge {
                size: 4096,
                max: 1024
            }
        ),
        "{err}"
    );
}

/// A mutable global and memory written by one job are back to the template's values for the next.
#[test]
fn a_pooled_isolate_starts_every_job_from_the_template() {
    if !require_kvm() {
        return;
    }
    let counter = r#"(module (memory 1) (global $n (mut i32) (i32.const 0))
      (func (export "bump") (result i32 i32)
        (global.set $n (i32.add (global.get $n) (i32.const 1)))
        (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 10)))
        (global.get $n) (i32.load (i32.const 0))))"#;
    let pool = Pool::new(IsolateConfig::default(), 1, 1).unwrap();
    let mut kv = KvStore::new(0);
    let mut log = |_: &str| {};
    for _ in 0..3 {
        let got = with_host(&mut kv, |ctx| pool.run(&job(counter, "bump", &[]), ctx)).unwrap();
        assert_eq!(got, vec![Value::I32(1), Value::I32(10)]);
    }
    // After a job that hit the CPU limit too.
    let mut spin = spin_job();
    spin.cpu_limit = Duration::from_millis(50);
    let mut ctx = HostContext {
        kv: &mut kv,
        log: &mut log,
        fetch: None,
    };
    assert!(pool.run(&spin, &mut ctx).is_err());
    assert_eq!(
        pool.run(&job(counter, "bump", &[]), &mut ctx).unwrap(),
        vec![Value::I32(1), Value::I32(10)]
    );
    assert_eq!(pool.idle(), 1);
}

/// 200 isolates alive at once, each running its own job, from 4 threads.
#[test]
fn two_hundred_isolates_at_once() {
    if !require_kvm() {
        return;
    }
    let pool = Pool::new(IsolateConfig::default(), 0, 0).unwrap();
    let isolates: Vec<Isolate> = (0..200).map(|_| pool.take().unwrap()).collect();
    let chunks: Vec<Vec<(usize, Isolate)>> = {
        let mut chunks: Vec<Vec<(usize, Isolate)>> = (0..4).map(|_| Vec::new()).collect();
        for (i, iso) in isolates.into_iter().enumerate() {
            chunks[i % 4].push((i, iso));
        }
        chunks
    };
    std::thread::scope(|s| {
        for chunk in chunks {
            s.spawn(move || {
                let mut kv = KvStore::new(0);
                for (i, mut iso) in chunk {
                    let spec = job(ADD, "add", &[&i.to_string(), "1"]);
                    let got = with_host(&mut kv, |ctx| iso.run(&spec, ctx)).unwrap();
                    assert_eq!(got, vec![Value::I32(i as i32 + 1)]);
                }
            });
        }
    });
}

#[test]
fn the_cli_prints_results_logs_and_clear_errors() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let wat_path = dir.path().join("m.wat");
    std::fs::write(
        &wat_path,
        r#"(module (import "agentvm" "log" (func $log (param i32 i32)))
             (memory (export "memory") 1) (data (i32.const 0) "hi")
             (func (export "main") (param i64 f64) (result i64 f64)
               (call $log (i32.const 0) (i32.const 2)) local.get 0 local.get 1)
             (func (export "spin") (loop br 0)))"#,
    )
    .unwrap();
    let wasm_path = dir.path().join("add.wasm");
    std::fs::write(&wasm_path, wat::parse_str(ADD).unwrap()).unwrap();
    let agentvm = |args: &[&str]| {
        std::process::Command::new(integration_tests::agentvm::agentvm_bin())
            .args(["isolate", "run"])
            .args(args)
            .output()
            .unwrap()
    };
    let m = wat_path.to_str().unwrap();
    let out = agentvm(&[m, "--arg", "-5", "--arg", "2.5"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "-5\n2.5\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("isolate: hi"));

    let out = agentvm(&[
        wasm_path.to_str().unwrap(),
        "--invoke",
        "add",
        "--arg",
        "1",
        "--arg",
        "2",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "3\n", "{out:?}");

    let expect_failure = |args: &[&str], code: i32, needle: &str| {
        let out = agentvm(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: {stderr:?} lacks {needle:?}"
        );
    };
    expect_failure(&[m, "--arg", "x", "--arg", "1"], 1, "not a valid i64");
    expect_failure(
        &[m, "--invoke", "spin", "--cpu-limit-ms", "100"],
        1,
        "CPU time limit exceeded",
    );
    expect_failure(&[m, "--invoke", "nope"], 1, "main, spin");
    expect_failure(&["/nonexistent.wasm"], 125, "cannot read /nonexistent.wasm");
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"(module").unwrap();
    expect_failure(
        &[junk.to_str().unwrap()],
        125,
        "neither a WebAssembly binary nor valid text",
    );
    expect_failure(
        &[m, "--max-memory-mib", "0"],
        125,
        "--max-memory-mib must be",
    );
}

#[test]
fn the_isolate_benchmark_reports_every_figure() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("isolate.json");
    let mut bench = std::process::Command::new(integration_tests::agentvm::agentvm_bin());
    bench
        .args([
            "bench",
            "isolate",
            "--runs",
            "10",
            "--concurrent",
            "50",
            "--json",
            "--out",
        ])
        .arg(&out_file);
    // A hard descriptor limit of 300 leaves room for (300 - 256) / 2 = 22 isolates per worker
    // process, so the 50 are spread over 3 workers, as 10,000 are on a 20,000-descriptor host.
    // SAFETY: runs in the forked child before exec; setrlimit(2) is async-signal-safe and only
    // lowers the child's own limit.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut bench, || {
            let lim = libc::rlimit {
                rlim_cur: 300,
                rlim_max: 300,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = bench.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
    assert_eq!(doc, written, "--out holds the printed document");
    let figure = |id: &str| {
        doc["figures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["id"] == id)
            .unwrap_or_else(|| panic!("no figure {id}"))
            .clone()
    };
    for id in ["pool_call", "pool_call_and_reset", "scratch_call"] {
        let f = figure(id);
        assert_eq!(f["agentvm"]["n"], 10, "{id}");
        assert!(f["agentvm"]["median"].as_f64().unwrap() > 0.0, "{id}");
    }
    assert!(figure("pool_call")["peer"]["median"].as_f64().unwrap() > 0.0);
    assert!(
        figure("calls_per_second")["agentvm"]["median"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let d = &doc["density"];
    assert_eq!(d["isolates"], 50);
    assert_eq!(d["processes"], 3, "50 isolates at 22 per worker");
    assert_eq!(d["fds_per_isolate"].as_f64(), Some(2.0));
    assert!(d["private_per_isolate_kib"].as_f64().unwrap() > 0.0);
    assert!(d["fit_in_4_gib"].as_f64().unwrap() > 0.0);
    assert!(d["guest_ram_mib"].as_f64().unwrap() > 0.0);
    assert!(doc["machine"]["cpus"].as_u64().unwrap() >= 1);
}

/// While the job runs, the process is under its seccomp filter (mode 2), unless --no-seccomp.
#[test]
fn the_cli_runs_the_job_under_seccomp() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("spin.wat");
    std::fs::write(&module, r#"(module (func (export "main") (loop br 0)))"#).unwrap();
    let policy = dir.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"rules": [{"id": "any", "domain": "*.example.com"}]}"#,
    )
    .unwrap();
    // Each thread's name and seccomp mode while the job spins.
    let modes_while_spinning = |extra: &[&std::ffi::OsStr], wait: Duration| {
        let mut child = std::process::Command::new(integration_tests::agentvm::agentvm_bin())
            .args(["isolate", "run"])
            .arg(&module)
            .args(["--cpu-limit-ms", "20000", "--wall-limit-ms", "20000"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let tasks = format!("/proc/{}/task", child.id());
        let deadline = Instant::now() + wait;
        let mut modes: Vec<(String, String)> = Vec::new();
        // The filters go on once the isolate booted (milliseconds): wait for every thread to be
        // in mode 2, or time out.
        while Instant::now() < deadline {
            modes = std::fs::read_dir(&tasks)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|task| {
                            let read = |file: &str| {
                                std::fs::read_to_string(task.path().join(file)).unwrap_or_default()
                            };
                            let mode = read("status")
                                .lines()
                                .find_map(|l| l.strip_prefix("Seccomp:"))
                                .unwrap_or("")
                                .trim()
                                .to_string();
                            (read("comm").trim().to_string(), mode)
                        })
                        .collect()
                })
                .unwrap_or_default();
            // KVM's NX huge page recovery worker (`kvm-nx-lpage-recovery`) is a kernel task in
            // the process's thread group on recent kernels: no user code runs there.
            modes.retain(|(name, _)| !name.starts_with("kvm-"));
            modes.sort();
            if !modes.is_empty() && modes.iter().all(|(_, mode)| mode == "2") {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        modes
    };
    let modes: Vec<String> = modes_while_spinning(&[], Duration::from_secs(10))
        .into_iter()
        .map(|(_, mode)| mode)
        .collect();
    assert_eq!(modes, ["2"]);
    // With a policy the fetcher thread runs beside the job, under its own filter.
    let modes = modes_while_spinning(
        &["--egress-policy".as_ref(), policy.as_os_str()],
        Duration::from_secs(10),
    );
    assert_eq!(modes.len(), 2, "{modes:?}");
    assert!(modes.iter().all(|(_, mode)| mode == "2"), "{modes:?}");
    assert!(
        modes.iter().any(|(name, _)| name == "isolate-fetch"),
        "{modes:?}"
    );
    // Long enough for the filter to have gone on, had it been asked for.
    let modes: Vec<String> =
        modes_while_spinning(&["--no-seccomp".as_ref()], Duration::from_secs(1))
            .into_iter()
            .map(|(_, mode)| mode)
            .collect();
    assert_eq!(modes, ["0"]);
}

/// A module whose functions each fetch one request (text at its own offset) and log the
/// response; they return what `agentvm.fetch` returned.
fn fetch_module(requests: &[(&str, String)]) -> String {
    let with_cap: Vec<(&str, String, u32)> = requests
        .iter()
        .map(|(name, request)| (*name, request.clone(), 4096))
        .collect();
    fetch_module_with_caps(&with_cap)
}

/// [`fetch_module`] with each function's response buffer size: it logs the part of the
/// response that fit.
fn fetch_module_with_caps(requests: &[(&str, String, u32)]) -> String {
    let mut data = String::new();
    let mut funcs = String::new();
    for (i, (name, request, cap)) in requests.iter().enumerate() {
        let offset = i * 1024;
        let escaped = request.replace("\r\n", "\\0d\\0a");
        data.push_str(&format!("(data (i32.const {offset}) \"{escaped}\")\n"));
        funcs.push_str(&format!(
            r#"(func (export "{name}") (result i32) (local $n i32)
                 (local.set $n (call $fetch (i32.const {offset}) (i32.const {len})
                                            (i32.const 8192) (i32.const {cap})))
                 (if (i32.gt_s (local.get $n) (i32.const 0))
                   (then (call $log (i32.const 8192)
                     (select (local.get $n) (i32.const {cap})
                             (i32.lt_s (local.get $n) (i32.const {cap}))))))
                 (local.get $n))
            "#,
            len = request.len()
        ));
    }
    format!(
        r#"(module
             (import "agentvm" "fetch" (func $fetch (param i32 i32 i32 i32) (result i32)))
             (import "agentvm" "log" (func $log (param i32 i32)))
             (memory (export "memory") 1)
             {data}
             {funcs})"#
    )
}

/// The fetch host call without a network: the host's fetch function sees the request the
/// module wrote as text, and the module reads the answer back as text, cut to its buffer;
/// failures give their codes and reasons.
#[test]
fn the_fetch_host_call_carries_requests_and_responses_as_text() {
    use vmm::isolate::{FetchError, FetchRequest, FetchResponse};
    if !require_kvm() {
        return;
    }
    let module = wat::parse_str(fetch_module_with_caps(&[
        (
            "full",
            "PUT https://x.test/p?q HTTP/1.1\r\nA:  spaced \r\nB:2\r\n\r\nthe body".into(),
            4096,
        ),
        ("short", "GET http://x.test/short".into(), 3),
        ("big", "GET http://x.test/big".into(), 4096),
        ("denied", "GET http://x.test/denied".into(), 4096),
        ("bad_text", "GET\r\n".into(), 4096),
        ("bad_header", "GET http://x.test/\r\nno colon".into(), 4096),
    ]))
    .unwrap();
    let mut seen: Vec<FetchRequest> = Vec::new();
    let mut fetch = |request: &FetchRequest, deadline: Instant| {
        assert!(deadline > Instant::now(), "the deadline is the job's");
        seen.push(request.clone());
        match request.url.as_str() {
            "http://x.test/big" => Ok(FetchResponse {
                status: 200,
                headers: Vec::new(),
                body: vec![b'x'; 1 << 20],
            }),
            "http://x.test/denied" => Err(FetchError::Denied("no rule allows x.test:80".into())),
            _ => Ok(FetchResponse {
                status: 201,
                headers: vec![("X".into(), "y".into())],
                body: b"abc".to_vec(),
            }),
        }
    };
    let mut run = |function: &str| {
        let mut kv = KvStore::new(0);
        let mut logs = Vec::new();
        let mut log = |l: &str| logs.push(l.to_string());
        let spec = JobSpec {
            module: module.clone(),
            function: function.into(),
            args: Vec::new(),
            cpu_limit: Duration::from_secs(5),
            wall_limit: Duration::from_secs(20),
        };
        let mut isolate = Isolate::boot(IsolateConfig::default()).expect("isolate boots");
        let result = isolate.run(
            &spec,
            &mut HostContext {
                kv: &mut kv,
                log: &mut log,
                fetch: Some(&mut fetch),
            },
        );
        (result.unwrap(), logs)
    };
    let response = "201\r\nX: y\r\n\r\nabc";
    let (result, logs) = run("full");
    assert_eq!(result, vec![Value::I32(response.len() as i32)]);
    assert_eq!(logs, vec![response.to_string()]);
    let (result, logs) = run("short");
    assert_eq!(
        result,
        vec![Value::I32(response.len() as i32)],
        "the full length, though only 3 bytes fit"
    );
    assert_eq!(logs, vec!["201".to_string()]);
    let (result, logs) = run("big");
    assert_eq!(result, vec![Value::I32(-4)]);
    assert!(
        logs[0].starts_with("fetch failed: response too large"),
        "{logs:?}"
    );
    let (result, logs) = run("denied");
    assert_eq!(result, vec![Value::I32(-1)]);
    assert_eq!(
        logs,
        vec!["fetch failed: denied by the egress policy: no rule allows x.test:80".to_string()]
    );
    let (result, logs) = run("bad_text");
    assert_eq!(result, vec![Value::I32(-2)]);
    assert!(logs[0].contains("no URL"), "{logs:?}");
    let (result, logs) = run("bad_header");
    assert_eq!(result, vec![Value::I32(-2)]);
    assert!(logs[0].contains("without ':'"), "{logs:?}");
    assert_eq!(seen.len(), 4, "bad text never reaches the host: {seen:?}");
    assert_eq!(
        seen[0],
        FetchRequest {
            method: "PUT".into(),
            url: "https://x.test/p?q".into(),
            headers: vec![("A".into(), "spaced".into()), ("B".into(), "2".into())],
            body: b"the body".to_vec(),
        }
    );
    assert_eq!(seen[1].headers, Vec::new());
    assert_eq!(seen[1].body, Vec::<u8>::new());
}

/// `agentvm isolate run --egress-policy`: a fetch from a local server through a domain rule
/// (loopback opened by a CIDR rule) with a credential from the environment; denials named in
/// the log; no policy, no fetch. The job and the fetcher run under their seccomp filters.
#[test]
fn the_cli_fetches_through_the_egress_policy() {
    if !require_kvm() {
        return;
    }
    const SECRET: &str = "isolate-fetch-secret-5b1e";
    let (port, seen) = integration_tests::upstream::hello_upstream();
    // Connections to it complete (the kernel's backlog) but are never answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("fetch.wat");
    std::fs::write(
        &module,
        fetch_module(&[
            (
                "allowed",
                format!(
                    "POST http://localhost:{port}/items?q=1 HTTP/1.1\r\nAuthorization: Bearer mine\r\nX-Test: 1\r\n\r\nbody!"
                ),
            ),
            ("no_rule", "GET http://example.org/".to_string()),
            ("metadata", "GET http://169.254.169.254/latest/".to_string()),
            ("bad", "GET ftp://localhost/".to_string()),
            ("silent", format!("GET http://localhost:{silent_port}/")),
        ]),
    )
    .unwrap();
    let policy = dir.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"version": 1, "rules": [
             {"id": "loopback", "cidr": "127.0.0.1/32", "ports": [1]},
             {"id": "local-api", "domain": "localhost",
              "inject_headers": [{"name": "Authorization", "prefix": "Bearer ",
                                  "from_env": "ISOLATE_FETCH_TOKEN"}]}]}"#,
    )
    .unwrap();
    let audit = dir.path().join("audit.jsonl");
    let run_with = |function: &str, with_policy: bool, extra: &[&str]| {
        let mut command = std::process::Command::new(integration_tests::agentvm::agentvm_bin());
        command
            .args(["isolate", "run"])
            .arg(&module)
            .args(["--invoke", function])
            .args(extra)
            .env("ISOLATE_FETCH_TOKEN", SECRET);
        if with_policy {
            command
                .arg("--egress-policy")
                .arg(&policy)
                .arg("--egress-audit")
                .arg(&audit);
        }
        let out = command.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !stdout.contains(SECRET) && !stderr.contains(SECRET),
            "{function}: the secret was printed"
        );
        (out.status.code(), stdout, stderr)
    };
    let run = |function: &str, with_policy: bool| {
        let (code, stdout, stderr) = run_with(function, with_policy, &[]);
        assert_eq!(code, Some(0), "{function}: {stderr}");
        (stdout, stderr)
    };

    let (stdout, stderr) = run("allowed", true);
    let response = integration_tests::upstream::HELLO_AS_FETCHED;
    assert_eq!(stdout, format!("{}\n", response.len()), "{stderr}");
    assert!(stderr.contains(&format!("isolate: {response}")), "{stderr}");
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let request = &requests[0];
    assert!(
        request.starts_with("POST /items?q=1 HTTP/1.1\r\n"),
        "{request}"
    );
    assert!(
        request.contains(&format!("Host: localhost:{port}\r\n")),
        "{request}"
    );
    assert!(request.contains("Content-Length: 5\r\n"), "{request}");
    assert!(request.contains("X-Test: 1\r\n"), "{request}");
    assert!(
        request.contains(&format!("Authorization: Bearer {SECRET}\r\n"))
            && !request.contains("mine"),
        "the rule's credential replaces the module's: {request}"
    );
    let audit_text = std::fs::read_to_string(&audit).unwrap();
    assert!(!audit_text.contains(SECRET));
    let line: serde_json::Value = serde_json::from_str(audit_text.lines().next().unwrap()).unwrap();
    assert_eq!(line["kind"], "fetch");
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["rule"], "local-api");
    assert_eq!(line["path"], "/items?q=1");

    let (stdout, stderr) = run("no_rule", true);
    assert_eq!(stdout, "-1\n");
    assert!(
        stderr.contains("fetch failed: denied by the egress policy: no rule allows example.org:80"),
        "{stderr}"
    );
    let (stdout, stderr) = run("metadata", true);
    assert_eq!(stdout, "-1\n");
    assert!(
        stderr.contains("169.254.169.254 is always denied (metadata)"),
        "{stderr}"
    );
    let (stdout, stderr) = run("bad", true);
    assert_eq!(stdout, "-2\n");
    assert!(stderr.contains("only http and https"), "{stderr}");
    let (stdout, stderr) = run("allowed", false);
    assert_eq!(stdout, "-1\n");
    assert!(
        stderr.contains("fetch needs an egress policy (--egress-policy)"),
        "{stderr}"
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "nothing reached the server without a policy"
    );
    // A fetch waiting on a silent server ends with the job's wall-clock limit.
    let (code, _, stderr) = run_with("silent", true, &["--wall-limit-ms", "300"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("wall-clock limit exceeded"), "{stderr}");
    drop(silent);
    assert_eq!(std::fs::read_to_string(&audit).unwrap().lines().count(), 5);
}
