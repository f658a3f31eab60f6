//! The watch request's loop: waits with `poll` on the inotify descriptor and on the request's
//! close signal (no busy or sleeping loop), gathers the events arriving within a short window
//! into one batch, and hands batches that fit in a frame to the sender.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use agentvm_protocol::WatchEvent;

use super::frame_batch::emit_in_batches;
use super::inotify_tree::InotifyTree;
use super::service_error::{os_reason, ServiceError, StreamFailure};
use crate::server::fd::poll_ready;

/// Events arriving this soon after the first of a batch travel with it: a build or a `git
/// checkout` touching thousands of files becomes a few messages, not thousands, at the price of
/// this much latency.
pub const COALESCE: Duration = Duration::from_millis(10);

/// A batch this long is sent without waiting for the window to close, bounding memory under an
/// endless stream of events.
const MAX_PENDING: usize = 4096;

/// How long an idle wait lasts before the loop looks again; only a safety net (a close makes the
/// close signal readable at once).
const IDLE_RECHECK: Duration = Duration::from_secs(60);

/// Runs until `stop` becomes readable (the request's close signal), then sends what is pending
/// and returns. `emit` sends one batch.
pub fn run_watch<E>(
    tree: &mut InotifyTree,
    stop: BorrowedFd<'_>,
    mut emit: impl FnMut(Vec<WatchEvent>) -> Result<(), E>,
) -> Result<(), StreamFailure<E>> {
    let mut pending: Vec<WatchEvent> = Vec::new();
    let mut batch_deadline: Option<Instant> = None;
    loop {
        let timeout = match batch_deadline {
            Some(deadline) => deadline.saturating_duration_since(Instant::now()),
            None => IDLE_RECHECK,
        };
        let ready = poll_ready(
            &[(tree.fd(), libc::POLLIN), (stop, libc::POLLIN)],
            Some(timeout),
        )
        .map_err(|e| {
            ServiceError::new(
                agentvm_protocol::ErrorCode::Io,
                format!("watch: cannot wait for events: {}", os_reason(&e)),
            )
        })?;
        if ready[1] {
            tree.flush_unpaired(&mut pending);
            return emit_in_batches(std::mem::take(&mut pending).into_iter().map(Ok), &mut emit);
        }
        if ready[0] {
            tree.read_events(&mut pending).map_err(|e| {
                ServiceError::new(
                    agentvm_protocol::ErrorCode::Io,
                    format!("watch: cannot read inotify events: {}", os_reason(&e)),
                )
            })?;
            if batch_deadline.is_none() && (!pending.is_empty() || tree.has_unpaired_moves()) {
                batch_deadline = Some(Instant::now() + COALESCE);
            }
        }
        let window_closed = batch_deadline.is_some_and(|d| Instant::now() >= d);
        if window_closed || pending.len() >= MAX_PENDING {
            if window_closed {
                tree.flush_unpaired(&mut pending);
            }
            batch_deadline = None;
            tree.start_new_batch();
            emit_in_batches(std::mem::take(&mut pending).into_iter().map(Ok), &mut emit)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::glob_filter::GlobFilter;
    use std::fs;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;

    #[test]
    fn batches_events_and_stops_on_the_close_signal() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap().to_string();
        let mut tree = InotifyTree::new(&root, true, GlobFilter::default()).unwrap();
        let (stop_tx, stop_rx) = UnixStream::pair().unwrap();
        let (batches_tx, batches_rx) = mpsc::channel();

        let worker = std::thread::spawn(move || {
            let result = run_watch(&mut tree, stop_rx.as_fd(), |batch| batches_tx.send(batch));
            assert!(result.is_ok());
        });
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/file"), b"x").unwrap();
        let mut seen = Vec::new();
        let wanted = WatchEvent::Created {
            path: format!("{root}/sub/file"),
            is_dir: false,
        };
        while !seen.contains(&wanted) {
            let batch = batches_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("a batch within 10 s");
            assert!(!batch.is_empty(), "no empty batches");
            seen.extend(batch);
        }
        assert_eq!(
            seen[0],
            WatchEvent::Created {
                path: format!("{root}/sub"),
                is_dir: true
            }
        );
        drop(stop_tx);
        worker.join().unwrap();
    }

    #[test]
    fn a_gone_sender_ends_the_loop() {
        let dir = tempfile::tempdir().unwrap();
        let mut tree =
            InotifyTree::new(dir.path().to_str().unwrap(), false, GlobFilter::default()).unwrap();
        let (_stop_tx, stop_rx) = UnixStream::pair().unwrap();
        fs::write(dir.path().join("f"), b"").unwrap();
        let result = run_watch(&mut tree, stop_rx.as_fd(), |_| Err("gone"));
        assert!(matches!(result, Err(StreamFailure::Sink("gone"))));
    }

    #[test]
    fn large_batches_are_split_to_fit_frames() {
        let events: Vec<WatchEvent> = (0..400)
            .map(|i| WatchEvent::Modified {
                path: format!("/{}", format!("{i}").repeat(4000 / 3)),
            })
            .collect();
        let mut batches = Vec::new();
        emit_in_batches::<_, ()>(events.into_iter().map(Ok), &mut |b| {
            batches.push(b);
            Ok(())
        })
        .unwrap();
        assert!(batches.len() >= 2);
        for events in &batches {
            let message = agentvm_protocol::Message::WatchEvents(agentvm_protocol::WatchEvents {
                id: 1,
                events: events.clone(),
            });
            message.encode().expect("fits in a frame");
        }
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 400);
    }
}
