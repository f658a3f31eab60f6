//! One job: compile the module, instantiate it with the host functions, call the function, report.
//!
//! Host functions, imported from module `agentvm`:
//! - `log(ptr: i32, len: i32)`: a UTF-8 message for the host's log;
//! - `kv_get(key_ptr, key_len, val_ptr, val_cap) -> i32`: the value's length (copying at most
//!   `val_cap` bytes), or -1 when the key is absent;
//! - `kv_put(key_ptr, key_len, val_ptr, val_len) -> i32`: 0, or -1 when the store is full;
//! - `fetch(req_ptr, req_len, resp_ptr, resp_cap) -> i32`: an HTTP(S) request the host makes
//!   under its egress policy (the same policy, rule counters and audit log as a microVM's NIC;
//!   credential headers of the matching rule replace the module's own). The request is text, an
//!   HTTP/1.1 request head with the absolute URL in the request line:
//!   `METHOD URL\r\nName: value\r\n...\r\n\r\nBODY` (the blank line is optional without a
//!   body; `Host`, `Content-Length`, `Connection` and `Transfer-Encoding` are the host's to write,
//!   and a request setting one is a bad request). Redirects are not followed. On success the
//!   response's length is returned and its first `resp_cap` bytes written to `resp` as
//!   `STATUS\r\nname: value\r\n...\r\n\r\nBODY` (call again with a larger buffer when the
//!   length exceeds `resp_cap`: each call is a new request). On failure: -1 denied by the egress
//!   policy, -2 bad request, -3 network failure (DNS, connect, TLS, timeout), -4 response too
//!   large (it must fit the 1 MiB mailbox with its headers); the reason is copied into `resp`
//!   (up to `resp_cap`) and logged to the isolate's log.
//!
//! Pointers are into the module's exported `memory`; a range outside it traps.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use isolate_abi::{BootInfo, ErrorKind, FetchAnswer, FetchStatus, Job, Value};
use wasmi::{
    Caller, Config, Engine, Extern, Linker, Module, Store, StoreLimits, StoreLimitsBuilder, Val,
    ValType,
};

use crate::http_text::{write_response, CappedOutput, TextRequest};
use crate::hypercall::{self, fail};

const WASM_PAGE: usize = 64 << 10;
const HOST_MODULE: &str = "agentvm";

struct HostState {
    limits: StoreLimits,
}

pub fn engine() -> Engine {
    Engine::new(&Config::default())
}

