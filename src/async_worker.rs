//! The asynchronous workers: at server start a launcher starts one worker per database; a
//! worker that finds no target there exits, and registering a target starts one. A worker
//! drains its database's queue in large batches: it claims queued rows, reads their current
//! text with the rights of the table's owner, embeds the texts of all targets together through
//! the service (as background work, which interactive calls overtake), and writes the vectors
//! and removes the queue entries — again as the owner, whose privileges, row-level security and
//! triggers apply as to any write. A row whose text changed meanwhile is left for its newer
//! queue entry; a row whose write fails is retried with backoff, then kept as failed, without
//! holding back any other row. Its SQL runs with `search_path = pg_catalog, pg_temp`.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::{pg_sys, PgRelation};

use crate::chunk_trigger::ChunkSettings;
use crate::columns::{check_columns, check_source, key_column, KeyColumn};
use crate::sql_text::{self, ident, relation, text_param};
use crate::statement_trigger::Writing;
use crate::{async_registry, routing, vector};

/// Texts (or their bytes) claimed per batch: enough for the service to fill its passes.
const CLAIM_TEXTS: i64 = 1024;
const CLAIM_BYTES: usize = 8 << 20;
/// Rows present at registration queued per transaction.
const SCAN_ROWS: i64 = 10_000;
/// How long an idle worker sleeps between looks at its queue (a write wakes it sooner).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How often the serving model's identity is read again.
const MODEL_CHECK: Duration = Duration::from_secs(10);

/// Registers the launcher (from `_PG_init` while preloading).
pub fn register() {
    BackgroundWorkerBuilder::new("embeddinggemma async launcher")
        .set_type("embeddinggemma async launcher")
        .set_library("embeddinggemma")
        .set_function("embeddinggemma_async_launcher_main")
        .enable_spi_access()
        // Workers write: not on a standby.
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .load();
}

