//! The kernel command line as the agent needs it: its own `agentvm.*` keys, and the
//! `<module>.<param>=<value>` settings that the kernel applies only to built-in code. For loadable
//! modules modprobe normally reads them from /proc/cmdline; the agent loads modules itself, so it
//! has to do the same.

/// One `key` or `key=value` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    pub key: String,
    pub value: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCmdline {
    params: Vec<Param>,
}

/// Where /proc/cmdline lives in the guest.
pub const PROC_CMDLINE: &str = "/proc/cmdline";

impl KernelCmdline {
    /// Splits a command line the way the kernel's `next_arg()` does: whitespace separates items
    /// unless inside double quotes; quotes around the whole item or around the value are removed.
    /// Items after a bare `--` belong to init's argv, not to the kernel, and are dropped.
    pub fn parse(text: &str) -> Self {
        let mut params = Vec::new();
        let mut rest = text.trim_start();
        while !rest.is_empty() {
            let (param, remaining) = next_arg(rest);
            if param.key == "--" && param.value.is_none() {
                break;
            }
            params.push(param);
            rest = remaining.trim_start();
        }
        Self { params }
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The last occurrence of `key`, as the kernel's own handlers see it.
    pub fn get(&self, key: &str) -> Option<&Param> {
        self.params.iter().rev().find(|p| p.key == key)
    }

    pub fn value(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|p| p.value.as_deref())
    }

    /// `key`, `key=1`, `key=yes`... count as on; absent or `key=0|n|no|off|false` as off.
    pub fn flag(&self, key: &str) -> bool {
        match self.get(key) {
            None => false,
            Some(Param { value: None, .. }) => true,
            Some(Param { value: Some(v), .. }) => !matches!(
                v.to_ascii_lowercase().as_str(),
                "0" | "n" | "no" | "off" | "false"
            ),
        }
    }

    /// The parameter string for `finit_module` of `module`: every `<module>.<param>[=<value>]`
    /// item, in command-line order, as `param[=value]` separated by spaces. Module names match with
    /// `-` and `_` treated alike, as the kernel does. Values with whitespace are re-quoted, since the
    /// kernel parses this string with the same rules as the command line.
    pub fn module_params(&self, module: &str) -> String {
        let wanted = normalize_module_name(module);
        let mut out = Vec::new();
        for p in &self.params {
            let Some((prefix, name)) = p.key.split_once('.') else {
                continue;
            };
            if name.is_empty() || normalize_module_name(prefix) != wanted {
                continue;
            }
            out.push(match &p.value {
                None => name.to_string(),
                Some(v) if v.is_empty() || v.contains(|c: char| c.is_ascii_whitespace()) => {
                    format!("{name}=\"{v}\"")
                }
                Some(v) => format!("{name}={v}"),
            });
        }
        out.join(" ")
    }
}

/// `virtio-rng` and `virtio_rng` name the same module.
pub fn normalize_module_name(name: &str) -> String {
    name.replace('-', "_")
}

