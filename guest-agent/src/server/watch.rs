//! The watch service's handler: `WatchStart` → `Ready`, `WatchEvents`..., `Done` after `Close`
//! (logic in `services::{glob_filter, inotify_tree, watch_loop}`).

use agentvm_protocol::{Done, Message, Ready, WatchEvents, WatchStart};

use super::context::RequestContext;
use crate::services::glob_filter::GlobFilter;
use crate::services::inotify_tree::InotifyTree;
use crate::services::watch_loop::run_watch;
use crate::services::StreamFailure;

pub fn watch(ctx: RequestContext, request: WatchStart) {
    let id = ctx.id();
    let set_up = GlobFilter::new(&request.include, &request.exclude)
        .and_then(|filter| InotifyTree::new(&request.path, request.recursive, filter));
    let mut tree = match set_up {
        Ok(tree) => tree,
        Err(e) => return ctx.fail(e.code, e.message),
    };
    let close = ctx.on_close();
    let result = match ctx.send(&Message::Ready(Ready { id })) {
        Ok(()) => run_watch(&mut tree, close.fd(), |events| {
            ctx.send(&Message::WatchEvents(WatchEvents { id, events }))
        }),
        Err(gone) => Err(StreamFailure::Sink(gone)),
    };
    // Watches go before the final message: once the host sees Done, nothing is watched.
    drop(tree);
    match result {
        Ok(()) | Err(StreamFailure::Sink(_)) => ctx.finish(Message::Done(Done { id })),
        Err(StreamFailure::Request(e)) => ctx.fail(e.code, e.message),
    }
}
