//! The listening side: a thread per connection reads requests into the queue and writes the
//! replies; one model thread (`scheduler`) runs them. Chunk requests only tokenize: their
//! connection's thread answers them, without the queue, a bounded number at a time.
//!
//! The model thread loads the model and, when that fails (a file not there yet, a checksum),
//! tries again with backoff (1 s doubling to a minute) or at once on `retry_load` (the
//! supervisor's SIGHUP); callers meanwhile get the failure. `drain` lets a service about to be
//! replaced finish what it was asked and refuse new requests, so that callers move to the new
//! one without losing a call.

use std::io::{self, ErrorKind as IoKind};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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
    /// Chunk requests tokenized at once (each on its connection's thread); more wait.
    pub chunk_workers: usize,
    /// The settings the model comes from, as callers name them: a request naming others is
    /// refused (`ModelMismatch`). Empty: every request is served.
    pub model_key: String,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            batch_wait: Duration::ZERO,
            max_queue_texts: 65_536,
            max_queue_bytes: 256 << 20,
            chunk_workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            model_key: String::new(),
        }
    }
}

/// The first wait after a failed load, doubled after each failure up to `MAX_RETRY`.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Where the model stands.
enum Model {
    Loading,
    Ready(Arc<Engine>),
    Failed { kind: ErrorKind, message: String, next_attempt: Instant },
}

struct ModelState {
    model: Model,
    attempts: u32,
    retry_now: bool,
}

/// Requests being handled, and whether new ones are refused (draining).
#[derive(Default)]
struct Lifecycle {
    draining: bool,
    in_progress: usize,
}

struct Shared {
    model: Mutex<ModelState>,
    model_changed: Condvar,
    life: Mutex<Lifecycle>,
    life_changed: Condvar,
    /// Free chunk workers.
    chunk_slots: Mutex<usize>,
    chunk_freed: Condvar,
    /// Chunk requests waiting for a worker, tokenizing now, and the most tokenizing at once.
    chunk_waiting: AtomicU64,
    chunk_running: AtomicU64,
    chunk_peak: AtomicU64,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    options: ServeOptions,
    connections: AtomicU64,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn stats(&self) -> String {
        let o = &self.options;
        let state = locked(&self.model);
        let engine = match &state.model {
            Model::Ready(e) => Some(e.clone()),
            _ => None,
        };
        let settings = json!({
            "batch_wait_ms": o.batch_wait.as_millis() as u64,
            "max_queue_texts": o.max_queue_texts,
            "max_queue_bytes": o.max_queue_bytes,
            "chunk_workers": o.chunk_workers,
            "max_memory_mb": engine.as_ref().map(|e| e.memory_limit() >> 20),
        });
        let (load_error, next_attempt) = match &state.model {
            Model::Failed { message, next_attempt, .. } => (
                Some(message.clone()),
                Some((next_attempt.saturating_duration_since(Instant::now()).as_secs_f64() * 10.0).round() / 10.0),
            ),
            _ => (None, None),
        };
        let extra = json!({
            "load_attempts": state.attempts,
            "next_attempt_s": next_attempt,
            "draining": locked(&self.life).draining,
            "model_key": o.model_key,
            "chunking": {
                "waiting": self.chunk_waiting.load(Ordering::Relaxed),
                "running": self.chunk_running.load(Ordering::Relaxed),
                "peak": self.chunk_peak.load(Ordering::Relaxed),
            },
        });
        drop(state);
        self.metrics.json(self.queue.depth(), settings, engine.as_ref().map(|e| e.info()), load_error.as_deref(), extra)
    }

    /// Counts a request in (None while draining: the caller is told to go elsewhere).
    fn begin(self: &Arc<Self>) -> Option<InProgress> {
        let mut life = locked(&self.life);
        if life.draining {
            return None;
        }
        life.in_progress += 1;
        Some(InProgress(self.clone()))
    }
}

/// A request being handled; counted out on drop.
struct InProgress(Arc<Shared>);

impl Drop for InProgress {
    fn drop(&mut self) {
        locked(&self.0.life).in_progress -= 1;
        self.0.life_changed.notify_all();
    }
}

/// The running service, for its host process to steer.
#[derive(Clone)]
pub struct Service {
    shared: Arc<Shared>,
}

impl Service {
    /// Tries a failed load again now (after the model's files were fixed).
    pub fn retry_load(&self) {
        locked(&self.shared.model).retry_now = true;
        self.shared.model_changed.notify_all();
    }

    /// Finishes the requests in hand and refuses new ones (`Unavailable`: the caller reconnects,
    /// reaching the service that replaces this one).
    pub fn drain(&self) {
        locked(&self.shared.life).draining = true;
        self.shared.life_changed.notify_all();
        self.shared.model_changed.notify_all();
    }

