//! Asynchronous targets (sql/: `embeddinggemma_async*`) once registered (`register`): finding,
//! waiting for, re-embedding and dropping them; following DDL the utility hook sees (a source
//! column retyped, a partition attached); waking the worker. The extension's tables are written
//! with their owner's rights.

use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};

use super::registry;
use crate::embedding::service_state;
use crate::pg::errors::raise;
use crate::pg::interrupts;
use crate::pg::quote::{ident, relation};
use crate::pg::spi::{param, text_param};
use crate::pg::{catalog, quote, rights, spi};
use crate::write::chunk_settings::resolve_chunk_table;

pub(super) fn targets_table() -> (String, pg_sys::Oid) {
    catalog::extension_table("embeddinggemma_async_targets")
}

pub(super) fn queue_table() -> (String, pg_sys::Oid) {
    catalog::extension_table("embeddinggemma_async_queue")
}

/// The targets table's statement trigger: a registration or a restore wakes the worker.
#[pg_trigger(sql = "")]
fn embeddinggemma_async_wake<'a>(
    _trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>, pgrx::PgTriggerError> {
    if service_state::preloaded() {
        ensure_worker();
    }
    Ok(None)
}

/// Once this transaction commits, wakes this database's worker, or asks the launcher for one.
pub fn ensure_worker() {
    // SAFETY: this backend's database.
    let db = unsafe { pg_sys::MyDatabaseId };
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, move || registry::wake(db));
}

pub(super) fn trigger_name(id: i32) -> String {
    format!("embeddinggemma_async_{id}")
}

/// The target `name` (a vector column, or a chunk table) of `tbl`: its id and trigger.
fn find(tbl: pg_sys::Oid, name: &str) -> i32 {
    let (targets, owner) = targets_table();
    // A chunk target is named by its table, in the caller's terms or as registered.
    let chunk_name = resolve_chunk_table(tbl, name).map(catalog::display);
    let sql = format!(
        "SELECT id FROM {targets} WHERE relation OPERATOR(pg_catalog.=) $1
            AND (target OPERATOR(pg_catalog.=) $2 OR target OPERATOR(pg_catalog.=) $3)"
    );
    let args = [param(tbl, pg_sys::REGCLASSOID), text_param(name.to_string()), text_param(chunk_name)];
    rights::as_role(owner, || spi::one::<i32>(&sql, &args)).unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("embeddinggemma: {} has no asynchronous target {name}", catalog::display(tbl)),
            "SELECT table_name, target FROM embeddinggemma_async_status lists them.",
        )
    })
}

/// Whether the target `id` has rows not yet embedded (nor failed for good), or rows present at
/// registration still being queued. (EXISTS, not a count: waiters poll it beside the drain.)
fn pending(id: i32) -> bool {
    let (targets, owner) = targets_table();
    let (queue, _) = queue_table();
    let sql = format!(
        "SELECT t.scanning OR EXISTS (SELECT FROM {queue} q WHERE q.target_id OPERATOR(pg_catalog.=) t.id
                                        AND q.attempts OPERATOR(pg_catalog.<) t.max_attempts)
           FROM {targets} t WHERE t.id OPERATOR(pg_catalog.=) $1"
    );
    rights::as_role(owner, || spi::one::<bool>(&sql, &[text_param(id)])).unwrap_or(false)
}

#[pg_extern(sql = "")]
fn embeddinggemma_async_wait(tbl: pg_sys::Oid, target: &str, timeout: pgrx::datum::Interval) -> bool {
    rights::require_privilege(tbl, pg_sys::ACL_SELECT, "read");
    let id = find(tbl, target);
    let micros = timeout.as_micros();
    let deadline = Instant::now() + Duration::from_micros(micros.max(0) as u64);
    let _event = interrupts::WaitEvent::start();
    // SAFETY: this backend's database.
    registry::wake(unsafe { pg_sys::MyDatabaseId });
    let mut pause = Duration::from_millis(10);
    loop {
        if !pending(id) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        // Soon after a write, rarely during a long drain.
        pause = (pause * 2).min(Duration::from_millis(250));
        std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
        interrupts::serve_interrupts();
    }
}

#[pg_extern(sql = "")]
fn embeddinggemma_async_reembed(tbl: pg_sys::Oid, target: &str) {
    rights::require_owner(tbl, "re-embed it");
    requeue(find(tbl, target));
}

