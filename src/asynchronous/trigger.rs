//! The asynchronous target's trigger (`embeddinggemma_async_trigger`): records a changed row
//! in the queue, and clears a vector its new text no longer matches. The write path only
//! records; the worker (`drain`) embeds. The queue is written with its owner's rights, for the
//! table the trigger fires on only.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::ops::Not;

use pgrx::prelude::*;
use pgrx::{pg_sys, PgRelation, PgSqlErrorCode, PgTupleDesc};

use super::targets::{ensure_worker, targets_table};
use crate::pg::columns::{key_binary, key_column, key_text, source_text, KeyColumn, SourceColumn};
use crate::pg::errors::raise;
use crate::pg::spi::{param, text_param};
use crate::pg::{catalog, rights, spi};

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
    /// (target table, partition) pairs `covers` found in the transaction it names.
    static COVERED: RefCell<(pg_sys::TransactionId, HashSet<(pg_sys::Oid, pg_sys::Oid)>)> =
        RefCell::new((pg_sys::InvalidTransactionId, HashSet::new()));
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

/// Whether a trigger firing on `relid` serves a target on `relation`: the same table, or one of
/// its partitions (the trigger on a partitioned table is cloned to each, present and future).
/// Answers are kept for the transaction (a statement writing many rows of a partition asks
/// once; a DETACH drops the partition's clone of the trigger anyway).
fn covers(relation: pg_sys::Oid, relid: pg_sys::Oid) -> bool {
    if relation == relid {
        return true;
    }
    // SAFETY: this transaction's id (the trigger writes the queue: it needs one anyway).
    let xid = unsafe { pg_sys::GetTopTransactionId() };
    let known = COVERED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != xid {
            *c = (xid, HashSet::new());
        }
        c.1.contains(&(relation, relid))
    });
    if known {
        return true;
    }
    let sql =
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_partition_ancestors($1) a WHERE a.relid OPERATOR(pg_catalog.=) $2)";
    let covered =
        spi::one::<bool>(sql, &[param(relid, pg_sys::REGCLASSOID), param(relation, pg_sys::REGCLASSOID)]) == Some(true);
    if covered {
        COVERED.with(|c| c.borrow_mut().1.insert((relation, relid)));
    }
    covered
}

/// Forgets the cached target `id` (dropped).
pub(super) fn forget(id: i32) {
    TARGETS.with(|t| t.borrow_mut().remove(&id));
}

fn trigger_target(id: i32, relid: pg_sys::Oid) -> TriggerTarget {
    let registry = catalog::extension_relation("embeddinggemma_async_targets");
    if let Some(t) =
        TARGETS.with(|t| t.borrow().get(&id).filter(|t| t.registry == registry && covers(t.relation, relid)).cloned())
    {
        return t;
    }
    let (targets, owner) = targets_table();
    let sql = format!("SELECT relation::pg_catalog.oid, key_column, source, target, chunk_table IS NULL, keep_stale FROM {targets} WHERE id OPERATOR(pg_catalog.=) $1");
    let found = rights::as_role(owner, || {
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
            format!("embeddinggemma_async_trigger(): no asynchronous target {id} on {}", catalog::display(relid)),
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
    let source = crate::pg::columns::check_source(&relation, &t.source);
    let key = key_column(&relation, &t.key);
    let attr = |attno: usize| *desc.get(attno - 1).expect("a column found above");
    let target = t
        .target
        .as_deref()
        .and_then(|name| crate::pg::columns::lookup_column(&relation, name))
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
    let there = |name: &str| crate::pg::columns::lookup_column(relation, name).is_some();
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
    if (crate::write::write_back::writing(t.relation) || crate::write::write_back::writing(relid)) && update {
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
            crate::write::trigger_order::later_before_triggers(
                rel,
                data.tg_trigger,
                pg_sys::TRIGGER_TYPE_INSERT | pg_sys::TRIGGER_TYPE_UPDATE,
            )
        }
        .is_empty()
        .not();
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
            || crate::pg::columns::find_column(&unsafe { PgRelation::from_pg(rel) }, name, "target").attnum as usize,
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
