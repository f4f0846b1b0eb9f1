//! An asynchronous worker process: started by the launcher for one database, it drains that
//! database's queue for a while, a round at a time (`drain`). It leaves when its queue is empty,
//! when its turn is over and another database waits, or when a DDL command needs its database.

use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;

use super::claims::{self};
use super::drain::{Round, Worker};
use super::failure::txn;
use super::registry;

/// How long an idle worker sleeps between looks at its queue (a commit wakes it sooner).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How long a worker with nothing to do stays before it gives its slot up.
const IDLE_EXIT: Duration = Duration::from_secs(5);
/// How long a worker serves its database before it makes way for another that waits.
const TURN: Duration = Duration::from_secs(30);
/// How long an idle worker waits for the serving model's identity before it leaves anyway.
const MODEL_WAIT: Duration = Duration::from_secs(60);

/// Why a worker leaves.
enum Leave {
    /// Nothing to do: it asks to be started again when a retry is due.
    Idle,
    /// Its turn is over, or it was stopped: it asks to be started again.
    Again,
    /// A DDL command needs the database: the command asks again when it is done.
    Held,
}

thread_local! {
    /// Set when the worker leaves on its own (`leave`): an exit without it (a FATAL, such as the
    /// watchdog's) asks for a new worker.
    static LEAVING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// At process exit: a worker that did not leave on its own (a FATAL ended it) gives its slot up
/// and asks for a new worker, which finds its entries leased and marks them interrupted.
#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: std::ffi::c_int, arg: pg_sys::Datum) {
    if LEAVING.get() {
        return;
    }
    let (slot, db) = ((arg.value() >> 32), pg_sys::Oid::from(arg.value() as u32));
    registry::release(slot);
    registry::want(db, registry::now_ms() + 1_000);
}

/// Leaves for good: the slot goes first, so that a commit after the last look below finds no
/// worker and asks the launcher for one.
// proc_exit is `-> !` in some versions' bindings and not in others.
#[allow(unreachable_code)]
fn leave(slot: usize, db: pg_sys::Oid, why: Leave) -> ! {
    LEAVING.set(true);
    registry::release(slot);
    match why {
        Leave::Held => {}
        Leave::Again => registry::want(db, registry::now_ms()),
        Leave::Idle => {
            match txn(|| super::target::installed().then(|| (claims::work_due(), claims::next_retry_in()))) {
                Ok(Some((true, _))) => registry::want(db, registry::now_ms()),
                Ok(Some((false, Some(secs)))) => {
                    registry::want(db, registry::now_ms() + (secs.max(0.0) * 1000.0) as u64)
                }
                _ => {}
            }
        }
    }
    registry::notify_launcher();
    // SAFETY: ends this worker process normally (it is never restarted by the postmaster).
    unsafe { pg_sys::proc_exit(0) };
    unreachable!("proc_exit returns not")
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn embeddinggemma_async_worker_main(arg: pg_sys::Datum) {
    let db = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db), None);
    let Some(slot) = registry::claim(db) else {
        registry::notify_launcher();
        return;
    };
    // SAFETY: registers a callback run as the process exits, with the slot and database packed
    // in its argument.
    unsafe { pg_sys::on_shmem_exit(Some(on_exit), pg_sys::Datum::from(((slot as u64) << 32) | db.to_u32() as u64)) };
    // Names in the SQL it runs never resolve through a user's objects.
    // SAFETY: sets this worker's own setting, as SET would.
    unsafe {
        pg_sys::SetConfigOption(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
        );
    }
    if let Err(e) = txn(|| {
        if super::target::installed() {
            claims::recover_interrupted()
        }
    }) {
        pgrx::warning!("embeddinggemma async: {e}");
    }
    pgrx::log!("embeddinggemma async: worker of database {} started", db.to_u32());
    let mut worker = Worker { slot, db, model: None, next: 0 };
    let started = Instant::now();
    let mut idle_since: Option<Instant> = None;
    let mut backoff = Duration::from_secs(1);
    loop {
        if registry::must_leave(slot) {
            let _ = txn(claims::give_back_all);
            leave(slot, db, Leave::Held);
        }
        let (wait, wakeable) = match worker.round() {
            Ok(Round::Worked) => {
                idle_since = None;
                backoff = Duration::from_secs(1);
                if started.elapsed() > TURN && registry::others_waiting(worker.db) {
                    leave(slot, db, Leave::Again);
                }
                (Duration::ZERO, false)
            }
            Ok(Round::Idle) => {
                // It stays until it has recorded the serving model (the service may be loading
                // one), for a while.
                let idle = idle_since.get_or_insert_with(Instant::now).elapsed();
                if idle >= IDLE_EXIT && (worker.model.is_some() || idle >= MODEL_WAIT) {
                    leave(slot, db, Leave::Idle);
                }
                (IDLE_POLL, true)
            }
            Ok(Round::NoTargets) => leave(slot, db, Leave::Idle),
            Err(e) => {
                // The service down or restarting, a model that failed to load: nothing is
                // lost (leases are given back), and the worker tries again.
                pgrx::warning!("embeddinggemma async: {e}; trying again in {backoff:?}");
                let _ = txn(claims::give_back_all);
                worker.model = None;
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                // Writes do not cut a backoff short.
                (wait, false)
            }
        };
        registry::set_sleeping(slot, wakeable);
        let deadline = Instant::now() + wait;
        let running = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !BackgroundWorker::wait_latch(Some(left.max(Duration::from_millis(1)))) {
                break false;
            }
            // Woken by a write (only while idle), by a DDL command, or the time is up.
            if wakeable || registry::must_leave(slot) || Instant::now() >= deadline {
                break true;
            }
        };
        registry::set_sleeping(slot, false);
        if !running {
            // Stopped (pg_terminate_backend, shutdown): the launcher starts it again unless
            // the server is shutting down.
            leave(slot, db, Leave::Again);
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: rereads the configuration, as PostgreSQL's own workers do.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
}
