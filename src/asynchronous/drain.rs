//! An asynchronous worker: started by the launcher for one database, it drains that database's
//! queue for a while. Each round visits the targets in turn (one slow or locked target does not
//! hold back the others): it claims a target's due entries, reads their current text, embeds
//! them through the service (as background work, which interactive calls overtake), writes the
//! vectors or chunks and removes the entries. Reads and writes run as the table's owner, one
//! owner at a time (`owner`). A row whose text changed meanwhile is left for its newer entry; a
//! row whose write fails is retried with backoff, then kept as failed, without holding back
//! any other row. The worker leaves when its queue is empty, when its turn is over and another
//! database waits, or when a DDL command needs its database.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;

use super::claims::{self, Claimed};
use super::registry;
use super::rows::{self, Found};
use super::target::{targets, Target};
use crate::routing;

/// How long an idle worker sleeps between looks at its queue (a commit wakes it sooner).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How long a worker with nothing to do stays before it gives its slot up.
const IDLE_EXIT: Duration = Duration::from_secs(5);
/// How long a worker serves its database before it makes way for another that waits.
const TURN: Duration = Duration::from_secs(30);
/// How long an idle worker waits for the serving model's identity before it leaves anyway.
const MODEL_WAIT: Duration = Duration::from_secs(60);
/// How often the serving model's identity is read again.
const MODEL_CHECK: Duration = Duration::from_secs(10);

/// Runs `f` in a transaction of its own; an ERROR rolls it back and comes back as `Err`.
fn txn<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    // SAFETY: a worker's top-level transaction, begun and ended here.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let done = PgTryBuilder::new(AssertUnwindSafe(|| {
        let r = f();
        // SAFETY: ends the transaction begun above (an ERROR while committing is caught too).
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(r)
    }))
    .catch_others(|e| Err(caught(e)))
    .execute();
    if done.is_err() {
        // SAFETY: cleans up the failed transaction, as PostgreSQL's own workers do.
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    done
}

fn caught(e: pg_sys::panic::CaughtError) -> String {
    match e {
        pg_sys::panic::CaughtError::PostgresError(r) => r.message().to_string(),
        pg_sys::panic::CaughtError::ErrorReport(r) => r.message().to_string(),
        pg_sys::panic::CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
    }
}

/// Why a batch failed.
enum Failure {
    /// The service could not embed (down, restarting, its model failing to load): nothing to
    /// hold against the rows, which go back to the queue untried.
    Service(String),
    /// Reading or writing the rows failed (the owner's triggers or constraints, a timeout), or
    /// the model refused a text.
    Rows(String),
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Failure::Rows(e)
    }
}

/// An ERROR of the embedding call: a text the model refuses (a data exception, a limit) is the
/// row's; anything else is the service's.
fn embedding_failure(e: pg_sys::panic::CaughtError) -> Failure {
    let code = match &e {
        pg_sys::panic::CaughtError::PostgresError(r) | pg_sys::panic::CaughtError::ErrorReport(r) => {
            Some(r.sql_error_code())
        }
        pg_sys::panic::CaughtError::RustPanic { ereport, .. } => Some(ereport.sql_error_code()),
    };
    let class = code.map(|c| {
        let sqlstate = c as u32;
        // The two first characters of the SQLSTATE, as PGUNSIXBIT packs them.
        ((sqlstate & 0x3F) as u8 + b'0', ((sqlstate >> 6) & 0x3F) as u8 + b'0')
    });
    let message = caught(e);
    match class {
        Some((b'2', b'2')) | Some((b'5', b'4')) => Failure::Rows(message),
        _ => Failure::Service(message),
    }
}

/// Runs the embedding step `f` (no transaction of its own is needed for a vector target).
fn embedding<R>(f: impl FnOnce() -> R) -> Result<R, Failure> {
    PgTryBuilder::new(AssertUnwindSafe(|| Ok(routing::in_background(f))))
        .catch_others(|e| Err(embedding_failure(e)))
        .execute()
}

/// What a batch wrote: rows, and the entries it is done with (not those it gave back for a
/// later batch or refused).
struct Written {
    rows: usize,
    done: Vec<i64>,
}

/// What a round found to do.
enum Round {
    Worked,
    Idle,
    NoTargets,
}

/// The claimed entries of one target, by key (a row queued twice is embedded once).
struct Batch {
    keys: Vec<String>,
    ids: Vec<Vec<i64>>,
}

impl Batch {
    fn of(claimed: Vec<Claimed>) -> Batch {
        let mut batch = Batch { keys: Vec::new(), ids: Vec::new() };
        let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for c in claimed {
            match index.get(&c.key) {
                Some(&i) => batch.ids[i].push(c.id),
                None => {
                    index.insert(c.key.clone(), batch.keys.len());
                    batch.keys.push(c.key);
                    batch.ids.push(vec![c.id]);
                }
            }
        }
        batch
    }

