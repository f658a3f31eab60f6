//! The daemon API's JSON bodies.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Longest sandbox ID: keeps the sockets under the state directory within Unix socket path limits.
pub const MAX_ID_LEN: usize = 40;
pub const MAX_VCPUS: u8 = 16;
pub const MIN_MEM_MIB: u64 = 16;
pub const MAX_MEM_MIB: u64 = 64 * 1024;
pub const DEFAULT_CREATE_TIMEOUT_S: u64 = 120;
pub const MAX_CREATE_TIMEOUT_S: u64 = 600;

/// What a sandbox boots: `PUT /templates/{name}`, or inline in `POST /sandboxes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    /// The kernel command line; the VMM's default for Linux guests when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default = "default_vcpus")]
    pub vcpu_count: u8,
    #[serde(default = "default_mem")]
    pub mem_size_mib: u64,
    /// Whether the guest runs the agentvm guest agent: then a create returns once the agent
    /// answers, and exec/files work.
    #[serde(default = "default_true")]
    pub agent: bool,
}

fn default_vcpus() -> u8 {
    1
}

fn default_mem() -> u64 {
    256
}

fn default_true() -> bool {
    true
}

/// `POST /sandboxes`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// The sandbox's stable ID; generated when absent.
    pub id: Option<String>,
    /// A template name (`default`: the prepared Debian kernel and agent initramfs).
    pub template: Option<String>,
    /// Overrides of the template's fields.
    pub kernel_image_path: Option<PathBuf>,
    pub initrd_path: Option<PathBuf>,
    pub boot_args: Option<String>,
    pub vcpu_count: Option<u8>,
    pub mem_size_mib: Option<u64>,
    pub agent: Option<bool>,
    /// How long the create may take, booting included (default 120 s).
    pub timeout_s: Option<u64>,
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Its VMM is starting and booting the guest.
    Starting,
    Running,
    Paused,
    /// Stopped by `POST /sandboxes/{id}/stop`.
    Stopped,
    /// Its VMM ended by itself (the guest powered off, or crashed: see `ended`).
    Exited,
    /// Its create failed: see `ended`.
    Failed,
    /// Its VMM was gone when the daemon restarted.
    Lost,
    /// Snapshotted to the state directory and its VMM ended (`POST /sandboxes/{id}/hibernate`);
    /// `POST /sandboxes/{id}/resume` or the next agent request restores it.
    Hibernated,
}

impl SandboxState {
    pub fn is_live(self) -> bool {
        matches!(self, Self::Starting | Self::Running | Self::Paused)
    }
}

/// A sandbox as the API shows it, and as its record in the state directory holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxInfo {
    pub id: String,
    pub template: String,
    pub state: SandboxState,
    /// UNIX time in milliseconds.
    pub created_at_ms: u64,
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    pub agent: bool,
    pub jailed: bool,
    /// The VMM process (the jailer when jailed), while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The per-VM API socket (Firecracker-compatible `agentvm serve` API).
    pub api_sock: PathBuf,
    /// The VM's vsock Unix socket (hybrid vsock, as Firecracker's).
    pub vsock_uds: PathBuf,
    /// Why the sandbox is not running any more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
}
