//! `agentvm boot` with the probe guest: the boot path as seen from inside the guest, the failure
//! and signal paths, and console throughput.
//!
//! Needs /dev/kvm (skipped without it, failing instead under CI=true) and the agentvm binary of the
//! same profile (`cargo build -p vmm`).

use std::time::Duration;

use integration_tests::agentvm::{require_kvm, run_agentvm, VmOutput, VmProcess};
use integration_tests::probe::{
    find_flood, flood_stream, fnv1a64, parse_number, probe_elf, E820Entry, ProbeOutput,
    DEFAULT_CHECKS, E820_RAM, FLOOD_BYTES,
};

/// Hang detectors, not performance limits: a probe boot takes well under a second of guest time.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// One VM exit per console byte costs tens of microseconds on nested KVM.
const FLOOD_TIMEOUT: Duration = Duration::from_secs(1200);

/// Guest memory layout from the contract (notes/contracts.md): RAM up to the MP table / EBDA at
/// 0x9fc00, the legacy hole up to 1 MiB, RAM up to the MMIO gap at 0xd000_0000 (where the
/// virtio-mmio devices start), and the rest of RAM from 4 GiB on.
const EBDA_START: u64 = 0x9_fc00;
const HIMEM_START: u64 = 0x10_0000;
const MMIO_GAP_START: u64 = 0xd000_0000;
const MMIO_GAP_END: u64 = 1 << 32;

/// The RAM ranges the e820 map must list for `mem_mib` of guest memory.
fn expected_ram(mem_mib: u64) -> Vec<(u64, u64)> {
    let mem = mem_mib << 20;
    let mut ram = vec![(0, EBDA_START), (HIMEM_START, mem.min(MMIO_GAP_START))];
    if mem > MMIO_GAP_START {
        ram.push((MMIO_GAP_END, MMIO_GAP_END + (mem - MMIO_GAP_START)));
    }
    ram
}

fn boot_probe(mem_mib: u64, vcpus: u32, cmdline: &str, timeout: Duration) -> VmOutput {
    let probe = probe_elf();
    let mem = mem_mib.to_string();
    let vcpus = vcpus.to_string();
    let args = [
        "boot".as_ref(),
        "--kernel".as_ref(),
        probe.as_os_str(),
        "--mem-mib".as_ref(),
        mem.as_ref(),
        "--vcpus".as_ref(),
        vcpus.as_ref(),
        "--cmdline".as_ref(),
        cmdline.as_ref(),
    ];
    run_agentvm(args, timeout).unwrap_or_else(|e| panic!("agentvm boot {cmdline:?}: {e}"))
}

/// Boots the probe in its default mode and checks what every boot must get right.
fn boot_default(mem_mib: u64, vcpus: u32, cmdline: &str) -> (VmOutput, ProbeOutput) {
    let out = boot_probe(mem_mib, vcpus, cmdline, BOOT_TIMEOUT);
    let report = ProbeOutput::parse(&out.stdout_text());
    let problems = report.problems(&DEFAULT_CHECKS);
    assert!(
        problems.is_empty(),
        "probe checks failed: {problems:#?}\n{out:?}"
    );
    assert!(report.has_marker("done"), "no `PROBE done`\n{out:?}");
    assert!(
        out.status.success(),
        "agentvm did not exit 0 after the guest reset\n{out:?}"
    );

    let e820 = report.check("e820").expect("checked above");
    let entries = e820.e820_entries().unwrap();
    let ram: Vec<(u64, u64)> = entries
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .map(|e| (e.start, e.end))
        .collect();
    assert_eq!(
        ram,
        expected_ram(mem_mib),
        "e820 RAM ranges: {}",
        e820.details
    );
    let ram_bytes: u64 = ram.iter().map(|(start, end)| end - start).sum();
    assert_eq!(
        e820.field("ram_kib").and_then(parse_number),
        Some(ram_bytes / 1024),
        "{}",
        e820.details
    );

    let mptable = report.check("mptable").expect("checked above");
    assert_eq!(
        mptable.field("cpus"),
        Some(vcpus.to_string().as_str()),
        "{}",
        mptable.details
    );
    assert_eq!(mptable.field("ioapic"), Some("yes"), "{}", mptable.details);

    let virtio = report.check("virtio").expect("checked above");
    assert_eq!(
        virtio.field("device_id"),
        Some("4"),
        "slot 0 must hold the virtio-rng: {}",
        virtio.details
    );
    (out, report)
}