    /// Waits until a draining service has answered every request it took.
    pub fn wait_drained(&self) {
        let mut life = locked(&self.shared.life);
        while !(life.draining && life.in_progress == 0) {
            life = self.shared.life_changed.wait(life).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Binds `path` for the service: refuses to take over a socket another process still serves,
/// removes a stale one, and leaves the new one readable and writable by this user only.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    IoKind::AddrInUse,
                    format!("{} is served by another process", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(IoKind::AlreadyExists, format!("{} exists and is not a socket", path.display())))
        }
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

/// Serves `listener` until the process ends (see `start`).
pub fn serve(
    listener: UnixListener,
    load: impl Fn() -> Result<Engine, Error> + Send + 'static,
    options: ServeOptions,
) -> io::Result<()> {
    start(listener, load, options)?;
    loop {
        std::thread::park();
    }
}

/// Starts serving `listener` on threads of its own, the model loaded by `load` on the model
/// thread while the socket is already answered: Embed requests wait for the load (Stats show
/// `"loading": true` meanwhile). A failed load is answered to callers and tried again.
pub fn start(
    listener: UnixListener,
    load: impl Fn() -> Result<Engine, Error> + Send + 'static,
    options: ServeOptions,
) -> io::Result<Service> {
    let queue = Queue::new(options.max_queue_texts.max(1), options.max_queue_bytes.max(1));
    let metrics = Arc::new(Metrics::new());
    let shared = Arc::new(Shared {
        model: Mutex::new(ModelState { model: Model::Loading, attempts: 0, retry_now: false }),
        model_changed: Condvar::new(),
        life: Mutex::new(Lifecycle::default()),
        life_changed: Condvar::new(),
        chunk_slots: Mutex::new(options.chunk_workers.max(1)),
        chunk_freed: Condvar::new(),
        chunk_waiting: AtomicU64::new(0),
        chunk_running: AtomicU64::new(0),
        chunk_peak: AtomicU64::new(0),
        queue,
        metrics,
        options,
        connections: AtomicU64::new(0),
    });
    let model = shared.clone();
    std::thread::Builder::new().name("embeddinggemma-model".into()).spawn(move || model_thread(&model, load))?;
    let accepting = shared.clone();
    std::thread::Builder::new().name("embeddinggemma-accept".into()).spawn(move || accept(listener, &accepting))?;
    Ok(Service { shared })
}

/// Loads the model (again and again while it fails), then runs the scheduler.
fn model_thread(shared: &Shared, load: impl Fn() -> Result<Engine, Error>) {
    let mut backoff = FIRST_RETRY;
    let engine = loop {
        {
            let mut state = locked(&shared.model);
            state.model = Model::Loading;
            state.attempts += 1;
            state.retry_now = false;
        }
        match load() {
            Ok(engine) => break Arc::new(engine),
            Err(e) => {
                eprintln!("embeddinggemma serve: the model is unavailable (next attempt in {backoff:?}): {e}");
                let next_attempt = Instant::now() + backoff;
                let mut state = locked(&shared.model);
                state.model = Model::Failed { kind: ErrorKind::of(&e), message: e.to_string(), next_attempt };
                shared.model_changed.notify_all();
                while !state.retry_now && Instant::now() < next_attempt {
                    let left = next_attempt.saturating_duration_since(Instant::now());
                    state = shared.model_changed.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0;
                }
                backoff = (backoff * 2).min(MAX_RETRY);
            }
        }
    };
    locked(&shared.model).model = Model::Ready(engine.clone());
    shared.model_changed.notify_all();
    let scheduler = Scheduler::new(engine, shared.queue.clone(), shared.metrics.clone(), shared.options.batch_wait);
    // A bug here must not leave callers waiting forever: end the process, be restarted.
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scheduler.run())).is_err() {
        eprintln!("embeddinggemma serve: the model thread panicked; exiting");
        std::process::exit(70);
    }
}

fn accept(listener: UnixListener, shared: &Arc<Shared>) {
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
        let spawned = std::thread::Builder::new()
            .name(format!("embeddinggemma-conn-{id}"))
            .spawn(move || connection(&shared, stream, id));
        if let Err(e) = spawned {
            eprintln!("embeddinggemma serve: cannot start a connection thread: {e}");
        }
    }
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

fn connection(shared: &Arc<Shared>, mut stream: UnixStream, id: u64) {
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
        // A request being answered counts until its reply is written: a draining service exits
        // only once every reply is out.
        let mut counted = None;
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
            Ok(Request::Chunk { model, .. } | Request::Embed { model, .. }) if !serves(shared, &model) => {
                Response::error(
                    ErrorKind::ModelMismatch,
                    format!(
                        "this service runs the model of {:?}, the caller's session names {model:?}",
                        shared.options.model_key
                    ),
                )
            }
            Ok(request @ (Request::Chunk { .. } | Request::Embed { .. })) => {
                counted = shared.begin();
                if counted.is_none() {
                    let restarting = Response::error(
                        ErrorKind::Unavailable,
                        "the embedding service is restarting with new settings",
                    );
                    if reply(shared, &mut stream, &restarting).is_err() {
                        return;
                    }
                    continue;
                }
                let answered = match request {
                    Request::Chunk { task, max_tokens, overlap, text, .. } => {
                        chunk(shared, &stream, &task, max_tokens, overlap, &text)
                    }
                    Request::Embed { task, dim, truncate, background, texts, .. } => {
                        embed(shared, &stream, id, (permit, len - reserved), (task, dim, truncate, background), texts)
                    }
                    _ => unreachable!(),
                };
                match answered {
                    Some(r) => r,
                    None => return,
                }
            }
        };
        let written = reply(shared, &mut stream, &response);
        drop(counted);
        if written.is_err() {
            return;
        }
    }
}

