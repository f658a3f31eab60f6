//! Isolate sandboxes (`"tier": "isolate"`): a WebAssembly module served by its own worker process
//! (`agentvm isolate serve`, jailed like a VMM), whose `POST /call` the daemon forwards. The
//! routes of one tier refuse sandboxes of the other with 400.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;

use super::{not_running, now_ms, Sandboxes};
use crate::fault::Fault;
use crate::launcher::{egress_audit_file, egress_policy_file, module_file, Plan};
use crate::model::*;
use crate::store::SandboxRecord;

impl Sandboxes {
    /// `POST /sandboxes` with `"tier": "isolate"`: returns once the worker has accepted the
    /// module and answers on its socket. A module the isolate refuses is a 400 naming why.
    pub(super) async fn create_isolate(
        self: &Arc<Self>,
        id: String,
        request: CreateSandbox,
        deadline: Instant,
    ) -> Result<SandboxInfo, Fault> {
        refuse_microvm_fields(&request)?;
        let module = decode_module(request.module_base64.as_deref())?;
        let mut limits = resolve_limits(request.limits.as_ref(), module.len())?;
        let policy = check_egress_policy(request.egress_policy.as_ref())?;
        if policy.is_some() {
            limits.egress_audit = Some(egress_audit_file(&self.store, &id));
        }
        let plan = self.launch.plan_isolate(&self.store, &id, &limits)?;
        let record = SandboxRecord {
            info: SandboxInfo {
                id: id.clone(),
                tier: Tier::Isolate,
                template: "(isolate)".into(),
                state: SandboxState::Starting,
                created_at_ms: now_ms(),
                vcpu_count: 1,
                mem_size_mib: u64::from(limits.max_memory_mib),
                agent: false,
                jailed: self.launch.jail.is_some(),
                pid: None,
                api_sock: plan.api_sock.clone(),
                vsock_uds: PathBuf::new(),
                isolate: Some(limits),
                ended: None,
            },
            pid_start_ticks: None,
            booted: false,
        };
        self.insert_new(record)?;
        let started = self
            .start_isolate(&plan, &module, policy.as_deref(), deadline)
            .await;
        self.finish_create(&id, started).await
    }

    async fn start_isolate(
        self: &Arc<Self>,
        plan: &Plan,
        module: &[u8],
        egress_policy: Option<&str>,
        deadline: Instant,
    ) -> Result<(), Fault> {
        let file = module_file(&self.store, &plan.id);
        std::fs::write(&file, module)
            .map_err(|e| Fault::internal(format!("cannot write {}: {e}", file.display())))?;
        if let Some(policy) = egress_policy {
            self.write_egress_files(&plan.id, policy)?;
        }
        let pid = self.spawn_vmm(plan)?;
        let alive = || {
            self.get(&plan.id)
                .map(|i| i.pid == Some(pid))
                .unwrap_or(false)
        };
        if let Err(fault) = plan.wait_for_api(deadline, alive).await {
            return Err(match plan.module_refusal() {
                Some(why) => {
                    Fault::bad_request(format!("sandbox {}: the module is refused: {why}", plan.id))
                }
                None => fault,
            });
        }
        self.update(&plan.id, |r| r.booted = true);
        Ok(())
    }

    /// The worker's egress policy file and its audit log (created here, so that a jailed worker,
    /// which gets it as a mount, can append to it as the jail's user).
    fn write_egress_files(&self, id: &str, policy: &str) -> Result<(), Fault> {
        let internal = |path: &std::path::Path, e: std::io::Error| {
            Fault::internal(format!("cannot write {}: {e}", path.display()))
        };
        let policy_file = egress_policy_file(&self.store, id);
        std::fs::write(&policy_file, policy).map_err(|e| internal(&policy_file, e))?;
        let audit = egress_audit_file(&self.store, id);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&audit)
            .map_err(|e| internal(&audit, e))?;
        if let Some(jail) = &self.launch.jail {
            std::os::unix::fs::chown(&audit, Some(jail.uid), Some(jail.gid))
                .map_err(|e| internal(&audit, e))?;
        }
        Ok(())
    }

    /// 400 unless sandbox `id` is of `tier`: `what` (the route) needs it.
    pub fn require_tier(&self, id: &str, tier: Tier, what: &str) -> Result<(), Fault> {
        let info = self.get(id)?;
        if info.tier == tier {
            return Ok(());
        }
        let article = match info.tier {
            Tier::Isolate => "an",
            Tier::Microvm => "a",
        };
        Err(Fault::bad_request(format!(
            "sandbox {id} is {article} {} sandbox; {what} needs tier {}",
            info.tier.as_str(),
            tier.as_str()
        )))
    }

    /// The worker socket of a running isolate sandbox, for `POST /sandboxes/{id}/call`.
    pub fn isolate_sock(&self, id: &str) -> Result<PathBuf, Fault> {
        let info = self.get(id)?;
        if info.state != SandboxState::Running {
            return Err(not_running(&info));
        }
        Ok(info.api_sock)
    }

    /// A stopped isolate sandbox keeps its record, not its module.
    pub(super) fn remove_isolate_files(&self, id: &str) {
        if !matches!(self.get(id), Ok(info) if info.tier == Tier::Isolate) {
            return;
        }
        // The egress audit log stays with the record: it is what the sandbox did.
        for file in [
            module_file(&self.store, id),
            egress_policy_file(&self.store, id),
        ] {
            if let Err(e) = std::fs::remove_file(&file) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove {}: {e}", file.display());
                }
            }
        }
    }
}

