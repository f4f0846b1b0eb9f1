//! The worker's side of the queue: leases on entries (claimed for a batch), given back,
//! removed once written, or recorded as a failed attempt. Every entry a claim leases is either
//! processed by its batch or given back: none stays leased.
//!
//! An entry leased when the worker starts was in hand when the previous worker stopped without
//! finishing (a crash, an immediate shutdown). It is marked `interrupted` and embedded alone
//! next; an entry that was in hand at two such stops is kept apart as failed, so a row that
//! kills the worker cannot do it again and again.

use pgrx::pg_sys;

use crate::pg::spi::text_param;
use crate::pg::{catalog, spi};

/// Entries one claim leases, at most: enough for the service to fill its passes.
const CLAIM_ENTRIES: i64 = 1024;
/// Key bytes one claim leases, at most (beyond the first entry).
const CLAIM_KEY_BYTES: i64 = 8 << 20;

fn queue() -> String {
    catalog::extension_table("embeddinggemma_async_queue").0
}

fn targets() -> String {
    catalog::extension_table("embeddinggemma_async_targets").0
}

/// A queue entry claimed for a batch.
pub struct Claimed {
    pub id: i64,
    /// The key as the writer's session printed it, or (rows queued by the worker's scan, or
    /// before 0.5.0) as the worker prints it.
    pub key: String,
    /// The key as its type's send function wrote it, when the trigger queued it, and that type.
    pub bytes: Option<(Vec<u8>, pg_sys::Oid)>,
}

fn claimed(r: &pgrx::spi::SpiHeapTupleData, first: usize) -> Result<Claimed, pgrx::spi::SpiError> {
    let bytes: Option<Vec<u8>> = r.get(first + 2)?;
    let key_type: Option<pg_sys::Oid> = r.get(first + 3)?;
    Ok(Claimed {
        id: r.get(first)?.unwrap_or_default(),
        key: r.get(first + 1)?.unwrap_or_default(),
        bytes: bytes.zip(key_type),
    })
}

fn leased(sql: &str, args: &[pgrx::datum::DatumWithOid]) -> Vec<Claimed> {
    pgrx::spi::Spi::connect_mut(|c| {
        let rows = c.update(sql, None, args)?;
        rows.map(|r| claimed(&r, 1)).collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
    })
    .expect("SPI reports errors as ERRORs")
}

/// Leases the next entries of target `id` that are due: at most `CLAIM_ENTRIES`, and
/// `CLAIM_KEY_BYTES` of keys.
pub fn claim(id: i32, max_attempts: i32) -> Vec<Claimed> {
    let queue = queue();
    let sql = format!(
        "UPDATE {queue} SET leased = true, last_attempt = pg_catalog.now()
          WHERE id OPERATOR(pg_catalog.=) ANY (ARRAY(
                SELECT x.id FROM (
                  SELECT q.id, pg_catalog.row_number() OVER w AS n,
                         pg_catalog.sum(pg_catalog.octet_length(q.key)) OVER w AS bytes
                    FROM {queue} q
                   WHERE q.target_id OPERATOR(pg_catalog.=) $1 AND NOT q.leased AND q.interrupted OPERATOR(pg_catalog.=) 0
                     AND q.attempts OPERATOR(pg_catalog.<) $2
                     AND (q.not_before IS NULL OR q.not_before OPERATOR(pg_catalog.<=) pg_catalog.now())
                  WINDOW w AS (ORDER BY q.id)
                   ORDER BY q.id LIMIT {CLAIM_ENTRIES}) x
                 WHERE x.n OPERATOR(pg_catalog.=) 1 OR x.bytes OPERATOR(pg_catalog.<=) {CLAIM_KEY_BYTES}))
         RETURNING id, key, key_bytes, key_type"
    );
    leased(&sql, &[text_param(id), text_param(max_attempts)])
}

/// Leases one entry that was in hand when a worker stopped, of the targets `ids`, if any:
/// (its target, the entry).
pub fn claim_interrupted(ids: &[i32]) -> Option<(i32, Claimed)> {
    let (queue, targets) = (queue(), targets());
    let sql = format!(
        "UPDATE {queue} SET leased = true, last_attempt = pg_catalog.now()
          WHERE id OPERATOR(pg_catalog.=) (
                SELECT q.id FROM {queue} q JOIN {targets} t ON t.id OPERATOR(pg_catalog.=) q.target_id
                 WHERE q.target_id OPERATOR(pg_catalog.=) ANY ($1) AND NOT q.leased AND q.interrupted OPERATOR(pg_catalog.>) 0
                   AND q.attempts OPERATOR(pg_catalog.<) t.max_attempts
                 ORDER BY q.id LIMIT 1)
         RETURNING target_id, id, key, key_bytes, key_type"
    );
    pgrx::spi::Spi::connect_mut(|c| {
        let rows = c.update(sql.as_str(), None, &[text_param(ids.to_vec())])?;
        let Some(r) = rows.into_iter().next() else { return Ok(None) };
        Ok::<_, pgrx::spi::SpiError>(Some((r.get(1)?.unwrap_or_default(), claimed(&r, 2)?)))
    })
    .expect("SPI reports errors as ERRORs")
}

