//! Starting one sandbox: its VMM process (`agentvm serve`, inside `agentvm-jailer` when jailed),
//! then the same API calls a Firecracker user makes (boot source, machine config, vsock,
//! InstanceStart), then waiting for the guest agent.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};

use crate::fault::Fault;
use crate::model::{IsolateInfo, Template};
use crate::store::Store;
use crate::vm_client;

/// The guest's vsock CID: every sandbox is its own VMM with its own vsock socket, so all share it.
const GUEST_CID: u32 = 3;
/// Unix socket paths hold at most 107 bytes (sun_path minus the NUL); the vsock socket also gets
/// `_<port>` suffixes for guest-initiated connections.
const MAX_SOCKET_PATH: usize = 107 - 6;
/// Each configuration call; the VMM answers them at once.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);
/// Writing or mapping a snapshot moves the guest's whole memory: allow for a slow disk.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Where the jail shows the files a VMM reads (read-only bind mounts).
const JAIL_KERNEL: &str = "/boot/kernel";
const JAIL_INITRD: &str = "/boot/initrd";
const JAIL_SNAPSHOT_STATE: &str = "/snapshot/state";
const JAIL_SNAPSHOT_MEM: &str = "/snapshot/mem";
const JAIL_MODULE: &str = "/wasm/module.wasm";
/// An isolate sandbox's egress policy and audit log, where its jailed worker finds them.
const JAIL_EGRESS_POLICY: &str = "/wasm/egress-policy.json";
const JAIL_EGRESS_AUDIT: &str = "/wasm/egress-audit.jsonl";
/// The files a hibernating VMM writes beside its sockets, before the daemon moves them.
const HIBERNATE_STATE: &str = "hibernate.state";
const HIBERNATE_MEM: &str = "hibernate.mem";

/// How an isolate worker (`agentvm isolate serve`) whose module the isolate refused begins its
/// last stderr line: the daemon finds it in the worker's log and answers the create with 400.
pub const MODULE_REFUSED: &str = "agentvm: the module is refused:";

/// How sandboxes are started.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// The `agentvm` binary (normally the daemon's own executable).
    pub agentvm: PathBuf,
    pub jail: Option<JailConfig>,
}

