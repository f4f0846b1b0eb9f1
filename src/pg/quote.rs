//! Names in the SQL the extension runs on users' tables, written as an attacker reads it:
//! every relation is named by schema and name from its OID, every type schema-qualified, every
//! function and operator in `pg_catalog`, so that nothing in it resolves through the caller's
//! `search_path` (which it runs under, so that the tables' own triggers behave as usual).

use pgrx::pg_sys;

use super::catalog::{owned, relation_name};

/// `name` as a quoted identifier.
pub fn ident(name: &str) -> String {
    pgrx::spi::quote_identifier(name)
}

/// `name` as a quoted literal.
pub fn literal(text: &str) -> String {
    pgrx::spi::quote_literal(text)
}

/// `"schema"."relation"` of the relation `oid`.
pub fn relation(oid: pg_sys::Oid) -> String {
    let name = relation_name(oid);
    // SAFETY: catalog lookups of an existing relation's schema.
    let schema = owned(unsafe { pg_sys::get_namespace_name(pg_sys::get_rel_namespace(oid)) }).unwrap_or_default();
    format!("{}.{}", ident(&schema), ident(&name))
}

/// The type `oid` with the modifier `typmod` (`character(2)`, `numeric(10,2)`), schema-qualified
/// where it has a schema.
pub fn type_with_modifier(oid: pg_sys::Oid, typmod: i32) -> String {
    let flags = pg_sys::FORMAT_TYPE_TYPEMOD_GIVEN | pg_sys::FORMAT_TYPE_FORCE_QUALIFY;
    // SAFETY: format_type_extended returns a palloc'd string (raising for an unknown OID).
    owned(unsafe { pg_sys::format_type_extended(oid, typmod, flags as pg_sys::bits16) }).unwrap_or_default()
}

/// The rows of table `oid` in a FROM or UPDATE clause: `ONLY` the table itself (rows of
/// inheritance children added later are not its rows), or a partitioned table with its
/// partitions.
pub fn table_rows(oid: pg_sys::Oid) -> String {
    // SAFETY: a syscache lookup of an existing relation's kind.
    let partitioned = unsafe { pg_sys::get_rel_relkind(oid) } == pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char;
    if partitioned {
        relation(oid)
    } else {
        format!("ONLY {}", relation(oid))
    }
}