/// Gives leases back untouched (no attempt counted): entries a batch left for later.
pub fn give_back(ids: &[i64]) {
    if !ids.is_empty() {
        spi::run(
            &format!("UPDATE {} SET leased = false WHERE id OPERATOR(pg_catalog.=) ANY ($1)", queue()),
            &[text_param(ids.to_vec())],
        );
    }
}

/// Every lease given back (the service down: nothing was tried).
pub fn give_back_all() {
    spi::run(&format!("UPDATE {} SET leased = false WHERE leased", queue()), &[]);
}

pub fn remove(ids: &[i64]) {
    spi::run(&format!("DELETE FROM {} WHERE id OPERATOR(pg_catalog.=) ANY ($1)", queue()), &[text_param(ids.to_vec())]);
}

/// A failed attempt: tried again after 1, 2, 4, … seconds, until the target's limit.
pub fn failed(ids: &[i64], error: &str) {
    spi::run(
        &format!(
            "UPDATE {} SET leased = false, attempts = attempts OPERATOR(pg_catalog.+) 1, last_error = $2,
                    not_before = pg_catalog.now() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => pg_catalog.power(2, attempts)::pg_catalog.float8)
              WHERE id OPERATOR(pg_catalog.=) ANY ($1)",
            queue()
        ),
        &[text_param(ids.to_vec()), text_param(error.to_string())],
    );
}

/// Failed for good at once (the row cannot be processed however often it is tried).
pub fn refused(ids: &[i64], error: &str) {
    spi::run(
        &format!(
            "UPDATE {} q SET leased = false, last_error = $2,
                    attempts = (SELECT t.max_attempts FROM {} t WHERE t.id OPERATOR(pg_catalog.=) q.target_id)
              WHERE q.id OPERATOR(pg_catalog.=) ANY ($1)",
            queue(),
            targets()
        ),
        &[text_param(ids.to_vec()), text_param(error.to_string())],
    );
}

/// At a worker's start: entries leased by a worker that stopped mid-batch are marked
/// interrupted (embedded alone next); those interrupted before are kept apart as failed.
pub fn recover_interrupted() {
    let (queue, targets) = (queue(), targets());
    spi::run(
        &format!(
            "UPDATE {queue} q SET leased = false, interrupted = q.interrupted OPERATOR(pg_catalog.+) 1,
                    attempts = CASE WHEN q.interrupted OPERATOR(pg_catalog.>) 0
                                    THEN (SELECT t.max_attempts FROM {targets} t WHERE t.id OPERATOR(pg_catalog.=) q.target_id)
                                    ELSE q.attempts END,
                    last_error = CASE WHEN q.interrupted OPERATOR(pg_catalog.>) 0
                                      THEN 'the asynchronous worker stopped twice while embedding this row (a crash, or an immediate shutdown): it is kept apart; embeddinggemma_async_reembed() queues it again'
                                      ELSE q.last_error END
              WHERE q.leased"
        ),
        &[],
    );
}

/// Seconds until the earliest entry waiting for a retry is due (None: no entry waits), of
/// targets with rows still to try.
pub fn next_retry_in() -> Option<f64> {
    let (queue, targets) = (queue(), targets());
    spi::one::<f64>(
        &format!(
            "SELECT pg_catalog.date_part('epoch', pg_catalog.min(q.not_before) OPERATOR(pg_catalog.-) pg_catalog.now())
               FROM {queue} q JOIN {targets} t ON t.id OPERATOR(pg_catalog.=) q.target_id
              WHERE NOT q.leased AND q.attempts OPERATOR(pg_catalog.<) t.max_attempts"
        ),
        &[],
    )
}

/// Whether any entry could be claimed now (or a target is being scanned).
pub fn work_due() -> bool {
    let (queue, targets) = (queue(), targets());
    spi::one::<bool>(
        &format!(
            "SELECT EXISTS (SELECT FROM {targets} WHERE scanning)
                 OR EXISTS (SELECT FROM {queue} q JOIN {targets} t ON t.id OPERATOR(pg_catalog.=) q.target_id
                             WHERE NOT q.leased AND q.attempts OPERATOR(pg_catalog.<) t.max_attempts
                               AND (q.not_before IS NULL OR q.not_before OPERATOR(pg_catalog.<=) pg_catalog.now()))"
        ),
        &[],
    ) == Some(true)
}