/// Jailing every VMM with `agentvm-jailer` (the default when the daemon runs as root).
#[derive(Debug, Clone)]
pub struct JailConfig {
    pub jailer: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

/// Where one sandbox's files are, from the host's side and from its VMM's side.
#[derive(Debug, Clone)]
pub struct Plan {
    pub id: String,
    pub api_sock: PathBuf,
    pub vsock_uds: PathBuf,
    pub log: PathBuf,
    command: CommandPlan,
    /// The paths the VMM is told (inside the jail when jailed).
    vm_kernel: PathBuf,
    vm_initrd: Option<PathBuf>,
    vm_vsock_uds: PathBuf,
    /// The snapshot a hibernated sandbox resumes from, as the VMM sees it (state, memory).
    vm_snapshot: Option<(PathBuf, PathBuf)>,
}

/// What a sandbox's VMM starts from.
#[derive(Debug, Clone, Copy)]
pub enum Boot<'a> {
    /// A fresh boot of the template's kernel.
    Template(&'a Template),
    /// A hibernated sandbox's snapshot (`<sandbox dir>/snapshot/`), for a guest of this size.
    Snapshot { mem_size_mib: u64 },
}

/// Where sandbox `id`'s hibernation snapshot is kept: (state file, memory file).
pub fn snapshot_files(store: &Store, id: &str) -> (PathBuf, PathBuf) {
    let dir = store.sandbox_dir(id).join("snapshot");
    (dir.join("state"), dir.join("mem"))
}

#[derive(Debug, Clone)]
struct CommandPlan {
    program: PathBuf,
    args: Vec<String>,
}

impl LaunchConfig {
    /// Lays out sandbox `id`'s files and its VMM command line.
    pub fn plan(&self, store: &Store, id: &str, boot: Boot<'_>) -> Result<Plan, Fault> {
        let dir = store.sandbox_dir(id);
        let log = dir.join("vmm.log");
        let (kernel, initrd, mem_size_mib) = match boot {
            Boot::Template(t) => (
                Some(t.kernel_image_path.clone()),
                t.initrd_path.clone(),
                t.mem_size_mib,
            ),
            Boot::Snapshot { mem_size_mib } => (None, None, mem_size_mib),
        };
        let snapshot = matches!(boot, Boot::Snapshot { .. }).then(|| snapshot_files(store, id));
        let plan = match &self.jail {
            None => {
                let api_sock = dir.join("api.sock");
                let vsock_uds = dir.join("vsock.sock");
                let console = dir.join("console.log");
                Plan {
                    id: id.to_string(),
                    command: CommandPlan {
                        program: self.agentvm.clone(),
                        args: serve_args(id, &api_sock, &console),
                    },
                    vm_kernel: kernel.unwrap_or_default(),
                    vm_initrd: initrd,
                    vm_vsock_uds: vsock_uds.clone(),
                    vm_snapshot: snapshot,
                    api_sock,
                    vsock_uds,
                    log,
                }
            }
            Some(jail) => {
                let run = self.jail_run_dir(store, id)?;
                let jail_run = Path::new("/run");
                // The guest's memory plus the VMM's own: the cgroup stops a runaway VMM.
                let mut args = self.jailer_args(store, jail, id, mem_size_mib + 256, 512)?;
                let mut mount = |src: &Path, dst: &str| -> Result<(), Fault> {
                    args.push("--mount".to_string());
                    args.push(format!("{}:{dst}", path_arg(src)?));
                    Ok(())
                };
                if let Some(kernel) = &kernel {
                    mount(kernel, JAIL_KERNEL)?;
                }
                if let Some(initrd) = &initrd {
                    mount(initrd, JAIL_INITRD)?;
                }
                if let Some((state, mem)) = &snapshot {
                    mount(state, JAIL_SNAPSHOT_STATE)?;
                    mount(mem, JAIL_SNAPSHOT_MEM)?;
                }
                args.push("--".to_string());
                args.extend(serve_args(
                    id,
                    &jail_run.join("api.sock"),
                    &jail_run.join("console.log"),
                ));
                Plan {
                    id: id.to_string(),
                    command: CommandPlan {
                        program: jail.jailer.clone(),
                        args,
                    },
                    vm_kernel: PathBuf::from(JAIL_KERNEL),
                    vm_initrd: initrd.map(|_| PathBuf::from(JAIL_INITRD)),
                    vm_vsock_uds: jail_run.join("vsock.sock"),
                    vm_snapshot: snapshot.map(|_| {
                        (
                            PathBuf::from(JAIL_SNAPSHOT_STATE),
                            PathBuf::from(JAIL_SNAPSHOT_MEM),
                        )
                    }),
                    api_sock: run.join("api.sock"),
                    vsock_uds: run.join("vsock.sock"),
                    log,
                }
            }
        };
        for sock in [&plan.api_sock, &plan.vsock_uds] {
            if sock.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(Fault::bad_request(format!(
                    "sandbox {id}: its socket path {} is longer than Unix sockets allow \
                     ({MAX_SOCKET_PATH} bytes): use a shorter id or a shorter --state-dir",
                    sock.display()
                )));
            }
        }
        Ok(plan)
    }
}

impl LaunchConfig {
    /// Where the jailer serves jail `id`'s /run from: <base>/<exec file name>/<id>/run.
    fn jail_run_dir(&self, store: &Store, id: &str) -> Result<PathBuf, Fault> {
        let exec_name = self
            .agentvm
            .file_name()
            .ok_or_else(|| Fault::internal("the agentvm binary path has no file name"))?;
        Ok(store.jail_base().join(exec_name).join(id).join("run"))
    }

