//! The `hog` mode: writes one byte to every page of guest RAM the probe can reach, so the VMM's
//! resident memory grows by the guest's size (the jailer's memory-limit test drives a VMM into
//! its cgroup limit this way).

use crate::hw::{touch_page, IDENTITY_MAP_END};
use crate::serial::marker_line;
use crate::zeropage::{ZeroPage, E820_RAM};

const PAGE: u64 = 4096;
/// Below 16 MiB lie the probe's image, the page tables, the zero page and the MP table, which
/// must survive; the rest of RAM is fair game.
const HOG_START: u64 = 16 << 20;

/// Touches every reachable RAM page from `HOG_START` up, then prints how much it touched.
pub fn hog(zp: Option<ZeroPage>) {
    let Some(zp) = zp else {
        marker_line("hog end touched_kib=0 (no zero page)");
        return;
    };
    let map = zp.e820();
    marker_line(format_args!("hog begin ram_kib={}", map.ram_bytes() / 1024));
    let mut touched = 0u64;
    for entry in map.entries().iter().filter(|e| e.kind == E820_RAM) {
        let start = entry.addr.max(HOG_START).next_multiple_of(PAGE);
        let end = entry.addr.saturating_add(entry.size).min(IDENTITY_MAP_END);
        let mut page = start;
        while page < end {
            touch_page(page);
            touched += PAGE;
            page += PAGE;
        }
    }
    marker_line(format_args!("hog end touched_kib={}", touched / 1024));
}
