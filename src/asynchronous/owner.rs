//! Code a background process runs on behalf of a table's owner, run as PostgreSQL's
//! maintenance commands (VACUUM, ANALYZE, REFRESH MATERIALIZED VIEW) run it: with the owner's
//! rights as a security-restricted operation, inside a GUC nest level of its own that is rolled
//! back afterwards, under `search_path = pg_catalog, pg_temp`, and bounded in time. One owner's
//! triggers can then leave nothing — no setting, no search path, no temporary object, no
//! advisory lock — for the next owner's write in the same worker session.
//!
//! Owner code that catches the statement timeout's cancel and goes on is ended for good: a
//! watchdog terminates the worker (a FATAL, which no exception handler catches, not a crash)
//! when the work outlives its timeout by as much again, and a terminate request
//! (`pg_terminate_backend`, a DDL command on the database) ends owner work at once.

use std::ffi::CString;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use embeddinggemma_engine::with_signals_blocked;
use pgrx::pg_sys;

/// `STATEMENT_TIMEOUT` of `utils/timeout.h` (the same position from PostgreSQL 9.3 to 18),
/// which pgrx's bindings leave out.
const STATEMENT_TIMEOUT: std::ffi::c_int = 3;
/// `USER_LOCKMETHOD` of `storage/lock.h`: advisory locks.
const USER_LOCKMETHOD: pg_sys::LOCKMETHODID = 2;

extern "C-unwind" {
    fn enable_timeout_after(id: std::ffi::c_int, delay_ms: std::ffi::c_int);
    fn disable_timeout(id: std::ffi::c_int, keep_indicator: bool);
}

/// Time bounds of one piece of owner work, in milliseconds (0: none).
#[derive(Clone, Copy)]
pub struct Bounds {
    pub statement_ms: i32,
    pub lock_ms: i32,
}

impl Bounds {
    /// The superuser settings `embeddinggemma.async_statement_timeout` and `…_lock_timeout`.
    pub fn configured() -> Self {
        Bounds {
            statement_ms: crate::pg::guc::ASYNC_STATEMENT_TIMEOUT.get(),
            lock_ms: crate::pg::guc::ASYNC_LOCK_TIMEOUT.get(),
        }
    }
}

/// Sets `name` for the current GUC nest level only (undone by `AtEOXact_GUC` of that level).
///
/// # Safety
/// Inside a transaction, after `NewGUCNestLevel`.
unsafe fn set_in_nest(name: &str, value: &str) {
    let (name, value) = (CString::new(name).expect("no NUL"), CString::new(value).expect("no NUL"));
    // SAFETY: per the contract; GUC_ACTION_SAVE ties the value to the current nest level, as
    // RestrictSearchPath() and a function's SET clause do.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
    }
}

/// Terminates this worker (SIGTERM to its main thread, which PostgreSQL's `die` handles while
/// owner work runs) if owner work outlives `deadline`, unless stopped first.
struct Watchdog {
    stopped: Arc<Mutex<bool>>,
    thread: std::thread::Thread,
}

impl Watchdog {
    fn start(deadline: Instant) -> Watchdog {
        let stopped = Arc::new(Mutex::new(false));
        // SAFETY: this thread's id, to signal it from the watchdog.
        let main = unsafe { libc::pthread_self() } as usize;
        let flag = stopped.clone();
        // Signals blocked, as every thread of ours: a SIGTERM or SIGHUP delivered to this
        // thread would run the worker's handler here, and pgrx aborts the process (the
        // postmaster then restarts the cluster) when PostgreSQL is called off the main thread.
        let handle = with_signals_blocked(|| {
            std::thread::spawn(move || loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let stopped = flag.lock().unwrap_or_else(|e| e.into_inner());
                    if !*stopped {
                        // SAFETY: a signal to this process's main thread, whose handler is `die`
                        // until the watchdog is stopped (under the same lock).
                        unsafe { libc::pthread_kill(main as libc::pthread_t, libc::SIGTERM) };
                    }
                    return;
                }
                std::thread::park_timeout(left);
                if *flag.lock().unwrap_or_else(|e| e.into_inner()) {
                    return;
                }
            })
        });
        Watchdog { stopped, thread: handle.thread().clone() }
    }

    fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.thread.unpark();
    }
}

