//! Backfills: embed every row whose vector is NULL (`embeddinggemma_backfill`), or chunk every
//! document that has no chunks (`embeddinggemma_chunk_backfill`), a batch per transaction. The
//! procedures in sql/ only commit between batches; a run's state lives here, in this backend
//! (`run`), and where it stands in the extension's progress table (`progress`).

mod progress;
mod run;

use std::cell::RefCell;

use pgrx::prelude::*;
use pgrx::{pg_sys, PgRelation, PgSqlErrorCode};

use crate::embedding;
use crate::pg::columns::{check_columns, open_checked};
use crate::pg::errors::raise;
use crate::pg::quote::{ident, relation};
use crate::pg::{catalog, quote, rights};
use run::{chunk_settings, Kind, Run};

thread_local! {
    static RUNS: RefCell<Vec<(i64, Run)>> = const { RefCell::new(Vec::new()) };
    static NEXT_RUN: std::cell::Cell<i64> = const { std::cell::Cell::new(1) };
}

fn check_batch_size(batch_size: i32, default: &str) -> i64 {
    if batch_size < 1 {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("embeddinggemma: batch_size must be positive, not {batch_size}"),
            format!("The default, {default}, suits most tables."),
        )
    }
    batch_size as i64
}

fn store(run: Run) -> i64 {
    let id = NEXT_RUN.with(|n| n.replace(n.get() + 1));
    RUNS.with(|runs| {
        let mut runs = runs.borrow_mut();
        // Runs an ERROR cut short stay behind; a session runs one at a time, so a few suffice.
        if runs.len() >= 8 {
            runs.remove(0);
        }
        runs.push((id, run));
    });
    id
}

/// Starts a run (see `Run::start`) and keeps it for its batches: the run's id.
fn begin(
    kind: Kind,
    relation_oid: pg_sys::Oid,
    source: String,
    target: String,
    batch_size: i64,
    on_shards: Option<String>,
) -> i64 {
    store(Run::start(kind, relation_oid, source, target, batch_size, on_shards))
}

/// Whether `relation` has one of the triggers that keep `target` fresh.
fn has_vector_trigger(relation: &PgRelation) -> bool {
    let schema = catalog::extension_schema(c"embeddinggemma");
    // SAFETY: the relation's trigger descriptor (NULL when it has none) and catalog lookups of
    // its triggers' functions.
    unsafe {
        let Some(desc) = relation.trigdesc.as_ref() else { return false };
        std::slice::from_raw_parts(desc.triggers, desc.numtriggers as usize).iter().any(|t| {
            let name = pg_sys::get_func_name(t.tgfoid);
            !name.is_null()
                && [c"embeddinggemma_trigger", c"embeddinggemma_statement_trigger"]
                    .contains(&std::ffi::CStr::from_ptr(name))
                && pg_sys::get_func_namespace(t.tgfoid) == schema
        })
    }
}

#[pg_extern(sql = "")]
fn embeddinggemma_backfill_begin(
    tbl: pg_sys::Oid,
    source: &str,
    target: &str,
    task: &str,
    dim: i32,
    batch_size: i32,
) -> i64 {
    let batch_size = check_batch_size(batch_size, "256");
    let rel = open_checked(tbl);
    check_columns(&rel, source, target, dim);
    rights::require_privilege(tbl, pg_sys::ACL_UPDATE, "backfill");
    embedding::check_request(task, dim);
    if !has_vector_trigger(&rel) {
        let table = catalog::display(tbl);
        let hint = format!(
            "CREATE TRIGGER {} BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger({}, {}, {}, {});",
            ident(&format!("{}_embed", catalog::relation_name(tbl))),
            quote::literal(source),
            quote::literal(target),
            quote::literal(task),
            quote::literal(&dim.to_string()),
        );
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_WARNING,
            format!("embeddinggemma_backfill: no embeddinggemma trigger on {table}: rows whose {source} changes later keep a stale {target}"),
            "embeddinggemma_backfill_begin",
        )
        .set_hint(hint)
        .report(PgLogLevel::WARNING);
    }
    drop(rel);
    let on_shards = crate::pg::citus::is_distributed(tbl).then(|| {
        shard_command(&format!(
            "embeddinggemma_backfill(%L, {}, {}, {}, {dim}, {batch_size})",
            quote::literal(source),
            quote::literal(target),
            quote::literal(task)
        ))
    });
    let kind = Kind::Vectors { source: source.into(), target: target.into(), task: task.into(), dim };
    begin(kind, tbl, source.into(), target.into(), batch_size, on_shards)
}

