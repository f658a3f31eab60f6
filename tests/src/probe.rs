//! The probe test guest (tests/guests/probe): building it, and reading what it prints.
//!
//! The probe is a freestanding ring-3 ELF that checks the boot path from inside the guest. It
//! prints on COM1, one line each:
//! - check lines `PROBE <name> <ok|fail> <details>`, where details are mostly `key=value` tokens;
//! - marker lines `PROBE done`, `PROBE spinning`, `PROBE triple-fault rip=<hex>`,
//!   `PROBE flood begin bytes=<n> fifo_depth=<n>` and `PROBE flood end bytes=<n> fnv1a64=<hex>`.
//!
//! `probe.mode=` on the kernel command line picks the mode: `default` (the [`DEFAULT_CHECKS`], then
//! `done` and an i8042 reset), `triple-fault` (`ud2` without an IDT), `spin` (loops in ring 3
//! forever after `spinning`), `flood` ([`FLOOD_BYTES`] of [`flood_stream`], then `done` and a
//! reset) or `hog` (writes every RAM page above 16 MiB between `hog begin ram_kib=<n>` and
//! `hog end touched_kib=<n>`, then `done` and a reset: the VMM's memory grows by the guest's
//! size) or `count` (prints `PROBE count <n>` for n = 1, 2, ... forever, never resetting: a
//! paused VM's console stops growing). An unknown mode prints a failing `start` line, then `done`, and resets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The only Rust target available; the probe is freestanding, so the host target does.
pub const PROBE_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The check lines the default mode prints, in order.
pub const DEFAULT_CHECKS: [&str; 8] = [
    "start",
    "bootparams",
    "e820",
    "cmdline",
    "mptable",
    "cpuid",
    "pio",
    "virtio",
];

/// How many bytes the `flood` mode prints between its begin and end markers.
/// 64 KiB: each byte is a VM exit, ~60 µs apiece on the PVM development hosts.
pub const FLOOD_BYTES: usize = 64 << 10;
const FLOOD_LINE: usize = 64;
const FLOOD_ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Flags for the probe build. Setting them through the environment replaces the repository's
/// `.cargo/config.toml` rustflags (`+crt-static`, meant for host binaries) instead of adding to
/// them. Non-PIC code at fixed addresses is what the linker script (via the probe's build.rs)
/// expects; panic=abort and the link arguments come from the probe's own Cargo.toml and build.rs.
const PROBE_RUSTFLAGS: &[&str] = &["-Crelocation-model=static"];

/// The repository root (this crate lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the repository")
        .to_path_buf()
}

fn cargo_binary() -> std::ffi::OsString {
    std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(Into::into))
        .unwrap_or_else(|| "cargo".into())
}

/// Builds the probe (release profile) once per process and returns the path of its ELF.
///
/// Panics with cargo's output if the build fails: this is a test helper.
pub fn probe_elf() -> PathBuf {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE.get_or_init(build_probe).clone()
}

fn build_probe() -> PathBuf {
    let root = repo_root();
    let probe_dir = root.join("tests/guests/probe");
    let target_dir = root.join("target/guests");
    let cargo = cargo_binary();
    let output = Command::new(&cargo)
        .current_dir(&probe_dir)
        .args([
            "build",
            "--release",
            "--locked",
            "--offline",
            "--target",
            PROBE_TARGET,
        ])
        .arg("--manifest-path")
        .arg(probe_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // CARGO_ENCODED_RUSTFLAGS has the highest precedence and survives spaces in paths.
        .env("CARGO_ENCODED_RUSTFLAGS", PROBE_RUSTFLAGS.join("\x1f"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?} to build the probe: {e}"));
    if !output.status.success() {
        panic!(
            "building the probe ({}) failed with {}:\n{}",
            probe_dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let elf = target_dir.join(PROBE_TARGET).join("release").join("probe");
    assert!(
        elf.is_file(),
        "cargo built the probe but {} does not exist",
        elf.display()
    );
    elf
}

/// One `PROBE <name> <ok|fail> <details>` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub name: String,
    pub ok: bool,
    pub details: String,
}

impl CheckLine {
    /// The value of the first `key=value` token in the details.
    pub fn field(&self, key: &str) -> Option<&str> {
        field(&self.details, key)
    }

    /// The e820 entries of an `e820` line (`<start>-<end>:<type>` tokens).
    pub fn e820_entries(&self) -> Result<Vec<E820Entry>, String> {
        self.details
            .split_whitespace()
            .filter(|t| t.starts_with("0x") && t.contains('-'))
            .map(E820Entry::parse)
            .collect()
    }
}

fn field<'a>(details: &'a str, key: &str) -> Option<&'a str> {
    details
        .split_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
}

/// Parses `0x1f` or `31` as a number.
pub fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// An e820 entry as the probe prints it: `[start, end)` of a type (1 = RAM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct E820Entry {
    pub start: u64,
    pub end: u64,
    pub kind: u32,
}

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

