//! A bounded log of a stream's bytes with absolute offsets: the newest `capacity` bytes are kept,
//! older ones dropped, and offsets keep counting from the first byte ever written.

use std::collections::VecDeque;

pub(crate) struct RingLog {
    data: VecDeque<u8>,
    /// Absolute offset of `data[0]`.
    start: u64,
    capacity: usize,
}

impl RingLog {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            data: VecDeque::new(),
            start: 0,
            capacity,
        }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        let skipped = bytes.len().saturating_sub(self.capacity);
        let bytes = &bytes[skipped..];
        let overflow = (self.data.len() + bytes.len()).saturating_sub(self.capacity);
        self.data.drain(..overflow);
        self.start += (skipped + overflow) as u64;
        self.data.extend(bytes);
    }

    /// Offset of the oldest byte still kept.
    pub(crate) fn start(&self) -> u64 {
        self.start
    }

    /// Offset just past the newest byte: the total ever written.
    pub(crate) fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }

    /// Up to `max` bytes from `offset`, or from the oldest kept byte if that was dropped: returns
    /// where the bytes start. Past the end, nothing.
    pub(crate) fn read_from(&self, offset: u64, max: usize) -> (u64, Vec<u8>) {
        let from = offset.max(self.start);
        if from >= self.end() {
            return (from, Vec::new());
        }
        let skip = (from - self.start) as usize;
        let take = max.min(self.data.len() - skip);
        (from, self.data.range(skip..skip + take).copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_bytes_with_absolute_offsets() {
        let mut log = RingLog::new(8);
        log.push(b"abcde");
        assert_eq!((log.start(), log.end()), (0, 5));
        assert_eq!(log.read_from(1, 3), (1, b"bcd".to_vec()));
        log.push(b"fghij");
        assert_eq!((log.start(), log.end()), (2, 10));
        assert_eq!(log.read_from(0, 100), (2, b"cdefghij".to_vec()));
        assert_eq!(log.read_from(9, 100), (9, b"j".to_vec()));
        assert_eq!(log.read_from(10, 100), (10, Vec::new()));
        assert_eq!(log.read_from(50, 100), (50, Vec::new()));
        // A single push larger than the capacity keeps its tail.
        log.push(b"0123456789AB");
        assert_eq!((log.start(), log.end()), (14, 22));
        assert_eq!(log.read_from(0, 100), (14, b"456789AB".to_vec()));
    }
}
