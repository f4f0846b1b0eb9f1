//! `embeddinggemma_chunk_trigger()`: keeps a chunk table in step with its documents, row by
//! row; and finding the chunk triggers of a table (whose settings the chunk backfill reads, so
//! both cut alike).

use std::ffi::CStr;

use pgrx::prelude::*;
use pgrx::{pg_sys, PgRelation};

use super::chunk_settings::{misuse, resolve_chunk_table, ChunkSettings, USAGE};
use crate::pg::catalog;
use crate::pg::columns::{key_text, source_text, KeyColumn};
use crate::pg::quote::{ident, relation};
use crate::pg::spi::param;

/// The chunk triggers on `documents` (enabled or not) that write `chunk_table`: their
/// arguments, by trigger name.
pub fn triggers_writing(documents: &PgRelation, chunk_table: pg_sys::Oid) -> Vec<Vec<String>> {
    // SAFETY: the relation's trigger descriptor, NULL when it has none; its arrays have the
    // lengths it states.
    let mut found: Vec<(String, Vec<String>)> = unsafe {
        let Some(desc) = documents.trigdesc.as_ref() else { return Vec::new() };
        std::slice::from_raw_parts(desc.triggers, desc.numtriggers as usize)
            .iter()
            .filter(|t| !t.tgisinternal && is_chunk_trigger(t.tgfoid))
            .map(|t| {
                let args = (0..t.tgnargs as usize)
                    .map(|i| CStr::from_ptr(*t.tgargs.add(i)).to_string_lossy().into_owned())
                    .collect();
                (CStr::from_ptr(t.tgname).to_string_lossy().into_owned(), args)
            })
            .collect()
    };
    found.sort();
    found
        .into_iter()
        .map(|(_, args)| args)
        .filter(|args: &Vec<String>| {
            args.len() >= 3 && resolve_chunk_table(documents.oid(), &args[2]) == Some(chunk_table)
        })
        .collect()
}

/// Whether `function` is this extension's `embeddinggemma_chunk_trigger()`.
fn is_chunk_trigger(function: pg_sys::Oid) -> bool {
    // SAFETY: catalog lookups by OID.
    unsafe {
        let name = pg_sys::get_func_name(function);
        !name.is_null()
            && CStr::from_ptr(name) == c"embeddinggemma_chunk_trigger"
            && pg_sys::get_func_namespace(function) == catalog::extension_schema(c"embeddinggemma")
    }
}

/// The key of `tuple`, as a parameter of the key's type.
///
/// # Safety
/// `tuple` must be a valid tuple of the relation with descriptor `desc`.
unsafe fn key_param<'a>(
    tuple: *mut pg_sys::HeapTupleData,
    desc: pg_sys::TupleDesc,
    key: &KeyColumn,
) -> pgrx::datum::DatumWithOid<'a> {
    // SAFETY: per this function's contract.
    let datum = unsafe { pgrx::heap_getattr_raw(tuple, key.attno, desc) };
    match datum {
        Some(d) => param(d, key.type_oid),
        None => pgrx::datum::DatumWithOid::null_oid(key.type_oid),
    }
}

#[pg_trigger(sql = "")]
fn embeddinggemma_chunk_trigger<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByRust>>, pgrx::PgTriggerError> {
    if !matches!(trigger.level(), PgTriggerLevel::Row) || !matches!(trigger.when()?, PgTriggerWhen::After) {
        misuse("embeddinggemma_chunk_trigger() must be fired AFTER INSERT OR UPDATE OR DELETE … FOR EACH ROW", USAGE)
    }
    let op = trigger.op()?;
    let documents = trigger.relation()?;
    let s = ChunkSettings::parse(&documents, &trigger.extra_args()?);
    let data = trigger.trigger_data();
    let desc = documents.rd_att;
    // SAFETY: PostgreSQL hands a row trigger valid tuples of tg_relation (tg_newtuple only on
    // UPDATE), and the columns were checked against that relation above.
    let (old, new) = match op {
        PgTriggerOperation::Insert => (None, Some(data.tg_trigtuple)),
        PgTriggerOperation::Update => (Some(data.tg_trigtuple), Some(data.tg_newtuple)),
        PgTriggerOperation::Delete => (Some(data.tg_trigtuple), None),
        PgTriggerOperation::Truncate => misuse("embeddinggemma_chunk_trigger() does not handle TRUNCATE", USAGE),
    };
    let text = |t: *mut pg_sys::HeapTupleData| unsafe { source_text(t, desc, &s.source_column) };
    let key = |t: *mut pg_sys::HeapTupleData| unsafe { key_text(t, desc, &s.key) };
    let (text_changed, key_changed) = match (old, new) {
        (Some(o), Some(n)) => (text(o) != text(n), key(o) != key(n)),
        _ => (true, true),
    };
    if !text_changed && !key_changed {
        return Ok(None);
    }
    let chunks = relation(s.chunk_table);
    let ck = ident(&s.chunk_key);
    Spi::connect_mut(|client| {
        // SAFETY: valid tuples of the trigger's relation (above).
        let param_of = |t: *mut pg_sys::HeapTupleData| unsafe { key_param(t, desc, &s.key) };
        match (old, new) {
            (Some(o), Some(n)) if !text_changed => {
                // Only the key changed: the chunks move with it (a foreign key with ON UPDATE
                // CASCADE has moved them already).
                let sql = format!("UPDATE {chunks} SET {ck} = $2 WHERE {ck} OPERATOR(pg_catalog.=) $1");
                client.update(sql.as_str(), None, &[param_of(o), param_of(n)]).expect("SPI reports errors as ERRORs");
            }
            _ => {
                // The document's old chunks go: under its old key, and under its new one, where
                // a foreign key's ON UPDATE CASCADE has moved them.
                let delete = format!("DELETE FROM {chunks} WHERE {ck} OPERATOR(pg_catalog.=) $1");
                let gone = match (old, new) {
                    (Some(o), Some(n)) if key_changed => vec![o, n],
                    (Some(o), _) => vec![o],
                    (None, _) => vec![],
                };
                for t in gone {
                    client.update(delete.as_str(), None, &[param_of(t)]).expect("SPI reports errors as ERRORs");
                }
                if let Some(n) = new {
                    if let (Some(k), Some(body)) = (key(n), text(n)) {
                        s.insert_chunks(client, &[k], &[Some(body)]);
                    }
                }
            }
        }
    });
    Ok(None)
}