impl E820Entry {
    fn parse(token: &str) -> Result<Self, String> {
        let bad = || format!("malformed e820 entry {token:?}");
        let (range, kind) = token.split_once(':').ok_or_else(bad)?;
        let (start, end) = range.split_once('-').ok_or_else(bad)?;
        Ok(Self {
            start: parse_number(start).ok_or_else(bad)?,
            end: parse_number(end).ok_or_else(bad)?,
            kind: kind.parse().map_err(|_| bad())?,
        })
    }
}

/// Everything the probe printed, split into check lines and marker lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeOutput {
    pub checks: Vec<CheckLine>,
    /// Marker lines without the `PROBE ` prefix, e.g. `done`, `triple-fault rip=0x200028`.
    pub markers: Vec<String>,
}

impl ProbeOutput {
    /// Parses console output. Lines that do not start with `PROBE ` (flood data, anything else on
    /// the console) are ignored; a `\r` before the `\n` is tolerated.
    pub fn parse(console: &str) -> Self {
        let mut out = Self::default();
        for line in console.lines() {
            let Some(rest) = line.strip_prefix("PROBE ") else {
                continue;
            };
            let rest = rest.trim_end_matches('\r');
            let mut parts = rest.splitn(3, ' ');
            let name = parts.next().unwrap_or_default();
            match parts.next() {
                Some(status @ ("ok" | "fail")) => out.checks.push(CheckLine {
                    name: name.to_string(),
                    ok: status == "ok",
                    details: parts.next().unwrap_or_default().to_string(),
                }),
                _ => out.markers.push(rest.to_string()),
            }
        }
        out
    }

    pub fn check(&self, name: &str) -> Option<&CheckLine> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// The first marker starting with `prefix` (e.g. `"triple-fault "`).
    pub fn marker(&self, prefix: &str) -> Option<&str> {
        self.markers
            .iter()
            .find(|m| m.starts_with(prefix))
            .map(String::as_str)
    }

    pub fn has_marker(&self, marker: &str) -> bool {
        self.markers.iter().any(|m| m == marker)
    }

    /// The checks that failed, plus any of `expected` that never printed or printed more than once.
    pub fn problems(&self, expected: &[&str]) -> Vec<String> {
        let mut problems: Vec<String> = self
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{} failed: {}", c.name, c.details))
            .collect();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for c in &self.checks {
            *counts.entry(&c.name).or_default() += 1;
        }
        for name in expected {
            match counts.get(name).copied().unwrap_or(0) {
                0 => problems.push(format!("{name} never reported")),
                1 => {}
                n => problems.push(format!("{name} reported {n} times")),
            }
        }
        problems
    }
}

/// The exact bytes the `flood` mode prints between its markers: 64-byte lines, line `i` being `i`
/// as 8 lowercase hex digits, a space, 54 characters of `A-Za-z0-9` starting at index `i % 62`
/// (wrapping), and `\n`.
pub fn flood_stream() -> Vec<u8> {
    let mut out = Vec::with_capacity(FLOOD_BYTES);
    for i in 0..FLOOD_BYTES / FLOOD_LINE {
        out.extend_from_slice(format!("{i:08x} ").as_bytes());
        out.extend((0..FLOOD_LINE - 10).map(|j| FLOOD_ALPHABET[(i + j) % FLOOD_ALPHABET.len()]));
        out.push(b'\n');
    }
    out
}

/// FNV-1a 64, the hash the probe prints at the end of a flood.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The flood as it arrived on the console: the bytes between `PROBE flood begin ...\n` and
/// `PROBE flood end ...`, and the end marker's fields.
#[derive(Debug)]
pub struct Flood<'a> {
    pub data: &'a [u8],
    pub declared_bytes: u64,
    pub declared_fnv1a64: u64,
}

