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
/// Largest module an isolate sandbox takes (the isolate's default input size).
pub const MAX_MODULE_BYTES: usize = 8 << 20;
/// An isolate call's limits: defaults, and the most `limits` may ask for.
pub const DEFAULT_CPU_LIMIT_MS: u64 = 10_000;
pub const MAX_CPU_LIMIT_MS: u64 = 600_000;
pub const DEFAULT_WALL_LIMIT_MS: u64 = 60_000;
pub const MAX_WALL_LIMIT_MS: u64 = 600_000;
pub const DEFAULT_MAX_MEMORY_MIB: u32 = 64;
pub const MAX_MAX_MEMORY_MIB: u32 = 4096;

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

/// What a sandbox is: a microVM running a Linux guest (with the guest agent), or an isolate
/// running a WebAssembly module (no OS; `POST /sandboxes/{id}/call`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    #[default]
    Microvm,
    Isolate,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Microvm => "microvm",
            Tier::Isolate => "isolate",
        }
    }
}

/// An isolate sandbox's limits as `POST /sandboxes` asks for them (defaults when absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IsolateLimitsRequest {
    pub cpu_limit_ms: Option<u64>,
    pub wall_limit_ms: Option<u64>,
    pub max_memory_mib: Option<u32>,
}

/// An isolate sandbox as it runs: its module's size and the limits of every call (each call may
/// ask for less).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsolateInfo {
    pub module_bytes: u64,
    pub cpu_limit_ms: u64,
    pub wall_limit_ms: u64,
    pub max_memory_mib: u32,
    /// Where the egress audit log of its fetches is (one JSON line each), when it has an egress
    /// policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_audit: Option<PathBuf>,
}

/// `POST /sandboxes`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// The sandbox's stable ID; generated when absent.
    pub id: Option<String>,
    /// `microvm` (the default) or `isolate`.
    pub tier: Option<Tier>,
    /// Tier isolate: the WebAssembly module (binary), base64.
    pub module_base64: Option<String>,
    /// Tier isolate: the limits of its calls.
    pub limits: Option<IsolateLimitsRequest>,
    /// Tier isolate: what the module's `agentvm.fetch` may reach (the egress policy format;
    /// credential headers `from_env` only, read from the daemon's environment). Without it every
    /// fetch is denied.
    pub egress_policy: Option<serde_json::Value>,
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
    /// Records written before isolates existed are microVMs.
    #[serde(default)]
    pub tier: Tier,
    /// `(isolate)` for an isolate sandbox.
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
    /// The VM's vsock Unix socket (hybrid vsock, as Firecracker's); none for an isolate.
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub vsock_uds: PathBuf,
    /// Tier isolate: its module and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolate: Option<IsolateInfo>,
    /// Why the sandbox is not running any more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
}

fn is_empty_path(path: &std::path::Path) -> bool {
    path.as_os_str().is_empty()
}