/// `CALL <extension schema>.<call>` for run_command_on_shards, a format() string: `%L`, the
/// shard's name as a literal; every other `%` escaped.
fn shard_command(call: &str) -> String {
    let schema = catalog::extension_schema(c"embeddinggemma");
    // SAFETY: a catalog lookup of an existing schema's name.
    let schema = unsafe { std::ffi::CStr::from_ptr(pg_sys::get_namespace_name(schema)) }.to_string_lossy().into_owned();
    let (before, after) = call.split_once("%L").expect("a shard placeholder");
    format!(
        "CALL {}.{}%L{}",
        crate::pg::citus::escape_format(&ident(&schema)),
        crate::pg::citus::escape_format(before),
        crate::pg::citus::escape_format(after)
    )
}

#[pg_extern(sql = "")]
fn embeddinggemma_chunk_backfill_begin(tbl: pg_sys::Oid, chunk_table: pg_sys::Oid, batch_size: i32) -> i64 {
    let batch_size = check_batch_size(batch_size, "16");
    open_checked(chunk_table);
    // On a shard (a distributed run's part), the distributed chunk table means its shard here.
    let named = chunk_table;
    let chunk_table = match crate::pg::citus::shard_of(tbl) {
        Some((shard, _)) if crate::pg::citus::is_distributed(chunk_table) => {
            crate::pg::citus::colocated_shard(shard, chunk_table).unwrap_or_else(|why| {
                raise(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    format!("embeddinggemma_chunk_backfill: {why}"),
                    "Distribute the chunk table by the document key, co-located with the documents.",
                )
            })
        }
        _ => chunk_table,
    };
    let kind = Kind::Chunks { chunk_table };
    let s = chunk_settings(tbl, chunk_table);
    rights::require_privilege(chunk_table, pg_sys::ACL_INSERT, "chunk into");
    embedding::check_request(&s.task, s.dim);
    let on_shards = crate::pg::citus::is_distributed(tbl).then(|| {
        shard_command(&format!("embeddinggemma_chunk_backfill(%L, {}, {batch_size})", quote::literal(&relation(named))))
    });
    begin(kind, tbl, s.source, catalog::display(chunk_table), batch_size, on_shards)
}

/// One batch of the run `run` (from `embeddinggemma_*_begin` in this session): the NOTICE to
/// show after it commits, and whether the run is over.
#[pg_extern(sql = "")]
fn embeddinggemma_backfill_batch(run: i64) -> TableIterator<'static, (name!(message, String), name!(finished, bool))> {
    let taken = RUNS.with(|runs| {
        let mut runs = runs.borrow_mut();
        runs.iter().position(|(id, _)| *id == run).map(|i| runs.remove(i).1)
    });
    let Some(mut state) = taken else {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("embeddinggemma: no backfill run {run} in this session"),
            "CALL embeddinggemma_backfill(…) or embeddinggemma_chunk_backfill(…): they start a run and do its batches.",
        )
    };
    state.batch();
    let standing = state.standing();
    state.key.record(&standing);
    let message = state.message(&standing);
    let finished = state.finished;
    if !finished {
        // Back only once the batch went well: an ERROR leaves no half-updated state.
        RUNS.with(|runs| runs.borrow_mut().push((run, state)));
    }
    TableIterator::once((message, finished))
}
