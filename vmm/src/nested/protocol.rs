//! The results channel: what L1's init writes on its second serial port (ttyS1), and its parser.
//!
//! The kernel console lives on ttyS0 only, so nothing but init's own marker lines reaches ttyS1;
//! still, every line is checked and scenario output carries its byte count, so a damaged stream is
//! reported instead of silently producing wrong results. Lines (each ends with "\n"):
//!
//! ```text
//! @@nested:up uptime=<L1 seconds>
//! @@nested:kvm-ready uptime=<L1 seconds>
//! @@nested:error <message>                      (then L1 reboots)
//! @@nested:start <idx>
//! @@nested:data <idx> <stdout|stderr> bytes=<n>
//! <base64 lines>
//! @@nested:data-end <idx> <stdout|stderr>
//! @@nested:end <idx> exit=<code> timed_out=<0|1> start=<L1 seconds> end=<L1 seconds>
//! @@nested:done
//! ```

use std::time::Duration;

use base64::Engine;

pub(crate) const MARKER: &str = "@@nested:";

/// One scenario as reported by L1 (indices refer to the order the scenarios were given in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawResult {
    pub idx: usize,
    pub exit_code: i32,
    pub timed_out: bool,
    pub duration: Duration,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// L1's init started; L1's uptime at that moment.
    Up(Duration),
    /// kvm modules loaded and /dev/kvm present.
    KvmReady(Duration),
    /// init gave up (e.g. a module failed to load).
    Error(String),
    Started(usize),
    Finished(RawResult),
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "stdout" => Some(Stream::Stdout),
            "stderr" => Some(Stream::Stderr),
            _ => None,
        }
    }
}

struct DataBlock {
    idx: usize,
    stream: Stream,
    expected: usize,
    base64: String,
}

#[derive(Default)]
struct Pending {
    idx: usize,
    stdout: Option<Vec<u8>>,
    stderr: Option<Vec<u8>>,
}

/// Incremental parser: feed it whatever bytes have arrived, get the events of the complete lines.
#[derive(Default)]
pub(crate) struct Parser {
    partial: Vec<u8>,
    data: Option<DataBlock>,
    current: Option<Pending>,
}