fn next_arg(args: &str) -> (Param, &str) {
    let bytes = args.as_bytes();
    let quoted = bytes.first() == Some(&b'"');
    let start = usize::from(quoted);
    let mut in_quote = quoted;
    let mut equals = None;
    let mut end = start;
    while end < bytes.len() {
        let c = bytes[end];
        if c.is_ascii_whitespace() && !in_quote {
            break;
        }
        if equals.is_none() && c == b'=' {
            equals = Some(end);
        }
        if c == b'"' {
            in_quote = !in_quote;
        }
        end += 1;
    }
    // Every index used below sits on an ASCII byte, hence on a char boundary.
    let param = match equals {
        None => {
            let mut key_end = end;
            if quoted && key_end > start && bytes[key_end - 1] == b'"' {
                key_end -= 1;
            }
            Param {
                key: args[start..key_end].to_string(),
                value: None,
            }
        }
        Some(eq) => {
            let mut value_start = eq + 1;
            let mut value_end = end;
            let mut strip_quote = quoted;
            if value_start < value_end && bytes[value_start] == b'"' {
                value_start += 1;
                strip_quote = true;
            }
            if strip_quote && value_end > value_start && bytes[value_end - 1] == b'"' {
                value_end -= 1;
            }
            Param {
                key: args[start..eq].to_string(),
                value: Some(args[value_start..value_end].to_string()),
            }
        }
    };
    (param, &args[end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: Option<&str>) -> Param {
        Param {
            key: key.to_string(),
            value: value.map(str::to_string),
        }
    }

    #[test]
    fn parses_a_vmm_command_line() {
        let line = "console=ttyS0 reboot=k panic=-1 quiet i8042.noaux \
                    virtio_mmio.device=4K@0xd0000000:5 agentvm.hostname=sandbox-1\n";
        let cmdline = KernelCmdline::parse(line);
        assert_eq!(
            cmdline.params(),
            &[
                kv("console", Some("ttyS0")),
                kv("reboot", Some("k")),
                kv("panic", Some("-1")),
                kv("quiet", None),
                kv("i8042.noaux", None),
                kv("virtio_mmio.device", Some("4K@0xd0000000:5")),
                kv("agentvm.hostname", Some("sandbox-1")),
            ]
        );
        assert_eq!(cmdline.value("agentvm.hostname"), Some("sandbox-1"));
        assert_eq!(cmdline.value("quiet"), None);
        assert!(cmdline.get("quiet").is_some());
        assert!(cmdline.get("agentvm.other").is_none());
    }

    #[test]
    fn follows_kernel_quoting_rules() {
        let cmdline = KernelCmdline::parse(
            r#"  a="x y"  "b=p q" "lone" c="" d==e f=g"h i"j -- init args here"#,
        );
        assert_eq!(
            cmdline.params(),
            &[
                kv("a", Some("x y")),
                kv("b", Some("p q")),
                kv("lone", None),
                kv("c", Some("")),
                kv("d", Some("=e")),
                kv("f", Some(r#"g"h i"j"#)),
            ]
        );
    }

    #[test]
    fn unterminated_quote_runs_to_the_end() {
        let cmdline = KernelCmdline::parse(r#"a=1 b="open ended"#);
        assert_eq!(
            cmdline.params(),
            &[kv("a", Some("1")), kv("b", Some("open ended"))]
        );
    }

    #[test]
    fn last_occurrence_wins_and_flags() {
        let cmdline = KernelCmdline::parse("x=1 x=2 on off=0 yes=1 no=No");
        assert_eq!(cmdline.value("x"), Some("2"));
        assert!(cmdline.flag("on"));
        assert!(!cmdline.flag("off"));
        assert!(cmdline.flag("yes"));
        assert!(!cmdline.flag("no"));
        assert!(!cmdline.flag("absent"));
    }

    #[test]
    fn collects_module_parameters() {
        let cmdline = KernelCmdline::parse(
            "virtio_mmio.device=4K@0xd0000000:5 virtio-mmio.device=4K@0xd0001000:6 \
             kvm_amd.npt=0 kvm-amd.nested kvm.x=\"a b\" kvm.e= virtio.=bad agentvm.debug=1",
        );
        assert_eq!(
            cmdline.module_params("virtio_mmio"),
            "device=4K@0xd0000000:5 device=4K@0xd0001000:6"
        );
        assert_eq!(
            cmdline.module_params("virtio-mmio"),
            cmdline.module_params("virtio_mmio")
        );
        assert_eq!(cmdline.module_params("kvm_amd"), "npt=0 nested");
        assert_eq!(cmdline.module_params("kvm"), "x=\"a b\" e=\"\"");
        assert_eq!(cmdline.module_params("virtio"), "");
        assert_eq!(cmdline.module_params("virtio_net"), "");
    }

    #[test]
    fn empty_and_blank_lines() {
        assert!(KernelCmdline::parse("").params().is_empty());
        assert!(KernelCmdline::parse(" \n\t ").params().is_empty());
    }
}
