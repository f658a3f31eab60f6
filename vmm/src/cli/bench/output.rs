//! The benchmark's results: one JSON document (`--json`, `--out`) and its rendering as a table.

use std::fmt::Write as _;

use serde::Serialize;

use super::inner::PeerStatus;
use super::machine::MachineInfo;
use super::stats::Summary;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Ms,
    Us,
    Mib,
    MibPerS,
    /// Guest pages (4 KiB).
    Pages,
    PerS,
    GbitPerS,
}

impl Unit {
    pub(super) fn label(self) -> &'static str {
        match self {
            Unit::Ms => "ms",
            Unit::Us => "µs",
            Unit::Mib => "MiB",
            Unit::MibPerS => "MiB/s",
            Unit::Pages => "pages",
            Unit::PerS => "/s",
            Unit::GbitPerS => "Gbit/s",
        }
    }
}

/// One measured quantity, for agentvm and (where it applies) the peer.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub id: &'static str,
    pub label: &'static str,
    pub unit: Unit,
    pub agentvm: Option<Summary>,
    /// `None`: the peer does not expose this, or did not run.
    pub peer: Option<Summary>,
}

impl Figure {
    pub fn new(id: &'static str, label: &'static str, unit: Unit, agentvm: &[f64]) -> Self {
        Figure {
            id,
            label,
            unit,
            agentvm: Summary::of(agentvm),
            peer: None,
        }
    }

