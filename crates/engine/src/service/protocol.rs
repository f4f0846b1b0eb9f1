//! The service's wire format: one request, then one response, per exchange on a Unix socket.
//!
//! Frame: `u32` little-endian payload length, then the payload (at most [`MAX_FRAME`] bytes;
//! a larger length is refused before anything is read). Payload: `u8` protocol version
//! ([`VERSION`]), `u8` message tag, then the body. Integers are little-endian; a string is a
//! `u32` byte length then UTF-8; `f32`s are little-endian IEEE 754.
//!
//! | request | tag | body |
//! |---|---|---|
//! | Embed | 1 | task: str, dim: u32, truncate: u8, model: str, background: u8, count: u32, count × text: str |
//! | Stats | 2 | — |
//! | Ping  | 3 | — |
//! | Chunk | 4 | task: str, max_tokens: u32, overlap: u32, model: str, text: str |
//!
//! `model` names the settings the caller's session would load (an empty string: any model). A
//! service started with a `model_key` refuses a request naming other settings with
//! `Error { kind: ModelMismatch }`, so no call is ever computed by a model other than the one
//! its session names. `background` marks work nobody waits on interactively (an asynchronous
//! queue draining): the service runs interactive requests first (see `scheduler`).
//!
//! | response | tag | body |
//! |---|---|---|
//! | Embedded | 1 | dim: u32, count: u32, count × dim × f32, then u64 × 6: texts, tokens, truncated, forward passes, queue wait µs, forward µs |
//! | Error    | 2 | kind: u8 ([`ErrorKind`]), message: str |
//! | Stats    | 3 | JSON: str |
//! | Pong     | 4 | server version: str |
//! | Chunks   | 5 | count: u32, count × (start byte, end byte, start char, end char): u64 × 4 |
//!
//! A request of another version, or with a tag the service does not know (Chunk, to a service
//! older than it), is answered with `Error { kind: Protocol }` saying so, and the connection is
//! closed.

use std::io::{self, Read, Write};
use std::time::Duration;

use crate::chunk::Chunk;
use crate::error::Error;

pub const VERSION: u8 = 2;

/// Largest payload either side accepts.
pub const MAX_FRAME: usize = 1 << 30;

/// Bytes of one chunk in a Chunks reply.
const CHUNK_BYTES: usize = 32;

/// Most chunks one Chunks reply holds.
pub const MAX_CHUNKS: usize = (MAX_FRAME - 16) / CHUNK_BYTES;

#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Embed { task: String, dim: u32, truncate: bool, model: String, background: bool, texts: Vec<String> },
    Stats,
    Ping,
    Chunk { task: String, max_tokens: u32, overlap: u32, model: String, text: String },
}

/// What one Embed request cost, as the service measured it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallStats {
    pub texts: u64,
    /// Real tokens (prompt, `<bos>` and `<eos>` included).
    pub tokens: u64,
    pub truncated: u64,
    /// Forward passes that held at least one of this request's texts.
    pub forward_passes: u64,
    /// From arrival to the first forward pass that held one of its texts.
    pub queue_wait: Duration,
    /// Time of those forward passes (shared with the other requests in them).
    pub forward_time: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// `vectors` holds `count × dim` values, text after text.
    Embedded {
        dim: u32,
        vectors: Vec<f32>,
        stats: CallStats,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
    Stats(String),
    Pong(String),
    /// Offsets only: the client has the text.
    Chunks(Vec<Chunk>),
}

