//! The cluster's embedding service: with `embeddinggemma` in `shared_preload_libraries`, a
//! background worker starts `embeddinggemma serve` (the engine's binary, a process of its own
//! attached to nothing of PostgreSQL's) and restarts it whenever it exits. A crash of the model
//! — panic, abort, OOM kill, GPU fault — is then the death of a grandchild of the postmaster,
//! which PostgreSQL never sees: no cluster restart.

use std::ffi::CStr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::{pg_shmem_init, PgAtomic};

use crate::{guc, service};

/// What the supervisor tells backends, in shared memory.
#[repr(C)]
#[derive(Default)]
pub struct Status {
    /// The service process, 0 while there is none.
    pub pid: AtomicI32,
    pub starts: AtomicU64,
    /// Unix time the current process started.
    pub started_at: AtomicI64,
    /// How the last process ended: its exit code, or minus the signal that killed it.
    pub last_exit: AtomicI32,
    pub exits: AtomicU64,
}

// SAFETY: plain atomics, valid in any process that maps the segment.
unsafe impl PGRXSharedMemory for Status {}

// SAFETY: the name is ours alone.
pub static STATUS: PgAtomic<Status> = unsafe { PgAtomic::new(c"embeddinggemma_service_status") };

static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Whether the library was preloaded, so the service runs (backends inherit this from the
/// postmaster).
pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// From `_PG_init`: when preloading, reserve the status and register the supervisor.
pub fn register() {
    // SAFETY: a flag PostgreSQL sets while it loads shared_preload_libraries.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    PRELOADED.store(true, Ordering::Relaxed);
    pg_shmem_init!(STATUS);
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
    let mut args = vec![binary, "serve".into(), "--socket".into(), service::SOCKET.into()];
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
    args
}

/// The running service: its stdin is the pipe whose end tells it the supervisor is gone.
struct Service {
    child: Child,
    _stdin: Option<ChildStdin>,
}

fn start(args: &[String]) -> Option<Service> {
    let started = Command::new(&args[0]).args(&args[1..]).stdin(Stdio::piped()).spawn();
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

fn stop(mut service: Service) {
    // SAFETY: signals our own child.
    unsafe { libc::kill(service.child.id() as i32, libc::SIGTERM) };
    let _ = service.child.wait();
    STATUS.get().pid.store(0, Ordering::Relaxed);
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn embeddinggemma_supervisor_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let mut args = command_line();
    let mut service: Option<Service> = None;
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
        if service.is_none() && Instant::now() >= next_start {
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
            if new_args != args {
                args = new_args;
                log!("embeddinggemma service: settings changed; restarting the service");
                if let Some(s) = service.take() {
                    stop(s);
                }
                next_start = Instant::now();
            }
        }
    }
    if let Some(s) = service.take() {
        stop(s);
    }
}
