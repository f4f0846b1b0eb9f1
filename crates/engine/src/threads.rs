//! Thread pools whose threads start with every signal blocked and are joined when the pool is
//! dropped, so that a host process (a PostgreSQL backend) never has a thread of ours take one
//! of its signals, nor keeps idle ones after a call.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::error::{Error, Result};

pub struct JoinedPool {
    pool: Option<rayon::ThreadPool>,
    handles: Arc<Mutex<Vec<JoinHandle<()>>>>,
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
        JoinedPool::with_nice(threads, name, 0)
    }

    /// The same, its threads at CPU priority `nice` (Linux: per thread; 19 is the lowest, so
    /// that they run on what the rest of the machine leaves idle). Elsewhere `nice` is ignored.
    pub fn with_nice(threads: usize, name: &str, nice: i32) -> Result<JoinedPool> {
        let handles = Arc::new(Mutex::new(Vec::new()));
        let spawned = handles.clone();
        let name = name.to_string();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .spawn_handler(move |thread| {
                let builder = std::thread::Builder::new().name(format!("{name}-{}", thread.index()));
                let handle = with_signals_blocked(|| {
                    builder.spawn(move || {
                        if nice != 0 {
                            set_own_nice(nice);
                        }
                        thread.run()
                    })
                })?;
                spawned.lock().unwrap_or_else(|e| e.into_inner()).push(handle);
                Ok(())
            })
            .build()
            .map_err(|e| Error::InvalidOption(format!("cannot start {threads} threads: {e}")))?;
        Ok(JoinedPool { pool: Some(pool), handles })
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

/// Sets the calling thread's nice value (on Linux, setpriority on a thread id affects that
/// thread only). Raising it needs no privilege; failing leaves the thread as it was.
fn set_own_nice(nice: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}