impl Parser {
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<Event>, String> {
        self.partial.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.partial.drain(..=pos).collect();
            let line = std::str::from_utf8(&raw[..raw.len() - 1])
                .map_err(|_| format!("non-UTF-8 line {:?}", String::from_utf8_lossy(&raw)))?;
            // A tty in cooked mode would add "\r"; tolerate it rather than depend on stty.
            let line = line.trim_end_matches('\r');
            if let Some(event) = self.line(line)? {
                events.push(event);
            }
        }
        Ok(events)
    }

    /// True when bytes of an unfinished line or data block are buffered.
    pub fn is_mid_message(&self) -> bool {
        !self.partial.is_empty() || self.data.is_some()
    }

    fn line(&mut self, line: &str) -> Result<Option<Event>, String> {
        if let Some(mut block) = self.data.take() {
            if let Some(rest) = line.strip_prefix(MARKER) {
                return self.finish_data(block, rest).map(|()| None);
            }
            if !line
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
            {
                return Err(format!("unexpected line inside a data block: {line:?}"));
            }
            block.base64.push_str(line);
            self.data = Some(block);
            return Ok(None);
        }
        if line.is_empty() {
            return Ok(None);
        }
        let rest = line
            .strip_prefix(MARKER)
            .ok_or_else(|| format!("line without marker: {line:?}"))?;
        let (verb, args) = rest.split_once(' ').unwrap_or((rest, ""));
        let event = match verb {
            "up" => Event::Up(parse_uptime(field(args, "uptime")?)?),
            "kvm-ready" => Event::KvmReady(parse_uptime(field(args, "uptime")?)?),
            "error" => Event::Error(args.to_string()),
            "start" => {
                let idx = parse_idx(args)?;
                if let Some(p) = &self.current {
                    return Err(format!("scenario {idx} started before {} ended", p.idx));
                }
                self.current = Some(Pending {
                    idx,
                    ..Pending::default()
                });
                Event::Started(idx)
            }
            "data" => {
                let mut parts = args.split(' ');
                let idx = parse_idx(parts.next().unwrap_or(""))?;
                let stream = parts
                    .next()
                    .and_then(Stream::parse)
                    .ok_or_else(|| format!("bad data line: {line:?}"))?;
                let expected = field(parts.next().unwrap_or(""), "bytes")?
                    .parse::<usize>()
                    .map_err(|_| format!("bad byte count in {line:?}"))?;
                self.expect_current(idx)?;
                self.data = Some(DataBlock {
                    idx,
                    stream,
                    expected,
                    base64: String::new(),
                });
                return Ok(None);
            }
            "end" => {
                let mut parts = args.split(' ');
                let idx = parse_idx(parts.next().unwrap_or(""))?;
                let rest: Vec<&str> = parts.collect();
                let get = |key: &str| {
                    rest.iter()
                        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                        .ok_or_else(|| format!("'{key}' missing in {line:?}"))
                };
                let exit_code = get("exit")?
                    .parse::<i32>()
                    .map_err(|_| format!("bad exit code in {line:?}"))?;
                let timed_out = match get("timed_out")? {
                    "0" => false,
                    "1" => true,
                    other => return Err(format!("bad timed_out value {other:?}")),
                };
                let start = parse_uptime(get("start")?)?;
                let end = parse_uptime(get("end")?)?;
                self.expect_current(idx)?;
                let pending = self.current.take().unwrap_or_default();
                let (Some(stdout), Some(stderr)) = (pending.stdout, pending.stderr) else {
                    return Err(format!("scenario {idx} ended without both output streams"));
                };
                Event::Finished(RawResult {
                    idx,
                    exit_code,
                    timed_out,
                    duration: end.saturating_sub(start),
                    stdout,
                    stderr,
                })
            }
            "done" => {
                if let Some(p) = &self.current {
                    return Err(format!("done while scenario {} had not ended", p.idx));
                }
                Event::Done
            }
            _ => return Err(format!("unknown marker {line:?}")),
        };
        Ok(Some(event))
    }

    fn expect_current(&self, idx: usize) -> Result<(), String> {
        match &self.current {
            Some(p) if p.idx == idx => Ok(()),
            Some(p) => Err(format!(
                "data for scenario {idx} while {} is running",
                p.idx
            )),
            None => Err(format!("data for scenario {idx}, which was not started")),
        }
    }

    fn finish_data(&mut self, block: DataBlock, marker_rest: &str) -> Result<(), String> {
        let stream_name = match block.stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        let expected_end = format!("data-end {} {stream_name}", block.idx);
        if marker_rest != expected_end {
            return Err(format!(
                "expected '{MARKER}{expected_end}', got '{MARKER}{marker_rest}'"
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(block.base64.as_bytes())
            .map_err(|e| format!("scenario {} {stream_name}: bad base64: {e}", block.idx))?;
        if bytes.len() != block.expected {
            return Err(format!(
                "scenario {} {stream_name}: {} bytes announced, {} received",
                block.idx,
                block.expected,
                bytes.len()
            ));
        }
        let pending = self
            .current
            .as_mut()
            .ok_or_else(|| format!("data for scenario {} outside a scenario", block.idx))?;
        let slot = match block.stream {
            Stream::Stdout => &mut pending.stdout,
            Stream::Stderr => &mut pending.stderr,
        };
        if slot.replace(bytes).is_some() {
            return Err(format!("scenario {} sent {stream_name} twice", block.idx));
        }
        Ok(())
    }
}

fn field<'a>(args: &'a str, key: &str) -> Result<&'a str, String> {
    args.split(' ')
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .ok_or_else(|| format!("'{key}' missing in {args:?}"))
}

fn parse_idx(s: &str) -> Result<usize, String> {
    s.parse::<usize>()
        .map_err(|_| format!("bad scenario index {s:?}"))
}