macro_rules! error_kinds {
    ($($(#[$doc:meta])* $name:ident = $code:literal),* $(,)?) => {
        /// Why a request failed: the engine's `Error` variants, plus the service's own.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorKind { $($(#[$doc])* $name = $code),* }

        impl ErrorKind {
            pub const ALL: &'static [ErrorKind] = &[$(ErrorKind::$name),*];
            fn from_code(code: u8) -> Option<ErrorKind> {
                match code { $($code => Some(ErrorKind::$name),)* _ => None }
            }
            pub fn name(self) -> &'static str {
                match self { $(ErrorKind::$name => stringify!($name)),* }
            }
        }
    };
}

error_kinds! {
    ModelFile = 1, Checksum = 2, UnknownTask = 3, InvalidDim = 4, TooLong = 5, InvalidOption = 6,
    Device = 7, Tokenizer = 8, Inference = 9, Cancelled = 10, OutOfMemory = 11,
    /// The service cannot be reached, or went away mid-request.
    Unavailable = 12,
    Internal = 13,
    /// A malformed frame or another protocol version.
    Protocol = 14,
    /// The request names model settings other than the service's.
    ModelMismatch = 15,
}

impl ErrorKind {
    pub fn of(e: &Error) -> ErrorKind {
        match e {
            _ if e.is_out_of_memory() => ErrorKind::OutOfMemory,
            Error::ModelFile { .. } => ErrorKind::ModelFile,
            Error::Checksum { .. } => ErrorKind::Checksum,
            Error::UnknownTask { .. } => ErrorKind::UnknownTask,
            Error::InvalidDim { .. } => ErrorKind::InvalidDim,
            Error::TooLong { .. } => ErrorKind::TooLong,
            Error::InvalidOption(_) => ErrorKind::InvalidOption,
            Error::Device { .. } => ErrorKind::Device,
            Error::Tokenizer(_) => ErrorKind::Tokenizer,
            Error::Inference(_) => ErrorKind::Inference,
            Error::Cancelled => ErrorKind::Cancelled,
            Error::Panic(_) => ErrorKind::Internal,
        }
    }
}

impl Response {
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response::Error { kind, message: message.into() }
    }

    pub fn from_error(e: &Error) -> Response {
        Response::error(ErrorKind::of(e), e.to_string())
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads a frame's length, refusing one over [`MAX_FRAME`]. `Ok(None)` at a clean end of stream.
pub fn read_len(r: &mut impl Read) -> io::Result<Option<usize>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        other => other?,
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(invalid(format!("frame of {len} bytes is over the limit of {MAX_FRAME}")));
    }
    Ok(Some(len))
}

pub fn read_payload(r: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    let mut payload = Vec::new();
    payload.try_reserve_exact(len).map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e.to_string()))?;
    r.take(len as u64).read_to_end(&mut payload)?;
    if payload.len() < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(payload)
}

pub fn write_frame(w: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len()).ok().filter(|&l| l as usize <= MAX_FRAME);
    let len =
        len.ok_or_else(|| invalid(format!("frame of {} bytes is over the limit of {MAX_FRAME}", payload.len())))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(payload)?;
    w.flush()
}

/// Builds a frame (length prefix included) for the encoders below.
struct Frame(Vec<u8>);

impl Frame {
    fn new(tag: u8) -> Frame {
        Frame(vec![0, 0, 0, 0, VERSION, tag])
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(self, s: &str) -> Self {
        let mut f = self.u32(s.len() as u32);
        f.0.extend_from_slice(s.as_bytes());
        f
    }
    fn finish(mut self) -> io::Result<Vec<u8>> {
        let len = self.0.len() - 4;
        if len > MAX_FRAME {
            return Err(invalid(format!("frame of {len} bytes is over the limit of {MAX_FRAME}")));
        }
        self.0[..4].copy_from_slice(&(len as u32).to_le_bytes());
        Ok(self.0)
    }
}

impl Request {
    /// The whole frame, length prefix included.
    pub fn encode(&self) -> io::Result<Vec<u8>> {
        match self {
            Request::Embed { task, dim, truncate, model, background, texts } => {
                encode_embed(task, *dim, *truncate, model, *background, texts)
            }
            Request::Stats => Frame::new(2).finish(),
            Request::Ping => Frame::new(3).finish(),
            Request::Chunk { task, max_tokens, overlap, model, text } => {
                encode_chunk(task, *max_tokens, *overlap, model, text)
            }
        }
    }