    fn all_ids(&self) -> Vec<i64> {
        self.ids.iter().flatten().copied().collect()
    }
}

/// Why a worker leaves.
enum Leave {
    /// Nothing to do: it asks to be started again when a retry is due.
    Idle,
    /// Its turn is over, or it was stopped: it asks to be started again.
    Again,
    /// A DDL command needs the database: the command asks again when it is done.
    Held,
}

struct Worker {
    slot: usize,
    db: pg_sys::Oid,
    /// The serving model's identity, and when it was read.
    model: Option<(crate::model_info::ModelInfo, Instant)>,
    /// The target whose turn comes first in the next round.
    next: usize,
}

impl Worker {
    /// The serving model's identity, read again every `MODEL_CHECK`; None while it cannot be
    /// had (the service loading its model: calls wait for it meanwhile).
    fn serving_model(&mut self) -> Option<crate::model_info::ModelInfo> {
        if self.model.as_ref().is_none_or(|(_, at)| at.elapsed() > MODEL_CHECK) {
            let info = PgTryBuilder::new(AssertUnwindSafe(|| Some(routing::info()))).catch_others(|_| None).execute();
            self.model = info.map(|i| (i, Instant::now()));
        }
        self.model.as_ref().map(|(m, _)| m.clone())
    }

    /// One round: queue rows of targets being scanned, then a batch of each target in turn.
    fn round(&mut self) -> Result<Round, String> {
        let targets = txn(targets)?;
        if targets.is_empty() {
            return Ok(Round::NoTargets);
        }
        if let Some(model) = self.serving_model() {
            txn(|| super::provenance::record_serving(&targets, &model))?;
        }
        let mut worked = false;
        for t in targets.iter().filter(|t| t.scanning) {
            worked = true;
            if let Err(e) = txn(|| t.scan()) {
                pgrx::warning!("embeddinggemma async: queueing the rows of target {}: {e}", t.id);
            }
        }
        // An entry in hand when a worker stopped goes alone, before anything else.
        let ids: Vec<i32> = targets.iter().map(|t| t.id).collect();
        if let Some((id, entry)) = txn(|| claims::claim_interrupted(&ids))? {
            let t = targets.iter().find(|t| t.id == id).expect("claimed among these targets");
            if let Some(batch) = self.batch(t, vec![entry]) {
                self.process(t, batch)?;
            }
            return Ok(Round::Worked);
        }
        let first = self.next % targets.len();
        self.next = first + 1;
        for t in targets.iter().cycle().skip(first).take(targets.len()) {
            let claimed = txn(|| claims::claim(t.id, t.max_attempts))?;
            if claimed.is_empty() {
                continue;
            }
            worked = true;
            if let Some(batch) = self.batch(t, claimed) {
                self.process(t, batch)?;
            }
            if registry::must_leave(self.slot) {
                break;
            }
        }
        if !worked {
            txn(|| super::provenance::settle_models(&targets))?;
            return Ok(Round::Idle);
        }
        Ok(Round::Worked)
    }

    /// The batch of claimed entries, their keys read back in this worker's terms; entries
    /// whose key cannot be read back (its column retyped) are recorded as failed.
    fn batch(&self, t: &Target, mut claimed: Vec<Claimed>) -> Option<Batch> {
        match txn(|| rows::keys_in_worker_terms(t, &mut claimed)) {
            Ok(()) => Some(Batch::of(claimed)),
            Err(e) => {
                let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
                if let Err(e) = txn(|| claims::failed(&ids, &e)) {
                    pgrx::warning!("embeddinggemma async: recording rows of target {}: {e}", t.id);
                }
                None
            }
        }
    }

    /// Embeds and writes a batch; a batch that fails is written row by row (each in its own
    /// transaction, so that one bad row fails alone) while the time allows. Err: the service
    /// failed (the batch is back in the queue, untried).
    fn process(&self, t: &Target, batch: Batch) -> Result<(), String> {
        let started = Instant::now();
        match self.write(t, &batch) {
            Ok(w) => {
                let rate = w.rows as f64 / started.elapsed().as_secs_f64().max(1e-3);
                self.record(t, &w.done, w.rows, rate);
                Ok(())
            }
            Err(Failure::Service(e)) => {
                let _ = txn(|| claims::give_back(&batch.all_ids()));
                Err(e)
            }
            Err(_) if registry::must_leave(self.slot) => {
                let _ = txn(|| claims::give_back(&batch.all_ids()));
                Ok(())
            }
            Err(Failure::Rows(e)) => {
                pgrx::log!(
                    "embeddinggemma async: a batch of {} rows of target {} failed ({e}); writing them one by one",
                    batch.keys.len(),
                    t.id
                );
                self.one_by_one(t, batch)
            }
        }
    }

