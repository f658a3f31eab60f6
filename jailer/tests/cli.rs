//! The `agentvm-jailer` command line: help, and bad input refused with exit status 100 and a
//! message naming the problem, before anything is created (no root needed for these). Building
//! this test also makes `cargo test --workspace` build the binary the integration tests jail
//! with.

use std::process::{Command, Output};

const JAILER: &str = env!("CARGO_BIN_EXE_agentvm-jailer");

fn jailer(args: &[&str]) -> Output {
    Command::new(JAILER)
        .args(args)
        .output()
        .expect("cannot run agentvm-jailer")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn help_lists_the_options_and_exit_statuses() {
    let out = jailer(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--id",
        "--exec-file",
        "--chroot-base-dir",
        "--mount",
        "--device",
        "--new-netns",
        "--cgroup-version",
        "--cpu-quota",
        "--memory-limit-mib",
        "--pids-max",
        "--resource-limit",
        "--lifetime",
        "110 lifetime exceeded",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

#[test]
fn bad_input_exits_100_naming_the_problem() {
    let base = tempfile::tempdir().unwrap();
    let base_arg = base.path().to_str().unwrap();
    let common = [
        "--id",
        "cli",
        "--gid",
        "1000",
        "--exec-file",
        JAILER,
        "--chroot-base-dir",
        base_arg,
    ];
    let cases: [(&[&str], &str); 4] = [
        (&["--uid", "0"], "--uid 0 would run the VMM as root"),
        (
            &["--uid", "1000", "--memory-limit-mib", "0"],
            "--memory-limit-mib 0 is out of range",
        ),
        (
            &["--uid", "1000", "--device", "gpu"],
            "--device \"gpu\" is not one of kvm, userfaultfd, tun",
        ),
        (
            &["--uid", "1000", "--mount", "/nonexistent/disk.img:rw"],
            "--mount source /nonexistent/disk.img",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = common.to_vec();
        args.extend_from_slice(extra);
        let out = jailer(&args);
        assert_eq!(out.status.code(), Some(100), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(
            std::fs::read_dir(base.path()).unwrap().next().is_none(),
            "{args:?} created something"
        );
    }
    let out = jailer(&["--id", "x"]);
    assert_eq!(out.status.code(), Some(100), "{}", stderr(&out));
    assert!(stderr(&out).contains("--exec-file"), "{}", stderr(&out));
}
