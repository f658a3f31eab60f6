//! Test harness for the agent's protocol server: the agent binary in host-process mode
//! (`--listen-unix`), and a small raw-frame client that speaks the protocol as the host.
//!
//! Running the agent as its own process keeps its reaper (which reaps every child of its process)
//! away from the test harness's own children.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use agentvm_protocol::{
    handshake, Command as Cmd, ErrorMsg, Exec, ExitStatus, Features, FrameReader, FrameWriter,
    Hello, Message, Negotiated, ProcessSpec, Role, Stream, Window,
};

/// Generous bound on any single wait for the agent, so a broken agent fails a test instead of
/// hanging it. Never reached when things work.
pub const WAIT: Duration = Duration::from_secs(30);

pub struct Agent {
    child: Child,
    dir: PathBuf,
    pub socket: PathBuf,
}

impl Agent {
    pub fn start() -> Agent {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "agentvm-agent-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_agentvm-guest-agent"))
            .arg("--listen-unix")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the agent in host mode");
        // The agent says so once it accepts connections (or exits, closing stdout, if it cannot).
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.contains("listening on"),
            "agent did not start: {line:?}"
        );
        Agent { child, dir, socket }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stream(&self) -> UnixStream {
        UnixStream::connect(&self.socket).expect("connect to the agent")
    }

    pub fn connect(&self) -> Client {
        Client::handshake(self.stream(), Features::ALL).expect("handshake with the agent")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct Client {
    reader: FrameReader<BufReader<UnixStream>>,
    writer: FrameWriter<UnixStream>,
    pub negotiated: Negotiated,
    /// Messages read while looking for another request's.
    inbox: VecDeque<Message>,
}

#[derive(Debug, Default)]
pub struct ExecResult {
    pub pid: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    pub error: Option<ErrorMsg>,
    /// Every message of the request, in order.
    pub messages: Vec<Message>,
}

impl Client {
    pub fn handshake(
        stream: UnixStream,
        features: Features,
    ) -> Result<Client, agentvm_protocol::Error> {
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut reader = FrameReader::new(BufReader::new(stream.try_clone().unwrap()));
        let mut writer = FrameWriter::new(stream);
        let hello = Hello::new(Role::Host, "agentvm-test 0.0.0", features);
        let negotiated = handshake(&mut reader, &mut writer, &hello)?;
        Ok(Client {
            reader,
            writer,
            negotiated,
            inbox: VecDeque::new(),
        })
    }

    pub fn send(&mut self, message: impl Into<Message>) {
        self.writer.write_message(&message.into()).unwrap();
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.writer.get_mut().write_all(bytes).unwrap();
    }

    /// The next message from the agent (panics on timeout or end of connection).
    pub fn recv(&mut self) -> Message {
        if let Some(message) = self.inbox.pop_front() {
            return message;
        }
        self.recv_wire().expect("the agent closed the connection")
    }

    /// The next message off the wire; None at end of connection.
    pub fn recv_wire(&mut self) -> Option<Message> {
        self.reader
            .read_message()
            .expect("a valid message from the agent (or a timeout?)")
    }

    /// The next message about request `id`, keeping others for later.
    pub fn recv_for(&mut self, id: u64) -> Message {
        if let Some(pos) = self.inbox.iter().position(|m| m.request_id() == Some(id)) {
            return self.inbox.remove(pos).unwrap();
        }
        loop {
            let message = self.recv_wire().expect("the agent closed the connection");
            if message.request_id() == Some(id) {
                return message;
            }
            self.inbox.push_back(message);
        }
    }

    pub fn grant(&mut self, id: u64, stream: Stream, bytes: u32) {
        self.send(Window { id, stream, bytes });
    }

    /// Collects request `id` up to its final message, granting window as output arrives.
    pub fn collect(&mut self, id: u64) -> ExecResult {
        let mut result = ExecResult::default();
        loop {
            let message = self.recv_for(id);
            result.messages.push(message.clone());
            match message {
                Message::Started(s) => result.pid = Some(s.pid),
                Message::Data(d) => {
                    let n = d.data.len() as u32;
                    match d.stream {
                        Stream::Stdout => result.stdout.extend(d.data),
                        Stream::Stderr => result.stderr.extend(d.data),
                        Stream::Stdin => panic!("agent sent Data on Stdin"),
                    }
                    if n > 0 {
                        self.grant(id, d.stream, n);
                    }
                }
                Message::Exited(e) => {
                    result.status = Some(e.status);
                    result.timed_out = e.timed_out;
                    return result;
                }
                Message::ErrorMsg(e) => {
                    result.error = Some(e);
                    return result;
                }
                Message::Done(_) => return result,
                _ => {}
            }
        }
    }

    pub fn exec(&mut self, id: u64, spec: ProcessSpec) -> ExecResult {
        self.send(Exec {
            id,
            spec,
            stdin: false,
        });
        self.collect(id)
    }

    pub fn sh(&mut self, id: u64, script: &str) -> ExecResult {
        self.exec(id, ProcessSpec::new(Cmd::Shell(script.to_string())))
    }
}

pub fn argv(args: &[&str]) -> ProcessSpec {
    ProcessSpec::new(Cmd::Argv(args.iter().map(|s| s.to_string()).collect()))
}

/// Whether `pid` is gone (or a zombie nobody reaped yet, which runs nothing).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// Waits (bounded by [`WAIT`]) until `pid` is gone.
pub fn wait_gone(pid: u32) {
    let deadline = Instant::now() + WAIT;
    while !process_gone(pid) {
        assert!(Instant::now() < deadline, "process {pid} still running");
        std::thread::sleep(Duration::from_millis(10));
    }
}
