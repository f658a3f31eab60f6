//! Which names the VMM's resolver handed to the guest for each address: domain rules are
//! enforced by letting the guest connect only to addresses it got for allowed names.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

/// Addresses remembered at most; the oldest are forgotten first. A guest resolving names
/// under a wildcard rule could otherwise grow the map without bound.
const MAX_ADDRESSES: usize = 8192;

#[derive(Default)]
pub struct NameMap {
    names: HashMap<IpAddr, Vec<String>>,
    order: VecDeque<IpAddr>,
}

impl NameMap {
    /// Remembers that `name` resolved to `address` for the guest.
    pub fn record(&mut self, address: IpAddr, name: &str) {
        if let Some(names) = self.names.get_mut(&address) {
            if !names.iter().any(|known| known == name) {
                names.push(name.to_string());
            }
            return;
        }
        if self.order.len() >= MAX_ADDRESSES {
            if let Some(oldest) = self.order.pop_front() {
                self.names.remove(&oldest);
            }
        }
        self.names.insert(address, vec![name.to_string()]);
        self.order.push_back(address);
    }

    /// Every name handed out for `address` (empty when the guest never looked it up).
    pub fn names_for(&self, address: IpAddr) -> &[String] {
        self.names.get(&address).map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accumulate_per_address_and_oldest_are_forgotten() {
        let mut map = NameMap::default();
        let first = IpAddr::from([1, 1, 1, 1]);
        map.record(first, "a.example");
        map.record(first, "b.example");
        map.record(first, "a.example");
        assert_eq!(map.names_for(first), ["a.example", "b.example"]);
        assert!(map.names_for(IpAddr::from([2, 2, 2, 2])).is_empty());
        for n in 0..MAX_ADDRESSES as u32 {
            map.record(IpAddr::from((n + 1_000_000).to_be_bytes()), "x.example");
        }
        assert!(map.names_for(first).is_empty());
    }
}
