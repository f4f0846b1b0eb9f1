//! Engine work runs on threads of its own while the backend's thread keeps serving
//! PostgreSQL's interrupts (cancel, statement and transaction timeouts, terminate, client
//! disconnect checks). An ERROR raised there goes on at once; the work stops at its next check.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use embeddinggemma_engine::with_signals_blocked;

use crate::pg::errors::raise;
use crate::pg::interrupts::{serve_interrupts, WaitEvent};

/// How often the waiting backend looks for interrupts.
const POLL: Duration = Duration::from_millis(5);

thread_local! {
    /// A thread an interrupt left behind: it stops at its next check (within a layer).
    static UNFINISHED: RefCell<Option<JoinHandle<()>>> = const { RefCell::new(None) };
}

/// Waits, serving interrupts, until a thread an earlier interrupt left behind has stopped:
/// a backend runs one such thread at a time.
pub fn finish_unfinished() {
    while let Some(handle) = UNFINISHED.with(|u| u.borrow_mut().take()) {
        if handle.is_finished() {
            let _ = handle.join();
            return;
        }
        UNFINISHED.with(|u| *u.borrow_mut() = Some(handle));
        std::thread::sleep(POLL);
        serve_interrupts();
    }
}

/// The running thread; dropped before it has finished (an ERROR unwinding), it tells the work
/// to stop and leaves it to finish on its own, so the ERROR is not held up by the work.
struct Running {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            self.stop.store(true, Ordering::Relaxed);
            UNFINISHED.with(|u| *u.borrow_mut() = Some(handle));
        }
    }
}

/// Runs `work` on a new thread (signals blocked) and waits for it, serving interrupts. When
/// one raises an ERROR, the ERROR goes on at once and `work` sees its `stop` flag set.
pub fn run<R: Send + 'static>(work: impl FnOnce(&AtomicBool) -> R + Send + 'static) -> R {
    finish_unfinished();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let flag = stop.clone();
    let spawned = with_signals_blocked(|| {
        std::thread::Builder::new().name("embeddinggemma".into()).spawn(move || {
            let _ = tx.send(work(&flag));
        })
    });
    let mut running = Running { stop, handle: Some(spawned.unwrap_or_else(|e| no_thread(e))) };
    let result = wait(&rx);
    // The result is in: the thread is ending; join it so it holds nothing past the call.
    let _ = running.handle.take().expect("taken once").join();
    result
}

fn no_thread(e: std::io::Error) -> ! {
    raise(
        pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_RESOURCES,
        format!("embeddinggemma: cannot start a thread: {e}"),
        "The server is out of threads or memory; try again later.",
    )
}

/// Waits for a result on `rx`, serving interrupts meanwhile.
pub fn wait<R>(rx: &Receiver<R>) -> R {
    let _event = WaitEvent::start();
    loop {
        match rx.recv_timeout(POLL) {
            Ok(result) => return result,
            Err(RecvTimeoutError::Timeout) => serve_interrupts(),
            // The thread panicked before sending its result.
            Err(RecvTimeoutError::Disconnected) => raise(
                pgrx::PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                "embeddinggemma: the worker thread failed",
                "This is a bug in embeddinggemma; please report it.",
            ),
        }
    }
}

/// Starts `work` on a detached thread (signals blocked) and returns where its result will
/// arrive: for work that is worth finishing even if the caller is interrupted (loading).
pub fn spawn_detached<R: Send + 'static>(work: impl FnOnce() -> R + Send + 'static) -> Receiver<R> {
    let (tx, rx) = mpsc::channel();
    let spawned = with_signals_blocked(|| {
        std::thread::Builder::new().name("embeddinggemma-load".into()).spawn(move || {
            let _ = tx.send(work());
        })
    });
    spawned.unwrap_or_else(|e| no_thread(e));
    rx
}
