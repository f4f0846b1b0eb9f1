//! Whose rights code runs with: switching to a role for a while, and the checks that the
//! current role may act on a table.

use pgrx::{pg_sys, PgSqlErrorCode};

use super::catalog::{display, relation_name};
use super::errors::raise;

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
