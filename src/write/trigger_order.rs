//! Where a trigger fires among the relation's BEFORE ROW triggers (they fire in name order): a
//! BEFORE trigger that fires after ours may still change the text ours reads.

use std::ffi::CStr;

use pgrx::pg_sys;

/// Enabled BEFORE ROW triggers of `rel` that fire after `ours` on any of `events`
/// (`TRIGGER_TYPE_INSERT` / `_UPDATE` bits), in firing order. Triggers that cannot fire in this
/// session (`session_replication_role`), `suppress_redundant_updates_trigger` (it changes no
/// row) and the extension's own triggers (another target of the same text: they set only
/// vectors) do not count. A trigger with a `WHEN` condition counts: it may fire.
///
/// # Safety
/// `rel` is the open relation `ours` fires on.
pub unsafe fn later_before_triggers(rel: pg_sys::Relation, ours: *const pg_sys::Trigger, events: u32) -> Vec<String> {
    const ROW_BEFORE: i16 = (pg_sys::TRIGGER_TYPE_ROW | pg_sys::TRIGGER_TYPE_BEFORE) as i16;
    // SAFETY: reads a GUC variable of this backend.
    let replica = unsafe { pg_sys::SessionReplicationRole } == pg_sys::SESSION_REPLICATION_ROLE_REPLICA as i32;
    let fires = |enabled: std::ffi::c_char| match enabled as u8 {
        pg_sys::TRIGGER_FIRES_ALWAYS => true,
        pg_sys::TRIGGER_FIRES_ON_REPLICA => replica,
        pg_sys::TRIGGER_FIRES_ON_ORIGIN => !replica,
        _ => false,
    };
    // SAFETY: per the contract; trigdesc lists numtriggers triggers, in firing order.
    unsafe {
        let desc = (*rel).trigdesc;
        if desc.is_null() {
            return Vec::new();
        }
        let all = std::slice::from_raw_parts((*desc).triggers, (*desc).numtriggers as usize);
        let Some(at) = all.iter().position(|t| t.tgoid == (*ours).tgoid) else { return Vec::new() };
        all[at + 1..]
            .iter()
            .filter(|t| t.tgtype & ROW_BEFORE == ROW_BEFORE && t.tgtype & events as i16 != 0 && fires(t.tgenabled))
            .filter(|t| t.tgfoid != pg_sys::Oid::from(pg_sys::F_SUPPRESS_REDUNDANT_UPDATES_TRIGGER))
            .filter(|t| !same_library(t.tgfoid, (*ours).tgfoid))
            .map(|t| CStr::from_ptr(t.tgname).to_string_lossy().into_owned())
            .collect()
    }
}

/// Whether C functions `a` and `b` come from the same library (asked only when a later trigger
/// exists: a table without one costs no catalog lookup).
fn same_library(a: pg_sys::Oid, b: pg_sys::Oid) -> bool {
    // Two targets through one trigger function (the common case) need no lookup.
    if a == b {
        return true;
    }
    let sql = "SELECT a.prolang OPERATOR(pg_catalog.=) b.prolang AND a.probin OPERATOR(pg_catalog.=) b.probin
                 FROM pg_catalog.pg_proc a, pg_catalog.pg_proc b WHERE a.oid OPERATOR(pg_catalog.=) $1 AND b.oid OPERATOR(pg_catalog.=) $2";
    crate::pg::spi::one::<bool>(
        sql,
        &[crate::pg::spi::param(a, pg_sys::OIDOID), crate::pg::spi::param(b, pg_sys::OIDOID)],
    ) == Some(true)
}
