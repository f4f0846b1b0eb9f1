//! The caller's end of the socket. Sending and waiting are both driven by `poll_*` calls with a
//! timeout, so a caller that must answer interrupts (a PostgreSQL backend) never blocks longer
//! than it chose; dropping the client closes the socket, which withdraws its request.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::protocol::{self, CallStats, ErrorKind, Request, Response, MAX_FRAME};
use crate::chunk::Chunk;

/// A failed request: the service's error, or `Unavailable`/`Protocol` for the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    pub kind: ErrorKind,
    pub message: String,
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ServiceError {}

/// A service older than chunking refuses its tag as malformed: say what that means.
fn older_service(e: ServiceError) -> ServiceError {
    if e.kind != ErrorKind::Protocol || !e.message.contains("unknown request tag") {
        return e;
    }
    ServiceError {
        kind: e.kind,
        message: format!("embedding service: it does not know chunking; restart a newer one ({})", e.message),
    }
}

fn unavailable(what: impl std::fmt::Display) -> ServiceError {
    ServiceError { kind: ErrorKind::Unavailable, message: format!("embedding service: {what}") }
}

/// Vectors of one Embed request: `vectors` holds `len() × dim` values, in input order.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    pub dim: usize,
    pub vectors: Vec<f32>,
    pub stats: CallStats,
}

impl Embedding {
    pub fn len(&self) -> usize {
        self.vectors.len().checked_div(self.dim).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn vector(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }
}

pub struct Client {
    stream: UnixStream,
    /// The request frame being sent and how much of it has gone.
    out: Vec<u8>,
    sent: usize,
    /// The response read so far: its length prefix, then its payload.
    head: [u8; 4],
    head_read: usize,
    payload: Vec<u8>,
    waiting: bool,
    /// Set once the connection is unusable (closed, or out of step with the service).
    broken: Option<ServiceError>,
}

/// The outcome of a connection attempt that must not block.
pub enum Opened {
    Connected(Client),
    /// The service's backlog is full: try again shortly.
    Busy,
}

impl Client {
    /// Connects to the service's socket and checks that it answers, waiting at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, ServiceError> {
        let deadline = Instant::now() + timeout;
        let mut client = loop {
            match Client::open(path)? {
                Opened::Connected(c) => break c,
                Opened::Busy if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Opened::Busy => return Err(unavailable(format!("{} accepts no connection", path.display()))),
            }
        };
        client.ping(deadline.saturating_duration_since(Instant::now()))?;
        Ok(client)
    }

