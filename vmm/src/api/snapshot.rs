//! `PUT /snapshot/create` and `PUT /snapshot/load` (Firecracker's bodies, plus `vsock_override` on
//! load, agentvm's analogue of `network_overrides` for its vsock device): checks the body and the
//! state, then hands the work to the thread that owns the VM: the running VM's event loop for a
//! create (the VM must be paused), the pre-boot VMM thread for a load (the VM is built from the
//! snapshot instead of booted).

use std::path::Path;
use std::time::Duration;

use tokio::sync::oneshot;

use super::fault::Fault;
use super::handlers::{await_reply, lock, send_to_vmm, ApiContext, Reply, VmmRequest};
use super::models::{MemBackendType, SnapshotCreate, SnapshotLoad, SnapshotType};
use crate::exit::{SnapshotRequest, VmmEvent};
use crate::seccomp::SeccompLevel;
use crate::vmm::{MemoryBackend, RestoreConfig};

/// Hang detector: writing guest memory out (or mapping it in and checking it) takes about a
/// second per GiB on slow disks.
const SNAPSHOT_REPLY_TIMEOUT: Duration = Duration::from_secs(300);

/// The body's own rules (the state is the controller's business).
pub fn check_create(request: &SnapshotCreate) -> Result<(), Fault> {
    check_target("snapshot_path", &request.snapshot_path)?;
    check_target("mem_file_path", &request.mem_file_path)?;
    if request.snapshot_path == request.mem_file_path {
        return Err(Fault::bad_request(
            "PUT /snapshot/create: snapshot_path and mem_file_path must be different files",
        ));
    }
    Ok(())
}

/// A file the snapshot will create: a file name in an existing directory.
fn check_target(field: &str, path: &Path) -> Result<(), Fault> {
    if path.file_name().is_none() {
        return Err(Fault::bad_request(format!(
            "PUT /snapshot/create: {field} {} names no file",
            path.display()
        )));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(Fault::bad_request(format!(
            "PUT /snapshot/create: {field} {}: directory {} does not exist",
            path.display(),
            dir.display()
        )));
    }
    if path.is_dir() {
        return Err(Fault::bad_request(format!(
            "PUT /snapshot/create: {field} {} is a directory",
            path.display()
        )));
    }
    Ok(())
}

/// What the load body asks for, or why it cannot be served.
pub fn restore_config(
    request: &SnapshotLoad,
    seccomp: SeccompLevel,
) -> Result<RestoreConfig, Fault> {
    let refuse = |why: &str| Err(Fault::bad_request(format!("PUT /snapshot/load: {why}")));
    let (mem_file_path, backend) = match (&request.mem_backend, &request.mem_file_path) {
        (Some(_), Some(_)) => {
            return refuse(
                "give either mem_backend or the deprecated mem_file_path, not both (as \
                 Firecracker)",
            )
        }
        (None, None) => return refuse("mem_backend is required"),
        (None, Some(path)) => (path.clone(), MemoryBackend::File),
        // A Uffd backend_path that is a Unix socket is an external handler's, as in
        // Firecracker; a regular file is the memory file itself, served by an in-process
        // handler thread.
        (Some(backend), None) => (
            backend.backend_path.clone(),
            match backend.backend_type {
                MemBackendType::File => MemoryBackend::File,
                MemBackendType::Uffd if is_socket(&backend.backend_path) => {
                    MemoryBackend::UffdSocket
                }
                MemBackendType::Uffd => MemoryBackend::Uffd,
            },
        ),
    };
    if let Some(o) = &request.vsock_override {
        if o.uds_path.file_name().is_none()
            || o.uds_path
                .parent()
                .is_some_and(|d| !d.as_os_str().is_empty() && !d.is_dir())
        {
            return refuse(&format!(
                "vsock_override.uds_path {}: not a file name in an existing directory",
                o.uds_path.display()
            ));
        }
        if o.guest_cid
            .is_some_and(|cid| cid < 3 || cid > u64::from(u32::MAX))
        {
            return refuse(
                "vsock_override.guest_cid must be at least 3 (0-2 are reserved) and fit in 32 bits",
            );
        }
    }
    if request
        .network_overrides
        .as_ref()
        .is_some_and(|o| !o.is_empty())
    {
        return refuse(
            "network_overrides: agentvm's NIC has no host device to swap: its network is the \
             VMM's egress filter; give the restored microVM its policy with PUT /egress/policy \
             (and PUT /egress/audit-log) before PUT /snapshot/load",
        );
    }
    if !request.snapshot_path.is_file() {
        return Err(Fault::bad_request(format!(
            "PUT /snapshot/load: snapshot_path {}: no such file",
            request.snapshot_path.display()
        )));
    }
    if backend != MemoryBackend::UffdSocket && !mem_file_path.is_file() {
        let what = match backend {
            MemoryBackend::Uffd => {
                "no such file (the memory file) or Unix socket (a uffd handler's)"
            }
            _ => "no such file",
        };
        return Err(Fault::bad_request(format!(
            "PUT /snapshot/load: mem_backend.backend_path {}: {what}",
            mem_file_path.display()
        )));
    }
    Ok(RestoreConfig {
        snapshot_path: request.snapshot_path.clone(),
        mem_file_path,
        backend,
        resume: request.resume_vm.unwrap_or(false),
        // Firecracker's deprecated name for the same switch is accepted too.
        track_dirty_pages: request.track_dirty_pages.or(request.enable_diff_snapshots)
            == Some(true),
        vsock_override: request
            .vsock_override
            .as_ref()
            .map(|o| (o.uds_path.clone(), o.guest_cid)),
        seccomp,
        // The controller adds the NIC's configuration, which it holds.
        net: None,
    })
}

