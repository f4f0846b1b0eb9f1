//! In-process embedding keeps its freed activation blocks (see the engine's `ReusingAllocator`)
//! until the transaction ends rather than the call: `UPDATE … SET v = embed(body)` makes one
//! call per row, and faulting a row's activations in again each time cost about 30 ms a row.
//! At commit or abort they go back to the system; the cache never exceeds `CACHE_LIMIT`.

use std::cell::{Cell, RefCell};

use embeddinggemma_engine::reuse_alloc::ReuseScope;
use pgrx::pg_sys;

thread_local! {
    static HELD: RefCell<Option<ReuseScope>> = const { RefCell::new(None) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Keeps freed activations for reuse until this transaction ends. Backend thread only.
pub fn hold_until_transaction_end() {
    if !REGISTERED.replace(true) {
        // SAFETY: registers a plain function, once per backend, from the backend's thread.
        unsafe { pg_sys::RegisterXactCallback(Some(at_transaction_end), std::ptr::null_mut()) };
    }
    HELD.with(|held| {
        held.borrow_mut().get_or_insert_with(ReuseScope::enter);
    });
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn at_transaction_end(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    if matches!(
        event,
        XACT_EVENT_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PREPARE
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_PARALLEL_ABORT
    ) {
        // Frees the blocks unless a call's worker still runs (cancelled); its scope frees them.
        drop(HELD.with(|held| held.borrow_mut().take()));
    }
}