/// The fields of a microVM create, given with `"tier": "isolate"`.
fn refuse_microvm_fields(request: &CreateSandbox) -> Result<(), Fault> {
    let given = [
        ("template", request.template.is_some()),
        ("kernel_image_path", request.kernel_image_path.is_some()),
        ("initrd_path", request.initrd_path.is_some()),
        ("boot_args", request.boot_args.is_some()),
        ("vcpu_count", request.vcpu_count.is_some()),
        ("mem_size_mib", request.mem_size_mib.is_some()),
        ("agent", request.agent.is_some()),
    ];
    match given.iter().find(|(_, set)| *set) {
        Some((field, _)) => Err(Fault::bad_request(format!(
            "{field} is a field of tier microvm; an isolate sandbox takes module_base64 and \
             limits"
        ))),
        None => Ok(()),
    }
}

/// The fields of an isolate create, given without `"tier": "isolate"`.
pub(super) fn refuse_isolate_fields(request: &CreateSandbox) -> Result<(), Fault> {
    let given = [
        ("module_base64", request.module_base64.is_some()),
        ("limits", request.limits.is_some()),
        ("egress_policy", request.egress_policy.is_some()),
    ];
    match given.iter().find(|(_, set)| *set) {
        Some((field, _)) => Err(Fault::bad_request(format!(
            "{field} is a field of tier isolate; add \"tier\": \"isolate\" (a microVM sandbox \
             boots a template)"
        ))),
        None => Ok(()),
    }
}

/// The policy as the worker's file holds it, checked here so that a mistake is the create's 400.
/// Credential headers come `from_env` only (the daemon's environment, which the worker
/// inherits): a `from_file` secret would let an API caller have the daemon read any host file
/// into requests to a host the caller chose.
fn check_egress_policy(policy: Option<&serde_json::Value>) -> Result<Option<String>, Fault> {
    let Some(policy) = policy else {
        return Ok(None);
    };
    let text = policy.to_string();
    let options = egress::policy::ParseOptions {
        host_addresses: Vec::new(),
        secret_files: false,
    };
    egress::policy::Policy::from_json_str_with(&text, &options)
        .map_err(|e| Fault::bad_request(format!("egress_policy: {e}")))?;
    Ok(Some(text))
}

fn decode_module(encoded: Option<&str>) -> Result<Vec<u8>, Fault> {
    let encoded = encoded.ok_or_else(|| {
        Fault::bad_request("an isolate sandbox needs module_base64 (its WebAssembly module)")
    })?;
    // Base64 takes 4 characters for 3 bytes: refuse an oversized module before decoding it.
    if encoded.len() / 4 * 3 > MAX_MODULE_BYTES + 3 {
        return Err(too_large(encoded.len() / 4 * 3));
    }
    let module = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| Fault::bad_request(format!("module_base64 is not base64: {e}")))?;
    if module.len() > MAX_MODULE_BYTES {
        return Err(too_large(module.len()));
    }
    // The worker also reads text format; through the API only binaries go to it, so that no
    // host process parses WAT for a caller.
    if !module.starts_with(b"\0asm") {
        return Err(Fault::bad_request(
            "module_base64 is not a WebAssembly binary (it must start with \\0asm; compile text \
             format to a binary first)",
        ));
    }
    Ok(module)
}

