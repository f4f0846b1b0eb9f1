//! Registering an asynchronous target (`embeddinggemma_async_register`, `_async_chunks`, and
//! 0.4.0's `embeddinggemma_async`): the checks of its table, columns, task and dimension, its
//! row in the targets table, and its trigger.

use pgrx::prelude::*;
use pgrx::{pg_sys, PgRelation, PgSqlErrorCode};

use super::targets::{ensure_worker, targets_table, trigger_name};
use crate::embedding::{self, service_state};
use crate::pg::columns::{check_columns, check_key, open_checked, KeyColumn};
use crate::pg::errors::raise;
use crate::pg::quote::{ident, relation};
use crate::pg::spi::{param, text_param};
use crate::pg::{catalog, quote, rights, spi};
use crate::write::chunk_settings::ChunkSettings;

pub(super) fn require_service() {
    if !service_state::preloaded() {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "embeddinggemma: asynchronous targets need the extension's background workers",
            "Add embeddinggemma to shared_preload_libraries and restart the server.",
        )
    }
}

/// Refuses a task or dimension the serving model does not have (the service checks requests
/// only when they come, which for a target is in the worker, row after row).
fn check_task_and_dim(task: &str, dim: i32) {
    embedding::check_request(task, dim);
    // While the service still loads its model, the worker checks each request instead.
    let Some(model) = crate::pg::subtransaction::try_in_subtransaction(embedding::info) else { return };
    if task != "none" && !model.tasks.iter().any(|t| t == task) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("embeddinggemma: unknown task \"{task}\""),
            format!("The model's tasks are {}, or none.", model.tasks.join(", ")),
        )
    }
    if !model.dims.contains(&dim) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("embeddinggemma: the model has no dimension {dim}"),
            format!("Pass one of {:?}.", model.dims),
        )
    }
}

/// Refuses to register while the extension's SQL is older than its library (the tables a
/// target is recorded in change between versions).
fn require_current_sql() {
    let sql = "SELECT extversion FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'embeddinggemma'";
    let version = spi::one::<String>(sql, &[]).unwrap_or_default();
    if version != env!("CARGO_PKG_VERSION") {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "embeddinggemma: the extension is at version {version}, its library at {}",
                env!("CARGO_PKG_VERSION")
            ),
            "ALTER EXTENSION embeddinggemma UPDATE first.",
        )
    }
}

fn has_children(oid: pg_sys::Oid) -> bool {
    let sql = "SELECT EXISTS (SELECT FROM pg_catalog.pg_inherits WHERE inhparent OPERATOR(pg_catalog.=) $1)";
    spi::one::<bool>(sql, &[param(oid, pg_sys::OIDOID)]) == Some(true)
}

/// Refuses a relation a target cannot follow: only a plain or partitioned permanent table has
/// rows the worker can find again by key.
fn check_plain_table(rel: &PgRelation) {
    // SAFETY: an open relation's catalog entry.
    let (kind, persistence) = unsafe { ((*rel.rd_rel).relkind, (*rel.rd_rel).relpersistence) };
    let partitioned = kind == pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char;
    let refusal = if kind != pg_sys::RELKIND_RELATION as std::ffi::c_char && !partitioned {
        Some("not a table (a view, foreign table, materialized view or sequence); register the table it reads")
    } else if persistence == pg_sys::RELPERSISTENCE_TEMP as std::ffi::c_char {
        Some("a temporary table, which the background worker cannot see; use embeddinggemma_trigger() for it")
    } else if !partitioned && has_children(rel.oid()) {
        Some("a table with inheritance children, whose rows its trigger does not see; register each child")
    } else {
        None
    };
    if let Some(why) = refusal {
        let (what, hint) = why.split_once("; ").expect("two parts");
        raise(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!(
                "embeddinggemma: {} is {what}: asynchronous targets are for plain and partitioned tables",
                catalog::display(rel.oid())
            ),
            format!("{}{}.", hint[..1].to_uppercase(), &hint[1..]),
        )
    }
}

