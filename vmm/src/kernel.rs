//! Recognising and loading the guest kernel (ELF vmlinux or bzImage) and the initrd.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use devices::GuestMemoryMmap;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// Offset of the 64-bit entry point (`startup_64`) from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// setup_header.xloadflags bit: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot open kernel {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read kernel {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a kernel: neither an x86-64 ELF executable nor a bzImage")]
    NotAKernel { path: PathBuf },
    #[error("{path} is a 32-bit-only bzImage (no 64-bit entry point); use a 64-bit kernel")]
    No64BitEntry { path: PathBuf },
    #[error("cannot load kernel {path} into {mem_mib} MiB of guest memory: {source} (too little memory, or a corrupt image)")]
    Load {
        path: PathBuf,
        mem_mib: u64,
        source: linux_loader::loader::Error,
    },
    #[error("kernel {path}: {reason}")]
    BadElf { path: PathBuf, reason: String },
    #[error("cannot place kernel segment at {addr:#x} from {path} in {mem_mib} MiB of guest memory: {source}")]
    Segment {
        path: PathBuf,
        addr: u64,
        mem_mib: u64,
        source: crate::image_map::MapError,
    },
    #[error("cannot open initrd {path}: {source}")]
    InitrdOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path} is empty")]
    InitrdEmpty { path: PathBuf },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory: {reason}")]
    InitrdFit {
        path: PathBuf,
        size: u64,
        reason: String,
    },
    #[error("cannot copy initrd {path} into guest memory: {reason}")]
    InitrdCopy { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF executable; `linux` tells whether its notes say it is a Linux kernel.
    Elf {
        linux: bool,
    },
    BzImage,
}

impl KernelFormat {
    pub fn is_linux(self) -> bool {
        matches!(
            self,
            KernelFormat::BzImage | KernelFormat::Elf { linux: true }
        )
    }
}

/// Looks at the first bytes of `path` to tell what kind of kernel it is.
pub fn detect_format(path: &Path) -> Result<KernelFormat, KernelError> {
    let mut file = File::open(path).map_err(|source| KernelError::Open {
        path: path.into(),
        source,
    })?;
    let mut head = vec![0u8; 0x210];
    let n = read_up_to(&mut file, &mut head).map_err(|source| KernelError::Read {
        path: path.into(),
        source,
    })?;
    head.truncate(n);
    if head.len() >= 20 && &head[..4] == b"\x7fELF" {
        // ELFCLASS64, little endian, e_machine == EM_X86_64
        if head[4] != 2 || head[5] != 1 || u16::from_le_bytes([head[18], head[19]]) != 62 {
            return Err(KernelError::NotAKernel { path: path.into() });
        }
        let linux = elf_has_linux_notes(&mut file).map_err(|source| KernelError::Read {
            path: path.into(),
            source,
        })?;
        return Ok(KernelFormat::Elf { linux });
    }
    if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(KernelError::NotAKernel { path: path.into() })
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// vmlinux carries ELF notes owned by "Linux" (build id, version) and "Xen" (PVH entry); our
/// freestanding test guests carry none. That tells "needs a CPU that can run Linux" apart from
/// "tiny ring-3 guest" without guessing from file names.
fn elf_has_linux_notes(file: &mut File) -> std::io::Result<bool> {
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut ehdr)?;
    let phoff = u64::from_le_bytes(ehdr[32..40].try_into().unwrap());
    let phentsize = u16::from_le_bytes([ehdr[54], ehdr[55]]) as u64;
    let phnum = u16::from_le_bytes([ehdr[56], ehdr[57]]) as u64;
    if phentsize < 56 || phnum > 256 {
        return Ok(false);
    }
    for i in 0..phnum {
        let mut phdr = [0u8; 56];
        file.seek(SeekFrom::Start(phoff + i * phentsize))?;
        file.read_exact(&mut phdr)?;
        const PT_NOTE: u32 = 4;
        if u32::from_le_bytes(phdr[0..4].try_into().unwrap()) != PT_NOTE {
            continue;
        }
        let offset = u64::from_le_bytes(phdr[8..16].try_into().unwrap());
        let size = u64::from_le_bytes(phdr[32..40].try_into().unwrap()).min(64 << 10);
        let mut notes = vec![0u8; size as usize];
        file.seek(SeekFrom::Start(offset))?;
        let n = read_up_to(file, &mut notes)?;
        notes.truncate(n);
        let mut pos = 0usize;
        while pos + 12 <= notes.len() {
            let namesz = u32::from_le_bytes(notes[pos..pos + 4].try_into().unwrap()) as usize;
            let descsz = u32::from_le_bytes(notes[pos + 4..pos + 8].try_into().unwrap()) as usize;
            let name_start = pos + 12;
            let name_end = name_start.saturating_add(namesz);
            if name_end > notes.len() {
                break;
            }
            let name = &notes[name_start..name_end];
            if name.starts_with(b"Linux\0") || name.starts_with(b"Xen\0") {
                return Ok(true);
            }
            pos = name_start + namesz.div_ceil(4) * 4 + descsz.div_ceil(4) * 4;
        }
    }
    Ok(false)
}

