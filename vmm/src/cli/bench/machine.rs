//! Which machine the figures come from, read from /proc.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MachineInfo {
    pub cpu_model: String,
    /// Logical CPUs (`processor` entries in /proc/cpuinfo).
    pub cpus: usize,
    pub host_kernel: String,
    /// How this host's KVM relates to the hardware, in words.
    pub kvm: String,
}

impl MachineInfo {
    /// The `machine:` line of every benchmark table.
    pub fn describe(&self) -> String {
        format!(
            "machine: {}, {} CPUs, host kernel {}; {}",
            self.cpu_model, self.cpus, self.host_kernel, self.kvm
        )
    }

    pub fn read() -> MachineInfo {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let kvm = if vmm::host::can_run_linux() {
            "KVM with hardware virtualisation".to_string()
        } else {
            "nested KVM on a PVM host (guest ring 0 emulated; cannot run Linux)".to_string()
        };
        let (cpu_model, cpus) = parse_cpuinfo(&cpuinfo);
        MachineInfo {
            cpu_model,
            cpus,
            host_kernel,
            kvm,
        }
    }
}

fn parse_cpuinfo(cpuinfo: &str) -> (String, usize) {
    let value = |line: &str, key: &str| -> Option<String> {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    };
    let model = cpuinfo
        .lines()
        .find_map(|l| value(l, "model name"))
        .unwrap_or_else(|| "unknown".into());
    let cpus = cpuinfo
        .lines()
        .filter(|l| value(l, "processor").is_some())
        .count();
    (model, cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_and_count() {
        let text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n\n\
                    processor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(parse_cpuinfo(text), ("AMD EPYC 7B13".to_string(), 2));
        assert_eq!(parse_cpuinfo(""), ("unknown".to_string(), 0));
    }

    #[test]
    fn this_machine_is_described() {
        let m = MachineInfo::read();
        assert!(m.cpus >= 1);
        assert!(!m.host_kernel.is_empty());
    }
}
