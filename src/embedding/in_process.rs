//! In-process embedding: the model as this backend holds it, loaded on first use, reloaded when
//! the settings that shape it change.

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use embeddinggemma_engine::{Chunk, DeviceChoice, Engine, EngineOptions, Error, Manifest, Precision, Request};
use pgrx::PgSqlErrorCode;

use crate::embedding::model_info::ModelInfo;
use crate::embedding::{counters, cpu_slots, threads, transaction_memory};
use crate::pg::errors::{raise, raise_bad_cut, raise_engine, setup_hint};
use crate::pg::guc;

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
        let device = guc::string(&guc::DEVICE).unwrap_or_else(|| "auto".into()).parse().unwrap_or_else(|e: String| {
            raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e, "SET embeddinggemma.device = 'cpu'.")
        });
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
        let options =
            EngineOptions { device: self.device, precision: self.precision, checksums, ..EngineOptions::default() };
        Engine::load(Path::new(&self.model_path), &options)
    }
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
    /// Shared with the call's worker thread, which may outlive an interrupted call briefly.
    engine: Arc<Engine>,
}

/// A load's settings and where its engine will arrive.
type PendingLoad = (LoadSettings, Receiver<Result<Engine, Error>>);

thread_local! {
    static LOADED: RefCell<Option<Loaded>> = const { RefCell::new(None) };
    /// A load an interrupt stopped waiting for: it goes on, and the next call picks it up.
    static PENDING: RefCell<Option<PendingLoad>> = const { RefCell::new(None) };
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A thread pool for one call; built on an engine thread, so its threads inherit the blocked
/// signals, and dropped after it, so an idle backend holds no threads.
fn pool(threads: usize) -> Result<rayon::ThreadPool, Error> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("embeddinggemma-{i}"))
        .build()
        .map_err(|e| Error::InvalidOption(format!("cannot start {threads} threads: {e}")))
}

/// Loads the model on a thread of its own while this backend serves interrupts. Interrupted,
/// the load goes on and the next call with the same settings waits for it instead.
fn load(settings: &LoadSettings) -> Engine {
    PENDING.with(|pending| {
        let mut slot = pending.borrow_mut();
        if slot.as_ref().is_none_or(|(s, _)| s != settings) {
            let s = settings.clone();
            let threads = cores();
            *slot = Some((settings.clone(), threads::spawn_detached(move || pool(threads)?.install(|| s.load()))));
        }
        let result = threads::wait(&slot.as_ref().expect("set above").1);
        *slot = None;
        result.unwrap_or_else(|e| raise_engine(e))
    })
}

/// Runs `f` with the engine for the current settings, loading it first if needed.
pub fn with_engine<R>(f: impl FnOnce(&mut Arc<Engine>) -> R) -> R {
    let settings = LoadSettings::current();
    LOADED.with(|cell| {
        let mut loaded = cell.borrow_mut();
        if loaded.as_ref().is_none_or(|l| l.settings != settings) {
            // Free the old model before loading the next.
            *loaded = None;
            let started = Instant::now();
            let engine = load(&settings);
            counters::update(|s| {
                s.loads += 1;
                s.load_time += started.elapsed();
            });
            *loaded = Some(Loaded { settings, engine: Arc::new(engine) });
        }
        f(&mut loaded.as_mut().expect("loaded above").engine)
    })
}

/// CPU threads all backends together may use (embeddinggemma.max_threads).
fn total_threads() -> usize {
    match guc::MAX_THREADS.get() {
        0 => cores(),
        n => n as usize,
    }
}

/// Cuts `text` into chunks for `task` (tokenizing only, on one CPU slot); raises an ERROR on
/// failure.
pub fn chunk(text: &str, task: &str, max_tokens: usize, overlap: usize) -> Vec<Chunk> {
    threads::finish_unfinished();
    with_engine(|engine| {
        let slots = cpu_slots::acquire(1, total_threads());
        let (engine, task, text) = (engine.clone(), task.to_string(), text.to_string());
        let result =
            threads::run(move |stop| engine.chunk(&text, &task, max_tokens, overlap, &|| stop.load(Ordering::Relaxed)));
        drop(slots);
        result.unwrap_or_else(|e| match e {
            Error::InvalidOption(_) => raise_bad_cut(e),
            e => raise_engine(e),
        })
    })
}

/// Embeds `texts` (all non-NULL) with the current settings; raises an ERROR on failure.
pub fn embed(texts: &[&str], task: &str, dim: i32) -> Vec<Vec<f32>> {
    let max_batch_tokens = guc::MAX_BATCH_TOKENS.get().max(1) as usize;
    let truncate = guc::TRUNCATE.get();
    let max_call_memory = (guc::MAX_CALL_MEMORY.get().max(1) as usize) << 20;
    let total = total_threads();
    let want = match guc::THREADS.get() {
        0 => total,
        n => n as usize,
    };
    threads::finish_unfinished();
    with_engine(|engine| {
        // Only a call's thread shares the engine, and the last one has finished.
        if let Some(engine) = Arc::get_mut(engine) {
            engine.set_batch_limits(max_batch_tokens, embeddinggemma_engine::DEFAULT_MAX_BATCH_SIZE);
            engine.set_memory_limit(max_call_memory);
        }
        let dim = engine.check_dim(dim as i64).unwrap_or_else(|e| raise_engine(e));
        engine.prompt(task).unwrap_or_else(|e| raise_engine(e));
        let waiting = Instant::now();
        let slots = cpu_slots::acquire(want, total);
        let wait_time = waiting.elapsed();
        transaction_memory::hold_until_transaction_end();
        let threads = slots.count();
        let (engine, task, texts) =
            (engine.clone(), task.to_string(), texts.iter().map(|t| t.to_string()).collect::<Vec<_>>());
        let result = threads::run(move |stop| {
            let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
            let request = Request { task: &task, dim, truncate };
            engine.embed_in(&pool(threads)?, &texts, &request, &|| stop.load(Ordering::Relaxed))
        });
        drop(slots);
        match result {
            Ok((vectors, s)) => {
                counters::update(|st| {
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

/// Raises the ERROR an unknown task or dimension gets, before any text is embedded.
pub fn check_request(task: &str, dim: i32) {
    with_engine(|engine| {
        engine.check_dim(dim as i64).unwrap_or_else(|e| raise_engine(e));
        engine.prompt(task).unwrap_or_else(|e| raise_engine(e));
    });
}

/// The model this backend holds (loading it if needed).
pub fn info() -> ModelInfo {
    with_engine(|engine| {
        let info = engine.info();
        let checksums = info.checksums.iter().map(|(f, h)| (f.clone(), serde_json::Value::String(h.clone()))).collect();
        ModelInfo {
            path: info.model_dir.display().to_string(),
            device: info.device.clone(),
            dtype: info.dtype.clone(),
            dims: info.dims.iter().map(|&d| d as i32).collect(),
            max_seq_length: info.max_seq_length as i32,
            tasks: engine.tasks(),
            checksums: serde_json::Value::Object(checksums),
            load_seconds: info.load_time.as_secs_f64(),
            weights_mb: info.weight_bytes as f64 / (1 << 20) as f64,
            version: info.version.to_string(),
        }
    })
}