/// Starts the worker of database `db` (a dynamic background worker).
pub fn start_for(db: pg_sys::Oid) {
    let started = BackgroundWorkerBuilder::new(&format!("embeddinggemma async {}", db.to_u32()))
        .set_type("embeddinggemma async")
        .set_library("embeddinggemma")
        .set_function("embeddinggemma_async_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        // Stopped by pg_terminate_backend or a crash, it comes back; it exits 0 (for good)
        // only when its database has no target.
        .set_restart_time(Some(Duration::from_secs(2)))
        .set_argument(Some(pg_sys::Datum::from(db.to_u32())))
        .load_dynamic();
    if let Err(e) = started {
        pgrx::warning!("embeddinggemma: cannot start the asynchronous worker of database {}: {e:?}", db.to_u32());
    }
}

/// The databases a worker may have targets in.
fn databases() -> Vec<pg_sys::Oid> {
    let mut found = Vec::new();
    // SAFETY: a catalog scan of pg_database in a transaction, as PostgreSQL's own launchers do.
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
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi_by_oid(None, None);
    let dbs = BackgroundWorker::transaction(databases);
    for db in dbs {
        start_for(db);
    }
}

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

/// A target, as the worker reads it.
struct Target {
    id: i32,
    relation: pg_sys::Oid,
    key: String,
    source: String,
    /// The vector column, or None for a chunk target.
    column: Option<String>,
    chunk_table: Option<pg_sys::Oid>,
    chunk_key: Option<String>,
    task: String,
    dim: i32,
    max_tokens: i32,
    overlap: i32,
    scanning: bool,
    scan_all: bool,
    scan_after: Option<String>,
    model: Option<String>,
    serving: Option<String>,
    rows_per_second: Option<f64>,
}

fn targets() -> Vec<Target> {
    let (targets, _) = sql_text::extension_table("embeddinggemma_async_targets");
    let sql = format!(
        "SELECT id, relation::pg_catalog.oid, key_column, source, target, chunk_table::pg_catalog.oid, chunk_key, task, dim,
                COALESCE(max_tokens, 0), COALESCE(overlap, 0), scanning, scan_all, scan_after,
                model::pg_catalog.text, serving::pg_catalog.text, rows_per_second
           FROM {targets} ORDER BY id"
    );
    pgrx::spi::Spi::connect_mut(|c| {
        let rows = c.update(sql.as_str(), None, &[])?;
        let mut out = Vec::new();
        for r in rows {
            let chunk_table: Option<pg_sys::Oid> = r.get(6)?;
            out.push(Target {
                id: r.get(1)?.unwrap_or_default(),
                relation: r.get(2)?.unwrap_or_default(),
                key: r.get(3)?.unwrap_or_default(),
                source: r.get(4)?.unwrap_or_default(),
                column: if chunk_table.is_none() { r.get(5)? } else { None },
                chunk_table,
                chunk_key: r.get(7)?,
                task: r.get(8)?.unwrap_or_default(),
                dim: r.get(9)?.unwrap_or(768),
                max_tokens: r.get(10)?.unwrap_or(0),
                overlap: r.get(11)?.unwrap_or(0),
                scanning: r.get(12)?.unwrap_or(false),
                scan_all: r.get(13)?.unwrap_or(false),
                scan_after: r.get(14)?,
                model: r.get(15)?,
                serving: r.get(16)?,
                rows_per_second: r.get(17)?,
            });
        }
        Ok::<_, pgrx::spi::SpiError>(out)
    })
    .expect("SPI reports errors as ERRORs")
}

/// Whether this database has the extension and a target.
fn has_targets() -> bool {
    let installed = sql_text::one::<bool>("SELECT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'embeddinggemma')", &[]);
    installed == Some(true) && {
        let (targets, _) = sql_text::extension_table("embeddinggemma_async_targets");
        sql_text::one::<bool>(&format!("SELECT EXISTS (SELECT FROM {targets})"), &[]) == Some(true)
    }
}

impl Target {
    fn chunk_settings(&self, documents: &PgRelation) -> ChunkSettings {
        let chunk_table = self.chunk_table.expect("a chunk target");
        let chunk_key = self.chunk_key.as_deref().unwrap_or("doc_id");
        ChunkSettings::check(documents, &self.key, &self.source, chunk_table, chunk_key, (self.max_tokens, self.overlap), &self.task, self.dim)
    }

    /// The condition on a documents row `d` that it needs embedding when its target is scanned.
    fn scan_filter(&self, documents: &PgRelation) -> String {
        let s = ident(&self.source);
        match (&self.column, self.scan_all) {
            (_, true) => format!("d.{s} IS NOT NULL"),
            (Some(column), false) => format!("d.{s} IS NOT NULL AND d.{} IS NULL", ident(column)),
            (None, false) => {
                let c = self.chunk_settings(documents);
                format!(
                    "d.{s} IS NOT NULL AND NOT EXISTS (SELECT FROM {} c WHERE c.{} OPERATOR(pg_catalog.=) d.{})",
                    relation(c.chunk_table),
                    ident(&c.chunk_key),
                    ident(&self.key)
                )
            }
        }
    }
}

/// Queues the next `SCAN_ROWS` rows present when the target was registered (or re-embedded),
/// in key order after the last key done.
fn scan(t: &Target) {
    let documents = crate::columns::open_checked(t.relation);
    let key = key_column(&documents, &t.key);
    let key_type = sql_text::type_name(key.type_oid);
    let k = ident(&t.key);
    let after = if t.scan_after.is_some() { format!(" AND d.{k} OPERATOR(pg_catalog.>) $1::{key_type}") } else { String::new() };
    let sql = format!(
        "SELECT d.{k}::pg_catalog.text FROM {} d WHERE {}{after} ORDER BY d.{k} USING OPERATOR(pg_catalog.<) LIMIT {SCAN_ROWS}",
        relation(t.relation),
        t.scan_filter(&documents)
    );
    let owner = sql_text::relation_owner(t.relation);
    let keys: Vec<String> = sql_text::as_role(owner, || {
        let args = [text_param(t.scan_after.clone())];
        pgrx::spi::Spi::connect_mut(|c| {
            let rows = c.update(sql.as_str(), None, if t.scan_after.is_some() { &args[..] } else { &[] })?;
            rows.map(|r| r.get::<String>(1).map(Option::unwrap_or_default)).collect::<Result<Vec<_>, _>>()
        })
        .expect("SPI reports errors as ERRORs")
    });
    let (queue, _) = sql_text::extension_table("embeddinggemma_async_queue");
    let (targets, _) = sql_text::extension_table("embeddinggemma_async_targets");
    sql_text::run(
        &format!("INSERT INTO {queue} (target_id, key) SELECT $1, k FROM pg_catalog.unnest($2::pg_catalog.text[]) AS k"),
        &[text_param(t.id), text_param(keys.clone())],
    );
    let done = (keys.len() as i64) < SCAN_ROWS;
    sql_text::run(
        &format!(
            "UPDATE {targets} SET scanning = NOT $2, scan_all = scan_all AND NOT $2, scan_after = CASE WHEN $2 THEN NULL ELSE $3 END
              WHERE id OPERATOR(pg_catalog.=) $1"
        ),
        &[text_param(t.id), text_param(done), text_param(keys.last().cloned())],
    );
}

/// A queue entry claimed for this batch.
struct Claimed {
    id: i64,
    target: i32,
    key: String,
}

fn claim() -> Vec<Claimed> {
    let (queue, _) = sql_text::extension_table("embeddinggemma_async_queue");
    let (targets, _) = sql_text::extension_table("embeddinggemma_async_targets");
    let sql = format!(
        "UPDATE {queue} SET leased = true, last_attempt = pg_catalog.now()
          WHERE id OPERATOR(pg_catalog.=) ANY (ARRAY(
                SELECT q.id FROM {queue} q JOIN {targets} t ON t.id OPERATOR(pg_catalog.=) q.target_id
                 WHERE NOT q.leased AND q.attempts OPERATOR(pg_catalog.<) t.max_attempts
                   AND (q.not_before IS NULL OR q.not_before OPERATOR(pg_catalog.<=) pg_catalog.now())
                 ORDER BY q.id LIMIT {CLAIM_TEXTS}))
         RETURNING id, target_id, key"
    );
    pgrx::spi::Spi::connect_mut(|c| {
        let rows = c.update(sql.as_str(), None, &[])?;
        rows.map(|r| Ok(Claimed { id: r.get(1)?.unwrap_or_default(), target: r.get(2)?.unwrap_or_default(), key: r.get(3)?.unwrap_or_default() }))
            .collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
    })
    .expect("SPI reports errors as ERRORs")
}

fn remove(ids: &[i64]) {
    let (queue, _) = sql_text::extension_table("embeddinggemma_async_queue");
    sql_text::run(&format!("DELETE FROM {queue} WHERE id OPERATOR(pg_catalog.=) ANY ($1)"), &[text_param(ids.to_vec())]);
}

/// A failed write: tried again after 1, 2, 4, … seconds, until the target's limit.
fn failed(ids: &[i64], error: &str) {
    let (queue, _) = sql_text::extension_table("embeddinggemma_async_queue");
    sql_text::run(
        &format!(
            "UPDATE {queue} SET leased = false, attempts = attempts OPERATOR(pg_catalog.+) 1, last_error = $2,
                    not_before = pg_catalog.now() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => pg_catalog.power(2, attempts)::pg_catalog.float8)
              WHERE id OPERATOR(pg_catalog.=) ANY ($1)"
        ),
        &[text_param(ids.to_vec()), text_param(error.to_string())],
    );
}