    pub fn with_peer(mut self, peer: &[f64]) -> Self {
        self.peer = Summary::of(peer);
        self
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerInfo {
    pub name: &'static str,
    pub status: PeerStatus,
    pub detail: Option<String>,
    pub qemu_version: Option<String>,
    pub variant: Option<String>,
    pub args: Vec<String>,
    pub tried: Vec<super::inner::Attempt>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Section {
    pub id: &'static str,
    pub title: &'static str,
    /// Where the figures were measured; guest-bound ones name the nested test host.
    pub measured_on: String,
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
    pub peer: Option<PeerInfo>,
    /// Set when this part could not be measured (the benchmark then exits non-zero).
    pub error: Option<String>,
    /// Every run's raw milestones (CLOCK_MONOTONIC ns of the machine that ran it).
    pub samples: serde_json::Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct GuestInfo {
    pub kernel_version: String,
    pub kernel: String,
    pub initrd: String,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Document {
    pub benchmark: &'static str,
    pub agentvm_version: &'static str,
    pub runs: u32,
    pub machine: MachineInfo,
    pub guest: GuestInfo,
    pub sections: Vec<Section>,
}

impl Document {
    pub fn errors(&self) -> Vec<String> {
        section_errors(&self.sections)
    }

    pub fn to_table(&self) -> String {
        let mut t = String::new();
        let m = &self.machine;
        let g = &self.guest;
        let _ = writeln!(
            t,
            "{}: median / p99 (nearest rank), min-max, n; {} runs asked per figure",
            self.benchmark, self.runs
        );
        let _ = writeln!(t, "{}", m.describe());
        let _ = writeln!(
            t,
            "guest:   kernel {} (vmlinux) + agentvm initramfs, {} vCPU, {} MiB, command `{}`",
            g.kernel_version,
            g.vcpus,
            g.mem_mib,
            g.command.join(" ")
        );
        let label_width = self
            .sections
            .iter()
            .flat_map(|s| &s.figures)
            .map(|f| row_label(f).chars().count() + 2)
            .max()
            .unwrap_or(0);
        for s in &self.sections {
            render_section(&mut t, s, label_width);
        }
        t
    }
}

const CELL_WIDTH: usize = 36;

fn row_label(f: &Figure) -> String {
    format!("{} ({})", f.label, f.unit.label())
}

fn render_section(t: &mut String, s: &Section, label_width: usize) {
    let _ = writeln!(t);
    let _ = writeln!(t, "{}", s.title);
    let _ = writeln!(t, "measured on: {}", s.measured_on);
    let with_peer = s.peer.is_some();
    if !s.figures.is_empty() {
        // Columns fit their widest cell, with two spaces between columns at least.
        let width = s
            .figures
            .iter()
            .flat_map(|f| [cell(f.agentvm, f.unit), cell(f.peer, f.unit)])
            .map(|c| c.chars().count() + 2)
            .max()
            .unwrap_or(0)
            .max(CELL_WIDTH);
        let mut head = format!("{:<label_width$}{:>width$}", "", "agentvm");
        if let Some(p) = &s.peer {
            let _ = write!(head, "{:>width$}", p.name);
        }
        let _ = writeln!(t, "{}", head.trim_end());
        for f in &s.figures {
            let mut row = format!(
                "{:<label_width$}{:>width$}",
                row_label(f),
                cell(f.agentvm, f.unit)
            );
            if with_peer {
                let _ = write!(row, "{:>width$}", cell(f.peer, f.unit));
            }
            let _ = writeln!(t, "{}", row.trim_end());
        }
    }
    if let Some(p) = &s.peer {
        let version = p.qemu_version.as_deref().unwrap_or("version unknown");
        match p.status {
            PeerStatus::Ok => {
                let _ = writeln!(
                    t,
                    "peer: {} ({version}), {}: {}",
                    p.name,
                    p.variant.as_deref().unwrap_or("?"),
                    p.args.join(" ")
                );
            }
            PeerStatus::DidNotBoot => {
                let _ = writeln!(
                    t,
                    "peer did not boot: {}",
                    p.detail.as_deref().unwrap_or("no reason recorded")
                );
            }
            PeerStatus::Failed | PeerStatus::Unavailable => {
                let _ = writeln!(
                    t,
                    "peer {}: {}",
                    if p.status == PeerStatus::Failed {
                        "failed"
                    } else {
                        "unavailable"
                    },
                    p.detail.as_deref().unwrap_or("no reason recorded")
                );
            }
        }
    }
    for n in &s.notes {
        let _ = writeln!(t, "note: {n}");
    }
    if let Some(e) = &s.error {
        let _ = writeln!(t, "ERROR: {e}");
    }
}

fn cell(s: Option<Summary>, unit: Unit) -> String {
    match s {
        None => "-".to_string(),
        Some(s) => format!(
            "{} / {} ({}-{}) n={}",
            num(s.median, unit),
            num(s.p99, unit),
            num(s.min, unit),
            num(s.max, unit),
            s.n
        ),
    }
}

/// Three significant-ish digits, enough for figures whose run-to-run noise is larger.
/// "title: error" of each section that could not be measured.
pub(super) fn section_errors(sections: &[Section]) -> Vec<String> {
    sections
        .iter()
        .filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", s.title)))
        .collect()
}

pub(super) fn num(v: f64, unit: Unit) -> String {
    let digits = match unit {
        Unit::Mib | Unit::MibPerS => 1,
        Unit::GbitPerS => 2,
        Unit::Pages | Unit::PerS => 0,
        Unit::Ms | Unit::Us if v.abs() < 10.0 => 2,
        Unit::Ms | Unit::Us if v.abs() < 1000.0 => 1,
        Unit::Ms | Unit::Us => 0,
    };
    format!("{v:.digits$}")
}

/// The figure `id` of `s`; panics if there is none.
#[cfg(test)]
pub fn figure<'a>(s: &'a Section, id: &str) -> &'a Figure {
    s.figures.iter().find(|f| f.id == id).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(peer: Option<PeerInfo>, error: Option<String>) -> Document {
        Document {
            benchmark: "boot",
            agentvm_version: "0.1.0",
            runs: 3,
            machine: MachineInfo {
                cpu_model: "AMD EPYC".into(),
                cpus: 2,
                host_kernel: "6.18".into(),
                kvm: "nested".into(),
            },
            guest: GuestInfo {
                kernel_version: "6.1.0".into(),
                kernel: "/k".into(),
                initrd: "/i".into(),
                vcpus: 1,
                mem_mib: 256,
                command: vec!["true".into()],
            },
            sections: vec![Section {
                id: "guest_bound",
                title: "Guest-bound",
                measured_on: "nested test host (QEMU TCG + kvm-amd), not a VMX host".into(),
                figures: vec![
                    Figure::new(
                        "ready",
                        "spawn -> agent ready",
                        Unit::Ms,
                        &[1500.0, 1400.0, 1600.0],
                    )
                    .with_peer(&[2000.0]),
                    Figure::new("entry", "spawn -> kernel entry", Unit::Ms, &[3.25]),
                ],
                notes: vec!["a note".into()],
                peer,
                error,
                samples: serde_json::Value::Null,
            }],
        }
    }

    fn peer(status: PeerStatus, detail: Option<&str>) -> PeerInfo {
        PeerInfo {
            name: "qemu-microvm",
            status,
            detail: detail.map(String::from),
            qemu_version: Some("QEMU emulator version 7.2.22".into()),
            variant: Some("qboot".into()),
            args: vec!["-M".into(), "microvm".into()],
            tried: vec![],
        }
    }

    #[test]
    fn table_shows_both_columns_where_and_the_machine() {
        let t = doc(Some(peer(PeerStatus::Ok, None)), None).to_table();
        assert!(
            t.contains("machine: AMD EPYC, 2 CPUs, host kernel 6.18"),
            "{t}"
        );
        assert!(t.contains("measured on: nested test host (QEMU TCG + kvm-amd), not a VMX host"));
        let ready = t
            .lines()
            .find(|l| l.starts_with("spawn -> agent ready (ms)"))
            .unwrap();
        assert!(ready.contains("1500 / 1600 (1400-1600) n=3"), "{ready}");
        assert!(ready.contains("2000 / 2000 (2000-2000) n=1"), "{ready}");
        let entry = t
            .lines()
            .find(|l| l.starts_with("spawn -> kernel entry"))
            .unwrap();
        assert!(
            entry.contains("3.25 / 3.25") && entry.trim_end().ends_with('-'),
            "{entry}"
        );
        assert!(t.contains("peer: qemu-microvm (QEMU emulator version 7.2.22), qboot: -M microvm"));
        assert!(t.contains("note: a note"));
    }

    #[test]
    fn peer_failure_and_section_errors_are_spelled_out() {
        let d = doc(
            Some(peer(PeerStatus::DidNotBoot, Some("timed out"))),
            Some("broke".into()),
        );
        let t = d.to_table();
        assert!(t.contains("peer did not boot: timed out"), "{t}");
        assert!(t.contains("ERROR: broke"), "{t}");
        assert_eq!(d.errors(), ["Guest-bound: broke"]);
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["sections"][0]["peer"]["status"], "did-not-boot");
        assert_eq!(json["sections"][0]["figures"][0]["unit"], "ms");
        assert_eq!(
            json["sections"][0]["figures"][0]["agentvm"]["median"],
            1500.0
        );
        assert!(json["sections"][0]["figures"][1]["peer"].is_null());
    }

    #[test]
    fn wide_cells_stay_apart() {
        let mut d = doc(Some(peer(PeerStatus::Ok, None)), None);
        d.sections[0].figures = vec![Figure::new(
            "x",
            "exec",
            Unit::Us,
            &[112610.0, 234624.0, 66227.0, 292956.0],
        )
        .with_peer(&[146304.0, 389294.0])];
        let t = d.to_table();
        let row = t.lines().find(|l| l.starts_with("exec (µs)")).unwrap();
        assert!(row.contains("n=4  "), "{row}");
        assert!(row.ends_with("n=2"), "{row}");
    }

    #[test]
    fn numbers_keep_useful_precision() {
        assert_eq!(num(4.56789, Unit::Ms), "4.57");
        assert_eq!(num(45.6789, Unit::Ms), "45.7");
        assert_eq!(num(4567.89, Unit::Ms), "4568");
        assert_eq!(num(2.04, Unit::Mib), "2.0");
        assert_eq!(num(123.45, Unit::Us), "123.5");
        assert_eq!(num(812.34, Unit::MibPerS), "812.3");
        assert_eq!(Unit::MibPerS.label(), "MiB/s");
    }
}