    /// The jailer's arguments every sandbox process gets: its identity, /dev/kvm, and the cgroup
    /// limits that stop a runaway process (memory in MiB, processes).
    fn jailer_args(
        &self,
        store: &Store,
        jail: &JailConfig,
        id: &str,
        memory_limit_mib: u64,
        pids_max: u32,
    ) -> Result<Vec<String>, Fault> {
        Ok(vec![
            "--id".to_string(),
            id.to_string(),
            "--exec-file".to_string(),
            path_arg(&self.agentvm)?,
            "--uid".to_string(),
            jail.uid.to_string(),
            "--gid".to_string(),
            jail.gid.to_string(),
            "--chroot-base-dir".to_string(),
            path_arg(&store.jail_base())?,
            "--device".to_string(),
            "kvm".to_string(),
            "--memory-limit-mib".to_string(),
            memory_limit_mib.to_string(),
            "--pids-max".to_string(),
            pids_max.to_string(),
        ])
    }
}

/// Where an isolate sandbox's module is kept, from the host's side.
pub fn module_file(store: &Store, id: &str) -> PathBuf {
    store.sandbox_dir(id).join("module.wasm")
}

/// An isolate sandbox's egress policy, as its worker reads it, from the host's side.
pub fn egress_policy_file(store: &Store, id: &str) -> PathBuf {
    store.sandbox_dir(id).join("egress-policy.json")
}

/// An isolate sandbox's egress audit log (one JSON line per fetch), from the host's side.
pub fn egress_audit_file(store: &Store, id: &str) -> PathBuf {
    store.sandbox_dir(id).join("egress-audit.jsonl")
}

impl LaunchConfig {
    /// Lays out isolate sandbox `id`'s files and its worker's command line (`agentvm isolate
    /// serve`), in a jail with /dev/kvm and the module (read-only) when jailed.
    pub fn plan_isolate(
        &self,
        store: &Store,
        id: &str,
        limits: &IsolateInfo,
    ) -> Result<Plan, Fault> {
        let dir = store.sandbox_dir(id);
        let module = module_file(store, id);
        let egress = limits.egress_audit.is_some();
        // (module, egress policy, egress audit log) as the worker sees them.
        let worker_args = |api_sock: &Path, files: [&Path; 3]| {
            let mut args = vec![
                "isolate".to_string(),
                "serve".to_string(),
                "--api-sock".to_string(),
                api_sock.display().to_string(),
                "--module".to_string(),
                files[0].display().to_string(),
                "--max-memory-mib".to_string(),
                limits.max_memory_mib.to_string(),
                "--cpu-limit-ms".to_string(),
                limits.cpu_limit_ms.to_string(),
                "--wall-limit-ms".to_string(),
                limits.wall_limit_ms.to_string(),
                "--sandbox-id".to_string(),
                id.to_string(),
            ];
            if egress {
                args.extend([
                    "--egress-policy".to_string(),
                    files[1].display().to_string(),
                    "--egress-audit".to_string(),
                    files[2].display().to_string(),
                ]);
            }
            args
        };
        let (policy, audit) = (egress_policy_file(store, id), egress_audit_file(store, id));
        let (command, api_sock) = match &self.jail {
            None => {
                let api_sock = dir.join("api.sock");
                let command = CommandPlan {
                    program: self.agentvm.clone(),
                    args: worker_args(&api_sock, [&module, &policy, &audit]),
                };
                (command, api_sock)
            }
            Some(jail) => {
                let run = self.jail_run_dir(store, id)?;
                // The template's RAM (module-sized input, linear memory, the interpreter's heap)
                // and one isolate's private pages, plus the worker's own.
                let memory_mib = 2 * (u64::from(limits.max_memory_mib) + 64)
                    + limits.module_bytes.div_ceil(1 << 20) * 2
                    + 256;
                let mut args = self.jailer_args(store, jail, id, memory_mib, 64)?;
                args.extend([
                    "--mount".to_string(),
                    format!("{}:{JAIL_MODULE}", path_arg(&module)?),
                ]);
                if egress {
                    // The worker resolves names itself (agentvm's own resolver, from these two
                    // files) and appends to the audit log, which stays in the sandbox's directory.
                    for file in ["/etc/hosts", "/etc/resolv.conf"] {
                        if Path::new(file).exists() {
                            args.extend(["--mount".to_string(), format!("{file}:{file}")]);
                        }
                    }
                    args.extend([
                        "--mount".to_string(),
                        format!("{}:{JAIL_EGRESS_POLICY}", path_arg(&policy)?),
                        "--mount".to_string(),
                        format!("{}:{JAIL_EGRESS_AUDIT}:rw", path_arg(&audit)?),
                    ]);
                }
                args.push("--".to_string());
                args.extend(worker_args(
                    &Path::new("/run").join("api.sock"),
                    [
                        Path::new(JAIL_MODULE),
                        Path::new(JAIL_EGRESS_POLICY),
                        Path::new(JAIL_EGRESS_AUDIT),
                    ],
                ));
                let command = CommandPlan {
                    program: jail.jailer.clone(),
                    args,
                };
                (command, run.join("api.sock"))
            }
        };
        if api_sock.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Fault::bad_request(format!(
                "sandbox {id}: its socket path {} is longer than Unix sockets allow \
                 ({MAX_SOCKET_PATH} bytes): use a shorter id or a shorter --state-dir",
                api_sock.display()
            )));
        }
        Ok(Plan {
            id: id.to_string(),
            api_sock,
            vsock_uds: PathBuf::new(),
            log: dir.join("vmm.log"),
            command,
            vm_kernel: PathBuf::new(),
            vm_initrd: None,
            vm_vsock_uds: PathBuf::new(),
            vm_snapshot: None,
        })
    }
}

