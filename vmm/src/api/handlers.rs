//! From a routed request with its body to an answer: parse the body, check and update the
//! controller, and hand the VMM thread what only it may do.

use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use super::agent::AgentWorker;
use super::audit::Peer;
use super::controller::Controller;
use super::fault::Fault;
use super::models::{
    parse_body, Action, ActionType, AuditLogConfig, BootSource, Logger, MachineConfig,
    MachineConfigPatch, Metrics, NetworkInterface, SnapshotCreate, SnapshotLoad, VmPatch,
    VmStateRequest, Vsock,
};
use super::pty::{self, PtySessions};
use super::routes::{Endpoint, Matched};
use super::sandbox;
use super::watch;
use crate::config::VmConfig;
use crate::exit::{ControlRequest, VcpuControl, VmmEvent};

/// Work for the VMM thread (the process's main thread), which owns the VM.
pub enum VmmRequest {
    Start {
        config: VmConfig,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Logger {
        config: Logger,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Open `path` for appending (created if missing): the metrics file, the audit log.
    /// `what` names the field in errors.
    OpenForAppend {
        path: PathBuf,
        what: &'static str,
        reply: oneshot::Sender<Result<File, String>>,
    },
    /// PUT /egress/audit-log: check the NIC's audit log can be opened for appending (created
    /// 0600 if missing, as the egress filter creates it), which the boot then does again.
    CheckEgressAuditLog {
        path: PathBuf,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// PUT /snapshot/load: build the VM from a snapshot instead of booting it.
    LoadSnapshot {
        config: crate::vmm::RestoreConfig,
        reply: oneshot::Sender<Result<(), String>>,
        /// Runs the after-restore step once the loaded VM runs (see [`super::after_restore`]).
        agent: super::agent::AgentWorker,
    },
}

/// Every response body: whole (`Full`) or streamed from a job thread (`/sandbox/...`).
pub type ApiBody = http_body_util::combinators::BoxBody<hyper::body::Bytes, std::io::Error>;

/// A successful answer.
pub enum Reply {
    /// 204, as Firecracker answers every successful PUT and PATCH.
    NoContent,
    /// 200 with this JSON body.
    Json(String),
    /// 200 with this Prometheus text.
    Prometheus(String),
    /// 200 with a body streamed as it is produced (chunked transfer encoding).
    Stream {
        content_type: &'static str,
        body: ApiBody,
    },
    /// 101: the connection now carries `protocol` (see [`super::upgrade`]).
    SwitchingProtocols {
        protocol: &'static str,
        /// `X-Agentvm-Pty-Id` of a terminal session.
        pty_id: Option<u64>,
    },
}

pub type SharedController = Arc<Mutex<Controller>>;

/// What every request handler reaches.
#[derive(Clone)]
pub struct ApiContext {
    pub controller: SharedController,
    pub vmm_thread: Sender<VmmRequest>,
    /// Job threads for the `/sandbox/...` requests (see [`super::agent`]).
    pub agent: AgentWorker,
    /// Terminal sessions of `/sandbox/pty`.
    pub pty_sessions: PtySessions,
}

/// Hang detectors for work on other threads: booting (loading a kernel) and pausing (the VMM
/// kicks vCPUs for up to 5 s) both finish far sooner.
const BOOT_REPLY_TIMEOUT: Duration = Duration::from_secs(120);
const VMM_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

pub fn lock(controller: &SharedController) -> MutexGuard<'_, Controller> {
    // The controller's fields stay consistent between statements; a panic elsewhere while holding
    // the lock must not take the API down with it.
    controller.lock().unwrap_or_else(|e| e.into_inner())
}

/// Answers every request but `PUT /sandbox/files`, whose body [`sandbox::put_file`] streams, and
/// the upgrades (`POST /sandbox/pty`, `POST /sandbox/ports/{port}/connect`), which need the
/// request itself. `peer`: who sent it (for the exec audit log), if the socket told.
pub async fn handle(
    ctx: &ApiContext,
    route: Matched,
    query: Option<&str>,
    body: &[u8],
    peer: Option<Peer>,
) -> Result<Reply, Fault> {
    match route.endpoint {
        Endpoint::SandboxExec => sandbox::exec(ctx, body, peer).await,
        Endpoint::GetSandboxFile => sandbox::get_file(ctx, query).await,
        Endpoint::ListSandboxFiles => sandbox::list_files(ctx, query).await,
        Endpoint::SandboxWatch => watch::watch(ctx, query).await,
        Endpoint::GetSandboxPty => pty::status(ctx, route.param.as_deref()),
        Endpoint::ResizeSandboxPty => pty::resize(ctx, route.param.as_deref(), body).await,
        Endpoint::PutSandboxFile | Endpoint::SandboxPty | Endpoint::ConnectSandboxPort => Err(
            Fault::internal("this request is served with its connection, not here"),
        ),
        Endpoint::PutEgressPolicy => super::egress_policy::put_policy(ctx, body).await,
        Endpoint::GetEgressPolicy => super::egress_policy::get_policy(ctx),
        Endpoint::PutEgressAuditLog => super::egress_policy::put_audit_log(ctx, body).await,
        Endpoint::GetInstanceInfo => json(&lock(&ctx.controller).info()),
        Endpoint::GetMetrics => Ok(Reply::Prometheus(
            lock(&ctx.controller).metrics().prometheus(),
        )),
        Endpoint::GetMachineConfig => json(&lock(&ctx.controller).machine_config()),
        Endpoint::PutBootSource => {
            let source: BootSource = parse_body("PUT /boot-source", body)?;
            lock(&ctx.controller).put_boot_source(source)?;
            Ok(Reply::NoContent)
        }
        Endpoint::PutMachineConfig => {
            let config: MachineConfig = parse_body("PUT /machine-config", body)?;
            lock(&ctx.controller).put_machine_config(config)?;
            Ok(Reply::NoContent)
        }
        Endpoint::PatchMachineConfig => {
            let patch: MachineConfigPatch = parse_body("PATCH /machine-config", body)?;
            lock(&ctx.controller).patch_machine_config(patch)?;
            Ok(Reply::NoContent)
        }
        Endpoint::PutVsock => {
            let vsock: Vsock = parse_body("PUT /vsock", body)?;
            lock(&ctx.controller).put_vsock(vsock)?;
            Ok(Reply::NoContent)
        }
        Endpoint::PutNetworkInterface => {
            let iface: NetworkInterface = parse_body("PUT /network-interfaces", body)?;
            let id = route.param.unwrap_or_default();
            lock(&ctx.controller).put_network_interface(&id, iface)?;
            Ok(Reply::NoContent)
        }
        Endpoint::PutSnapshotCreate => {
            let request: SnapshotCreate = parse_body("PUT /snapshot/create", body)?;
            super::snapshot::create(ctx, request).await
        }
        Endpoint::PutSnapshotLoad => {
            let request: SnapshotLoad = parse_body("PUT /snapshot/load", body)?;
            super::snapshot::load(ctx, request).await
        }
        Endpoint::PutActions => {
            let action: Action = parse_body("PUT /actions", body)?;
            match action.action_type {
                ActionType::InstanceStart => instance_start(ctx).await,
                ActionType::FlushMetrics => {
                    lock(&ctx.controller).flush_metrics()?;
                    Ok(Reply::NoContent)
                }
                ActionType::SendCtrlAltDel => Err(Fault::bad_request(
                    "SendCtrlAltDel is not supported: agentvm's i8042 emulates only the reset \
                     line (vm-superio's I8042Device has no keyboard buffer and raises no IRQ 1), \
                     so it cannot deliver a key sequence; stop the guest from inside, or end the \
                     VMM with SIGTERM",
                )),
            }
        }
        Endpoint::PatchVm => {
            let patch: VmPatch = parse_body("PATCH /vm", body)?;
            pause_or_resume(ctx, patch.state == VmStateRequest::Paused).await
        }
        Endpoint::PutLogger => {
            let config: Logger = parse_body("PUT /logger", body)?;
            lock(&ctx.controller).require_not_started("PUT /logger")?;
            let (reply, answer) = oneshot::channel();
            send_to_vmm(ctx, VmmRequest::Logger { config, reply })?;
            await_reply(answer, VMM_REPLY_TIMEOUT, "PUT /logger")
                .await?
                .map_err(|e| Fault::bad_request(format!("PUT /logger: {e}")))?;
            Ok(Reply::NoContent)
        }
        Endpoint::PutMetrics => {
            let metrics: Metrics = parse_body("PUT /metrics", body)?;
            lock(&ctx.controller).require_not_started("PUT /metrics")?;
            let file =
                open_for_append(ctx, metrics.metrics_path, "PUT /metrics", "metrics_path").await?;
            lock(&ctx.controller).set_metrics(file)?;
            Ok(Reply::NoContent)
        }
        Endpoint::PutAuditLog => {
            let config: AuditLogConfig = parse_body("PUT /audit-log", body)?;
            lock(&ctx.controller).require_not_started("PUT /audit-log")?;
            let file = open_for_append(ctx, config.path, "PUT /audit-log", "path").await?;
            lock(&ctx.controller).set_audit_log(file)?;
            Ok(Reply::NoContent)
        }
    }
}

/// Has the VMM thread open `path` (the API thread's filter forbids opening files).
async fn open_for_append(
    ctx: &ApiContext,
    path: PathBuf,
    request: &str,
    what: &'static str,
) -> Result<File, Fault> {
    let (reply, answer) = oneshot::channel();
    send_to_vmm(ctx, VmmRequest::OpenForAppend { path, what, reply })?;
    await_reply(answer, VMM_REPLY_TIMEOUT, request)
        .await?
        .map_err(|e| Fault::bad_request(format!("{request}: {e}")))
}

fn json<T: serde::Serialize>(value: &T) -> Result<Reply, Fault> {
    serde_json::to_string(value)
        .map(Reply::Json)
        .map_err(|e| Fault::internal(format!("cannot encode the answer: {e}")))
}

pub(super) fn send_to_vmm(ctx: &ApiContext, request: VmmRequest) -> Result<(), Fault> {
    ctx.vmm_thread
        .send(request)
        .map_err(|_| Fault::bad_request("the VMM thread is no longer taking requests"))
}

pub(super) async fn await_reply<T>(
    answer: oneshot::Receiver<T>,
    limit: Duration,
    what: &str,
) -> Result<T, Fault> {
    match tokio::time::timeout(limit, answer).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) => Err(Fault::internal(format!(
            "{what}: the VMM thread dropped the request (the microVM is stopping)"
        ))),
        Err(_) => Err(Fault::internal(format!(
            "{what}: no answer from the VMM thread within {limit:?}"
        ))),
    }
}

