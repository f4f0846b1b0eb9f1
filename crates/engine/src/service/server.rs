//! The listening side: a thread per connection reads requests into the queue and writes the
//! replies; one model thread (`scheduler`) runs them. Chunk requests only tokenize: their
//! connection's thread answers them, without the queue.

use std::io::{self, ErrorKind as IoKind};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;

use super::metrics::Metrics;
use super::protocol::{self, ErrorKind, Request, Response, VersionMismatch};
use super::queue::{Job, Queue, PEER_CHECK};
use super::scheduler::Scheduler;
use crate::engine::Engine;
use crate::error::{catch_panic, Error};

/// Frames up to this size are read before reserving queue room (an Embed then reserves its
/// bytes with its texts), so that the DBA's Stats and Ping get through a full queue.
const SMALL_FRAME: usize = 64 << 10;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Collection window: when the model is idle, wait this long after a request arrives for
    /// more before starting. Zero runs at once.
    pub batch_wait: Duration,
    /// Texts queued or in progress, across requests, before new requests wait.
    pub max_queue_texts: usize,
    /// Request bytes queued or in progress before new requests wait.
    pub max_queue_bytes: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions { batch_wait: Duration::ZERO, max_queue_texts: 65_536, max_queue_bytes: 256 << 20 }
    }
}

type Loaded = Result<Arc<Engine>, (ErrorKind, String)>;

struct Shared {
    /// Set once the model thread has loaded the model, or failed to.
    engine: OnceLock<Loaded>,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    options: ServeOptions,
    connections: AtomicU64,
}

impl Shared {
    fn stats(&self) -> String {
        let o = &self.options;
        let settings = json!({
            "batch_wait_ms": o.batch_wait.as_millis() as u64,
            "max_queue_texts": o.max_queue_texts,
            "max_queue_bytes": o.max_queue_bytes,
            "max_memory_mb": self.engine.get().and_then(|e| e.as_ref().ok()).map(|e| e.memory_limit() >> 20),
        });
        let (info, load_error) = match self.engine.get() {
            Some(Ok(e)) => (Some(e.info()), None),
            Some(Err((_, message))) => (None, Some(message.as_str())),
            None => (None, None),
        };
        self.metrics.json(self.queue.depth(), settings, info, load_error)
    }
}

/// Binds `path` for the service: refuses to take over a socket another process still serves,
/// removes a stale one, and leaves the new one readable and writable by this user only.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(IoKind::AddrInUse, format!("{} is served by another process", path.display())));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => return Err(io::Error::new(IoKind::AlreadyExists, format!("{} exists and is not a socket", path.display()))),
        Err(e) if e.kind() == IoKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // The umask makes the socket 0600 from its creation (no window where others may connect).
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let listener = listener?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves `listener` until the process ends. With `engine` an error (the model failed to load
/// or verify), every Embed request is answered with that error and Stats report it.
pub fn serve(listener: UnixListener, engine: Result<Engine, Error>, options: ServeOptions) -> io::Result<()> {
    serve_loading(listener, move || engine, options)
}

/// `serve`, with the model loaded by `load` on the model thread while the socket is already
/// answered: Embed requests wait for the load (Stats show `"loading": true` meanwhile).
pub fn serve_loading(
    listener: UnixListener,
    load: impl FnOnce() -> Result<Engine, Error> + Send + 'static,
    options: ServeOptions,
) -> io::Result<()> {
    let queue = Queue::new(options.max_queue_texts.max(1), options.max_queue_bytes.max(1));
    let metrics = Arc::new(Metrics::new());
    let shared = Arc::new(Shared { engine: OnceLock::new(), queue, metrics, options, connections: AtomicU64::new(0) });
    let model = shared.clone();
    std::thread::Builder::new().name("embeddinggemma-model".into()).spawn(move || {
        let engine = load().map(Arc::new).map_err(|e| {
            eprintln!("embeddinggemma serve: the model is unavailable: {e}");
            (ErrorKind::of(&e), e.to_string())
        });
        let Ok(engine) = model.engine.get_or_init(|| engine).clone() else { return };
        let s = &model;
        let scheduler = Scheduler { engine, queue: s.queue.clone(), metrics: s.metrics.clone(), batch_wait: s.options.batch_wait };
        // A bug here must not leave callers waiting forever: end the process, be restarted.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scheduler.run())).is_err() {
            eprintln!("embeddinggemma serve: the model thread panicked; exiting");
            std::process::exit(70);
        }
    })?;
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) if matches!(e.kind(), IoKind::Interrupted | IoKind::ConnectionAborted) => continue,
            Err(e) => {
                // Out of descriptors or threads: back off rather than spin.
                eprintln!("embeddinggemma serve: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let shared = shared.clone();
        let id = shared.connections.fetch_add(1, Ordering::Relaxed);
        shared.metrics.connection();
        let spawned = std::thread::Builder::new().name(format!("embeddinggemma-conn-{id}")).spawn(move || connection(&shared, stream, id));
        if let Err(e) = spawned {
            eprintln!("embeddinggemma serve: cannot start a connection thread: {e}");
        }
    }
    Ok(())
}

/// Whether the client closed its end (a withdrawn request).
fn peer_gone(stream: &UnixStream) -> bool {
    let mut fd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut fd, 1, 0) };
    r > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

fn reply(shared: &Shared, stream: &mut UnixStream, response: &Response) -> io::Result<()> {
    if let Response::Error { kind, .. } = response {
        shared.metrics.error(*kind);
    }
    protocol::write_frame(stream, &response.encode()?[4..])
}