/// Records a target, installs its trigger, starts the worker.
#[allow(clippy::too_many_arguments)]
fn register(
    rel: &PgRelation,
    key: &KeyColumn,
    source: &str,
    target: &str,
    chunks: Option<&ChunkSettings>,
    task: &str,
    dim: i32,
    keep_stale: bool,
    keep_existing: bool,
) -> i32 {
    check_plain_table(rel);
    require_current_sql();
    super::owner::require_one_owner(rel.oid(), chunks.map(|c| c.chunk_table));
    // The queue and the targets live in each node's own tables; a distributed table's rows are
    // written on the workers, whose triggers would not find a target registered here.
    if crate::pg::citus::is_distributed(rel.oid()) || crate::pg::citus::shard_of(rel.oid()).is_some() {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("embeddinggemma: asynchronous targets on a Citus distributed table ({}) are not supported", catalog::display(rel.oid())),
            "Keep the vectors in step with embeddinggemma_trigger (it runs on the workers, each with its own service), or fill them with UPDATE … SET v = embed(body) or CALL embeddinggemma_backfill(…) from the coordinator.",
        );
    }
    let (targets, owner) = targets_table();
    let sql = format!(
        "INSERT INTO {targets} (relation, key_column, source, target, chunk_table, chunk_key, task, dim, max_tokens, overlap, keep_stale, scan_all, kept_existing)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, NOT $12, $12) RETURNING id"
    );
    // The targets table's own trigger numbers the columns from their names (follow.rs follows
    // them by number), for a registration as for a restore.
    let args = [
        param(rel.oid(), pg_sys::REGCLASSOID),
        text_param(key.name.clone()),
        text_param(source.to_string()),
        text_param(target.to_string()),
        param(chunks.map(|c| c.chunk_table), pg_sys::REGCLASSOID),
        text_param(chunks.map(|c| c.chunk_key.clone())),
        text_param(task.to_string()),
        text_param(dim),
        text_param(chunks.map(|c| c.max_tokens)),
        text_param(chunks.map(|c| c.overlap)),
        text_param(keep_stale),
        text_param(keep_existing),
    ];
    // One target per column: a target on a partition and one on its parent would both write
    // the same column, each with its own task.
    let mut related = crate::pg::catalog::family(rel.oid());
    related.extend(
        spi::one::<Vec<pg_sys::Oid>>(
            "SELECT pg_catalog.array_agg(relid::pg_catalog.oid) FROM pg_catalog.pg_partition_ancestors($1)",
            &[param(rel.oid(), pg_sys::REGCLASSOID)],
        )
        .unwrap_or_default(),
    );
    let exists = format!(
        "SELECT relation::pg_catalog.oid FROM {targets}
          WHERE relation::pg_catalog.oid OPERATOR(pg_catalog.=) ANY ($1) AND target OPERATOR(pg_catalog.=) $2 LIMIT 1"
    );
    let same = [text_param(related), text_param(target.to_string())];
    if let Some(holder) = rights::as_role(owner, || spi::one::<pg_sys::Oid>(&exists, &same)) {
        raise(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            if holder == rel.oid() {
                format!("embeddinggemma: {} already has an asynchronous target {target}", catalog::display(holder))
            } else {
                format!(
                    "embeddinggemma: an asynchronous target on {} already writes column {target} of rows of {}",
                    catalog::display(holder),
                    catalog::display(rel.oid())
                )
            },
            format!(
                "SELECT embeddinggemma_async_drop({}, {}) first to register it anew.",
                quote::literal(&catalog::display(holder)),
                quote::literal(target)
            ),
        )
    }
    let id = rights::as_role(owner, || spi::one::<i32>(&sql, &args)).expect("INSERT … RETURNING gives the id");
    // The trigger is the owner's, on their table, calling the extension's function by its
    // schema.
    let schema = catalog::extension_schema(c"embeddinggemma");
    let function = format!("{}.embeddinggemma_async_trigger", ident(&catalog::schema_name(schema)));
    spi::run(
        &format!(
            "CREATE TRIGGER {} BEFORE INSERT OR UPDATE{} ON {} FOR EACH ROW EXECUTE FUNCTION {function}({})",
            ident(&trigger_name(id)),
            if chunks.is_some() { " OR DELETE" } else { "" },
            relation(rel.oid()),
            quote::literal(&id.to_string())
        ),
        &[],
    );
    ensure_worker();
    id
}

