//! Hibernation: a sandbox's VM is paused, snapshotted into `<state>/sandboxes/<id>/snapshot/`
//! and its VMM ended, so an idle sandbox holds no memory and no process; a new VMM restores it
//! from that snapshot on `POST /sandboxes/{id}/resume` or on its next agent request.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};

use super::{not_running, unknown, Sandboxes, CALL_TIMEOUT};
use crate::fault::Fault;
use crate::launcher::{snapshot_files, Boot, Plan};
use crate::model::{SandboxInfo, SandboxState, DEFAULT_CREATE_TIMEOUT_S};
use crate::vm_client;

/// A restore maps the memory file and the agent reconnects at once; the create timeout is ample.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(DEFAULT_CREATE_TIMEOUT_S);

impl Sandboxes {
    /// The lock that orders hibernations and restores of sandbox `id`: two concurrent agent
    /// requests to a hibernated sandbox restore it once.
    fn transition_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.transitions.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(id.to_string()).or_default().clone()
    }

    /// `POST /sandboxes/{id}/hibernate`: running or paused -> hibernated. A sandbox that is
    /// hibernated already is left as it is.
    pub async fn hibernate(self: &Arc<Self>, id: &str) -> Result<SandboxInfo, Fault> {
        let lock = self.transition_lock(id);
        let _held = lock.lock().await;
        let info = self.get(id)?;
        let was_running = match info.state {
            SandboxState::Hibernated => return Ok(info),
            SandboxState::Running => true,
            SandboxState::Paused => false,
            _ => return Err(not_running(&info)),
        };
        let plan = self.launch.plan(
            &self.store,
            id,
            Boot::Snapshot {
                mem_size_mib: info.mem_size_mib,
            },
        )?;
        if was_running {
            patch_vm(&info, "Paused").await?;
        }
        if let Err(fault) = self.write_snapshot(&plan).await {
            if was_running {
                // The guest goes on as before; the failure is the answer.
                if let Err(e) = patch_vm(&info, "Resumed").await {
                    tracing::warn!("sandbox {id}: resuming after a failed hibernation: {e:?}");
                }
            }
            return Err(fault);
        }
        // Marked first, so the reaper does not call the end an exit.
        self.update(id, |r| {
            r.info.state = SandboxState::Hibernated;
            r.info.ended = Some("hibernated through the API".into());
        });
        self.end_vmm(id).await?;
        self.remove_jail_leftovers(id);
        self.get(id)
    }

    /// Writes the paused VM's snapshot and moves it to the sandbox's snapshot directory.
    async fn write_snapshot(&self, plan: &Plan) -> Result<(), Fault> {
        let (written_state, written_mem) = plan.create_snapshot().await?;
        let (state, mem) = snapshot_files(&self.store, &plan.id);
        if let Some(dir) = state.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Fault::internal(format!("cannot create {}: {e}", dir.display())))?;
        }
        // The jail's /run is a directory of the state directory's file system: a rename.
        for (from, to) in [(&written_state, &state), (&written_mem, &mem)] {
            std::fs::rename(from, to).map_err(|e| {
                Fault::internal(format!(
                    "cannot move the snapshot file {} to {}: {e}",
                    from.display(),
                    to.display()
                ))
            })?;
        }
        Ok(())
    }

    /// `POST /sandboxes/{id}/resume` of a hibernated sandbox, and the first agent request to
    /// one: a new VMM loads the snapshot and resumes the guest (state `running`). Other states
    /// are left as they are.
    pub async fn restore(self: &Arc<Self>, id: &str) -> Result<SandboxInfo, Fault> {
        let lock = self.transition_lock(id);
        let _held = lock.lock().await;
        let info = self.get(id)?;
        if info.state != SandboxState::Hibernated {
            return Ok(info);
        }
        let (state_file, _) = snapshot_files(&self.store, id);
        if !state_file.is_file() {
            return Err(Fault::internal(format!(
                "sandbox {id} is hibernated but its snapshot {} is missing",
                state_file.display()
            )));
        }
        let live = self
            .records()
            .values()
            .filter(|r| r.info.state.is_live())
            .count();
        if live >= self.max_live {
            return Err(Fault::conflict(format!(
                "sandbox {id} is hibernated and {live} sandboxes are running, the daemon's limit \
                 (--max-sandboxes); stop, hibernate or destroy one first"
            )));
        }
        let plan = self.launch.plan(
            &self.store,
            id,
            Boot::Snapshot {
                mem_size_mib: info.mem_size_mib,
            },
        )?;
        // A VMM or jailer that was SIGKILLed left its sockets or its jail: the new one could
        // not bind or build them.
        for sock in [&plan.api_sock, &plan.vsock_uds] {
            remove_if_present(sock);
        }
        self.remove_jail_leftovers(id);
        self.update(id, |r| {
            r.info.state = SandboxState::Starting;
            r.info.ended = None;
        });
        let deadline = Instant::now() + RESTORE_TIMEOUT;
        match self.start_from_snapshot(&plan, info.agent, deadline).await {
            Ok(()) => {
                let (state, mem) = snapshot_files(&self.store, id);
                // The new VMM maps the memory file privately: its mapping outlives the file.
                for file in [state, mem] {
                    remove_if_present(&file);
                }
                self.update(id, |r| {
                    if r.info.state == SandboxState::Starting {
                        r.info.state = SandboxState::Running;
                    }
                })
                .ok_or_else(|| unknown(id))
            }
            Err(fault) => {
                let _ = self.end_vmm(id).await;
                self.remove_jail_leftovers(id);
                // The snapshot is still there: the sandbox can be resumed again.
                self.update(id, |r| {
                    r.info.state = SandboxState::Hibernated;
                    r.info.pid = None;
                    r.pid_start_ticks = None;
                    r.info.ended = Some(format!("the last resume failed: {}", fault.message));
                });
                Err(fault)
            }
        }
    }

    async fn start_from_snapshot(
        self: &Arc<Self>,
        plan: &Plan,
        agent: bool,
        deadline: Instant,
    ) -> Result<(), Fault> {
        let pid = self.spawn_vmm(plan)?;
        let alive = || {
            self.get(&plan.id)
                .map(|i| i.pid == Some(pid))
                .unwrap_or(false)
        };
        plan.wait_for_api(deadline, alive).await?;
        plan.load_snapshot().await?;
        if agent {
            plan.wait_for_agent(deadline, alive).await?;
        }
        Ok(())
    }

    /// The API socket of a sandbox's agent, restoring the sandbox first if it is hibernated.
    pub async fn agent_sock_restoring(self: &Arc<Self>, id: &str) -> Result<PathBuf, Fault> {
        let info = self.get(id)?;
        // A guest without an agent would be woken only to refuse the request.
        if info.state == SandboxState::Hibernated && info.agent {
            self.restore(id).await?;
        }
        self.api_sock_for_agent(id)
    }
}

async fn patch_vm(info: &SandboxInfo, state: &str) -> Result<(), Fault> {
    let answer = vm_client::call(
        &info.api_sock,
        Method::PATCH,
        "/vm",
        Some(serde_json::json!({ "state": state })),
        CALL_TIMEOUT,
    )
    .await
    .map_err(|e| Fault::unavailable(format!("sandbox {}: {e}", info.id)))?;
    if answer.status != StatusCode::NO_CONTENT {
        return Err(Fault::new(
            answer.status,
            format!("sandbox {}: {}", info.id, answer.fault_message()),
        ));
    }
    Ok(())
}

fn remove_if_present(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
    }
}