/// Whether this service may answer a request naming `model` (empty: any).
fn serves(shared: &Shared, model: &str) -> bool {
    model.is_empty() || shared.options.model_key.is_empty() || model == shared.options.model_key
}

/// The model once loaded, or the reply for a model that failed to load (saying when it is
/// tried again); None when the client left while it was loading.
fn loaded(shared: &Shared, stream: &UnixStream) -> Option<Result<Arc<Engine>, Response>> {
    let mut state = locked(&shared.model);
    loop {
        match &state.model {
            Model::Ready(e) => return Some(Ok(e.clone())),
            Model::Failed { kind, message, next_attempt } => {
                let wait = next_attempt.saturating_duration_since(Instant::now()).as_secs();
                return Some(Err(Response::error(
                    *kind,
                    format!("{message} (the service tries again within {wait} s)"),
                )));
            }
            Model::Loading if peer_gone(stream) => return None,
            Model::Loading => {
                state = shared.model_changed.wait_timeout(state, PEER_CHECK).unwrap_or_else(|e| e.into_inner()).0
            }
        }
    }
}

/// A chunk worker's slot, given back on drop.
struct ChunkSlot<'a>(&'a Shared);

impl Drop for ChunkSlot<'_> {
    fn drop(&mut self) {
        self.0.chunk_running.fetch_sub(1, Ordering::Relaxed);
        *locked(&self.0.chunk_slots) += 1;
        self.0.chunk_freed.notify_one();
    }
}

/// Waits for a free chunk worker; None when the client left meanwhile.
fn chunk_slot<'a>(shared: &'a Shared, stream: &UnixStream) -> Option<ChunkSlot<'a>> {
    let mut free = locked(&shared.chunk_slots);
    shared.chunk_waiting.fetch_add(1, Ordering::Relaxed);
    while *free == 0 {
        if peer_gone(stream) {
            shared.chunk_waiting.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        free = shared.chunk_freed.wait_timeout(free, PEER_CHECK).unwrap_or_else(|e| e.into_inner()).0;
    }
    *free -= 1;
    shared.chunk_waiting.fetch_sub(1, Ordering::Relaxed);
    let running = shared.chunk_running.fetch_add(1, Ordering::Relaxed) + 1;
    shared.chunk_peak.fetch_max(running, Ordering::Relaxed);
    Some(ChunkSlot(shared))
}

/// Chunks one text on the connection's thread (one of `chunk_workers` at a time), stopping
/// when the client leaves (None) or the chunks would not fit one reply (`MAX_CHUNKS`).
fn chunk(
    shared: &Shared,
    stream: &UnixStream,
    task: &str,
    max_tokens: u32,
    overlap: u32,
    text: &str,
) -> Option<Response> {
    let engine = match loaded(shared, stream)? {
        Ok(e) => e,
        Err(r) => return Some(r),
    };
    let _slot = chunk_slot(shared, stream)?;
    let gone = || peer_gone(stream);
    let chunks = catch_panic(|| {
        engine.chunker(task, max_tokens as usize, overlap as usize)?.chunks_up_to(text, &gone, protocol::MAX_CHUNKS)
    });
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
    (task, dim, truncate, background): (String, u32, bool, bool),
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
        background,
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

/// The socket file this process bound: removed at exit only while it is still the one this
/// process made (a service replacing this one binds the same path anew).
#[derive(Clone)]
pub struct SocketFile {
    path: std::path::PathBuf,
    id: (u64, u64),
}

impl SocketFile {
    /// The file at `path` as it is now (right after `bind`).
    pub fn of(path: &Path) -> io::Result<SocketFile> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path)?;
        Ok(SocketFile { path: path.to_path_buf(), id: (m.dev(), m.ino()) })
    }

    pub fn remove_if_ours(&self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Ends the process when its parent dies or, when stdin is a pipe or socket (the supervisor's),
/// when it is closed, removing its socket file: a service never outlives the server that
/// started it. A stdin of another kind (/dev/null, a terminal) is not watched.
pub fn exit_with_parent(socket: SocketFile) {
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
    std::thread::spawn(move || {
        let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
        eprintln!("embeddinggemma serve: stdin closed; exiting");
        socket.remove_if_ours();
        std::process::exit(0);
    });
}