/// Finds the flood in raw console output, or says what is missing.
pub fn find_flood(console: &[u8]) -> Result<Flood<'_>, String> {
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let begin = find(console, b"PROBE flood begin ").ok_or("no `PROBE flood begin` marker")?;
    let data_start = begin
        + console[begin..]
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated flood begin marker")?
        + 1;
    let end_len =
        find(&console[data_start..], b"PROBE flood end ").ok_or("no `PROBE flood end` marker")?;
    let data = &console[data_start..data_start + end_len];
    let end_line = console[data_start + end_len..]
        .split(|&b| b == b'\n')
        .next()
        .unwrap_or_default();
    let end_line = String::from_utf8_lossy(end_line);
    let number = |key| {
        field(&end_line, key)
            .and_then(parse_number)
            .ok_or_else(|| format!("flood end marker {end_line:?} lacks {key}="))
    };
    Ok(Flood {
        data,
        declared_bytes: number("bytes")?,
        declared_fnv1a64: number("fnv1a64")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::{read_elf, EM_X86_64, ET_EXEC, PF_X};

    /// The lowest address linux-loader's ELF loader accepts for the entry point (HIMEM_START).
    const HIGHMEM_START: u64 = 0x10_0000;

    #[test]
    fn probe_is_an_elf_the_vmm_can_load() {
        let path = probe_elf();
        let elf = read_elf(&path).unwrap();
        assert_eq!(
            elf.elf_type, ET_EXEC,
            "probe must be ET_EXEC (fixed addresses)"
        );
        assert_eq!(elf.machine, EM_X86_64);
        let loads: Vec<_> = elf.load_segments().collect();
        assert!(!loads.is_empty(), "no PT_LOAD segments: {elf:?}");
        for seg in &loads {
            assert!(seg.paddr >= HIGHMEM_START, "segment below 1 MiB: {seg:?}");
            assert_eq!(
                seg.paddr, seg.vaddr,
                "identity-mapped image expected: {seg:?}"
            );
            assert!(seg.memsz >= seg.filesz, "{seg:?}");
            assert!(
                seg.offset + seg.filesz <= elf.file_len,
                "{seg:?} runs past the file"
            );
            assert!(
                seg.paddr + seg.memsz <= 1 << 32,
                "{seg:?} leaves the identity map"
            );
        }
        assert!(elf.entry >= HIGHMEM_START);
        let entry_seg = loads
            .iter()
            .find(|s| s.contains_paddr(elf.entry))
            .unwrap_or_else(|| panic!("entry {:#x} is in no PT_LOAD segment", elf.entry));
        assert!(
            entry_seg.flags & PF_X != 0,
            "entry segment is not executable"
        );
        assert!(
            elf.entry < entry_seg.paddr + entry_seg.filesz,
            "entry lies in the zero-filled part of its segment"
        );
    }

    #[test]
    fn parses_check_and_marker_lines() {
        let console = "noise\nPROBE start ok mode=default zero_page=0x7000\r\n\
                       PROBE cmdline ok console=ttyS0 probe.token=abc123\n\
                       PROBE pio fail port=0x510 inb=0x00 inl=0x00000000\n\
                       PROBE triple-fault rip=0x200028\nPROBE done\n";
        let out = ProbeOutput::parse(console);
        assert_eq!(out.checks.len(), 3);
        let start = out.check("start").unwrap();
        assert!(start.ok);
        assert_eq!(start.field("zero_page"), Some("0x7000"));
        assert_eq!(
            out.check("cmdline").unwrap().details,
            "console=ttyS0 probe.token=abc123"
        );
        assert!(!out.check("pio").unwrap().ok);
        assert_eq!(
            out.marker("triple-fault "),
            Some("triple-fault rip=0x200028")
        );
        assert!(out.has_marker("done"));
        let problems = out.problems(&["start", "pio", "e820"]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("pio failed"));
        assert_eq!(problems[1], "e820 never reported");
    }

    #[test]
    fn parses_e820_entries() {
        let line = CheckLine {
            name: "e820".into(),
            ok: true,
            details: "ram_kib=261759 entries=3 0x0-0x9fc00:1 0x9fc00-0xa0000:2 \
                      0x100000-0x10000000:1"
                .into(),
        };
        assert_eq!(line.field("ram_kib").and_then(parse_number), Some(261_759));
        let entries = line.e820_entries().unwrap();
        assert_eq!(
            entries,
            vec![
                E820Entry {
                    start: 0,
                    end: 0x9fc00,
                    kind: 1
                },
                E820Entry {
                    start: 0x9fc00,
                    end: 0xa0000,
                    kind: 2
                },
                E820Entry {
                    start: 0x10_0000,
                    end: 0x1000_0000,
                    kind: 1
                },
            ]
        );
        let bad = CheckLine {
            details: "0x0-zz:1".into(),
            ..line
        };
        assert!(bad.e820_entries().is_err());
    }

    /// Line 0x3ff and the hash are what the probe itself printed in a flood run: the host-side
    /// generator must agree with the guest's byte for byte.
    #[test]
    fn flood_stream_matches_the_probe() {
        let stream = flood_stream();
        assert_eq!(stream.len(), FLOOD_BYTES);
        assert_eq!(
            &stream[..64],
            b"00000000 ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz01\n"
        );
        assert_eq!(
            &stream[FLOOD_BYTES - 64..],
            b"000003ff fghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVW\n"
        );
        assert_eq!(fnv1a64(&stream), 0x9ff4_2a30_188a_c8a3);
    }

    #[test]
    fn finds_the_flood_between_markers() {
        let console = b"PROBE start ok mode=flood\nPROBE flood begin bytes=3 fifo_depth=16\nab\n\
                        PROBE flood end bytes=3 fnv1a64=0x1f\nPROBE done\n";
        let flood = find_flood(console).unwrap();
        assert_eq!(flood.data, b"ab\n");
        assert_eq!(flood.declared_bytes, 3);
        assert_eq!(flood.declared_fnv1a64, 0x1f);
        assert!(find_flood(b"PROBE flood begin bytes=3\nab\n").is_err());
    }
}
