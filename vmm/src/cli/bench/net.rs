//! `agentvm bench net`: the egress filter's own cost. The filter thread (under its seccomp
//! filter, as in the VMM) serves one end of the frame link; on the other end a userspace guest
//! (`egress::peer`, a smoltcp stack in this process) opens TCP connections through it to a
//! server on 127.0.0.1 that this benchmark runs, allowed by an explicit `127.0.0.1/32` CIDR rule
//! for the server's port. Beside it, in the same run and alternating with it, the same
//! transfers over plain host loopback TCP (std sockets), the no-filter reference.
//!
//! A Linux guest on this machine runs only under TCG in the nested test host, whose figures
//! would measure the emulator; the userspace guest needs no VM, so these figures are the
//! filter's cost alone: an upper bound for what a guest's virtio-net path gets.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use egress::audit::AuditLog;
use egress::peer::{frame_pair, Connect, GuestPeer, SocketHandle};
use egress::policy::Policy;
use egress::{EgressConfig, EgressHandle, ResolverConfig};
use serde::Serialize;
use vmm::seccomp::{SeccompLevel, ThreadKind};

use super::machine::MachineInfo;
use super::net_server::{self, BenchServer, PROBE, PROBE_REPLY, SINK};
use super::output::{num, Figure, Unit};
use super::stats::Summary;

/// Issue 5's throughput target for the guest's egress.
const TARGET_GBIT_PER_S: f64 = 2.0;
/// Time limit of every wait that does not move bulk data.
const WAIT: Duration = Duration::from_secs(30);
/// Bulk waits get this much more per MiB moved (a floor of 5 MiB/s, far below any real figure).
const WAIT_PER_MIB: Duration = Duration::from_millis(200);
/// Warm-up transfers (not counted): first connections, page faults of the buffers.
const WARMUP_MIB: u64 = 1;
const MIB: u64 = 1 << 20;
const FILTER: &str = "agentvm egress filter";
const PEER: &str = "host loopback (no filter)";

#[derive(Args)]
pub struct NetArgs {
    /// Samples per figure: connections timed, and bulk transfers per direction.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    runs: u32,
    /// MiB moved by each bulk transfer.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=4096))]
    mib: u32,
    /// Print the JSON document instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON document to FILE.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct NetDocument {
    pub benchmark: &'static str,
    pub agentvm_version: &'static str,
    pub runs: u32,
    pub mib_per_transfer: u32,
    pub machine: MachineInfo,
    /// What the `agentvm` column measured.
    pub filtered: &'static str,
    /// What the `peer` column measured.
    pub peer: &'static str,
    pub target_gbit_per_s: f64,
    /// Whether the median guest -> upstream throughput reached the target.
    pub target_met: bool,
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
}

/// The filter thread and the guest on its link, with the server they talk to.
struct Filtered {
    guest: GuestPeer,
    egress: EgressHandle,
}

