//! The host's side of the guest's calls (see `isolate_abi::Call`): payloads are read from and
//! answers written to the mailbox while the vCPU is stopped in the exit.

use std::collections::HashMap;
use std::time::Instant;

use egress::fetch::{FetchError, FetchRequest, FetchResponse};
use isolate_abi::fetch::{encode_response, FetchRequestView, FetchStatus};
use isolate_abi::{layout, Call, ErrorKind, Reader, Value, Writer};

use super::ram::GuestRam;
use super::IsolateError;

/// The key/value store the guest's `kv_get`/`kv_put` reach: per caller (a sandbox, a CLI run),
/// bounded in total size.
#[derive(Debug, Clone)]
pub struct KvStore {
    entries: HashMap<Vec<u8>, Vec<u8>>,
    bytes: usize,
    max_bytes: usize,
}

impl KvStore {
    pub fn new(max_bytes: usize) -> Self {
        KvStore {
            entries: HashMap::new(),
            bytes: 0,
            max_bytes,
        }
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.entries.get(key).map(Vec::as_slice)
    }

    /// False (and nothing stored) when the store would exceed its size.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> bool {
        let old = self.entries.get(key).map_or(0, |v| key.len() + v.len());
        let new_total = self.bytes - old + key.len() + value.len();
        if new_total > self.max_bytes {
            return false;
        }
        self.entries.insert(key.to_vec(), value.to_vec());
        self.bytes = new_total;
        true
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What the run loop does after a call.
pub enum After {
    Resume,
    Finished(Result<Vec<Value>, IsolateError>),
}

/// Makes a guest's fetch under an egress policy, giving up at the deadline (the job's wall-clock
/// limit). The CLI's runs it on a fetcher thread of its own (see `vmm::isolate::fetch_thread`).
pub type FetchFn<'a> = dyn FnMut(&FetchRequest, Instant) -> Result<FetchResponse, FetchError> + 'a;

/// The caller's side of a run: its key/value store, where guest log lines go, and how its
/// fetches are made (None: every fetch is denied, as there is no egress policy).
pub struct HostContext<'a> {
    pub kv: &'a mut KvStore,
    pub log: &'a mut dyn FnMut(&str),
    pub fetch: Option<&'a mut FetchFn<'a>>,
}

/// The denial of a fetch in a context without an egress policy.
pub const NO_FETCH_POLICY: &str = "fetch needs an egress policy (--egress-policy)";

/// Largest response body a fetch may bring back: the mailbox less room for the answer's status
/// and headers (a response whose headers take more is refused as too large when encoded).
pub const FETCH_MAX_RESPONSE_BYTES: usize =
    layout::MAILBOX_SIZE as usize - 2 * egress::fetch::MAX_HEAD;

/// Largest value the guest can read back in one answer: the mailbox minus the two u32 headers.
const MAX_VALUE: usize = layout::MAILBOX_SIZE as usize - 8;

/// Answers one call; `deadline` bounds any wait (a fetch) inside it.
pub fn handle(
    call: u32,
    ram: &mut GuestRam,
    ctx: &mut HostContext<'_>,
    deadline: Instant,
) -> After {
    match handle_inner(call, ram, ctx, deadline) {
        Ok(after) => after,
        Err(e) => After::Finished(Err(e)),
    }
}

fn protocol(what: impl std::fmt::Display) -> IsolateError {
    IsolateError::Crashed(format!("bad host call: {what}"))
}

/// The first `len` payload bytes after a u32 length at `offset` in the mailbox.
fn mailbox_bytes(ram: &GuestRam, offset: u64) -> Result<(Vec<u8>, u64), IsolateError> {
    let mut len = [0u8; 4];
    ram.read(layout::MAILBOX + offset, &mut len)
        .map_err(protocol)?;
    let len = u32::from_le_bytes(len) as u64;
    if offset + 4 + len > layout::MAILBOX_SIZE {
        return Err(protocol(format!("a {len}-byte field overruns the mailbox")));
    }
    let bytes = ram
        .read_vec(layout::MAILBOX + offset + 4, len as usize)
        .map_err(protocol)?;
    Ok((bytes, offset + 4 + len))
}

