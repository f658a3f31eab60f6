//! The version handshake: each side's first frame is a [`Hello`].

use std::fmt;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::frame::{FrameReader, FrameWriter};
use crate::message::{kind, Message};

/// First four bytes of every Hello payload: tells a peer speaking something else apart from a
/// peer speaking another version of this protocol.
pub const MAGIC: [u8; 4] = *b"AGVM";

/// The protocol version this crate implements.
pub const PROTOCOL_VERSION: Version = Version { major: 1, minor: 0 };

/// A protocol version. Peers interoperate when their majors are equal; the minor only adds
/// message kinds and feature bits, so the smaller minor of the two is what the connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

impl Version {
    /// The `u32` carried in [`Hello::protocol_version`]: `major << 16 | minor`.
    pub const fn to_u32(self) -> u32 {
        ((self.major as u32) << 16) | self.minor as u32
    }

    pub const fn from_u32(value: u32) -> Self {
        Self {
            major: (value >> 16) as u16,
            minor: value as u16,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Which end of the connection a Hello comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Host,
    Guest,
}

impl Role {
    pub fn peer(self) -> Role {
        match self {
            Role::Host => Role::Guest,
            Role::Guest => Role::Host,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Host => "host",
            Role::Guest => "guest agent",
        })
    }
}

/// Optional capabilities, as a bitset. A guest advertises the services it implements; the host
/// advertises what it may use. Bits a side does not know are ignored (a minor version may add
/// some), so the negotiated set is the intersection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Features(pub u64);

impl Features {
    pub const EXEC: Features = Features(1 << 0);
    pub const PROCESSES: Features = Features(1 << 1);
    pub const PTY: Features = Features(1 << 2);
    pub const WATCH: Features = Features(1 << 3);
    pub const FILES: Features = Features(1 << 4);
    pub const PORT_FORWARD: Features = Features(1 << 5);
    pub const AFTER_RESTORE: Features = Features(1 << 6);
    /// Every feature this version defines.
    pub const ALL: Features = Features((1 << 7) - 1);

    pub const fn empty() -> Self {
        Features(0)
    }

    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn union(self, other: Features) -> Features {
        Features(self.0 | other.0)
    }

    pub const fn intersection(self, other: Features) -> Features {
        Features(self.0 & other.0)
    }
}

impl std::ops::BitOr for Features {
    type Output = Features;
    fn bitor(self, rhs: Features) -> Features {
        self.union(rhs)
    }
}

/// The first frame each side sends (frame kind [`kind::HELLO`]). Its encoding is frozen across
/// all protocol versions, so that any two versions can at least tell each other apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`MAGIC`].
    pub magic: [u8; 4],
    /// [`Version::to_u32`] of the sender's protocol version.
    pub protocol_version: u32,
    pub role: Role,
    /// The sender's own version (the agent's or the host's), for humans: it appears in errors.
    pub software_version: String,
    pub features: Features,
}

impl Hello {
    /// A Hello for this crate's [`PROTOCOL_VERSION`].
    pub fn new(role: Role, software_version: impl Into<String>, features: Features) -> Self {
        Self {
            magic: MAGIC,
            protocol_version: PROTOCOL_VERSION.to_u32(),
            role,
            software_version: software_version.into(),
            features,
        }
    }

    pub fn version(&self) -> Version {
        Version::from_u32(self.protocol_version)
    }

    /// Checks the peer's Hello against ours: magic, opposite role, same major version.
    pub fn negotiate(&self, peer: &Hello) -> Result<Negotiated, Error> {
        if peer.magic != MAGIC {
            return Err(Error::BadMagic {
                found: peer.magic,
                expected: MAGIC,
            });
        }
        if peer.role == self.role {
            return Err(Error::WrongRole {
                peer: peer.role,
                expected: self.role.peer(),
            });
        }
        let (local, remote) = (self.version(), peer.version());
        if local.major != remote.major {
            return Err(Error::VersionMismatch {
                local_role: self.role,
                local,
                local_software: self.software_version.clone(),
                peer_role: peer.role,
                peer: remote,
                peer_software: peer.software_version.clone(),
            });
        }
        Ok(Negotiated {
            version: local.min(remote),
            features: self.features.intersection(peer.features),
            peer: peer.clone(),
        })
    }
}

/// What a successful handshake agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The version both understand: the common major and the smaller minor.
    pub version: Version,
    /// Features both sides advertised.
    pub features: Features,
    pub peer: Hello,
}

/// Sends our Hello, then reads and checks the peer's. Both sides may call this at once: a Hello is
/// far smaller than any stream buffer, so neither write waits for the other's read.
pub fn handshake<R: Read, W: Write>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    local: &Hello,
) -> Result<Negotiated, Error> {
    let sent = writer
        .write_message(&Message::Hello(local.clone()))
        .and_then(|()| writer.flush());
    if let Err(e) = sent {
        let e = closed_before_hello(e);
        if matches!(e, Error::ClosedBeforeHello) {
            // A peer that refuses our version may say Hello and hang up before our Hello is
            // written; its Hello, still readable, says why far better than the broken pipe.
            if let Ok(Some(frame)) = reader.read_frame() {
                if let Ok(Message::Hello(peer)) = Message::from_frame(&frame) {
                    local.negotiate(&peer)?;
                }
            }
        }
        return Err(e);
    }
    let frame = match reader.read_frame() {
        Ok(Some(frame)) => frame,
        Ok(None) => return Err(Error::ClosedBeforeHello),
        Err(Error::FrameTooLarge { len, .. }) => {
            return Err(Error::GarbageBeforeHello {
                first_bytes: len.to_le_bytes(),
            })
        }
        Err(e) => return Err(closed_before_hello(e)),
    };
    if frame.kind != kind::HELLO {
        return Err(Error::NotHello { kind: frame.kind });
    }
    match Message::from_frame(&frame) {
        Ok(Message::Hello(peer)) => local.negotiate(&peer),
        Ok(other) => Err(Error::NotHello { kind: other.kind() }),
        // Per-frame errors elsewhere, but without a Hello the connection has nothing to go on.
        Err(e) => Err(Error::BadHello {
            reason: e.to_string(),
        }),
    }
}

/// A peer that went away during the handshake shows up as a reset or a broken pipe, depending on
/// timing; either way the clear diagnosis is that it closed before saying Hello.
fn closed_before_hello(error: Error) -> Error {
    match &error {
        Error::Io(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            Error::ClosedBeforeHello
        }
        _ => error,
    }
}
