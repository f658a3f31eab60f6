//! Filters installed for real, in forked children: a forbidden syscall kills by SIGSYS with the
//! report line, an allowed one goes through.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::*;

/// How the child ended, and what it wrote to stderr.
#[derive(Debug)]
enum Ended {
    Exited(i32),
    Signalled(i32),
}

/// Forks; the child installs `kind`'s filter, runs `act` and exits 0.
fn in_filtered_child(kind: ThreadKind, act: impl FnOnce()) -> (Ended, String) {
    // Decoded and installed before fork, so the child never waits on a lock another test
    // thread held at fork time.
    filters::compiled().unwrap();
    violation::install_handler().unwrap();
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the valid array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned here only.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child only dup2s, installs the filter (no allocation beyond the thread
    // handle, with malloc's locks reset by glibc's fork) and calls `act`, then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: dup2 onto stderr of this (child) process; _exit never returns.
        unsafe {
            libc::dup2(fds[1], libc::STDERR_FILENO);
            if install(kind, SeccompLevel::Enforce).is_err() {
                libc::_exit(2);
            }
            // A panic must not unwind into this forked copy of the test harness.
            let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(act)) {
                Ok(()) => 0,
                Err(_) => 3,
            };
            libc::_exit(code);
        }
    }
    drop(write_end);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(rc >= 0, "waitpid: {}", std::io::Error::last_os_error());
        if rc == pid {
            break;
        }
        if Instant::now() > deadline {
            // SAFETY: kill and reap our own child, still unreaped so the pid cannot be reused.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("the filtered child did not end within 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut stderr = String::new();
    std::fs::File::from(read_end)
        .read_to_string(&mut stderr)
        .unwrap();
    let ended = if libc::WIFSIGNALED(status) {
        Ended::Signalled(libc::WTERMSIG(status))
    } else {
        Ended::Exited(libc::WEXITSTATUS(status))
    };
    (ended, stderr)
}

fn ioctl_kvm_run() {
    // SAFETY: an ioctl on an invalid fd fails with EBADF and touches no memory.
    unsafe { libc::ioctl(-1, 0xAE80) };
}

fn ioctl_fionbio() {
    // SAFETY: as above.
    unsafe { libc::ioctl(-1, libc::FIONBIO) };
}

fn open_a_file() {
    // SAFETY: openat with a valid NUL-terminated path; the fd (if any) is left to _exit.
    unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
}

#[test]
fn a_forbidden_syscall_kills_by_sigsys_and_is_named() {
    for kind in ThreadKind::ALL {
        let (ended, stderr) = in_filtered_child(kind, make_forbidden_syscall);
        assert!(
            matches!(ended, Ended::Signalled(libc::SIGSYS)),
            "{kind:?}: {ended:?} {stderr}"
        );
        let expected = format!(
            "({} filter) made forbidden syscall {} (prctl); the VMM is stopping",
            kind.as_str(),
            libc::SYS_prctl
        );
        assert!(stderr.contains(&expected), "{kind:?}: {stderr:?}");
    }
}

#[test]
fn allowed_syscalls_go_through() {
    for kind in ThreadKind::ALL {
        let (ended, stderr) = in_filtered_child(kind, || {
            let v = vec![1u8; 1 << 20];
            std::hint::black_box(v);
        });
        assert!(
            matches!(ended, Ended::Exited(0)),
            "{kind:?}: {ended:?} {stderr}"
        );
    }
}

#[test]
fn ioctls_are_checked_by_request_number() {
    let (ended, stderr) = in_filtered_child(ThreadKind::Vcpu, ioctl_kvm_run);
    assert!(matches!(ended, Ended::Exited(0)), "{ended:?} {stderr}");
    let (ended, stderr) = in_filtered_child(ThreadKind::Vcpu, ioctl_fionbio);
    assert!(matches!(ended, Ended::Signalled(libc::SIGSYS)), "{ended:?}");
    assert!(stderr.contains("syscall 16 (ioctl)"), "{stderr:?}");
    let (ended, stderr) = in_filtered_child(ThreadKind::Devices, ioctl_fionbio);
    assert!(matches!(ended, Ended::Exited(0)), "{ended:?} {stderr}");
    let (ended, _) = in_filtered_child(ThreadKind::Devices, ioctl_kvm_run);
    assert!(matches!(ended, Ended::Signalled(libc::SIGSYS)), "{ended:?}");
}

#[test]
fn no_thread_may_open_files() {
    for kind in ThreadKind::ALL {
        let (ended, stderr) = in_filtered_child(kind, open_a_file);
        assert!(
            matches!(ended, Ended::Signalled(libc::SIGSYS)),
            "{kind:?}: {ended:?} {stderr}"
        );
        assert!(stderr.contains("(openat)"), "{kind:?}: {stderr:?}");
    }
}

#[test]
fn the_vmm_filter_creates_snapshot_files_but_opens_no_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = std::ffi::CString::new(dir.path().join("new").into_os_string().into_encoded_bytes())
        .unwrap();
    let dir_path =
        std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes().to_vec()).unwrap();
    let create = move || {
        // SAFETY: openat with valid NUL-terminated paths; the fds are left to _exit.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                0o600,
            )
        };
        // SAFETY: as above.
        let dir_fd = unsafe { libc::open(dir_path.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
        // SAFETY: exiting the forked child with a status that says what failed.
        unsafe {
            libc::_exit(if fd < 0 {
                3
            } else if dir_fd < 0 {
                4
            } else {
                0
            })
        };
    };
    let (ended, stderr) = in_filtered_child(ThreadKind::Vmm, create);
    assert!(matches!(ended, Ended::Exited(0)), "{ended:?} {stderr}");
    let (ended, _) = in_filtered_child(ThreadKind::Vmm, open_a_file);
    assert!(matches!(ended, Ended::Signalled(libc::SIGSYS)), "{ended:?}");
}

