//! `agentvm serve --config-file vm.json`: Firecracker's configuration file, whose sections carry
//! the same bodies as the API's PUT requests.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::models::{
    AuditLogConfig, BootSource, Logger, MachineConfig, Metrics, NetworkInterface, Vsock,
};

#[derive(Debug, Clone, PartialEq)]
pub struct ConfigFile {
    pub boot_source: BootSource,
    pub machine_config: Option<MachineConfig>,
    pub vsock: Option<Vsock>,
    pub logger: Option<Logger>,
    pub metrics: Option<Metrics>,
    pub network_interfaces: Vec<NetworkInterface>,
    /// agentvm extension: the exec audit log (as `PUT /audit-log`).
    pub audit_log: Option<AuditLogConfig>,
    /// agentvm extension: the egress policy (as `PUT /egress/policy`), checked when applied.
    pub egress_policy: Option<Value>,
}

const SECTIONS: [&str; 8] = [
    "boot-source",
    "machine-config",
    "vsock",
    "logger",
    "metrics",
    "network-interfaces",
    "audit-log",
    "egress-policy",
];

impl ConfigFile {
    pub fn read(path: &Path) -> Result<Self, String> {
        let text =
            std::fs::read(path).map_err(|e| format!("config file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// Every error names the section (and serde names the field).
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        let mut sections: Map<String, Value> =
            serde_json::from_slice(text).map_err(|e| format!("not a JSON object: {e}"))?;
        if let Some(unknown) = sections.keys().find(|k| !SECTIONS.contains(&k.as_str())) {
            return Err(format!(
                "unknown section {unknown:?} (known: {})",
                SECTIONS.join(", ")
            ));
        }
        let boot_source = section(&mut sections, "boot-source")?
            .ok_or("the \"boot-source\" section is required")?;
        Ok(Self {
            boot_source,
            machine_config: section(&mut sections, "machine-config")?,
            vsock: section(&mut sections, "vsock")?,
            logger: section(&mut sections, "logger")?,
            metrics: section(&mut sections, "metrics")?,
            network_interfaces: section(&mut sections, "network-interfaces")?.unwrap_or_default(),
            audit_log: section(&mut sections, "audit-log")?,
            egress_policy: section(&mut sections, "egress-policy")?,
        })
    }
}

fn section<T: DeserializeOwned>(
    sections: &mut Map<String, Value>,
    name: &str,
) -> Result<Option<T>, String> {
    match sections.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => serde_json::from_value(value)
            .map(Some)
            .map_err(|e| format!("section {name:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_parse_and_errors_name_them() {
        let ok = ConfigFile::parse(
            br#"{"boot-source": {"kernel_image_path": "/k", "boot_args": "x"},
                 "machine-config": {"vcpu_count": 2, "mem_size_mib": 64},
                 "audit-log": {"path": "/tmp/audit.log"}}"#,
        )
        .unwrap();
        assert_eq!(
            ok.audit_log.as_ref().map(|a| a.path.as_path()),
            Some(Path::new("/tmp/audit.log"))
        );
        assert_eq!(ok.boot_source.boot_args.as_deref(), Some("x"));
        assert_eq!(ok.machine_config.unwrap().vcpu_count, 2);
        let with_policy = ConfigFile::parse(
            br#"{"boot-source": {"kernel_image_path": "/k"}, "egress-policy": {"rules": []}}"#,
        )
        .unwrap();
        assert_eq!(
            with_policy.egress_policy,
            Some(serde_json::json!({"rules": []}))
        );
        let err = ConfigFile::parse(
            br#"{"boot-source": {"kernel_image_path": "/k"},
                 "machine-config": {"vcpu_count": 2, "mem_size_mib": 64, "cpus": 1}}"#,
        )
        .unwrap_err();
        assert!(
            err.contains("\"machine-config\"") && err.contains("cpus"),
            "{err}"
        );
        let missing = ConfigFile::parse(br#"{"machine-config": null}"#).unwrap_err();
        assert!(missing.contains("boot-source"), "{missing}");
        let unknown =
            ConfigFile::parse(br#"{"boot-source": {"kernel_image_path": "/k"}, "drives": []}"#)
                .unwrap_err();
        assert!(unknown.contains("\"drives\""), "{unknown}");
        assert!(ConfigFile::parse(b"[1]")
            .unwrap_err()
            .contains("not a JSON object"));
    }
}
