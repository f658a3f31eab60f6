//! `agentvm bench isolate`: the isolate tier on this machine's KVM (its guest runs at CPL 3,
//! native speed here as on any VMX/SVM host), beside the same module run by wasmi directly in this
//! process (the no-VM lower bound).
//!
//! Every job compiles its module anew (as an isolate does: it receives the module with the job),
//! so the host peer does the same: a new engine, compile, instantiate, call.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use vmm::isolate::{HostContext, Isolate, IsolateConfig, JobSpec, KvStore, Pool};

use super::isolate_density::{self, Density};
use super::machine::MachineInfo;
use super::output::{num, Figure, Unit};

/// The benchmark's module: a small loop, so that the call does measurable work without hiding
/// the start-up in it.
const MODULE_WAT: &str = r#"(module
  (func (export "sum") (param $n i32) (result i32) (local $i i32) (local $acc i32)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (local.set $acc (i32.add (local.get $acc) (local.get $i)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (local.get $acc)))"#;
const ARG: &str = "1000";
const EXPECTED: i32 = 499_500;

#[derive(Args)]
pub struct IsolateArgs {
    /// Samples per latency figure.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(10..=1_000_000))]
    runs: u32,
    /// Isolates kept alive at once for the memory and density figures.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(10..=100_000))]
    concurrent: u32,
    /// Print the JSON document instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON document to FILE.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct IsolateDocument {
    pub benchmark: &'static str,
    pub agentvm_version: &'static str,
    pub runs: u32,
    pub machine: MachineInfo,
    pub module: &'static str,
    pub figures: Vec<Figure>,
    /// Isolates created and held at once, and what they cost.
    pub density: Density,
    pub notes: Vec<String>,
}

pub(super) fn job() -> Result<JobSpec, String> {
    Ok(JobSpec {
        module: wat::parse_str(MODULE_WAT).map_err(|e| format!("benchmark module: {e}"))?,
        function: "sum".into(),
        args: vec![ARG.into()],
        cpu_limit: Duration::from_secs(10),
        wall_limit: Duration::from_secs(30),
    })
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub(super) fn check(
    values: Result<Vec<vmm::isolate::Value>, vmm::isolate::IsolateError>,
) -> Result<(), String> {
    match values.map_err(|e| e.to_string())?.as_slice() {
        [vmm::isolate::Value::I32(EXPECTED)] => Ok(()),
        other => Err(format!(
            "the benchmark module returned {other:?}, not {EXPECTED}"
        )),
    }
}

/// The peer: the same job with wasmi in this process.
fn host_wasmi(module: &[u8]) -> Result<(), String> {
    let engine = wasmi::Engine::default();
    let module = wasmi::Module::new(&engine, module).map_err(|e| e.to_string())?;
    let mut store = wasmi::Store::new(&engine, ());
    let linker = wasmi::Linker::<()>::new(&engine);
    let instance = linker
        .instantiate_and_start(&mut store, &module)
        .map_err(|e| e.to_string())?;
    let sum = instance
        .get_typed_func::<i32, i32>(&store, "sum")
        .map_err(|e| e.to_string())?;
    let got = sum.call(&mut store, 1000).map_err(|e| e.to_string())?;
    if got != EXPECTED {
        return Err(format!("host wasmi returned {got}"));
    }
    Ok(())
}

/// This process's privately written memory (the isolates' copy-on-write pages, the VMM's heap).
/// Not RSS: every isolate maps the template's pages it reads, and RSS counts a page once per
/// mapping although they are one page in memory.
pub(super) fn private_dirty_kib() -> f64 {
    vmm::process_stats::smaps_rollup_kib(None, "Private_Dirty").map_or(f64::NAN, |k| k as f64)
}

pub(super) fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Makes room for `wanted` descriptors (each isolate holds a VM and a vCPU fd): raises the
/// limit, the hard one too where allowed (CAP_SYS_RESOURCE), else the soft one to the hard one.
pub(super) fn raise_fd_limit(wanted: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid resource and pointers to locals.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= wanted {
            return;
        }
        let both = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: wanted.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &both) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

pub fn isolate(args: IsolateArgs) -> Result<ExitCode, String> {
    if let Some(out) = &args.out {
        super::check_writable(out)?;
    }
    let spec = job()?;
    let runs = args.runs as usize;
    let mut kv = KvStore::new(0);
    let mut log = |_: &str| {};
    let mut ctx = HostContext {
        kv: &mut kv,
        log: &mut log,
        fetch: None,
    };
    let progress = |what: &str| {
        if !args.json {
            eprintln!("bench isolate: {what}");
        }
    };

    progress("booting the template and a pool of 2");
    let pool = Pool::new(IsolateConfig::default(), 2, 2).map_err(|e| e.to_string())?;
    // Warm-up, not counted: page cache, lazily initialised state on both sides.
    for _ in 0..10 {
        check(pool.run(&spec, &mut ctx))?;
        host_wasmi(&spec.module)?;
    }

    progress(&format!(
        "{runs} calls through the pool, from scratch, and in host wasmi"
    ));
    let mut pooled = Vec::with_capacity(runs);
    let mut pooled_with_reset = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        let mut iso = pool.take().map_err(|e| e.to_string())?;
        let result = iso.run(&spec, &mut ctx);
        let t1 = Instant::now();
        pool.give_back(iso);
        pooled.push(us(t1 - t0));
        pooled_with_reset.push(us(t0.elapsed()));
        check(result)?;
    }
    let scratch_runs = runs.min(200);
    let mut scratch = Vec::with_capacity(scratch_runs);
    for _ in 0..scratch_runs {
        let t0 = Instant::now();
        let mut iso = Isolate::boot(IsolateConfig::default()).map_err(|e| e.to_string())?;
        let result = iso.run(&spec, &mut ctx);
        scratch.push(us(t0.elapsed()));
        check(result)?;
        drop(iso);
    }
    let mut host = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        host_wasmi(&spec.module)?;
        host.push(us(t0.elapsed()));
    }

    progress("calls per second on one core, for one second each");
    let per_second = |f: &mut dyn FnMut() -> Result<(), String>| -> Result<f64, String> {
        let t0 = Instant::now();
        let mut n = 0u32;
        while t0.elapsed() < Duration::from_secs(1) {
            f()?;
            n += 1;
        }
        Ok(f64::from(n) / t0.elapsed().as_secs_f64())
    };
    let pool_rate = per_second(&mut || check(pool.run(&spec, &mut ctx)))?;
    let host_rate = per_second(&mut || host_wasmi(&spec.module))?;

    let density = isolate_density::measure(args.concurrent, &progress)?;

    let doc = IsolateDocument {
        benchmark: "agentvm bench isolate",
        agentvm_version: env!("CARGO_PKG_VERSION"),
        runs: args.runs,
        machine: MachineInfo::read(),
        module: MODULE_WAT,
        figures: vec![
            Figure::new(
                "pool_call",
                "create (from the pool) + first call; peer: wasmi in-process (new engine, compile, call)",
                Unit::Us,
                &pooled,
            )
            .with_peer(&host),
            Figure::new(
                "pool_call_and_reset",
                "the same plus giving it back (reset: written pages dropped, registers reloaded)",
                Unit::Us,
                &pooled_with_reset,
            ),
            Figure::new(
                "scratch_call",
                "create from scratch (VM, RAM, image, guest init) + first call",
                Unit::Us,
                &scratch,
            ),
            Figure::new("calls_per_second", "calls per second, one core", Unit::PerS, &[pool_rate])
                .with_peer(&[host_rate]),
        ],
        density,
        notes: vec![
            "the isolate's guest runs at CPL 3: native speed on this machine and on VMX/SVM hosts \
             alike, so these figures transfer; only one `iretq` per boot runs in ring 0"
                .into(),
            "memory per isolate = growth of each worker's Private_Dirty (smaps_rollup): the \
             pages each isolate wrote (copy-on-write from its worker's template, counted once \
             per worker) and the VMM's bookkeeping; plus kernel memory = host-wide growth of \
             SUnreclaim + PageTables + SecPageTables while all were alive (KVM's per-VM and \
             per-vCPU structures; other activity on the machine adds noise)"
                .into(),
            "each isolate holds 2 descriptors (VM, vCPU), so a worker process holds at most half \
             its hard RLIMIT_NOFILE; larger counts are spread over several workers, as a sandbox \
             host spreads isolates over its isolate workers"
                .into(),
            format!("scratch figures: {scratch_runs} samples (each creates and destroys a VM)"),
        ],
    };
    let json = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    if let Some(out) = &args.out {
        std::fs::write(out, &json).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        print!("{}", to_table(&doc));
    }
    Ok(ExitCode::SUCCESS)
}

