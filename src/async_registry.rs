//! The asynchronous workers, one per database with targets, in shared memory: which database
//! each serves and its process, so that registering a target starts one where none runs and a
//! write wakes it at once instead of at its next poll.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};

use pgrx::pg_sys;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic};

/// Databases served at once (a worker beyond this many exits, saying so in the log).
pub const SLOTS: usize = 32;

#[repr(C)]
#[derive(Default)]
pub struct Workers {
    db: [AtomicU32; SLOTS],
    pid: [AtomicI32; SLOTS],
    /// Set while the worker waits for work: only then does a write need to wake it.
    sleeping: [AtomicBool; SLOTS],
}

// SAFETY: plain atomics, valid in any process that maps the segment.
unsafe impl PGRXSharedMemory for Workers {}

// SAFETY: the name is ours alone.
static WORKERS: PgAtomic<Workers> = unsafe { PgAtomic::new(c"embeddinggemma_async_workers") };

/// From `_PG_init` while preloading.
pub fn init() {
    pg_shmem_init!(WORKERS);
}

fn alive(pid: i32) -> bool {
    // SAFETY: looks the process up in the proc array.
    pid != 0 && !unsafe { pg_sys::BackendPidGetProc(pid) }.is_null()
}

/// The slot of the worker serving `db`, if one runs.
fn serving(db: pg_sys::Oid) -> Option<usize> {
    let w = WORKERS.get();
    (0..SLOTS).find(|&i| w.db[i].load(Ordering::Acquire) == db.to_u32() && alive(w.pid[i].load(Ordering::Acquire)))
}

pub fn running(db: pg_sys::Oid) -> bool {
    serving(db).is_some()
}

/// Takes a slot for this process serving `db`; None when another worker serves it already
/// (or every slot is taken).
pub fn claim(db: pg_sys::Oid) -> Option<usize> {
    // SAFETY: this process's pid.
    let me = unsafe { pg_sys::MyProcPid };
    if serving(db).is_some_and(|i| WORKERS.get().pid[i].load(Ordering::Acquire) != me) {
        return None;
    }
    let w = WORKERS.get();
    for i in 0..SLOTS {
        let pid = w.pid[i].load(Ordering::Acquire);
        if (pid == 0 || !alive(pid)) && w.pid[i].compare_exchange(pid, me, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            w.db[i].store(db.to_u32(), Ordering::Release);
            // Two workers may have raced for the same database: the lower slot stays.
            if (0..i).any(|j| w.db[j].load(Ordering::Acquire) == db.to_u32() && alive(w.pid[j].load(Ordering::Acquire))) {
                release(i);
                return None;
            }
            return Some(i);
        }
    }
    None
}

pub fn release(slot: usize) {
    let w = WORKERS.get();
    w.db[slot].store(0, Ordering::Release);
    w.pid[slot].store(0, Ordering::Release);
}

pub fn set_sleeping(slot: usize, sleeping: bool) {
    WORKERS.get().sleeping[slot].store(sleeping, Ordering::Release);
}

/// Wakes the worker serving `db` if it is waiting for work.
pub fn wake(db: pg_sys::Oid) {
    // Writes call this per row: the flag first, the proc array (a shared lock) only when set.
    let w = WORKERS.get();
    let sleeping = |i: usize| w.db[i].load(Ordering::Acquire) == db.to_u32() && w.sleeping[i].load(Ordering::Acquire);
    let Some(i) = (0..SLOTS).find(|&i| sleeping(i) && alive(w.pid[i].load(Ordering::Acquire))) else { return };
    if w.sleeping[i].swap(false, Ordering::AcqRel) {
        // SAFETY: the proc of a live process; SetLatch is safe on another process's latch.
        unsafe {
            let proc = pg_sys::BackendPidGetProc(w.pid[i].load(Ordering::Acquire));
            if !proc.is_null() {
                pg_sys::SetLatch(&raw mut (*proc).procLatch);
            }
        }
    }
}
