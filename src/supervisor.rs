//! The cluster's embedding service: with `embeddinggemma` in `shared_preload_libraries`, a
//! background worker starts `embeddinggemma serve` (the engine's binary, a process of its own
//! attached to nothing of PostgreSQL's) and restarts it whenever it exits. A crash of the model
//! — panic, abort, OOM kill, GPU fault — is then the death of a grandchild of the postmaster,
//! which PostgreSQL never sees: no cluster restart.
//!
//! On a reload (SIGHUP) that changes the service's settings, a new service binds the socket
//! path while the old one drains (finishes the calls in hand, then exits), so no call fails;
//! a reload that changes nothing makes the service try a failed model load again at once.

use std::ffi::CStr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::pg_shmem_init;
use pgrx::prelude::*;

use crate::embedding::service_state::{self, STATUS};
use crate::pg::guc;

/// From `_PG_init`: when preloading, reserve the status and register the supervisor.
pub fn register() {
    // SAFETY: a flag PostgreSQL sets while it loads shared_preload_libraries.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    service_state::set_preloaded();
    pg_shmem_init!(STATUS);
    crate::asynchronous::register();
    BackgroundWorkerBuilder::new("embeddinggemma service")
        .set_type("embeddinggemma service")
        .set_library("embeddinggemma")
        .set_function("embeddinggemma_supervisor_main")
        .enable_shmem_access(None)
        // Also on a hot standby, so read replicas can embed search queries.
        .set_start_time(BgWorkerStartTime::PostmasterStart)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

/// The command line of the service, from the server's configuration.
fn command_line() -> Vec<String> {
    let text = |s: &pgrx::GucSetting<Option<std::ffi::CString>>| guc::string(s);
    // Beside the server's own programs: not in $libdir, where its name would shadow the library.
    let binary = text(&guc::SERVICE_BINARY).unwrap_or_else(|| {
        // SAFETY: my_exec_path is the NUL-terminated path of the postgres executable.
        let postgres = unsafe { CStr::from_ptr((&raw const pg_sys::my_exec_path).cast()) };
        let postgres = std::path::PathBuf::from(postgres.to_string_lossy().into_owned());
        postgres.with_file_name("embeddinggemma").display().to_string()
    });
    let mut args = vec![binary, "serve".into(), "--socket".into(), service_state::SOCKET.into()];
    let mut add = |flag: &str, value: String| {
        args.push(flag.into());
        args.push(value);
    };
    add("--model", text(&guc::MODEL_PATH).unwrap_or_default());
    if let Some(sums) = text(&guc::MODEL_CHECKSUMS) {
        add("--checksums", sums);
    }
    add("--device", text(&guc::DEVICE).unwrap_or_else(|| "auto".into()));
    add("--dtype", guc::DTYPE.get().precision().to_string());
    let threads = match guc::MAX_THREADS.get() {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n as usize,
    };
    add("--threads", threads.to_string());
    add("--max-batch-tokens", guc::MAX_BATCH_TOKENS.get().to_string());
    add("--batch-wait-ms", guc::BATCH_WAIT_MS.get().to_string());
    add("--max-memory-mb", guc::MAX_CALL_MEMORY.get().to_string());
    add("--model-key", guc::model_key());
    args
}

/// The running service: its stdin is the pipe whose end tells it the supervisor is gone.
struct Service {
    child: Child,
    _stdin: Option<ChildStdin>,
}

static CANDLE_CONFINED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether `_PG_init` confined candle's pool through the environment: the service, which keeps
/// threads of its own, then starts without it.
pub fn set_candle_confined(confined: bool) {
    CANDLE_CONFINED.store(confined, Ordering::Relaxed);
}

fn start(args: &[String]) -> Option<Service> {
    let mut command = Command::new(&args[0]);
    command.args(&args[1..]).stdin(Stdio::piped());
    if CANDLE_CONFINED.load(Ordering::Relaxed) {
        command.env_remove(embeddinggemma_engine::CANDLE_THREADS);
    }
    let started = command.spawn();
    match started {
        Ok(mut child) => {
            let status = STATUS.get();
            status.pid.store(child.id() as i32, Ordering::Relaxed);
            status.starts.fetch_add(1, Ordering::Relaxed);
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
            status.started_at.store(now, Ordering::Relaxed);
            log!("embeddinggemma service: started {} (pid {})", args.join(" "), child.id());
            Some(Service { _stdin: child.stdin.take(), child })
        }
        Err(e) => {
            warning!("embeddinggemma service: cannot start {}: {e}", args[0]);
            None
        }
    }
}

fn record_exit(status: std::process::ExitStatus) {
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().unwrap_or_else(|| -status.signal().unwrap_or(0));
    let shared = STATUS.get();
    shared.pid.store(0, Ordering::Relaxed);
    shared.last_exit.store(code, Ordering::Relaxed);
    shared.exits.fetch_add(1, Ordering::Relaxed);
    warning!("embeddinggemma service: the service process exited ({status}); restarting it");
}

fn signal(service: &Service, signal: i32) {
    // SAFETY: signals our own child.
    unsafe { libc::kill(service.child.id() as i32, signal) };
}

/// How long a replaced service may take to finish its calls before it is stopped.
const DRAIN_LIMIT: Duration = Duration::from_secs(15 * 60);

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn embeddinggemma_supervisor_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let mut args = command_line();
    let mut service: Option<Service> = None;
    // Replaced services finishing their calls, and when they were asked to.
    let mut draining: Vec<(Service, Instant)> = Vec::new();
    // Restarts back off while the service keeps failing, and start quick again once it runs.
    let mut backoff = Duration::from_millis(100);
    let mut next_start = Instant::now();
    let mut started_at = Instant::now();
    loop {
        if let Some(s) = service.as_mut() {
            if let Ok(Some(status)) = s.child.try_wait() {
                record_exit(status);
                service = None;
                if started_at.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(100);
                }
                next_start = Instant::now() + backoff;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        draining.retain_mut(|(s, since)| {
            if since.elapsed() > DRAIN_LIMIT {
                signal(s, libc::SIGTERM);
            }
            !matches!(s.child.try_wait(), Ok(Some(_)))
        });
        if service.is_none() && Instant::now() >= next_start {
            STATUS.get().model_key_hash.store(service_state::key_hash(&guc::model_key()), Ordering::Relaxed);
            service = start(&args);
            started_at = Instant::now();
            if service.is_none() {
                next_start = Instant::now() + Duration::from_secs(5);
            }
        }
        if !BackgroundWorker::wait_latch(Some(Duration::from_millis(20))) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: rereads postgresql.conf in this worker, as PostgreSQL's own workers do.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            let new_args = command_line();
            if new_args == args {
                // Nothing changed: a model that failed to load (fetched since?) is tried again.
                if let Some(s) = &service {
                    signal(s, libc::SIGHUP);
                }
                continue;
            }
            args = new_args;
            log!("embeddinggemma service: settings changed; a new service takes over while the old one finishes its calls");
            if let Some(old) = service.take() {
                // The new service binds the path anew; the old one keeps its connections.
                let _ = std::fs::remove_file(service_state::SOCKET);
                signal(&old, libc::SIGUSR1);
                draining.push((old, Instant::now()));
                STATUS.get().pid.store(0, Ordering::Relaxed);
            }
            next_start = Instant::now();
            backoff = Duration::from_millis(100);
            // Targets record the model they are embedded with: every database is looked at.
            crate::asynchronous::registry::look_at_every_database();
        }
    }
    for s in service.into_iter().chain(draining.into_iter().map(|(s, _)| s)) {
        stop(s);
    }
}

fn stop(mut service: Service) {
    signal(&service, libc::SIGTERM);
    let _ = service.child.wait();
    STATUS.get().pid.store(0, Ordering::Relaxed);
}