fn to_table(doc: &IsolateDocument) -> String {
    let mut t = String::new();
    let m = &doc.machine;
    let _ = writeln!(
        t,
        "{}: median / p99 (nearest rank), min-max, n",
        doc.benchmark
    );
    let _ = writeln!(t, "{}", m.describe());
    let _ = writeln!(
        t,
        "\n{:<74} {:>24} {:>24}",
        "", "agentvm isolate", "host wasmi (no VM)"
    );
    for f in &doc.figures {
        let cell = |s: &Option<super::stats::Summary>| match s {
            Some(s) if s.n == 1 => format!("{} {}", num(s.median, f.unit), f.unit.label()),
            Some(s) => format!(
                "{} / {} {}",
                num(s.median, f.unit),
                num(s.p99, f.unit),
                f.unit.label()
            ),
            None => "-".into(),
        };
        let _ = writeln!(
            t,
            "{:<74} {:>24} {:>24}",
            f.label,
            cell(&f.agentvm),
            cell(&f.peer)
        );
    }
    let d = &doc.density;
    let _ = writeln!(
        t,
        "\ndensity: {} isolates alive at once in {} worker process(es), created and each ran a \
         job in {:.2} s ({:.0} µs per isolate, worker start included); per isolate {:.0} KiB private memory + {:.0} KiB kernel \
         memory ({:.0} MiB of guest RAM mapped, shared until written), {:.1} fds; ~{:.0} fit in \
         4 GiB by that measure",
        d.isolates,
        d.processes,
        d.create_seconds,
        d.create_seconds * 1e6 / f64::from(d.isolates),
        d.private_per_isolate_kib,
        d.kernel_per_isolate_kib,
        d.guest_ram_mib,
        d.fds_per_isolate,
        d.fit_in_4_gib
    );
    for n in &doc.notes {
        let _ = writeln!(t, "note: {n}");
    }
    t
}
