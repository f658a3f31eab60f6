//! Little-endian, length-prefixed encodings of everything that crosses the mailbox and the input
//! region. Hand-written rather than postcard/serde: the guest is `no_std` without a serde stack,
//! and these are a handful of fixed shapes.

/// The buffer ended before the value did, or a length/tag was impossible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    Truncated,
    BadTag(u8),
    NotUtf8,
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "truncated"),
            DecodeError::BadTag(t) => write!(f, "unknown value tag {t}"),
            DecodeError::NotUtf8 => write!(f, "text is not UTF-8"),
        }
    }
}

/// Reads from a byte slice front to back.
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A `u32` length, then that many bytes.
    pub fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    pub fn str(&mut self) -> Result<&'a str, DecodeError> {
        core::str::from_utf8(self.bytes()?).map_err(|_| DecodeError::NotUtf8)
    }

    pub fn value(&mut self) -> Result<Value, DecodeError> {
        let tag = self.u8()?;
        let bits = self.u64()?;
        Value::from_parts(tag, bits)
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }
}

/// The destination had no room left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// Writes into a byte slice front to back.
pub struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, len: 0 }
    }

    pub fn raw(&mut self, bytes: &[u8]) -> Result<(), Full> {
        let end = self.len.checked_add(bytes.len()).ok_or(Full)?;
        self.buf
            .get_mut(self.len..end)
            .ok_or(Full)?
            .copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }

    pub fn u8(&mut self, v: u8) -> Result<(), Full> {
        self.raw(&[v])
    }

    pub fn u32(&mut self, v: u32) -> Result<(), Full> {
        self.raw(&v.to_le_bytes())
    }

    pub fn u64(&mut self, v: u64) -> Result<(), Full> {
        self.raw(&v.to_le_bytes())
    }

    /// A `u32` length, then the bytes.
    pub fn bytes(&mut self, bytes: &[u8]) -> Result<(), Full> {
        let n = u32::try_from(bytes.len()).map_err(|_| Full)?;
        self.u32(n)?;
        self.raw(bytes)
    }

    pub fn value(&mut self, v: Value) -> Result<(), Full> {
        let (tag, bits) = v.to_parts();
        self.u8(tag as u8)?;
        self.u64(bits)
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A WebAssembly number value (reference types never cross the boundary).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
}

#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueTag {
    I32 = 1,
    I64 = 2,
    F32 = 3,
    F64 = 4,
}

impl Value {
    pub fn to_parts(self) -> (ValueTag, u64) {
        match self {
            Value::I32(v) => (ValueTag::I32, v as u32 as u64),
            Value::I64(v) => (ValueTag::I64, v as u64),
            Value::F32(v) => (ValueTag::F32, v.to_bits() as u64),
            Value::F64(v) => (ValueTag::F64, v.to_bits()),
        }
    }

    pub fn from_parts(tag: u8, bits: u64) -> Result<Value, DecodeError> {
        Ok(match tag {
            1 => Value::I32(bits as u32 as i32),
            2 => Value::I64(bits as i64),
            3 => Value::F32(f32::from_bits(bits as u32)),
            4 => Value::F64(f64::from_bits(bits)),
            other => return Err(DecodeError::BadTag(other)),
        })
    }
}

impl core::fmt::Display for Value {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Value::I32(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
        }
    }
}

/// What the guest runs: `module` (WebAssembly binary), then `function` called with `args`, each
/// a textual number the guest parses by the parameter's type (as the CLI's `--arg` takes them).
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    pub module: &'a [u8],
    pub function: &'a str,
    pub args: JobArgs<'a>,
}

/// The arguments of a [`Job`], decoded lazily.
#[derive(Debug, Clone, Copy)]
pub struct JobArgs<'a> {
    count: u32,
    bytes: &'a [u8],
}

impl<'a> JobArgs<'a> {
    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = Result<&'a str, DecodeError>> + 'a {
        let mut r = Reader::new(self.bytes);
        (0..self.count).map(move |_| r.str())
    }
}

impl<'a> Job<'a> {
    /// Layout: module (bytes), function (bytes), `u32` argument count, each argument (bytes).
    pub fn encode<S: AsRef<str>>(
        out: &mut [u8],
        module: &[u8],
        function: &str,
        args: &[S],
    ) -> Result<usize, Full> {
        let mut w = Writer::new(out);
        w.bytes(module)?;
        w.bytes(function.as_bytes())?;
        w.u32(u32::try_from(args.len()).map_err(|_| Full)?)?;
        for a in args {
            w.bytes(a.as_ref().as_bytes())?;
        }
        Ok(w.len())
    }

    pub fn decode(bytes: &'a [u8]) -> Result<Job<'a>, DecodeError> {
        let mut r = Reader::new(bytes);
        let module = r.bytes()?;
        let function = r.str()?;
        let count = r.u32()?;
        let rest = Reader::new(r.bytes);
        let args = JobArgs {
            count,
            bytes: rest.bytes,
        };
        // Validate every argument now so that a decoded job is a complete one.
        for a in args.iter() {
            a?;
        }
        Ok(Job {
            module,
            function,
            args,
        })
    }

    /// The encoded size, for sizing the input region.
    pub fn encoded_len<S: AsRef<str>>(module: &[u8], function: &str, args: &[S]) -> usize {
        4 + module.len()
            + 4
            + function.len()
            + 4
            + args.iter().map(|a| 4 + a.as_ref().len()).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_round_trips() {
        let mut buf = [0u8; 128];
        let module = b"\0asm\x01\0\0\0";
        let n = Job::encode(&mut buf, module, "add", &["1", "-2"]).unwrap();
        assert_eq!(n, Job::encoded_len(module, "add", &["1", "-2"]));
        let job = Job::decode(&buf[..n]).unwrap();
        assert_eq!(job.module, module);
        assert_eq!(job.function, "add");
        assert_eq!(job.args.len(), 2);
        let mut it = job.args.iter();
        assert_eq!(it.next(), Some(Ok("1")));
        assert_eq!(it.next(), Some(Ok("-2")));
        assert_eq!(it.next(), None);
    }

    #[test]
    fn truncated_jobs_and_full_buffers_are_errors() {
        let mut buf = [0u8; 64];
        let n = Job::encode(&mut buf, b"abc", "f", &["7"]).unwrap();
        for cut in 0..n {
            assert!(
                Job::decode(&buf[..cut]).is_err(),
                "decoded a job cut at {cut}"
            );
        }
        let mut small = [0u8; 8];
        assert_eq!(Job::encode(&mut small, b"abcdef", "f", &["7"]), Err(Full));
    }

    #[test]
    fn values_round_trip_bit_exactly() {
        let mut buf = [0u8; 64];
        let vals = [
            Value::I32(-5),
            Value::I64(i64::MIN),
            Value::F32(1.5),
            Value::F64(f64::NAN),
        ];
        let mut w = Writer::new(&mut buf);
        for v in vals {
            w.value(v).unwrap();
        }
        let mut r = Reader::new(&buf);
        for v in vals {
            let got = r.value().unwrap();
            assert_eq!(got.to_parts(), v.to_parts());
        }
        assert_eq!(Value::from_parts(9, 0), Err(DecodeError::BadTag(9)));
    }
}
