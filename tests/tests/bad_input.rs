//! The bad-input catalogue: for each entry point of the `agentvm` CLI that reads user input (flags,
//! kernel and initrd files, the serve config file, egress policy files, snapshot files, wasm
//! modules), malformed inputs and the exact clear error each must give. Every row runs `agentvm`
//! with its inputs in a fresh temporary directory and asserts:
//! - the exit status is the CLI's documented code (2 = usage error from clap, 125 = agentvm could
//!   not do what was asked, 1 = `isolate run` refused the job), never 101 (a Rust panic) nor a
//!   signal;
//! - stderr holds the row's message and no panic;
//! - nothing was left behind: no process whose command line names the temp directory, and no file
//!   in it beyond the row's inputs.
//!
//! Rows run on this machine only (the probe guest and the isolate tier, no nested test host). Rows
//! that reach `/dev/kvm` are gated by `require_kvm`. See docs/reliability.md.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::agentvm::{agentvm_bin, require_kvm, VmProcess};
use integration_tests::probe::probe_elf;

/// Every child is killed after this long: a hang is a failed row, not a stuck suite.
const ROW_TIMEOUT: Duration = Duration::from_secs(30);

/// clap's exit status for a command line it cannot parse.
const USAGE: i32 = 2;
/// agentvm's own failure status (`vmm::cli::EXIT_AGENTVM_FAILURE`).
const FAILURE: i32 = 125;
/// `isolate run`: the module or its arguments were refused.
const JOB_REFUSED: i32 = 1;

/// An input the row writes into its temporary directory before running.
enum Input {
    File(Vec<u8>),
    Dir,
}

struct Row {
    name: &'static str,
    /// Files and directories, by name inside the row's temporary directory.
    inputs: Vec<(&'static str, Input)>,
    /// Arguments; `{dir}` is replaced by the row's temporary directory.
    args: Vec<String>,
    code: i32,
    stderr: String,
    /// The row gets as far as opening `/dev/kvm` (or might, on a host without it).
    kvm: bool,
}

fn row(name: &'static str, args: &[&str], code: i32, stderr: &str) -> Row {
    Row {
        name,
        inputs: Vec::new(),
        args: args.iter().map(|a| a.to_string()).collect(),
        code,
        stderr: stderr.to_string(),
        kvm: false,
    }
}

impl Row {
    fn file(mut self, name: &'static str, contents: impl Into<Vec<u8>>) -> Self {
        self.inputs.push((name, Input::File(contents.into())));
        self
    }

    fn dir(mut self, name: &'static str) -> Self {
        self.inputs.push((name, Input::Dir));
        self
    }

    fn kvm(mut self) -> Self {
        self.kvm = true;
        self
    }
}

/// `base` followed by `extra`: a row's arguments built from a shared prefix.
fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    base.iter().chain(extra).copied().collect()
}

