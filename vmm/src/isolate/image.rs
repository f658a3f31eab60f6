//! The isolate guest image (guest-agent/isolate), built by vmm/build.rs and embedded in the
//! binary, flattened once per process into the bytes to copy to [`layout::IMAGE`].

use std::io::Cursor;
use std::sync::OnceLock;

use isolate_abi::{layout, ImageHeader, ABI_VERSION};
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The guest ELF as built.
pub const GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/isolate-guest.elf"));

/// The loaded image: what sits in guest memory from [`layout::IMAGE`] on, and its header.
pub struct FlatImage {
    pub bytes: Vec<u8>,
    pub header: ImageHeader,
}

/// The embedded image, flattened on first use.
pub fn flat_image() -> Result<&'static FlatImage, String> {
    static IMAGE: OnceLock<Result<FlatImage, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| flatten(GUEST_ELF))
        .as_ref()
        .map_err(Clone::clone)
}

/// Loads `elf` into scratch memory covering the image range with linux-loader (which checks the
/// ELF and places each PT_LOAD segment) and reads the range back.
pub fn flatten(elf: &[u8]) -> Result<FlatImage, String> {
    let scratch = GuestMemoryMmap::<()>::from_ranges(&[(
        GuestAddress(layout::IMAGE),
        layout::IMAGE_MAX as usize,
    )])
    .map_err(|e| format!("cannot map scratch memory for the isolate image: {e}"))?;
    let loaded = Elf::load(&scratch, None, &mut Cursor::new(elf), None)
        .map_err(|e| format!("the isolate guest image does not load: {e}"))?;
    let end = loaded.kernel_end;
    if end <= layout::IMAGE || end > layout::IMAGE + layout::IMAGE_MAX {
        return Err(format!(
            "the isolate guest image ends at {end:#x}, outside its range"
        ));
    }
    let mut bytes = vec![0u8; (end - layout::IMAGE) as usize];
    scratch
        .read_slice(&mut bytes, GuestAddress(layout::IMAGE))
        .map_err(|e| format!("cannot read the loaded isolate image back: {e}"))?;
    let header = ImageHeader::parse(&bytes)
        .filter(|h| h.magic == ImageHeader::MAGIC)
        .ok_or("the isolate guest image has no image header at its start")?;
    if header.abi_version != ABI_VERSION {
        return Err(format!(
            "the isolate guest image speaks ABI version {}, this VMM {ABI_VERSION}",
            header.abi_version
        ));
    }
    for (what, addr) in [
        ("kernel entry", header.kernel_entry),
        ("user entry", header.user_entry),
        ("fault stubs", header.fault_stubs),
    ] {
        if !(layout::IMAGE..end).contains(&addr) {
            return Err(format!(
                "the isolate guest image's {what} {addr:#x} is outside it"
            ));
        }
    }
    Ok(FlatImage { bytes, header })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_image_flattens_with_a_valid_header() {
        let image = flat_image().unwrap();
        let h = image.header;
        let end = layout::IMAGE + image.bytes.len() as u64;
        for addr in [h.kernel_entry, h.user_entry, h.fault_stubs] {
            assert!(
                (layout::IMAGE..end).contains(&addr),
                "{addr:#x} outside the image"
            );
        }
        assert_eq!(h.fault_stub_stride, 16);
    }

    #[test]
    fn garbage_is_not_an_image() {
        assert!(flatten(b"not an elf").is_err());
        assert!(flatten(&[]).is_err());
    }
}
