//! Splits a list of control items (directory entries, watch events) into batches whose message
//! fits in one frame, measured by encoded size rather than by count: entry names and paths vary
//! from one byte to `PATH_MAX`.

use agentvm_protocol::MAX_PAYLOAD;
use serde::Serialize;

use super::service_error::StreamFailure;

/// Room for what a batch message holds besides its items: the request id (a varint of at most
/// 10 bytes) and the item count (at most 5).
const MESSAGE_OVERHEAD: usize = 16;

/// Encoded size of one item, as postcard will write it inside the batch.
pub fn encoded_size<T: Serialize>(item: &T) -> usize {
    // Measuring cannot fail for the plain data types used here; count an unmeasurable item as
    // filling a frame so that it travels alone and its encoding error surfaces at send time.
    postcard::serialize_with_flavor(item, postcard::ser_flavors::Size::default())
        .unwrap_or(MAX_PAYLOAD)
}

/// Collects items and hands out batches whose encoding stays within a budget.
#[derive(Debug)]
pub struct SizeBatcher<T> {
    items: Vec<T>,
    size: usize,
    budget: usize,
}

impl<T: Serialize> SizeBatcher<T> {
    /// Batches for a message carrying a `Vec<T>` plus an id, within [`MAX_PAYLOAD`].
    pub fn for_frame() -> Self {
        Self::with_budget(MAX_PAYLOAD - MESSAGE_OVERHEAD)
    }

    pub fn with_budget(budget: usize) -> Self {
        Self {
            items: Vec::new(),
            size: 0,
            budget,
        }
    }

    /// Adds `item`. When it does not fit next to what is held, returns the held batch (to send
    /// now) and starts a new one with `item`. An item bigger than the whole budget travels alone.
    pub fn push(&mut self, item: T) -> Option<Vec<T>> {
        let size = encoded_size(&item);
        let full = if !self.items.is_empty() && self.size + size > self.budget {
            self.take()
        } else {
            None
        };
        self.size += size;
        self.items.push(item);
        full
    }

    /// Everything held, if anything.
    pub fn take(&mut self) -> Option<Vec<T>> {
        self.size = 0;
        if self.items.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.items))
        }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }
}

/// Hands `emit` the `items` in frame-sized batches as they come, so a long listing is never held
/// whole. The first failure, of an item or of `emit`, ends it.
pub fn emit_in_batches<T: Serialize, E>(
    items: impl IntoIterator<Item = Result<T, StreamFailure<E>>>,
    emit: &mut impl FnMut(Vec<T>) -> Result<(), E>,
) -> Result<(), StreamFailure<E>> {
    let mut batcher = SizeBatcher::for_frame();
    for item in items {
        if let Some(batch) = batcher.push(item?) {
            emit(batch).map_err(StreamFailure::Sink)?;
        }
    }
    if let Some(batch) = batcher.take() {
        emit(batch).map_err(StreamFailure::Sink)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_protocol::{DirEntries, DirEntry, FileMetadata, FileType, Message};

    fn entry(name: String) -> DirEntry {
        DirEntry {
            name,
            metadata: FileMetadata {
                file_type: FileType::File,
                size: u64::MAX,
                mode: 0o644,
                uid: u32::MAX,
                gid: u32::MAX,
                mtime_ns: i64::MIN,
                symlink_target: Some("t".repeat(4096)),
            },
        }
    }

    #[test]
    fn batches_fill_frames_without_exceeding_them() {
        let mut batcher = SizeBatcher::for_frame();
        let mut batches = Vec::new();
        let total = 2000;
        for i in 0..total {
            if let Some(batch) = batcher.push(entry(format!("{i:0>200}"))) {
                batches.push(batch);
            }
        }
        batches.extend(batcher.take());
        assert!(batcher.is_empty());
        assert!(
            batches.len() >= 2,
            "2000 entries of ~4.4 KB need several frames"
        );
        let mut count = 0;
        for (n, entries) in batches.into_iter().enumerate() {
            count += entries.len();
            let message = Message::DirEntries(DirEntries {
                id: u64::MAX,
                entries,
            });
            let bytes = message.encode().expect("each batch fits in a frame");
            // Batches other than the last are full: the next entry would not have fit.
            if n == 0 {
                assert!(bytes.len() > MAX_PAYLOAD - 5000, "{}", bytes.len());
            }
        }
        assert_eq!(count, total);
    }

    #[test]
    fn measured_size_is_the_encoded_size() {
        let e = entry("name".into());
        assert_eq!(encoded_size(&e), postcard::to_allocvec(&e).unwrap().len());
    }

    #[test]
    fn an_item_larger_than_the_budget_travels_alone() {
        let mut batcher = SizeBatcher::with_budget(10);
        assert!(batcher.push("a".to_string()).is_none());
        let first = batcher.push("x".repeat(50)).unwrap();
        assert_eq!(first, vec!["a".to_string()]);
        let second = batcher.push("b".to_string()).unwrap();
        assert_eq!(second, vec!["x".repeat(50)]);
        assert_eq!(batcher.len(), 1);
    }
}
