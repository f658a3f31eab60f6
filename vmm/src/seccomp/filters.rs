//! The BPF programs build.rs compiled from `seccomp/<target>.json`, decoded once at start-up.

use std::collections::HashMap;
use std::sync::OnceLock;

use seccompiler::{sock_filter, BpfProgram};

use super::ThreadKind;

/// Written by build.rs; see there for the layout.
static COMPILED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_filters.bin"));

/// Bytes of one BPF instruction in the blob.
const INSN_LEN: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the compiled seccomp filters end early (at byte {0})")]
    Truncated(usize),
    #[error("the compiled seccomp filters have {0} bytes after the last filter")]
    TrailingBytes(usize),
    #[error("a compiled seccomp filter name is not UTF-8")]
    BadName,
    #[error("the compiled seccomp filters have no `{0}` filter")]
    Missing(&'static str),
    #[error("the compiled seccomp filter `{0}` is empty")]
    Empty(&'static str),
}

/// The filter of each thread kind.
#[derive(Debug)]
pub struct Filters {
    vcpu: BpfProgram,
    devices: BpfProgram,
    vmm: BpfProgram,
    api: BpfProgram,
    agent_jobs: BpfProgram,
    uffd_handler: BpfProgram,
    isolate: BpfProgram,
    egress: BpfProgram,
    isolate_fetch: BpfProgram,
}

impl Filters {
    pub fn get(&self, kind: ThreadKind) -> &BpfProgram {
        match kind {
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::Devices => &self.devices,
            ThreadKind::Vmm => &self.vmm,
            ThreadKind::Api => &self.api,
            ThreadKind::AgentJobs => &self.agent_jobs,
            ThreadKind::UffdHandler => &self.uffd_handler,
            ThreadKind::Isolate => &self.isolate,
            ThreadKind::Egress => &self.egress,
            ThreadKind::IsolateFetch => &self.isolate_fetch,
        }
    }

    fn from_map(mut map: HashMap<String, BpfProgram>) -> Result<Self, DecodeError> {
        let mut take = |kind: ThreadKind| {
            let name = kind.as_str();
            match map.remove(name) {
                None => Err(DecodeError::Missing(name)),
                Some(p) if p.is_empty() => Err(DecodeError::Empty(name)),
                Some(p) => Ok(p),
            }
        };
        Ok(Self {
            vcpu: take(ThreadKind::Vcpu)?,
            devices: take(ThreadKind::Devices)?,
            vmm: take(ThreadKind::Vmm)?,
            api: take(ThreadKind::Api)?,
            agent_jobs: take(ThreadKind::AgentJobs)?,
            uffd_handler: take(ThreadKind::UffdHandler)?,
            isolate: take(ThreadKind::Isolate)?,
            egress: take(ThreadKind::Egress)?,
            isolate_fetch: take(ThreadKind::IsolateFetch)?,
        })
    }
}

/// The filters built into this binary (decoded on first use).
pub fn compiled() -> Result<&'static Filters, DecodeError> {
    static FILTERS: OnceLock<Result<Filters, DecodeError>> = OnceLock::new();
    FILTERS
        .get_or_init(|| decode(COMPILED).and_then(Filters::from_map))
        .as_ref()
        .map_err(Clone::clone)
}

/// Parses build.rs's blob into named programs.
pub fn decode(blob: &[u8]) -> Result<HashMap<String, BpfProgram>, DecodeError> {
    let mut reader = Reader { blob, at: 0 };
    let count = reader.u32()?;
    let mut programs = HashMap::new();
    for _ in 0..count {
        let name_len = reader.take(1)?[0] as usize;
        let name = std::str::from_utf8(reader.take(name_len)?)
            .map_err(|_| DecodeError::BadName)?
            .to_string();
        let insns = reader.u32()? as usize;
        let bytes = reader.take(
            insns
                .checked_mul(INSN_LEN)
                .ok_or(DecodeError::Truncated(reader.at))?,
        )?;
        let program = bytes
            .chunks_exact(INSN_LEN)
            .map(|b| sock_filter {
                code: u16::from_le_bytes([b[0], b[1]]),
                jt: b[2],
                jf: b[3],
                k: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            })
            .collect();
        programs.insert(name, program);
    }
    if reader.at != blob.len() {
        return Err(DecodeError::TrailingBytes(blob.len() - reader.at));
    }
    Ok(programs)
}

struct Reader<'a> {
    blob: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|&end| end <= self.blob.len())
            .ok_or(DecodeError::Truncated(self.blob.len()))?;
        let bytes = &self.blob[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blob layout of build.rs, written out by hand for one program.
    fn blob(name: &str, insns: &[(u16, u8, u8, u32)]) -> Vec<u8> {
        let mut b = 1u32.to_le_bytes().to_vec();
        b.push(name.len() as u8);
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&(insns.len() as u32).to_le_bytes());
        for &(code, jt, jf, k) in insns {
            b.extend_from_slice(&code.to_le_bytes());
            b.push(jt);
            b.push(jf);
            b.extend_from_slice(&k.to_le_bytes());
        }
        b
    }

    #[test]
    fn decodes_the_build_script_layout() {
        let programs =
            decode(&blob("vcpu", &[(0x20, 1, 2, 4), (0x06, 0, 0, 0x7fff_0000)])).unwrap();
        let vcpu = &programs["vcpu"];
        assert_eq!(vcpu.len(), 2);
        assert_eq!(
            (vcpu[0].code, vcpu[0].jt, vcpu[0].jf, vcpu[0].k),
            (0x20, 1, 2, 4)
        );
        assert_eq!(vcpu[1].k, 0x7fff_0000);
    }

    #[test]
    fn damaged_blobs_are_errors_not_panics() {
        let good = blob("vmm", &[(0x06, 0, 0, 0)]);
        for cut in 0..good.len() {
            assert!(
                matches!(decode(&good[..cut]), Err(DecodeError::Truncated(_))),
                "cut at {cut}"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(DecodeError::TrailingBytes(1)));
        let mut bad_name = good;
        bad_name[5] = 0xff;
        assert_eq!(decode(&bad_name), Err(DecodeError::BadName));
        let huge = [1, 0, 0, 0, 1, b'x', 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(decode(&huge), Err(DecodeError::Truncated(_))));
    }

    #[test]
    fn missing_or_empty_filters_are_named() {
        let only_vcpu = decode(&blob("vcpu", &[(0x06, 0, 0, 0)])).unwrap();
        assert_eq!(
            Filters::from_map(only_vcpu).unwrap_err(),
            DecodeError::Missing("devices")
        );
        let mut map = HashMap::new();
        for name in ["vcpu", "devices", "vmm", "api", "agent_jobs"] {
            map.insert(name.to_string(), vec![]);
        }
        assert_eq!(
            Filters::from_map(map).unwrap_err(),
            DecodeError::Empty("vcpu")
        );
    }

    #[test]
    fn the_built_in_filters_decode() {
        let filters = compiled().unwrap();
        for kind in ThreadKind::ALL {
            assert!(filters.get(kind).len() > 10, "{kind:?}");
        }
    }
}
