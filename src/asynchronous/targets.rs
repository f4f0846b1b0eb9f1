//! Asynchronous targets (sql/: `embeddinggemma_async*`): registering, waiting, re-embedding and
//! dropping them, and the trigger that records a changed row in the queue. The write path only
//! records; `async_worker` embeds. The extension's tables are written with their owner's rights,
//! for the table the trigger fires on only.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::{pg_sys, PgRelation, PgSqlErrorCode, PgTupleDesc};

use super::registry;
use crate::chunk_trigger::{resolve_chunk_table, ChunkSettings};
use crate::columns::{
    check_columns, check_key, key_binary, key_column, key_text, open_checked, source_text, KeyColumn, SourceColumn,
};
use crate::errors::raise;
use crate::sql_text::{self, ident, param, relation, text_param};
use crate::{routing, service_state, worker};

/// What the trigger needs of a target, cached per backend (a rename is followed by the names
/// stored again; dropping a target drops its trigger; the cache is keyed by the targets table,
/// which DROP and CREATE EXTENSION replace while target ids start again at 1).
#[derive(Clone)]
struct TriggerTarget {
    /// The targets table it was read from.
    registry: pg_sys::Oid,
    relation: pg_sys::Oid,
    key: String,
    source: String,
    /// None for a chunk target.
    target: Option<String>,
    keep_stale: bool,
    columns: Option<Columns>,
}

/// Where a target's columns are in its table, and their types when resolved.
#[derive(Clone)]
struct Columns {
    source: SourceColumn,
    source_type: pg_sys::Oid,
    key: KeyColumn,
    /// A vector target's column number and type (None for a chunk target, or when the column
    /// is gone: the trigger raises only if it must clear it, as before).
    target: Option<(usize, pg_sys::Oid)>,
}

thread_local! {
    static TARGETS: RefCell<HashMap<i32, TriggerTarget>> = RefCell::new(HashMap::new());
}

fn targets_table() -> (String, pg_sys::Oid) {
    sql_text::extension_table("embeddinggemma_async_targets")
}

fn queue_table() -> (String, pg_sys::Oid) {
    sql_text::extension_table("embeddinggemma_async_queue")
}

fn require_service() {
    if !service_state::preloaded() {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "embeddinggemma: asynchronous targets need the extension's background workers",
            "Add embeddinggemma to shared_preload_libraries and restart the server.",
        )
    }
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

thread_local! {
    /// The transaction whose commit already wakes the worker.
    static WAKING: std::cell::Cell<pg_sys::TransactionId> = const { std::cell::Cell::new(pg_sys::InvalidTransactionId) };
}

/// `ensure_worker`, once per transaction: the trigger calls it per queued row, and the worker
/// is woken when the rows can be seen, at commit.
fn wake_at_commit() {
    // SAFETY: this transaction's id (the queue insert that follows needs one anyway).
    let xid = unsafe { pg_sys::GetTopTransactionId() };
    if WAKING.replace(xid) != xid {
        ensure_worker();
    }
}

/// Refuses a task or dimension the serving model does not have (the service checks requests
/// only when they come, which for a target is in the worker, row after row).
fn check_task_and_dim(task: &str, dim: i32) {
    routing::check_request(task, dim);
    // While the service still loads its model, the worker checks each request instead.
    let Some(model) = PgTryBuilder::new(|| Some(routing::info())).catch_others(|_| None).execute() else { return };
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
    let version = sql_text::one::<String>(sql, &[]).unwrap_or_default();
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
    sql_text::one::<bool>(sql, &[param(oid, pg_sys::OIDOID)]) == Some(true)
}

/// Whether a trigger firing on `relid` serves a target on `relation`: the same table, or one of
/// its partitions (the trigger on a partitioned table is cloned to each, present and future).
fn covers(relation: pg_sys::Oid, relid: pg_sys::Oid) -> bool {
    if relation == relid {
        return true;
    }
    let sql =
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_partition_ancestors($1) a WHERE a.relid OPERATOR(pg_catalog.=) $2)";
    sql_text::one::<bool>(sql, &[param(relid, pg_sys::REGCLASSOID), param(relation, pg_sys::REGCLASSOID)]) == Some(true)
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
                sql_text::display(rel.oid())
            ),
            format!("{}{}.", hint[..1].to_uppercase(), &hint[1..]),
        )
    }
}

