//! Where a trigger fires among the relation's BEFORE ROW triggers (they fire in name order): a
//! BEFORE trigger that fires after ours may still change the text ours reads.

use std::ffi::CStr;

use pgrx::pg_sys;

use crate::pg::spi;

/// The first enabled BEFORE ROW trigger of `rel` that fires after `ours` on any of `events`
/// (`TRIGGER_TYPE_INSERT` / `_UPDATE` bits), by name. The extension's own triggers (another
/// target of the same text) set only vectors and do not count.
///
/// # Safety
/// `rel` is the open relation `ours` fires on.
pub unsafe fn later_before_trigger(rel: pg_sys::Relation, ours: *const pg_sys::Trigger, events: u32) -> Option<String> {
    const ROW_BEFORE: i16 = (pg_sys::TRIGGER_TYPE_ROW | pg_sys::TRIGGER_TYPE_BEFORE) as i16;
    // SAFETY: per the contract; trigdesc lists numtriggers triggers, in firing order.
    unsafe {
        let desc = (*rel).trigdesc;
        if desc.is_null() {
            return None;
        }
        let all = std::slice::from_raw_parts((*desc).triggers, (*desc).numtriggers as usize);
        let at = all.iter().position(|t| t.tgoid == (*ours).tgoid)?;
        all[at + 1..]
            .iter()
            .filter(|t| {
                t.tgtype & ROW_BEFORE == ROW_BEFORE
                    && t.tgtype & events as i16 != 0
                    && t.tgenabled != pg_sys::TRIGGER_DISABLED as std::ffi::c_char
            })
            .find(|t| !same_library(t.tgfoid, (*ours).tgfoid))
            .map(|t| CStr::from_ptr(t.tgname).to_string_lossy().into_owned())
    }
}

/// Whether C functions `a` and `b` come from the same library (asked only when a later trigger
/// exists: the common case costs no catalog lookup).
fn same_library(a: pg_sys::Oid, b: pg_sys::Oid) -> bool {
    let sql = "SELECT a.prolang OPERATOR(pg_catalog.=) b.prolang AND a.probin OPERATOR(pg_catalog.=) b.probin
                 FROM pg_catalog.pg_proc a, pg_catalog.pg_proc b WHERE a.oid OPERATOR(pg_catalog.=) $1 AND b.oid OPERATOR(pg_catalog.=) $2";
    spi::one::<bool>(sql, &[spi::param(a, pg_sys::OIDOID), spi::param(b, pg_sys::OIDOID)]) == Some(true)
}
