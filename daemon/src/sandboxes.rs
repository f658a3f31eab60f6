//! The daemon's sandboxes: their records (kept in step with the state directory), their VMM
//! processes, and what each API call does to them.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::{Method, StatusCode};

use crate::fault::Fault;
use crate::launcher::{Boot, LaunchConfig};
use crate::model::*;
use crate::process;
use crate::store::{SandboxRecord, Store};
use crate::vm_client;

mod hibernate;
mod isolate;

/// After SIGTERM, how long a VMM gets to end before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often an adopted VMM (started by an earlier daemon, so not our child) is checked on.
const ADOPTED_POLL: Duration = Duration::from_millis(500);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves the `default` template when none was registered (the prepared kernel and
/// initramfs); may take long (it can download), so it runs on a blocking thread.
pub type DefaultTemplate = Arc<dyn Fn() -> Result<Template, String> + Send + Sync>;

pub struct Sandboxes {
    store: Store,
    launch: LaunchConfig,
    default_template: Option<DefaultTemplate>,
    max_live: usize,
    records: Mutex<BTreeMap<String, SandboxRecord>>,
    /// Per sandbox: held while it hibernates or is restored.
    transitions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn check_id(what: &str, id: &str) -> Result<(), Fault> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if id.is_empty() || id.len() > MAX_ID_LEN || !id.chars().all(ok_char) {
        return Err(Fault::bad_request(format!(
            "{what} {id:?}: use 1-{MAX_ID_LEN} characters among letters, digits, '-' and '_'"
        )));
    }
    Ok(())
}

fn random_id() -> String {
    let mut bytes = [0u8; 6];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Unique enough for a fallback: the clock's nanoseconds and our PID.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes.copy_from_slice(&(nanos as u64 ^ u64::from(std::process::id())).to_le_bytes()[..6]);
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sb-{hex}")
}

impl Sandboxes {
    pub fn new(
        store: Store,
        launch: LaunchConfig,
        default_template: Option<DefaultTemplate>,
        max_live: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            launch,
            default_template,
            max_live,
            records: Mutex::new(BTreeMap::new()),
            transitions: Mutex::new(HashMap::new()),
        })
    }

    fn records(&self) -> MutexGuard<'_, BTreeMap<String, SandboxRecord>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Updates record `id` (if it still exists) and writes it to the state directory.
    fn update(&self, id: &str, change: impl FnOnce(&mut SandboxRecord)) -> Option<SandboxInfo> {
        let mut records = self.records();
        let record = records.get_mut(id)?;
        change(record);
        if let Err(e) = self.store.save_sandbox(record) {
            tracing::error!("{e}");
        }
        Some(record.info.clone())
    }

    /// Loads the state directory after a (re)start: sandboxes whose VMM still runs are adopted,
    /// those whose VMM is gone are marked lost, and a create the previous daemon did not finish
    /// is ended. Returns one line per sandbox for the daemon's log.
    pub fn recover(self: &Arc<Self>) -> Vec<String> {
        let mut report = Vec::new();
        for loaded in self.store.load_sandboxes() {
            let mut record = match loaded {
                Ok(record) => record,
                Err(e) => {
                    report.push(format!("skipped: {e}"));
                    continue;
                }
            };
            let id = record.info.id.clone();
            let alive = match (record.info.pid, record.pid_start_ticks) {
                (Some(pid), Some(ticks)) => process::is_same_process(pid, ticks),
                _ => false,
            };
            let snapshot_kept = crate::launcher::snapshot_files(&self.store, &id)
                .0
                .is_file();
            if record.info.state == SandboxState::Starting && record.booted && snapshot_kept {
                // A restore from hibernation the previous daemon did not finish: the snapshot
                // is still there to restore from.
                if let (Some(pid), true) = (record.info.pid, alive) {
                    let _ = process::signal(pid, libc::SIGKILL);
                }
                record.info.state = SandboxState::Hibernated;
                record.info.pid = None;
                record.pid_start_ticks = None;
            } else if record.info.state == SandboxState::Hibernated && !snapshot_kept {
                record.info.state = SandboxState::Lost;
                record.info.ended = Some("its hibernation snapshot was gone".into());
            } else if record.info.state.is_live() {
                if !alive {
                    record.info.state = SandboxState::Lost;
                    record.info.ended = Some(format!(
                        "its VMM process{} was gone when the daemon restarted",
                        record
                            .info
                            .pid
                            .map(|p| format!(" ({p})"))
                            .unwrap_or_default()
                    ));
                    record.info.pid = None;
                } else if record.info.state == SandboxState::Starting {
                    if let Some(pid) = record.info.pid {
                        let _ = process::signal(pid, libc::SIGKILL);
                    }
                    record.info.state = SandboxState::Failed;
                    record.info.ended =
                        Some("the daemon restarted while the sandbox was being created".into());
                    record.info.pid = None;
                }
            }
            report.push(format!("{id}: {:?}", record.info.state));
            if let Err(e) = self.store.save_sandbox(&record) {
                report.push(format!("{id}: {e}"));
            }
            let watch = record
                .info
                .state
                .is_live()
                .then_some(record.info.pid)
                .flatten();
            let ticks = record.pid_start_ticks;
            self.records().insert(id.clone(), record);
            if let (Some(pid), Some(ticks)) = (watch, ticks) {
                self.watch_adopted(id, pid, ticks);
            }
        }
        report
    }

    /// A VMM we did not start cannot be waited for: poll its /proc entry until it is gone.
    fn watch_adopted(self: &Arc<Self>, id: String, pid: u32, ticks: u64) {
        let this = self.clone();
        tokio::spawn(async move {
            while process::is_same_process(pid, ticks) {
                tokio::time::sleep(ADOPTED_POLL).await;
            }
            this.vmm_ended(
                &id,
                pid,
                "its VMM ended (exit status unknown: it was started by an earlier daemon)".into(),
            );
        });
    }

    /// Records that sandbox `id`'s VMM process `pid` ended, for `reason`.
    fn vmm_ended(&self, id: &str, pid: u32, reason: String) {
        self.update(id, |record| {
            if record.info.pid != Some(pid) {
                return;
            }
            record.info.pid = None;
            record.pid_start_ticks = None;
            match record.info.state {
                // A guest without an agent runs from InstanceStart on: it may end at once.
                SandboxState::Starting if record.booted && !record.info.agent => {
                    record.info.state = SandboxState::Exited;
                    record.info.ended = Some(reason);
                }
                SandboxState::Starting => {
                    record.info.state = SandboxState::Failed;
                    record.info.ended = Some(reason);
                }
                SandboxState::Running | SandboxState::Paused => {
                    record.info.state = SandboxState::Exited;
                    record.info.ended = Some(reason);
                }
                _ => {}
            }
        });
    }

    pub fn list(&self) -> Vec<SandboxInfo> {
        let mut all: Vec<SandboxInfo> = self.records().values().map(|r| r.info.clone()).collect();
        all.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        all
    }

    pub fn get(&self, id: &str) -> Result<SandboxInfo, Fault> {
        self.records()
            .get(id)
            .map(|r| r.info.clone())
            .ok_or_else(|| unknown(id))
    }

    async fn resolve_template(&self, name: &str) -> Result<Template, Fault> {
        check_id("template", name)?;
        if let Some(template) = self.store.load_template(name).map_err(Fault::internal)? {
            return Ok(template);
        }
        match (&self.default_template, name) {
            (Some(resolve), "default") => {
                let resolve = resolve.clone();
                tokio::task::spawn_blocking(move || resolve())
                    .await
                    .map_err(|e| Fault::internal(format!("preparing the default template: {e}")))?
                    .map_err(|e| {
                        Fault::internal(format!("cannot prepare the default template: {e}"))
                    })
            }
            _ => Err(Fault::not_found(format!(
                "no template {name:?} (register one with PUT /templates/{name})"
            ))),
        }
    }

    /// `POST /sandboxes`: returns once the sandbox runs (and its agent answers, for agent
    /// templates). A failed create leaves nothing behind.
    pub async fn create(self: &Arc<Self>, request: CreateSandbox) -> Result<SandboxInfo, Fault> {
        let timeout = Duration::from_secs(request.timeout_s.unwrap_or(DEFAULT_CREATE_TIMEOUT_S));
        if request.timeout_s == Some(0) || timeout.as_secs() > MAX_CREATE_TIMEOUT_S {
            return Err(Fault::bad_request(format!(
                "timeout_s must be 1..={MAX_CREATE_TIMEOUT_S}"
            )));
        }
        let deadline = Instant::now() + timeout;
        let id = match request.id.clone() {
            Some(id) => {
                check_id("id", &id)?;
                id
            }
            None => random_id(),
        };
        if request.tier == Some(Tier::Isolate) {
            return self.create_isolate(id, request, deadline).await;
        }
        isolate::refuse_isolate_fields(&request)?;
        let template_name = request.template.clone().unwrap_or_else(|| "default".into());
        let template = match &request.kernel_image_path {
            // A full inline config needs no template.
            Some(_) if request.template.is_none() => Template {
                kernel_image_path: PathBuf::new(),
                initrd_path: None,
                boot_args: None,
                vcpu_count: 1,
                mem_size_mib: 256,
                agent: true,
            },
            _ => self.resolve_template(&template_name).await?,
        };
        let template = apply_overrides(template, &request)?;
        let plan = self
            .launch
            .plan(&self.store, &id, Boot::Template(&template))?;

        let record = SandboxRecord {
            info: SandboxInfo {
                id: id.clone(),
                tier: Tier::Microvm,
                template: if request.kernel_image_path.is_some() && request.template.is_none() {
                    "(inline)".into()
                } else {
                    template_name
                },
                state: SandboxState::Starting,
                created_at_ms: now_ms(),
                vcpu_count: template.vcpu_count,
                mem_size_mib: template.mem_size_mib,
                agent: template.agent,
                jailed: self.launch.jail.is_some(),
                pid: None,
                api_sock: plan.api_sock.clone(),
                vsock_uds: plan.vsock_uds.clone(),
                isolate: None,
                ended: None,
            },
            pid_start_ticks: None,
            booted: false,
        };
        self.insert_new(record)?;
        let started = self.start(&plan, &template, deadline).await;
        self.finish_create(&id, started).await
    }

    /// Adds the record of a sandbox being created, unless its id is taken or the daemon runs
    /// its limit of sandboxes.
    fn insert_new(&self, record: SandboxRecord) -> Result<(), Fault> {
        let id = record.info.id.clone();
        let mut records = self.records();
        if records.contains_key(&id) {
            return Err(Fault::conflict(format!("sandbox {id} already exists")));
        }
        let live = records.values().filter(|r| r.info.state.is_live()).count();
        if live >= self.max_live {
            return Err(Fault::conflict(format!(
                "{live} sandboxes are running, the daemon's limit (--max-sandboxes); stop or \
                 destroy one first"
            )));
        }
        self.store.save_sandbox(&record).map_err(Fault::internal)?;
        records.insert(id, record);
        Ok(())
    }

    /// Ends a create: the sandbox runs, or (it failed) nothing of it is left.
    async fn finish_create(
        &self,
        id: &str,
        started: Result<(), Fault>,
    ) -> Result<SandboxInfo, Fault> {
        match started {
            Ok(()) => self
                .update(id, |r| {
                    if r.info.state == SandboxState::Starting {
                        r.info.state = SandboxState::Running;
                    }
                })
                .ok_or_else(|| {
                    Fault::conflict(format!("sandbox {id} was destroyed while it was created"))
                }),
            Err(fault) => {
                self.discard(id).await;
                Err(fault)
            }
        }
    }

    async fn start(
        self: &Arc<Self>,
        plan: &crate::launcher::Plan,
        template: &Template,
        deadline: Instant,
    ) -> Result<(), Fault> {
        let pid = self.spawn_vmm(plan)?;
        let alive = || {
            self.get(&plan.id)
                .map(|i| i.pid == Some(pid))
                .unwrap_or(false)
        };
        plan.wait_for_api(deadline, alive).await?;
        plan.configure(template).await?;
        // Before InstanceStart: a guest that ends before its answer arrives has still booted.
        self.update(&plan.id, |r| r.booted = true);
        plan.instance_start().await?;
        if template.agent {
            plan.wait_for_agent(deadline, alive).await?;
        } else {
            // Running from InstanceStart on: a guest that ends at once has exited, not failed.
            self.update(&plan.id, |r| {
                if r.info.state == SandboxState::Starting {
                    r.info.state = SandboxState::Running;
                }
            });
        }
        Ok(())
    }

    /// Starts the VMM process of `plan`, records its PID and reaps it on a thread that records
    /// how it ended.
    fn spawn_vmm(self: &Arc<Self>, plan: &crate::launcher::Plan) -> Result<u32, Fault> {
        let mut child = plan.spawn()?;
        let pid = child.id();
        let ticks = process::start_ticks(pid);
        self.update(&plan.id, |r| {
            r.info.pid = Some(pid);
            r.pid_start_ticks = ticks;
        });
        // Our child: reaped by a thread that records how it ended.
        let (this, id, jailed) = (self.clone(), plan.id.clone(), self.launch.jail.is_some());
        let log = plan.log.clone();
        std::thread::Builder::new()
            .name(format!("reap-{}", plan.id))
            .spawn(move || {
                let reason = match child.wait() {
                    Ok(status) => {
                        let mut reason = process::describe_exit(status, jailed);
                        if !status.success() {
                            let tail = process::log_tail(&log, 3);
                            if !tail.is_empty() {
                                reason.push_str(&format!(": {}", tail.replace('\n', " | ")));
                            }
                        }
                        reason
                    }
                    Err(e) => format!("cannot wait for the VMM: {e}"),
                };
                this.vmm_ended(&id, pid, reason);
            })
            .map_err(|e| Fault::internal(format!("cannot start a reaper thread: {e}")))?;
        Ok(pid)
    }

    /// Ends a failed create: kills its VMM and forgets it.
    async fn discard(&self, id: &str) {
        let _ = self.end_vmm(id).await;
        self.records().remove(id);
        if let Err(e) = self.store.remove_sandbox(id) {
            tracing::warn!("{e}");
        }
        self.remove_jail_leftovers(id);
    }

    /// SIGTERM, then SIGKILL after [`STOP_GRACE`]; returns once the VMM process is gone.
    async fn end_vmm(&self, id: &str) -> Result<(), Fault> {
        let Some((pid, ticks)) = self
            .records()
            .get(id)
            .and_then(|r| Some((r.info.pid?, r.pid_start_ticks)))
        else {
            return Ok(());
        };
        let gone = |this: &Self| {
            let record_says_gone = this
                .records()
                .get(id)
                .map(|r| r.info.pid != Some(pid))
                .unwrap_or(true);
            record_says_gone || ticks.is_some_and(|t| !process::is_same_process(pid, t))
        };
        for (signal, wait) in [(libc::SIGTERM, STOP_GRACE), (libc::SIGKILL, STOP_GRACE)] {
            if gone(self) {
                break;
            }
            process::signal(pid, signal).map_err(Fault::internal)?;
            let until = Instant::now() + wait;
            while !gone(self) && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if !gone(self) {
            return Err(Fault::internal(format!(
                "sandbox {id}: its VMM process {pid} did not end after SIGKILL"
            )));
        }
        // An adopted VMM has no reaper to clear the record.
        self.update(id, |r| {
            if r.info.pid == Some(pid) {
                r.info.pid = None;
                r.pid_start_ticks = None;
            }
        });
        Ok(())
    }

    /// A jailer that was SIGKILLed could not remove its jail directory.
    fn remove_jail_leftovers(&self, id: &str) {
        if self.launch.jail.is_none() {
            return;
        }
        if let Some(name) = self.launch.agentvm.file_name() {
            let dir = self.store.jail_base().join(name).join(id);
            if dir.exists() {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!("cannot remove the jail {}: {e}", dir.display());
                }
            }
        }
    }

    /// `POST /sandboxes/{id}/stop`: ends the VM, keeps the record (state `stopped`); a
    /// hibernated sandbox's snapshot is removed.
    pub async fn stop(&self, id: &str) -> Result<SandboxInfo, Fault> {
        let state = self.get(id)?.state;
        if state == SandboxState::Starting {
            return Err(Fault::conflict(format!(
                "sandbox {id} is still being created"
            )));
        }
        if state == SandboxState::Hibernated {
            self.update(id, |r| {
                r.info.state = SandboxState::Stopped;
                r.info.ended = Some("stopped through the API while hibernated".into());
            });
            let (state_file, mem_file) = crate::launcher::snapshot_files(&self.store, id);
            for file in [state_file, mem_file] {
                let _ = std::fs::remove_file(file);
            }
        }
        if state.is_live() {
            // Marked first, so the reaper does not call the end an exit.
            self.update(id, |r| {
                r.info.state = SandboxState::Stopped;
                r.info.ended = Some("stopped through the API".into());
            });
            self.end_vmm(id).await?;
            self.remove_jail_leftovers(id);
        }
        self.remove_isolate_files(id);
        self.get(id)
    }

    /// `DELETE /sandboxes/{id}`: ends the VM and removes every file of the sandbox.
    pub async fn destroy(&self, id: &str) -> Result<(), Fault> {
        let state = self.get(id)?.state;
        if state == SandboxState::Starting {
            return Err(Fault::conflict(format!(
                "sandbox {id} is still being created"
            )));
        }
        if state.is_live() {
            self.update(id, |r| r.info.state = SandboxState::Stopped);
            self.end_vmm(id).await?;
        }
        self.records().remove(id);
        self.remove_jail_leftovers(id);
        self.store.remove_sandbox(id).map_err(Fault::internal)
    }

    /// `POST /sandboxes/{id}/pause` and `/resume`, as the per-VM `PATCH /vm`; resuming a
    /// hibernated sandbox restores it.
    pub async fn set_paused(
        self: &Arc<Self>,
        id: &str,
        paused: bool,
    ) -> Result<SandboxInfo, Fault> {
        let info = self.get(id)?;
        if !paused && info.state == SandboxState::Hibernated {
            return self.restore(id).await;
        }
        let (from, to, word) = if paused {
            (SandboxState::Running, SandboxState::Paused, "Paused")
        } else {
            (SandboxState::Paused, SandboxState::Running, "Resumed")
        };
        if info.state == to {
            return Ok(info);
        }
        if info.state != from {
            return Err(not_running(&info));
        }
        let answer = vm_client::call(
            &info.api_sock,
            Method::PATCH,
            "/vm",
            Some(serde_json::json!({ "state": word })),
            CALL_TIMEOUT,
        )
        .await
        .map_err(|e| Fault::unavailable(format!("sandbox {id}: {e}")))?;
        if answer.status != StatusCode::NO_CONTENT {
            return Err(Fault::new(
                answer.status,
                format!("sandbox {id}: {}", answer.fault_message()),
            ));
        }
        self.update(id, |r| {
            if r.info.state == from {
                r.info.state = to;
            }
        })
        .ok_or_else(|| unknown(id))
    }

    /// The API socket of a running sandbox, for forwarding an agent request.
    pub fn api_sock_for_agent(&self, id: &str) -> Result<PathBuf, Fault> {
        let info = self.get(id)?;
        if info.state != SandboxState::Running {
            return Err(not_running(&info));
        }
        if !info.agent {
            return Err(Fault::conflict(format!(
                "sandbox {id} runs a guest without the agentvm agent (its template says agent: false)"
            )));
        }
        Ok(info.api_sock)
    }

    /// The API socket of a sandbox whose VMM runs (running or paused).
    pub fn api_sock(&self, id: &str) -> Result<PathBuf, Fault> {
        let info = self.get(id)?;
        if !matches!(info.state, SandboxState::Running | SandboxState::Paused) {
            return Err(not_running(&info));
        }
        Ok(info.api_sock)
    }

    pub fn put_template(&self, name: &str, template: Template) -> Result<(), Fault> {
        check_id("template", name)?;
        check_template(&template)?;
        self.store
            .save_template(name, &template)
            .map_err(Fault::internal)
    }

    pub fn get_template(&self, name: &str) -> Result<Template, Fault> {
        check_id("template", name)?;
        self.store
            .load_template(name)
            .map_err(Fault::internal)?
            .ok_or_else(|| Fault::not_found(format!("no template {name:?}")))
    }

    pub fn template_names(&self) -> Result<Vec<String>, Fault> {
        self.store.template_names().map_err(Fault::internal)
    }

    pub fn delete_template(&self, name: &str) -> Result<(), Fault> {
        check_id("template", name)?;
        if self.store.remove_template(name).map_err(Fault::internal)? {
            Ok(())
        } else {
            Err(Fault::not_found(format!("no template {name:?}")))
        }
    }
}

