//! `agentvm-jailer` inside the nested test host: a busybox initramfs as root (so pivot_root is
//! refused and the jail is entered by moving it over /), cgroup v2 with every controller, the
//! Debian cloud kernel. The probe boots jailed there as uid 1000, a memory hog is killed by the
//! v2 memory limit, and `agentvm run` runs a command in a real Linux guest from inside the jail.
//! Then jailed `agentvm boot`s (seccomp on) are driven from outside with `agentvm exec` through
//! the jail's /run: the VMM's uid, namespace, seccomp state and cgroup files as the host sees
//! them, and a fork bomb in one sandbox beside another that keeps working.
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
use vmm::nested::{Scenario, ScenarioResult, L1_AGENTVM, L1_L2_INITRD, L1_L2_KERNEL};

const TIMEOUT: Duration = Duration::from_secs(240);
/// Two L2 Linux guests at a time, at TCG speed on two shared cores.
const TWO_GUESTS_TIMEOUT: Duration = Duration::from_secs(900);
/// Where the jailer keeps the per-sandbox directories of the `agentvm` exec file.
const JAILS: &str = "/srv/agentvm-jailer/agentvm";
const L1_JAILER: &str = "/bin/agentvm-jailer";
const L1_PROBE: &str = "/l2/probe";

/// Runs the jailed probe (cgroup v2 as L1's init mounts it, the jailer in the root cgroup) with
/// `jailer_options` and probe `cmdline`, then prints the jailer's status and what is left.
/// The jailer logs at debug level (to stderr), which shows the way into the jail and the cgroup
/// version it chose.
fn jailed_probe(name: &str, jailer_options: &str, cmdline: &str) -> Scenario {
    let script = format!(
        "AGENTVM_LOG=debug {L1_JAILER} --id {name} --exec-file /bin/agentvm --uid 1000 --gid 1000 \
         --mount {L1_PROBE}:/probe {jailer_options} -- boot --kernel /probe \
         --no-base-cmdline --mem-mib 256 --cmdline {cmdline}\n\
         echo jailer-exit=$?\n\
         echo jail-left=$(ls -A /srv/agentvm-jailer 2>/dev/null | wc -l)\n\
         echo cgroup-left=$(ls -d /sys/fs/cgroup/agentvm/{name} 2>/dev/null | wc -l)\n"
    );
    Scenario::new(name, script, TIMEOUT)
}