// The relation's primary key index, if any (InvalidOid otherwise); PostgreSQL 18 added the
// deferrable_ok argument (a deferrable key is no key for us; before 18 none is returned).
#[cfg(not(any(feature = "pg15", feature = "pg16", feature = "pg17")))]
fn primary_key_index(rel: &PgRelation) -> pg_sys::Oid {
    // SAFETY: an open relation.
    unsafe { pg_sys::RelationGetPrimaryKeyIndex(rel.as_ptr(), false) }
}
#[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
fn primary_key_index(rel: &PgRelation) -> pg_sys::Oid {
    // SAFETY: an open relation.
    unsafe { pg_sys::RelationGetPrimaryKeyIndex(rel.as_ptr()) }
}

fn default_key(rel: &PgRelation) -> String {
    let index = primary_key_index(rel);
    let key = (index != pg_sys::InvalidOid).then(|| {
        // SAFETY: an existing index, opened to read its key column.
        let idx = unsafe { PgRelation::open(index) };
        let attno = unsafe { (*idx.rd_index).indkey.values.as_slice(1)[0] };
        rel.tuple_desc().iter().find(|a| a.attnum == attno).map(|a| a.name().to_string())
    });
    key.flatten().unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_OBJECT_DEFINITION,
            format!("embeddinggemma: table {} has no primary key", catalog::display(rel.oid())),
            "Name a NOT NULL column with a unique index of its own as key => '…', or add a primary key.",
        )
    })
}

/// 0.4.0's entry point (its SQL calls it with seven arguments): with 0.4.0's SQL installed,
/// registration is refused with the hint to update.
#[pg_extern(sql = "")]
fn embeddinggemma_async(
    tbl: pg_sys::Oid,
    source: &str,
    target: &str,
    task: &str,
    dim: i32,
    key: Option<&str>,
    keep_stale: Option<bool>,
) -> i32 {
    embeddinggemma_async_register(tbl, source, target, task, dim, key, keep_stale, None)
}

#[pg_extern(sql = "")]
#[allow(clippy::too_many_arguments)]
fn embeddinggemma_async_register(
    tbl: pg_sys::Oid,
    source: &str,
    target: &str,
    task: &str,
    dim: i32,
    key: Option<&str>,
    keep_stale: Option<bool>,
    keep_existing: Option<bool>,
) -> i32 {
    require_service();
    let rel = open_checked(tbl);
    rights::require_owner(tbl, "embed it asynchronously");
    check_columns(&rel, source, target, dim);
    let key = key.map(str::to_string).unwrap_or_else(|| default_key(&rel));
    let key = check_key(&rel, &key);
    check_task_and_dim(task, dim);
    register(&rel, &key, source, target, None, task, dim, keep_stale.unwrap_or(false), keep_existing.unwrap_or(false))
}

#[pg_extern(sql = "")]
#[allow(clippy::too_many_arguments)]
fn embeddinggemma_async_chunks(
    tbl: pg_sys::Oid,
    chunk_table: pg_sys::Oid,
    key: Option<&str>,
    chunk_key: Option<&str>,
    source: Option<&str>,
    max_tokens: Option<i32>,
    overlap: Option<i32>,
    task: Option<&str>,
    dim: Option<i32>,
) -> i32 {
    require_service();
    let rel = open_checked(tbl);
    rights::require_owner(tbl, "embed it asynchronously");
    rights::require_owner(chunk_table, "fill it asynchronously");
    let key = key.map(str::to_string).unwrap_or_else(|| default_key(&rel));
    let (task, dim) = (task.unwrap_or("document"), dim.unwrap_or(768));
    let cut = (max_tokens.unwrap_or(512), overlap.unwrap_or(64));
    let settings = ChunkSettings::check(
        &rel,
        &key,
        source.unwrap_or("body"),
        chunk_table,
        chunk_key.unwrap_or("doc_id"),
        cut,
        task,
        dim,
    );
    check_task_and_dim(task, dim);
    // The chunk settings are checked as the chunk trigger checks them, cutting included.
    crate::embedding::chunking::Cut::new(cut.0, cut.1, task);
    register(
        &rel,
        &settings.key,
        &settings.source,
        &catalog::display(chunk_table),
        Some(&settings),
        task,
        dim,
        true,
        false,
    )
}
