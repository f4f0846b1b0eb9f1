//! The checks every write path makes before it touches a table: the text column, the vector
//! column, the key; and reading a row's text as `::text` gives it.

use std::ffi::CStr;
use std::num::NonZeroUsize;

use pgrx::prelude::*;
use pgrx::{pg_sys, PgRelation, PgSqlErrorCode};

use crate::pg::errors::raise;
use crate::pg::vector::{is_target_type, vector_type_oid};
use crate::pg::{catalog, quote, spi};

const TEXT_TYPES: [pg_sys::Oid; 3] = [pg_sys::TEXTOID, pg_sys::VARCHAROID, pg_sys::BPCHAROID];

fn type_name(oid: pg_sys::Oid, typmod: i32) -> String {
    // SAFETY: format_type_with_typemod returns a palloc'd NUL-terminated string.
    unsafe { CStr::from_ptr(pg_sys::format_type_with_typemod(oid, typmod)).to_string_lossy().into_owned() }
}

/// The source column as the checks found it.
#[derive(Clone)]
pub struct SourceColumn {
    pub attno: NonZeroUsize,
    /// char(n): trailing spaces are padding, dropped as the cast to text does.
    pub padded: bool,
}

/// The column `name` of `relation`, if it has one.
pub fn lookup_column(relation: &PgRelation, name: &str) -> Option<pg_sys::FormData_pg_attribute> {
    relation.tuple_desc().iter().find(|a| !a.attisdropped && a.name() == name).copied()
}

/// The column `name` of `relation`; raises an ERROR naming it as the `role` column when it is missing.
pub fn find_column(relation: &PgRelation, name: &str, role: &str) -> pg_sys::FormData_pg_attribute {
    lookup_column(relation, name).unwrap_or_else(|| {
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
            format!(
                "embeddinggemma: source column \"{source}\" of \"{}\" is {}, not text",
                relation.name(),
                type_name(src.atttypid, src.atttypmod)
            ),
            "The source column must be text, varchar, char or a domain over one of them.",
        )
    }
    SourceColumn {
        attno: NonZeroUsize::new(src.attnum as usize).expect("user columns are numbered from 1"),
        padded: base == pg_sys::BPCHAROID,
    }
}

/// The columns `check_columns` passed: the text column, and the target's type (`vector` or
/// `halfvec`), which decides how vectors are written to it.
pub struct CheckedColumns {
    pub source: SourceColumn,
    pub target_type: pg_sys::Oid,
}

/// Raises an ERROR naming the column unless `source` is a text column (text, varchar, char or
/// a domain over one) and `target` a `vector` or `halfvec` column that can hold `dim` values.
pub fn check_columns(relation: &PgRelation, source: &str, target: &str, dim: i32) -> CheckedColumns {
    let source_column = check_source(relation, source);
    let table = relation.name().to_string();
    let dst = find_column(relation, target, "target");
    if !is_target_type(dst.atttypid) {
        raise(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!("embeddinggemma: target column \"{target}\" of \"{table}\" is {}, not vector or halfvec", type_name(dst.atttypid, dst.atttypmod)),
            format!("The target must be a vector({dim}) or halfvec({dim}) column, e.g. ALTER TABLE {table} ADD COLUMN embedding vector({dim});"),
        )
    }
    if dst.atttypmod > 0 && dst.atttypmod != dim {
        raise(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!(
                "embeddinggemma: target column \"{target}\" of \"{table}\" is {}({}), but dim is {dim}",
                if dst.atttypid == vector_type_oid() { "vector" } else { "halfvec" },
                dst.atttypmod
            ),
            "Pass the column's dimension as the trigger's dim argument, or change the column type.",
        )
    }
    CheckedColumns { source: source_column, target_type: dst.atttypid }
}

/// The source text of `tuple` as `::text` gives it (char(n) without its padding).
///
/// # Safety
/// `tuple` must be a valid tuple of a relation whose descriptor is `desc`, and `column` must
/// come from `check_columns` on that relation.
pub unsafe fn source_text(
    tuple: *mut pg_sys::HeapTupleData,
    desc: pg_sys::TupleDesc,
    column: &SourceColumn,
) -> Option<String> {
    // SAFETY: per this function's contract; the datum is a varlena of a text-like type.
    let text = unsafe {
        let datum = pgrx::heap_getattr_raw(tuple, column.attno, desc)?;
        String::from_polymorphic_datum(datum, false, pg_sys::TEXTOID)?
    };
    Some(if column.padded { text.trim_end_matches(' ').to_string() } else { text })
}

