//! The asynchronous workers in shared memory. A worker serves one database for a while; the
//! launcher starts workers for the databases that want one, at most
//! `embeddinggemma.async_max_workers` at a time, in the order they asked. Here: which database
//! each running worker serves (so a write wakes it instead of waiting for its next poll), which
//! databases want a worker and from when, and which databases are held by a DDL command (DROP,
//! RENAME, a CREATE … TEMPLATE of them) that needs every session to leave.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::{pg_shmem_init, PgAtomic};

/// Workers at once, at most (the upper bound of `embeddinggemma.async_max_workers`).
const SLOTS: usize = crate::pg::guc::ASYNC_WORKER_SLOTS;
/// Databases waiting for a worker, at most; beyond it the launcher looks at every database.
const WANTED: usize = 128;
/// How long a worker asked to leave may take to notice the cancel before it is terminated.
const CANCEL_GRACE: Duration = Duration::from_secs(2);
/// Databases held by DDL at once.
const HELD: usize = 16;

#[repr(C)]
pub struct Registry {
    db: [AtomicU32; SLOTS],
    pid: [AtomicI32; SLOTS],
    /// Set while the worker waits for work: only then does a write need to wake it.
    sleeping: [AtomicBool; SLOTS],
    /// Set by a DDL command on the worker's database: it leaves at once.
    leave: [AtomicBool; SLOTS],
    wanted: [AtomicU32; WANTED],
    /// When each wanted database's work is due (milliseconds since the epoch).
    due: [AtomicU64; WANTED],
    /// More databases wanted a worker than `wanted` holds.
    overflow: AtomicBool,
    held: [AtomicU32; HELD],
    held_until: [AtomicU64; HELD],
    launcher: AtomicI32,
}

impl Default for Registry {
    fn default() -> Self {
        // SAFETY: every field is an atomic integer or flag, for which all-zero bytes are valid.
        unsafe { std::mem::zeroed() }
    }
}

// SAFETY: plain atomics, valid in any process that maps the segment.
unsafe impl PGRXSharedMemory for Registry {}

// SAFETY: the name is ours alone.
static REGISTRY: PgAtomic<Registry> = unsafe { PgAtomic::new(c"embeddinggemma_async_workers") };

/// From `_PG_init` while preloading.
pub fn init() {
    pg_shmem_init!(REGISTRY);
}

fn get() -> &'static Registry {
    REGISTRY.get()
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn alive(pid: i32) -> bool {
    // SAFETY: looks the process up in the proc array.
    pid != 0 && !unsafe { pg_sys::BackendPidGetProc(pid) }.is_null()
}

/// The slot of the worker serving `db`, if one runs.
fn serving(db: pg_sys::Oid) -> Option<usize> {
    let r = get();
    (0..SLOTS).find(|&i| r.db[i].load(Ordering::Acquire) == db.to_u32() && alive(r.pid[i].load(Ordering::Acquire)))
}

pub fn running(db: pg_sys::Oid) -> bool {
    serving(db).is_some()
}

/// Workers running now.
pub fn workers() -> usize {
    let r = get();
    (0..SLOTS).filter(|&i| r.db[i].load(Ordering::Acquire) != 0 && alive(r.pid[i].load(Ordering::Acquire))).count()
}

/// Takes a slot for this process serving `db`; None when another worker serves it already,
/// every slot is taken, or a DDL command holds the database.
pub fn claim(db: pg_sys::Oid) -> Option<usize> {
    // SAFETY: this process's pid.
    let me = unsafe { pg_sys::MyProcPid };
    if held(db) || serving(db).is_some() {
        return None;
    }
    let r = get();
    for i in 0..SLOTS {
        let pid = r.pid[i].load(Ordering::Acquire);
        if (pid == 0 || !alive(pid)) && r.pid[i].compare_exchange(pid, me, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            r.leave[i].store(false, Ordering::Release);
            r.sleeping[i].store(false, Ordering::Release);
            r.db[i].store(db.to_u32(), Ordering::Release);
            // Two workers may have raced for the same database: the lower slot stays.
            if (0..i).any(|j| r.db[j].load(Ordering::Acquire) == db.to_u32() && alive(r.pid[j].load(Ordering::Acquire)))
            {
                release(i);
                return None;
            }
            unwant(db);
            return Some(i);
        }
    }
    None
}

pub fn release(slot: usize) {
    let r = get();
    r.db[slot].store(0, Ordering::Release);
    r.pid[slot].store(0, Ordering::Release);
}

pub fn set_sleeping(slot: usize, sleeping: bool) {
    get().sleeping[slot].store(sleeping, Ordering::Release);
}

/// Whether a DDL command asked the worker in `slot` to leave its database.
pub fn must_leave(slot: usize) -> bool {
    get().leave[slot].load(Ordering::Acquire)
}

/// Wakes the worker serving `db` if it waits for work; asks the launcher for one if none runs.
pub fn wake(db: pg_sys::Oid) {
    // Called after every commit that queued rows: the flag first, the proc array (a shared
    // lock) only when needed.
    let r = get();
    let mine = |i: usize| r.db[i].load(Ordering::Acquire) == db.to_u32();
    let Some(i) = (0..SLOTS).find(|&i| mine(i) && alive(r.pid[i].load(Ordering::Acquire))) else {
        want(db, now_ms());
        return;
    };
    if r.sleeping[i].swap(false, Ordering::AcqRel) {
        set_latch(r.pid[i].load(Ordering::Acquire));
    }
}

fn set_latch(pid: i32) {
    // SAFETY: the proc of a live process; SetLatch is safe on another process's latch.
    unsafe {
        let proc = pg_sys::BackendPidGetProc(pid);
        if !proc.is_null() {
            pg_sys::SetLatch(&raw mut (*proc).procLatch);
        }
    }
}