#[test]
fn the_vmm_filter_allows_the_vcpu_kick_signal() {
    // The vmm filter allows tgkill only with signal 34: glibc's SIGRTMIN.
    assert_eq!(crate::vstate::vcpu::kick_signal(), 34);
}

#[test]
fn the_device_thread_may_use_host_sockets() {
    use std::io::Write;
    // Made outside the filter, as the vsock backend's listener is.
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let (ended, stderr) = in_filtered_child(ThreadKind::Devices, move || {
        a.set_nonblocking(true).unwrap();
        a.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        b.read_exact(&mut byte).unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
    });
    assert!(matches!(ended, Ended::Exited(0)), "{ended:?} {stderr}");
}

#[test]
fn the_main_thread_can_read_its_memory_for_the_timing_report() {
    // Opened outside the filter, as `agentvm boot --report-timings` does.
    let mut status = std::fs::File::open(crate::process_stats::SELF_STATUS).unwrap();
    let (ended, stderr) = in_filtered_child(ThreadKind::Vmm, move || {
        assert!(crate::process_stats::rss_from(&mut status).total_kib > 0);
    });
    assert!(matches!(ended, Ended::Exited(0)), "{ended:?} {stderr}");
}

#[test]
fn the_egress_thread_may_intercept_tls() {
    use egress::inspect::RequestRewriter;
    use egress::tls::{upstream_client_config, MitmSession, SandboxCa};
    // Made on the calling thread before the filter, as `egress::spawn` does.
    let ca = SandboxCa::generate("seccomp-test").unwrap();
    let upstream = upstream_client_config(&[]).unwrap();
    let (ended, stderr) = in_filtered_child(ThreadKind::Egress, move || {
        // Minting a leaf, both key exchanges and the server's signature all run here.
        let mut session =
            MitmSession::new(&ca, "api.test", upstream, RequestRewriter::new(Vec::new())).unwrap();
        let mut client_hello = Vec::new();
        session.to_upstream(&mut client_hello);
        assert!(!client_hello.is_empty());
        session.from_guest(&client_hello).unwrap();
        let mut server_flight = Vec::new();
        session.to_guest(&mut server_flight);
        assert!(server_flight.len() > client_hello.len());
    });
    assert!(matches!(ended, Ended::Exited(0)), "{ended:?} {stderr}");
}

#[test]
fn an_isolate_fetcher_may_fetch_but_the_isolate_job_may_not_open_a_socket() {
    use std::io::Write;
    use std::time::Instant;

    use egress::fetch::{FetchRequest, Fetcher, FetcherConfig};
    // A server on loopback answering one request.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    });
    let nameserver = fake_nameserver();
    // Built on the calling thread before the filter, as FetchThread::spawn does; the name is
    // resolved over UDP DNS (a mio Poll) under the filter.
    let mut fetcher = Fetcher::new(FetcherConfig {
        policy: egress::policy::Policy::from_json_str(
            r#"{"rules":[{"id":"lo","cidr":"127.0.0.1/32","ports":[1]},{"id":"n","domain":"fetch.test"}]}"#,
        )
        .unwrap(),
        resolver: egress::ResolverConfig {
            nameservers: vec![nameserver],
            hosts: Vec::new(),
            timeout: Duration::from_secs(5),
        },
        extra_upstream_roots: Vec::new(),
        audit: egress::audit::AuditLog::disabled(),
        sandbox: "seccomp-test".into(),
        max_response_bytes: 1024,
    })
    .unwrap();
    let (ended, stderr) = in_filtered_child(ThreadKind::IsolateFetch, move || {
        let request = FetchRequest {
            method: "GET".into(),
            url: format!("http://fetch.test:{port}/"),
            ..FetchRequest::default()
        };
        let response = fetcher
            .fetch(&request, Instant::now() + Duration::from_secs(10))
            .unwrap();
        assert_eq!(response.body, b"ok");
    });
    assert!(matches!(ended, Ended::Exited(0)), "{ended:?} {stderr}");
    server.join().unwrap();

    let (ended, stderr) = in_filtered_child(ThreadKind::Isolate, || {
        let _ = std::net::UdpSocket::bind("127.0.0.1:0");
    });
    assert!(matches!(ended, Ended::Signalled(libc::SIGSYS)), "{ended:?}");
    assert!(stderr.contains("socket"), "{stderr}");
}

/// A UDP nameserver on loopback answering two queries: 127.0.0.1 to an A query, no records to
/// anything else. Hand-made answers: the question is echoed, one A record points back at it.
fn fake_nameserver() -> std::net::SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let address = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        for _ in 0..2 {
            let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                return;
            };
            let mut end = 12;
            while end < n && buf[end] != 0 {
                end += 1 + buf[end] as usize;
            }
            let question_end = end + 5;
            let is_a = buf[end + 1..end + 3] == [0, 1];
            let mut answer = buf[..2].to_vec();
            answer.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
            answer.extend_from_slice(&buf[12..question_end]);
            if is_a {
                answer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
            }
            let _ = socket.send_to(&answer, peer);
        }
    });
    address
}
