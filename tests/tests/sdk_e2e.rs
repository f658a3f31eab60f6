//! The Python SDK end to end: inside the nested test host, `agentvm daemon` (jailed sandboxes,
//! as on a real host) serves the SDK's e2e script (`sdk/python/e2e/sdk_e2e.py`), which creates a
//! sandbox with a real Linux guest, runs commands (callbacks, exit codes, signals, timeouts),
//! moves files, checks the typed errors, and kills the sandbox. The script prints one
//! `SDK <check> ok|fail <detail>` line per check; each test here asserts one of them.
//!
//! L1 has only busybox, so this machine's Python is shipped into it: the interpreter, the shared
//! libraries `ldd` names, and only the standard-library modules the script imports (found by
//! importing it here and reading `sys.modules`), all at their host paths.
//!
//! One L1 boot and one L2 guest. Skips (saying why) when the nested host cannot run; with CI=true
//! it fails instead. Run with:
//!
//!     cargo build --release -p vmm -p jailer -p integration-tests && \
//!     cargo test --release -p integration-tests --test sdk_e2e -- --nocapture

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use integration_tests::jailer::jailer_bin;
use integration_tests::nested::{describe, run_scenarios_with_files, sh_quote, Outcome};
use vmm::config::LINUX_BASE_CMDLINE;
use vmm::nested::{Scenario, L1_AGENTVM, L1_L2_INITRD, L1_L2_KERNEL};

const SCENARIO: &str = "sdk-e2e";
/// The daemon looks for the jailer beside its own binary.
const L1_JAILER: &str = "/bin/agentvm-jailer";
const L1_SDK: &str = "/sdk";
const L1_SCRIPT: &str = "/sdk/sdk_e2e.py";
const L1_SOCKET: &str = "/run/agentvm/daemon.sock";
/// One L2 guest booting at TCG speed plus the checks.
const TIMEOUT: Duration = Duration::from_secs(1200);
/// The interpreter shipped into L1 (overridable to try another Python).
const PYTHON_ENV: &str = "AGENTVM_E2E_PYTHON";
const DEFAULT_PYTHON: &str = "/usr/bin/python3";

fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdk/python")
}

/// What of this machine's Python the script needs in L1.
struct ShippedPython {
    /// The interpreter's real path (host and L1).
    executable: String,
    /// `sys.prefix`: PYTHONHOME in L1, so no search for the platform libraries is needed.
    prefix: String,
    /// Standard-library files and shared libraries, at the same paths in L1.
    files: Vec<String>,
    /// The directories of the shared libraries: LD_LIBRARY_PATH in L1 (it has no ld.so.cache).
    library_dirs: Vec<String>,
}

/// Imports the e2e script (its `main` does not run) with `-S` as L1 will, and lists the
/// standard-library modules it loaded, plus what an error report needs.
const LIST_MODULES: &str = r#"
import importlib.util, os, sys
sdk, script = sys.argv[1], sys.argv[2]
sys.path.insert(0, sdk)
spec = importlib.util.spec_from_file_location("sdk_e2e_script", script)
spec.loader.exec_module(importlib.util.module_from_spec(spec))
import encodings.ascii, encodings.latin_1, encodings.utf_8, linecache, traceback
stdlib = os.path.dirname(os.path.realpath(os.__file__))
print("exe", os.path.realpath(sys.executable))
print("prefix", sys.prefix)
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None)
    if path and os.path.realpath(path).startswith(stdlib + os.sep):
        print("file", os.path.realpath(path))
"#;

fn python() -> String {
    std::env::var(PYTHON_ENV).unwrap_or_else(|_| DEFAULT_PYTHON.to_string())
}

fn ship_python() -> ShippedPython {
    let python = python();
    let script = sdk_dir().join("e2e/sdk_e2e.py");
    let output = Command::new(&python)
        .arg("-S")
        .arg("-c")
        .arg(LIST_MODULES)
        .arg(sdk_dir())
        .arg(&script)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {python} ({e}): the SDK end-to-end test ships this machine's Python \
                 into the nested test host (scripts/test.sh installs python3; {PYTHON_ENV} \
                 names another)"
            )
        });
    assert!(
        output.status.success(),
        "{python} could not import {}:\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |key: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .map(str::to_string)
            .collect()
    };
    let executable = field("exe").pop().expect("no interpreter path printed");
    let prefix = field("prefix").pop().expect("no prefix printed");
    let mut files = field("file");
    let (libraries, library_dirs) = shared_libraries(&executable);
    files.extend(libraries);
    files.sort();
    files.dedup();
    ShippedPython {
        executable,
        prefix,
        files,
        library_dirs,
    }
}

/// The shared libraries `ldd` says `executable` loads (the dynamic loader included), and their
/// directories.
fn shared_libraries(executable: &str) -> (Vec<String>, Vec<String>) {
    let output = Command::new("ldd")
        .arg(executable)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ldd on {executable}: {e}"));
    assert!(output.status.success(), "ldd {executable} failed");
    let mut libraries = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        // "libm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libraries.push(path.to_string());
        }
    }
    assert!(
        !libraries.is_empty(),
        "ldd named no libraries for {executable}: a static Python needs none, but then this test \
         needs no LD_LIBRARY_PATH either; check the ldd output"
    );
    let mut dirs: Vec<String> = libraries
        .iter()
        .filter_map(|l| Some(Path::new(l).parent()?.to_string_lossy().into_owned()))
        .collect();
    dirs.sort();
    dirs.dedup();
    (libraries, dirs)
}

