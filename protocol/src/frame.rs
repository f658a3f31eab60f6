//! Frame layer: `u32 LE payload length | u8 kind | payload`, over blocking streams
//! ([`FrameReader`], [`FrameWriter`]) or fed incrementally from an event loop ([`FrameDecoder`]).

use std::io::{self, Read, Write};

use crate::error::Error;
use crate::message::Message;

/// Bytes before the payload: the length (u32 LE) and the kind.
pub const HEADER_LEN: usize = 5;

/// Largest payload either side sends or accepts. Large data travels as `Data` messages of at most
/// [`MAX_CHUNK`](crate::MAX_CHUNK) bytes, so only a huge batch of control data could come near it.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// One frame as it travels: its kind and its (still encoded) payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The frame's wire bytes. Fails if the payload exceeds [`MAX_PAYLOAD`].
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        check_len(self.payload.len())?;
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.push(self.kind);
        out.extend_from_slice(&self.payload);
        Ok(out)
    }

    /// Decodes the payload as the message its kind names.
    pub fn to_message(&self) -> Result<Message, Error> {
        Message::from_frame(self)
    }
}

fn check_len(len: usize) -> Result<(), Error> {
    if len > MAX_PAYLOAD {
        return Err(Error::FrameTooLarge {
            len: u32::try_from(len).unwrap_or(u32::MAX),
            max: MAX_PAYLOAD,
        });
    }
    Ok(())
}

/// Parses a header; the length is checked before anyone allocates for it.
fn parse_header(header: &[u8; HEADER_LEN]) -> Result<(usize, u8), Error> {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    if len as usize > MAX_PAYLOAD {
        return Err(Error::FrameTooLarge {
            len,
            max: MAX_PAYLOAD,
        });
    }
    Ok((len as usize, header[4]))
}