#[test]
fn probe_boots_and_every_check_passes() {
    if !require_kvm() {
        return;
    }
    let (_, report) = boot_default(256, 2, "probe.token=abc123");
    let cmdline = report.check("cmdline").expect("checked in boot_default");
    assert!(
        cmdline
            .details
            .split(' ')
            .any(|arg| arg == "probe.token=abc123"),
        "the user's --cmdline did not reach the guest: {:?}",
        cmdline.details
    );
}

#[test]
fn guest_memory_above_the_mmio_gap_is_listed_in_e820() {
    if !require_kvm() {
        return;
    }
    let (_, report) = boot_default(4096, 1, "");
    let entries = report.check("e820").unwrap().e820_entries().unwrap();
    assert!(
        entries.contains(&E820Entry {
            start: MMIO_GAP_END,
            end: MMIO_GAP_END + (4096 << 20) - MMIO_GAP_START,
            kind: E820_RAM
        }),
        "no RAM at 4 GiB: {entries:?}"
    );
    let in_gap: Vec<_> = entries
        .iter()
        .filter(|e| e.kind == E820_RAM && e.start < MMIO_GAP_END && e.end > MMIO_GAP_START)
        .collect();
    assert!(in_gap.is_empty(), "RAM overlaps the MMIO gap: {in_gap:?}");
}

#[test]
fn triple_fault_is_reported_with_the_guest_rip() {
    if !require_kvm() {
        return;
    }
    let out = boot_probe(256, 1, "probe.mode=triple-fault", BOOT_TIMEOUT);
    let report = ProbeOutput::parse(&out.stdout_text());
    let rip = report
        .marker("triple-fault rip=")
        .and_then(|m| parse_number(m.trim_start_matches("triple-fault rip=")))
        .unwrap_or_else(|| panic!("the probe did not announce its ud2\n{out:?}"));
    // An exit status, not death by a signal: the VMM must notice the fault and end itself.
    assert!(
        out.status.code().is_some_and(|code| code != 0),
        "expected a non-zero exit status\n{out:?}"
    );
    let stderr = out.stderr_text();
    let line = stderr
        .lines()
        .find(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("triple fault") || l.contains("shutdown")
        })
        .unwrap_or_else(|| panic!("stderr does not name the shutdown/triple fault\n{out:?}"));
    let hex_numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| t.starts_with("0x"))
        .filter_map(parse_number)
        .collect();
    assert!(
        hex_numbers.contains(&rip),
        "stderr line {line:?} does not give the faulting RIP {rip:#x}"
    );
}

fn stop_spinning_guest_with(signal: i32, name: &str) {
    let probe = probe_elf();
    let vm = VmProcess::agentvm([
        "boot".as_ref(),
        "--kernel".as_ref(),
        probe.as_os_str(),
        "--cmdline".as_ref(),
        "probe.mode=spin".as_ref(),
    ])
    .unwrap();
    vm.wait_for_stdout(b"PROBE spinning\n", BOOT_TIMEOUT)
        .unwrap();
    vm.signal(signal).unwrap();
    let out = vm
        .wait(STOP_TIMEOUT)
        .unwrap_or_else(|e| panic!("agentvm did not stop on {name}: {e}"));
    assert_eq!(
        out.status.code(),
        Some(128 + signal),
        "expected the shell convention 128+signal for {name}\n{out:?}"
    );
    let expected = format!("agentvm: stopped by signal {name}");
    assert!(
        out.stderr_text().lines().any(|l| l.contains(&expected)),
        "stderr lacks {expected:?}\n{out:?}"
    );
}

