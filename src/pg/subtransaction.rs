//! An ERROR caught inside a transaction that goes on: only safe in a subtransaction, rolled
//! back as PL/pgSQL's `EXCEPTION` blocks roll theirs back (locks, buffers, memory released).

use std::panic::AssertUnwindSafe;

use pgrx::prelude::*;

/// Runs `f` in an internal subtransaction; an ERROR rolls it back and comes back as `None`.
pub fn try_in_subtransaction<R>(f: impl FnOnce() -> R) -> Option<R> {
    // SAFETY: called inside a transaction; the subtransaction begun here is released or rolled
    // back here, and the caller's memory context and resource owner are restored, as
    // pl_exec.c's exec_stmt_block does.
    unsafe {
        let (context, owner) = (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner);
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
        let done = PgTryBuilder::new(AssertUnwindSafe(|| Some(f()))).catch_others(|_| None).execute();
        if done.is_some() {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
        done
    }
}
