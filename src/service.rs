//! The backend's side of the cluster's embedding service: whether a call goes to it, and the
//! call itself over the service's Unix socket, waiting interruptibly.

use std::cell::RefCell;
use std::ffi::CStr;
use std::path::Path;
use std::time::Duration;

use embeddinggemma_engine::service::{CallStats, Client, ErrorKind, ServiceError};
use embeddinggemma_engine::Chunk;
use pgrx::{pg_sys, PgSqlErrorCode};

use crate::errors::raise;
use crate::{guc, supervisor, worker};

/// Relative to the data directory, which is every backend's working directory.
pub const SOCKET: &str = "pg_stat_tmp/embeddinggemma.sock";

/// How long the waiting backend blocks on the socket between looks at its interrupts.
const POLL: Duration = Duration::from_millis(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Settings that shape the model: a session that changed one (a superuser's SET) embeds
/// in-process, since the service runs the server's configuration.
const MODEL_SETTINGS: [&CStr; 4] =
    [c"embeddinggemma.model_path", c"embeddinggemma.model_checksums", c"embeddinggemma.device", c"embeddinggemma.dtype"];

fn at_server_value(name: &CStr) -> bool {
    // SAFETY: GUC lookups by name on the backend's thread; both return NULL-or-string.
    unsafe {
        let now = pg_sys::GetConfigOption(name.as_ptr(), true, false);
        let reset = pg_sys::GetConfigOptionResetString(name.as_ptr());
        let text = |p: *const std::ffi::c_char| (!p.is_null()).then(|| CStr::from_ptr(p).to_owned());
        text(now) == text(reset)
    }
}

/// Whether this call goes to the service.
pub fn chosen() -> bool {
    let wanted = match guc::SERVICE.get() {
        guc::Service::Off => false,
        guc::Service::Auto => supervisor::preloaded(),
        guc::Service::On => {
            if !supervisor::preloaded() {
                raise(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    "embeddinggemma.service is on, but the service is not running",
                    "Add embeddinggemma to shared_preload_libraries and restart the server, or SET embeddinggemma.service = auto.",
                )
            }
            true
        }
    };
    wanted && MODEL_SETTINGS.iter().all(|&name| at_server_value(name))
}

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
        ErrorKind::ModelFile => (ERRCODE_UNDEFINED_FILE, crate::errors::setup_hint().to_string()),
        ErrorKind::Checksum => (ERRCODE_DATA_CORRUPTED, "Fetch the model again with ./scripts/fetch-model, or fix embeddinggemma.model_checksums, then SELECT pg_reload_conf().".into()),
        ErrorKind::UnknownTask => (ERRCODE_INVALID_PARAMETER_VALUE, "Pass one of the listed task names, or 'none' for raw text.".into()),
        ErrorKind::InvalidDim => (ERRCODE_INVALID_PARAMETER_VALUE, "Matryoshka dimensions are the first values of the full vector, normalised again.".into()),
        ErrorKind::TooLong => (ERRCODE_PROGRAM_LIMIT_EXCEEDED, "SET embeddinggemma.truncate = on to embed the first tokens of long texts instead.".into()),
        ErrorKind::InvalidOption => (ERRCODE_INVALID_PARAMETER_VALUE, "Check the embeddinggemma.* settings.".into()),
        ErrorKind::Device => (ERRCODE_FEATURE_NOT_SUPPORTED, "Set embeddinggemma.device = 'cpu' in postgresql.conf, or install a build with CUDA on a machine with a GPU.".into()),
        ErrorKind::OutOfMemory => (ERRCODE_OUT_OF_MEMORY, "Embed fewer or shorter texts per call; a superuser sets embeddinggemma.max_call_memory.".into()),
        ErrorKind::Unavailable | ErrorKind::Cancelled => (ERRCODE_CONNECTION_FAILURE, unavailable_hint()),
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

fn connect() -> Client {
    Client::connect(Path::new(SOCKET), CONNECT_TIMEOUT).unwrap_or_else(|e| raise_service(e))
}

/// One request on `client` (`send` queues it), waiting for its reply (`poll`) while serving
/// interrupts.
fn request<R>(
    client: &mut Client,
    send: &dyn Fn(&mut Client) -> Result<(), ServiceError>,
    poll: &dyn Fn(&mut Client, Duration) -> Option<Result<R, ServiceError>>,
) -> Result<R, ServiceError> {
    send(client)?;
    let _event = worker::WaitEvent::start();
    loop {
        if let Some(reply) = poll(client, POLL) {
            return reply;
        }
        worker::serve_interrupts();
    }
}

/// A request to the service on this backend's connection; raises an ERROR on failure.
fn call<R>(
    send: &dyn Fn(&mut Client) -> Result<(), ServiceError>,
    poll: &dyn Fn(&mut Client, Duration) -> Option<Result<R, ServiceError>>,
    raise_error: fn(ServiceError) -> !,
) -> R {
    let cached = CONNECTION.with(|c| c.borrow_mut().take());
    let reused = cached.is_some();
    let mut checkout = Checkout(Some(cached.unwrap_or_else(connect)));
    let mut reply = request(checkout.0.as_mut().expect("checked out"), send, poll);
    // A connection kept from an earlier call may predate a restart of the service: one retry
    // on a fresh one (requests are idempotent).
    if reused && matches!(&reply, Err(e) if e.kind == ErrorKind::Unavailable) {
        checkout.0 = Some(connect());
        reply = request(checkout.0.as_mut().expect("checked out"), send, poll);
    }
    match reply {
        Ok(r) => {
            checkout.put_back();
            r
        }
        Err(e) => {
            // Keep a connection that is still in step (a refused request) for the next call.
            if e.kind != ErrorKind::Unavailable && e.kind != ErrorKind::Protocol {
                checkout.put_back();
            }
            raise_error(e)
        }
    }
}

/// Embeds `texts` through the service; raises an ERROR on failure.
pub fn embed(texts: &[&str], task: &str, dim: usize, truncate: bool) -> (Vec<Vec<f32>>, CallStats) {
    let embedding = call(&|c| c.send_embed(task, dim, truncate, texts), &|c, t| c.poll_reply(t), raise_service);
    let vectors = (0..embedding.len()).map(|i| embedding.vector(i).to_vec()).collect();
    (vectors, embedding.stats)
}

/// Chunks `text` through the service (tokenizing only); raises an ERROR on failure.
pub fn chunk(text: &str, task: &str, max_tokens: usize, overlap: usize) -> Vec<Chunk> {
    fn raise_chunk_error(e: ServiceError) -> ! {
        if e.kind == ErrorKind::InvalidOption {
            crate::chunks::raise_bad_cut(e.message)
        }
        raise_service(e)
    }
    call(&|c| c.send_chunk(text, task, max_tokens, overlap), &|c, t| c.poll_chunks(t), raise_chunk_error)
}

/// The service's statistics (JSON), or why they cannot be had.
pub fn stats() -> Result<String, String> {
    let mut client = Client::connect(Path::new(SOCKET), CONNECT_TIMEOUT).map_err(|e| e.message)?;
    client.stats(CONNECT_TIMEOUT).map_err(|e| e.message)
}
