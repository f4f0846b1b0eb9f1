//! The backend's side of the cluster's embedding service: a call over the service's Unix
//! socket, every wait (connecting, the reply, the statistics) serving interrupts.

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use embeddinggemma_engine::service::{CallStats, Client, ErrorKind, Opened, ServiceError};
use embeddinggemma_engine::Chunk;
use pgrx::PgSqlErrorCode;

use crate::embedding::model_info::ModelInfo;
use crate::embedding::service_state::{SOCKET, STATUS};
use crate::pg::errors::{raise, raise_bad_cut};
use crate::pg::interrupts::{serve_interrupts, WaitEvent};

/// How the waiting backend blocks on the socket between looks at its interrupts.
const POLL: Duration = Duration::from_millis(5);
/// How long a call waits for a service whose process is there to listen (it binds its socket
/// first thing; a replacement after a reload binds it anew).
const START_WAIT: Duration = Duration::from_secs(30);
/// How long a ping after connecting, or the view's statistics, may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
const STATS_TIMEOUT: Duration = Duration::from_secs(2);

thread_local! {
    /// This backend's connection, kept between calls.
    static CONNECTION: RefCell<Option<Client>> = const { RefCell::new(None) };
}

fn unavailable_hint() -> String {
    "The embedding service is starting or restarting: run the statement again in a few seconds. SELECT * FROM embeddinggemma_service shows its state and last error.".into()
}

/// Raises a service error as an ERROR with a SQLSTATE and a HINT.
fn raise_service(e: ServiceError) -> ! {
    use PgSqlErrorCode::*;
    let message = format!("embeddinggemma: {}", e.message);
    let (code, hint) = match e.kind {
        ErrorKind::ModelFile => (ERRCODE_UNDEFINED_FILE, crate::pg::errors::setup_hint().to_string()),
        ErrorKind::Checksum => (ERRCODE_DATA_CORRUPTED, "Fetch the model again with ./scripts/fetch-model, or fix embeddinggemma.model_checksums, then SELECT pg_reload_conf().".into()),
        ErrorKind::UnknownTask => (ERRCODE_INVALID_PARAMETER_VALUE, "Pass one of the listed task names, or 'none' for raw text.".into()),
        ErrorKind::InvalidDim => (ERRCODE_INVALID_PARAMETER_VALUE, "Matryoshka dimensions are the first values of the full vector, normalised again.".into()),
        ErrorKind::TooLong => (ERRCODE_PROGRAM_LIMIT_EXCEEDED, "SET embeddinggemma.truncate = on to embed the first tokens of long texts instead.".into()),
        ErrorKind::InvalidOption => (ERRCODE_INVALID_PARAMETER_VALUE, "Check the embeddinggemma.* settings.".into()),
        ErrorKind::Device => (ERRCODE_FEATURE_NOT_SUPPORTED, "Set embeddinggemma.device = 'cpu' in postgresql.conf, or install a build with CUDA on a machine with a GPU.".into()),
        ErrorKind::OutOfMemory => (ERRCODE_OUT_OF_MEMORY, "Embed fewer or shorter texts per call; a superuser sets embeddinggemma.max_call_memory.".into()),
        ErrorKind::Unavailable | ErrorKind::Cancelled => (ERRCODE_CONNECTION_FAILURE, unavailable_hint()),
        ErrorKind::ModelMismatch => (ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, crate::pg::errors::service_settings_hint().into()),
        ErrorKind::Tokenizer | ErrorKind::Inference | ErrorKind::Internal | ErrorKind::Protocol => {
            (ERRCODE_INTERNAL_ERROR, "This is a bug in embeddinggemma; please report it with the input that caused it.".into())
        }
    };
    raise(code, message, hint)
}

/// Takes the connection out for one call: an ERROR unwinding drops it, which closes the socket
/// and withdraws the request from the service's queue.
struct Checkout(Option<Client>);

impl Checkout {
    fn put_back(mut self) {
        let client = self.0.take();
        CONNECTION.with(|c| *c.borrow_mut() = client);
    }
}

/// Connects, waiting (serving interrupts) for a full backlog to drain and for a service whose
/// process is there to listen, then checks that it answers.
fn connect() -> Result<Client, ServiceError> {
    let deadline = Instant::now() + START_WAIT;
    let _event = WaitEvent::start();
    let mut client = loop {
        match Client::open(Path::new(SOCKET)) {
            Ok(Opened::Connected(c)) => break c,
            Ok(Opened::Busy) => {}
            Err(e) if STATUS.get().pid.load(Ordering::Relaxed) == 0 || Instant::now() >= deadline => return Err(e),
            Err(_) => {}
        }
        std::thread::sleep(POLL);
        serve_interrupts();
    };
    request(&mut client, &|c| c.send_ping(), &|c, t| c.poll_pong(t), Some(ANSWER_TIMEOUT))?;
    Ok(client)
}

/// Polls `client` for a reply, up to the given time.
type Poll<'a, R> = dyn Fn(&mut Client, Duration) -> Option<Result<R, ServiceError>> + 'a;

