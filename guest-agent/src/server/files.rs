//! The files service's handlers: `ReadFile`, `WriteFile`, `ListDir`, `StatPath`, `MakeDir`,
//! `RemovePath` (logic in `services::file_*`).

use std::io::{self, Read};
use std::time::Duration;

use agentvm_protocol::{
    DirEntries, Done, ListDir, MakeDir, Message, Metadata, ReadFile, RemovePath, StatPath, Stream,
    WriteFile, Written, MAX_CHUNK,
};

use super::context::{InputStream, RequestContext};
use crate::services::file_read::RangeReader;
use crate::services::{file_ops, file_write, ServiceError, StreamFailure};

/// An upload with no data for this long fails instead of holding its temporary file for ever
/// (the host can always `Close` sooner).
pub const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

fn fail(ctx: RequestContext, error: ServiceError) {
    ctx.fail(error.code, error.message)
}

fn done(ctx: RequestContext) {
    let id = ctx.id();
    ctx.finish(Message::Done(Done { id }))
}

/// Ends a streaming request: `Done` on success or when the host went away mid-stream (a
/// `Close` ends the request with its usual final message), an `ErrorMsg` on failure.
fn end_stream<E>(ctx: RequestContext, result: Result<(), StreamFailure<E>>) {
    match result {
        Ok(()) | Err(StreamFailure::Sink(_)) => done(ctx),
        Err(StreamFailure::Request(e)) => fail(ctx, e),
    }
}

pub fn read_file(ctx: RequestContext, request: ReadFile) {
    let mut reader = match RangeReader::open(&request.path, request.offset, request.len) {
        Ok(reader) => reader,
        Err(e) => return fail(ctx, e),
    };
    let metadata = Message::Metadata(Metadata {
        id: ctx.id(),
        metadata: reader.metadata().clone(),
    });
    if ctx.send(&metadata).is_err() {
        return done(ctx);
    }
    let result = reader
        .copy_to(MAX_CHUNK, |chunk| ctx.send_data(Stream::Stdout, chunk))
        .map(|_| ());
    end_stream(ctx, result)
}

/// The request's input as a `Read` that gives up after [`UPLOAD_IDLE_TIMEOUT`] without data.
struct UploadInput<'a>(&'a InputStream);

impl Read for UploadInput<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_timeout(buf, Some(UPLOAD_IDLE_TIMEOUT))
    }
}

pub fn write_file(ctx: RequestContext, request: WriteFile) {
    let result = file_write::write_file(&request, &mut UploadInput(ctx.input()));
    match result {
        Ok(bytes) => {
            let id = ctx.id();
            ctx.finish(Message::Written(Written { id, bytes }))
        }
        Err(e) => fail(ctx, e),
    }
}

pub fn list_dir(ctx: RequestContext, request: ListDir) {
    let id = ctx.id();
    let result = file_ops::list_dir(&request.path, |entries| {
        ctx.send(&Message::DirEntries(DirEntries { id, entries }))
    });
    end_stream(ctx, result)
}

pub fn stat_path(ctx: RequestContext, request: StatPath) {
    match file_ops::stat_path(&request.path, request.follow_symlinks) {
        Ok(metadata) => {
            let id = ctx.id();
            ctx.finish(Message::Metadata(Metadata { id, metadata }))
        }
        Err(e) => fail(ctx, e),
    }
}

pub fn make_dir(ctx: RequestContext, request: MakeDir) {
    match file_ops::make_dir(&request.path, request.parents, request.mode) {
        Ok(()) => done(ctx),
        Err(e) => fail(ctx, e),
    }
}

pub fn remove_path(ctx: RequestContext, request: RemovePath) {
    match file_ops::remove_path(&request.path, request.recursive) {
        Ok(()) => done(ctx),
        Err(e) => fail(ctx, e),
    }
}