pub fn net(args: NetArgs) -> Result<ExitCode, String> {
    if let Some(out) = &args.out {
        super::check_writable(out)?;
    }
    let bytes = u64::from(args.mib) * MIB;
    let bulk_wait = WAIT + WAIT_PER_MIB * args.mib;
    let server = BenchServer::start(bulk_wait)?;
    let mut filtered = start_filter(server.address, bulk_wait)?;

    eprintln!("bench net: warm-up ({WARMUP_MIB} MiB each way, not counted)");
    filter_setup(&mut filtered.guest, server.address)?;
    filter_upload(&mut filtered.guest, &server, WARMUP_MIB * MIB)?;
    filter_download(&mut filtered.guest, server.address, WARMUP_MIB * MIB)?;
    host_setup(server.address)?;
    host_upload(&server, WARMUP_MIB * MIB)?;
    host_download(server.address, WARMUP_MIB * MIB)?;

    let runs = args.runs as usize;
    eprintln!("bench net: {runs} connection setups through the filter and on the host");
    let (mut setup, mut setup_host) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    let (mut reply, mut reply_host) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        let (established, replied) = filter_setup(&mut filtered.guest, server.address)?;
        setup.push(established);
        reply.push(replied);
        let (connected, replied) = host_setup(server.address)?;
        setup_host.push(connected);
        reply_host.push(replied);
    }
    eprintln!(
        "bench net: {runs} x {} MiB each way through the filter and on the host",
        args.mib
    );
    let (mut up, mut up_host) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    let (mut down, mut down_host) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for run in 1..=runs {
        up.push(gbit_per_s(
            bytes,
            filter_upload(&mut filtered.guest, &server, bytes)?,
        ));
        up_host.push(gbit_per_s(bytes, host_upload(&server, bytes)?));
        down.push(gbit_per_s(
            bytes,
            filter_download(&mut filtered.guest, server.address, bytes)?,
        ));
        down_host.push(gbit_per_s(bytes, host_download(server.address, bytes)?));
        eprintln!("bench net: run {run}/{runs} done");
    }
    let stats = filtered.egress.stats();
    // Everything this benchmark opened is closed here: the filter thread is joined (its
    // sockets closed), then the guest's end of the link, then the server (joined by its Drop).
    filtered.egress.shutdown();
    drop(filtered.guest);
    drop(server);
    if stats.connections_denied != 0 {
        return Err(format!(
            "the filter denied {} of the benchmark's connections",
            stats.connections_denied
        ));
    }

    let up_summary = Summary::of(&up);
    let doc = NetDocument {
        benchmark: "agentvm bench net",
        agentvm_version: env!("CARGO_PKG_VERSION"),
        runs: args.runs,
        mib_per_transfer: args.mib,
        machine: MachineInfo::read(),
        filtered: "userspace guest (smoltcp, this process) -> frame link -> egress filter thread \
                   (smoltcp, policy, proxy, audit) -> host TCP socket -> server on 127.0.0.1",
        peer: "the same transfers over host loopback TCP (std sockets), same server",
        target_gbit_per_s: TARGET_GBIT_PER_S,
        target_met: up_summary.is_some_and(|s| s.median >= TARGET_GBIT_PER_S),
        figures: vec![
            Figure::new(
                "connect_setup",
                "TCP setup: guest SYN -> established; host: connect()",
                Unit::Us,
                &setup,
            )
            .with_peer(&setup_host),
            Figure::new(
                "connect_first_reply",
                "TCP setup end to end: SYN -> server's first byte back",
                Unit::Us,
                &reply,
            )
            .with_peer(&reply_host),
            Figure::new(
                "guest_to_upstream",
                "throughput guest -> upstream (until the server read it all)",
                Unit::GbitPerS,
                &up,
            )
            .with_peer(&up_host),
            Figure::new(
                "upstream_to_guest",
                "throughput upstream -> guest (request to last byte)",
                Unit::GbitPerS,
                &down,
            )
            .with_peer(&down_host),
        ],
        notes: vec![
            "the guest side is a userspace TCP stack in this same process, not a Linux guest: \
             these figures are the egress filter's own cost, an upper bound for a real guest \
             (which adds virtio-net and its kernel's stack); a Linux guest here runs only under \
             TCG in the nested test host, whose figures would measure the emulator"
                .into(),
            "the filter thread runs under its seccomp filter, writes its audit events (encoded, \
             then discarded), and allows the server by an explicit 127.0.0.1/32 CIDR rule for \
             its port; guest and filter each use one core, so a 2-core machine is saturated"
                .into(),
            "the filter answers the guest's SYN itself and connects upstream in parallel, so \
             `established` does not wait for the upstream; the end-to-end figure does: the guest \
             sends one byte once established and the server answers one"
                .into(),
            "for throughput the p99 is the fast end; its slow end is the minimum".into(),
            format!(
                "filter and host runs alternate; {WARMUP_MIB} MiB each way and one connection \
                 per path warm up first, not counted"
            ),
        ],
    };
    emit(&doc, args.json, args.out.as_deref())
}