fn trigger_name(id: i32) -> String {
    format!("embeddinggemma_async_{id}")
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
    // The queue and the targets live in each node's own tables; a distributed table's rows are
    // written on the workers, whose triggers would not find a target registered here.
    if crate::citus::is_distributed(rel.oid()) || crate::citus::shard_of(rel.oid()).is_some() {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("embeddinggemma: asynchronous targets on a Citus distributed table ({}) are not supported", sql_text::display(rel.oid())),
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
    let exists = format!("SELECT EXISTS (SELECT FROM {targets} WHERE relation OPERATOR(pg_catalog.=) $1 AND target OPERATOR(pg_catalog.=) $2)");
    let same = [param(rel.oid(), pg_sys::REGCLASSOID), text_param(target.to_string())];
    let taken = sql_text::as_role(owner, || sql_text::one::<bool>(&exists, &same));
    if taken == Some(true) {
        raise(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("embeddinggemma: {} already has an asynchronous target {target}", sql_text::display(rel.oid())),
            format!(
                "SELECT embeddinggemma_async_drop({}, {}) first to register it anew.",
                sql_text::literal(&sql_text::display(rel.oid())),
                sql_text::literal(target)
            ),
        )
    }
    let id = sql_text::as_role(owner, || sql_text::one::<i32>(&sql, &args)).expect("INSERT … RETURNING gives the id");
    // The trigger is the owner's, on their table, calling the extension's function by its
    // schema.
    let schema = sql_text::extension_schema(c"embeddinggemma");
    let function = format!("{}.embeddinggemma_async_trigger", ident(&sql_text::schema_name(schema)));
    sql_text::run(
        &format!(
            "CREATE TRIGGER {} BEFORE INSERT OR UPDATE{} ON {} FOR EACH ROW EXECUTE FUNCTION {function}({})",
            ident(&trigger_name(id)),
            if chunks.is_some() { " OR DELETE" } else { "" },
            relation(rel.oid()),
            sql_text::literal(&id.to_string())
        ),
        &[],
    );
    ensure_worker();
    id
}

// The relation's primary key index, if any (InvalidOid otherwise); PostgreSQL 17 added the
// deferrable_ok argument (a deferrable key is no key for us).
#[cfg(not(any(feature = "pg15", feature = "pg16")))]
fn primary_key_index(rel: &PgRelation) -> pg_sys::Oid {
    // SAFETY: an open relation.
    unsafe { pg_sys::RelationGetPrimaryKeyIndex(rel.as_ptr(), false) }
}
#[cfg(any(feature = "pg15", feature = "pg16"))]
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
            format!("embeddinggemma: table {} has no primary key", sql_text::display(rel.oid())),
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
    sql_text::require_owner(tbl, "embed it asynchronously");
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
    sql_text::require_owner(tbl, "embed it asynchronously");
    sql_text::require_owner(chunk_table, "fill it asynchronously");
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
    crate::chunks::Cut::new(cut.0, cut.1, task);
    register(
        &rel,
        &settings.key,
        &settings.source,
        &sql_text::display(chunk_table),
        Some(&settings),
        task,
        dim,
        true,
        false,
    )
}

