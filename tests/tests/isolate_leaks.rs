//! 1,000 isolate jobs in a row leak nothing. Alone in its test binary: it counts this process's
//! descriptors and RSS, which concurrent tests would disturb.

use std::time::Duration;

use integration_tests::agentvm::require_kvm;
use vmm::isolate::{HostContext, IsolateConfig, JobSpec, KvStore, Pool, Value};

const ADD: &str = r#"(module (func (export "add") (param i32 i32) (result i32)
    local.get 0 local.get 1 i32.add))"#;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// 1,000 jobs one after another through a pool leave no descriptors and no memory behind.
#[test]
fn a_thousand_jobs_in_a_row_leak_nothing() {
    if !require_kvm() {
        return;
    }
    let pool = Pool::new(IsolateConfig::default(), 2, 2).unwrap();
    let spec = JobSpec {
        module: wat::parse_str(ADD).unwrap(),
        function: "add".into(),
        args: vec!["20".into(), "22".into()],
        cpu_limit: Duration::from_secs(5),
        wall_limit: Duration::from_secs(20),
    };
    let mut kv = KvStore::new(0);
    let mut log = |_: &str| {};
    let mut ctx = HostContext {
        kv: &mut kv,
        log: &mut log,
        fetch: None,
    };
    // Warm up (allocator caches, lazily created state), then measure.
    for _ in 0..50 {
        pool.run(&spec, &mut ctx).unwrap();
    }
    let (fds, rss) = (open_fds(), rss_kib());
    for _ in 0..1000 {
        assert_eq!(pool.run(&spec, &mut ctx).unwrap(), vec![Value::I32(42)]);
    }
    assert_eq!(open_fds(), fds, "file descriptors leaked");
    let grown = rss_kib().saturating_sub(rss);
    assert!(grown < 16 << 10, "RSS grew by {grown} KiB over 1,000 jobs");
}