/// Opens `tbl` for the checks, locked to the end of the transaction; raises an ERROR if it does not exist.
pub fn open_checked(tbl: pg_sys::Oid) -> PgRelation {
    catalog::relation_name(tbl);
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

/// The key column as the check found it: rows are written back, or their chunks found, by it.
#[derive(Clone)]
pub struct KeyColumn {
    pub name: String,
    pub attno: NonZeroUsize,
    pub type_oid: pg_sys::Oid,
    pub typmod: i32,
}

impl KeyColumn {
    /// The key's type with its modifier, schema-qualified, for casts of key values: `char(2)`
    /// stays `char(2)` (a bare `character` is char(1), which would cut 'ab' to 'a').
    pub fn sql_type(&self) -> String {
        quote::type_with_modifier(self.type_oid, self.typmod)
    }
}

/// Raises an ERROR unless `key` is a NOT NULL column of `relation` with a unique index of its
/// own (one key column, no predicate): two rows with one key, or rows with none, would be
/// mixed up or lost when vectors are written back by key.
pub fn check_key(relation: &PgRelation, key: &str) -> KeyColumn {
    let table = catalog::display(relation.oid());
    let found = key_column(relation, key);
    let column =
        relation.tuple_desc().iter().find(|a| a.attnum as usize == found.attno.get()).copied().expect("found above");
    let unique = "SELECT EXISTS (SELECT FROM pg_catalog.pg_index i
                   WHERE i.indrelid OPERATOR(pg_catalog.=) $1 AND i.indisunique AND i.indisvalid
                     AND i.indnkeyatts OPERATOR(pg_catalog.=) 1 AND i.indpred IS NULL
                     AND i.indkey[0] OPERATOR(pg_catalog.=) $2)";
    let args = [spi::param(relation.oid(), pg_sys::REGCLASSOID), spi::text_param(column.attnum)];
    if !spi::one::<bool>(unique, &args).unwrap_or(false) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_OBJECT_DEFINITION,
            format!("embeddinggemma: key column \"{key}\" of table {table} is not unique"),
            format!("Name a column with a unique index (e.g. the primary key), or add one: CREATE UNIQUE INDEX ON {table} ({});", quote::ident(key)),
        )
    }
    if !column.attnotnull {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_OBJECT_DEFINITION,
            format!("embeddinggemma: key column \"{key}\" of table {table} allows NULL"),
            format!(
                "Rows with a NULL key could not be told apart: ALTER TABLE {table} ALTER COLUMN {} SET NOT NULL;",
                quote::ident(key)
            ),
        )
    }
    found
}

/// The key column `key` of `relation`, without the uniqueness check (made when the write path
/// was set up): for every row of a trigger.
pub fn key_column(relation: &PgRelation, key: &str) -> KeyColumn {
    let Some(column) = lookup_column(relation, key) else {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!(
                "embeddinggemma: key column \"{key}\" does not exist in table {}",
                catalog::display(relation.oid())
            ),
            "The first argument names a unique key of the table, e.g. its primary key.",
        )
    };
    KeyColumn {
        name: key.to_string(),
        attno: NonZeroUsize::new(column.attnum as usize).expect("user columns are numbered from 1"),
        type_oid: column.atttypid,
        typmod: column.atttypmod,
    }
}

#[pg_extern(sql = "")]
fn embeddinggemma_check_key(tbl: pg_sys::Oid, key_col: &str) {
    check_key(&open_checked(tbl), key_col);
}

/// The key of `tuple` in its type's binary form (its send function): the same bytes whatever
/// the session's DateStyle, TimeZone, extra_float_digits or bytea_output, so that another
/// session reads the same value back (`key_from_binary`).
///
/// # Safety
/// As `key_text`.
pub unsafe fn key_binary(
    tuple: *mut pg_sys::HeapTupleData,
    desc: pg_sys::TupleDesc,
    key: &KeyColumn,
) -> Option<Vec<u8>> {
    // SAFETY: per this function's contract; the send function of the key's own type returns a
    // palloc'd bytea.
    unsafe {
        let datum = pgrx::heap_getattr_raw(tuple, key.attno, desc)?;
        let (mut send, mut varlena) = (pg_sys::InvalidOid, false);
        pg_sys::getTypeBinaryOutputInfo(key.type_oid, &mut send, &mut varlena);
        let bytes = pg_sys::OidSendFunctionCall(send, datum);
        Some(pgrx::varlena::varlena_to_byte_slice(bytes.cast()).to_vec())
    }
}

/// The text form, in this session, of a key sent as `bytes` by `key_binary` (its type's
/// receive function, with the column's modifier, then its output function).
pub fn key_from_binary(key: &KeyColumn, bytes: &[u8]) -> String {
    // SAFETY: a StringInfo over a copy of the bytes, read by the type's own receive function
    // (which raises on malformed input); its output function returns a palloc'd C string.
    unsafe {
        let (mut receive, mut ioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
        pg_sys::getTypeBinaryInputInfo(key.type_oid, &mut receive, &mut ioparam);
        let buf = pg_sys::makeStringInfo();
        pg_sys::appendBinaryStringInfo(buf, bytes.as_ptr().cast(), bytes.len() as i32);
        let datum = pg_sys::OidReceiveFunctionCall(receive, buf, ioparam, key.typmod);
        let (mut output, mut varlena) = (pg_sys::InvalidOid, false);
        pg_sys::getTypeOutputInfo(key.type_oid, &mut output, &mut varlena);
        CStr::from_ptr(pg_sys::OidOutputFunctionCall(output, datum)).to_string_lossy().into_owned()
    }
}

/// The key of `tuple` as text (its type's output function).
///
/// # Safety
/// `tuple` must be a valid tuple of the relation with descriptor `desc`, and `key` must come
/// from `check_key` on that relation.
pub unsafe fn key_text(tuple: *mut pg_sys::HeapTupleData, desc: pg_sys::TupleDesc, key: &KeyColumn) -> Option<String> {
    // SAFETY: per this function's contract; the output function of the key's own type.
    unsafe {
        let datum = pgrx::heap_getattr_raw(tuple, key.attno, desc)?;
        let (mut output, mut varlena) = (pg_sys::InvalidOid, false);
        pg_sys::getTypeOutputInfo(key.type_oid, &mut output, &mut varlena);
        Some(CStr::from_ptr(pg_sys::OidOutputFunctionCall(output, datum)).to_string_lossy().into_owned())
    }
}
