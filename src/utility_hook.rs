//! The extension's utility hook (installed when the library loads): DDL the extension follows.
//! - Renames of a column, a table or a schema, and a table moved to another schema, that
//!   synchronous triggers name (`trigger_renames`); a dropped column they name gets a WARNING.
//! - A partition attached to a table with asynchronous targets: its rows are queued.
//! - A source column retyped (its texts may be rewritten by `USING` without any row trigger):
//!   asynchronous targets re-embed it, synchronous triggers get a WARNING.
//! - While preloaded, DDL that needs every session out of a database finds its asynchronous
//!   worker gone (`asynchronous::database_ddl`); a new database is served at once.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::asynchronous::database_ddl;
use crate::embedding::service_state;
use crate::write::trigger_renames;

static mut PREVIOUS: pg_sys::ProcessUtility_hook_type = None;

/// From `_PG_init`.
pub fn install() {
    // SAFETY: _PG_init runs once per process before any statement; hooks chain as PostgreSQL's
    // own extensions chain them.
    unsafe {
        PREVIOUS = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

fn text(p: *const std::ffi::c_char) -> Option<String> {
    // SAFETY: a NUL-terminated name of a statement.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// The relation a statement's RangeVar names, if it exists (no lock: the statement takes its own).
///
/// # Safety
/// `rv` is a RangeVar of a parsed statement, or NULL.
unsafe fn relation_of(rv: *mut pg_sys::RangeVar) -> Option<pg_sys::Oid> {
    if rv.is_null() {
        return None;
    }
    // SAFETY: per the contract; missing_ok.
    let oid = unsafe {
        pg_sys::RangeVarGetRelidExtended(
            rv,
            pg_sys::NoLock as pg_sys::LOCKMODE,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        )
    };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// What to do once the statement has run.
#[derive(Default)]
struct After {
    rewrites: Vec<trigger_renames::Rewrite>,
    retyped: Vec<(pg_sys::Oid, String)>,
    dropped: Vec<(pg_sys::Oid, String)>,
    attached: Vec<pg_sys::Oid>,
}

/// # Safety
/// `node` is a parsed utility statement.
unsafe fn before(node: *mut pg_sys::Node) -> After {
    let mut after = After::default();
    // SAFETY: per the contract; each cast follows the node's tag.
    unsafe {
        match (*node).type_ {
            pg_sys::NodeTag::T_RenameStmt
                if (*(node as *mut pg_sys::RenameStmt)).renameType == pg_sys::ObjectType::OBJECT_SCHEMA =>
            {
                let stmt = node as *mut pg_sys::RenameStmt;
                if let (Some(old), Some(new)) = (text((*stmt).subname), text((*stmt).newname)) {
                    after.rewrites = trigger_renames::schema_renamed(&old, &new);
                }
            }
            pg_sys::NodeTag::T_AlterObjectSchemaStmt => {
                let stmt = node as *mut pg_sys::AlterObjectSchemaStmt;
                if (*stmt).objectType == pg_sys::ObjectType::OBJECT_TABLE {
                    if let (Some(relation), Some(schema)) = (relation_of((*stmt).relation), text((*stmt).newschema)) {
                        after.rewrites = trigger_renames::table_moved(relation, &schema);
                    }
                }
            }
            pg_sys::NodeTag::T_RenameStmt => {
                let stmt = node as *mut pg_sys::RenameStmt;
                let (Some(relation), Some(new)) = (relation_of((*stmt).relation), text((*stmt).newname)) else {
                    return after;
                };
                after.rewrites = match (*stmt).renameType {
                    pg_sys::ObjectType::OBJECT_COLUMN => match text((*stmt).subname) {
                        Some(old) => trigger_renames::column_renamed(relation, &old, &new),
                        None => Vec::new(),
                    },
                    pg_sys::ObjectType::OBJECT_TABLE => trigger_renames::table_renamed(relation, &new),
                    _ => Vec::new(),
                };
            }
            pg_sys::NodeTag::T_AlterTableStmt => {
                let stmt = node as *mut pg_sys::AlterTableStmt;
                let Some(relation) = relation_of((*stmt).relation) else { return after };
                for cmd in pgrx::PgList::<pg_sys::AlterTableCmd>::from_pg((*stmt).cmds).iter_ptr() {
                    match (*cmd).subtype {
                        pg_sys::AlterTableType::AT_AlterColumnType => {
                            after.retyped.extend(text((*cmd).name).map(|c| (relation, c)))
                        }
                        pg_sys::AlterTableType::AT_DropColumn => {
                            after.dropped.extend(text((*cmd).name).map(|c| (relation, c)))
                        }
                        pg_sys::AlterTableType::AT_AttachPartition if !(*cmd).def.is_null() => {
                            after.attached.extend(relation_of((*((*cmd).def as *mut pg_sys::PartitionCmd)).name))
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    after
}

fn after(after: After) {
    trigger_renames::apply(after.rewrites);
    for (relation, column) in after.retyped {
        trigger_renames::source_retyped(relation, &column);
        if service_state::preloaded() {
            crate::asynchronous::targets::source_retyped(relation, &column);
        }
    }
    for (relation, column) in after.dropped {
        trigger_renames::column_dropped(relation, &column);
    }
    if service_state::preloaded() {
        after.attached.into_iter().for_each(crate::asynchronous::targets::partition_attached);
    }
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: PostgreSQL passes a planned utility statement.
    let node = unsafe { (*pstmt).utilityStmt };
    let run = || {
        // SAFETY: the arguments PostgreSQL passed, handed on to the next hook or the standard
        // implementation.
        unsafe {
            match PREVIOUS {
                Some(previous) => previous(pstmt, query, read_only_tree, context, params, env, dest, qc),
                None => pg_sys::standard_ProcessUtility(pstmt, query, read_only_tree, context, params, env, dest, qc),
            }
        }
    };
    // SAFETY: the statement's parse tree.
    let follow = unsafe { before(node) };
    // SAFETY: as above.
    let held = if service_state::preloaded() { unsafe { database_ddl::hold_for(node) } } else { None };
    match held {
        None => run(),
        Some(db) => {
            PgTryBuilder::new(std::panic::AssertUnwindSafe(run)).finally(|| database_ddl::release(db)).execute()
        }
    }
    after(follow);
    if service_state::preloaded() {
        // SAFETY: as above.
        unsafe { database_ddl::created(node) };
    }
}