/// Reads frames from a blocking byte stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner }
    }

    /// The next frame; `Ok(None)` when the stream ends cleanly between frames.
    pub fn read_frame(&mut self) -> Result<Option<Frame>, Error> {
        let mut header = [0u8; HEADER_LEN];
        let got = read_full(&mut self.inner, &mut header)?;
        if got == 0 {
            return Ok(None);
        }
        if got < HEADER_LEN {
            return Err(Error::Truncated {
                expected: HEADER_LEN,
                received: got,
            });
        }
        let (len, kind) = parse_header(&header)?;
        let mut payload = vec![0u8; len];
        let got = read_full(&mut self.inner, &mut payload)?;
        if got < len {
            return Err(Error::Truncated {
                expected: HEADER_LEN + len,
                received: HEADER_LEN + got,
            });
        }
        Ok(Some(Frame { kind, payload }))
    }

    /// The next message; `Ok(None)` on a clean end of stream. A non-fatal error (see
    /// [`Error::is_fatal`]) consumed exactly one frame: reading can go on.
    pub fn read_message(&mut self) -> Result<Option<Message>, Error> {
        match self.read_frame()? {
            Some(frame) => Message::from_frame(&frame).map(Some),
            None => Ok(None),
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Like `read_exact`, but reports how much arrived before end of stream instead of failing.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Writes frames to a blocking byte stream, one `write_all` per frame (so a frame is never
/// interleaved with another writer's if callers serialise calls, e.g. behind a mutex).
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner }
    }

    pub fn write_message(&mut self, message: &Message) -> Result<(), Error> {
        let bytes = message.encode()?;
        self.inner.write_all(&bytes)?;
        Ok(())
    }

    pub fn write_frame(&mut self, frame: &Frame) -> Result<(), Error> {
        let bytes = frame.to_bytes()?;
        self.inner.write_all(&bytes)?;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), Error> {
        self.inner.flush()?;
        Ok(())
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Incremental, non-blocking frame decoder for event loops: feed it whatever bytes the socket had,
/// take out the complete frames. Each byte is copied once, into its frame's payload, whose buffer
/// is allocated only after the length passed the [`MAX_PAYLOAD`] check.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// The frame being filled, once its header is complete.
    current: Option<(u8, Vec<u8>, usize)>,
    /// Bytes given to [`push`](Self::push) and not yet assembled into frames.
    pending: Vec<u8>,
    pending_pos: usize,
    /// A fatal error poisons the decoder: the stream is out of sync for good.
    failed: Option<(u32, usize)>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes; take frames out with [`next_frame`](Self::next_frame).
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pending_pos == self.pending.len() {
            self.pending.clear();
            self.pending_pos = 0;
        }
        self.pending.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. After an error every call
    /// returns it again: the connection must be dropped.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, Error> {
        if let Some((len, max)) = self.failed {
            return Err(Error::FrameTooLarge { len, max });
        }
        loop {
            let input = &self.pending[self.pending_pos..];
            if let Some((kind, payload, filled)) = &mut self.current {
                let take = input.len().min(payload.len() - *filled);
                payload[*filled..*filled + take].copy_from_slice(&input[..take]);
                *filled += take;
                self.pending_pos += take;
                if *filled == payload.len() {
                    let (kind, payload) = (*kind, std::mem::take(payload));
                    self.current = None;
                    return Ok(Some(Frame { kind, payload }));
                }
                return Ok(None);
            }
            if input.is_empty() {
                return Ok(None);
            }
            let take = input.len().min(HEADER_LEN - self.header_len);
            self.header[self.header_len..self.header_len + take].copy_from_slice(&input[..take]);
            self.header_len += take;
            self.pending_pos += take;
            if self.header_len < HEADER_LEN {
                return Ok(None);
            }
            self.header_len = 0;
            match parse_header(&self.header) {
                Ok((len, kind)) => self.current = Some((kind, vec![0u8; len], 0)),
                Err(e) => {
                    if let Error::FrameTooLarge { len, max } = e {
                        self.failed = Some((len, max));
                    }
                    self.pending = Vec::new();
                    self.pending_pos = 0;
                    return Err(e);
                }
            }
        }
    }

    /// Feeds bytes and returns every frame they complete. On a fatal error the frames completed
    /// before the bad header in this same call are dropped with the connection; use
    /// [`push`](Self::push) + [`next_frame`](Self::next_frame) to keep them.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<Frame>, Error> {
        self.push(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = self.next_frame()? {
            frames.push(frame);
        }
        Ok(frames)
    }

    /// Bytes of an unfinished frame held so far (0 at a frame boundary).
    pub fn buffered(&self) -> usize {
        let partial = match &self.current {
            Some((_, _, filled)) => HEADER_LEN + filled,
            None => self.header_len,
        };
        partial + self.pending.len() - self.pending_pos
    }

    /// Call when the stream ended: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), Error> {
        if let Some((len, max)) = self.failed {
            return Err(Error::FrameTooLarge { len, max });
        }
        let received = self.buffered();
        if received == 0 {
            return Ok(());
        }
        let expected = match &self.current {
            Some((_, payload, _)) => HEADER_LEN + payload.len(),
            None => HEADER_LEN,
        };
        Err(Error::Truncated { expected, received })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Frame {
        Frame {
            kind,
            payload: payload.to_vec(),
        }
    }

    fn wire(frames: &[Frame]) -> Vec<u8> {
        frames.iter().flat_map(|f| f.to_bytes().unwrap()).collect()
    }

    #[test]
    fn header_layout_is_length_le_then_kind() {
        let bytes = frame(0x42, b"abc").to_bytes().unwrap();
        assert_eq!(bytes, [3, 0, 0, 0, 0x42, b'a', b'b', b'c']);
    }

    #[test]
    fn reader_reads_frames_then_clean_eof() {
        let frames = vec![frame(1, b"hello"), frame(2, b""), frame(3, &[7; 1000])];
        let bytes = wire(&frames);
        let mut reader = FrameReader::new(&bytes[..]);
        for expected in &frames {
            assert_eq!(reader.read_frame().unwrap().as_ref(), Some(expected));
        }
        assert!(reader.read_frame().unwrap().is_none());
    }

    #[test]
    fn writer_output_is_what_the_reader_reads() {
        let mut writer = FrameWriter::new(Vec::new());
        writer.write_frame(&frame(9, b"xyz")).unwrap();
        writer.flush().unwrap();
        let bytes = writer.into_inner();
        let mut reader = FrameReader::new(&bytes[..]);
        assert_eq!(reader.read_frame().unwrap(), Some(frame(9, b"xyz")));
    }

    #[test]
    fn decoder_byte_by_byte_matches_whole_input() {
        let frames = vec![
            frame(1, b"first"),
            frame(2, b""),
            frame(3, &[0xa5; 3000]),
            frame(4, b"last"),
        ];
        let bytes = wire(&frames);
        let mut decoder = FrameDecoder::new();
        let mut got = Vec::new();
        for (i, byte) in bytes.iter().enumerate() {
            got.extend(decoder.feed(std::slice::from_ref(byte)).unwrap());
            // Frames come out exactly when their last byte arrives.
            assert_eq!(decoder.buffered() == 0, frame_ends(&frames, i + 1));
        }
        assert_eq!(got, frames);
        decoder.finish().unwrap();

        // Every split of the input into two pieces gives the same frames.
        for split in 0..=bytes.len() {
            let mut decoder = FrameDecoder::new();
            let mut got = decoder.feed(&bytes[..split]).unwrap();
            got.extend(decoder.feed(&bytes[split..]).unwrap());
            assert_eq!(got, frames, "split at {split}");
        }
    }

    fn frame_ends(frames: &[Frame], offset: usize) -> bool {
        let mut end = 0;
        for f in frames {
            end += HEADER_LEN + f.payload.len();
            if end == offset {
                return true;
            }
        }
        false
    }

    #[test]
    fn push_and_next_frame_keep_frames_before_a_bad_header() {
        let mut bytes = wire(&[frame(1, b"ok")]);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.push(1);
        let mut decoder = FrameDecoder::new();
        decoder.push(&bytes);
        assert_eq!(decoder.next_frame().unwrap(), Some(frame(1, b"ok")));
        assert!(matches!(
            decoder.next_frame(),
            Err(Error::FrameTooLarge { len: u32::MAX, .. })
        ));
        // Poisoned for good: later input cannot resynchronise a length-prefixed stream.
        decoder.push(&wire(&[frame(1, b"ok")]));
        assert!(matches!(
            decoder.next_frame(),
            Err(Error::FrameTooLarge { .. })
        ));
        assert!(decoder.finish().is_err());
    }

    #[test]
    fn oversized_length_is_refused_without_allocating() {
        let limit = MAX_PAYLOAD as u32;
        // Exactly the limit is fine (the reader then waits for the payload).
        let mut header = limit.to_le_bytes().to_vec();
        header.push(1);
        let mut decoder = FrameDecoder::new();
        assert!(decoder.feed(&header).unwrap().is_empty());
        assert!(matches!(
            decoder.finish(),
            Err(Error::Truncated { expected, received: HEADER_LEN })
                if expected == HEADER_LEN + MAX_PAYLOAD
        ));

        // One more is refused by all three readers. `u32::MAX` would be a 4 GiB allocation.
        for len in [limit + 1, u32::MAX] {
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.push(1);
            let err = FrameDecoder::new().feed(&bytes).unwrap_err();
            assert!(matches!(err, Error::FrameTooLarge { len: l, max: MAX_PAYLOAD } if l == len));
            assert!(err.is_fatal());
            let err = FrameReader::new(&bytes[..]).read_frame().unwrap_err();
            assert!(matches!(err, Error::FrameTooLarge { len: l, .. } if l == len));
            assert!(err.to_string().contains(&len.to_string()), "{err}");
        }

        // And never produced by the writer side.
        let big = frame(1, &vec![0; MAX_PAYLOAD + 1]);
        assert!(matches!(big.to_bytes(), Err(Error::FrameTooLarge { .. })));
        let mut writer = FrameWriter::new(Vec::new());
        assert!(writer.write_frame(&big).is_err());
        assert!(writer.get_ref().is_empty());
        assert!(frame(1, &vec![0; MAX_PAYLOAD]).to_bytes().is_ok());
    }

    #[test]
    fn truncated_frames_are_errors_not_clean_eof() {
        let bytes = wire(&[frame(5, b"0123456789")]);
        for cut in 1..bytes.len() {
            let err = FrameReader::new(&bytes[..cut]).read_frame().unwrap_err();
            match err {
                Error::Truncated { expected, received } => {
                    assert_eq!(received, cut);
                    let whole = if cut < HEADER_LEN {
                        HEADER_LEN
                    } else {
                        bytes.len()
                    };
                    assert_eq!(expected, whole);
                }
                other => panic!("cut at {cut}: {other}"),
            }
            let mut decoder = FrameDecoder::new();
            assert!(decoder.feed(&bytes[..cut]).unwrap().is_empty());
            assert!(matches!(
                decoder.finish(),
                Err(Error::Truncated { received, .. }) if received == cut
            ));
        }
    }

    /// A reader that hands out one byte per call and is interrupted in between.
    struct Trickle<'a> {
        data: &'a [u8],
        interrupt: bool,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let Some((first, rest)) = self.data.split_first() else {
                return Ok(0);
            };
            buf[0] = *first;
            self.data = rest;
            Ok(1)
        }
    }

    #[test]
    fn reader_handles_short_and_interrupted_reads() {
        let frames = vec![frame(1, b"abc"), frame(2, &[1; 300])];
        let bytes = wire(&frames);
        let mut reader = FrameReader::new(Trickle {
            data: &bytes,
            interrupt: false,
        });
        assert_eq!(reader.read_frame().unwrap(), Some(frames[0].clone()));
        assert_eq!(reader.read_frame().unwrap(), Some(frames[1].clone()));
        assert_eq!(reader.read_frame().unwrap(), None);
    }

    #[test]
    fn io_errors_are_fatal_and_passed_through() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::ConnectionReset.into())
            }
        }
        let err = FrameReader::new(Broken).read_frame().unwrap_err();
        assert!(matches!(&err, Error::Io(e) if e.kind() == io::ErrorKind::ConnectionReset));
        assert!(err.is_fatal());
    }
}