fn cli_flag_rows(probe: &str) -> Vec<Row> {
    let boot = |extra: &[&'static str]| with(&["boot", "--kernel", probe], extra);
    vec![
        row("no subcommand", &[], USAGE, "Usage: agentvm"),
        row(
            "unknown subcommand",
            &["reboot"],
            USAGE,
            "unrecognized subcommand 'reboot'",
        ),
        row(
            "boot: unknown flag",
            &boot(&["--bogus"]),
            USAGE,
            "unexpected argument '--bogus'",
        ),
        row(
            "boot: --kernel missing",
            &["boot"],
            USAGE,
            "the following required arguments were not provided",
        ),
        row(
            "boot: --kernel without a value",
            &["boot", "--kernel"],
            USAGE,
            "a value is required for '--kernel <KERNEL>'",
        ),
        row(
            "boot: --vcpus not a number",
            &boot(&["--vcpus", "abc"]),
            USAGE,
            "invalid value 'abc' for '--vcpus <VCPUS>'",
        ),
        row(
            "boot: --vcpus 0",
            &boot(&["--vcpus", "0"]),
            FAILURE,
            "--vcpus must be between 1 and 16, got 0",
        ),
        row(
            "boot: --vcpus 999",
            &boot(&["--vcpus", "999"]),
            FAILURE,
            "--vcpus must be between 1 and 16",
        ),
        row(
            "boot: --mem-mib 0",
            &boot(&["--mem-mib", "0"]),
            FAILURE,
            "--mem-mib must be at least 16 MiB, got 0",
        ),
        row(
            "boot: --mem-mib beyond u64",
            &boot(&["--mem-mib", "99999999999999999999"]),
            USAGE,
            "invalid value '99999999999999999999' for '--mem-mib <MEM_MIB>'",
        ),
        row(
            "boot: --mem-mib more than the host has",
            &boot(&["--mem-mib", "100000000"]),
            FAILURE,
            "more than this host's",
        ),
        row(
            "boot: --timeout negative",
            &boot(&["--timeout", "-5"]),
            USAGE,
            "unexpected argument '-5' found",
        ),
        row(
            "boot: --timeout not a number",
            &boot(&["--timeout", "abc"]),
            USAGE,
            "invalid value 'abc' for '--timeout <TIMEOUT>'",
        ),
        row(
            "boot: --vsock-cid without --vsock-uds",
            &boot(&["--vsock-cid", "7"]),
            USAGE,
            "--vsock-uds <PATH>",
        ),
        row(
            "boot: --vsock-cid 2 (the host's)",
            &boot(&["--vsock-uds", "{dir}/v.sock", "--vsock-cid", "2"]),
            FAILURE,
            "vsock guest CID 2 is reserved (must be 3..=4294967294)",
        ),
        row(
            "boot: --vsock-cid 0",
            &boot(&["--vsock-uds", "{dir}/v.sock", "--vsock-cid", "0"]),
            FAILURE,
            "vsock guest CID 0 is reserved",
        ),
        row(
            "boot: --console is a directory",
            &boot(&["--console", "{dir}/console"]),
            FAILURE,
            "cannot create console file {dir}/console: Is a directory",
        )
        .dir("console"),
        row(
            "boot: --log-format unknown",
            &["--log-format", "xml", "boot", "--kernel", probe],
            USAGE,
            "invalid value 'xml' for '--log-format <LOG_FORMAT>'",
        ),
        row(
            "run: unknown flag",
            &["run", "--bogus", "--", "true"],
            USAGE,
            "unexpected argument '--bogus'",
        ),
        row(
            "run: --vcpus 0",
            &["run", "--vcpus", "0", "--", "true"],
            FAILURE,
            "--vcpus must be between 1 and 16, got 0",
        ),
        row(
            "run: --mem-mib 0",
            &["run", "--mem-mib", "0", "--", "true"],
            FAILURE,
            "--mem-mib must be at least 16 MiB, got 0",
        ),
        row(
            "isolate run: module missing",
            &["isolate", "run"],
            USAGE,
            "<MODULE>",
        ),
        row(
            "isolate run: --cpu-limit-ms not a number",
            &["isolate", "run", "{dir}/m.wat", "--cpu-limit-ms", "abc"],
            USAGE,
            "invalid value 'abc' for '--cpu-limit-ms <MS>'",
        )
        .file("m.wat", OK_WAT),
        row(
            "isolate run: --cpu-limit-ms 0",
            &["isolate", "run", "{dir}/m.wat", "--cpu-limit-ms", "0"],
            FAILURE,
            "--cpu-limit-ms and --wall-limit-ms must be at least 1",
        )
        .file("m.wat", OK_WAT),
        row(
            "isolate run: --wall-limit-ms 0",
            &["isolate", "run", "{dir}/m.wat", "--wall-limit-ms", "0"],
            FAILURE,
            "--cpu-limit-ms and --wall-limit-ms must be at least 1",
        )
        .file("m.wat", OK_WAT),
        row(
            "isolate run: --max-memory-mib 0",
            &["isolate", "run", "{dir}/m.wat", "--max-memory-mib", "0"],
            FAILURE,
            "--max-memory-mib must be",
        )
        .file("m.wat", OK_WAT),
        row(
            "isolate run: --max-memory-mib beyond 4096",
            &[
                "isolate",
                "run",
                "{dir}/m.wat",
                "--max-memory-mib",
                "999999",
            ],
            FAILURE,
            "--max-memory-mib must be 1..=4096, got 999999",
        )
        .file("m.wat", OK_WAT),
        row(
            "isolate run: --egress-audit without --egress-policy",
            &[
                "isolate",
                "run",
                "{dir}/m.wat",
                "--egress-audit",
                "{dir}/audit.jsonl",
            ],
            USAGE,
            "--egress-policy <FILE>",
        )
        .file("m.wat", OK_WAT),
        row(
            "snapshot: unknown subcommand",
            &["snapshot", "restore"],
            USAGE,
            "unrecognized subcommand 'restore'",
        ),
        row(
            "snapshot load: --api-sock missing",
            &["snapshot", "load", "--snapshot", "s", "--mem", "m"],
            USAGE,
            "--api-sock <PATH>",
        ),
        row(
            "snapshot load: no VMM on --api-sock",
            &[
                "snapshot",
                "load",
                "--api-sock",
                "{dir}/api.sock",
                "--snapshot",
                "{dir}/s",
                "--mem",
                "{dir}/m",
            ],
            FAILURE,
            "cannot connect to the VMM's API socket {dir}/api.sock",
        ),
        row(
            "snapshot create: --api-sock missing",
            &["snapshot", "create"],
            USAGE,
            "--api-sock <PATH>",
        ),
        row(
            "snapshot merge: a required file flag missing",
            &["snapshot", "merge", "--base-snapshot", "{dir}/b"],
            USAGE,
            "the following required arguments were not provided",
        ),
        row(
            "serve: neither --api-sock nor --config-file",
            &["serve", "--no-api"],
            USAGE,
            "Usage: agentvm serve",
        ),
    ]
}

fn kernel_file_rows(probe: &str, probe_bytes: &[u8]) -> Vec<Row> {
    let boot_kernel = ["boot", "--kernel", "{dir}/kernel"];
    let boot_initrd = ["boot", "--kernel", probe, "--initrd", "{dir}/initrd"];
    vec![
        row(
            "kernel: missing",
            &boot_kernel,
            FAILURE,
            "kernel {dir}/kernel does not exist",
        ),
        row(
            "kernel: a directory",
            &boot_kernel,
            FAILURE,
            "kernel {dir}/kernel is not a regular file",
        )
        .dir("kernel"),
        row(
            "kernel: empty file",
            &boot_kernel,
            FAILURE,
            "{dir}/kernel is not a kernel: neither an x86-64 ELF executable nor a bzImage",
        )
        .file("kernel", Vec::new())
        .kvm(),
        row(
            "kernel: random bytes",
            &boot_kernel,
            FAILURE,
            "{dir}/kernel is not a kernel: neither an x86-64 ELF executable nor a bzImage",
        )
        .file("kernel", pseudo_random(4096))
        .kvm(),
        row(
            "kernel: a shell script",
            &boot_kernel,
            FAILURE,
            "is not a kernel",
        )
        .file("kernel", "#!/bin/sh\necho hi\n")
        .kvm(),
        row(
            "kernel: ELF cut inside its program headers",
            &boot_kernel,
            FAILURE,
            "cannot read kernel {dir}/kernel",
        )
        .file("kernel", probe_bytes[..200].to_vec())
        .kvm(),
        row(
            "kernel: ELF cut inside its first segment",
            &boot_kernel,
            FAILURE,
            "kernel {dir}/kernel: segment 0 claims bytes beyond the end of the file",
        )
        .file("kernel", probe_bytes[..3000].to_vec())
        .kvm(),
        row(
            "kernel: ELF with a 32-bit class byte",
            &boot_kernel,
            FAILURE,
            "{dir}/kernel is not a kernel",
        )
        .file("kernel", {
            let mut elf = probe_bytes.to_vec();
            elf[4] = 1; // EI_CLASS: ELFCLASS32
            elf
        })
        .kvm(),
        row(
            "initrd: missing",
            &boot_initrd,
            FAILURE,
            "initrd {dir}/initrd does not exist",
        ),
        row(
            "initrd: a directory",
            &boot_initrd,
            FAILURE,
            "initrd {dir}/initrd is not a regular file",
        )
        .dir("initrd"),
        row(
            "initrd: empty file",
            &boot_initrd,
            FAILURE,
            "initrd {dir}/initrd is empty",
        )
        .file("initrd", Vec::new()),
    ]
}

fn config_file_rows(probe: &str) -> Vec<Row> {
    let serve = ["serve", "--no-api", "--config-file", "{dir}/vm.json"];
    let config = |name: &'static str, json: String, message: &str| {
        row(name, &serve, FAILURE, message).file("vm.json", json)
    };
    let boot_source = format!(r#""boot-source": {{"kernel_image_path": "{probe}"}}"#);
    vec![
        row(
            "config: missing file",
            &serve,
            FAILURE,
            "config file {dir}/vm.json: No such file or directory",
        ),
        config(
            "config: not JSON",
            "not json".into(),
            "config file {dir}/vm.json: not a JSON object",
        ),
        config(
            "config: a JSON array",
            "[1, 2]".into(),
            "not a JSON object: invalid type: sequence, expected a map",
        ),
        config(
            "config: empty object",
            "{}".into(),
            r#"the "boot-source" section is required"#,
        ),
        config(
            "config: no boot-source",
            r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}"#.into(),
            r#"the "boot-source" section is required"#,
        ),
        config(
            "config: unknown section",
            format!(r#"{{{boot_source}, "colour": 1}}"#),
            r#"unknown section "colour""#,
        ),
        config(
            "config: unknown field in boot-source",
            format!(r#"{{"boot-source": {{"kernel_image_path": "{probe}", "colour": 1}}}}"#),
            r#"section "boot-source": unknown field `colour`"#,
        ),
        config(
            "config: kernel path of the wrong type",
            r#"{"boot-source": {"kernel_image_path": 42}}"#.into(),
            r#"section "boot-source": invalid type: integer `42`"#,
        ),
        config(
            "config: kernel that does not exist",
            r#"{"boot-source": {"kernel_image_path": "/nonexistent/k"}}"#.into(),
            "kernel_image_path /nonexistent/k: no such file",
        ),
        config(
            "config: vcpu_count of the wrong type",
            format!(
                r#"{{{boot_source}, "machine-config": {{"vcpu_count": "two", "mem_size_mib": 64}}}}"#
            ),
            r#"section "machine-config": invalid type: string "two""#,
        ),
        config(
            "config: vcpu_count 0",
            format!(
                r#"{{{boot_source}, "machine-config": {{"vcpu_count": 0, "mem_size_mib": 64}}}}"#
            ),
            "vcpu_count must be between 1 and 16, got 0",
        ),
    ]
}

fn egress_policy_rows(probe: &str) -> Vec<Row> {
    let isolate = [
        "isolate",
        "run",
        "{dir}/m.wat",
        "--egress-policy",
        "{dir}/policy.json",
    ];
    let policy = |name: &'static str, json: &str, message: &str| {
        row(name, &isolate, FAILURE, message)
            .file("m.wat", OK_WAT)
            .file("policy.json", json)
            .kvm()
    };
    vec![
        row(
            "policy: missing file",
            &isolate,
            FAILURE,
            "cannot read egress policy {dir}/policy.json: No such file or directory",
        )
        .file("m.wat", OK_WAT)
        .kvm(),
        policy(
            "policy: not JSON",
            "nope",
            "egress policy is not valid JSON",
        ),
        policy(
            "policy: bad CIDR prefix",
            r#"{"version": 1, "rules": [{"id": "a", "cidr": "10.0.0.0/99"}]}"#,
            "rule 1 (`a`): `cidr` `10.0.0.0/99` is not an address or address/prefix",
        ),
        policy(
            "policy: CIDR not an address",
            r#"{"version": 1, "rules": [{"id": "a", "cidr": "banana"}]}"#,
            "`cidr` `banana` is not an address or address/prefix",
        ),
        policy(
            "policy: empty port range",
            r#"{"version": 1, "rules": [{"id": "a", "cidr": "10.0.0.0/8", "ports": ["90-80"]}]}"#,
            "port range `90-80` is empty (low > high)",
        ),
        policy(
            "policy: port beyond 65535",
            r#"{"version": 1, "rules": [{"id": "a", "cidr": "10.0.0.0/8", "ports": [70000]}]}"#,
            "egress policy is not valid JSON: data did not match any variant of untagged enum PortSpec",
        ),
        policy(
            "policy: unknown rule field",
            r#"{"version": 1, "rules": [{"id": "a", "cidr": "10.0.0.0/8", "colour": "red"}]}"#,
            "unknown field `colour`",
        ),
        policy(
            "policy: unknown top-level field",
            r#"{"version": 1, "rulez": []}"#,
            "unknown field `rulez`, expected `version` or `rules`",
        ),
        policy(
            "policy: from_env of an unset variable",
            r#"{"version": 1, "rules": [{"id": "a", "domain": "x.com",
                "inject_headers": [{"name": "A", "from_env": "AGENTVM_BAD_INPUT_UNSET"}]}]}"#,
            "rule 1 (`a`): environment variable AGENTVM_BAD_INPUT_UNSET is not set",
        ),
        policy(
            "policy: version 2",
            r#"{"version": 2, "rules": []}"#,
            "policy format version 2 is not supported (this agentvm reads version 1)",
        ),
        policy(
            "policy: both domain and cidr",
            r#"{"version": 1, "rules": [{"id": "a", "cidr": "10.0.0.0/8", "domain": "x.com"}]}"#,
            "give `domain` or `cidr`, not both",
        ),
        policy(
            "policy: neither domain nor cidr",
            r#"{"version": 1, "rules": [{"id": "a"}]}"#,
            "a rule needs a `domain` or a `cidr`",
        ),
        policy(
            "policy: duplicate rule id",
            r#"{"version": 1, "rules": [{"id": "a", "cidr": "10.0.0.0/8"},
                                        {"id": "a", "cidr": "10.0.0.0/8"}]}"#,
            "rule 2 (`a`): another rule has the same `id`",
        ),
        row(
            "policy: --egress-audit is a directory",
            &with(&isolate, &["--egress-audit", "{dir}/audit"]),
            FAILURE,
            "audit log {dir}/audit: Is a directory",
        )
        .file("m.wat", OK_WAT)
        .file("policy.json", r#"{"version": 1, "rules": []}"#)
        .dir("audit")
        .kvm(),
        row(
            "policy: --egress-upstream-ca holds no certificate",
            &with(&isolate, &["--egress-upstream-ca", "{dir}/ca.pem"]),
            FAILURE,
            "--egress-upstream-ca: cannot load root certificates from {dir}/ca.pem: the file holds no PEM certificate",
        )
        .file("m.wat", OK_WAT)
        .file("policy.json", r#"{"version": 1, "rules": []}"#)
        .file("ca.pem", "garbage\n")
        .kvm(),
        row(
            "policy: --egress-upstream-ca missing",
            &with(&isolate, &["--egress-upstream-ca", "{dir}/ca.pem"]),
            FAILURE,
            "cannot load root certificates from {dir}/ca.pem: I/O error: No such file or directory",
        )
        .file("m.wat", OK_WAT)
        .file("policy.json", r#"{"version": 1, "rules": []}"#)
        .kvm(),
        row(
            "policy: TOML that does not parse",
            &[
                "isolate",
                "run",
                "{dir}/m.wat",
                "--egress-policy",
                "{dir}/policy.toml",
            ],
            FAILURE,
            "egress policy is not valid TOML",
        )
        .file("m.wat", OK_WAT)
        .file("policy.toml", "version = = 1")
        .kvm(),
        row(
            "policy: on boot, not JSON",
            &[
                "boot",
                "--kernel",
                probe,
                "--egress-policy",
                "{dir}/policy.json",
            ],
            FAILURE,
            "egress policy is not valid JSON",
        )
        .file("policy.json", "nope")
        .kvm(),
    ]
}

/// Snapshot state files through `snapshot merge`, the CLI entry point that reads them without a
/// running VMM. Loading through the API (`PUT /snapshot/load`, which also checks the memory file's
/// size against the state) is covered by tests/tests/snapshot.rs
/// `corrupt_or_mismatched_snapshots_are_refused_and_nothing_runs`.
fn snapshot_file_rows() -> Vec<Row> {
    let merge = [
        "snapshot",
        "merge",
        "--base-snapshot",
        "{dir}/base.state",
        "--base-mem",
        "{dir}/base.mem",
        "--diff-snapshot",
        "{dir}/diff.state",
        "--diff-mem",
        "{dir}/diff.mem",
        "--out-snapshot",
        "{dir}/out.state",
        "--out-mem",
        "{dir}/out.mem",
    ];
    // A well-formed state file (header, length, checksum) whose payload is not a VM's state.
    let framed = snapshot::state_file::encode(&"not a vm state".to_string()).unwrap();
    let state = |name: &'static str, base: Vec<u8>, message: &str| {
        row(name, &merge, FAILURE, message)
            .file("base.state", base)
            .file("base.mem", vec![0u8; 4096])
            .file("diff.state", framed.clone())
            .file("diff.mem", vec![0u8; 4096])
    };
    let mut version = framed.clone();
    version[snapshot::state_file::VERSION_OFFSET] = 99;
    let mut flipped = framed.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x10;
    let mut trailing = framed.clone();
    trailing.extend_from_slice(b"extra");
    vec![
        row(
            "snapshot: state file missing",
            &merge,
            FAILURE,
            "snapshot merge: {dir}/base.state: No such file or directory",
        ),
        state(
            "snapshot: empty state file",
            Vec::new(),
            "{dir}/base.state: not an agentvm snapshot state file (bad magic)",
        ),
        state(
            "snapshot: random bytes",
            pseudo_random(4096),
            "{dir}/base.state: not an agentvm snapshot state file (bad magic)",
        ),
        state(
            "snapshot: wrong magic",
            {
                let mut other = framed.clone();
                other[..8].copy_from_slice(b"FCSNAP00");
                other
            },
            "{dir}/base.state: not an agentvm snapshot state file (bad magic)",
        ),
        state(
            "snapshot: cut inside the header",
            framed[..12].to_vec(),
            "{dir}/base.state: truncated state file",
        ),
        state(
            "snapshot: cut inside the payload",
            framed[..framed.len() - 2].to_vec(),
            "{dir}/base.state: truncated state file",
        ),
        state(
            "snapshot: unsupported format version",
            version,
            "format version 99 is not supported",
        ),
        state(
            "snapshot: one payload byte flipped",
            flipped,
            "{dir}/base.state: state file checksum mismatch (the file is corrupt)",
        ),
        state("snapshot: trailing bytes", trailing, "{dir}/base.state"),
        state(
            "snapshot: intact file that is not a VM's state",
            framed.clone(),
            "{dir}/base.state: cannot decode the snapshot state",
        ),
    ]
}

