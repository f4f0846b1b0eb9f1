//! This backend's embedding counters, whichever way its calls ran (`embeddinggemma_stats()`).

use std::cell::RefCell;
use std::time::Duration;

use embeddinggemma_engine::Stats;

/// Counters since the backend started (or `embeddinggemma_stats_reset()`).
#[derive(Clone, Copy, Default)]
pub struct BackendStats {
    pub engine: Stats,
    pub calls: u64,
    pub loads: u64,
    pub load_time: Duration,
    /// Time spent waiting for CPU threads other backends held, or in the service's queue.
    pub wait_time: Duration,
}

thread_local! {
    static STATS: RefCell<BackendStats> = RefCell::new(BackendStats::default());
}

pub fn get() -> BackendStats {
    STATS.with(|s| *s.borrow())
}

pub fn reset() {
    STATS.with(|s| *s.borrow_mut() = BackendStats::default());
}

pub fn update(f: impl FnOnce(&mut BackendStats)) {
    STATS.with(|s| f(&mut s.borrow_mut()));
}