    /// Connects without blocking (a full backlog is `Busy`, not a wait) and without a ping: for
    /// callers that must serve their own interrupts while they wait (`send_ping`, `poll_pong`).
    pub fn open(path: &Path) -> Result<Opened, ServiceError> {
        let stream = match connect_nonblocking(path) {
            Ok(stream) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Opened::Busy),
            Err(e) => return Err(unavailable(format!("cannot connect to {}: {e}", path.display()))),
        };
        Ok(Opened::Connected(Client {
            stream,
            out: Vec::new(),
            sent: 0,
            head: [0; 4],
            head_read: 0,
            payload: Vec::new(),
            waiting: false,
            broken: None,
        }))
    }

    /// Whether a request is in flight (sent or being sent, its reply not yet read).
    pub fn is_waiting(&self) -> bool {
        self.waiting
    }

    fn send(&mut self, frame: Vec<u8>) -> Result<(), ServiceError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        if self.waiting {
            return Err(ServiceError {
                kind: ErrorKind::Protocol,
                message: "a request is already in flight on this connection".into(),
            });
        }
        self.out = frame;
        self.sent = 0;
        self.head_read = 0;
        self.payload = Vec::new();
        self.waiting = true;
        Ok(())
    }

    /// Queues an Embed request (`model`: the settings the caller's session names, or "" for
    /// any; `background`: nobody waits on it interactively); `poll_reply` sends it and waits
    /// for its vectors.
    pub fn send_embed<S: AsRef<str>>(
        &mut self,
        task: &str,
        dim: usize,
        truncate: bool,
        model: &str,
        background: bool,
        texts: &[S],
    ) -> Result<(), ServiceError> {
        let dim = u32::try_from(dim).unwrap_or(u32::MAX);
        let frame = protocol::encode_embed(task, dim, truncate, model, background, texts)
            .map_err(|e| ServiceError { kind: ErrorKind::InvalidOption, message: e.to_string() })?;
        self.send(frame)
    }

    /// Waits up to `timeout` for the reply to `send_embed`: None when it has not come yet (call
    /// again), else the vectors or the service's error.
    pub fn poll_reply(&mut self, timeout: Duration) -> Option<Result<Embedding, ServiceError>> {
        Some(self.poll_response(timeout)?.and_then(|r| match r {
            Response::Embedded { dim, vectors, stats } => Ok(Embedding { dim: dim as usize, vectors, stats }),
            other => Err(self.out_of_step(&other)),
        }))
    }

    /// `send_embed`, then waits for the reply for at most `timeout`.
    pub fn embed<S: AsRef<str>>(
        &mut self,
        task: &str,
        dim: usize,
        truncate: bool,
        texts: &[S],
        timeout: Duration,
    ) -> Result<Embedding, ServiceError> {
        self.send_embed(task, dim, truncate, "", false, texts)?;
        let reply = self.poll_reply(timeout);
        self.finish(reply, timeout)
    }

    /// Queues a Chunk request (`model` as for `send_embed`); `poll_chunks` sends it and waits
    /// for the chunks.
    pub fn send_chunk(
        &mut self,
        text: &str,
        task: &str,
        max_tokens: usize,
        overlap: usize,
        model: &str,
    ) -> Result<(), ServiceError> {
        let (max_tokens, overlap) =
            (u32::try_from(max_tokens).unwrap_or(u32::MAX), u32::try_from(overlap).unwrap_or(u32::MAX));
        let frame = protocol::encode_chunk(task, max_tokens, overlap, model, text)
            .map_err(|e| ServiceError { kind: ErrorKind::InvalidOption, message: e.to_string() })?;
        self.send(frame)
    }

    /// Waits up to `timeout` for the reply to `send_chunk`: None when it has not come yet (call
    /// again), else the chunks (as `Engine::chunk` gives them) or the service's error.
    pub fn poll_chunks(&mut self, timeout: Duration) -> Option<Result<Vec<Chunk>, ServiceError>> {
        Some(self.poll_response(timeout)?.map_err(older_service).and_then(|r| match r {
            Response::Chunks(chunks) => Ok(chunks),
            other => Err(self.out_of_step(&other)),
        }))
    }

    /// `send_chunk`, then waits for the reply for at most `timeout`.
    pub fn chunk(
        &mut self,
        text: &str,
        task: &str,
        max_tokens: usize,
        overlap: usize,
        timeout: Duration,
    ) -> Result<Vec<Chunk>, ServiceError> {
        self.send_chunk(text, task, max_tokens, overlap, "")?;
        let reply = self.poll_chunks(timeout);
        self.finish(reply, timeout)
    }

    /// The service's statistics, as a JSON object.
    pub fn stats(&mut self, timeout: Duration) -> Result<String, ServiceError> {
        self.send_stats()?;
        let reply = self.poll_stats(timeout);
        self.finish(reply, timeout)
    }

    /// Queues a Stats request; `poll_stats` sends it and waits for the JSON.
    pub fn send_stats(&mut self) -> Result<(), ServiceError> {
        self.send(Request::Stats.encode().map_err(unavailable)?)
    }

    pub fn poll_stats(&mut self, timeout: Duration) -> Option<Result<String, ServiceError>> {
        Some(self.poll_response(timeout)?.and_then(|r| match r {
            Response::Stats(json) => Ok(json),
            other => Err(self.out_of_step(&other)),
        }))
    }

    /// Checks that the service answers; returns its version.
    pub fn ping(&mut self, timeout: Duration) -> Result<String, ServiceError> {
        self.send_ping()?;
        let reply = self.poll_pong(timeout);
        self.finish(reply, timeout)
    }

    /// Queues a Ping; `poll_pong` sends it and waits for the service's version.
    pub fn send_ping(&mut self) -> Result<(), ServiceError> {
        self.send(Request::Ping.encode().map_err(unavailable)?)
    }

    pub fn poll_pong(&mut self, timeout: Duration) -> Option<Result<String, ServiceError>> {
        Some(self.poll_response(timeout)?.and_then(|r| match r {
            Response::Pong(version) => Ok(version),
            other => Err(self.out_of_step(&other)),
        }))
    }

    fn finish<T>(&mut self, reply: Option<Result<T, ServiceError>>, timeout: Duration) -> Result<T, ServiceError> {
        reply.unwrap_or_else(|| {
            // The reply may still come: this connection can no longer tell which request it answers.
            let e = unavailable(format!("no reply within {timeout:?}"));
            self.broken = Some(e.clone());
            Err(e)
        })
    }

    fn out_of_step(&mut self, got: &Response) -> ServiceError {
        if let Response::Error { kind, message } = got {
            return ServiceError { kind: *kind, message: message.clone() };
        }
        let e =
            ServiceError { kind: ErrorKind::Protocol, message: format!("embedding service: unexpected reply {got:?}") };
        self.broken = Some(e.clone());
        e
    }

    fn poll_response(&mut self, timeout: Duration) -> Option<Result<Response, ServiceError>> {
        if !self.waiting {
            let e = self
                .broken
                .clone()
                .unwrap_or(ServiceError { kind: ErrorKind::Protocol, message: "no request in flight".into() });
            return Some(Err(e));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.progress() {
                Ok(Some(payload)) => {
                    self.waiting = false;
                    return Some(match Response::decode(&payload) {
                        Ok(Response::Error { kind, message }) => Err(ServiceError { kind, message }),
                        Ok(r) => Ok(r),
                        Err(e) => Err(self.fail(ServiceError {
                            kind: ErrorKind::Protocol,
                            message: format!("embedding service: {e}"),
                        })),
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    self.waiting = false;
                    return Some(Err(self.fail(unavailable(e))));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            if let Err(e) = self.wait(left) {
                self.waiting = false;
                return Some(Err(self.fail(unavailable(e))));
            }
        }
    }

    fn fail(&mut self, e: ServiceError) -> ServiceError {
        self.broken = Some(e.clone());
        e
    }

    /// Writes and reads what the socket takes without blocking; the payload once it is whole.
    fn progress(&mut self) -> io::Result<Option<Vec<u8>>> {
        while self.sent < self.out.len() {
            match send_nosignal(&self.stream, &self.out[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The service may have answered (an error) before reading all: read it below.
                Err(_) => break,
            }
        }
        if self.sent == self.out.len() {
            self.out = Vec::new();
        }
        loop {
            let read = if self.head_read < 4 {
                self.stream.read(&mut self.head[self.head_read..])
            } else {
                let len = u32::from_le_bytes(self.head) as usize;
                if len > MAX_FRAME {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("reply of {len} bytes is over the frame limit"),
                    ));
                }
                if self.payload.len() == len {
                    return Ok(Some(std::mem::take(&mut self.payload)));
                }
                let start = self.payload.len();
                let chunk = (len - start).min(1 << 20);
                self.payload.resize(start + chunk, 0);
                let r = self.stream.read(&mut self.payload[start..]);
                self.payload.truncate(start + *r.as_ref().unwrap_or(&0));
                r
            };
            match read {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the service closed the connection")),
                Ok(n) if self.head_read < 4 => self.head_read += n,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Sleeps until the socket can be read or written, or `timeout` passes.
    fn wait(&self, timeout: Duration) -> io::Result<()> {
        let events = if self.out.is_empty() { libc::POLLIN } else { libc::POLLIN | libc::POLLOUT };
        let mut fd = libc::pollfd { fd: self.stream.as_raw_fd(), events, revents: 0 };
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut fd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// `write`, without the SIGPIPE a closed socket would raise in a host that does not ignore it.
fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for buf.len() bytes for the duration of the call.
    let n = unsafe { libc::send(stream.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A Unix-socket connection made without blocking: a full backlog gives `WouldBlock`.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid; the path is copied into it within its bounds.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path too long or not a path"));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    // SAFETY: a new descriptor, owned by the stream below (closed on every error path by it).
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we own.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes.
    if unsafe { libc::connect(fd, (&raw const addr).cast(), len) } != 0 {
        let e = io::Error::last_os_error();
        // A Unix socket either connects at once or, with a full backlog, says EAGAIN.
        return Err(if e.raw_os_error() == Some(libc::EAGAIN) { io::ErrorKind::WouldBlock.into() } else { e });
    }
    Ok(stream)
}
