//! The other ends of the egress filter for its tests, beside the guest (`egress::peer`):
//! upstream echo servers and a fake DNS server on 127.0.0.0/8, and an audit log kept in memory.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

/// Every wait in these tests gives up after this long (a hang is a failure, not a stall).
pub const WAIT: Duration = Duration::from_secs(20);

/// A TCP server on 127.0.0.x that echoes every connection until EOF, then closes.
pub struct EchoServer {
    pub address: SocketAddrV4,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ip: Ipv4Addr) -> Self {
        Self::start_with_greeting(ip, b"")
    }

    /// Sends `greeting` on every connection before echoing (a server that speaks first).
    pub fn start_with_greeting(ip: Ipv4Addr, greeting: &'static [u8]) -> Self {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let SocketAddr::V4(address) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        std::thread::spawn(move || {
                            stream.set_nonblocking(false).unwrap();
                            stream.set_read_timeout(Some(WAIT)).unwrap();
                            if stream.write_all(greeting).is_err() {
                                return;
                            }
                            let mut buffer = vec![0u8; 64 * 1024];
                            loop {
                                match stream.read(&mut buffer) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        if stream.write_all(&buffer[..n]).is_err() {
                                            break;
                                        }
                                    }
                                }
                            }
                            let _ = stream.shutdown(std::net::Shutdown::Write);
                        });
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(error) => panic!("echo server accept: {error}"),
                }
            }
        });
        Self {
            address,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A TCP server on 127.0.0.x that reads one chunk from each connection, then resets it.
pub struct ResettingServer {
    pub address: SocketAddrV4,
    thread: Option<JoinHandle<()>>,
}

impl ResettingServer {
    /// Serves one connection.
    pub fn start(ip: Ipv4Addr) -> Self {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let SocketAddr::V4(address) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        let thread = std::thread::spawn(move || {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            stream.set_read_timeout(Some(WAIT)).unwrap();
            let mut buffer = [0u8; 1024];
            let _ = stream.read(&mut buffer);
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt reads a linger struct we own, of the size we pass.
            let result = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&stream),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            assert_eq!(result, 0, "SO_LINGER: {}", io::Error::last_os_error());
            // Closing with a zero linger time sends RST instead of FIN.
            drop(stream);
        });
        Self {
            address,
            thread: Some(thread),
        }
    }
}

impl Drop for ResettingServer {
    fn drop(&mut self) {
        // Unblock a pending accept if the test never connected.
        let _ = std::net::TcpStream::connect(self.address);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A DNS server on 127.0.0.1 answering A queries from a fixed table, NXDOMAIN otherwise.
pub struct FakeDns {
    pub address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDns {
    pub fn start(table: Vec<(&'static str, Ipv4Addr)>) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let address = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while !stopping.load(Ordering::Relaxed) {
                let Ok((length, from)) = socket.recv_from(&mut buffer) else {
                    continue;
                };
                let query = Message::from_vec(&buffer[..length]).unwrap();
                let question = query.queries()[0].clone();
                let name = question.name().to_ascii();
                let mut answer = Message::new();
                answer
                    .set_id(query.id())
                    .set_message_type(MessageType::Response)
                    .set_op_code(OpCode::Query)
                    .add_query(question.clone());
                let known: Vec<Ipv4Addr> = table
                    .iter()
                    .filter(|(known, _)| format!("{known}.") == name)
                    .map(|(_, address)| *address)
                    .collect();
                if known.is_empty() {
                    answer.set_response_code(ResponseCode::NXDomain);
                } else if question.query_type() == RecordType::A {
                    for address in known {
                        answer.add_answer(Record::from_rdata(
                            question.name().clone(),
                            3600,
                            RData::A(A(address)),
                        ));
                    }
                }
                socket.send_to(&answer.to_vec().unwrap(), from).unwrap();
            }
        });
        Self {
            address,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An audit log kept in memory.
#[derive(Clone, Default)]
pub struct AuditBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for AuditBuffer {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AuditBuffer {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// Every line so far, parsed.
    pub fn events(&self) -> Vec<serde_json::Value> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}
