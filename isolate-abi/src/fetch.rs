//! The encodings of [`Call::Fetch`](crate::Call::Fetch): the request the guest writes into the
//! mailbox and the answer the host writes back.
//!
//! Request: method (bytes, UTF-8), URL (bytes, UTF-8), `u32` header count, each header's name
//! and value (bytes each), body (bytes).
//! Answer: `u32` [`FetchStatus::Ok`], `u32` HTTP status, `u32` header count, each name and value
//! (bytes each), body (bytes); or `u32` failure status (the other [`FetchStatus`] values) and a
//! UTF-8 message (bytes).

use crate::encoding::{DecodeError, Full, Reader, Writer};

/// The first word of a fetch answer.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchStatus {
    /// A response follows.
    Ok = 0,
    /// The egress policy does not allow the destination.
    Denied = 1,
    /// The request is malformed (URL, method, a header).
    BadRequest = 2,
    /// DNS, connect, TLS, I/O failure, or the deadline passed.
    Network = 3,
    /// The response does not fit the mailbox.
    TooLarge = 4,
}

impl FetchStatus {
    pub fn from_u32(n: u32) -> Option<FetchStatus> {
        Some(match n {
            0 => FetchStatus::Ok,
            1 => FetchStatus::Denied,
            2 => FetchStatus::BadRequest,
            3 => FetchStatus::Network,
            4 => FetchStatus::TooLarge,
            _ => return None,
        })
    }

    /// What the WebAssembly import `agentvm.fetch` returns for a failure: -1 denied, -2 bad
    /// request, -3 network failure, -4 too large.
    pub fn wasm_code(self) -> i32 {
        -(self as i32)
    }
}

/// A decoded request, borrowing the mailbox.
#[derive(Debug, Clone, Copy)]
pub struct FetchRequestView<'a> {
    pub method: &'a str,
    pub url: &'a str,
    header_count: u32,
    headers: &'a [u8],
    pub body: &'a [u8],
}

impl<'a> FetchRequestView<'a> {
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let method = r.str()?;
        let url = r.str()?;
        let header_count = r.u32()?;
        let headers_start = bytes.len() - r.remaining();
        for _ in 0..header_count {
            r.str()?;
            r.str()?;
        }
        let headers = &bytes[headers_start..bytes.len() - r.remaining()];
        let body = r.bytes()?;
        Ok(FetchRequestView {
            method,
            url,
            header_count,
            headers,
            body,
        })
    }

    /// The headers as (name, value), in order (validated by `decode`).
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        let mut r = Reader::new(self.headers);
        (0..self.header_count).map_while(move |_| Some((r.str().ok()?, r.str().ok()?)))
    }
}

/// Writes a request: `headers` must yield exactly `header_count` pairs.
pub fn encode_request<'h>(
    w: &mut Writer<'_>,
    method: &[u8],
    url: &[u8],
    header_count: u32,
    headers: impl Iterator<Item = (&'h [u8], &'h [u8])>,
    body: &[u8],
) -> Result<(), Full> {
    w.bytes(method)?;
    w.bytes(url)?;
    w.u32(header_count)?;
    for (name, value) in headers {
        w.bytes(name)?;
        w.bytes(value)?;
    }
    w.bytes(body)
}

/// Writes a successful answer.
pub fn encode_response<'h>(
    w: &mut Writer<'_>,
    status: u16,
    headers: &[(&'h str, &'h str)],
    body: &[u8],
) -> Result<(), Full> {
    w.u32(FetchStatus::Ok as u32)?;
    w.u32(u32::from(status))?;
    w.u32(u32::try_from(headers.len()).map_err(|_| Full)?)?;
    for (name, value) in headers {
        w.bytes(name.as_bytes())?;
        w.bytes(value.as_bytes())?;
    }
    w.bytes(body)
}

/// A decoded answer.
#[derive(Debug, Clone, Copy)]
pub enum FetchAnswer<'a> {
    Response {
        status: u16,
        header_count: u32,
        /// The encoded pairs; read them with [`FetchAnswer::headers`].
        headers: &'a [u8],
        body: &'a [u8],
    },
    Failed {
        status: FetchStatus,
        message: &'a [u8],
    },
}

impl<'a> FetchAnswer<'a> {
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let status = r.u32()?;
        match FetchStatus::from_u32(status) {
            Some(FetchStatus::Ok) => {
                let http_status = r.u32()?;
                let header_count = r.u32()?;
                let start = bytes.len() - r.remaining();
                for _ in 0..header_count {
                    r.bytes()?;
                    r.bytes()?;
                }
                let headers = &bytes[start..bytes.len() - r.remaining()];
                let body = r.bytes()?;
                Ok(FetchAnswer::Response {
                    status: http_status as u16,
                    header_count,
                    headers,
                    body,
                })
            }
            Some(status) => Ok(FetchAnswer::Failed {
                status,
                message: r.bytes()?,
            }),
            None => Err(DecodeError::BadTag(status as u8)),
        }
    }

    /// The (name, value) pairs of a response's `headers` bytes.
    pub fn headers(headers: &'a [u8], count: u32) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
        let mut r = Reader::new(headers);
        (0..count).map_while(move |_| Some((r.bytes().ok()?, r.bytes().ok()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_round_trip() {
        let mut buf = [0u8; 256];
        let mut w = Writer::new(&mut buf);
        let headers: [(&[u8], &[u8]); 2] = [(b"A", b"1"), (b"B", b"two")];
        encode_request(
            &mut w,
            b"POST",
            b"http://a/",
            2,
            headers.into_iter(),
            b"xyz",
        )
        .unwrap();
        let n = w.len();
        let req = FetchRequestView::decode(&buf[..n]).unwrap();
        assert_eq!(
            (req.method, req.url, req.body),
            ("POST", "http://a/", &b"xyz"[..])
        );
        let got: [(&str, &str); 2] = [("A", "1"), ("B", "two")];
        assert!(req.headers().eq(got));
        for cut in 0..n {
            assert!(
                FetchRequestView::decode(&buf[..cut]).is_err(),
                "cut at {cut}"
            );
        }

        let mut buf = [0u8; 256];
        let mut w = Writer::new(&mut buf);
        encode_response(&mut w, 404, &[("X", "y")], b"nope").unwrap();
        let n = w.len();
        match FetchAnswer::decode(&buf[..n]).unwrap() {
            FetchAnswer::Response {
                status,
                header_count,
                headers,
                body,
            } => {
                assert_eq!((status, header_count, body), (404, 1, &b"nope"[..]));
                let pairs: [(&[u8], &[u8]); 1] = [(b"X", b"y")];
                assert!(FetchAnswer::headers(headers, header_count).eq(pairs));
            }
            other => panic!("{other:?}"),
        }
        let mut buf = [0u8; 64];
        let mut w = Writer::new(&mut buf);
        w.u32(FetchStatus::Denied as u32).unwrap();
        w.bytes(b"no rule").unwrap();
        let n = w.len();
        assert!(matches!(
            FetchAnswer::decode(&buf[..n]).unwrap(),
            FetchAnswer::Failed {
                status: FetchStatus::Denied,
                message: b"no rule"
            }
        ));
        assert_eq!(FetchStatus::TooLarge.wasm_code(), -4);
    }
}
