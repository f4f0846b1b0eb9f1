//! The asynchronous trigger's write into the queue, as a heap insert plus its index entries:
//! the trigger fires per written row, and an SPI `INSERT` (portal, executor, the key array and
//! its `unnest`) cost about as much as the user's own insert. The queue is the extension's own
//! table with no rules or policies and one trigger, for restored entries that were leased, which
//! never applies here (an entry is inserted unleased): nothing is skipped that would run for it.

use std::cell::Cell;
use std::ffi::CStr;

use pgrx::{pg_sys, IntoDatum, PgSqlErrorCode, PgTupleDesc};

use crate::pg::errors::raise;
use crate::pg::{catalog, rights};

const QUEUE: &str = "embeddinggemma_async_queue";
const SEQUENCE: &str = "embeddinggemma_async_queue_id_seq";

thread_local! {
    /// The queue's, its id sequence's and their schema's OIDs, looked up again when the OID no
    /// longer names the queue in that schema (the extension was dropped and created again).
    static OIDS: Cell<Option<(pg_sys::Oid, pg_sys::Oid, pg_sys::Oid)>> = const { Cell::new(None) };
}

fn names_queue(oid: pg_sys::Oid, schema: pg_sys::Oid) -> bool {
    // SAFETY: syscache probes by OID; NULL / InvalidOid when no relation has it.
    let (name, namespace) = unsafe { (pg_sys::get_rel_name(oid), pg_sys::get_rel_namespace(oid)) };
    // SAFETY: a NUL-terminated name palloc'd just above.
    !name.is_null() && namespace == schema && unsafe { CStr::from_ptr(name) }.to_bytes() == QUEUE.as_bytes()
}

fn oids() -> (pg_sys::Oid, pg_sys::Oid) {
    if let Some((queue, sequence, _)) = OIDS.get().filter(|(queue, _, schema)| names_queue(*queue, *schema)) {
        return (queue, sequence);
    }
    let (queue, sequence) = (catalog::extension_relation(QUEUE), catalog::extension_relation(SEQUENCE));
    // SAFETY: a syscache probe of the relation just found.
    OIDS.set(Some((queue, sequence, unsafe { pg_sys::get_rel_namespace(queue) })));
    (queue, sequence)
}

/// Queues `keys` (text and binary forms, of type `key_type`) of the target `target_id` (one
/// entry each), in this transaction.
pub fn insert(target_id: i32, key_type: pg_sys::Oid, keys: &[(String, Vec<u8>)]) {
    let (queue, sequence) = oids();
    // SAFETY: the queue exists (checked above) and is locked as an INSERT locks it; the tuple is
    // formed from its own descriptor; each index entry is built and inserted as
    // CatalogIndexInsert does for a heap tuple (the queue's indexes are on plain columns).
    unsafe {
        let rel = pg_sys::table_open(queue, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let desc = (*rel).rd_att;
        let owner = (*(*rel).rd_rel).relowner;
        let attrs = PgTupleDesc::from_pg_unchecked(desc);
        let indexes = open_indexes(rel);
        let slot = pg_sys::MakeSingleTupleTableSlot(desc, &pg_sys::TTSOpsHeapTuple);
        for (key, bytes) in keys {
            let mut values = vec![pg_sys::Datum::from(0usize); attrs.len()];
            let mut nulls = vec![true; attrs.len()];
            for (i, a) in attrs.iter().enumerate().filter(|(_, a)| !a.attisdropped) {
                let value = match a.name() {
                    // nextval() checks the caller's rights on the sequence: the owner's are.
                    "id" => rights::as_role(owner, || pgrx::direct_function_call::<i64>(pg_sys::nextval_oid, &[sequence.into_datum()])).into_datum(),
                    "target_id" => target_id.into_datum(),
                    "key" => key.as_str().into_datum(),
                    "key_bytes" => bytes.as_slice().into_datum(),
                    "key_type" => key_type.into_datum(),
                    "enqueued_at" => Some(pg_sys::Datum::from(pg_sys::GetCurrentTransactionStartTimestamp())),
                    "attempts" => 0i32.into_datum(),
                    "leased" => false.into_datum(),
                    "interrupted" => 0i32.into_datum(),
                    // Constraints are not checked here: a column this code does not know must
                    // be one that may be NULL.
                    name if a.attnotnull => raise(
                        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                        format!("embeddinggemma: the queue has a NOT NULL column {name} this library does not fill"),
                        "The extension's SQL and its library differ in version: ALTER EXTENSION embeddinggemma UPDATE, or install the matching library.",
                    ),
                    _ => None,
                };
                if let Some(v) = value {
                    values[i] = v;
                    nulls[i] = false;
                }
            }
            let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            pg_sys::simple_heap_insert(rel, tuple);
            pg_sys::ExecStoreHeapTuple(tuple, slot, false);
            for &(index, info) in &indexes {
                let mut values = [pg_sys::Datum::from(0usize); pg_sys::INDEX_MAX_KEYS as usize];
                let mut nulls = [false; pg_sys::INDEX_MAX_KEYS as usize];
                pg_sys::FormIndexDatum(info, slot, std::ptr::null_mut(), values.as_mut_ptr(), nulls.as_mut_ptr());
                let unique = if (*(*index).rd_index).indisunique {
                    pg_sys::IndexUniqueCheck::UNIQUE_CHECK_YES
                } else {
                    pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO
                };
                pg_sys::index_insert(
                    index,
                    values.as_mut_ptr(),
                    nulls.as_mut_ptr(),
                    &mut (*tuple).t_self,
                    rel,
                    unique,
                    false,
                    info,
                );
            }
            pg_sys::ExecClearTuple(slot);
            pg_sys::heap_freetuple(tuple);
        }
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        for (index, _) in indexes {
            pg_sys::index_close(index, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        }
        pg_sys::table_close(rel, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
    }
}

/// The queue's indexes, opened, each with its IndexInfo.
///
/// # Safety
/// `rel` is open and locked.
unsafe fn open_indexes(rel: pg_sys::Relation) -> Vec<(pg_sys::Relation, *mut pg_sys::IndexInfo)> {
    // SAFETY: per the contract; the relcache's list of the relation's index OIDs.
    unsafe {
        let list = pgrx::PgList::<pg_sys::Oid>::from_pg(pg_sys::RelationGetIndexList(rel));
        list.iter_oid()
            .map(|oid| {
                let index = pg_sys::index_open(oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
                let info = pg_sys::BuildIndexInfo(index);
                if !(*info).ii_Expressions.is_null() || !(*info).ii_Predicate.is_null() {
                    raise(
                        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                        format!(
                            "embeddinggemma: an index on {} has expressions or a predicate",
                            catalog::display((*rel).rd_id)
                        ),
                        "The extension's queue has plain indexes; drop the one added to it.",
                    )
                }
                (index, info)
            })
            .collect()
    }
}