/// Parses /proc/uptime's first field ("12.34").
fn parse_uptime(s: &str) -> Result<Duration, String> {
    let bad = || format!("bad uptime {s:?}");
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs = secs.parse::<u64>().map_err(|_| bad())?;
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let nanos = if frac.is_empty() {
        0
    } else {
        frac.parse::<u32>().map_err(|_| bad())? * 10u32.pow(9 - frac.len() as u32)
    };
    Ok(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(data: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(data)
    }

    fn scenario_lines(idx: usize, stdout: &[u8], stderr: &[u8], exit: i32) -> String {
        let mut s = format!("@@nested:start {idx}\n");
        for (name, data) in [("stdout", stdout), ("stderr", stderr)] {
            s += &format!("@@nested:data {idx} {name} bytes={}\n", data.len());
            // Split like busybox base64 does (76 columns) to exercise multi-line blocks.
            let enc = b64(data);
            for chunk in enc.as_bytes().chunks(76) {
                s += std::str::from_utf8(chunk).unwrap();
                s += "\n";
            }
            s += &format!("@@nested:data-end {idx} {name}\n");
        }
        s += &format!("@@nested:end {idx} exit={exit} timed_out=0 start=3.69 end=4.05\n");
        s
    }

    #[test]
    fn full_run_parses_in_arbitrary_chunks() {
        let big: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let text = format!(
            "@@nested:up uptime=2.87\r\n@@nested:kvm-ready uptime=3.67\n{}{}@@nested:done\n",
            scenario_lines(0, b"hello\n", b"", 0),
            scenario_lines(1, &big, b"oops\n", 3)
        );
        for chunk in [1, 7, 64, text.len()] {
            let mut p = Parser::default();
            let mut events = Vec::new();
            for part in text.as_bytes().chunks(chunk) {
                events.extend(p.feed(part).unwrap());
            }
            assert!(!p.is_mid_message());
            assert_eq!(
                events,
                vec![
                    Event::Up(Duration::from_millis(2870)),
                    Event::KvmReady(Duration::from_millis(3670)),
                    Event::Started(0),
                    Event::Finished(RawResult {
                        idx: 0,
                        exit_code: 0,
                        timed_out: false,
                        duration: Duration::from_millis(360),
                        stdout: b"hello\n".to_vec(),
                        stderr: vec![],
                    }),
                    Event::Started(1),
                    Event::Finished(RawResult {
                        idx: 1,
                        exit_code: 3,
                        timed_out: false,
                        duration: Duration::from_millis(360),
                        stdout: big.clone(),
                        stderr: b"oops\n".to_vec(),
                    }),
                    Event::Done,
                ]
            );
        }
    }

    #[test]
    fn timed_out_flag_and_error_marker() {
        let mut p = Parser::default();
        let text = "@@nested:error insmod kvm-amd.ko: No such device\n";
        assert_eq!(
            p.feed(text.as_bytes()).unwrap(),
            vec![Event::Error("insmod kvm-amd.ko: No such device".into())]
        );
        let mut p = Parser::default();
        let text = scenario_lines(0, b"", b"", 137).replace("timed_out=0", "timed_out=1");
        let events = p.feed(text.as_bytes()).unwrap();
        assert!(matches!(&events[1], Event::Finished(r) if r.timed_out && r.exit_code == 137));
    }

    #[test]
    fn byte_count_mismatch_is_an_error() {
        let text = scenario_lines(0, b"hello\n", b"", 0).replace("bytes=6", "bytes=7");
        let err = Parser::default().feed(text.as_bytes()).unwrap_err();
        assert!(err.contains("7 bytes announced, 6 received"), "{err}");
    }

    #[test]
    fn foreign_text_inside_data_is_an_error() {
        let text = scenario_lines(0, b"hello world, this is a test\n", b"", 0).replacen(
            "aGVsbG8",
            "[  12.3] kernel: aGVsbG8",
            1,
        );
        let err = Parser::default().feed(text.as_bytes()).unwrap_err();
        assert!(err.contains("inside a data block"), "{err}");
    }

    #[test]
    fn out_of_order_markers_are_errors() {
        for (text, needle) in [
            ("@@nested:start 0\n@@nested:start 1\n", "started before"),
            ("@@nested:data 0 stdout bytes=0\n", "not started"),
            (
                "@@nested:start 0\n@@nested:end 0 exit=0 timed_out=0 start=1 end=2\n",
                "without both",
            ),
            ("@@nested:start 0\n@@nested:done\n", "had not ended"),
            ("garbage\n", "without marker"),
            ("@@nested:bogus\n", "unknown marker"),
            ("@@nested:up uptime=x\n", "bad uptime"),
            (
                "@@nested:start 0\n@@nested:data 0 stdout bytes=0\n@@nested:data-end 0 stderr\n",
                "expected",
            ),
        ] {
            let err = Parser::default().feed(text.as_bytes()).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn uptime_parsing() {
        assert_eq!(parse_uptime("0.05").unwrap(), Duration::from_millis(50));
        assert_eq!(parse_uptime("12").unwrap(), Duration::from_secs(12));
        assert!(parse_uptime("1.2.3").is_err());
        assert!(parse_uptime("-1").is_err());
    }
}
