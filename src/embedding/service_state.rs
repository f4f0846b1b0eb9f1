//! What the supervisor and the backends share about the cluster's embedding service: whether
//! the library was preloaded, where the service listens, and its status in shared memory.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};

use pgrx::shmem::PGRXSharedMemory;
use pgrx::PgAtomic;

/// Relative to the data directory, which is every backend's working directory.
pub const SOCKET: &str = "pg_stat_tmp/embeddinggemma.sock";

/// What the supervisor tells backends, in shared memory.
#[repr(C)]
#[derive(Default)]
pub struct Status {
    /// The service process, 0 while there is none.
    pub pid: AtomicI32,
    pub starts: AtomicU64,
    /// Unix time the current process started.
    pub started_at: AtomicI64,
    /// How the last process ended: its exit code, or minus the signal that killed it.
    pub last_exit: AtomicI32,
    pub exits: AtomicU64,
    /// `key_hash` of the model settings the current service was started with; 0 before the
    /// supervisor started one.
    pub model_key_hash: AtomicU64,
}

// SAFETY: plain atomics, valid in any process that maps the segment.
unsafe impl PGRXSharedMemory for Status {}

// SAFETY: the name is ours alone.
pub static STATUS: PgAtomic<Status> = unsafe { PgAtomic::new(c"embeddinggemma_service_status") };

static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Whether the library was preloaded, so the service runs (backends inherit this from the
/// postmaster).
pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Called once, while the postmaster loads shared_preload_libraries.
pub fn set_preloaded() {
    PRELOADED.store(true, Ordering::Relaxed);
}

/// A hash of a model key (`guc::model_key`) that fits in shared memory: 64-bit FNV-1a, the same
/// in every process. Never 0.
pub fn key_hash(key: &str) -> u64 {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    hash.max(1)
}