#[test]
fn sigterm_stops_a_spinning_guest() {
    if !require_kvm() {
        return;
    }
    stop_spinning_guest_with(libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_stops_a_spinning_guest() {
    if !require_kvm() {
        return;
    }
    stop_spinning_guest_with(libc::SIGINT, "SIGINT");
}

#[test]
fn console_flood_arrives_intact() {
    if !require_kvm() {
        return;
    }
    let out = boot_probe(256, 1, "probe.mode=flood", FLOOD_TIMEOUT);
    let report = ProbeOutput::parse(&out.stdout_text());
    assert!(report.problems(&["start"]).is_empty(), "{out:?}");
    assert!(report.has_marker("done"), "{out:?}");
    assert!(out.status.success(), "{out:?}");

    let flood = find_flood(&out.stdout).unwrap_or_else(|e| panic!("{e}\n{out:?}"));
    assert_eq!(flood.declared_bytes, FLOOD_BYTES as u64);
    assert_eq!(
        flood.data.len(),
        FLOOD_BYTES,
        "bytes lost or added on the console"
    );
    assert_eq!(
        fnv1a64(flood.data),
        flood.declared_fnv1a64,
        "console bytes differ from what the guest sent"
    );
    let expected = flood_stream();
    if let Some(at) = flood.data.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!(
            "flood differs from the expected stream at byte {at}: got {:?}, want {:?}",
            String::from_utf8_lossy(&flood.data[at..(at + 64).min(flood.data.len())]),
            String::from_utf8_lossy(&expected[at..(at + 64).min(expected.len())])
        );
    }
}

/// `--vsock-uds` adds the virtio-vsock device behind the rng (the probe's checks still pass), its
/// socket exists only while the VM runs, and a path that already exists is refused up front.
#[test]
fn vsock_socket_lives_as_long_as_the_vm() {
    if !require_kvm() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("agentvm-vsock-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("v.sock");
    let probe = probe_elf();
    let args = [
        "boot".as_ref(),
        "--kernel".as_ref(),
        probe.as_os_str(),
        "--vsock-uds".as_ref(),
        socket.as_os_str(),
    ];
    let out = run_agentvm(args, BOOT_TIMEOUT).expect("agentvm boot --vsock-uds");
    let report = ProbeOutput::parse(&out.stdout_text());
    let problems = report.problems(&DEFAULT_CHECKS);
    assert!(
        problems.is_empty(),
        "probe checks failed: {problems:#?}\n{out:?}"
    );
    assert!(out.status.success(), "{out:?}");
    assert!(!socket.exists(), "{} left behind", socket.display());

    std::fs::write(&socket, b"").unwrap();
    let out = run_agentvm(args, BOOT_TIMEOUT).expect("agentvm boot --vsock-uds (existing path)");
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr_text().contains("already exists"), "{out:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SIGUSR1 logs a state dump (vCPU exits, each virtio device's registers, rings and vsock
/// connections) and changes nothing: the guest goes on, and SIGTERM still ends it as usual.
#[test]
fn sigusr1_logs_a_state_dump_and_the_vm_goes_on() {
    if !require_kvm() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("agentvm-dump-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("v.sock");
    let probe = probe_elf();
    let vm = VmProcess::agentvm([
        "boot".as_ref(),
        "--kernel".as_ref(),
        probe.as_os_str(),
        "--cmdline".as_ref(),
        "probe.mode=count".as_ref(),
        "--vsock-uds".as_ref(),
        socket.as_os_str(),
    ])
    .unwrap();
    vm.wait_for_stdout(b"PROBE count 3\n", BOOT_TIMEOUT)
        .unwrap();
    vm.signal(libc::SIGUSR1).unwrap();
    // The count going on after the dump shows the guest was not stopped by it.
    vm.wait_for_stdout(b"PROBE count 30\n", BOOT_TIMEOUT)
        .unwrap();
    vm.signal(libc::SIGTERM).unwrap();
    let out = vm.wait(STOP_TIMEOUT).unwrap();
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{out:?}");
    let stderr = out.stderr_text();
    for expected in [
        "state dump (SIGUSR1)",
        "vCPU exits: io_in ",
        "virtio-rng: status ",
        "virtio-vsock: status ",
        "vsock cid 3",
        "backend: 0 connection(s)",
    ] {
        assert!(stderr.contains(expected), "no {expected:?} in\n{out:?}");
    }
    assert!(!socket.exists(), "{} left behind", socket.display());
    std::fs::remove_dir_all(&dir).unwrap();
}