/// A module `isolate run` accepts (its `main` takes nothing and returns 7).
const OK_WAT: &str = r#"(module (func (export "main") (result i32) i32.const 7))"#;

fn wasm_module_rows() -> Vec<Row> {
    let isolate = |name: &'static str, extra: &[&str], code: i32, message: &str| {
        let mut args = vec!["isolate", "run", "{dir}/m.wat"];
        args.extend_from_slice(extra);
        row(name, &args, code, message).kvm()
    };
    let two_args = r#"(module (func (export "main") (param i32 i32) (result i32) local.get 0))"#;
    vec![
        isolate(
            "wasm: missing file",
            &[],
            FAILURE,
            "cannot read {dir}/m.wat: No such file or directory",
        ),
        isolate(
            "wasm: a directory",
            &[],
            FAILURE,
            "cannot read {dir}/m.wat: Is a directory",
        )
        .dir("m.wat"),
        isolate(
            "wasm: empty file",
            &[],
            FAILURE,
            "{dir}/m.wat is neither a WebAssembly binary nor valid text format",
        )
        .file("m.wat", Vec::new()),
        isolate(
            "wasm: random bytes",
            &[],
            FAILURE,
            "{dir}/m.wat is neither a WebAssembly binary nor valid text format",
        )
        .file("m.wat", pseudo_random(2000)),
        isolate(
            "wasm: unclosed text",
            &[],
            FAILURE,
            "{dir}/m.wat is neither a WebAssembly binary nor valid text format",
        )
        .file("m.wat", "(module"),
        isolate(
            "wasm: binary magic then garbage",
            &[],
            JOB_REFUSED,
            "invalid WebAssembly module",
        )
        .file("m.wat", {
            let mut module = b"\0asm\x01\0\0\0".to_vec();
            module.extend_from_slice(&[0xff; 64]);
            module
        }),
        isolate(
            "wasm: binary cut short",
            &[],
            JOB_REFUSED,
            "invalid WebAssembly module",
        )
        .file("m.wat", {
            let binary = wat::parse_str(two_args).unwrap();
            binary[..binary.len() - 3].to_vec()
        }),
        isolate(
            "wasm: no 'main' export",
            &[],
            JOB_REFUSED,
            "the module exports no function 'main' (its functions: other)",
        )
        .file(
            "m.wat",
            r#"(module (func (export "other") (result i32) i32.const 1))"#,
        ),
        isolate(
            "wasm: --invoke of a function not exported",
            &["--invoke", "nope"],
            JOB_REFUSED,
            "the module exports no function 'nope' (its functions: main)",
        )
        .file("m.wat", OK_WAT),
        isolate(
            "wasm: too few arguments",
            &["--arg", "1"],
            JOB_REFUSED,
            "'main' takes 2 argument(s) (i32, i32), 1 given",
        )
        .file("m.wat", two_args),
        isolate(
            "wasm: arguments to a function taking none",
            &["--arg", "1"],
            JOB_REFUSED,
            "'main' takes 0 argument(s) (none), 1 given",
        )
        .file("m.wat", OK_WAT),
        isolate(
            "wasm: argument of the wrong type",
            &["--arg", "1.5", "--arg", "2"],
            JOB_REFUSED,
            r#"argument 1 ("1.5"): not a valid i32"#,
        )
        .file("m.wat", two_args),
        isolate(
            "wasm: argument not a number",
            &["--arg", "1", "--arg", "x"],
            JOB_REFUSED,
            r#"argument 2 ("x"): not a valid i32"#,
        )
        .file("m.wat", two_args),
        isolate(
            "wasm: an import the isolate does not offer",
            &[],
            JOB_REFUSED,
            "cannot instantiate the module: cannot find definition for import (env,secret)",
        )
        .file(
            "m.wat",
            r#"(module (import "env" "secret" (func)) (func (export "main")))"#,
        ),
    ]
}