/// The target `name` (a vector column, or a chunk table) of `tbl`: its id and trigger.
fn find(tbl: pg_sys::Oid, name: &str) -> i32 {
    let (targets, owner) = targets_table();
    // A chunk target is named by its table, in the caller's terms or as registered.
    let chunk_name = resolve_chunk_table(tbl, name).map(sql_text::display);
    let sql = format!(
        "SELECT id FROM {targets} WHERE relation OPERATOR(pg_catalog.=) $1
            AND (target OPERATOR(pg_catalog.=) $2 OR target OPERATOR(pg_catalog.=) $3)"
    );
    let args = [param(tbl, pg_sys::REGCLASSOID), text_param(name.to_string()), text_param(chunk_name)];
    sql_text::as_role(owner, || sql_text::one::<i32>(&sql, &args)).unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("embeddinggemma: {} has no asynchronous target {name}", sql_text::display(tbl)),
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
    sql_text::as_role(owner, || sql_text::one::<bool>(&sql, &[text_param(id)])).unwrap_or(false)
}

#[pg_extern(sql = "")]
fn embeddinggemma_async_wait(tbl: pg_sys::Oid, target: &str, timeout: pgrx::datum::Interval) -> bool {
    sql_text::require_privilege(tbl, pg_sys::ACL_SELECT, "read");
    let id = find(tbl, target);
    let micros = timeout.as_micros();
    let deadline = Instant::now() + Duration::from_micros(micros.max(0) as u64);
    let _event = worker::WaitEvent::start();
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
        worker::serve_interrupts();
    }
}

#[pg_extern(sql = "")]
fn embeddinggemma_async_reembed(tbl: pg_sys::Oid, target: &str) {
    sql_text::require_owner(tbl, "re-embed it");
    requeue(find(tbl, target));
}