/// One request on `client` (`send` queues it), waiting for its reply (`poll`) while serving
/// interrupts, until `deadline` if one is given.
fn request<R>(
    client: &mut Client,
    send: &dyn Fn(&mut Client) -> Result<(), ServiceError>,
    poll: &Poll<R>,
    timeout: Option<Duration>,
) -> Result<R, ServiceError> {
    send(client)?;
    let deadline = timeout.map(|t| Instant::now() + t);
    let _event = WaitEvent::start();
    loop {
        if let Some(reply) = poll(client, POLL) {
            return reply;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(ServiceError {
                kind: ErrorKind::Unavailable,
                message: format!("embedding service: no answer within {timeout:?}"),
            });
        }
        serve_interrupts();
    }
}

/// A request to the service on this backend's connection.
fn call<R>(send: &dyn Fn(&mut Client) -> Result<(), ServiceError>, poll: &Poll<R>) -> Result<R, ServiceError> {
    let cached = CONNECTION.with(|c| c.borrow_mut().take());
    let reused = cached.is_some();
    let mut checkout = Checkout(Some(match cached {
        Some(c) => c,
        None => connect()?,
    }));
    let mut reply = request(checkout.0.as_mut().expect("checked out"), send, poll, None);
    // A connection kept from an earlier call may reach a service that has since been replaced
    // (it drains, or runs the old settings) or is gone: one retry on a fresh one (requests are
    // idempotent).
    if reused && matches!(&reply, Err(e) if matches!(e.kind, ErrorKind::Unavailable | ErrorKind::ModelMismatch)) {
        checkout.0 = Some(connect()?);
        reply = request(checkout.0.as_mut().expect("checked out"), send, poll, None);
    }
    // Still in step after a result or a refused request: kept for the next call.
    if !matches!(&reply, Err(e) if matches!(e.kind, ErrorKind::Unavailable | ErrorKind::Protocol)) {
        checkout.put_back();
    }
    reply
}

/// Embeds `texts` through the service, as the settings `model` name; None when the service
/// runs other ones. Raises an ERROR on any other failure.
pub fn embed(
    texts: &[&str],
    task: &str,
    dim: usize,
    truncate: bool,
    model: &str,
    background: bool,
) -> Option<(Vec<Vec<f32>>, CallStats)> {
    match call(&|c| c.send_embed(task, dim, truncate, model, background, texts), &|c, t| c.poll_reply(t)) {
        Ok(e) => Some(((0..e.len()).map(|i| e.vector(i).to_vec()).collect(), e.stats)),
        Err(e) if e.kind == ErrorKind::ModelMismatch => None,
        Err(e) => raise_service(e),
    }
}

/// Chunks `text` through the service (tokenizing only), as `embed`.
pub fn chunk(text: &str, task: &str, max_tokens: usize, overlap: usize, model: &str) -> Option<Vec<Chunk>> {
    match call(&|c| c.send_chunk(text, task, max_tokens, overlap, model), &|c, t| c.poll_chunks(t)) {
        Ok(chunks) => Some(chunks),
        Err(e) if e.kind == ErrorKind::ModelMismatch => None,
        Err(e) if e.kind == ErrorKind::InvalidOption => raise_bad_cut(e.message),
        Err(e) => raise_service(e),
    }
}

/// The service's statistics (JSON), or why they cannot be had; never waits long, and serves
/// interrupts while it waits.
pub fn stats() -> Result<String, String> {
    let deadline = Instant::now() + STATS_TIMEOUT;
    let mut client = loop {
        match Client::open(Path::new(SOCKET)).map_err(|e| e.message)? {
            Opened::Connected(c) => break c,
            Opened::Busy if Instant::now() < deadline => {
                std::thread::sleep(POLL);
                serve_interrupts();
            }
            Opened::Busy => return Err("embedding service: it accepts no connection".into()),
        }
    };
    request(&mut client, &|c| c.send_stats(), &|c, t| c.poll_stats(t), Some(STATS_TIMEOUT)).map_err(|e| e.message)
}

/// `embeddinggemma_info()` of the model the service holds, from its statistics.
pub fn info() -> ModelInfo {
    let stats = stats().unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
            format!("embeddinggemma: {e}"),
            "The embedding service is starting or restarting; SELECT * FROM embeddinggemma_service shows its state.",
        )
    });
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap_or_default();
    let Some(m) = stats.get("model").filter(|m| m.is_object()) else {
        let why = stats.get("load_error").and_then(|e| e.as_str()).unwrap_or("the model is not loaded yet");
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("embeddinggemma: the service has no model: {why}"),
            "SELECT * FROM embeddinggemma_service shows the service's state and error.",
        )
    };
    let text = |k: &str| m.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let number = |k: &str| m.get(k).and_then(|v| v.as_f64()).unwrap_or_default();
    let list = |k: &str| m.get(k).and_then(|v| v.as_array()).cloned().unwrap_or_default();
    ModelInfo {
        path: text("path"),
        device: text("device"),
        dtype: text("dtype"),
        dims: list("dims").iter().filter_map(|d| d.as_i64()).map(|d| d as i32).collect(),
        max_seq_length: number("max_seq_length") as i32,
        tasks: list("tasks").iter().filter_map(|t| t.as_str()).map(str::to_string).collect(),
        checksums: m.get("checksums").cloned().unwrap_or_default(),
        load_seconds: number("load_s"),
        weights_mb: number("weights_mb"),
        version: text("version"),
    }
}
