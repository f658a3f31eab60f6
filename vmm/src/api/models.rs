//! Request and response bodies, with Firecracker's field names. Requests reject unknown fields.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::fault::Fault;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    /// The whole kernel command line (the VMM appends only its virtio-mmio device declarations);
    /// absent: the base Linux command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u64,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
}

impl Default for MachineConfig {
    /// Firecracker's defaults.
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigPatch {
    pub vcpu_count: Option<u64>,
    pub mem_size_mib: Option<u64>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
    /// Deprecated in Firecracker; accepted and ignored.
    #[serde(default)]
    pub vsock_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default)]
    pub guest_mac: Option<String>,
    #[serde(default)]
    pub rx_rate_limiter: Option<serde_json::Value>,
    #[serde(default)]
    pub tx_rate_limiter: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
    #[serde(default)]
    pub snapshot_type: Option<SnapshotType>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MemBackendType {
    File,
    Uffd,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    pub backend_path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    pub snapshot_path: PathBuf,
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    #[serde(default)]
    pub enable_diff_snapshots: Option<bool>,
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    #[serde(default)]
    pub resume_vm: Option<bool>,
    #[serde(default)]
    pub network_overrides: Option<Vec<serde_json::Value>>,
    /// Another Unix socket path (and optionally CID) for the restored VM's vsock device, so
    /// several VMs restored from one snapshot can run at once (agentvm's analogue of
    /// Firecracker's `network_overrides`).
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
    #[serde(default)]
    pub guest_cid: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VmStateRequest {
    Paused,
    Resumed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmPatch {
    pub state: VmStateRequest,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    #[serde(default)]
    pub log_path: Option<PathBuf>,
    /// Error, Warning, Info, Debug, Trace or Off (any case); Firecracker's default is Info.
    #[serde(default)]
    pub level: Option<String>,
    #[serde(default)]
    pub show_level: Option<bool>,
    #[serde(default)]
    pub show_log_origin: Option<bool>,
    /// Only log lines from this module path (e.g. `vmm::api`).
    #[serde(default)]
    pub module: Option<String>,
    /// agentvm extension: "Text" or "Json" (any case; one JSON object per line). Default: the
    /// process's `--log-format`.
    #[serde(default)]
    pub format: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub metrics_path: PathBuf,
}

/// `PUT /audit-log` (agentvm extension) and the config file's "audit-log" section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditLogConfig {
    /// Opened for appending (created if missing): one JSON line per `/sandbox/exec`.
    pub path: PathBuf,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    pub id: String,
    /// "Not started", "Running", "Paused" (Firecracker's), or "Stopped" once the guest ended.
    pub state: String,
    pub vmm_version: String,
    pub app_name: String,
    /// Why the VM stopped (only in state "Stopped").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_reason: Option<String>,
}

/// Parses a JSON request body into `T`: malformed JSON, unknown fields, wrong types and missing
/// fields are 400s naming the field and position.
pub fn parse_body<T: serde::de::DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, Fault> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Fault::bad_request(format!(
            "{what}: the request needs a JSON body"
        )));
    }
    serde_json::from_slice(body).map_err(|e| Fault::bad_request(format!("{what}: {e}")))
}

/// `POST /sandbox/exec`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxExec {
    /// argv; `cmd[0]` is looked up in `PATH` when it has no `/`.
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// A user name, a numeric uid, or `uid:gid` (default: the agent's user, root).
    #[serde(default)]
    pub user: Option<String>,
    /// The agent kills the process group after this long.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Written to the process's stdin, then end of file; without it stdin is /dev/null.
    #[serde(default)]
    pub stdin: Option<String>,
}

/// `POST /sandbox/pty`: a process on a new guest terminal.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxPty {
    /// argv; absent: `["sh"]`.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default = "default_cols")]
    pub cols: u16,
    #[serde(default = "default_rows")]
    pub rows: u16,
    /// `TERM` of the session; absent: "xterm".
    #[serde(default)]
    pub term: Option<String>,
    #[serde(default)]
    pub env: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// A user name, a numeric uid, or `uid:gid` (default: the agent's user, root).
    #[serde(default)]
    pub user: Option<String>,
    /// The agent kills the session's process group after this long.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

fn default_cols() -> u16 {
    80
}

fn default_rows() -> u16 {
    24
}

/// `POST /sandbox/pty/{id}/resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxPtyResize {
    pub cols: u16,
    pub rows: u16,
}

/// `GET /sandbox/pty/{id}`: a terminal session, running or ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SandboxPtyStatus {
    pub id: u64,
    pub running: bool,
    /// Set once the process exited normally.
    pub exit_code: Option<i32>,
    /// Set once a signal ended the process.
    pub signal: Option<i32>,
    /// Whether `timeout_ms` ended it.
    pub timed_out: bool,
    /// Why the session ended without an exit status (the guest agent went away).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One entry of `GET /sandbox/files/list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SandboxDirEntry {
    pub name: String,
    /// "file", "dir", "symlink" or "other".
    #[serde(rename = "type")]
    pub file_type: &'static str,
    pub size: u64,
    pub mode: u32,
    pub mtime_ns: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_reject_unknown_fields_wrong_types_and_bad_json() {
        let ok: MachineConfig =
            parse_body("m", br#"{"vcpu_count": 2, "mem_size_mib": 64}"#).unwrap();
        assert_eq!((ok.vcpu_count, ok.smt), (2, false));
        let unknown =
            parse_body::<MachineConfig>("m", br#"{"vcpu_count":1,"mem_size_mib":64,"x":1}"#)
                .unwrap_err();
        assert!(unknown.message.contains("unknown field `x`"), "{unknown:?}");
        let wrong = parse_body::<MachineConfig>("m", br#"{"vcpu_count":"2","mem_size_mib":64}"#)
            .unwrap_err();
        assert!(wrong.message.contains("invalid type"), "{wrong:?}");
        let bad = parse_body::<Action>("a", b"{").unwrap_err();
        assert!(bad.message.starts_with("a: "), "{bad:?}");
        let empty = parse_body::<Action>("a", b" ").unwrap_err();
        assert!(empty.message.contains("needs a JSON body"), "{empty:?}");
        let action = parse_body::<Action>("a", br#"{"action_type":"Reboot"}"#).unwrap_err();
        assert!(action.message.contains("unknown variant"), "{action:?}");
    }
}