fn unknown(id: &str) -> Fault {
    Fault::not_found(format!("no sandbox {id:?}"))
}

fn not_running(info: &SandboxInfo) -> Fault {
    let state = serde_json::to_value(info.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let why = info
        .ended
        .as_deref()
        .map(|e| format!(" ({e})"))
        .unwrap_or_default();
    Fault::conflict(format!("sandbox {} is {state}{why}", info.id))
}

fn apply_overrides(mut template: Template, request: &CreateSandbox) -> Result<Template, Fault> {
    if let Some(kernel) = &request.kernel_image_path {
        template.kernel_image_path = kernel.clone();
    }
    if let Some(initrd) = &request.initrd_path {
        template.initrd_path = Some(initrd.clone());
    }
    if let Some(args) = &request.boot_args {
        template.boot_args = Some(args.clone());
    }
    if let Some(vcpus) = request.vcpu_count {
        template.vcpu_count = vcpus;
    }
    if let Some(mem) = request.mem_size_mib {
        template.mem_size_mib = mem;
    }
    if let Some(agent) = request.agent {
        template.agent = agent;
    }
    check_template(&template)?;
    Ok(template)
}

fn check_template(template: &Template) -> Result<(), Fault> {
    if !(1..=MAX_VCPUS).contains(&template.vcpu_count) {
        return Err(Fault::bad_request(format!(
            "vcpu_count must be 1..={MAX_VCPUS}, got {}",
            template.vcpu_count
        )));
    }
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&template.mem_size_mib) {
        return Err(Fault::bad_request(format!(
            "mem_size_mib must be {MIN_MEM_MIB}..={MAX_MEM_MIB}, got {}",
            template.mem_size_mib
        )));
    }
    for (what, path) in [
        ("kernel_image_path", Some(&template.kernel_image_path)),
        ("initrd_path", template.initrd_path.as_ref()),
    ] {
        let Some(path) = path else { continue };
        if !path.is_absolute() {
            return Err(Fault::bad_request(format!(
                "{what} {} must be an absolute path",
                path.display()
            )));
        }
        if !path.is_file() {
            return Err(Fault::bad_request(format!(
                "{what} {} is not a readable file",
                path.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_and_generated_ones_pass() {
        assert!(check_id("id", "sb-1_A").is_ok());
        assert!(check_id("id", &random_id()).is_ok());
        assert_ne!(random_id(), random_id());
        for bad in ["", "a/b", "..", "a b", &"x".repeat(MAX_ID_LEN + 1)] {
            let fault = check_id("id", bad).unwrap_err();
            assert_eq!(fault.status, StatusCode::BAD_REQUEST);
            assert!(fault.message.contains("1-40 characters"), "{fault:?}");
        }
    }

    #[test]
    fn overrides_are_validated() {
        let kernel = std::env::current_exe().unwrap();
        let base = Template {
            kernel_image_path: kernel.clone(),
            initrd_path: None,
            boot_args: None,
            vcpu_count: 1,
            mem_size_mib: 64,
            agent: true,
        };
        let over = |request: CreateSandbox| apply_overrides(base.clone(), &request);
        let t = over(CreateSandbox {
            vcpu_count: Some(2),
            mem_size_mib: Some(128),
            agent: Some(false),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((t.vcpu_count, t.mem_size_mib, t.agent), (2, 128, false));
        let fault = over(CreateSandbox {
            vcpu_count: Some(0),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            fault.message.contains("vcpu_count must be 1..=16"),
            "{fault:?}"
        );
        let fault = over(CreateSandbox {
            mem_size_mib: Some(1 << 30),
            ..Default::default()
        })
        .unwrap_err();
        assert!(fault.message.contains("mem_size_mib"), "{fault:?}");
        let fault = over(CreateSandbox {
            kernel_image_path: Some("relative".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            fault.message.contains("must be an absolute path"),
            "{fault:?}"
        );
        let fault = over(CreateSandbox {
            initrd_path: Some("/no/such/initrd".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            fault
                .message
                .contains("/no/such/initrd is not a readable file"),
            "{fault:?}"
        );
    }
}