fn emit(
    doc: &NetDocument,
    json_output: bool,
    out: Option<&std::path::Path>,
) -> Result<ExitCode, String> {
    let json = serde_json::to_string_pretty(doc).map_err(|e| e.to_string())?;
    if json_output {
        println!("{json}");
    } else {
        print!("{}", to_table(doc));
    }
    if let Some(out) = out {
        std::fs::write(out, format!("{json}\n"))
            .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
        eprintln!("bench net: wrote {}", out.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The filter thread under a policy that allows only the server, and the guest on its link.
fn start_filter(server: SocketAddrV4, wait: Duration) -> Result<Filtered, String> {
    let policy = Policy::from_json_str(&format!(
        r#"{{ "rules": [ {{ "id": "bench-server", "cidr": "127.0.0.1/32", "ports": [{}] }} ] }}"#,
        server.port()
    ))
    .map_err(|e| format!("the benchmark's policy: {e}"))?;
    let (guest_end, filter_end) =
        frame_pair().map_err(|e| format!("cannot create the frame socket pair: {e}"))?;
    let (entered_tx, entered) = mpsc::channel();
    let egress = egress::spawn_with_hook(
        EgressConfig {
            policy,
            audit: AuditLog::to_writer(Box::new(std::io::sink())),
            sandbox: "bench-net".into(),
            // The guest connects to an address, never asks for a name.
            resolver: ResolverConfig {
                nameservers: Vec::new(),
                hosts: Vec::new(),
                timeout: WAIT,
            },
            extra_upstream_roots: Vec::new(),
        },
        filter_end,
        Some(Box::new(move || {
            let entered_filter = vmm::seccomp::install(ThreadKind::Egress, SeccompLevel::Enforce)
                .map_err(|e| e.to_string());
            let _ = entered_tx.send(entered_filter.clone());
            entered_filter
        })),
    )
    .map_err(|e| format!("cannot start the egress filter thread: {e}"))?;
    match entered.recv_timeout(WAIT) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("egress thread: seccomp filter: {e}")),
        Err(_) => {
            return Err(format!(
                "the egress thread did not enter its seccomp filter within {WAIT:?}"
            ))
        }
    }
    let mut guest =
        GuestPeer::new(guest_end).map_err(|e| format!("cannot start the guest peer: {e}"))?;
    guest.set_wait(wait);
    Ok(Filtered { guest, egress })
}

fn gbit_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9
}

fn us(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1e6
}

fn guest_connect(guest: &mut GuestPeer, server: SocketAddrV4) -> Result<SocketHandle, String> {
    match guest.connect(server).map_err(|e| e.to_string())? {
        Connect::Established(handle) => Ok(handle),
        Connect::Reset => Err(format!(
            "the filter reset the guest's connection to {server}"
        )),
    }
}

/// Sends `head` and `body` bytes, closes, counts the answer until the server closes; the
/// connection is forgotten on every path out.
fn guest_transfer(
    guest: &mut GuestPeer,
    handle: SocketHandle,
    head: &[u8],
    body: u64,
) -> Result<u64, String> {
    let result = guest.transfer(handle, head, body);
    guest.remove(handle);
    let transfer = result.map_err(|e| e.to_string())?;
    if !transfer.fin {
        return Err("the guest's connection was reset before it finished".into());
    }
    Ok(transfer.received)
}

/// Guest SYN to established (the filter answers the SYN itself and connects upstream in
/// parallel), and to the server's one-byte reply (the connection reached the server end to end);
/// then a clean close. Microseconds.
fn filter_setup(guest: &mut GuestPeer, server: SocketAddrV4) -> Result<(f64, f64), String> {
    let start = Instant::now();
    let handle = guest_connect(guest, server)?;
    let established = start.elapsed();
    let reply = guest.receive_after_send(handle, &[PROBE], 1);
    let replied = start.elapsed();
    let reply = match reply {
        Ok(reply) => reply,
        Err(e) => {
            guest.remove(handle);
            return Err(e.to_string());
        }
    };
    if reply != [PROBE_REPLY] {
        guest.remove(handle);
        return Err(format!("{FILTER}: the server's reply was {reply:?}"));
    }
    guest_transfer(guest, handle, &[], 0)?;
    Ok((us(established), us(replied)))
}

fn filter_upload(
    guest: &mut GuestPeer,
    server: &BenchServer,
    bytes: u64,
) -> Result<Duration, String> {
    let handle = guest_connect(guest, server.address)?;
    let start = Instant::now();
    guest_transfer(guest, handle, &[SINK], bytes)?;
    let elapsed = start.elapsed();
    check_sunk(server, bytes, FILTER)?;
    Ok(elapsed)
}

fn filter_download(
    guest: &mut GuestPeer,
    server: SocketAddrV4,
    bytes: u64,
) -> Result<Duration, String> {
    let handle = guest_connect(guest, server)?;
    let start = Instant::now();
    let received = guest_transfer(guest, handle, &net_server::source_head(bytes), 0)?;
    let elapsed = start.elapsed();
    check_received(received, bytes, FILTER)?;
    Ok(elapsed)
}

fn check_sunk(server: &BenchServer, bytes: u64, path: &str) -> Result<(), String> {
    let sunk = server.sunk_bytes(WAIT)?;
    if sunk != bytes {
        return Err(format!(
            "{path}: the server received {sunk} bytes of {bytes}"
        ));
    }
    Ok(())
}

