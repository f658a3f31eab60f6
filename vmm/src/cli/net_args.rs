//! The network flags `agentvm boot` and `agentvm run` share: a NIC exists only when a policy is
//! given, and then everything it sends passes the egress filter.

use std::path::PathBuf;

use clap::Args;
use vmm::config::NetConfig;

#[derive(Args, Debug, Clone, Default)]
pub struct NetArgs {
    /// Give the guest a NIC behind the VMM's egress filter, allowing only what this policy file
    /// (JSON, or TOML by its `.toml` name) allows. Without it the guest has no network at all.
    #[arg(long, value_name = "FILE")]
    pub egress_policy: Option<PathBuf>,
    /// Append the egress audit log (one JSON line per DNS answer, connection and HTTP request)
    /// to this file.
    #[arg(long, value_name = "FILE", requires = "egress_policy")]
    pub egress_audit: Option<PathBuf>,
    /// Also trust the certificates in this PEM file for the real servers behind intercepted
    /// HTTPS (rules with `inject_headers`), on top of the compiled-in Mozilla roots: a corporate
    /// proxy's CA, a test server's. Repeatable.
    #[arg(long, value_name = "FILE", requires = "egress_policy")]
    pub egress_upstream_ca: Vec<PathBuf>,
}

impl NetArgs {
    /// The NIC's configuration with its policy loaded (every mistake in the file named), or
    /// None when no policy was given.
    pub fn to_config(&self, sandbox: &str) -> Result<Option<NetConfig>, String> {
        let Some(path) = &self.egress_policy else {
            return Ok(None);
        };
        let policy = egress::policy::Policy::from_file(path).map_err(|e| e.to_string())?;
        if let Some(audit) = &self.egress_audit {
            let dir = audit.parent().filter(|d| !d.as_os_str().is_empty());
            if let Some(dir) = dir {
                if !dir.is_dir() {
                    return Err(format!(
                        "--egress-audit {}: directory {} does not exist",
                        audit.display(),
                        dir.display()
                    ));
                }
            }
        }
        // Read here so a bad file is named before anything starts (the egress thread reads them
        // again when it starts).
        egress::tls::upstream_client_config(&self.egress_upstream_ca)
            .map_err(|e| format!("--egress-upstream-ca: {e}"))?;
        Ok(Some(NetConfig {
            policy,
            audit_log: self.egress_audit.clone(),
            sandbox: sandbox.to_string(),
            upstream_roots: self.egress_upstream_ca.clone(),
        }))
    }
}
