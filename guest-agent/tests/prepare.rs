//! End-to-end check of kernels/prepare.sh: downloads Debian's cloud kernel and busybox (~30 MB),
//! so it only runs with AGENTVM_TEST_PREPARE=1. Uses its own cache under the target directory.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const ENABLE: &str = "AGENTVM_TEST_PREPARE";

struct Run {
    stdout: String,
    stderr: String,
}

fn prepare(cache: &Path, args: &[&str]) -> Run {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernels/prepare.sh");
    let output = Command::new("bash")
        .arg(&script)
        .args(args)
        .env("AGENTVM_CACHE", cache)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run bash");
    let run = Run {
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert!(
        output.status.success(),
        "prepare.sh {args:?} failed: {}\n{}",
        output.status,
        run.stderr
    );
    run
}

fn parse(stdout: &str) -> HashMap<String, String> {
    let map: HashMap<String, String> = stdout
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('=').expect("key=value line");
            (k.to_string(), v.to_string())
        })
        .collect();
    let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["busybox", "initrd", "kernel", "pkg", "version", "vmlinuz"],
        "{stdout}"
    );
    map
}

fn check_vmlinux(path: &Path) {
    let elf = fs::read(path).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "ELF64");
    assert_eq!(elf[5], 1, "little endian");
    assert_eq!(u16::from_le_bytes([elf[16], elf[17]]), 2, "ET_EXEC");
    assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 62, "EM_X86_64");
    let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
    assert_ne!(entry, 0, "entry point");
}

struct Entry {
    mode: u32,
    uid: u32,
    gid: u32,
    data: Vec<u8>,
}

/// Reads a newc ("070701") cpio archive: name -> entry, in archive order.
fn read_newc(bytes: &[u8]) -> Vec<(String, Entry)> {
    let field = |at: usize, i: usize| {
        let hex = std::str::from_utf8(&bytes[at + 6 + i * 8..at + 14 + i * 8]).unwrap();
        u32::from_str_radix(hex, 16).unwrap() as usize
    };
    let align4 = |n: usize| (n + 3) & !3;
    let mut entries = Vec::new();
    let mut at = 0;
    loop {
        assert_eq!(&bytes[at..at + 6], b"070701", "newc magic at {at}");
        let (mode, uid, gid) = (field(at, 1), field(at, 2), field(at, 3));
        let (size, name_len) = (field(at, 6), field(at, 11));
        let name_start = at + 110;
        let name = std::str::from_utf8(&bytes[name_start..name_start + name_len - 1])
            .unwrap()
            .to_string();
        let data_start = align4(name_start + name_len);
        let data = bytes[data_start..data_start + size].to_vec();
        at = align4(data_start + size);
        if name == "TRAILER!!!" {
            return entries;
        }
        entries.push((
            name,
            Entry {
                mode: mode as u32,
                uid: uid as u32,
                gid: gid as u32,
                data,
            },
        ));
    }
}

fn check_initramfs(path: &Path) {
    let archive = fs::read(path).unwrap();
    let entries = read_newc(&archive);
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted, "archive order is sorted (reproducible)");
    let get = |name: &str| {
        &entries
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} missing from the initramfs"))
            .1
    };
    assert!(entries.iter().all(|(_, e)| e.uid == 0 && e.gid == 0));

    let init = get("init");
    assert_eq!(init.mode & 0o170000, 0o100000, "/init is a regular file");
    assert_eq!(init.mode & 0o777, 0o755);
    assert_eq!(&init.data[..4], b"\x7fELF");

    assert_eq!(get("bin/busybox").mode & 0o777, 0o755);
    for applet in ["bin/sh", "bin/ls", "sbin/poweroff", "usr/bin/env"] {
        let link = get(applet);
        assert_eq!(link.mode & 0o170000, 0o120000, "{applet} is a symlink");
        assert_eq!(link.data, b"/bin/busybox", "{applet}");
    }
    for dir in ["proc", "sys", "dev", "tmp", "run", "root", "etc"] {
        assert_eq!(get(dir).mode & 0o170000, 0o040000, "{dir} is a directory");
    }
    assert!(String::from_utf8_lossy(&get("etc/passwd").data).starts_with("root:x:0:0:"));
    assert!(String::from_utf8_lossy(&get("etc/group").data).starts_with("root:x:0:"));

    let order = String::from_utf8(get("lib/modules/load-order").data.clone()).unwrap();
    let order: Vec<&str> = order.lines().collect();
    for file in &order {
        let module = get(&format!("lib/modules/{file}"));
        assert_eq!(
            &module.data[..4],
            b"\x7fELF",
            "{file} is an uncompressed module"
        );
    }
    let position = |file: &str| {
        order
            .iter()
            .position(|f| *f == file)
            .unwrap_or_else(|| panic!("{file} not in load-order {order:?}"))
    };
    for (dependency, dependent) in [
        ("virtio_ring.ko", "virtio_mmio.ko"),
        ("virtio.ko", "virtio_mmio.ko"),
        ("virtio.ko", "virtio_net.ko"),
        ("virtio.ko", "virtio_blk.ko"),
        ("virtio.ko", "virtio-rng.ko"),
        ("vsock.ko", "vmw_vsock_virtio_transport_common.ko"),
        (
            "vmw_vsock_virtio_transport_common.ko",
            "vmw_vsock_virtio_transport.ko",
        ),
        ("fuse.ko", "virtiofs.ko"),
    ] {
        assert!(
            position(dependency) < position(dependent),
            "{dependency} must load before {dependent}: {order:?}"
        );
    }
}