fn serve_args(id: &str, api_sock: &Path, console: &Path) -> Vec<String> {
    vec![
        "serve".to_string(),
        "--api-sock".to_string(),
        api_sock.display().to_string(),
        "--id".to_string(),
        id.to_string(),
        "--console".to_string(),
        console.display().to_string(),
    ]
}

/// Paths go on command lines and into `SRC:DST` mount specs: refuse what would be misread.
fn path_arg(path: &Path) -> Result<String, Fault> {
    match path.to_str() {
        Some(s) if !s.contains(':') => Ok(s.to_string()),
        _ => Err(Fault::bad_request(format!(
            "{}: paths handed to the jailer must be UTF-8 without ':'",
            path.display()
        ))),
    }
}

impl Plan {
    /// Starts the VMM process, detached from the daemon.
    pub fn spawn(&self) -> Result<Child, Fault> {
        let mut command = Command::new(&self.command.program);
        command.args(&self.command.args);
        crate::process::spawn_detached(command, &self.log).map_err(Fault::internal)
    }

    /// Waits for the API socket to answer, as long as `alive` says the process runs.
    pub async fn wait_for_api(
        &self,
        deadline: Instant,
        alive: impl Fn() -> bool,
    ) -> Result<(), Fault> {
        loop {
            if std::os::unix::net::UnixStream::connect(&self.api_sock).is_ok() {
                return Ok(());
            }
            if !alive() {
                return Err(self.died("before its API socket appeared"));
            }
            if Instant::now() >= deadline {
                return Err(Fault::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "sandbox {}: the VMM's API socket {} did not appear in time{}",
                        self.id,
                        self.api_sock.display(),
                        self.log_tail()
                    ),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The Firecracker-style configuration calls.
    pub async fn configure(&self, template: &Template) -> Result<(), Fault> {
        let mut boot_source = serde_json::json!({ "kernel_image_path": self.vm_kernel });
        if let Some(initrd) = &self.vm_initrd {
            boot_source["initrd_path"] = serde_json::json!(initrd);
        }
        if let Some(args) = &template.boot_args {
            boot_source["boot_args"] = serde_json::json!(args);
        }
        let calls = [
            ("/boot-source", boot_source),
            (
                "/machine-config",
                serde_json::json!({
                    "vcpu_count": template.vcpu_count,
                    "mem_size_mib": template.mem_size_mib,
                }),
            ),
            (
                "/vsock",
                serde_json::json!({ "guest_cid": GUEST_CID, "uds_path": self.vm_vsock_uds }),
            ),
        ];
        for (path, body) in calls {
            self.put(path, body).await?;
        }
        Ok(())
    }

    pub async fn instance_start(&self) -> Result<(), Fault> {
        self.put(
            "/actions",
            serde_json::json!({ "action_type": "InstanceStart" }),
        )
        .await
    }

    /// `PUT /snapshot/load` of the hibernation snapshot, resuming the guest.
    pub async fn load_snapshot(&self) -> Result<(), Fault> {
        let Some((state, mem)) = &self.vm_snapshot else {
            return Err(Fault::internal(format!(
                "sandbox {}: this VMM was not planned to resume from a snapshot",
                self.id
            )));
        };
        let body = serde_json::json!({
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "resume_vm": true,
        });
        self.put_within("/snapshot/load", body, SNAPSHOT_TIMEOUT)
            .await
    }

    /// Has the (paused) VMM write its snapshot beside its sockets (inside its jail's /run when
    /// jailed, where it may write); returns the host paths of the state and memory files.
    pub async fn create_snapshot(&self) -> Result<(PathBuf, PathBuf), Fault> {
        let (vm_dir, host_dir) = match (self.vm_vsock_uds.parent(), self.vsock_uds.parent()) {
            (Some(vm), Some(host)) => (vm, host),
            _ => return Err(Fault::internal("the sandbox's sockets have no directory")),
        };
        let body = serde_json::json!({
            "snapshot_path": vm_dir.join(HIBERNATE_STATE),
            "mem_file_path": vm_dir.join(HIBERNATE_MEM),
        });
        self.put_within("/snapshot/create", body, SNAPSHOT_TIMEOUT)
            .await?;
        Ok((host_dir.join(HIBERNATE_STATE), host_dir.join(HIBERNATE_MEM)))
    }

    async fn put(&self, path: &str, body: serde_json::Value) -> Result<(), Fault> {
        self.put_within(path, body, CALL_TIMEOUT).await
    }

    async fn put_within(
        &self,
        path: &str,
        body: serde_json::Value,
        timeout: Duration,
    ) -> Result<(), Fault> {
        let answer = vm_client::call(&self.api_sock, Method::PUT, path, Some(body), timeout)
            .await
            .map_err(|e| Fault::unavailable(format!("sandbox {}: {e}", self.id)))?;
        if answer.status.is_success() {
            return Ok(());
        }
        // The VMM's own refusal (a missing kernel, a bad size): the caller's to fix.
        let status = if answer.status.is_client_error() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        Err(Fault::new(
            status,
            format!(
                "sandbox {}: the VMM refused PUT {path}: {}",
                self.id,
                answer.fault_message()
            ),
        ))
    }

    /// Waits until the guest agent answers through the VMM (`GET /sandbox/files/list?path=/`).
    pub async fn wait_for_agent(
        &self,
        deadline: Instant,
        alive: impl Fn() -> bool,
    ) -> Result<(), Fault> {
        let mut last = String::from("no answer yet");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Fault::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "sandbox {}: the guest agent did not answer in time (last: {last}){}",
                        self.id,
                        self.log_tail()
                    ),
                ));
            }
            match vm_client::call(
                &self.api_sock,
                Method::GET,
                "/sandbox/files/list?path=/",
                None,
                left.max(Duration::from_millis(100)),
            )
            .await
            {
                Ok(answer) if answer.status == StatusCode::OK => return Ok(()),
                Ok(answer) => last = format!("{}: {}", answer.status, answer.fault_message()),
                Err(e) => last = e,
            }
            if !alive() {
                return Err(self.died("while the guest booted"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The refusal an isolate worker wrote before it ended (see [`MODULE_REFUSED`]), if any.
    pub fn module_refusal(&self) -> Option<String> {
        crate::process::log_tail(&self.log, 20)
            .lines()
            .rev()
            .find_map(|line| line.strip_prefix(MODULE_REFUSED))
            .map(|rest| rest.trim().to_string())
    }

    pub fn died(&self, when: &str) -> Fault {
        Fault::internal(format!(
            "sandbox {}: the VMM ended {when}{}",
            self.id,
            self.log_tail()
        ))
    }

    fn log_tail(&self) -> String {
        let tail = crate::process::log_tail(&self.log, 8);
        if tail.is_empty() {
            String::new()
        } else {
            format!("; its log ({}) ends:\n{tail}", self.log.display())
        }
    }
}