    /// Decodes a payload (after the length prefix).
    pub fn decode(payload: &[u8]) -> io::Result<Request> {
        let mut r = Reader::new(payload)?;
        let request = match r.tag {
            1 => {
                let task = r.str()?;
                let dim = r.u32()?;
                let truncate = r.u8()? != 0;
                let model = r.str()?;
                let background = r.u8()? != 0;
                let count = r.u32()? as usize;
                // Each text takes at least its 4-byte length: bounds the allocation.
                if count > r.rest.len() / 4 {
                    return Err(invalid(format!("{count} texts announced in a frame of {} bytes", payload.len())));
                }
                let texts = (0..count).map(|_| r.str()).collect::<io::Result<_>>()?;
                Request::Embed { task, dim, truncate, model, background, texts }
            }
            2 => Request::Stats,
            3 => Request::Ping,
            4 => Request::Chunk {
                task: r.str()?,
                max_tokens: r.u32()?,
                overlap: r.u32()?,
                model: r.str()?,
                text: r.str()?,
            },
            t => return Err(invalid(format!("unknown request tag {t}"))),
        };
        r.end()?;
        Ok(request)
    }
}

/// An Embed request's frame from borrowed texts (what the client sends).
pub fn encode_embed<S: AsRef<str>>(
    task: &str,
    dim: u32,
    truncate: bool,
    model: &str,
    background: bool,
    texts: &[S],
) -> io::Result<Vec<u8>> {
    let bytes: usize = texts.iter().map(|t| 4 + t.as_ref().len()).sum();
    if bytes > MAX_FRAME {
        return Err(invalid(format!("{} texts of {bytes} bytes are over the frame limit of {MAX_FRAME}", texts.len())));
    }
    let mut f =
        Frame::new(1).str(task).u32(dim).u8(truncate as u8).str(model).u8(background as u8).u32(texts.len() as u32);
    f.0.reserve(bytes);
    for t in texts {
        f = f.str(t.as_ref());
    }
    f.finish()
}

/// A Chunk request's frame from a borrowed text (what the client sends).
pub fn encode_chunk(task: &str, max_tokens: u32, overlap: u32, model: &str, text: &str) -> io::Result<Vec<u8>> {
    if text.len() > MAX_FRAME {
        return Err(invalid(format!("a text of {} bytes is over the frame limit of {MAX_FRAME}", text.len())));
    }
    let mut f = Frame::new(4).str(task).u32(max_tokens).u32(overlap).str(model);
    f.0.reserve(4 + text.len());
    f.str(text).finish()
}

impl Response {
    pub fn encode(&self) -> io::Result<Vec<u8>> {
        match self {
            Response::Embedded { dim, vectors, stats } => {
                let count = if *dim == 0 { 0 } else { vectors.len() / *dim as usize };
                let mut f = Frame::new(1).u32(*dim).u32(count as u32);
                f.0.reserve(vectors.len() * 4 + 48);
                for v in vectors {
                    f.0.extend_from_slice(&v.to_le_bytes());
                }
                let s = stats;
                f.u64(s.texts)
                    .u64(s.tokens)
                    .u64(s.truncated)
                    .u64(s.forward_passes)
                    .u64(s.queue_wait.as_micros() as u64)
                    .u64(s.forward_time.as_micros() as u64)
                    .finish()
            }
            Response::Error { kind, message } => Frame::new(2).u8(*kind as u8).str(message).finish(),
            Response::Stats(json) => Frame::new(3).str(json).finish(),
            Response::Pong(version) => Frame::new(4).str(version).finish(),
            Response::Chunks(chunks) => {
                if chunks.len() > MAX_CHUNKS {
                    return Err(invalid(format!("{} chunks are over the {MAX_CHUNKS} a reply holds", chunks.len())));
                }
                let mut f = Frame::new(5).u32(chunks.len() as u32);
                f.0.reserve(chunks.len() * CHUNK_BYTES);
                for c in chunks {
                    f = f
                        .u64(c.start_byte as u64)
                        .u64(c.end_byte as u64)
                        .u64(c.start_char as u64)
                        .u64(c.end_char as u64);
                }
                f.finish()
            }
        }
    }

    pub fn decode(payload: &[u8]) -> io::Result<Response> {
        let mut r = Reader::new(payload)?;
        let response = match r.tag {
            1 => {
                let dim = r.u32()?;
                let count = r.u32()? as usize;
                let floats = count.checked_mul(dim as usize).filter(|&n| n <= r.rest.len() / 4);
                let floats = floats.ok_or_else(|| invalid(format!("{count} vectors of {dim} do not fit the frame")))?;
                let vectors =
                    r.take(floats * 4)?.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
                let mut stats =
                    CallStats { texts: r.u64()?, tokens: r.u64()?, truncated: r.u64()?, ..CallStats::default() };
                stats.forward_passes = r.u64()?;
                stats.queue_wait = Duration::from_micros(r.u64()?);
                stats.forward_time = Duration::from_micros(r.u64()?);
                Response::Embedded { dim, vectors, stats }
            }
            2 => {
                let code = r.u8()?;
                let kind = ErrorKind::from_code(code).unwrap_or(ErrorKind::Internal);
                Response::Error { kind, message: r.str()? }
            }
            3 => Response::Stats(r.str()?),
            4 => Response::Pong(r.str()?),
            5 => {
                let count = r.u32()? as usize;
                if count > r.rest.len() / CHUNK_BYTES {
                    return Err(invalid(format!("{count} chunks do not fit the frame")));
                }
                let mut offset = || r.u64().map(|v| v as usize);
                let chunks = (0..count)
                    .map(|_| {
                        Ok(Chunk {
                            start_byte: offset()?,
                            end_byte: offset()?,
                            start_char: offset()?,
                            end_char: offset()?,
                        })
                    })
                    .collect::<io::Result<_>>()?;
                Response::Chunks(chunks)
            }
            t => return Err(invalid(format!("unknown response tag {t}"))),
        };
        r.end()?;
        Ok(response)
    }
}

/// A payload's version and tag, then its body read front to back.
struct Reader<'a> {
    tag: u8,
    rest: &'a [u8],
}

