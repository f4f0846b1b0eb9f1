//! The SQL the extension runs on users' tables, written as an attacker reads it: every relation
//! is named by schema and name from its OID, every type schema-qualified, every function and
//! operator in `pg_catalog`, so that nothing in it resolves through the caller's `search_path`
//! (which it runs under, so that the tables' own triggers behave as usual).

use std::ffi::{CStr, CString};

use pgrx::datum::DatumWithOid;
use pgrx::{pg_sys, IntoDatum, PgSqlErrorCode};

use crate::errors::raise;

/// `name` as a quoted identifier.
pub fn ident(name: &str) -> String {
    pgrx::spi::quote_identifier(name)
}

/// `name` as a quoted literal.
pub fn literal(text: &str) -> String {
    pgrx::spi::quote_literal(text)
}

fn owned(p: *const std::ffi::c_char) -> Option<String> {
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
    one::<pg_sys::Oid>(query, &args).unwrap_or(pg_sys::InvalidOid)
}

/// The first column of the first row `sql` returns (None for no row or NULL). Run as SPI runs writes, so that it sees
/// this transaction's earlier writes (a read-only SPI query keeps the caller's snapshot).
pub fn one<T: pgrx::FromDatum + IntoDatum>(sql: &str, args: &[DatumWithOid]) -> Option<T> {
    pgrx::spi::Spi::connect_mut(|c| {
        let rows = c.update(sql, Some(1), args)?;
        if rows.is_empty() {
            return Ok(None);
        }
        rows.first().get_one::<T>()
    })
    .expect("SPI reports errors as ERRORs")
}

/// Runs `sql` (a write), returning how many rows it processed.
pub fn run(sql: &str, args: &[DatumWithOid]) -> usize {
    pgrx::spi::Spi::connect_mut(|c| c.update(sql, None, args).map(|t| t.len())).expect("SPI reports errors as ERRORs")
}

/// A SQL parameter of type `oid` from `value`.
pub fn param<'a, T: IntoDatum>(value: T, oid: pg_sys::Oid) -> DatumWithOid<'a> {
    // SAFETY: callers pass the OID of the type `value` converts to.
    unsafe { DatumWithOid::new(value, oid) }
}

/// A text parameter.
pub fn text_param<'a, T: IntoDatum>(value: T) -> DatumWithOid<'a> {
    param(value, T::type_oid())
}

/// Runs `f` with the rights of `role`, as a `SECURITY DEFINER` function would (and, like one,
/// unable to change session state: a restricted operation); the caller's rights come back when
/// it returns or an ERROR unwinds it.
pub fn as_role<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    struct Restore(pg_sys::Oid, i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: restores the user and context saved below.
            unsafe { pg_sys::SetUserIdAndSecContext(self.0, self.1) }
        }
    }
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    // SAFETY: reads and sets this backend's current user, as fmgr_security_definer does.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        let restricted = (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION) as i32;
        pg_sys::SetUserIdAndSecContext(role, context | restricted);
    }
    let _restore = Restore(user, context);
    f()
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

/// The role this code runs as.
pub fn current_role() -> pg_sys::Oid {
    // SAFETY: reads this backend's current user.
    unsafe { pg_sys::GetUserId() }
}

/// Raises an ERROR unless the current role has `mode` (ACL_UPDATE, …) on `relation`.
pub fn require_privilege(relation: pg_sys::Oid, mode: u32, what: &str) {
    // SAFETY: a privilege check of an existing relation.
    let ok = unsafe { pg_sys::pg_class_aclcheck(relation, current_role(), mode as pg_sys::AclMode) }
        == pg_sys::AclResult::ACLCHECK_OK;
    if !ok {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("embeddinggemma: permission denied to {what} table {}", relation_name(relation)),
            "The owner of the table can GRANT the privilege, or run it.",
        )
    }
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
    (relation(oid), owner)
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

/// Raises an ERROR unless the current role owns `relation` (or is a superuser).
pub fn require_owner(relation: pg_sys::Oid, what: &str) {
    if !owns(relation) {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("embeddinggemma: must be the owner of table {} to {what}", display(relation)),
            "Its background work runs with the table owner's rights, so only the owner may set it up.",
        )
    }
}

#[cfg(not(feature = "pg15"))]
fn owns(relation: pg_sys::Oid) -> bool {
    // SAFETY: a catalog check of an existing relation.
    unsafe { pg_sys::object_ownercheck(pg_sys::RelationRelationId, relation, current_role()) }
}

#[cfg(feature = "pg15")]
fn owns(relation: pg_sys::Oid) -> bool {
    // SAFETY: a catalog check of an existing relation.
    unsafe { pg_sys::pg_class_ownercheck(relation, current_role()) }
}
