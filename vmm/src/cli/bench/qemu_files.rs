//! Carrying this machine's QEMU into the nested test host: the binary, the shared libraries `ldd`
//! names (with the dynamic loader at its own path, which the binary has built in) and the
//! firmware QEMU microvm loads.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::child::run_tool;

pub const L1_QEMU: &str = "/opt/qemu/bin/qemu-system-x86_64";
pub const L1_QEMU_LIB: &str = "/opt/qemu/lib";
pub const L1_QEMU_SHARE: &str = "/opt/qemu/share";

/// microvm's default firmware (qboot) and the PVH option ROM; the others are optional.
const FIRMWARE_REQUIRED: [&str; 2] = ["bios-microvm.bin", "pvh.bin"];
const FIRMWARE_OPTIONAL: [&str; 3] = ["qboot.rom", "linuxboot_dma.bin", "linuxboot.bin"];
const TOOL_LIMIT: Duration = Duration::from_secs(60);

/// qemu-system-x86_64, installed with apt-get when missing (the nested test host's own lookup).
pub fn locate_qemu() -> Result<PathBuf, String> {
    vmm::nested::locate_qemu(true).map_err(|e| e.to_string())
}

/// What `ldd` said about one dependency.
#[derive(Debug, PartialEq, Eq)]
enum LddLine {
    /// `libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)`
    Library { soname: String, path: PathBuf },
    /// `/lib64/ld-linux-x86-64.so.2 (0x...)`
    Loader(PathBuf),
    /// `linux-vdso.so.1 (0x...)`: provided by the kernel.
    Virtual,
}

fn parse_ldd(output: &str) -> Result<Vec<LddLine>, String> {
    let mut deps = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some((soname, rest)) = line.split_once("=>") {
            let target = rest.split_whitespace().next().unwrap_or_default();
            if !target.starts_with('/') {
                return Err(format!("ldd cannot resolve a library QEMU needs: {line}"));
            }
            deps.push(LddLine::Library {
                soname: soname.trim().to_string(),
                path: PathBuf::from(target),
            });
        } else if line.starts_with('/') {
            let path = line.split_whitespace().next().unwrap_or_default();
            deps.push(LddLine::Loader(PathBuf::from(path)));
        } else if line.contains("vdso") {
            deps.push(LddLine::Virtual);
        } else {
            return Err(format!("unexpected ldd output line: {line}"));
        }
    }
    Ok(deps)
}

/// The files to add to the nested host for QEMU: (host path, L1 path).
pub fn bundle(qemu: &Path) -> Result<Vec<(PathBuf, String)>, String> {
    let mut cmd = Command::new("ldd");
    cmd.arg(qemu);
    let out = run_tool(cmd, "ldd", TOOL_LIMIT)?;
    if !out.status.success() {
        return Err(format!(
            "ldd {} failed ({}): {}",
            qemu.display(),
            out.status,
            out.stderr.trim()
        ));
    }
    let mut files = vec![(qemu.to_path_buf(), L1_QEMU.to_string())];
    let mut have_loader = false;
    for dep in parse_ldd(&out.stdout)? {
        match dep {
            LddLine::Library { soname, path } => {
                files.push((path, format!("{L1_QEMU_LIB}/{soname}")));
            }
            LddLine::Loader(path) => {
                let l1 = path.display().to_string();
                files.push((path, l1));
                have_loader = true;
            }
            LddLine::Virtual => {}
        }
    }
    if !have_loader {
        return Err(format!(
            "ldd named no dynamic loader for {} (is it a static binary?)",
            qemu.display()
        ));
    }
    let share = firmware_dir(qemu);
    for name in FIRMWARE_REQUIRED {
        let path = share.join(name);
        if !path.is_file() {
            return Err(format!(
                "QEMU firmware {} is missing (package qemu-system-data)",
                path.display()
            ));
        }
        files.push((path, format!("{L1_QEMU_SHARE}/{name}")));
    }
    for name in FIRMWARE_OPTIONAL {
        let path = share.join(name);
        if path.is_file() {
            files.push((path, format!("{L1_QEMU_SHARE}/{name}")));
        }
    }
    Ok(files)
}

/// QEMU's data directory: `<prefix>/share/qemu` for `<prefix>/bin/qemu-system-x86_64`.
fn firmware_dir(qemu: &Path) -> PathBuf {
    let real = std::fs::canonicalize(qemu).unwrap_or_else(|_| qemu.to_path_buf());
    real.parent()
        .and_then(Path::parent)
        .map(|prefix| prefix.join("share/qemu"))
        .filter(|d| d.is_dir())
        .unwrap_or_else(|| PathBuf::from("/usr/share/qemu"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_understood() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\
                    \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f01)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f02)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            vec![
                LddLine::Virtual,
                LddLine::Library {
                    soname: "libz.so.1".into(),
                    path: "/lib/x86_64-linux-gnu/libz.so.1".into()
                },
                LddLine::Loader("/lib64/ld-linux-x86-64.so.2".into()),
            ]
        );
        let err = parse_ldd("\tlibfoo.so.3 => not found\n").unwrap_err();
        assert!(err.contains("libfoo.so.3"), "{err}");
        assert!(parse_ldd("statically linked?\n").is_err());
    }

    #[test]
    fn firmware_dir_follows_the_prefix() {
        assert_eq!(
            firmware_dir(Path::new("/nonexistent/bin/qemu-system-x86_64")),
            PathBuf::from("/usr/share/qemu")
        );
    }

    #[test]
    fn installed_qemu_is_bundled_with_loader_libraries_and_firmware() {
        let Ok(qemu) = vmm::nested::locate_qemu(false) else {
            eprintln!("skipping: qemu-system-x86_64 is not installed");
            return;
        };
        let files = bundle(&qemu).unwrap();
        let l1: Vec<&str> = files.iter().map(|(_, p)| p.as_str()).collect();
        assert!(l1.contains(&L1_QEMU));
        assert!(l1
            .iter()
            .any(|p| p.starts_with(&format!("{L1_QEMU_LIB}/libc.so"))));
        assert!(l1.iter().any(|p| p.contains("ld-linux")));
        assert!(l1.contains(&format!("{L1_QEMU_SHARE}/bios-microvm.bin").as_str()));
        assert!(files.iter().all(|(host, _)| host.is_file()));
    }
}