/// Queues every row of target `id` again (its vectors are then all its own).
fn requeue(id: i32) {
    let (targets, owner) = targets_table();
    let (queue, _) = queue_table();
    sql_text::as_role(owner, || {
        sql_text::run(
            &format!(
                "UPDATE {targets} SET scanning = true, scan_all = true, scan_after = NULL, model = NULL, kept_existing = false
                  WHERE id OPERATOR(pg_catalog.=) $1"
            ),
            &[text_param(id)],
        );
        sql_text::run(
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
    // SAFETY: a catalog lookup, missing_ok.
    if unsafe { pg_sys::get_extension_oid(c"embeddinggemma".as_ptr(), true) } == pg_sys::InvalidOid {
        return;
    }
    let (targets, owner) = targets_table();
    let sql = format!("SELECT pg_catalog.array_agg(id) FROM {targets} WHERE relation OPERATOR(pg_catalog.=) $1 AND source OPERATOR(pg_catalog.=) $2");
    let args = [param(relation, pg_sys::REGCLASSOID), text_param(column.to_string())];
    let ids = sql_text::as_role(owner, || sql_text::one::<Vec<i32>>(&sql, &args)).unwrap_or_default();
    for id in ids {
        requeue(id);
        pgrx::notice!(
            "embeddinggemma: column \"{column}\" of {} was retyped: asynchronous target {id} embeds its rows again",
            sql_text::display(relation)
        );
    }
}

/// After `ALTER TABLE … ATTACH PARTITION partition`: its rows were written without the
/// target's trigger, so each target covering it scans again for rows without a vector (or
/// without chunks). Vectors the partition brought are kept, and the status view then names no
/// model for the target, as with `keep_existing`.
pub fn partition_attached(partition: pg_sys::Oid) {
    // SAFETY: a catalog lookup, missing_ok.
    if unsafe { pg_sys::get_extension_oid(c"embeddinggemma".as_ptr(), true) } == pg_sys::InvalidOid {
        return;
    }
    let (targets, owner) = targets_table();
    let sql = format!(
        "SELECT id, target FROM {targets}
          WHERE relation::pg_catalog.oid OPERATOR(pg_catalog.=) ANY (SELECT relid FROM pg_catalog.pg_partition_ancestors($1))"
    );
    let found: Vec<(i32, Option<String>)> = sql_text::as_role(owner, || {
        pgrx::spi::Spi::connect(|c| {
            let rows = c.select(&sql, None, &[param(partition, pg_sys::REGCLASSOID)])?;
            rows.map(|r| Ok((r.get::<i32>(1)?.unwrap_or_default(), r.get::<String>(2)?)))
                .collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
        })
        .expect("SPI reports errors as ERRORs")
    });
    for (id, target) in found {
        // Read as the role attaching the partition (it owns the partition).
        let brought = target.is_some_and(|v| {
            let sql = format!(
                "SELECT EXISTS (SELECT FROM {} d WHERE d.{} IS NOT NULL)",
                sql_text::table_rows(partition),
                ident(&v)
            );
            sql_text::one::<bool>(&sql, &[]) == Some(true)
        });
        sql_text::as_role(owner, || {
            sql_text::run(
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
            sql_text::display(partition)
        );
    }
}

#[pg_extern(sql = "")]
fn embeddinggemma_async_drop(tbl: pg_sys::Oid, target: &str) {
    sql_text::require_owner(tbl, "drop its asynchronous target");
    let id = find(tbl, target);
    sql_text::run(&format!("DROP TRIGGER IF EXISTS {} ON {}", ident(&trigger_name(id)), relation(tbl)), &[]);
    let (targets, owner) = targets_table();
    let (queue, _) = queue_table();
    sql_text::as_role(owner, || {
        sql_text::run(&format!("DELETE FROM {targets} WHERE id OPERATOR(pg_catalog.=) $1"), &[text_param(id)]);
        sql_text::run(&format!("DELETE FROM {queue} WHERE target_id OPERATOR(pg_catalog.=) $1"), &[text_param(id)]);
    });
    TARGETS.with(|t| t.borrow_mut().remove(&id));
}

fn trigger_target(id: i32, relid: pg_sys::Oid) -> TriggerTarget {
    let registry = sql_text::extension_relation("embeddinggemma_async_targets");
    if let Some(t) =
        TARGETS.with(|t| t.borrow().get(&id).filter(|t| t.registry == registry && covers(t.relation, relid)).cloned())
    {
        return t;
    }
    let (targets, owner) = targets_table();
    let sql = format!("SELECT relation::pg_catalog.oid, key_column, source, target, chunk_table IS NULL, keep_stale FROM {targets} WHERE id OPERATOR(pg_catalog.=) $1");
    let found = sql_text::as_role(owner, || {
        pgrx::spi::Spi::connect_mut(|c| {
            let rows = c.update(sql.as_str(), Some(1), &[text_param(id)])?;
            if rows.is_empty() {
                return Ok(None);
            }
            let row = rows.first();
            Ok::<_, pgrx::spi::SpiError>(Some(TriggerTarget {
                registry,
                relation: row.get::<pg_sys::Oid>(1)?.unwrap_or_default(),
                key: row.get::<String>(2)?.unwrap_or_default(),
                source: row.get::<String>(3)?.unwrap_or_default(),
                target: if row.get::<bool>(5)?.unwrap_or(true) { row.get::<String>(4)? } else { None },
                keep_stale: row.get::<bool>(6)?.unwrap_or(false),
                columns: None,
            }))
        })
        .expect("SPI reports errors as ERRORs")
    });
    // A trigger a role made itself, naming another table's target, records nothing.
    let target = found.filter(|t| covers(t.relation, relid)).unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
            format!("embeddinggemma_async_trigger(): no asynchronous target {id} on {}", sql_text::display(relid)),
            "embeddinggemma_async() installs this trigger; embeddinggemma_async_drop() removes it.",
        )
    });
    TARGETS.with(|t| t.borrow_mut().insert(id, target.clone()));
    target
}

/// The target's columns in `rel`, resolved by name once per backend and checked by position per
/// row: a column dropped, renamed or retyped since is looked up (and checked) again.
fn trigger_columns(id: i32, t: &TriggerTarget, rel: pg_sys::Relation) -> Columns {
    // SAFETY: the trigger's open relation and its descriptor.
    let desc = unsafe { PgTupleDesc::from_pg_unchecked((*rel).rd_att) };
    let still = |attno: usize, name: &str, type_oid: pg_sys::Oid| {
        attno >= 1 && desc.get(attno - 1).is_some_and(|a| !a.attisdropped && a.atttypid == type_oid && a.name() == name)
    };
    if let Some(c) = t.columns.as_ref().filter(|c| {
        still(c.source.attno.get(), &t.source, c.source_type)
            && still(c.key.attno.get(), &t.key, c.key.type_oid)
            && match (t.target.as_deref(), c.target) {
                (Some(name), Some((attno, type_oid))) => still(attno, name, type_oid),
                (None, None) => true,
                _ => false,
            }
    }) {
        return c.clone();
    }
    // SAFETY: as above; the relation is open for the whole trigger call.
    let relation = unsafe { PgRelation::from_pg(rel) };
    let source = crate::columns::check_source(&relation, &t.source);
    let key = key_column(&relation, &t.key);
    let attr = |attno: usize| *desc.get(attno - 1).expect("a column found above");
    let target = t
        .target
        .as_deref()
        .and_then(|name| crate::columns::lookup_column(&relation, name))
        .map(|a| (a.attnum as usize, a.atttypid));
    let columns = Columns { source_type: attr(source.attno.get()).atttypid, source, key, target };
    TARGETS.with(|all| {
        if let Some(cached) = all.borrow_mut().get_mut(&id) {
            cached.columns = Some(columns.clone());
        }
    });
    columns
}

/// Whether the columns a cached target names are still there by those names.
fn names_resolve(t: &TriggerTarget, relation: &PgRelation) -> bool {
    let there = |name: &str| crate::columns::lookup_column(relation, name).is_some();
    there(&t.source) && there(&t.key) && t.target.as_deref().is_none_or(there)
}

#[pg_trigger(sql = "")]
fn embeddinggemma_async_trigger<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, impl WhoAllocated>>, pgrx::PgTriggerError> {
    let misuse = |what: &str| -> ! {
        raise(
            PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
            format!("embeddinggemma_async_trigger(): {what}"),
            "embeddinggemma_async() installs this trigger.",
        )
    };
    let op = trigger.op()?;
    if !matches!(trigger.level(), PgTriggerLevel::Row) || !matches!(trigger.when()?, PgTriggerWhen::Before) {
        misuse("must be fired BEFORE INSERT OR UPDATE [OR DELETE] … FOR EACH ROW")
    }
    let data = trigger.trigger_data();
    // SAFETY: PostgreSQL hands a trigger its Trigger with tgnargs strings in tgargs.
    let first_arg = unsafe {
        let tg = &*data.tg_trigger;
        (tg.tgnargs >= 1).then(|| CStr::from_ptr(*tg.tgargs).to_str().ok()).flatten()
    };
    let Some(id) = first_arg.and_then(|a| a.parse::<i32>().ok()) else { misuse("takes the target's id") };
    let rel = data.tg_relation;
    // SAFETY: the relation the trigger fires on, open for the call.
    let (relid, desc) = unsafe { ((*rel).rd_id, (*rel).rd_att) };
    let mut t = trigger_target(id, relid);
    // SAFETY: the relation the trigger fires on, open for the call.
    if !names_resolve(&t, &unsafe { PgRelation::from_pg(rel) }) {
        // Renamed columns (another session followed the rename): the target as stored now.
        TARGETS.with(|all| all.borrow_mut().remove(&id));
        t = trigger_target(id, relid);
    }
    let columns = trigger_columns(id, &t, rel);
    let (source, key) = (&columns.source, &columns.key);
    let update = matches!(op, PgTriggerOperation::Update);
    // SAFETY: PostgreSQL hands a row trigger valid tuples of tg_relation (tg_newtuple only on
    // UPDATE), and the columns were checked against that relation above.
    let (new, old) = if update { (data.tg_newtuple, Some(data.tg_trigtuple)) } else { (data.tg_trigtuple, None) };
    let text = |tuple| unsafe { source_text(tuple, desc, source) };
    // The key as the writer reads it (for the failures view) and as its type sends it (what
    // the worker reads back, whatever this session's settings).
    let key_of = |tuple| unsafe { key_text(tuple, desc, key).zip(key_binary(tuple, desc, key)) };
    // SAFETY: the descriptor of the tuple returned (NEW, OLD, or NEW with its vector cleared).
    let returned =
        |tuple| Ok(Some(unsafe { PgHeapTuple::from_heap_tuple(PgTupleDesc::from_pg_unchecked(desc), tuple) }));
    if matches!(op, PgTriggerOperation::Delete) {
        // A deleted document's chunks go (a chunk table needs no foreign key for that).
        let old = data.tg_trigtuple;
        if t.target.is_none() {
            if let Some(k) = key_of(old) {
                super::queue::insert(id, key.type_oid, &[k]);
                wake_at_commit();
            }
        }
        return returned(old);
    }
    // SAFETY: as above; a column number of this relation.
    let is_null = |tuple, attno: usize| unsafe { pg_sys::heap_attisnull(tuple, attno as i32, desc) };
    // The worker's own write sets only the vector: nothing to queue, and no text to compare
    // (which would detoast two copies of a long one in the worker).
    if (crate::statement_trigger::writing(t.relation) || crate::statement_trigger::writing(relid)) && update {
        return returned(new);
    }
    let new_key = key_of(new);
    // A generated source column is computed after BEFORE triggers, and a BEFORE trigger that
    // fires after this one (triggers fire in name order) may still change the text: the text
    // as stored is not known here, so every write queues the row and the worker reads it.
    // SAFETY: the relation's descriptor; a column number checked above.
    let generated = unsafe { PgTupleDesc::from_pg_unchecked(desc) }
        .get(source.attno.get() - 1)
        .is_some_and(|a| a.attgenerated != 0);
    // SAFETY: the relation and trigger PostgreSQL fires.
    let unknown = generated
        || unsafe {
            crate::trigger_order::later_before_trigger(
                rel,
                data.tg_trigger,
                pg_sys::TRIGGER_TYPE_INSERT | pg_sys::TRIGGER_TYPE_UPDATE,
            )
        }
        .is_some();
    let (text_changed, old_key) = match old {
        Some(old) => (generated || text(old) != text(new), key_of(old).filter(|k| Some(k) != new_key.as_ref())),
        None => (true, None),
    };
    if !text_changed && !unknown && old_key.is_none() {
        return returned(new);
    }
    let has_text = unknown || !is_null(new, source.attno.get());
    let mut row = new;
    // The vector of a text that changed goes (a text changed by a later trigger only: the
    // worker replaces it).
    if let Some(name) = t.target.as_deref().filter(|_| text_changed && (!has_text || !t.keep_stale)) {
        // A vector target: its vector no longer matches the text (a NULL text has none).
        let target = columns.target.map_or_else(
            // SAFETY: the relation the trigger fires on, open for the call; raises: the column is gone.
            || crate::columns::find_column(&unsafe { PgRelation::from_pg(rel) }, name, "target").attnum as usize,
            |(attno, _)| attno,
        );
        if !is_null(new, target) {
            let (mut column, mut value, mut null) = (target as i32, pg_sys::Datum::from(0usize), true);
            // SAFETY: NEW of this relation; one column replaced by NULL in a copy.
            // `&mut`: PostgreSQL 15's signature takes mutable pointers (16 on, const).
            #[allow(clippy::unnecessary_mut_passed)]
            let modified =
                unsafe { pg_sys::heap_modify_tuple_by_cols(new, desc, 1, &mut column, &mut value, &mut null) };
            row = modified;
        }
    }
    // A chunk target is queued even without a text (its chunks go); a vector target only with one.
    let mut keys: Vec<(String, Vec<u8>)> = Vec::new();
    if has_text || t.target.is_none() {
        keys.extend(new_key);
    }
    if t.target.is_none() {
        keys.extend(old_key);
    }
    if !keys.is_empty() {
        super::queue::insert(id, key.type_oid, &keys);
        wake_at_commit();
    }
    returned(row)
}