/// Writes an answer of `len` bytes (at most the mailbox) into the mailbox.
fn answer(
    ram: &mut GuestRam,
    len: usize,
    write: impl FnOnce(&mut Writer<'_>) -> Result<(), isolate_abi::encoding::Full>,
) -> Result<(), IsolateError> {
    let mut buf = vec![0u8; len.min(layout::MAILBOX_SIZE as usize)];
    let mut w = Writer::new(&mut buf);
    write(&mut w).map_err(|_| protocol("the answer does not fit the mailbox"))?;
    let n = w.len();
    ram.write(layout::MAILBOX, &buf[..n]).map_err(protocol)
}

fn handle_inner(
    call: u32,
    ram: &mut GuestRam,
    ctx: &mut HostContext<'_>,
    deadline: Instant,
) -> Result<After, IsolateError> {
    let call =
        Call::from_u32(call).ok_or_else(|| protocol(format!("unknown call number {call}")))?;
    match call {
        // Seen again when a template's vCPU, saved in this exit, re-executes it.
        Call::Ready => Ok(After::Resume),
        Call::Log => {
            let (msg, _) = mailbox_bytes(ram, 0)?;
            (ctx.log)(&String::from_utf8_lossy(&msg));
            Ok(After::Resume)
        }
        Call::KvGet => {
            let (key, _) = mailbox_bytes(ram, 0)?;
            match ctx.kv.get(&key) {
                Some(v) if v.len() <= MAX_VALUE => {
                    answer(ram, 8 + v.len(), |w| w.u32(1).and_then(|_| w.bytes(v)))?;
                }
                _ => answer(ram, 4, |w| w.u32(0))?,
            }
            Ok(After::Resume)
        }
        Call::KvPut => {
            let (key, next) = mailbox_bytes(ram, 0)?;
            let (value, _) = mailbox_bytes(ram, next)?;
            let stored = value.len() <= MAX_VALUE && ctx.kv.put(&key, &value);
            answer(ram, 4, |w| w.u32(u32::from(stored)))?;
            Ok(After::Resume)
        }
        Call::Fetch => {
            let payload = ram
                .read_vec(layout::MAILBOX, layout::MAILBOX_SIZE as usize)
                .map_err(protocol)?;
            let answer = fetch_answer(&payload, ctx, deadline);
            ram.write(layout::MAILBOX, &answer).map_err(protocol)?;
            Ok(After::Resume)
        }
        Call::Result => {
            let mut count = [0u8; 4];
            ram.read(layout::MAILBOX, &mut count).map_err(protocol)?;
            let count = u32::from_le_bytes(count) as usize;
            // 9 bytes per value (tag + bits); wasm functions return a handful.
            if 4 + count * 9 > layout::MAILBOX_SIZE as usize {
                return Err(protocol(format!("{count} results overrun the mailbox")));
            }
            let bytes = ram
                .read_vec(layout::MAILBOX + 4, count * 9)
                .map_err(protocol)?;
            let mut r = Reader::new(&bytes);
            let values = (0..count)
                .map(|_| r.value().map_err(protocol))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(After::Finished(Ok(values)))
        }
        Call::Error => {
            let mut head = [0u8; 8];
            ram.read(layout::MAILBOX, &mut head).map_err(protocol)?;
            let kind = u32::from_le_bytes(head[..4].try_into().unwrap_or_default());
            let len = (u32::from_le_bytes(head[4..].try_into().unwrap_or_default()) as usize)
                .min(layout::MAILBOX_SIZE as usize - 8);
            let msg = ram.read_vec(layout::MAILBOX + 8, len).map_err(protocol)?;
            let msg = String::from_utf8_lossy(&msg).into_owned();
            let err = match ErrorKind::from_u32(kind) {
                Some(ErrorKind::InvalidModule) => IsolateError::InvalidModule(msg),
                Some(ErrorKind::Instantiate) => IsolateError::Instantiate(msg),
                Some(ErrorKind::MissingExport) => IsolateError::MissingExport(msg),
                Some(ErrorKind::BadArguments) => IsolateError::BadArguments(msg),
                Some(ErrorKind::Trap) => IsolateError::Trap(msg),
                Some(ErrorKind::OutOfMemory) => IsolateError::OutOfMemory(msg),
                Some(ErrorKind::BadJob) => {
                    IsolateError::Crashed(format!("the guest could not read its job: {msg}"))
                }
                Some(ErrorKind::Panic) => IsolateError::Crashed(format!("guest panic: {msg}")),
                None => IsolateError::Crashed(format!("error of unknown kind {kind}: {msg}")),
            };
            Ok(After::Finished(Err(err)))
        }
    }
}

/// The encoded answer to a fetch whose payload is `payload` (the mailbox).
fn fetch_answer(payload: &[u8], ctx: &mut HostContext<'_>, deadline: Instant) -> Vec<u8> {
    let result = match FetchRequestView::decode(payload) {
        Ok(view) => {
            let request = FetchRequest {
                method: view.method.to_string(),
                url: view.url.to_string(),
                headers: view
                    .headers()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
                body: view.body.to_vec(),
            };
            match ctx.fetch.as_mut() {
                Some(fetch) => fetch(&request, deadline),
                None => Err(FetchError::Denied(NO_FETCH_POLICY.into())),
            }
        }
        Err(e) => Err(FetchError::BadRequest(format!(
            "the request does not decode: {e}"
        ))),
    };
    let mut buf = vec![0u8; layout::MAILBOX_SIZE as usize];
    let response = match result {
        Ok(response) => response,
        Err(error) => return fetch_failure(&mut buf, &error),
    };
    let headers: Vec<(&str, &str)> = response
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let mut w = Writer::new(&mut buf);
    if encode_response(&mut w, response.status, &headers, &response.body).is_err() {
        let error = FetchError::TooLarge(format!(
            "the response ({} headers, {} body bytes) does not fit the isolate's {} KiB mailbox",
            headers.len(),
            response.body.len(),
            layout::MAILBOX_SIZE >> 10
        ));
        return fetch_failure(&mut buf, &error);
    }
    let n = w.len();
    buf.truncate(n);
    buf
}

fn fetch_failure(buf: &mut Vec<u8>, error: &FetchError) -> Vec<u8> {
    let status = match error {
        FetchError::Denied(_) => FetchStatus::Denied,
        FetchError::BadRequest(_) => FetchStatus::BadRequest,
        FetchError::Network(_) | FetchError::Timeout(_) => FetchStatus::Network,
        FetchError::TooLarge(_) => FetchStatus::TooLarge,
    };
    let message = error.to_string();
    let cut = message.len().min(buf.len() - 8);
    let mut w = Writer::new(buf);
    // Cannot fail: the message was cut to leave room for the two words.
    let _ = w.u32(status as u32);
    let _ = w.bytes(&message.as_bytes()[..cut]);
    let n = w.len();
    buf.truncate(n);
    std::mem::take(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_refuses_growth_beyond_its_size_but_allows_replacing() {
        let mut kv = KvStore::new(10);
        assert!(kv.put(b"a", b"12345"));
        assert!(!kv.put(b"b", b"123456"), "6 + 1 more bytes exceed 10");
        assert!(kv.put(b"a", b"123456789"), "replacing frees the old value");
        assert_eq!(kv.get(b"a"), Some(&b"123456789"[..]));
        assert_eq!(kv.get(b"b"), None);
        assert_eq!(kv.len(), 1);
    }
}
