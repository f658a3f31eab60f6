//! `agentvm-jailer` inside the nested test host: a busybox initramfs as root (so pivot_root is
//! refused and the jail is entered by moving it over /), cgroup v2 with every controller, the
//! Debian cloud kernel. The probe boots jailed there as uid 1000, a memory hog is killed by the
//! v2 memory limit, and `agentvm run` runs a command in a real Linux guest from inside the jail.
//!
//! One L1 boot (3-5 minutes under TCG) serves every test here. Skips (saying why) when the nested
//! host cannot run; with CI=true it fails instead. Run with:
//!
//!     cargo build --release -p vmm -p jailer && \
//!     cargo test --release -p integration-tests --test jailer_nested

use std::sync::OnceLock;
use std::time::Duration;

use integration_tests::jailer::jailer_bin;
use integration_tests::nested::{describe, run_scenarios_with_files, Outcome};
use integration_tests::probe::{probe_elf, ProbeOutput, DEFAULT_CHECKS};
use vmm::nested::{Scenario, L1_L2_INITRD, L1_L2_KERNEL};

const TIMEOUT: Duration = Duration::from_secs(240);
const L1_JAILER: &str = "/bin/agentvm-jailer";
const L1_PROBE: &str = "/l2/probe";

/// Mounts cgroup2 (all controllers, the jailer in the root cgroup), runs the jailed probe with
/// `jailer_options` and probe `cmdline`, then prints the jailer's status and what is left.
/// The jailer logs at debug level (to stderr), which shows the way into the jail and the cgroup
/// version it chose.
fn jailed_probe(name: &str, jailer_options: &str, cmdline: &str) -> Scenario {
    let script = format!(
        "mkdir -p /sys/fs/cgroup\n\
         grep -q cgroup2 /proc/mounts || mount -t cgroup2 none /sys/fs/cgroup\n\
         AGENTVM_LOG=debug {L1_JAILER} --id {name} --exec-file /bin/agentvm --uid 1000 --gid 1000 \
         --mount {L1_PROBE}:/probe {jailer_options} -- boot --kernel /probe \
         --no-base-cmdline --mem-mib 256 --cmdline {cmdline}\n\
         echo jailer-exit=$?\n\
         echo jail-left=$(ls -A /srv/agentvm-jailer 2>/dev/null | wc -l)\n\
         echo cgroup-left=$(ls -d /sys/fs/cgroup/agentvm/{name} 2>/dev/null | wc -l)\n"
    );
    Scenario::new(name, script, TIMEOUT)
}

fn scenarios() -> Vec<Scenario> {
    vec![
        jailed_probe(
            "boot",
            "--cpu-quota 100 --memory-limit-mib 512 --pids-max 64",
            "probe.token=nested",
        ),
        jailed_probe("hog", "--memory-limit-mib 64", "probe.mode=hog"),
        Scenario::new(
            "linux",
            format!(
                "mkdir -p /sys/fs/cgroup\n\
                 grep -q cgroup2 /proc/mounts || mount -t cgroup2 none /sys/fs/cgroup\n\
                 {L1_JAILER} --id linux --exec-file /bin/agentvm --uid 1000 --gid 1000 \
                 --mount {L1_L2_KERNEL}:/vmlinux --mount {L1_L2_INITRD}:/initramfs.cpio \
                 --memory-limit-mib 1024 --pids-max 256 --lifetime 600 -- run --kernel /vmlinux \
                 --initrd /initramfs.cpio --mem-mib 256 -- sh -c 'echo hello-from-jailed-l2; exit 3'\n\
                 echo jailer-exit=$?\n\
                 echo jail-left=$(ls -A /srv/agentvm-jailer 2>/dev/null | wc -l)\n\
                 echo cgroup-left=$(ls -d /sys/fs/cgroup/agentvm/linux 2>/dev/null | wc -l)\n"
            ),
            TIMEOUT,
        ),
    ]
}

fn outcome() -> &'static Outcome {
    static RUN: OnceLock<Outcome> = OnceLock::new();
    RUN.get_or_init(|| {
        let files = vec![
            (jailer_bin(), L1_JAILER.to_string()),
            (probe_elf(), L1_PROBE.to_string()),
        ];
        run_scenarios_with_files(&scenarios(), files)
    })
}

fn value<'a>(output: &'a str, key: &str) -> Option<&'a str> {
    output
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
}

#[test]
fn the_probe_boots_jailed_on_an_initramfs_root_with_cgroup_v2() {
    let Some(r) = outcome().scenario("boot") else {
        return;
    };
    let stdout = r.stdout_text();
    let problems = ProbeOutput::parse(&stdout).problems(&DEFAULT_CHECKS);
    assert!(problems.is_empty(), "{problems:#?}\n{}", describe(r));
    assert_eq!(value(&stdout, "jailer-exit"), Some("0"), "{}", describe(r));
    let log = r.stderr_text();
    assert!(
        log.contains("pivot_root refused (root is rootfs)"),
        "the jail was not entered through the rootfs fallback:\n{}",
        describe(r)
    );
    assert!(
        log.contains("created the sandbox cgroup") && log.contains("V2("),
        "cgroup v2 was not used:\n{}",
        describe(r)
    );
    assert_eq!(value(&stdout, "jail-left"), Some("0"), "{}", describe(r));
    assert_eq!(value(&stdout, "cgroup-left"), Some("0"), "{}", describe(r));
}

#[test]
fn the_cgroup_v2_memory_limit_kills_a_hog_with_the_limit_named() {
    let Some(r) = outcome().scenario("hog") else {
        return;
    };
    let stdout = r.stdout_text();
    assert_eq!(
        value(&stdout, "jailer-exit"),
        Some("111"),
        "{}",
        describe(r)
    );
    assert!(
        r.stderr_text()
            .contains("VMM killed: memory limit of 64 MiB reached"),
        "{}",
        describe(r)
    );
    assert_eq!(value(&stdout, "jail-left"), Some("0"), "{}", describe(r));
    assert_eq!(value(&stdout, "cgroup-left"), Some("0"), "{}", describe(r));
}

#[test]
fn agentvm_run_runs_a_linux_guest_command_from_inside_the_jail() {
    let Some(r) = outcome().scenario("linux") else {
        return;
    };
    let stdout = r.stdout_text();
    assert!(
        stdout.lines().any(|l| l == "hello-from-jailed-l2"),
        "{}",
        describe(r)
    );
    // The guest command's status, passed through agentvm run and the jailer.
    assert_eq!(value(&stdout, "jailer-exit"), Some("3"), "{}", describe(r));
    assert_eq!(value(&stdout, "jail-left"), Some("0"), "{}", describe(r));
    assert_eq!(value(&stdout, "cgroup-left"), Some("0"), "{}", describe(r));
}