/// Asks for a worker for `db` from `due_ms` on (the earlier time wins), and wakes the launcher.
pub fn want(db: pg_sys::Oid, due_ms: u64) {
    let r = get();
    let db = db.to_u32();
    if let Some(i) = (0..WANTED).find(|&i| r.wanted[i].load(Ordering::Acquire) == db) {
        r.due[i].fetch_min(due_ms, Ordering::AcqRel);
    } else if let Some(i) =
        (0..WANTED).find(|&i| r.wanted[i].compare_exchange(0, db, Ordering::AcqRel, Ordering::Acquire).is_ok())
    {
        r.due[i].store(due_ms, Ordering::Release);
    } else {
        r.overflow.store(true, Ordering::Release);
    }
    notify_launcher();
}

/// Wakes the launcher (a request, or a worker that left and freed its slot).
pub fn notify_launcher() {
    let launcher = get().launcher.load(Ordering::Acquire);
    if alive(launcher) {
        // The launcher is a process with a PGPROC of its own (it reads pg_database).
        set_latch(launcher);
    }
}

/// Asks the launcher to start a worker for every database in turn (the serving model changed:
/// each records it).
pub fn look_at_every_database() {
    get().overflow.store(true, Ordering::Release);
    notify_launcher();
}

pub fn unwant(db: pg_sys::Oid) {
    let r = get();
    for i in 0..WANTED {
        let _ = r.wanted[i].compare_exchange(db.to_u32(), 0, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Databases that want a worker now, earliest first, and whether some were not recorded.
pub fn wanted_now() -> (Vec<pg_sys::Oid>, bool) {
    let r = get();
    let now = now_ms();
    let mut due: Vec<(u64, u32)> = (0..WANTED)
        .filter_map(|i| {
            let db = r.wanted[i].load(Ordering::Acquire);
            let at = r.due[i].load(Ordering::Acquire);
            (db != 0 && at <= now).then_some((at, db))
        })
        .collect();
    due.sort_unstable();
    (due.into_iter().map(|(_, db)| pg_sys::Oid::from(db)).collect(), r.overflow.swap(false, Ordering::AcqRel))
}

/// Milliseconds until the next wanted database is due, if any is waiting for a time.
pub fn next_due_in() -> Option<Duration> {
    let r = get();
    let now = now_ms();
    (0..WANTED)
        .filter(|&i| r.wanted[i].load(Ordering::Acquire) != 0)
        .map(|i| r.due[i].load(Ordering::Acquire).saturating_sub(now))
        .min()
        .map(Duration::from_millis)
}

/// Whether another database than `db` waits for a worker now (a worker then gives its slot up
/// after its turn).
pub fn others_waiting(db: pg_sys::Oid) -> bool {
    let r = get();
    let now = now_ms();
    r.overflow.load(Ordering::Acquire)
        || (0..WANTED).any(|i| {
            let other = r.wanted[i].load(Ordering::Acquire);
            other != 0 && other != db.to_u32() && r.due[i].load(Ordering::Acquire) <= now
        })
}

pub fn set_launcher(pid: i32) {
    get().launcher.store(pid, Ordering::Release);
}

/// Whether a DDL command holds `db`.
pub fn held(db: pg_sys::Oid) -> bool {
    let r = get();
    let now = now_ms();
    (0..HELD).any(|i| r.held[i].load(Ordering::Acquire) == db.to_u32() && r.held_until[i].load(Ordering::Acquire) > now)
}

/// Holds `db` for `time` (no worker starts for it), asks its worker to leave, and waits up to
/// `wait` for it to be gone. Whether it is gone.
pub fn hold_and_empty(db: pg_sys::Oid, time: Duration, wait: Duration) -> bool {
    let r = get();
    let until = now_ms() + time.as_millis() as u64;
    let slot = (0..HELD).find(|&i| r.held[i].load(Ordering::Acquire) == db.to_u32()).or_else(|| {
        (0..HELD).find(|&i| {
            let other = r.held[i].load(Ordering::Acquire);
            let expired = r.held_until[i].load(Ordering::Acquire) <= now_ms();
            (other == 0 || expired)
                && r.held[i].compare_exchange(other, db.to_u32(), Ordering::AcqRel, Ordering::Acquire).is_ok()
        })
    });
    if let Some(i) = slot {
        r.held_until[i].store(until, Ordering::Release);
    }
    let started = std::time::Instant::now();
    let deadline = started + wait;
    let mut terminated = false;
    loop {
        let Some(i) = serving(db) else { return true };
        let pid = r.pid[i].load(Ordering::Acquire);
        if !r.leave[i].swap(true, Ordering::AcqRel) {
            // A cancel interrupts the batch in hand (its rows stay queued); the latch ends a wait.
            // SAFETY: a signal to a process of this cluster, as pg_cancel_backend sends it.
            unsafe { libc::kill(pid, libc::SIGINT) };
            set_latch(pid);
        } else if !terminated && started.elapsed() > CANCEL_GRACE {
            // Owner code that swallowed the cancel: terminated (a FATAL ends its work).
            // SAFETY: a signal to a process of this cluster, as pg_terminate_backend sends it.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            terminated = true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
        crate::pg::interrupts::serve_interrupts();
    }
}

/// Ends the hold of `db` (its DDL is done).
pub fn unhold(db: pg_sys::Oid) {
    let r = get();
    for i in 0..HELD {
        if r.held[i].load(Ordering::Acquire) == db.to_u32() {
            r.held_until[i].store(0, Ordering::Release);
            let _ = r.held[i].compare_exchange(db.to_u32(), 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}
