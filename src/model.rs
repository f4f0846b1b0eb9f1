//! The model as this backend holds it: loaded on first use, reloaded when the settings that
//! shape it change, and the counters of what it did.

use std::cell::RefCell;
use std::path::Path;
use std::time::{Duration, Instant};

use embeddinggemma_engine::{DeviceChoice, Engine, EngineOptions, Error, Manifest, Precision, Request, Stats};
use pgrx::pg_sys;
use pgrx::PgSqlErrorCode;

use crate::errors::{raise, raise_engine, setup_hint};
use crate::{cpu_slots, guc};

/// The settings a loaded engine was built from; any change means a reload.
#[derive(Clone, PartialEq, Eq)]
struct LoadSettings {
    model_path: String,
    checksums: Option<String>,
    device: DeviceChoice,
    precision: Precision,
}

impl LoadSettings {
    fn current() -> LoadSettings {
        let Some(model_path) = guc::string(&guc::MODEL_PATH) else {
            raise(PgSqlErrorCode::ERRCODE_UNDEFINED_FILE, "embeddinggemma.model_path is not set", setup_hint())
        };
        let device = guc::string(&guc::DEVICE)
            .unwrap_or_else(|| "auto".into())
            .parse()
            .unwrap_or_else(|e: String| raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e, "SET embeddinggemma.device = 'cpu'."));
        LoadSettings {
            model_path,
            checksums: guc::string(&guc::MODEL_CHECKSUMS),
            device,
            precision: guc::DTYPE.get().precision(),
        }
    }

    fn load(&self) -> Result<Engine, Error> {
        let checksums = match &self.checksums {
            Some(path) => Manifest::from_file(Path::new(path))?,
            None => Manifest::embeddinggemma_300m(),
        };
        let options = EngineOptions {
            device: self.device,
            precision: self.precision,
            checksums,
            ..EngineOptions::default()
        };
        Engine::load(Path::new(&self.model_path), &options)
    }
}

/// Counters since the backend started (or `embeddinggemma_stats_reset()`).
#[derive(Clone, Copy, Default)]
pub struct BackendStats {
    pub engine: Stats,
    pub calls: u64,
    pub loads: u64,
    pub load_time: Duration,
    /// Time spent waiting for CPU threads other backends held.
    pub wait_time: Duration,
}

/// What the loaded model is, for the statistics.
pub struct ModelFacts {
    pub device: String,
    pub dtype: String,
    pub weight_bytes: usize,
}

pub fn loaded_model() -> Option<ModelFacts> {
    LOADED.with(|cell| {
        cell.borrow().as_ref().map(|l| {
            let info = l.engine.info();
            ModelFacts { device: info.device.clone(), dtype: info.dtype.clone(), weight_bytes: info.weight_bytes }
        })
    })
}

struct Loaded {
    settings: LoadSettings,
    engine: Engine,
    /// The last thread pool, rebuilt when a call gets another number of threads.
    pool: Option<rayon::ThreadPool>,
}

thread_local! {
    static LOADED: RefCell<Option<Loaded>> = const { RefCell::new(None) };
    static STATS: RefCell<BackendStats> = RefCell::new(BackendStats::default());
}

pub fn stats() -> BackendStats {
    STATS.with(|s| *s.borrow())
}

pub fn reset_stats() {
    STATS.with(|s| *s.borrow_mut() = BackendStats::default());
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `f` with the engine for the current settings, loading it first if needed.
pub fn with_engine<R>(f: impl FnOnce(&mut Engine, &mut Option<rayon::ThreadPool>) -> R) -> R {
    let settings = LoadSettings::current();
    LOADED.with(|cell| {
        let mut loaded = cell.borrow_mut();
        if loaded.as_ref().is_none_or(|l| l.settings != settings) {
            // Free the old model before loading the next.
            *loaded = None;
            let started = Instant::now();
            let engine = settings.load().unwrap_or_else(|e| raise_engine(e));
            STATS.with(|s| {
                let mut s = s.borrow_mut();
                s.loads += 1;
                s.load_time += started.elapsed();
            });
            *loaded = Some(Loaded { settings, engine, pool: None });
        }
        let l = loaded.as_mut().expect("loaded above");
        f(&mut l.engine, &mut l.pool)
    })
}

/// Worker threads take no signals: PostgreSQL's handlers expect to interrupt the backend's
/// own thread.
fn block_signals() {
    // SAFETY: fills a local sigset and changes only the calling thread's mask.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
}

/// A cancel or terminate request is pending. Only reads flags the signal handlers set, so it
/// is safe from the engine's worker threads.
fn interrupt_requested() -> bool {
    // SAFETY: volatile reads of sig_atomic_t flags.
    unsafe {
        std::ptr::read_volatile(&raw const pg_sys::QueryCancelPending) != 0
            || std::ptr::read_volatile(&raw const pg_sys::ProcDiePending) != 0
    }
}

/// Embeds `texts` (all non-NULL) with the current settings; raises an ERROR on failure.
pub fn embed(texts: &[&str], task: &str, dim: i32) -> Vec<Vec<f32>> {
    let max_batch_tokens = guc::MAX_BATCH_TOKENS.get().max(1) as usize;
    let truncate = guc::TRUNCATE.get();
    let total = match guc::MAX_THREADS.get() {
        0 => cores(),
        n => n as usize,
    };
    let want = match guc::THREADS.get() {
        0 => total,
        n => n as usize,
    };
    with_engine(|engine, pool| {
        engine.set_batch_limits(max_batch_tokens, embeddinggemma_engine::DEFAULT_MAX_BATCH_SIZE);
        let dim = engine.check_dim(dim as i64).unwrap_or_else(|e| raise_engine(e));
        engine.prompt(task).unwrap_or_else(|e| raise_engine(e));
        let waiting = Instant::now();
        let slots = cpu_slots::acquire(want, total);
        let wait_time = waiting.elapsed();
        let threads = slots.count();
        if pool.as_ref().is_none_or(|p| p.current_num_threads() != threads) {
            *pool = None; // join the old threads before starting the new ones
            *pool = Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("embeddinggemma-{i}"))
                    .start_handler(|_| block_signals())
                    .build()
                    .unwrap_or_else(|e| {
                        raise(
                            PgSqlErrorCode::ERRCODE_INSUFFICIENT_RESOURCES,
                            format!("embeddinggemma: cannot start {threads} threads: {e}"),
                            "Lower embeddinggemma.threads.",
                        )
                    }),
            );
        }
        let pool = pool.as_ref().expect("built above");
        let request = Request { task, dim, truncate };
        let result = engine.embed_in(pool, texts, &request, &interrupt_requested);
        drop(slots);
        match result {
            Ok((vectors, s)) => {
                STATS.with(|st| {
                    let mut st = st.borrow_mut();
                    st.engine += s;
                    st.calls += 1;
                    st.wait_time += wait_time;
                });
                vectors
            }
            Err(e) => raise_engine(e),
        }
    })
}