fn identity(path: &Path) -> (u64, i64, i64) {
    let meta = fs::metadata(path).unwrap();
    (meta.ino(), meta.mtime(), meta.mtime_nsec())
}

#[test]
fn prepare_script_end_to_end() {
    if std::env::var(ENABLE).as_deref() != Ok("1") {
        eprintln!("skipped: set {ENABLE}=1 to download the kernel and run kernels/prepare.sh");
        return;
    }
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("prepare-cache");
    let _ = fs::remove_dir_all(&cache);

    // First run: everything from scratch.
    let first = prepare(&cache, &[]);
    assert!(
        first.stderr.contains("agentvm: downloading linux-image-"),
        "{}",
        first.stderr
    );
    let paths = parse(&first.stdout);
    let dir = cache.join(&paths["version"]);
    assert!(paths["version"].ends_with("-cloud-amd64"));
    for (key, name) in [
        ("kernel", "vmlinux"),
        ("initrd", "initramfs.cpio"),
        ("vmlinuz", "vmlinuz"),
        ("pkg", "pkg"),
        ("busybox", "busybox"),
    ] {
        assert_eq!(
            Path::new(&paths[key]),
            dir.join(name).canonicalize().unwrap()
        );
    }
    check_vmlinux(Path::new(&paths["kernel"]));
    check_initramfs(Path::new(&paths["initrd"]));
    let modules = Path::new(&paths["pkg"])
        .join("lib/modules")
        .join(&paths["version"]);
    assert!(modules.join("modules.dep").is_file());
    assert!(modules.join("kernel/arch/x86/kvm/kvm-amd.ko").is_file());
    let initramfs = PathBuf::from(&paths["initrd"]);
    let original = fs::read(&initramfs).unwrap();
    let before = identity(&initramfs);

    // Later runs, with and without asking apt again: pure cache hits.
    for args in [&[][..], &["--print"][..], &["--update"][..]] {
        let again = prepare(&cache, args);
        assert_eq!(again.stdout, first.stdout);
        assert!(
            !again.stderr.contains("downloading"),
            "{args:?}: {}",
            again.stderr
        );
        assert!(
            !again.stderr.contains("packing"),
            "{args:?}: {}",
            again.stderr
        );
        assert_eq!(
            identity(&initramfs),
            before,
            "{args:?} rewrote the initramfs"
        );
    }

    // A truncated initramfs is repacked, byte for byte the same as before.
    fs::OpenOptions::new()
        .write(true)
        .open(&initramfs)
        .unwrap()
        .set_len(1000)
        .unwrap();
    let repaired = prepare(&cache, &["--print"]);
    assert!(
        repaired.stderr.contains("packing initramfs"),
        "{}",
        repaired.stderr
    );
    assert!(
        !repaired.stderr.contains("downloading"),
        "{}",
        repaired.stderr
    );
    assert_eq!(repaired.stdout, first.stdout);
    assert!(
        fs::read(&initramfs).unwrap() == original,
        "repacked initramfs differs"
    );

    // A missing kernel-stage file means downloading again.
    fs::remove_file(&paths["busybox"]).unwrap();
    let rebuilt = prepare(&cache, &[]);
    assert!(
        rebuilt.stderr.contains("busybox is missing"),
        "{}",
        rebuilt.stderr
    );
    assert!(rebuilt.stderr.contains("downloading"), "{}", rebuilt.stderr);
    assert_eq!(rebuilt.stdout, first.stdout);
    check_vmlinux(Path::new(&paths["kernel"]));

    // Same size and restored timestamps pass the quick check; --verify hashes and catches it.
    let vmlinux = Path::new(&paths["kernel"]);
    let meta = fs::metadata(vmlinux).unwrap();
    let mut bytes = fs::read(vmlinux).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(vmlinux, &bytes).unwrap();
    fs::File::options()
        .write(true)
        .open(vmlinux)
        .unwrap()
        .set_modified(meta.modified().unwrap())
        .unwrap();
    let verified = prepare(&cache, &["--print", "--verify"]);
    assert!(
        verified.stderr.contains("vmlinux has the wrong checksum"),
        "{}",
        verified.stderr
    );
    assert_eq!(verified.stdout, first.stdout);
    check_vmlinux(vmlinux);
    assert!(
        fs::read(vmlinux).unwrap()[last] != bytes[last],
        "vmlinux was restored"
    );
}
