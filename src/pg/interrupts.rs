//! Waiting in a backend: PostgreSQL's interrupts served while it waits, and the wait shown in
//! `pg_stat_activity`.

use pgrx::pg_sys;

/// Serves interrupts if any are pending: raises their ERROR (or exits on FATAL).
pub fn serve_interrupts() {
    // SAFETY: a volatile read of a sig_atomic_t flag set by signal handlers.
    if unsafe { std::ptr::read_volatile(&raw const pg_sys::InterruptPending) } != 0 {
        pg_sys::check_for_interrupts!();
    }
}

/// Reports the wait in pg_stat_activity (wait_event_type 'Extension') while it lasts; an
/// ERROR's cleanup clears it too.
pub struct WaitEvent;

impl WaitEvent {
    pub fn start() -> WaitEvent {
        // SAFETY: sets this backend's own wait-event slot.
        unsafe { pg_sys::pgstat_report_wait_start(pg_sys::PG_WAIT_EXTENSION) };
        WaitEvent
    }
}

impl Drop for WaitEvent {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { pg_sys::pgstat_report_wait_end() };
    }
}
