//! The API thread's handling of one request from an untrusted client: route matching on any
//! method and path, then the handler with any query and body (every body deserialiser and the
//! controller's validation), against a fresh controller of a VM that has not started. No VMM
//! runs: the channel to the VMM thread is closed, so a request that gets that far is refused
//! there. Also the `--config-file` parser, which reads the same sections. Every refusal must be
//! a 4xx with a message; never a panic, never a 5xx.
#![no_main]

use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::Arbitrary;
use hyper::Method;
use libfuzzer_sys::fuzz_target;
use vmm::api::agent::AgentWorker;
use vmm::api::config_file::ConfigFile;
use vmm::api::controller::Controller;
use vmm::api::fault::Fault;
use vmm::api::handlers::{handle, ApiContext};
use vmm::api::models::{parse_body, SandboxPty};
use vmm::api::pty::PtySessions;
use vmm::api::routes::{resolve, routes, Endpoint};
use vmm::seccomp::{SeccompLevel, ThreadSeccomp};

#[derive(Arbitrary, Debug)]
enum MethodChoice {
    Get,
    Put,
    Patch,
    Post,
    Delete,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum PathChoice {
    /// One of the API's routes, its `{param}` segment (if any) replaced by `param`.
    Route {
        index: u8,
        param: String,
    },
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Input {
    Request {
        method: MethodChoice,
        path: PathChoice,
        query: Option<String>,
        body: Vec<u8>,
    },
    ConfigFile(Vec<u8>),
}

fn method(choice: MethodChoice) -> Option<Method> {
    Some(match choice {
        MethodChoice::Get => Method::GET,
        MethodChoice::Put => Method::PUT,
        MethodChoice::Patch => Method::PATCH,
        MethodChoice::Post => Method::POST,
        MethodChoice::Delete => Method::DELETE,
        // hyper refuses what is not a token before a request reaches the API.
        MethodChoice::Other(name) => Method::from_bytes(name.as_bytes()).ok()?,
    })
}

fn path(choice: PathChoice) -> String {
    match choice {
        PathChoice::Route { index, param } => {
            let table = routes();
            let template = table[usize::from(index) % table.len()].path;
            match (template.find('{'), template.find('}')) {
                (Some(open), Some(close)) => {
                    format!("{}{param}{}", &template[..open], &template[close + 1..])
                }
                _ => template.to_string(),
            }
        }
        PathChoice::Raw(path) => path,
    }
}

/// The job threads' spawner, started once (the API server starts one per VMM too).
fn agent() -> &'static AgentWorker {
    static AGENT: OnceLock<AgentWorker> = OnceLock::new();
    AGENT.get_or_init(|| {
        AgentWorker::start(ThreadSeccomp {
            level: SeccompLevel::Off,
            test_violation: false,
        })
        .expect("agent job thread")
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("tokio runtime")
    })
}

fn check_refusal(fault: &Fault, what: &str) {
    assert!(
        fault.status.is_client_error(),
        "{what}: refused with {} ({}), not a 4xx",
        fault.status,
        fault.message
    );
    assert!(
        !fault.message.is_empty(),
        "{what}: refused without a message"
    );
}

fuzz_target!(|input: Input| {
    let (method, path, query, body) = match input {
        Input::ConfigFile(text) => {
            let _ = ConfigFile::parse(&text);
            return;
        }
        Input::Request {
            method: m,
            path: p,
            query,
            body,
        } => match method(m) {
            Some(m) => (m, path(p), query, body),
            None => return,
        },
    };
    let what = format!("{method} {path}");
    let route = match resolve(&method, &path) {
        Ok(route) => route,
        Err(fault) => return check_refusal(&fault, &what),
    };
    // These three are served with their connection (a streamed body or an upgrade); what they
    // parse from a body is `SandboxPty`, checked here, and headers, which the fuzzer cannot
    // reach without hyper.
    match route.endpoint {
        Endpoint::SandboxPty => {
            if let Err(fault) = parse_body::<SandboxPty>(&what, &body) {
                check_refusal(&fault, &what);
            }
            return;
        }
        Endpoint::PutSandboxFile | Endpoint::ConnectSandboxPort => return,
        _ => {}
    }
    let (vmm_thread, closed) = channel();
    drop(closed);
    let ctx = ApiContext {
        controller: Arc::new(Mutex::new(Controller::new(
            "fuzz".into(),
            SeccompLevel::Off,
            0,
        ))),
        vmm_thread,
        agent: agent().clone(),
        pty_sessions: PtySessions::default(),
    };
    let label = route.path;
    let result = runtime().block_on(handle(&ctx, route, query.as_deref(), &body, None));
    let status = match &result {
        Ok(_) => 200,
        Err(fault) => {
            check_refusal(fault, &what);
            fault.status.as_u16()
        }
    };
    ctx.controller
        .lock()
        .unwrap()
        .count_request(&method, label, status);
});