/// Shell functions the scenarios share: start a jailed sandbox, run a command in it, describe its
/// VMM process as the host sees it, stop it.
fn prelude() -> String {
    format!(
        r#"set -u
# start ID [jailer flags...]: a jailed Linux guest (uid/gid 1000) in the background. IDs here
# name shell variables too (jailer_ID): letters and digits only.
start() {{
	id=$1; shift
	{L1_JAILER} --id "$id" --exec-file {L1_AGENTVM} --uid 1000 --gid 1000 \
		--mount {L1_L2_KERNEL}:/vmlinux --mount {L1_L2_INITRD}:/initramfs.cpio "$@" -- \
		boot --kernel /vmlinux --initrd /initramfs.cpio --vsock-uds /run/vsock.sock \
		--vcpus 1 --mem-mib 256 >/tmp/"$id".console 2>/tmp/"$id".stderr &
	eval "jailer_$id=$!"
}}
# run_in ID CMD...: run CMD in the sandbox's guest (waits for its agent to come up).
run_in() {{
	id=$1; shift
	agentvm exec --vsock-uds {JAILS}/"$id"/run/vsock.sock --connect-timeout 400 -- "$@"
}}
# vmm_pid ID: the sandbox's VMM, found as the PID-1-of-a-namespace process whose jailer is ours.
vmm_pid() {{
	eval "j=\$jailer_$1"
	for s in /proc/[0-9]*/status; do
		p=${{s#/proc/}}; p=${{p%/status}}
		grep -q "^PPid:[[:space:]]*$j$" "$s" 2>/dev/null && echo "$p" && return
	done
}}
# describe ID: what the host sees of the sandbox's VMM process, one `JAIL ID key=value` per fact.
describe() {{
	id=$1; p=$(vmm_pid "$id")
	echo "JAIL $id vmm_pid=$p"
	echo "JAIL $id uid=$(awk '/^Uid:/{{print $2","$3","$4","$5}}' /proc/$p/status)"
	echo "JAIL $id gid=$(awk '/^Gid:/{{print $2","$3","$4","$5}}' /proc/$p/status)"
	echo "JAIL $id nspid=$(awk '/^NSpid:/{{print $2","$3}}' /proc/$p/status)"
	echo "JAIL $id root=$(readlink /proc/$p/root)"
	echo "JAIL $id threads=$(ls /proc/$p/task | wc -l)"
	echo "JAIL $id unfiltered_threads=$(grep -L '^Seccomp:[[:space:]]*2' /proc/$p/task/*/status | wc -l)"
	cg=$(sed -n 's/^0:://p' /proc/$p/cgroup)
	echo "JAIL $id cgroup=$cg"
	for f in memory.max cpu.max pids.max; do
		echo "JAIL $id $f=$(cat /sys/fs/cgroup$cg/$f 2>/dev/null | tr ' ' '/')"
	done
	echo "JAIL $id host_root_visible=$(ls /proc/$p/root/l2 >/dev/null 2>&1 && echo yes || echo no)"
}}
# stop ID: SIGTERM to the jailer, wait, then report its exit status and what is left behind.
stop() {{
	id=$1; eval "j=\$jailer_$id"
	cg=$(sed -n 's/^0:://p' /proc/$(vmm_pid "$id")/cgroup 2>/dev/null)
	kill -TERM "$j"; wait "$j"; echo "JAIL $id jailer_exit=$?"
	echo "JAIL $id jail_dir_left=$(test -e {JAILS}/$id && echo yes || echo no)"
	if [ -n "$cg" ]; then
		echo "JAIL $id cgroup_left=$(test -e /sys/fs/cgroup$cg && echo yes || echo no)"
	fi
	echo "--- $id stderr"; cat /tmp/"$id".stderr
}}
"#
    )
}

fn scenarios() -> Vec<Scenario> {
    let jailed = format!(
        r#"{prelude}
start sandbox1 --cpu-quota 80 --memory-limit-mib 768 --pids-max 64
run_in sandbox1 sh -c 'echo guest-says-hello; echo guest_uid=$(id -u)'
echo "JAIL sandbox1 exec_exit=$?"
describe sandbox1
stop sandbox1
"#,
        prelude = prelude()
    );
    // Two sandboxes side by side: a fork bomb in one must leave the other working.
    let fork_bomb = format!(
        r#"{prelude}
start bomb --cpu-quota 50 --pids-max 64
start calm --cpu-quota 50 --pids-max 64
run_in bomb true && run_in calm true || echo "JAIL setup failed"
# The bomb's exec ends when its guest gives up (OOM, or the agent killed with it).
run_in bomb sh -c 'f() {{ f | f & }}; f; sleep 600' >/dev/null 2>&1 &
sleep 20
ok=0
for i in 1 2 3; do
	out=$(run_in calm sh -c "echo calm-alive-$i") && [ "$out" = "calm-alive-$i" ] && ok=$((ok+1))
	sleep 5
done
echo "JAIL calm alive_checks=$ok"
echo "JAIL bomb jailer_running=$(kill -0 $jailer_bomb 2>/dev/null && echo yes || echo no)"
stop bomb
stop calm
"#,
        prelude = prelude()
    );
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
                "{L1_JAILER} --id linux --exec-file /bin/agentvm --uid 1000 --gid 1000 \
                 --mount {L1_L2_KERNEL}:/vmlinux --mount {L1_L2_INITRD}:/initramfs.cpio \
                 --memory-limit-mib 1024 --pids-max 256 --lifetime 600 -- run --kernel /vmlinux \
                 --initrd /initramfs.cpio --mem-mib 256 -- sh -c 'echo hello-from-jailed-l2; exit 3'\n\
                 echo jailer-exit=$?\n\
                 echo jail-left=$(ls -A /srv/agentvm-jailer 2>/dev/null | wc -l)\n\
                 echo cgroup-left=$(ls -d /sys/fs/cgroup/agentvm/linux 2>/dev/null | wc -l)\n"
            ),
            TIMEOUT,
        ),
        Scenario::new("jailed", jailed, TWO_GUESTS_TIMEOUT),
        Scenario::new("fork-bomb", fork_bomb, TWO_GUESTS_TIMEOUT),
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

/// The value of `JAIL <id> <key>=...` in the scenario's output.
fn fact(r: &ScenarioResult, id: &str, key: &str) -> String {
    let prefix = format!("JAIL {id} {key}=");
    r.stdout_text()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
        .unwrap_or_else(|| panic!("no '{prefix}' line\n{}", describe(r)))
}

#[test]
fn linux_guest_runs_jailed_as_an_unprivileged_user() {
    let Some(r) = outcome().scenario("jailed") else {
        return;
    };
    let out = r.stdout_text();
    assert!(out.contains("guest-says-hello"), "{}", describe(r));
    assert!(out.contains("guest_uid=0"), "{}", describe(r));
    assert_eq!(fact(r, "sandbox1", "exec_exit"), "0", "{}", describe(r));
    // Real, effective, saved and filesystem ids all dropped.
    assert_eq!(fact(r, "sandbox1", "uid"), "1000,1000,1000,1000");
    assert_eq!(fact(r, "sandbox1", "gid"), "1000,1000,1000,1000");
    // PID 1 of its own PID namespace.
    assert!(
        fact(r, "sandbox1", "nspid").ends_with(",1"),
        "{}",
        describe(r)
    );
    assert_eq!(fact(r, "sandbox1", "host_root_visible"), "no");
    // Main, signal, device and vCPU threads at least.
    let threads: u32 = fact(r, "sandbox1", "threads").parse().unwrap();
    assert!(threads >= 4, "{}", describe(r));
    // Every VMM thread (main, vCPU, devices, helpers) runs under a seccomp filter.
    assert_eq!(
        fact(r, "sandbox1", "unfiltered_threads"),
        "0",
        "{}",
        describe(r)
    );
}

#[test]
fn jailed_vmm_gets_its_cgroup_limits() {
    let Some(r) = outcome().scenario("jailed") else {
        return;
    };
    assert!(
        fact(r, "sandbox1", "cgroup").ends_with("sandbox1"),
        "{}",
        describe(r)
    );
    assert_eq!(
        fact(r, "sandbox1", "memory.max"),
        (768u64 << 20).to_string()
    );
    assert_eq!(fact(r, "sandbox1", "cpu.max"), "80000/100000");
    assert_eq!(fact(r, "sandbox1", "pids.max"), "64");
}

#[test]
fn stopping_the_jailer_removes_the_jail_and_cgroup() {
    let Some(r) = outcome().scenario("jailed") else {
        return;
    };
    assert_eq!(
        fact(r, "sandbox1", "jail_dir_left"),
        "no",
        "{}",
        describe(r)
    );
    assert_eq!(fact(r, "sandbox1", "cgroup_left"), "no", "{}", describe(r));
    assert_eq!(r.exit_code, 0, "{}", describe(r));
}

#[test]
fn a_fork_bomb_in_one_sandbox_leaves_the_other_working() {
    let Some(r) = outcome().scenario("fork-bomb") else {
        return;
    };
    eprintln!("{}", describe(r));
    assert!(
        !r.stdout_text().contains("JAIL setup failed"),
        "{}",
        describe(r)
    );
    assert_eq!(fact(r, "calm", "alive_checks"), "3", "{}", describe(r));
    for id in ["bomb", "calm"] {
        assert_eq!(fact(r, id, "jail_dir_left"), "no", "{}", describe(r));
    }
}