async fn instance_start(ctx: &ApiContext) -> Result<Reply, Fault> {
    let config = lock(&ctx.controller).begin_start()?;
    let (reply, answer) = oneshot::channel();
    if let Err(fault) = send_to_vmm(ctx, VmmRequest::Start { config, reply }) {
        lock(&ctx.controller).start_failed();
        return Err(fault);
    }
    // The VMM thread moves the controller to Running (or back to NotStarted) itself, so the state
    // is right even if this client has gone away.
    match await_reply(answer, BOOT_REPLY_TIMEOUT, "InstanceStart").await? {
        Ok(()) => Ok(Reply::NoContent),
        Err(e) => Err(Fault::bad_request(format!("InstanceStart failed: {e}"))),
    }
}

async fn pause_or_resume(ctx: &ApiContext, pause: bool) -> Result<Reply, Fault> {
    let Some(events) = lock(&ctx.controller).vm_events_for(pause)? else {
        return Ok(Reply::NoContent);
    };
    let (reply, answer) = oneshot::channel();
    let controller = ctx.controller.clone();
    let agent = ctx.agent.clone();
    let request = ControlRequest {
        action: if pause {
            VcpuControl::Pause
        } else {
            VcpuControl::Resume
        },
        // Runs on the VMM thread: the state changes together with the vCPUs.
        reply: Box::new(move |result: Result<(), String>| {
            if result.is_ok() {
                let mut controller = lock(&controller);
                controller.set_paused(pause);
                // The first resume of a VM loaded paused: its guest learns the time now.
                if let Some(step) = controller.take_after_restore() {
                    agent.begin_after_restore(step);
                }
            }
            let _ = reply.send(result);
        }),
    };
    events
        .send(VmmEvent::Control(request))
        .map_err(|_| Fault::bad_request("the microVM has stopped"))?;
    await_reply(answer, VMM_REPLY_TIMEOUT, "PATCH /vm")
        .await?
        .map_err(|e| Fault::internal(format!("PATCH /vm: {e}")))?;
    Ok(Reply::NoContent)
}