/// Where the kernel went and how to enter it.
pub struct LoadedKernel {
    pub entry: GuestAddress,
    /// First byte after the loaded image: the initrd must go above it.
    pub end: GuestAddress,
    /// Present for bzImage: the zero page starts from the image's own setup header.
    pub setup_header: Option<setup_header>,
}

pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    format: KernelFormat,
    mem_mib: u64,
) -> Result<LoadedKernel, KernelError> {
    let mut file = File::open(path).map_err(|source| KernelError::Open {
        path: path.into(),
        source,
    })?;
    let highmem = Some(GuestAddress(arch::layout::HIMEM_START));
    let load_error = |source| KernelError::Load {
        path: path.into(),
        mem_mib,
        source,
    };
    match format {
        KernelFormat::Elf { .. } => load_elf_mapped(mem, &mut file, path, mem_mib),
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, &mut file, highmem).map_err(load_error)?;
            let header = result
                .setup_header
                .ok_or_else(|| KernelError::NotAKernel { path: path.into() })?;
            if header.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(KernelError::No64BitEntry { path: path.into() });
            }
            Ok(LoadedKernel {
                entry: GuestAddress(result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
                end: GuestAddress(result.kernel_end),
                setup_header: Some(header),
            })
        }
    }
}

/// One PT_LOAD program header.
struct LoadSegment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// Maps each PT_LOAD segment of an x86-64 ELF at its physical address (see `image_map` for why
/// this does not use linux-loader's copying ELF loader). Enforces what linux-loader would: 64-bit
/// little-endian x86-64 executable, segments at or above 1 MiB, inside guest memory.
fn load_elf_mapped(
    mem: &GuestMemoryMmap,
    file: &mut File,
    path: &Path,
    mem_mib: u64,
) -> Result<LoadedKernel, KernelError> {
    let bad = |reason: String| KernelError::BadElf {
        path: path.into(),
        reason,
    };
    let read_err = |source| KernelError::Read {
        path: path.into(),
        source,
    };
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    file.read_exact(&mut ehdr).map_err(read_err)?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    const ET_EXEC: u16 = 2;
    if u16_at(&ehdr, 16) != ET_EXEC {
        return Err(bad("not an executable ELF (e_type is not ET_EXEC)".into()));
    }
    let entry = u64_at(&ehdr, 24);
    let phoff = u64_at(&ehdr, 32);
    let phentsize = u16_at(&ehdr, 54) as u64;
    let phnum = u16_at(&ehdr, 56) as u64;
    if phentsize < 56 || phnum == 0 || phnum > 64 {
        return Err(bad(format!(
            "implausible program header table ({phnum} entries of {phentsize} bytes)"
        )));
    }
    let file_len = file.metadata().map_err(read_err)?.len();
    let mut segments = Vec::new();
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        file.seek(SeekFrom::Start(phoff + i * phentsize))
            .map_err(read_err)?;
        file.read_exact(&mut ph).map_err(read_err)?;
        const PT_LOAD: u32 = 1;
        if u32_at(&ph, 0) != PT_LOAD {
            continue;
        }
        let seg = LoadSegment {
            offset: u64_at(&ph, 8),
            paddr: u64_at(&ph, 24),
            filesz: u64_at(&ph, 32),
            memsz: u64_at(&ph, 40),
        };
        if seg.filesz > seg.memsz
            || seg
                .offset
                .checked_add(seg.filesz)
                .is_none_or(|e| e > file_len)
        {
            return Err(bad(format!(
                "segment {i} claims bytes beyond the end of the file or more file than memory"
            )));
        }
        if seg.paddr < arch::layout::HIMEM_START {
            return Err(bad(format!(
                "segment {i} would load at {:#x}, below 1 MiB",
                seg.paddr
            )));
        }
        segments.push(seg);
    }
    if segments.is_empty() {
        return Err(bad("no loadable segments".into()));
    }
    let mut end = 0u64;
    for seg in &segments {
        let seg_end = seg.paddr.saturating_add(seg.memsz);
        if !mem.address_in_range(GuestAddress(seg_end.saturating_sub(1))) {
            return Err(KernelError::Segment {
                path: path.into(),
                addr: seg.paddr,
                mem_mib,
                source: crate::image_map::MapError::OutsideMemory {
                    start: seg.paddr,
                    end: seg_end,
                },
            });
        }
        crate::image_map::place(mem, file, seg.offset, GuestAddress(seg.paddr), seg.filesz)
            .map_err(|source| KernelError::Segment {
                path: path.into(),
                addr: seg.paddr,
                mem_mib,
                source,
            })?;
        end = end.max(seg_end);
    }
    Ok(LoadedKernel {
        entry: GuestAddress(entry),
        end: GuestAddress(end),
        setup_header: None,
    })
}

