//! Catalog lookups by OID or by name (never through a `search_path`): relations, schemas,
//! roles, the extension's own relations.

use std::ffi::{CStr, CString};

#[cfg(feature = "pg15")]
use pgrx::datum::DatumWithOid;
use pgrx::{pg_sys, IntoDatum, PgSqlErrorCode};

use super::errors::raise;
use super::quote;

pub(super) fn owned(p: *const std::ffi::c_char) -> Option<String> {
    // SAFETY: PostgreSQL returns NULL or a palloc'd NUL-terminated string.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// The relation's name (unqualified), or an ERROR if there is none with this OID.
pub fn relation_name(oid: pg_sys::Oid) -> String {
    // SAFETY: a catalog lookup; NULL when no such relation.
    owned(unsafe { pg_sys::get_rel_name(oid) }).unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            format!("embeddinggemma: no relation with OID {}", oid.to_u32()),
            "Pass a table name, e.g. 'docs'::regclass.",
        )
    })
}

/// The OID of `name` in the schema `schema` (no search_path involved), if there is one.
pub fn relation_in(schema: pg_sys::Oid, name: &str) -> Option<pg_sys::Oid> {
    let name = CString::new(name).ok()?;
    // SAFETY: a catalog lookup by name and schema OID.
    let oid = unsafe { pg_sys::get_relname_relid(name.as_ptr(), schema) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// The OID of the schema `name`, if there is one.
pub fn schema_oid(name: &str) -> Option<pg_sys::Oid> {
    let name = CString::new(name).ok()?;
    // SAFETY: a catalog lookup by name; missing_ok.
    let oid = unsafe { pg_sys::get_namespace_oid(name.as_ptr(), true) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// The schema of extension `name`.
/// Whether extension `name` is installed in this database (DDL hooks run without it too).
pub fn extension_installed(name: &CStr) -> bool {
    // SAFETY: a catalog lookup, missing_ok.
    unsafe { pg_sys::get_extension_oid(name.as_ptr(), true) != pg_sys::InvalidOid }
}

pub fn extension_schema(name: &CStr) -> pg_sys::Oid {
    // SAFETY: catalog lookups; get_extension_oid(missing_ok = false) raises when not installed.
    unsafe {
        let extension = pg_sys::get_extension_oid(name.as_ptr(), false);
        extension_namespace(extension)
    }
}

#[cfg(not(feature = "pg15"))]
unsafe fn extension_namespace(extension: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: per the caller; an existing extension's OID.
    unsafe { pg_sys::get_extension_schema(extension) }
}

/// PostgreSQL 15 has no get_extension_schema(): read pg_extension.
#[cfg(feature = "pg15")]
unsafe fn extension_namespace(extension: pg_sys::Oid) -> pg_sys::Oid {
    let query = "SELECT extnamespace FROM pg_catalog.pg_extension WHERE oid OPERATOR(pg_catalog.=) $1";
    // SAFETY: a typed parameter of the right type.
    let args = [unsafe { DatumWithOid::new(extension, pg_sys::OIDOID) }];
    super::spi::one::<pg_sys::Oid>(query, &args).unwrap_or(pg_sys::InvalidOid)
}

/// The name of the schema `oid`.
pub fn schema_name(oid: pg_sys::Oid) -> String {
    // SAFETY: a catalog lookup; NULL for an unknown OID.
    owned(unsafe { pg_sys::get_namespace_name(oid) }).unwrap_or_default()
}

/// The name of the role `oid`.
pub fn role_name(oid: pg_sys::Oid) -> String {
    // SAFETY: a catalog lookup; noerr = true gives NULL for an unknown OID.
    owned(unsafe { pg_sys::GetUserNameFromId(oid, true) }).unwrap_or_default()
}

/// The relation as `regclass` prints it (qualified only where the search_path would not find
/// it): for messages and hints, which the user reads in their own terms.
pub fn display(oid: pg_sys::Oid) -> String {
    // SAFETY: regclassout takes an OID datum and returns a palloc'd C string.
    unsafe { pgrx::direct_function_call::<&CStr>(pg_sys::regclassout, &[oid.into_datum()]) }
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| oid.to_u32().to_string())
}

/// The extension's own table `name`: its qualified name and its owner (whose rights the
/// extension's code writes it with).
pub fn extension_table(name: &str) -> (String, pg_sys::Oid) {
    let oid = extension_relation(name);
    // SAFETY: an existing relation, opened to read its owner.
    let owner = unsafe { (*pgrx::PgRelation::open(oid).rd_rel).relowner };
    (quote::relation(oid), owner)
}

/// The OID of the extension's own relation (table, sequence) `name`; raises when it is missing.
pub fn extension_relation(name: &str) -> pg_sys::Oid {
    relation_in(extension_schema(c"embeddinggemma"), name).unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            format!("embeddinggemma: the extension's relation {name} is missing"),
            "ALTER EXTENSION embeddinggemma UPDATE brings an install up to date.",
        )
    })
}

/// The owner of the relation `oid`.
pub fn relation_owner(oid: pg_sys::Oid) -> pg_sys::Oid {
    relation_name(oid);
    // SAFETY: an existing relation (checked above), opened to read its owner.
    unsafe { (*pgrx::PgRelation::open(oid).rd_rel).relowner }
}

/// `relation` and every partition or inheritance child under it, at any depth.
pub fn family(relation: pg_sys::Oid) -> Vec<pg_sys::Oid> {
    let sql = "WITH RECURSIVE f(oid) AS (SELECT $1::pg_catalog.oid UNION
                 SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN f ON i.inhparent OPERATOR(pg_catalog.=) f.oid)
               SELECT pg_catalog.array_agg(oid) FROM f";
    super::spi::one::<Vec<pg_sys::Oid>>(sql, &[super::spi::text_param(relation)]).unwrap_or_default()
}