fn scenario(python: &ShippedPython) -> Scenario {
    let boot_args = format!("{LINUX_BASE_CMDLINE} quiet");
    let script = format!(
        r#"set -u
mkdir -p /run/agentvm /tmp/sdk-state
echo "sdk-e2e: starting the daemon" >/dev/console
{L1_AGENTVM} daemon --sock {L1_SOCKET} --state-dir /tmp/sdk-state >/tmp/daemon.log 2>&1 &
daemon=$!
i=0
while [ ! -S {L1_SOCKET} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
echo "sdk-e2e: running the SDK script" >/dev/console
PYTHONHOME={prefix} PYTHONPATH={L1_SDK} PYTHONDONTWRITEBYTECODE=1 PYTHONUTF8=1 \
LD_LIBRARY_PATH={libdirs} {exe} -S {L1_SCRIPT} --socket {L1_SOCKET} \
    --kernel {L1_L2_KERNEL} --initrd {L1_L2_INITRD} --boot-args {boot_args}
rc=$?
kill -TERM $daemon
wait $daemon
echo "daemon-exit=$?"
echo "sandboxes-left=$(ls /tmp/sdk-state/sandboxes 2>/dev/null | wc -l)"
echo "--- daemon log" >&2
tail -n 40 /tmp/daemon.log >&2
for log in /tmp/sdk-state/sandboxes/*/vmm.log; do
    [ -f "$log" ] && {{ echo "--- $log" >&2; tail -n 20 "$log" >&2; }}
done
exit $rc
"#,
        prefix = sh_quote(&python.prefix),
        libdirs = sh_quote(&python.library_dirs.join(":")),
        exe = sh_quote(&python.executable),
        boot_args = sh_quote(&boot_args),
    );
    Scenario::new(SCENARIO, script, TIMEOUT)
}

fn outcome() -> &'static Outcome {
    static RUN: OnceLock<Outcome> = OnceLock::new();
    RUN.get_or_init(|| {
        let python = ship_python();
        let mut files = vec![
            (jailer_bin(), L1_JAILER.to_string()),
            (sdk_dir().join("e2e/sdk_e2e.py"), L1_SCRIPT.to_string()),
            (PathBuf::from(&python.executable), python.executable.clone()),
        ];
        let package = sdk_dir().join("agentvm");
        for entry in std::fs::read_dir(&package).expect("sdk/python/agentvm") {
            let path = entry.expect("sdk/python/agentvm entry").path();
            if path.extension().is_some_and(|e| e == "py") {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                files.push((path, format!("{L1_SDK}/agentvm/{name}")));
            }
        }
        for file in &python.files {
            files.push((PathBuf::from(file), file.clone()));
        }
        eprintln!(
            "shipping {} ({} standard-library files and libraries) into L1",
            python.executable,
            python.files.len()
        );
        run_scenarios_with_files(&[scenario(&python)], files)
    })
}

/// Asserts that check `name` ran and passed.
fn check(name: &str) {
    let Some(r) = outcome().scenario(SCENARIO) else {
        return;
    };
    let stdout = r.stdout_text();
    let prefix = format!("SDK {name} ");
    let Some(line) = stdout.lines().find(|l| l.starts_with(&prefix)) else {
        panic!("check '{name}' did not run\n{}", describe(r));
    };
    let rest = &line[prefix.len()..];
    match rest.split_once(' ').unwrap_or((rest, "")) {
        ("ok", detail) => eprintln!("{name}: {}", detail.replace("\\n", "\n")),
        _ => panic!(
            "check '{name}' failed: {}\n{}",
            rest.replace("\\n", "\n"),
            describe(r)
        ),
    }
}

#[test]
fn the_script_ran_to_the_end_and_the_daemon_stopped_cleanly() {
    let Some(r) = outcome().scenario(SCENARIO) else {
        return;
    };
    let stdout = r.stdout_text();
    assert!(
        stdout.contains("SDK-DONE") && r.exit_code == 0,
        "{}",
        describe(r)
    );
    assert!(
        stdout.lines().any(|l| l == "daemon-exit=0"),
        "{}",
        describe(r)
    );
    // The killed sandbox left no record behind.
    assert!(
        stdout.lines().any(|l| l == "sandboxes-left=0"),
        "{}",
        describe(r)
    );
}

macro_rules! sdk_checks {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check(stringify!($name));
            }
        )*
    };
}

sdk_checks!(
    unknown_id_is_not_found,
    out_of_range_is_invalid,
    unknown_template_is_not_found,
    create,
    list,
    connect,
    duplicate_id_is_conflict,
    stdout_stderr_callbacks,
    argv_env_cwd_user_stdin,
    exit_code,
    exit_code_result,
    signal,
    signal_number,
    timeout,
    timeout_output,
    files_text,
    files_bytes,
    files_list,
    files_exists,
    files_missing_is_not_found,
    watch_created,
    pty_echo,
    pty_resize,
    pty_exit_code,
    killed_by_context_manager,
    kill_again_is_false,
);