/// The rows of one target in this batch: (queue ids, key, text) per distinct key.
struct Rows {
    target: usize,
    keys: Vec<String>,
    ids: Vec<Vec<i64>>,
}

/// The current texts of `keys` (None: the row is gone or has no text), as the table's owner.
fn texts(t: &Target, keys: &[String]) -> Vec<Option<String>> {
    let documents = crate::columns::open_checked(t.relation);
    check_source(&documents, &t.source);
    let key = key_column(&documents, &t.key);
    let sql = format!(
        "SELECT d.{k}::pg_catalog.text, d.{s}::pg_catalog.text FROM {tbl} d
          WHERE d.{k} OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.text[]::{kt}[])",
        k = ident(&t.key),
        s = ident(&t.source),
        tbl = relation(t.relation),
        kt = sql_text::type_name(key.type_oid)
    );
    let found: HashMap<String, Option<String>> = sql_text::as_role(sql_text::relation_owner(t.relation), || {
        pgrx::spi::Spi::connect_mut(|c| {
            let rows = c.update(sql.as_str(), None, &[text_param(keys.to_vec())])?;
            rows.map(|r| Ok((r.get::<String>(1)?.unwrap_or_default(), r.get::<String>(2)?))).collect::<Result<_, pgrx::spi::SpiError>>()
        })
        .expect("SPI reports errors as ERRORs")
    });
    keys.iter().map(|k| found.get(k).cloned().flatten()).collect()
}