/// Deterministic noise (xorshift): the same bytes on every run, so a failure reproduces.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn all_rows() -> Vec<Row> {
    let probe = probe_elf();
    let probe_bytes = std::fs::read(&probe).unwrap();
    let probe = probe.to_str().unwrap();
    let mut rows = cli_flag_rows(probe);
    rows.extend(kernel_file_rows(probe, &probe_bytes));
    rows.extend(config_file_rows(probe));
    rows.extend(egress_policy_rows(probe));
    rows.extend(snapshot_file_rows());
    rows.extend(wasm_module_rows());
    rows
}

/// Pids of processes (other than this test) whose command line mentions `dir`.
fn processes_naming(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_str().unwrap();
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

fn write_inputs(dir: &Path, inputs: &[(&'static str, Input)]) {
    for (name, input) in inputs {
        let path = dir.join(name);
        match input {
            Input::File(bytes) => std::fs::write(&path, bytes).unwrap(),
            Input::Dir => std::fs::create_dir(&path).unwrap(),
        }
    }
}

fn dir_entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Runs one row; returns what was wrong with it, if anything.
fn check(row: &Row) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let dir_path: PathBuf = dir.path().to_path_buf();
    let dir_str = dir_path.to_str().unwrap();
    write_inputs(&dir_path, &row.inputs);
    let args: Vec<String> = row
        .args
        .iter()
        .map(|a| a.replace("{dir}", dir_str))
        .collect();
    let expected = row.stderr.replace("{dir}", dir_str);

    let mut command = Command::new(agentvm_bin());
    command
        .args(&args)
        .env("AGENTVM_LOG", "off")
        .env_remove("AGENTVM_BAD_INPUT_UNSET");
    let output = match VmProcess::spawn(command).and_then(|vm| vm.wait(ROW_TIMEOUT)) {
        Ok(output) => output,
        Err(e) => return Some(format!("{}: did not finish: {e}", row.name)),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut problems = Vec::new();
    match output.status.code() {
        None => problems.push(format!("ended by a signal ({:?})", output.status)),
        Some(code) if code != row.code => {
            problems.push(format!("exit status {code}, expected {}", row.code))
        }
        Some(_) => {}
    }
    if !stderr.contains(&expected) {
        problems.push(format!("stderr lacks {expected:?}"));
    }
    if stderr.contains("panicked") || stderr.contains("RUST_BACKTRACE") {
        problems.push("panicked".to_string());
    }
    let left = processes_naming(&dir_path);
    if !left.is_empty() {
        problems.push(format!("left processes behind: {left:?}"));
    }
    let inputs: BTreeSet<String> = row.inputs.iter().map(|(n, _)| n.to_string()).collect();
    let extra: Vec<String> = dir_entries(&dir_path)
        .difference(&inputs)
        .cloned()
        .collect();
    if !extra.is_empty() {
        problems.push(format!("left files behind: {extra:?}"));
    }
    if problems.is_empty() {
        None
    } else {
        Some(format!(
            "{}: {}\n  args: {args:?}\n  stderr: {stderr}",
            row.name,
            problems.join("; ")
        ))
    }
}

fn run_rows(rows: &[Row]) {
    let failures: Vec<String> = rows.iter().filter_map(check).collect();
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

/// Rows rejected before any VM exists: they need no KVM.
#[test]
fn bad_input_is_refused_before_a_vm_exists() {
    let rows: Vec<Row> = all_rows().into_iter().filter(|r| !r.kvm).collect();
    run_rows(&rows);
}

/// Rows that reach `/dev/kvm` (kernel loading, the isolate tier).
#[test]
fn bad_input_that_reaches_kvm_is_refused() {
    if !require_kvm() {
        return;
    }
    let rows: Vec<Row> = all_rows().into_iter().filter(|r| r.kvm).collect();
    run_rows(&rows);
}

/// The catalogue's shape, so docs/reliability.md's counts stay honest.
#[test]
fn every_entry_point_has_rows() {
    let rows = all_rows();
    let names: BTreeSet<&str> = rows.iter().map(|r| r.name).collect();
    assert_eq!(names.len(), rows.len(), "row names must be unique");
    for prefix in [
        "boot:",
        "run:",
        "isolate run:",
        "snapshot",
        "kernel:",
        "initrd:",
        "config:",
        "policy:",
        "wasm:",
    ] {
        assert!(
            rows.iter().any(|r| r.name.starts_with(prefix)),
            "no row for {prefix}"
        );
    }
}