pub fn run(engine: &Engine, boot: &BootInfo) -> ! {
    // SAFETY: the host wrote the job into [input, input+input_size), guest RAM reserved for it, and
    // does not touch it while the guest runs.
    let input =
        unsafe { core::slice::from_raw_parts(boot.input as *const u8, boot.input_size as usize) };
    let job = match Job::decode(input) {
        Ok(job) => job,
        Err(e) => fail(
            ErrorKind::BadJob,
            format_args!("cannot decode the job: {e}"),
        ),
    };
    let module = match Module::new(engine, job.module) {
        Ok(m) => m,
        Err(e) => fail(ErrorKind::InvalidModule, format_args!("{e}")),
    };
    let limits = StoreLimitsBuilder::new()
        .memory_size(boot.max_wasm_pages as usize * WASM_PAGE)
        .build();
    let mut store = Store::new(engine, HostState { limits });
    store.limiter(|state| &mut state.limits);
    let linker = host_functions(engine);
    let instance = match linker.instantiate_and_start(&mut store, &module) {
        Ok(i) => i,
        Err(e) => fail(ErrorKind::Instantiate, format_args!("{e}")),
    };
    let Some(func) = instance.get_func(&store, job.function) else {
        let exports: Vec<String> = module
            .exports()
            .filter(|e| e.ty().func().is_some())
            .map(|e| e.name().to_string())
            .collect();
        fail(
            ErrorKind::MissingExport,
            format_args!(
                "the module exports no function '{}' (its functions: {})",
                job.function,
                if exports.is_empty() {
                    "none".to_string()
                } else {
                    exports.join(", ")
                }
            ),
        );
    };
    let ty = func.ty(&store);
    if ty.params().len() != job.args.len() {
        fail(
            ErrorKind::BadArguments,
            format_args!(
                "'{}' takes {} argument(s) ({}), {} given",
                job.function,
                ty.params().len(),
                type_list(ty.params()),
                job.args.len()
            ),
        );
    }
    let mut params = Vec::with_capacity(ty.params().len());
    for (i, (arg, ty)) in job.args.iter().zip(ty.params()).enumerate() {
        let text = match arg {
            Ok(t) => t,
            Err(e) => fail(ErrorKind::BadJob, format_args!("argument {i}: {e}")),
        };
        match parse_arg(text, *ty) {
            Ok(v) => params.push(v),
            Err(why) => fail(
                ErrorKind::BadArguments,
                format_args!("argument {} ({text:?}): {why}", i + 1),
            ),
        }
    }
    let mut results: Vec<Val> = ty
        .results()
        .iter()
        .map(|t| Val::default_for_ty(*t))
        .collect();
    if let Err(e) = func.call(&mut store, &params, &mut results) {
        // wasmi grows its stacks and tables fallibly and traps when the heap is exhausted: that
        // is this isolate's memory running out, not a bug of the module.
        if e.as_trap_code() == Some(wasmi::TrapCode::OutOfSystemMemory) {
            fail(
                ErrorKind::OutOfMemory,
                format_args!(
                    "the guest heap is exhausted while running '{}' ({e})",
                    job.function
                ),
            );
        }
        fail(ErrorKind::Trap, format_args!("{e}"));
    }
    let mut values = Vec::with_capacity(results.len());
    for r in &results {
        match r {
            Val::I32(v) => values.push(Value::I32(*v)),
            Val::I64(v) => values.push(Value::I64(*v)),
            Val::F32(v) => values.push(Value::F32(f32::from(*v))),
            Val::F64(v) => values.push(Value::F64(f64::from(*v))),
            other => fail(
                ErrorKind::BadArguments,
                format_args!(
                    "'{}' returns a {:?}, which cannot leave the isolate",
                    job.function,
                    other.ty()
                ),
            ),
        }
    }
    hypercall::result(&values)
}