/// The error for a payload of another protocol version (the connection cannot continue).
#[derive(Debug)]
pub struct VersionMismatch(pub u8);

impl std::fmt::Display for VersionMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "protocol version {} is not supported; this side speaks version {VERSION}", self.0)
    }
}

impl std::error::Error for VersionMismatch {}

impl<'a> Reader<'a> {
    fn new(payload: &'a [u8]) -> io::Result<Reader<'a>> {
        match payload {
            [VERSION, tag, rest @ ..] => Ok(Reader { tag: *tag, rest }),
            [version, ..] if *version != VERSION => {
                Err(io::Error::new(io::ErrorKind::InvalidData, VersionMismatch(*version)))
            }
            _ => Err(invalid("empty frame")),
        }
    }
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.rest.len() < n {
            return Err(invalid("frame ends early"));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn str(&mut self) -> io::Result<String> {
        let n = self.u32()? as usize;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| invalid("a string is not UTF-8"))
    }
    fn end(&self) -> io::Result<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(invalid(format!("{} bytes left over after the message", self.rest.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip_request(r: Request) {
        let frame = r.encode().unwrap();
        let len = read_len(&mut &frame[..]).unwrap().unwrap();
        assert_eq!(len, frame.len() - 4);
        assert_eq!(Request::decode(&frame[4..]).unwrap(), r);
    }

    #[test]
    fn messages_round_trip() {
        round_trip_request(Request::Embed {
            task: "query".into(),
            dim: 768,
            truncate: true,
            model: "m".into(),
            background: true,
            texts: vec!["a".into(), "".into(), "é".into()],
        });
        round_trip_request(Request::Stats);
        round_trip_request(Request::Ping);
        round_trip_request(Request::Chunk {
            task: "document".into(),
            max_tokens: 512,
            overlap: 64,
            model: String::new(),
            text: "é\n\nb".into(),
        });
        let stats = CallStats {
            texts: 2,
            tokens: 9,
            truncated: 1,
            forward_passes: 1,
            queue_wait: Duration::from_micros(7),
            forward_time: Duration::from_micros(11),
        };
        for r in [
            Response::Embedded { dim: 2, vectors: vec![1.0, 0.0, 0.5, -0.5], stats },
            Response::error(ErrorKind::Checksum, "bad"),
            Response::Stats("{}".into()),
            Response::Pong("0.2.0".into()),
            Response::Chunks(vec![
                Chunk { start_byte: 0, end_byte: 5, start_char: 0, end_char: 4 },
                Chunk { start_byte: 3, end_byte: 6, start_char: 2, end_char: 5 },
            ]),
        ] {
            assert_eq!(Response::decode(&r.encode().unwrap()[4..]).unwrap(), r);
        }
    }

    #[test]
    fn malformed_frames_are_refused() {
        assert!(read_len(&mut &((MAX_FRAME as u32 + 1).to_le_bytes())[..]).is_err());
        assert!(read_len(&mut &[][..]).unwrap().is_none());
        let mut frame = Request::Ping.encode().unwrap();
        frame[4] = VERSION + 1;
        let e = Request::decode(&frame[4..]).unwrap_err();
        assert!(e.get_ref().unwrap().is::<VersionMismatch>(), "{e}");
        // A count no frame could hold is refused before allocating.
        let mut embed = Request::Embed {
            task: "q".into(),
            dim: 1,
            truncate: true,
            model: String::new(),
            background: false,
            texts: vec![],
        }
        .encode()
        .unwrap();
        let n = embed.len();
        embed[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Request::decode(&embed[4..]).is_err());
        assert!(Request::decode(&[VERSION, 9]).is_err());
        assert!(Request::decode(&[VERSION, 3, 0]).is_err());
    }
}