fn check_received(received: u64, bytes: u64, path: &str) -> Result<(), String> {
    if received != bytes {
        return Err(format!("{path}: received {received} bytes of {bytes}"));
    }
    Ok(())
}

fn host_connect(server: SocketAddrV4) -> Result<TcpStream, String> {
    let stream = TcpStream::connect_timeout(&server.into(), WAIT)
        .map_err(|e| format!("{PEER}: connect to {server}: {e}"))?;
    stream
        .set_read_timeout(Some(WAIT))
        .and_then(|()| stream.set_write_timeout(Some(WAIT)))
        .and_then(|()| stream.set_nodelay(true))
        .map_err(|e| format!("{PEER}: socket options: {e}"))?;
    Ok(stream)
}

/// Writes `head` and `body` bytes, closes its side, reads to EOF.
fn host_transfer(mut stream: TcpStream, head: &[u8], body: u64) -> Result<u64, String> {
    let io = |e: std::io::Error| format!("{PEER}: {e}");
    stream.write_all(head).map_err(io)?;
    net_server::write_filler(&mut stream, body).map_err(io)?;
    stream.shutdown(Shutdown::Write).map_err(io)?;
    net_server::drain(&mut stream).map_err(io)
}

/// connect(), and connect + PROBE + the server's reply, as [`filter_setup`] times them.
fn host_setup(server: SocketAddrV4) -> Result<(f64, f64), String> {
    let start = Instant::now();
    let mut stream = host_connect(server)?;
    let connected = start.elapsed();
    let io = |e: std::io::Error| format!("{PEER}: {e}");
    stream.write_all(&[PROBE]).map_err(io)?;
    let mut reply = [0u8; 1];
    stream.read_exact(&mut reply).map_err(io)?;
    let replied = start.elapsed();
    if reply != [PROBE_REPLY] {
        return Err(format!("{PEER}: the server's reply was {reply:?}"));
    }
    host_transfer(stream, &[], 0)?;
    Ok((us(connected), us(replied)))
}

fn host_upload(server: &BenchServer, bytes: u64) -> Result<Duration, String> {
    let stream = host_connect(server.address)?;
    let start = Instant::now();
    host_transfer(stream, &[SINK], bytes)?;
    let elapsed = start.elapsed();
    check_sunk(server, bytes, PEER)?;
    Ok(elapsed)
}

fn host_download(server: SocketAddrV4, bytes: u64) -> Result<Duration, String> {
    let stream = host_connect(server)?;
    let start = Instant::now();
    let received = host_transfer(stream, &net_server::source_head(bytes), 0)?;
    let elapsed = start.elapsed();
    check_received(received, bytes, PEER)?;
    Ok(elapsed)
}

fn to_table(doc: &NetDocument) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{}: median / p99 (nearest rank), min-max, n; {} runs, {} MiB per transfer",
        doc.benchmark, doc.runs, doc.mib_per_transfer
    );
    let _ = writeln!(t, "{}", doc.machine.describe());
    let _ = writeln!(t, "{FILTER}: {}", doc.filtered);
    let _ = writeln!(t, "{PEER}: {}", doc.peer);
    let _ = writeln!(t, "\n{:<66} {:>40} {:>40}", "", FILTER, PEER);
    for f in &doc.figures {
        let cell = |s: &Option<Summary>| match s {
            Some(s) => format!(
                "{} / {} ({}-{}) {} n={}",
                num(s.median, f.unit),
                num(s.p99, f.unit),
                num(s.min, f.unit),
                num(s.max, f.unit),
                f.unit.label(),
                s.n
            ),
            None => "-".into(),
        };
        let _ = writeln!(
            t,
            "{:<66} {:>40} {:>40}",
            f.label,
            cell(&f.agentvm),
            cell(&f.peer)
        );
    }
    let up = doc
        .figures
        .iter()
        .find(|f| f.id == "guest_to_upstream")
        .and_then(|f| f.agentvm);
    if let Some(up) = up {
        let _ = writeln!(
            t,
            "\ntarget (issue 5): >= {} Gbit/s guest -> upstream; median through the filter {} \
             Gbit/s: {}",
            doc.target_gbit_per_s,
            num(up.median, Unit::GbitPerS),
            if doc.target_met { "met" } else { "NOT met" }
        );
    }
    for n in &doc.notes {
        let _ = writeln!(t, "note: {n}");
    }
    t
}