/// Installs PostgreSQL's `die` for SIGTERM (a FATAL at the next interrupt check); the handler it
/// replaced comes back with `restore_sigterm`.
fn die_on_sigterm() -> libc::sigaction {
    // SAFETY: sigaction with a handler PostgreSQL's backends use for SIGTERM, flags as pqsignal
    // sets them.
    unsafe {
        let mut new: libc::sigaction = std::mem::zeroed();
        new.sa_sigaction = pg_sys::die as *const () as usize;
        new.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut new.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGTERM, &new, &mut old);
        old
    }
}

fn restore_sigterm(old: &libc::sigaction) {
    // SAFETY: puts back the handler die_on_sigterm replaced.
    unsafe { libc::sigaction(libc::SIGTERM, old, std::ptr::null_mut()) };
}

/// Runs `f` as `role` (see the module's doc). An ERROR inside unwinds through here to the
/// caller's transaction, whose abort rolls back every nest level; on return the nest level is
/// rolled back here, session-level `set_config` calls of the owner's code included.
pub fn as_owner<R>(role: pg_sys::Oid, bounds: Bounds, f: impl FnOnce() -> R) -> R {
    struct Restore {
        user: pg_sys::Oid,
        context: i32,
        nest: i32,
        timed: bool,
        watchdog: Option<Watchdog>,
        sigterm: libc::sigaction,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(w) = &self.watchdog {
                w.stop();
            }
            restore_sigterm(&self.sigterm);
            // SAFETY: undoes what as_owner set up below, in reverse order. While an ERROR
            // unwinds, the transaction's abort rolls back the GUC nest levels instead.
            unsafe {
                if self.timed {
                    disable_timeout(STATEMENT_TIMEOUT, false);
                }
                if !std::thread::panicking() {
                    pg_sys::AtEOXact_GUC(false, self.nest);
                }
                // Session-level advisory locks the owner's code took (they outlive its
                // transaction): the next owner must not hold them.
                pg_sys::LockReleaseAll(USER_LOCKMETHOD, true);
                pg_sys::SetUserIdAndSecContext(self.user, self.context);
            }
        }
    }
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    // SAFETY: reads and sets this backend's user and GUC nest level, as ExecVacuum and
    // fmgr_security_definer do; restored by Restore.
    let _restore = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        let restricted = (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION) as i32;
        pg_sys::SetUserIdAndSecContext(role, context | restricted);
        let nest = pg_sys::NewGUCNestLevel();
        set_in_nest("search_path", "pg_catalog, pg_temp");
        set_in_nest("lock_timeout", &bounds.lock_ms.max(0).to_string());
        // A background process arms no statement timeout of its own: armed here for the work.
        let timed = bounds.statement_ms > 0;
        if timed {
            enable_timeout_after(STATEMENT_TIMEOUT, bounds.statement_ms);
        }
        let sigterm = die_on_sigterm();
        let watchdog = timed.then(|| {
            let grace = Duration::from_millis(bounds.statement_ms.max(5_000) as u64);
            Watchdog::start(Instant::now() + Duration::from_millis(bounds.statement_ms as u64) + grace)
        });
        Restore { user, context, nest, timed, watchdog, sigterm }
    };
    f()
}

/// Raises an ERROR when a table the worker writes for a target on `relation` — its partitions
/// or children, the chunk table and its own — has an owner other than `relation`'s: the
/// owner's write through the parent would fire that role's triggers with the owner's rights,
/// whenever that role inserts a row.
pub fn require_one_owner(relation: pg_sys::Oid, chunk_table: Option<pg_sys::Oid>) {
    use crate::pg::{catalog, errors::raise, spi};
    let owner = catalog::relation_owner(relation);
    let mut tables = catalog::family(relation);
    tables.extend(chunk_table.map(catalog::family).unwrap_or_default());
    let sql = "SELECT c.oid FROM pg_catalog.pg_class c
                WHERE c.oid OPERATOR(pg_catalog.=) ANY ($1) AND c.relowner OPERATOR(pg_catalog.<>) $2 LIMIT 1";
    let args = [spi::text_param(tables), spi::param(owner, pg_sys::OIDOID)];
    if let Some(other) = spi::one::<pg_sys::Oid>(sql, &args) {
        raise(
            pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "embeddinggemma: {} is not owned by the owner of {}: the asynchronous worker writes as that owner and does not write through it",
                catalog::display(other),
                catalog::display(relation)
            ),
            format!(
                "Give it the same owner (ALTER TABLE {} OWNER TO …) or detach it; its target's rows are retried, then kept in embeddinggemma_async_failures.",
                catalog::display(other)
            ),
        )
    }
}