/// A Unix socket (an external uffd handler's), not a regular file.
fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

pub async fn create(ctx: &ApiContext, request: SnapshotCreate) -> Result<Reply, Fault> {
    let events = lock(&ctx.controller).snapshot_create_target(&request)?;
    let (reply, answer) = oneshot::channel();
    let request = SnapshotRequest {
        snapshot_path: request.snapshot_path,
        mem_file_path: request.mem_file_path,
        diff: request.snapshot_type == Some(SnapshotType::Diff),
        reply: Box::new(move |result| {
            let _ = reply.send(result);
        }),
    };
    events
        .send(VmmEvent::CreateSnapshot(request))
        .map_err(|_| Fault::bad_request("PUT /snapshot/create: the microVM has stopped"))?;
    await_reply(answer, SNAPSHOT_REPLY_TIMEOUT, "PUT /snapshot/create")
        .await?
        .map_err(|e| Fault::bad_request(format!("PUT /snapshot/create: {e}")))?;
    Ok(Reply::NoContent)
}

pub async fn load(ctx: &ApiContext, request: SnapshotLoad) -> Result<Reply, Fault> {
    let config = lock(&ctx.controller).begin_load(&request)?;
    let (reply, answer) = oneshot::channel();
    let load = VmmRequest::LoadSnapshot {
        config,
        reply,
        agent: ctx.agent.clone(),
    };
    if let Err(fault) = send_to_vmm(ctx, load) {
        lock(&ctx.controller).start_failed();
        return Err(fault);
    }
    // The VMM thread moves the controller on (Running/Paused, or back to NotStarted) itself.
    await_reply(answer, SNAPSHOT_REPLY_TIMEOUT, "PUT /snapshot/load")
        .await?
        .map_err(|e| Fault::bad_request(format!("PUT /snapshot/load: {e}")))?;
    Ok(Reply::NoContent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::models::MemBackend;

    fn load_body(dir: &Path) -> SnapshotLoad {
        let snap = dir.join("vm.snap");
        let mem = dir.join("vm.mem");
        std::fs::write(&snap, b"x").unwrap();
        std::fs::write(&mem, b"x").unwrap();
        SnapshotLoad {
            snapshot_path: snap,
            mem_file_path: None,
            mem_backend: Some(MemBackend {
                backend_type: MemBackendType::File,
                backend_path: mem,
            }),
            enable_diff_snapshots: None,
            track_dirty_pages: None,
            resume_vm: Some(true),
            network_overrides: None,
            vsock_override: None,
        }
    }

    #[test]
    fn load_body_rules() {
        let dir = tempfile::tempdir().unwrap();
        let ok = load_body(dir.path());
        let config = restore_config(&ok, SeccompLevel::Off).unwrap();
        assert!(config.resume);
        assert_eq!(config.mem_file_path, dir.path().join("vm.mem"));

        assert_eq!(config.backend, MemoryBackend::File);

        let mut uffd = ok.clone();
        uffd.mem_backend.as_mut().unwrap().backend_type = MemBackendType::Uffd;
        let config = restore_config(&uffd, SeccompLevel::Off).unwrap();
        assert_eq!(config.backend, MemoryBackend::Uffd);
        assert_eq!(config.mem_file_path, dir.path().join("vm.mem"));

        let mut external = uffd.clone();
        let sock = dir.path().join("handler.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        external.mem_backend.as_mut().unwrap().backend_path = sock.clone();
        let config = restore_config(&external, SeccompLevel::Off).unwrap();
        assert_eq!(config.backend, MemoryBackend::UffdSocket);
        assert_eq!(config.mem_file_path, sock);
        external.mem_backend.as_mut().unwrap().backend_path = dir.path().join("gone.sock");
        let err = restore_config(&external, SeccompLevel::Off).unwrap_err();
        assert!(
            err.message
                .contains("gone.sock: no such file (the memory file) or Unix socket"),
            "{err:?}"
        );

        let mut both = ok.clone();
        both.mem_file_path = Some(dir.path().join("vm.mem"));
        assert!(restore_config(&both, SeccompLevel::Off).is_err());

        let mut missing = ok.clone();
        missing.snapshot_path = dir.path().join("nope");
        let err = restore_config(&missing, SeccompLevel::Off).unwrap_err();
        assert!(err.message.contains("snapshot_path"), "{err:?}");

        let mut diff = ok.clone();
        diff.enable_diff_snapshots = Some(true);
        assert!(
            restore_config(&diff, SeccompLevel::Off)
                .unwrap()
                .track_dirty_pages
        );

        let mut fork = ok;
        fork.vsock_override = Some(crate::api::models::VsockOverride {
            uds_path: dir.path().join("fork.sock"),
            guest_cid: Some(7),
        });
        let config = restore_config(&fork, SeccompLevel::Off).unwrap();
        assert_eq!(
            config.vsock_override,
            Some((dir.path().join("fork.sock"), Some(7)))
        );
        let mut bad = fork.clone();
        bad.vsock_override.as_mut().unwrap().uds_path = dir.path().join("no/such/dir/v.sock");
        let err = restore_config(&bad, SeccompLevel::Off).unwrap_err();
        assert!(err.message.contains("vsock_override.uds_path"), "{err:?}");
        let mut reserved = fork;
        reserved.vsock_override.as_mut().unwrap().guest_cid = Some(2);
        let err = restore_config(&reserved, SeccompLevel::Off).unwrap_err();
        assert!(err.message.contains("guest_cid"), "{err:?}");
    }

    #[test]
    fn create_body_rules() {
        let dir = tempfile::tempdir().unwrap();
        let body = |snap: &str, mem: &str, kind| SnapshotCreate {
            snapshot_path: dir.path().join(snap),
            mem_file_path: dir.path().join(mem),
            snapshot_type: kind,
        };
        assert!(check_create(&body("s", "m", None)).is_ok());
        assert!(check_create(&body("s", "m", Some(SnapshotType::Full))).is_ok());
        assert!(check_create(&body("s", "m", Some(SnapshotType::Diff))).is_ok());
        assert!(check_create(&body("s", "s", None)).is_err());
        let err = check_create(&body("no/such/dir/s", "m", None)).unwrap_err();
        assert!(err.message.contains("does not exist"), "{err:?}");
    }
}
