//! Thread pools whose threads start with every signal blocked and are joined when the pool is
//! dropped, so that a host process (a PostgreSQL backend) never has a thread of ours take one
//! of its signals, nor keeps idle ones after a call.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::error::{Error, Result};

pub struct JoinedPool {
    pool: Option<rayon::ThreadPool>,
    handles: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Linux thread ids of an idle-class pool's threads (`set_idle` switches them).
    tids: Arc<Mutex<Vec<i32>>>,
}

/// Runs `spawn` with every signal blocked in the calling thread, so the thread it starts
/// inherits that mask from its first instruction.
pub fn with_signals_blocked<T>(spawn: impl FnOnce() -> T) -> T {
    #[cfg(unix)]
    // SAFETY: sigset_t is plain data initialised by sigfillset/pthread_sigmask before use.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let result = spawn();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        result
    }
    #[cfg(not(unix))]
    spawn()
}

impl JoinedPool {
    /// A rayon pool of `threads` threads named `name-N`.
    pub fn new(threads: usize, name: &str) -> Result<JoinedPool> {
        JoinedPool::with_priority(threads, name, false)
    }

    /// The same, its threads (when `idle`) scheduled only on CPU time nobody else wants.
    pub fn with_priority(threads: usize, name: &str, idle: bool) -> Result<JoinedPool> {
        let handles = Arc::new(Mutex::new(Vec::new()));
        let spawned = handles.clone();
        let tids = Arc::new(Mutex::new(Vec::new()));
        let started = tids.clone();
        let name = name.to_string();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .spawn_handler(move |thread| {
                let builder = std::thread::Builder::new().name(format!("{name}-{}", thread.index()));
                let started = started.clone();
                let handle = with_signals_blocked(|| {
                    builder.spawn(move || {
                        if idle {
                            started.lock().unwrap_or_else(|e| e.into_inner()).push(own_tid());
                            set_nice_19();
                            set_idle(0, true);
                        }
                        thread.run()
                    })
                })?;
                spawned.lock().unwrap_or_else(|e| e.into_inner()).push(handle);
                Ok(())
            })
            .build()
            .map_err(|e| Error::InvalidOption(format!("cannot start {threads} threads: {e}")))?;
        Ok(JoinedPool { pool: Some(pool), handles, tids })
    }

    /// Moves the threads of an idle-class pool to the normal class at nice 19 (`idle = false`)
    /// or back. An interactive pass beside a background one can wait for a lock a background
    /// thread holds (candle's elementwise ops share one global pool behind a mutex): an
    /// idle-class holder would get no CPU time while the interactive threads run, a nice-19
    /// one gets a small share and lets the lock go within milliseconds.
    pub fn set_idle(&self, idle: bool) {
        for &tid in self.tids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            set_idle(tid, idle);
        }
    }
}

impl std::ops::Deref for JoinedPool {
    type Target = rayon::ThreadPool;
    fn deref(&self) -> &rayon::ThreadPool {
        self.pool.as_ref().expect("pool lives until drop")
    }
}

impl Drop for JoinedPool {
    fn drop(&mut self) {
        // Dropping the pool tells its threads to exit; joining waits until they have.
        drop(self.pool.take());
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }
}

fn own_tid() -> i32 {
    #[cfg(target_os = "linux")]
    // SAFETY: a plain syscall.
    return unsafe { libc::gettid() };
    #[cfg(not(target_os = "linux"))]
    0
}

/// The calling thread to nice 19 (lowering a thread's priority needs no privilege; raising it
/// back would, so an idle-class pool's threads stay at 19 in either class).
fn set_nice_19() {
    #[cfg(target_os = "linux")]
    // SAFETY: a plain syscall on the calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
    }
}

/// Linux: thread `tid` (0: the caller) to SCHED_IDLE, or back to SCHED_OTHER (at its nice
/// value). Nice 19 alone is not enough for background work: under EEVDF a nice-19 thread keeps
/// its slice when a normal one wakes, and took ~40 % of two CPUs that sixteen inserting
/// sessions kept busy; an idle-class thread is preempted at once. Neither switch needs a
/// privilege; should the first fail, the thread stays at nice 19.
fn set_idle(tid: i32, idle: bool) {
    #[cfg(target_os = "linux")]
    // SAFETY: a plain syscall on a thread of this process.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(tid, if idle { libc::SCHED_IDLE } else { libc::SCHED_OTHER }, &param);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (tid, idle);
}
