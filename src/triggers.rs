//! `embeddinggemma_trigger()`: keeps a vector column in step with a text column, row by row,
//! and the column check it shares with the statement trigger and the backfill (sql/).

use std::ffi::CStr;
use std::num::NonZeroUsize;

use pgrx::prelude::*;
use pgrx::{pg_sys, PgRelation, PgSqlErrorCode};

use crate::errors::raise;
use crate::model;
use crate::vector::{vector_type_oid, PgVector};

const TEXT_TYPES: [pg_sys::Oid; 3] = [pg_sys::TEXTOID, pg_sys::VARCHAROID, pg_sys::BPCHAROID];

fn type_name(oid: pg_sys::Oid, typmod: i32) -> String {
    // SAFETY: format_type_with_typemod returns a palloc'd NUL-terminated string.
    unsafe { CStr::from_ptr(pg_sys::format_type_with_typemod(oid, typmod)).to_string_lossy().into_owned() }
}

/// The source column as the checks found it.
pub struct SourceColumn {
    pub attno: NonZeroUsize,
    /// char(n): trailing spaces are padding, dropped as the cast to text does.
    pub padded: bool,
}

fn find_column(relation: &PgRelation, name: &str, role: &str) -> pg_sys::FormData_pg_attribute {
    relation.tuple_desc().iter().find(|a| !a.attisdropped && a.name() == name).copied().unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("embeddinggemma: {role} column \"{name}\" does not exist in table \"{}\"", relation.name()),
            "Pass the names of the text column and of the vector column, e.g. ('body', 'v').",
        )
    })
}

/// Raises an ERROR naming the column unless `source` is text, varchar, char or a domain over one.
pub fn check_source(relation: &PgRelation, source: &str) -> SourceColumn {
    let src = find_column(relation, source, "source");
    // SAFETY: a catalog lookup on the backend's thread; unknown OIDs come back unchanged.
    let base = unsafe { pg_sys::getBaseType(src.atttypid) };
    if !TEXT_TYPES.contains(&base) {
        raise(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!("embeddinggemma: source column \"{source}\" of \"{}\" is {}, not text", relation.name(), type_name(src.atttypid, src.atttypmod)),
            "The source column must be text, varchar, char or a domain over one of them.",
        )
    }
    SourceColumn {
        attno: NonZeroUsize::new(src.attnum as usize).expect("user columns are numbered from 1"),
        padded: base == pg_sys::BPCHAROID,
    }
}

/// Raises an ERROR naming the column unless `source` is a text column (text, varchar, char or
/// a domain over one) and `target` a `vector` column that can hold `dim` values.
pub fn check_columns(relation: &PgRelation, source: &str, target: &str, dim: i32) -> SourceColumn {
    let source_column = check_source(relation, source);
    let table = relation.name().to_string();
    let dst = find_column(relation, target, "target");
    if dst.atttypid != vector_type_oid() {
        raise(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!("embeddinggemma: target column \"{target}\" of \"{table}\" is {}, not vector", type_name(dst.atttypid, dst.atttypmod)),
            format!("The target must be a vector({dim}) column, e.g. ALTER TABLE {table} ADD COLUMN embedding vector({dim});"),
        )
    }
    if dst.atttypmod > 0 && dst.atttypmod != dim {
        raise(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!("embeddinggemma: target column \"{target}\" of \"{table}\" is vector({}), but dim is {dim}", dst.atttypmod),
            "Pass the column's dimension as the trigger's dim argument, or change the column type.",
        )
    }
    source_column
}

