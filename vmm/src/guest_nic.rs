//! The guest's NIC: a virtio-net device whose wire is a socket pair to the egress filter's
//! thread ("net"), which terminates the guest's traffic in a userspace stack and re-originates
//! only what the policy allows. Nothing here touches a host interface.

use std::sync::mpsc;
use std::time::Duration;

use agentvm_protocol::net::{GUEST_MAC, LINK_MTU};
use devices::virtio::net::{frame_channel, Net, NetCounts, NetMetrics, NetState};
use egress::audit::AuditLog;
use egress::{EgressConfig, EgressHandle, EgressStats, EgressStatsReader, ResolverConfig};

use crate::config::NetConfig;
use crate::device_manager::DeviceError;
use crate::seccomp::{ThreadKind, ThreadSeccomp};

/// How long the egress thread may take to put itself under its seccomp filter.
const FILTER_START_TIMEOUT: Duration = Duration::from_secs(10);

/// The NIC's frame counters and its egress filter's connection counters, readable from any
/// thread (the API's `GET /metrics`) while the device manager keeps the device and the filter.
#[derive(Clone)]
pub struct NetCountsReader {
    pub(crate) device: NetMetrics,
    pub(crate) egress: EgressStatsReader,
}

impl NetCountsReader {
    /// Both sets of counters now.
    pub fn read(&self) -> (NetCounts, EgressStats) {
        (self.device.snapshot(), self.egress.read())
    }
}

/// Creates the device and starts its egress filter (under the `egress` seccomp filter). With
/// `restored`, the device is the one a snapshot saved (its MAC and MTU), behind a new filter:
/// connections the guest had open are unknown to it and reset when the guest next sends on
/// them, names are answered afresh, and TLS interception gets a new CA, which the guest agent
/// fetches again in its after-restore step.
pub fn create(
    config: &NetConfig,
    seccomp: ThreadSeccomp,
    restored: Option<&NetState>,
) -> Result<(Net, EgressHandle), DeviceError> {
    let fail = |reason: String| DeviceError::Create {
        what: "virtio-net",
        reason,
    };
    let (device_end, filter_end) =
        frame_channel().map_err(|e| fail(format!("cannot create its frame socket pair: {e}")))?;
    let device = match restored {
        Some(state) => Net::restore(state, device_end),
        None => Net::new(GUEST_MAC, LINK_MTU, device_end),
    }
    .map_err(|e| fail(e.to_string()))?;
    let audit = match &config.audit_log {
        Some(path) => AuditLog::open(path).map_err(|e| fail(e.to_string()))?,
        None => AuditLog::disabled(),
    };
    let resolver = ResolverConfig::system().map_err(|e| {
        fail(format!(
            "cannot read the host's resolver configuration: {e}"
        ))
    })?;
    let (filtered_tx, filtered) = mpsc::channel();
    let egress = egress::spawn_with_hook(
        EgressConfig {
            policy: config.policy.clone(),
            audit,
            sandbox: config.sandbox.clone(),
            resolver,
            extra_upstream_roots: config.upstream_roots.clone(),
        },
        filter_end,
        Some(Box::new(move || {
            let entered = seccomp.enter(ThreadKind::Egress).map_err(|e| e.to_string());
            let _ = filtered_tx.send(entered.clone());
            entered
        })),
    )
    .map_err(|e| fail(format!("cannot start the egress filter: {e}")))?;
    match filtered.recv_timeout(FILTER_START_TIMEOUT) {
        Ok(Ok(())) => Ok((device, egress)),
        Ok(Err(e)) => Err(DeviceError::Seccomp(format!("egress thread: {e}"))),
        Err(_) => Err(DeviceError::Seccomp(format!(
            "the egress thread did not enter its seccomp filter within {FILTER_START_TIMEOUT:?}"
        ))),
    }
}
