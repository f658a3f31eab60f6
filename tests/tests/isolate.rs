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
        },
    );
    (result, logs, kv)
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