/// The source text of `tuple` as `::text` gives it (char(n) without its padding).
///
/// # Safety
/// `tuple` must be a valid tuple of a relation whose descriptor is `desc`, and `column` must
/// come from `check_columns` on that relation.
unsafe fn source_text(tuple: *mut pg_sys::HeapTupleData, desc: pg_sys::TupleDesc, column: &SourceColumn) -> Option<String> {
    // SAFETY: per this function's contract; the datum is a varlena of a text-like type.
    let text = unsafe {
        let datum = pgrx::heap_getattr_raw(tuple, column.attno, desc)?;
        String::from_polymorphic_datum(datum, false, pg_sys::TEXTOID)?
    };
    Some(if column.padded { text.trim_end_matches(' ').to_string() } else { text })
}

/// Opens `tbl` for the checks, locked to the end of the transaction; raises an ERROR if it does not exist.
fn open_checked(tbl: pg_sys::Oid) -> PgRelation {
    // SAFETY: get_rel_name only reads the catalog; NULL means no such relation.
    if unsafe { pg_sys::get_rel_name(tbl) }.is_null() {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, format!("embeddinggemma: no relation with OID {}", tbl.to_u32()), "Pass a table name, e.g. 'docs'::regclass.")
    }
    // SAFETY: the relation exists (checked above) and is opened with a lock held to the end of
    // the transaction.
    unsafe { PgRelation::with_lock(tbl, pg_sys::AccessShareLock as pg_sys::LOCKMODE) }
}

#[pg_extern(sql = "")]
fn embeddinggemma_check_columns(tbl: pg_sys::Oid, source: &str, target: &str, dim: i32) {
    check_columns(&open_checked(tbl), source, target, dim);
}

#[pg_extern(sql = "")]
fn embeddinggemma_check_source(tbl: pg_sys::Oid, source: &str) {
    check_source(&open_checked(tbl), source);
}

const USAGE: &str = "CREATE TRIGGER … BEFORE INSERT OR UPDATE ON docs FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v' [, task [, dim]]);";

#[pg_trigger(sql = "")]
fn embeddinggemma_trigger<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, impl WhoAllocated>>, pgrx::PgTriggerError> {
    let misuse = |what: &str| -> ! { raise(PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION, format!("embeddinggemma_trigger(): {what}"), USAGE) };
    let op = trigger.op()?;
    let row_level = matches!(trigger.level(), PgTriggerLevel::Row);
    let before = matches!(trigger.when()?, PgTriggerWhen::Before);
    if !row_level || !before || !matches!(op, PgTriggerOperation::Insert | PgTriggerOperation::Update) {
        misuse("must be fired BEFORE INSERT OR UPDATE … FOR EACH ROW")
    }
    let args = trigger.extra_args()?;
    if !(2..=4).contains(&args.len()) {
        misuse("takes a source column, a target column, and optionally a task and a dimension")
    }
    let (source, target) = (&args[0], &args[1]);
    let task = args.get(2).map_or("document", String::as_str);
    let dim = match args.get(3).map(|d| d.trim().parse::<i32>()) {
        None => 768,
        Some(Ok(d)) => d,
        Some(Err(_)) => misuse(&format!("dim {:?} is not a number", args[3])),
    };
    let column = check_columns(&trigger.relation()?, source, target, dim);

    let data = trigger.trigger_data();
    let update = matches!(op, PgTriggerOperation::Update);
    // SAFETY: PostgreSQL hands a row trigger valid tuples of tg_relation (tg_newtuple only on
    // UPDATE), and `column` was checked against that relation above.
    let (text, old_text) = unsafe {
        let desc = (*data.tg_relation).rd_att;
        let new = if update { data.tg_newtuple } else { data.tg_trigtuple };
        (source_text(new, desc, &column), update.then(|| source_text(data.tg_trigtuple, desc, &column)))
    };
    let mut row = trigger.new().expect("INSERT and UPDATE row triggers have NEW").into_owned();
    if old_text.is_some_and(|old| old == text) {
        return Ok(Some(row));
    }
    let vector = text.map(|t| PgVector::from_slice(&model::embed(&[&t], task, dim)[0]));
    row.set_by_name(target, vector).unwrap_or_else(|e| misuse(&e.to_string()));
    Ok(Some(row))
}