/// Places the initrd at the highest place in low memory it fits above the kernel, as bootloaders
/// do (mapped, not copied: see `image_map`).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: GuestAddress,
) -> Result<(GuestAddress, usize), KernelError> {
    let mut file = File::open(path).map_err(|source| KernelError::InitrdOpen {
        path: path.into(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| KernelError::InitrdOpen {
            path: path.into(),
            source,
        })?
        .len();
    if size == 0 {
        return Err(KernelError::InitrdEmpty { path: path.into() });
    }
    let addr = arch::initrd_load_addr_above(mem, size as usize, kernel_end).map_err(|e| {
        KernelError::InitrdFit {
            path: path.into(),
            size,
            reason: e.to_string(),
        }
    })?;
    crate::image_map::place(mem, &mut file, 0, addr, size).map_err(|e| {
        KernelError::InitrdCopy {
            path: path.into(),
            reason: e.to_string(),
        }
    })?;
    Ok((addr, size as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(bytes: &[u8]) -> tempfile_like::TempPath {
        tempfile_like::TempPath::with_contents(bytes)
    }

    /// Minimal self-cleaning temp file (no extra dependency for one helper).
    mod tempfile_like {
        use std::path::PathBuf;
        pub struct TempPath(pub PathBuf);
        impl TempPath {
            pub fn with_contents(bytes: &[u8]) -> Self {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static N: AtomicUsize = AtomicUsize::new(0);
                let path = std::env::temp_dir().join(format!(
                    "agentvm-kernel-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::SeqCst)
                ));
                std::fs::write(&path, bytes).unwrap();
                TempPath(path)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn random_bytes_are_not_a_kernel() {
        let f = temp_file(b"this is a text file, not a kernel\n");
        assert!(matches!(
            detect_format(&f.0),
            Err(KernelError::NotAKernel { .. })
        ));
        let empty = temp_file(b"");
        assert!(matches!(
            detect_format(&empty.0),
            Err(KernelError::NotAKernel { .. })
        ));
    }

    #[test]
    fn bzimage_header_is_recognised() {
        let mut img = vec![0u8; 0x400];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        let f = temp_file(&img);
        assert_eq!(detect_format(&f.0).unwrap(), KernelFormat::BzImage);
        assert!(KernelFormat::BzImage.is_linux());
    }

    #[test]
    fn this_test_binary_is_an_elf_without_linux_notes() {
        let exe = std::env::current_exe().unwrap();
        assert_eq!(
            detect_format(&exe).unwrap(),
            KernelFormat::Elf { linux: false }
        );
    }

    #[test]
    fn elf_with_linux_note_is_linux() {
        // ELF64 header + one PT_NOTE program header + a "Linux" note.
        let mut img = vec![0u8; 0x200];
        img[..4].copy_from_slice(b"\x7fELF");
        img[4] = 2;
        img[5] = 1;
        img[18..20].copy_from_slice(&62u16.to_le_bytes());
        img[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        img[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        img[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 64;
        img[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        img[ph + 8..ph + 16].copy_from_slice(&0x100u64.to_le_bytes()); // p_offset
        img[ph + 32..ph + 40].copy_from_slice(&24u64.to_le_bytes()); // p_filesz
        let note = 0x100;
        img[note..note + 4].copy_from_slice(&6u32.to_le_bytes());
        img[note + 4..note + 8].copy_from_slice(&4u32.to_le_bytes());
        img[note + 8..note + 12].copy_from_slice(&1u32.to_le_bytes());
        img[note + 12..note + 18].copy_from_slice(b"Linux\0");
        let f = temp_file(&img);
        assert_eq!(
            detect_format(&f.0).unwrap(),
            KernelFormat::Elf { linux: true }
        );
    }

    #[test]
    fn missing_kernel_names_the_path() {
        let err = detect_format(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"));
    }
}