/// Writes `vectors` of `keys` whose text is still `texts` (a row changed since has a newer
/// queue entry), as the table's owner; the number of rows written.
fn write_vectors(t: &Target, column: &str, keys: &[String], texts: &[String], vectors: &[Vec<f32>]) -> usize {
    let documents = crate::columns::open_checked(t.relation);
    check_columns(&documents, &t.source, column, t.dim);
    let key: KeyColumn = key_column(&documents, &t.key);
    let vector_type = documents.tuple_desc().iter().find(|a| !a.attisdropped && a.name() == column).map(|a| a.atttypid).expect("checked");
    let sql = format!(
        "UPDATE {tbl} d SET {v} = u.v
           FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), pg_catalog.unnest($2::pg_catalog.text[]), pg_catalog.unnest($3)) AS u(k, s, v)
          WHERE d.{k} OPERATOR(pg_catalog.=) u.k::{kt} AND d.{s}::pg_catalog.text OPERATOR(pg_catalog.=) u.s",
        tbl = relation(t.relation),
        v = ident(column),
        k = ident(&t.key),
        s = ident(&t.source),
        kt = sql_text::type_name(key.type_oid)
    );
    let _writing = Writing::start(t.relation);
    sql_text::as_role(sql_text::relation_owner(t.relation), || {
        let args = [text_param(keys.to_vec()), text_param(texts.to_vec()), vector::array_param(vectors, vector_type)];
        sql_text::run(&sql, &args)
    })
}

/// Replaces the chunks of `keys` with those of their current text, as the owner.
fn write_chunks(t: &Target, keys: &[String]) -> usize {
    let documents = crate::columns::open_checked(t.relation);
    let settings = t.chunk_settings(&documents);
    let current = texts(t, keys);
    let owner = sql_text::relation_owner(t.relation);
    sql_text::as_role(owner, || {
        let delete = format!(
            "DELETE FROM {} c WHERE c.{} OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.text[]::{}[])",
            relation(settings.chunk_table),
            ident(&settings.chunk_key),
            sql_text::type_name(settings.key.type_oid)
        );
        sql_text::run(&delete, &[text_param(keys.to_vec())]);
        let live: Vec<(String, Option<String>)> = keys.iter().cloned().zip(current).filter(|(_, text)| text.as_deref().is_some_and(|s| !s.is_empty())).collect();
        if !live.is_empty() {
            let (keys, texts): (Vec<String>, Vec<Option<String>>) = live.into_iter().unzip();
            pgrx::spi::Spi::connect_mut(|c| settings.insert_chunks(c, &keys, &texts));
        }
    });
    keys.len()
}

/// The model identity vectors of `t` get now, as the status view shows it.
fn provenance(model: &crate::model_info::ModelInfo, t: &Target) -> String {
    serde_json::json!({
        "weights_sha256": model.checksums.get("model.safetensors"),
        "dtype": model.dtype,
        "task": t.task,
        "dim": t.dim,
        "extension": env!("CARGO_PKG_VERSION"),
    })
    .to_string()
}

struct Worker {
    /// The serving model's identity, and when it was read.
    model: Option<(crate::model_info::ModelInfo, Instant)>,
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

    /// One round: queue rows of targets being scanned, claim a batch, embed it, write it.
    /// Whether there was anything to do.
    fn round(&mut self) -> Result<bool, String> {
        let targets = txn(targets)?;
        if targets.is_empty() {
            return Err(String::new());
        }
        if let Some(model) = self.serving_model() {
            txn(|| record_serving(&targets, &model))?;
        }
        let mut busy = false;
        for t in targets.iter().filter(|t| t.scanning) {
            busy = true;
            if let Err(e) = txn(|| scan(t)) {
                pgrx::warning!("embeddinggemma async: queueing the rows of {}: {e}", t.id);
            }
        }
        let claimed = txn(claim)?;
        if claimed.is_empty() {
            txn(|| settle_models(&targets))?;
            return Ok(busy);
        }
        let batches = group(&targets, &claimed);
        let started = Instant::now();
        for rows in &batches {
            let t = &targets[rows.target];
            let all: Vec<i64> = rows.ids.iter().flatten().copied().collect();
            let written = match &t.column {
                Some(column) => self.embed_vectors(t, column, rows),
                None => self.embed_chunks(t, rows),
            };
            match written {
                Ok(n) => {
                    let rate = n as f64 / started.elapsed().as_secs_f64().max(1e-3);
                    txn(|| {
                        remove(&all);
                        record_batch(t, n, rate);
                    })?;
                }
                Err(e) => {
                    pgrx::log!("embeddinggemma async: a batch of {} rows of target {} failed ({e}); writing them one by one", all.len(), t.id);
                    self.one_by_one(t, rows);
                }
            }
        }
        Ok(true)
    }