fn type_list(types: &[ValType]) -> String {
    let names: Vec<String> = types
        .iter()
        .map(|t| format!("{t:?}").to_lowercase())
        .collect();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

fn parse_arg(text: &str, ty: ValType) -> Result<Val, String> {
    let bad = |e: &dyn core::fmt::Display| {
        format!("not a valid {}: {e}", format!("{ty:?}").to_lowercase())
    };
    Ok(match ty {
        ValType::I32 => Val::I32(text.parse::<i32>().map_err(|e| bad(&e))?),
        ValType::I64 => Val::I64(text.parse::<i64>().map_err(|e| bad(&e))?),
        ValType::F32 => Val::F32(text.parse::<f32>().map_err(|e| bad(&e))?.into()),
        ValType::F64 => Val::F64(text.parse::<f64>().map_err(|e| bad(&e))?.into()),
        other => {
            return Err(format!(
                "parameters of type {other:?} cannot be passed from the host"
            ))
        }
    })
}

/// The bytes `[ptr, ptr+len)` of the caller's memory, or a trap.
fn memory_range(
    caller: &Caller<'_, HostState>,
    ptr: i32,
    len: i32,
) -> Result<(wasmi::Memory, usize, usize), wasmi::Error> {
    let memory = caller
        .get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or_else(|| {
            wasmi::Error::new("host call needs the module to export its memory as 'memory'")
        })?;
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    let end = start
        .checked_add(len)
        .filter(|&e| e <= memory.data_size(caller));
    match end {
        Some(_) => Ok((memory, start, len)),
        None => Err(wasmi::Error::new(format!(
            "host call: range {start}+{len} is outside the module's memory"
        ))),
    }
}

fn host_functions(engine: &Engine) -> Linker<HostState> {
    let mut linker = Linker::new(engine);
    // Names are distinct, so these registrations cannot clash.
    let _ = linker.func_wrap(
        HOST_MODULE,
        "log",
        |caller: Caller<'_, HostState>, ptr: i32, len: i32| -> Result<(), wasmi::Error> {
            let (memory, start, len) = memory_range(&caller, ptr, len)?;
            hypercall::log(&memory.data(&caller)[start..start + len]);
            Ok(())
        },
    );
    let _ = linker.func_wrap(
        HOST_MODULE,
        "kv_get",
        |mut caller: Caller<'_, HostState>,
         kptr: i32,
         klen: i32,
         vptr: i32,
         vcap: i32|
         -> Result<i32, wasmi::Error> {
            let (memory, kstart, klen) = memory_range(&caller, kptr, klen)?;
            let (_, vstart, vcap) = memory_range(&caller, vptr, vcap)?;
            let key: Vec<u8> = memory.data(&caller)[kstart..kstart + klen].to_vec();
            let data = memory.data_mut(&mut caller);
            hypercall::kv_get(&key, |value| match value {
                None => -1,
                Some(v) => {
                    let n = v.len().min(vcap);
                    data[vstart..vstart + n].copy_from_slice(&v[..n]);
                    v.len() as i32
                }
            })
            .map_err(wasmi::Error::new)
        },
    );
    let _ = linker.func_wrap(
        HOST_MODULE,
        "kv_put",
        |caller: Caller<'_, HostState>,
         kptr: i32,
         klen: i32,
         vptr: i32,
         vlen: i32|
         -> Result<i32, wasmi::Error> {
            let (memory, kstart, klen) = memory_range(&caller, kptr, klen)?;
            let (_, vstart, vlen) = memory_range(&caller, vptr, vlen)?;
            let data = memory.data(&caller);
            let stored =
                hypercall::kv_put(&data[kstart..kstart + klen], &data[vstart..vstart + vlen])
                    .map_err(wasmi::Error::new)?;
            Ok(if stored { 0 } else { -1 })
        },
    );
    let _ = linker.func_wrap(
        HOST_MODULE,
        "fetch",
        |mut caller: Caller<'_, HostState>,
         req_ptr: i32,
         req_len: i32,
         resp_ptr: i32,
         resp_cap: i32|
         -> Result<i32, wasmi::Error> {
            let (memory, req_start, req_len) = memory_range(&caller, req_ptr, req_len)?;
            let (_, resp_start, resp_cap) = memory_range(&caller, resp_ptr, resp_cap)?;
            let outcome = send_fetch(&memory.data(&caller)[req_start..req_start + req_len]);
            let resp = &mut memory.data_mut(&mut caller)[resp_start..resp_start + resp_cap];
            Ok(match outcome {
                Ok(response) => {
                    let mut out = CappedOutput::new(resp);
                    write_response(
                        &mut out,
                        response.status,
                        response.headers.iter().map(|(n, v)| (&n[..], &v[..])),
                        &response.body,
                    );
                    i32::try_from(out.total()).unwrap_or(i32::MAX)
                }
                Err((status, reason)) => {
                    let mut log = Vec::with_capacity(reason.len() + 14);
                    log.extend_from_slice(b"fetch failed: ");
                    log.extend_from_slice(reason.as_bytes());
                    hypercall::log(&log);
                    CappedOutput::new(resp).put(reason.as_bytes());
                    status.wasm_code()
                }
            })
        },
    );
    linker
}

/// A response copied out of the mailbox.
struct FetchedResponse {
    status: u16,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
}

/// Parses the module's text request, has the host make it, and copies the answer out of the
/// mailbox (the log call that may follow reuses the mailbox).
fn send_fetch(text: &[u8]) -> Result<FetchedResponse, (FetchStatus, String)> {
    let bad = |why: &str| (FetchStatus::BadRequest, why.to_string());
    let request = TextRequest::parse(text).map_err(bad)?;
    let count = request.header_count();
    let sent = hypercall::fetch(
        |w| {
            isolate_abi::fetch::encode_request(
                w,
                request.method,
                request.url,
                count,
                request.headers().filter_map(Result::ok),
                request.body,
            )
        },
        |answer| match answer {
            Ok(FetchAnswer::Response {
                status,
                header_count,
                headers,
                body,
            }) => Ok(FetchedResponse {
                status,
                headers: FetchAnswer::headers(headers, header_count)
                    .map(|(n, v)| (n.to_vec(), v.to_vec()))
                    .collect(),
                body: body.to_vec(),
            }),
            Ok(FetchAnswer::Failed { status, message }) => {
                Err((status, String::from_utf8_lossy(message).into_owned()))
            }
            Err(e) => Err((
                FetchStatus::Network,
                format!("the host's answer is malformed: {e}"),
            )),
        },
    );
    match sent {
        Ok(result) => result,
        Err(_) => Err(bad(
            "the request (URL, headers and body) is larger than the 1 MiB mailbox",
        )),
    }
}