fn too_large(size: usize) -> Fault {
    Fault::bad_request(format!(
        "the module is about {size} bytes; an isolate sandbox takes at most {MAX_MODULE_BYTES}"
    ))
}

fn resolve_limits(
    requested: Option<&IsolateLimitsRequest>,
    module_bytes: usize,
) -> Result<IsolateInfo, Fault> {
    let requested = requested.cloned().unwrap_or_default();
    let check = |what: &str, value: u64, max: u64| {
        if (1..=max).contains(&value) {
            Ok(value)
        } else {
            Err(Fault::bad_request(format!(
                "limits.{what} must be 1..={max}, got {value}"
            )))
        }
    };
    Ok(IsolateInfo {
        module_bytes: module_bytes as u64,
        cpu_limit_ms: check(
            "cpu_limit_ms",
            requested.cpu_limit_ms.unwrap_or(DEFAULT_CPU_LIMIT_MS),
            MAX_CPU_LIMIT_MS,
        )?,
        wall_limit_ms: check(
            "wall_limit_ms",
            requested.wall_limit_ms.unwrap_or(DEFAULT_WALL_LIMIT_MS),
            MAX_WALL_LIMIT_MS,
        )?,
        max_memory_mib: check(
            "max_memory_mib",
            u64::from(requested.max_memory_mib.unwrap_or(DEFAULT_MAX_MEMORY_MIB)),
            u64::from(MAX_MAX_MEMORY_MIB),
        )? as u32,
        egress_audit: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_policies_are_checked_and_take_no_secret_files() {
        assert_eq!(check_egress_policy(None).unwrap(), None);
        let ok = serde_json::json!({"rules": [{"cidr": "127.0.0.1/32", "ports": [80]}]});
        assert!(check_egress_policy(Some(&ok)).unwrap().is_some());
        let bad = serde_json::json!({"rules": [{"cidr": "not-a-net"}]});
        let fault = check_egress_policy(Some(&bad)).unwrap_err();
        assert!(
            fault.message.starts_with("egress_policy: "),
            "{}",
            fault.message
        );
        let file_secret = serde_json::json!({"rules": [{"domain": "api.example.com",
            "inject_headers": [{"name": "Authorization", "from_file": "/etc/shadow"}]}]});
        let fault = check_egress_policy(Some(&file_secret)).unwrap_err();
        assert!(fault.message.contains("from_file"), "{}", fault.message);
    }

    #[test]
    fn fields_of_the_other_tier_are_named() {
        let fault = refuse_microvm_fields(&CreateSandbox {
            vcpu_count: Some(2),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            fault
                .message
                .starts_with("vcpu_count is a field of tier microvm"),
            "{fault:?}"
        );
        let fault = refuse_isolate_fields(&CreateSandbox {
            limits: Some(IsolateLimitsRequest::default()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            fault
                .message
                .starts_with("limits is a field of tier isolate"),
            "{fault:?}"
        );
        assert!(refuse_isolate_fields(&CreateSandbox::default()).is_ok());
    }

    #[test]
    fn modules_and_limits_are_checked() {
        assert!(decode_module(None)
            .unwrap_err()
            .message
            .contains("needs module_base64"));
        assert!(decode_module(Some("%%%"))
            .unwrap_err()
            .message
            .contains("not base64"));
        // "hello" is no WebAssembly binary.
        assert!(decode_module(Some("aGVsbG8="))
            .unwrap_err()
            .message
            .contains("not a WebAssembly binary"));
        let huge = "A".repeat((MAX_MODULE_BYTES / 3 + 8) * 4);
        assert!(decode_module(Some(&huge))
            .unwrap_err()
            .message
            .contains("at most"));
        assert_eq!(
            decode_module(Some("AGFzbQEAAAA=")).unwrap(),
            b"\0asm\x01\0\0\0"
        );
        let limits = resolve_limits(None, 8).unwrap();
        assert_eq!(
            (
                limits.cpu_limit_ms,
                limits.wall_limit_ms,
                limits.max_memory_mib
            ),
            (
                DEFAULT_CPU_LIMIT_MS,
                DEFAULT_WALL_LIMIT_MS,
                DEFAULT_MAX_MEMORY_MIB
            )
        );
        let fault = resolve_limits(
            Some(&IsolateLimitsRequest {
                cpu_limit_ms: Some(0),
                ..Default::default()
            }),
            8,
        )
        .unwrap_err();
        assert!(
            fault.message.contains("limits.cpu_limit_ms must be"),
            "{fault:?}"
        );
    }
}