/// Queues every row of target `id` again (its vectors are then all its own).
fn requeue(id: i32) {
    let (targets, owner) = targets_table();
    let (queue, _) = queue_table();
    rights::as_role(owner, || {
        spi::run(
            &format!(
                "UPDATE {targets} SET scanning = true, scan_all = true, scan_after = NULL, model = NULL, kept_existing = false
                  WHERE id OPERATOR(pg_catalog.=) $1"
            ),
            &[text_param(id)],
        );
        spi::run(
            &format!("UPDATE {queue} SET attempts = 0, not_before = NULL WHERE target_id OPERATOR(pg_catalog.=) $1"),
            &[text_param(id)],
        );
    });
    ensure_worker();
}

/// After `ALTER TABLE relation ALTER COLUMN column TYPE …` (the utility hook): `USING` may have
/// rewritten the texts without firing the trigger, so targets embedding that column embed every
/// row again.
pub fn source_retyped(relation: pg_sys::Oid, column: &str) {
    if !catalog::extension_installed(c"embeddinggemma") {
        return;
    }
    let (targets, owner) = targets_table();
    let sql = format!("SELECT pg_catalog.array_agg(id) FROM {targets} WHERE relation OPERATOR(pg_catalog.=) $1 AND source OPERATOR(pg_catalog.=) $2");
    let args = [param(relation, pg_sys::REGCLASSOID), text_param(column.to_string())];
    let ids = rights::as_role(owner, || spi::one::<Vec<i32>>(&sql, &args)).unwrap_or_default();
    for id in ids {
        requeue(id);
        pgrx::notice!(
            "embeddinggemma: column \"{column}\" of {} was retyped: asynchronous target {id} embeds its rows again",
            catalog::display(relation)
        );
    }
}

/// After `ALTER TABLE … ATTACH PARTITION partition`: its rows were written without the
/// target's trigger, so each target covering it scans again for rows without a vector (or
/// without chunks). Vectors the partition brought are kept, and the status view then names no
/// model for the target, as with `keep_existing`.
pub fn partition_attached(partition: pg_sys::Oid) {
    if !catalog::extension_installed(c"embeddinggemma") {
        return;
    }
    let (targets, owner) = targets_table();
    let sql = format!(
        "SELECT id, target, relation::pg_catalog.oid, chunk_table::pg_catalog.oid FROM {targets}
          WHERE relation::pg_catalog.oid OPERATOR(pg_catalog.=) ANY (SELECT relid FROM pg_catalog.pg_partition_ancestors($1))"
    );
    type Found = (i32, Option<String>, pg_sys::Oid, Option<pg_sys::Oid>);
    let found: Vec<Found> = rights::as_role(owner, || {
        pgrx::spi::Spi::connect(|c| {
            let rows = c.select(&sql, None, &[param(partition, pg_sys::REGCLASSOID)])?;
            rows.map(|r| {
                Ok((
                    r.get::<i32>(1)?.unwrap_or_default(),
                    r.get::<String>(2)?,
                    r.get(3)?.unwrap_or_default(),
                    r.get(4)?,
                ))
            })
            .collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
        })
        .expect("SPI reports errors as ERRORs")
    });
    for (id, target, relation, chunk_table) in found {
        // The worker would write the partition's rows as the target table's owner.
        super::owner::require_one_owner(relation, chunk_table);
        // Read as the role attaching the partition (it owns the partition).
        let brought = target.is_some_and(|v| {
            let sql = format!(
                "SELECT EXISTS (SELECT FROM {} d WHERE d.{} IS NOT NULL)",
                quote::table_rows(partition),
                ident(&v)
            );
            spi::one::<bool>(&sql, &[]) == Some(true)
        });
        rights::as_role(owner, || {
            spi::run(
                &format!(
                    "UPDATE {targets} SET scanning = true, scan_after = NULL, model = CASE WHEN $2 THEN NULL ELSE model END, kept_existing = kept_existing OR $2
                      WHERE id OPERATOR(pg_catalog.=) $1"
                ),
                &[text_param(id), text_param(brought)],
            )
        });
        ensure_worker();
        pgrx::notice!(
            "embeddinggemma: partition {} attached: asynchronous target {id} queues its rows",
            catalog::display(partition)
        );
    }
}

#[pg_extern(sql = "")]
fn embeddinggemma_async_drop(tbl: pg_sys::Oid, target: &str) {
    rights::require_owner(tbl, "drop its asynchronous target");
    let id = find(tbl, target);
    spi::run(&format!("DROP TRIGGER IF EXISTS {} ON {}", ident(&trigger_name(id)), relation(tbl)), &[]);
    let (targets, owner) = targets_table();
    let (queue, _) = queue_table();
    rights::as_role(owner, || {
        spi::run(&format!("DELETE FROM {targets} WHERE id OPERATOR(pg_catalog.=) $1"), &[text_param(id)]);
        spi::run(&format!("DELETE FROM {queue} WHERE target_id OPERATOR(pg_catalog.=) $1"), &[text_param(id)]);
    });
    super::trigger::forget(id);
}
