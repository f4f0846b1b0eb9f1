//! The launcher: one process per cluster (started at server start while preloaded, restarted
//! if it dies) that starts the asynchronous workers. Databases ask for a worker through the
//! registry (a commit that queued rows, a registration, a worker whose rows wait for a retry);
//! the launcher starts one for each, oldest request first, never more than
//! `embeddinggemma.async_max_workers` at once and never for a database that is gone or held by
//! a DDL command. Workers are never restarted by the postmaster: a worker of a dropped database
//! cannot come back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;

use super::registry;

/// How long a started worker may take to take its slot before it counts as failed.
const START_GRACE: Duration = Duration::from_secs(10);
/// How often every database is looked at anyway: a database copied from a template, or
/// restored, has queued rows that no commit announced.
const RESCAN: Duration = Duration::from_secs(600);
/// How long the launcher sleeps with nothing to do (a request wakes it sooner).
const IDLE: Duration = Duration::from_secs(5);

/// Registers the launcher (from `_PG_init` while preloading).
pub fn register() {
    BackgroundWorkerBuilder::new("embeddinggemma async launcher")
        .set_type("embeddinggemma async launcher")
        .set_library("embeddinggemma")
        .set_function("embeddinggemma_async_launcher_main")
        .enable_spi_access()
        // Workers write: not on a standby.
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// Starts a worker for database `db` (a dynamic background worker that is never restarted).
fn start(db: pg_sys::Oid) -> bool {
    let started = BackgroundWorkerBuilder::new(&format!("embeddinggemma async {}", db.to_u32()))
        .set_type("embeddinggemma async")
        .set_library("embeddinggemma")
        .set_function("embeddinggemma_async_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .set_argument(Some(pg_sys::Datum::from(db.to_u32())))
        .load_dynamic();
    if let Err(e) = &started {
        pgrx::log!(
            "embeddinggemma async: no background worker slot for database {} ({e:?}); trying again",
            db.to_u32()
        );
    }
    started.is_ok()
}

/// The databases a worker may connect to.
fn databases() -> Vec<pg_sys::Oid> {
    let mut found = Vec::new();
    // SAFETY: a catalog scan of the shared catalog pg_database in a transaction, as
    // PostgreSQL's own launchers do.
    unsafe {
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let form = &*(pg_sys::GETSTRUCT(tuple) as *const pg_sys::FormData_pg_database);
            if form.datallowconn && !form.datistemplate {
                found.push(form.oid);
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    }
    found
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn embeddinggemma_async_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi_by_oid(None, None);
    // SAFETY: this process's pid.
    registry::set_launcher(unsafe { pg_sys::MyProcPid });
    // At start every database is looked at once: rows queued before a restart wait there.
    let mut unseen: Vec<pg_sys::Oid> = BackgroundWorker::transaction(databases);
    let mut starting: HashMap<u32, Instant> = HashMap::new();
    let mut last_look = Instant::now();
    loop {
        if BackgroundWorker::sighup_received() {
            // SAFETY: rereads the configuration, as PostgreSQL's own workers do.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let (wanted, overflow) = registry::wanted_now();
        if overflow || last_look.elapsed() > RESCAN {
            unseen = BackgroundWorker::transaction(databases);
            last_look = Instant::now();
        }
        starting.retain(|db, at| at.elapsed() < START_GRACE && !registry::running(pg_sys::Oid::from(*db)));
        let candidates: Vec<pg_sys::Oid> = wanted.iter().chain(unseen.iter()).copied().collect();
        // Databases left waiting for a slot, or for their worker to leave.
        let mut waiting = false;
        if !candidates.is_empty() {
            let existing = BackgroundWorker::transaction(databases);
            let max = crate::pg::guc::ASYNC_MAX_WORKERS.get().max(1) as usize;
            for db in candidates {
                if registry::workers() + starting.len() >= max {
                    waiting = true;
                    break;
                }
                if !existing.contains(&db) {
                    // Dropped, or not connectable: nothing to serve.
                    registry::unwant(db);
                    unseen.retain(|d| *d != db);
                    continue;
                }
                if registry::running(db) || registry::held(db) || starting.contains_key(&db.to_u32()) {
                    waiting = true;
                    continue;
                }
                if start(db) {
                    starting.insert(db.to_u32(), Instant::now());
                    unseen.retain(|d| *d != db);
                }
            }
        }
        // A worker that leaves sets this latch; the poll covers one that died.
        let wait = if waiting { Duration::from_millis(500) } else { registry::next_due_in().unwrap_or(IDLE).min(IDLE) };
        if !BackgroundWorker::wait_latch(Some(wait.max(Duration::from_millis(10)))) {
            // Terminated: exit 1, so that the postmaster starts it again (at shutdown it does
            // not); an exit 0 would unregister it for good.
            // SAFETY: ends this process.
            unsafe { pg_sys::proc_exit(1) };
        }
    }
}