    fn one_by_one(&self, t: &Target, batch: Batch) -> Result<(), String> {
        // A slow or locked table gets about one more batch's time, then waits for the next
        // round (the other targets go first).
        let bound = super::owner::Bounds::configured().statement_ms;
        let budget = Duration::from_millis(if bound > 0 { bound.max(1_000) as u64 } else { 60_000 });
        let started = Instant::now();
        let mut left: Vec<i64> = Vec::new();
        let mut service = None;
        for (key, ids) in batch.keys.into_iter().zip(batch.ids) {
            if started.elapsed() > budget || registry::must_leave(self.slot) || service.is_some() {
                left.extend(ids);
                continue;
            }
            let one = Batch { keys: vec![key.clone()], ids: vec![ids.clone()] };
            match self.write(t, &one) {
                Ok(w) => self.record(t, &w.done, w.rows, t.rows_per_second.unwrap_or(0.0)),
                Err(Failure::Rows(e)) => {
                    if let Err(e) = txn(|| claims::failed(&ids, &e)) {
                        pgrx::warning!("embeddinggemma async: recording row {key} of target {}: {e}", t.id);
                    }
                }
                Err(Failure::Service(e)) => {
                    left.extend(ids);
                    service = Some(e);
                }
            }
        }
        if let Err(e) = txn(|| claims::give_back(&left)) {
            pgrx::warning!("embeddinggemma async: giving back rows of target {}: {e}", t.id);
        }
        service.map_or(Ok(()), Err)
    }

    fn record(&self, t: &Target, ids: &[i64], n: usize, rate: f64) {
        if let Err(e) = txn(|| {
            claims::remove(ids);
            super::provenance::record_batch(t, n, rate);
        }) {
            pgrx::warning!("embeddinggemma async: recording a batch of target {}: {e}", t.id);
        }
    }

    /// Reads, embeds and writes `batch`; entries left for later are given back and refused
    /// ones recorded, in the transaction of the read. The rows written.
    fn write(&self, t: &Target, batch: &Batch) -> Result<Written, Failure> {
        let found = txn(|| {
            let found = rows::read(t, &batch.keys);
            let pick = |want: fn(&Found) -> bool| -> Vec<i64> {
                found.iter().zip(&batch.ids).filter(|(f, _)| want(f)).flat_map(|(_, ids)| ids.iter().copied()).collect()
            };
            claims::give_back(&pick(|f| matches!(f, Found::Later)));
            for (f, ids) in found.iter().zip(&batch.ids) {
                if let Found::TooLarge(bytes) = f {
                    let message = format!(
                        "embeddinggemma: the document has {bytes} bytes; asynchronous chunking embeds documents of at most {} bytes",
                        rows::CHUNK_DOCUMENT_BYTES
                    );
                    claims::refused(ids, &message);
                }
            }
            found
        })?;
        let done: Vec<i64> = found
            .iter()
            .zip(&batch.ids)
            .filter(|(f, _)| matches!(f, Found::Text(..) | Found::Nothing))
            .flat_map(|(_, ids)| ids.iter().copied())
            .collect();
        let rows = match &t.column {
            Some(column) => self.write_vectors(t, column, &batch.keys, found)?,
            None => {
                let (keys, texts): (Vec<String>, Vec<Option<String>>) = batch
                    .keys
                    .iter()
                    .cloned()
                    .zip(found)
                    .filter_map(|(k, f)| match f {
                        Found::Text(text, _) => Some((k, Some(text))),
                        Found::Nothing => Some((k, None)),
                        Found::Later | Found::TooLarge(_) => None,
                    })
                    .unzip();
                if keys.is_empty() {
                    0
                } else {
                    let chunks =
                        txn(|| embedding(|| rows::embed_chunks(t, &keys, &texts))).map_err(Failure::Rows)??;
                    txn(|| rows::write_chunks(t, &keys, chunks))?
                }
            }
        };
        Ok(Written { rows, done })
    }

    fn write_vectors(&self, t: &Target, column: &str, keys: &[String], found: Vec<Found>) -> Result<usize, Failure> {
        let (mut live, mut texts, mut lens) = (Vec::new(), Vec::new(), Vec::new());
        for (k, f) in keys.iter().zip(found) {
            if let Found::Text(text, len) = f {
                live.push(k.clone());
                texts.push(text);
                lens.push(len);
            }
        }
        if live.is_empty() {
            return Ok(0);
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let vectors = embedding(|| routing::embed(&refs, &t.task, t.dim))?;
        drop(refs);
        Ok(txn(|| rows::write_vectors(t, column, &live, &texts, &lens, &vectors))?)
    }
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
