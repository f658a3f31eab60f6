//! The jailer with real Linux guests: `agentvm-jailer` runs `agentvm boot` (seccomp on) as an
//! unprivileged uid in its own namespaces and cgroup inside the nested test host, and `agentvm
//! exec` drives the guest agent through the jail's vsock socket.
//!
//! L1 mounts cgroup v2 with every controller, so these tests cover the v2 path (the local jailer
//! tests cover v1, which is what this machine has). Locally the tests skip (saying why) when the
//! nested host cannot run; with CI=true they fail instead. Run with:
//!
//!     cargo build --release -p vmm -p jailer -p integration-tests && \
//!     cargo test --release -p integration-tests --test jail_linux -- --nocapture

use std::sync::OnceLock;
use std::time::Duration;

use integration_tests::jailer::jailer_bin;
use integration_tests::nested::{describe, run_scenarios_with_files, Outcome};
use vmm::nested::{Scenario, ScenarioResult, L1_AGENTVM, L1_L2_INITRD, L1_L2_KERNEL};

const L1_JAILER: &str = "/bin/agentvm-jailer";
/// Where the jailer puts the jails of the `agentvm` exec file (its default base directory).
const JAILS: &str = "/srv/agentvm-jailer/agentvm";
/// Generous: L2 guests run at TCG speed, here two at a time on two shared cores.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(900);

/// Shell functions the scenarios share: start a jailed sandbox, run a command in it, describe its
/// VMM process as the host sees it, stop it.
fn prelude() -> String {
    format!(
        r#"set -u
# start ID [jailer flags...]: a jailed Linux guest (uid/gid 1000) in the background.
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
	agentvm exec --vsock-uds {JAILS}/"$id"/root/run/vsock.sock --connect-timeout 400 -- "$@"
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
start sbx-a --cpu-quota 80 --memory-limit-mib 768 --pids-max 64
run_in sbx-a sh -c 'echo guest-says-hello; echo guest_uid=$(id -u)'
echo "JAIL sbx-a exec_exit=$?"
describe sbx-a
stop sbx-a
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
        Scenario::new("jailed", jailed, SCENARIO_TIMEOUT),
        Scenario::new("fork-bomb", fork_bomb, SCENARIO_TIMEOUT),
    ]
}

fn outcome() -> &'static Outcome {
    static RUN: OnceLock<Outcome> = OnceLock::new();
    RUN.get_or_init(|| {
        run_scenarios_with_files(&scenarios(), vec![(jailer_bin(), L1_JAILER.to_string())])
    })
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
    assert_eq!(fact(r, "sbx-a", "exec_exit"), "0", "{}", describe(r));
    // Real, effective, saved and filesystem ids all dropped.
    assert_eq!(fact(r, "sbx-a", "uid"), "1000,1000,1000,1000");
    assert_eq!(fact(r, "sbx-a", "gid"), "1000,1000,1000,1000");
    // PID 1 of its own PID namespace.
    assert!(fact(r, "sbx-a", "nspid").ends_with(",1"), "{}", describe(r));
    assert_eq!(fact(r, "sbx-a", "host_root_visible"), "no");
    // Every VMM thread (main, vCPU, devices, helpers) runs under a seccomp filter.
    assert_eq!(fact(r, "sbx-a", "unfiltered_threads"), "0", "{}", describe(r));
}

#[test]
fn jailed_vmm_gets_its_cgroup_limits() {
    let Some(r) = outcome().scenario("jailed") else {
        return;
    };
    assert!(
        fact(r, "sbx-a", "cgroup").ends_with("sbx-a"),
        "{}",
        describe(r)
    );
    assert_eq!(fact(r, "sbx-a", "memory.max"), (768u64 << 20).to_string());
    assert_eq!(fact(r, "sbx-a", "cpu.max"), "80000/100000");
    assert_eq!(fact(r, "sbx-a", "pids.max"), "64");
}

#[test]
fn stopping_the_jailer_removes_the_jail_and_cgroup() {
    let Some(r) = outcome().scenario("jailed") else {
        return;
    };
    assert_eq!(fact(r, "sbx-a", "jail_dir_left"), "no", "{}", describe(r));
    assert_eq!(fact(r, "sbx-a", "cgroup_left"), "no", "{}", describe(r));
    assert_eq!(r.exit_code, 0, "{}", describe(r));
}

#[test]
fn a_fork_bomb_in_one_sandbox_leaves_the_other_working() {
    let Some(r) = outcome().scenario("fork-bomb") else {
        return;
    };
    assert!(!r.stdout_text().contains("JAIL setup failed"), "{}", describe(r));
    assert_eq!(fact(r, "calm", "alive_checks"), "3", "{}", describe(r));
    for id in ["bomb", "calm"] {
        assert_eq!(fact(r, id, "jail_dir_left"), "no", "{}", describe(r));
    }
}