fn connection(shared: &Shared, mut stream: UnixStream, id: u64) {
    loop {
        let len = match protocol::read_len(&mut stream) {
            Ok(Some(len)) => len,
            Ok(None) => return,
            Err(e) => {
                let _ = reply(shared, &mut stream, &Response::error(ErrorKind::Protocol, e.to_string()));
                return;
            }
        };
        let gone = || peer_gone(&stream);
        let reserved = if len > SMALL_FRAME { len } else { 0 };
        let Some(permit) = shared.queue.reserve_bytes(reserved, &gone) else { return };
        let request = protocol::read_payload(&mut stream, len).and_then(|p| Request::decode(&p));
        let response = match request {
            Err(e) if e.kind() == IoKind::UnexpectedEof => return,
            Err(e) => {
                let message = match e.get_ref().and_then(|inner| inner.downcast_ref::<VersionMismatch>()) {
                    Some(v) => format!("client speaks {v}"),
                    None => format!("malformed request: {e}"),
                };
                let _ = reply(shared, &mut stream, &Response::error(ErrorKind::Protocol, message));
                return;
            }
            Ok(Request::Ping) => Response::Pong(env!("CARGO_PKG_VERSION").into()),
            Ok(Request::Stats) => Response::Stats(shared.stats()),
            Ok(Request::Chunk { task, max_tokens, overlap, text }) => match chunk(shared, &stream, &task, max_tokens, overlap, &text) {
                Some(r) => r,
                None => return,
            },
            Ok(Request::Embed { task, dim, truncate, texts }) => match embed(shared, &stream, id, (permit, len - reserved), task, dim, truncate, texts) {
                Some(r) => r,
                None => return,
            },
        };
        if reply(shared, &mut stream, &response).is_err() {
            return;
        }
    }
}

/// The model once loaded, or the reply for a model that failed to load; None when the client
/// left while it was loading.
fn loaded<'s>(shared: &'s Shared, stream: &UnixStream) -> Option<Result<&'s Arc<Engine>, Response>> {
    loop {
        match shared.engine.get() {
            Some(Ok(e)) => return Some(Ok(e)),
            Some(Err((kind, message))) => return Some(Err(Response::error(*kind, message.clone()))),
            None if peer_gone(stream) => return None,
            None => std::thread::sleep(PEER_CHECK),
        }
    }
}

/// Chunks one text on the connection's thread, stopping when the client leaves (None) or the
/// chunks would not fit one reply (`MAX_CHUNKS`).
fn chunk(shared: &Shared, stream: &UnixStream, task: &str, max_tokens: u32, overlap: u32, text: &str) -> Option<Response> {
    let engine = match loaded(shared, stream)? {
        Ok(e) => e,
        Err(r) => return Some(r),
    };
    let gone = || peer_gone(stream);
    let chunks = catch_panic(|| engine.chunker(task, max_tokens as usize, overlap as usize)?.chunks_up_to(text, &gone, protocol::MAX_CHUNKS));
    match chunks {
        Ok(chunks) => Some(Response::Chunks(chunks)),
        Err(Error::Cancelled) => None,
        Err(e) => Some(Response::from_error(&e)),
    }
}

/// Queues one Embed request and waits for its reply; None when the client left.
#[allow(clippy::too_many_arguments)]
fn embed(
    shared: &Shared,
    stream: &UnixStream,
    connection: u64,
    (permit, unreserved): (super::queue::Permit, usize),
    task: String,
    dim: u32,
    truncate: bool,
    texts: Vec<String>,
) -> Option<Response> {
    let gone = || peer_gone(stream);
    let engine = match loaded(shared, stream)? {
        Ok(e) => e,
        Err(r) => return Some(r),
    };
    let checked = engine.prompt(&task).and_then(|_| engine.check_dim(dim as i64));
    let dim = match checked {
        Ok(d) => d,
        Err(e) => return Some(Response::from_error(&e)),
    };
    if texts.is_empty() {
        return Some(Response::Embedded { dim: dim as u32, vectors: Vec::new(), stats: Default::default() });
    }
    let withdrawn = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let (mut permit, mut texts, mut task) = (Some(permit), Some(texts), Some(task));
    let count = texts.as_ref().map_or(0, Vec::len);
    let job = || Job {
        connection,
        task: task.take().unwrap_or_default(),
        dim,
        truncate,
        texts: texts.take().unwrap_or_default(),
        arrived: Instant::now(),
        withdrawn: withdrawn.clone(),
        reply: tx.clone(),
        permit: permit.take().expect("a job is made once"),
    };
    shared.queue.push(count, unreserved, job, &gone)?;
    loop {
        match rx.recv_timeout(PEER_CHECK) {
            Ok(response) => return Some(response),
            Err(RecvTimeoutError::Timeout) if gone() => {
                withdrawn.store(true, Ordering::Relaxed);
                return None;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Some(Response::error(ErrorKind::Internal, "the model thread dropped the request"));
            }
        }
    }
}

/// Ends the process when its parent dies or, when stdin is a pipe or socket (the supervisor's),
/// when it is closed, removing the socket file: a service never outlives the server that
/// started it. A stdin of another kind (/dev/null, a terminal) is not watched.
pub fn exit_with_parent(socket: &Path) {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_PDEATHSIG only sets a signal number for this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
    }
    // SAFETY: fstat fills a plain struct for descriptor 0.
    let piped = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(0, &mut st) == 0 && matches!(st.st_mode & libc::S_IFMT, libc::S_IFIFO | libc::S_IFSOCK)
    };
    if !piped {
        return;
    }
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
        eprintln!("embeddinggemma serve: stdin closed; exiting");
        let _ = std::fs::remove_file(&socket);
        std::process::exit(0);
    });
}