    fn embed_vectors(&self, t: &Target, column: &str, rows: &Rows) -> Result<usize, String> {
        let current = txn(|| texts(t, &rows.keys))?;
        let (keys, texts): (Vec<String>, Vec<String>) =
            rows.keys.iter().cloned().zip(current).filter_map(|(k, text)| text.map(|text| (k, text))).unzip();
        if keys.is_empty() {
            return Ok(0);
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let vectors = PgTryBuilder::new(AssertUnwindSafe(|| Ok(routing::in_background(|| routing::embed(&refs, &t.task, t.dim)))))
            .catch_others(|e| Err(caught(e)))
            .execute()?;
        txn(|| write_vectors(t, column, &keys, &texts, &vectors))
    }

    fn embed_chunks(&self, t: &Target, rows: &Rows) -> Result<usize, String> {
        txn(|| routing::in_background(|| write_chunks(t, &rows.keys)))
    }

    /// A batch that failed, row by row: each row's write in a transaction of its own, so that
    /// one bad row fails alone.
    fn one_by_one(&self, t: &Target, rows: &Rows) {
        for (key, ids) in rows.keys.iter().zip(&rows.ids) {
            let one = Rows { target: rows.target, keys: vec![key.clone()], ids: vec![ids.clone()] };
            let written = match &t.column {
                Some(column) => self.embed_vectors(t, column, &one),
                None => self.embed_chunks(t, &one),
            };
            let recorded = match written {
                Ok(n) => txn(|| {
                    remove(ids);
                    record_batch(t, n, t.rows_per_second.unwrap_or(0.0));
                }),
                Err(e) => txn(|| failed(ids, &e)),
            };
            if let Err(e) = recorded {
                pgrx::warning!("embeddinggemma async: recording row {key} of target {}: {e}", t.id);
            }
        }
    }
}

/// Groups claimed entries by target and key (a row queued twice is embedded once).
fn group(targets: &[Target], claimed: &[Claimed]) -> Vec<Rows> {
    let mut batches: Vec<Rows> = Vec::new();
    let mut bytes = 0;
    for c in claimed {
        let Some(target) = targets.iter().position(|t| t.id == c.target) else { continue };
        let b = match batches.iter_mut().find(|b| b.target == target) {
            Some(b) => b,
            None => {
                batches.push(Rows { target, keys: Vec::new(), ids: Vec::new() });
                batches.last_mut().expect("pushed")
            }
        };
        match b.keys.iter().position(|k| *k == c.key) {
            Some(i) => b.ids[i].push(c.id),
            None => {
                b.keys.push(c.key.clone());
                b.ids.push(vec![c.id]);
            }
        }
        bytes += c.key.len();
        if bytes > CLAIM_BYTES {
            break;
        }
    }
    batches
}

fn record_batch(t: &Target, n: usize, rate: f64) {
    // Entries of rows deleted meanwhile write nothing: they tell nothing of the rate either.
    if n == 0 {
        return;
    }
    let (targets, _) = sql_text::extension_table("embeddinggemma_async_targets");
    let smoothed = t.rows_per_second.map_or(rate, |r| 0.7 * r + 0.3 * rate);
    sql_text::run(
        &format!(
            "UPDATE {targets} SET embedded = embedded OPERATOR(pg_catalog.+) $2, last_embedded_at = pg_catalog.now(), rows_per_second = $3
              WHERE id OPERATOR(pg_catalog.=) $1"
        ),
        &[text_param(t.id), text_param(n as i64), text_param(smoothed)],
    );
}

fn record_serving(targets: &[Target], model: &crate::model_info::ModelInfo) {
    let (table, _) = sql_text::extension_table("embeddinggemma_async_targets");
    for t in targets {
        let now = provenance(model, t);
        if t.serving.as_deref() != Some(now.as_str()) {
            sql_text::run(
                &format!("UPDATE {table} SET serving = $2::pg_catalog.jsonb WHERE id OPERATOR(pg_catalog.=) $1"),
                &[text_param(t.id), text_param(now)],
            );
        }
    }
}

/// A target whose queue is empty and whose scan is done has every row embedded by the serving
/// model since it was registered or re-embedded: that is then the model its vectors came from.
/// (Rows written after a model change keep it stale until a re-embed.)
fn settle_models(targets: &[Target]) {
    let (table, _) = sql_text::extension_table("embeddinggemma_async_targets");
    let (queue, _) = sql_text::extension_table("embeddinggemma_async_queue");
    for t in targets.iter().filter(|t| t.model.is_none() && !t.scanning) {
        sql_text::run(
            &format!(
                "UPDATE {table} t SET model = t.serving WHERE t.id OPERATOR(pg_catalog.=) $1 AND t.serving IS NOT NULL
                    AND NOT EXISTS (SELECT FROM {queue} q WHERE q.target_id OPERATOR(pg_catalog.=) t.id)"
            ),
            &[text_param(t.id)],
        );
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn embeddinggemma_async_worker_main(arg: pg_sys::Datum) {
    let db = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db), None);
    let Some(mut slot) = async_registry::claim(db) else { return };
    // Names in the SQL it runs never resolve through a user's objects.
    // SAFETY: sets this worker's own setting, as SET would.
    unsafe {
        pg_sys::SetConfigOption(c"search_path".as_ptr(), c"pg_catalog, pg_temp".as_ptr(), pg_sys::GucContext::PGC_SUSET, pg_sys::GucSource::PGC_S_SESSION);
    }
    if !txn(has_targets).unwrap_or(false) {
        async_registry::release(slot);
        return;
    }
    // Leases of an earlier incarnation (killed, or the server restarted) are void.
    let (queue, _) = BackgroundWorker::transaction(|| sql_text::extension_table("embeddinggemma_async_queue"));
    let _ = txn(|| sql_text::run(&format!("UPDATE {queue} SET leased = false WHERE leased"), &[]));
    pgrx::log!("embeddinggemma async: worker of database {} started", db.to_u32());
    let mut worker = Worker { model: None };
    let mut backoff = Duration::from_secs(1);
    loop {
        let round = worker.round();
        let (wait, wakeable) = match round {
            Ok(true) => {
                backoff = Duration::from_secs(1);
                (Duration::ZERO, false)
            }
            Ok(false) => (IDLE_POLL, true),
            // No target left: done, unless one was registered meanwhile. The slot goes first:
            // a registration committed after the look below finds no worker and starts one.
            Err(e) if e.is_empty() => {
                async_registry::release(slot);
                if !txn(has_targets).unwrap_or(false) {
                    return;
                }
                match async_registry::claim(db) {
                    Some(again) => slot = again,
                    None => return,
                }
                (Duration::ZERO, false)
            }
            Err(e) => {
                // The service down or restarting, a model that failed to load: nothing is
                // lost (leases are given back), and the worker tries again.
                pgrx::warning!("embeddinggemma async: {e}; trying again in {backoff:?}");
                let _ = txn(unlease_all);
                worker.model = None;
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                // Writes do not cut a backoff short.
                (wait, false)
            }
        };
        async_registry::set_sleeping(slot, wakeable);
        let deadline = Instant::now() + wait;
        let running = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !BackgroundWorker::wait_latch(Some(left.max(Duration::from_millis(1)))) {
                break false;
            }
            // Woken by a write (only while idle), or the time is up.
            if wakeable || Instant::now() >= deadline {
                break true;
            }
        };
        async_registry::set_sleeping(slot, false);
        if !running {
            // Stopped (pg_terminate_backend, shutdown): exit 1, so it is started again unless
            // the server is shutting down.
            // SAFETY: ends this worker process.
            unsafe { pg_sys::proc_exit(1) };
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: rereads the configuration, as PostgreSQL's own workers do.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
}

fn unlease_all() {
    let (queue, _) = sql_text::extension_table("embeddinggemma_async_queue");
    sql_text::run(&format!("UPDATE {queue} SET leased = false WHERE leased"), &[]);
}
