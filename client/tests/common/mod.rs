//! A scripted fake guest agent on the other end of a socket pair, written with the protocol crate
//! only, so the client is tested independently of the real agent.

#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use agentvm_client::AgentClient;
use agentvm_protocol::{
    handshake, Data, Features, FrameReader, FrameWriter, Hello, Message, Role, SendWindow, Stream,
    Window,
};

/// Every wait in the fake agent and in the tests is bounded by this, so that a client bug shows
/// as a failed test rather than a hung one. Generous: it is a hang guard, not a timing check.
pub const GUARD: Duration = Duration::from_secs(20);

pub struct FakeAgent {
    pub reader: FrameReader<UnixStream>,
    pub writer: FrameWriter<UnixStream>,
    pub socket: UnixStream,
}

impl FakeAgent {
    /// The guest side of a handshake on `socket`, with `hello` as the agent's Hello.
    pub fn accept(socket: UnixStream, hello: Hello) -> Result<FakeAgent, agentvm_protocol::Error> {
        socket.set_read_timeout(Some(GUARD)).unwrap();
        socket.set_write_timeout(Some(GUARD)).unwrap();
        let mut reader = FrameReader::new(socket.try_clone().unwrap());
        let mut writer = FrameWriter::new(socket.try_clone().unwrap());
        handshake(&mut reader, &mut writer, &hello)?;
        Ok(FakeAgent {
            reader,
            writer,
            socket,
        })
    }

    /// The next message from the client; panics on end of stream or after [`GUARD`].
    pub fn recv(&mut self) -> Message {
        match self.reader.read_message() {
            Ok(Some(message)) => {
                assert!(
                    message.sent_by(Role::Host),
                    "client sent {}",
                    message.name()
                );
                message
            }
            Ok(None) => panic!("the client closed the connection"),
            Err(e) => panic!("fake agent read failed: {e}"),
        }
    }

    /// Like `recv`, but `None` when the client closed the connection.
    pub fn recv_or_eof(&mut self) -> Option<Message> {
        match self.reader.read_message() {
            Ok(message) => message,
            Err(agentvm_protocol::Error::Io(e))
                if e.kind() == std::io::ErrorKind::ConnectionReset =>
            {
                None
            }
            Err(e) => panic!("fake agent read failed: {e}"),
        }
    }

    pub fn send(&mut self, message: impl Into<Message>) {
        self.writer.write_message(&message.into()).unwrap();
    }

    /// Sends `data` on `stream` of request `id`, never beyond the window: when out of credit, it
    /// reads messages until the client grants more (every other message fails the test).
    pub fn send_stream(&mut self, id: u64, stream: Stream, data: &[u8], window: &mut SendWindow) {
        let mut rest = data;
        while !rest.is_empty() {
            let n = window.next_chunk(rest.len());
            if n == 0 {
                match self.recv() {
                    Message::Window(w) if w.id == id && w.stream == stream => {
                        window.grant(w.bytes).unwrap()
                    }
                    other => panic!("expected a Window for {id}/{stream:?}, got {other:?}"),
                }
                continue;
            }
            window.consume(n).unwrap();
            self.send(Data {
                id,
                stream,
                data: rest[..n].to_vec(),
            });
            rest = &rest[n..];
        }
    }

    /// Receives everything the client sends on `stream` of `id` until its `Eof`, granting credit
    /// back as it goes (like a real agent); checks the client stays within the window.
    pub fn recv_stream(&mut self, id: u64, stream: Stream) -> Vec<u8> {
        let mut window = agentvm_protocol::RecvWindow::new();
        let mut out = Vec::new();
        loop {
            match self.recv() {
                Message::Data(d) if d.id == id && d.stream == stream => {
                    window
                        .received(d.data.len())
                        .expect("client sent beyond the window");
                    out.extend_from_slice(&d.data);
                    if let Some(bytes) = window.consumed(d.data.len()) {
                        self.send(Window { id, stream, bytes });
                    }
                }
                Message::Eof(e) if e.id == id && e.stream == stream => return out,
                other => panic!("expected data of {id}/{stream:?}, got {other:?}"),
            }
        }
    }
}

pub fn agent_hello() -> Hello {
    Hello::new(Role::Guest, "fake-agent 9.9.9", Features::ALL)
}

/// A client connected to a fake agent over a socket pair.
pub fn connect() -> (AgentClient, FakeAgent) {
    let (host, guest) = UnixStream::pair().unwrap();
    let agent = thread::spawn(move || FakeAgent::accept(guest, agent_hello()).unwrap());
    let client = AgentClient::from_stream(host).unwrap();
    (client, agent.join().unwrap())
}

/// Runs `f` on a thread and returns its result, failing the test if it takes longer than
/// [`GUARD`] (a hang guard for calls that must not block forever).
pub fn within_guard<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(GUARD).expect("call hung")
}
