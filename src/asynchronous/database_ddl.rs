//! DDL that needs every session to leave a database — DROP DATABASE, ALTER DATABASE … RENAME
//! or SET TABLESPACE, CREATE DATABASE … TEMPLATE — finds the database's asynchronous worker
//! gone: the utility hook (`utility_hook`, while preloading) holds the database (no worker
//! starts for it), asks its worker to leave, and waits for it before the command runs. Without it a
//! database owner could not drop a database with targets, and a forced drop would leave a
//! worker trying to come back.

use std::ffi::CStr;
use std::time::Duration;

use pgrx::pg_sys;

use super::registry;

/// How long the database stays held if the command fails before it ends the hold.
const HOLD: Duration = Duration::from_secs(60);
/// How long the command waits for the worker to leave (a batch in hand is cancelled).
const LEAVE_WAIT: Duration = Duration::from_secs(20);

/// The name in a `DefElem` list's option `name`, if given.
///
/// # Safety
/// `options` is a List of DefElem (or NULL).
unsafe fn option_name(options: *mut pg_sys::List, name: &CStr) -> Option<String> {
    // SAFETY: per the contract.
    let options: Vec<*mut pg_sys::DefElem> =
        unsafe { pgrx::PgList::<pg_sys::DefElem>::from_pg(options) }.iter_ptr().collect();
    options.into_iter().find_map(|d| {
        // SAFETY: a DefElem of the statement; defGetString reads its argument as PostgreSQL does.
        unsafe {
            (!(*d).defname.is_null() && CStr::from_ptr((*d).defname) == name && !(*d).arg.is_null())
                .then(|| CStr::from_ptr(pg_sys::defGetString(d)).to_string_lossy().into_owned())
        }
    })
}

/// The database a statement needs every session out of, if any.
///
/// # Safety
/// `node` is a parsed utility statement.
unsafe fn emptied_database(node: *mut pg_sys::Node) -> Option<String> {
    let text = |p: *const std::ffi::c_char| {
        // SAFETY: a NUL-terminated name of the statement.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    // SAFETY: per the contract; each cast follows the node's tag.
    unsafe {
        match (*node).type_ {
            pg_sys::NodeTag::T_DropdbStmt => text((*(node as *mut pg_sys::DropdbStmt)).dbname),
            pg_sys::NodeTag::T_CreatedbStmt => option_name((*(node as *mut pg_sys::CreatedbStmt)).options, c"template"),
            // Only SET TABLESPACE needs the database empty (CONNECTION LIMIT, ALLOW_CONNECTIONS,
            // IS_TEMPLATE do not).
            pg_sys::NodeTag::T_AlterDatabaseStmt => {
                let stmt = node as *mut pg_sys::AlterDatabaseStmt;
                option_name((*stmt).options, c"tablespace").and(text((*stmt).dbname))
            }
            pg_sys::NodeTag::T_RenameStmt => {
                let stmt = node as *mut pg_sys::RenameStmt;
                ((*stmt).renameType == pg_sys::ObjectType::OBJECT_DATABASE).then(|| text((*stmt).subname)).flatten()
            }
            _ => None,
        }
    }
}

/// Before a utility statement: the database it needs every session out of, held and emptied of
/// its worker (release it with `release` whatever happens next).
///
/// # Safety
/// `node` is a parsed utility statement.
pub unsafe fn hold_for(node: *mut pg_sys::Node) -> Option<pg_sys::Oid> {
    // SAFETY: per the contract.
    let name = unsafe { emptied_database(node) };
    let cname = name.and_then(|n| std::ffi::CString::new(n).ok());
    // SAFETY: a catalog lookup by name; missing_ok.
    let db =
        cname.map(|n| unsafe { pg_sys::get_database_oid(n.as_ptr(), true) }).filter(|db| *db != pg_sys::InvalidOid);
    // Only a role the command may succeed for (the database's owner, a superuser) moves the
    // worker: anyone else's attempt fails in PostgreSQL's own check, and must not disturb it.
    let db = db.filter(|db| may_empty(*db))?;
    if !registry::hold_and_empty(db, HOLD, LEAVE_WAIT) {
        pgrx::log!("embeddinggemma async: the worker of database {} did not leave in time", db.to_u32());
    }
    Some(db)
}

/// After the statement (or its failure): the held database is served again if still there.
pub fn release(db: pg_sys::Oid) {
    registry::unhold(db);
    // Still there (a failed DROP, a RENAME, a template copied): served again.
    if database_exists(db) {
        registry::want(db, registry::now_ms());
    }
}

/// After `CREATE DATABASE`: the new database (a copy of a template, targets included) is
/// served without waiting for the launcher's rescan.
///
/// # Safety
/// `node` is a parsed utility statement.
pub unsafe fn created(node: *mut pg_sys::Node) {
    // SAFETY: per the contract; the cast follows the node's tag.
    let name = unsafe {
        if (*node).type_ != pg_sys::NodeTag::T_CreatedbStmt {
            return;
        }
        (*(node as *mut pg_sys::CreatedbStmt)).dbname
    };
    if name.is_null() {
        return;
    }
    // SAFETY: a catalog lookup by the statement's NUL-terminated name; missing_ok.
    let db = unsafe { pg_sys::get_database_oid(name, true) };
    if db != pg_sys::InvalidOid {
        registry::want(db, registry::now_ms());
    }
}

/// Whether the current role owns database `db` or is a superuser.
fn may_empty(db: pg_sys::Oid) -> bool {
    // SAFETY: catalog checks of the current role.
    unsafe { pg_sys::superuser() || owns_database(db) }
}

#[cfg(not(feature = "pg15"))]
unsafe fn owns_database(db: pg_sys::Oid) -> bool {
    // SAFETY: a catalog check of an existing database.
    unsafe { pg_sys::object_ownercheck(pg_sys::DatabaseRelationId, db, pg_sys::GetUserId()) }
}

#[cfg(feature = "pg15")]
unsafe fn owns_database(db: pg_sys::Oid) -> bool {
    // SAFETY: a catalog check of an existing database.
    unsafe { pg_sys::pg_database_ownercheck(db, pg_sys::GetUserId()) }
}

fn database_exists(db: pg_sys::Oid) -> bool {
    // SAFETY: a syscache probe by OID; NULL when the database is gone.
    !unsafe { pg_sys::get_database_name(db) }.is_null()
}
