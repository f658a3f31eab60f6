//! `agentvm snapshot uffd-handler`: an external userfaultfd handler (Firecracker's protocol).
//! Listens on a Unix socket; each VMM that connects (`PUT /snapshot/load` with a Uffd
//! backend_path naming this socket) gets its own thread serving its guest memory from the memory
//! file, so many VMs restored from one snapshot are served at once. Prints one line per VM when
//! it ends, with the faults it served. SIGINT/SIGTERM stop it (exit 0); the socket file is
//! removed on every exit.
//!
//! It runs without the VMM's seccomp filters: it is a separate process that never runs guest
//! code, and a filter violation would end every VM it serves at once.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread::ScopedJoinHandle;
use std::time::{Duration, Instant};

use clap::Args;
use signal_hook::consts::{SIGINT, SIGTERM};
use vmm::uffd::{serve_vm, HandlerOptions, VmServed};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long the VM threads may take to stop once told to: each polls its stop eventfd, but one
/// still receiving its mappings waits out that receive's own 5 s timeout first.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Args)]
pub struct UffdHandlerArgs {
    /// The Unix socket to listen on (give it as mem_backend.backend_path with backend_type
    /// "Uffd"). It must not exist yet (a handler killed with SIGKILL leaves its socket behind:
    /// remove it first).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The snapshot's memory file, served to every VM that connects.
    #[arg(long, value_name = "FILE")]
    mem_file: PathBuf,
    /// Exit once the first VM served has ended.
    #[arg(long)]
    once: bool,
    /// Copy in the working set recorded for this memory file (`<mem-file>.ws`, written by an
    /// in-process uffd restore) before serving each VM's faults.
    #[arg(long)]
    prefetch_working_set: bool,
}

/// Removes the socket file when the handler ends, however it ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn run(args: UffdHandlerArgs) -> Result<ExitCode, String> {
    let mem_file = File::open(&args.mem_file)
        .map_err(|e| format!("--mem-file {}: {e}", args.mem_file.display()))?;
    let working_set = if args.prefetch_working_set {
        load_working_set(&args.mem_file, &mem_file)?
    } else {
        None
    };
    let listener = bind(&args.socket)?;
    let _socket_file = SocketFile(args.socket.clone());
    let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("stop eventfd: {e}"))?;
    let (signal_rx, signal_tx) =
        UnixStream::pair().map_err(|e| format!("signal socket pair: {e}"))?;
    for sig in [SIGINT, SIGTERM] {
        signal_hook::low_level::pipe::register(
            sig,
            signal_tx
                .try_clone()
                .map_err(|e| format!("signal socket: {e}"))?,
        )
        .map_err(|e| format!("cannot install the signal handlers: {e}"))?;
    }
    println!("uffd-handler: listening on {}", args.socket.display());
    let _ = std::io::stdout().flush();

    let options = HandlerOptions {
        mem_file: &mem_file,
        working_set: working_set.as_ref(),
    };
    std::thread::scope(|scope| -> Result<ExitCode, String> {
        let mut vms: Vec<ScopedJoinHandle<()>> = Vec::new();
        let mut next_id = 1u64;
        loop {
            vms.retain(|vm| !vm.is_finished());
            if args.once && next_id > 1 && vms.is_empty() {
                break;
            }
            let accepting = !(args.once && next_id > 1);
            match wait(&listener, &signal_rx, accepting)? {
                Wake::Signal => break,
                Wake::Timeout => continue,
                Wake::Connection => {}
            }
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(format!("accept on {}: {e}", args.socket.display())),
            };
            let id = next_id;
            next_id += 1;
            let options = &options;
            let stop = &stop;
            let vm = std::thread::Builder::new()
                .name(format!("uffd_vm_{id}"))
                .spawn_scoped(scope, move || report(id, serve_vm(stream, options, stop)))
                .map_err(|e| format!("cannot start a thread for VM {id}: {e}"))?;
            vms.push(vm);
        }
        let _ = stop.write(1);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while vms.iter().any(|vm| !vm.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if vms.iter().any(|vm| !vm.is_finished()) {
            // A scoped thread cannot be left behind: exit without waiting for it.
            eprintln!("uffd-handler: a VM thread did not stop within {STOP_TIMEOUT:?}");
            drop(_socket_file);
            std::process::exit(1);
        }
        // A stop by SIGINT/SIGTERM is the handler's normal end, as --once's is.
        Ok(ExitCode::SUCCESS)
    })
}

/// The working set to prefetch, if one was recorded for this memory file; a set recorded for
/// another file (size or mtime differ) is ignored with a note, a corrupt one refused.
fn load_working_set(path: &Path, file: &File) -> Result<Option<snapshot::WorkingSet>, String> {
    let ws_path = snapshot::working_set_path(path);
    let set = snapshot::read_working_set(&ws_path).map_err(|e| e.to_string())?;
    let identity = snapshot::memory_file_identity(path, file).map_err(|e| e.to_string())?;
    match set {
        Some(set) if set.matches(identity) => Ok(Some(set)),
        Some(_) => {
            eprintln!(
                "uffd-handler: {} was recorded for another memory file; serving lazily",
                ws_path.display()
            );
            Ok(None)
        }
        None => {
            eprintln!(
                "uffd-handler: no working set at {}; serving lazily",
                ws_path.display()
            );
            Ok(None)
        }
    }
}

/// Binds the socket. An existing path is refused rather than probed: connecting to a live
/// handler to see whether it is stale would look like a VMM to it (and end a --once handler).
fn bind(path: &Path) -> Result<UnixListener, String> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(format!(
            "--socket {}: already exists (another handler's socket, or a stale one: remove it if \
             no handler is running)",
            path.display()
        ));
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("--socket {}: {e}", path.display()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("--socket {}: {e}", path.display()))?;
    Ok(listener)
}

enum Wake {
    Connection,
    Signal,
    Timeout,
}

/// Waits for a connection (when `accepting`) or a signal; times out now and then so finished
/// VM threads are noticed (for --once).
fn wait(listener: &UnixListener, signals: &UnixStream, accepting: bool) -> Result<Wake, String> {
    let mut fds = [
        libc::pollfd {
            fd: signals.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            // poll ignores negative descriptors.
            fd: if accepting { listener.as_raw_fd() } else { -1 },
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: poll reads and writes only the two pollfd entries of `fds`.
    let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
    if ret < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(Wake::Timeout);
        }
        return Err(format!("poll: {e}"));
    }
    Ok(if fds[0].revents != 0 {
        Wake::Signal
    } else if fds[1].revents != 0 {
        Wake::Connection
    } else {
        Wake::Timeout
    })
}

/// One line per VM on stdout (the counters), plus the error on stderr if serving failed.
fn report(id: u64, served: VmServed) {
    let totals = served.totals;
    let end = match &served.end {
        Ok(why) => (*why).to_string(),
        Err(e) => {
            eprintln!("uffd-handler: vm {id}: {e}");
            format!("failed: {e}")
        }
    };
    println!(
        "uffd-handler: vm {id} ended ({end}): faults={} zero_pages={} prefetched={}",
        totals.faults, totals.zero_pages, totals.prefetched
    );
    let _ = std::io::stdout().flush();
}
