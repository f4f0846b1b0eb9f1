//! The public entry point: load a model directory once, embed many texts per call.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};

use crate::chunk::{Chunk, Chunker};
use crate::config::ModelConfig;
use crate::error::{catch_panic, Error, Result};
use crate::model::{normalize, Encoder, Placement, SentenceHead};
use crate::options::{DeviceChoice, EngineOptions, Precision, Request};
use crate::planner::{self, MemoryModel, Plan};
use crate::stats::Stats;
use crate::threads::JoinedPool;
use crate::tokenize::{Cancel, TextTokenizer, TokenizedText};

/// Texts tokenized, planned and embedded together: bounds what one step of a call holds
/// (ids, plan, vectors) whatever the number of texts.
pub const WINDOW_TEXTS: usize = 4096;

/// Memory of a call besides its forward passes: a window's ids and vectors, tokenizer work.
const CALL_OVERHEAD_BYTES: usize = 64 << 20;

/// Matryoshka sizes the model was trained for, besides its full width.
const MATRYOSHKA_DIMS: [usize; 3] = [512, 256, 128];

/// Facts about a loaded engine, for `embeddinggemma_info()` and the CLI.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub model_dir: PathBuf,
    /// Verified files and their sha256.
    pub checksums: Vec<(String, String)>,
    pub device: String,
    pub dtype: String,
    pub threads: usize,
    pub dims: Vec<usize>,
    pub max_seq_length: usize,
    pub prompts: Vec<(String, String)>,
    pub max_batch_tokens: usize,
    pub max_batch_size: usize,
    pub load_time: Duration,
    /// Weights copied into this process (the token embedding table is shared, not counted).
    pub weight_bytes: usize,
    pub version: &'static str,
}

pub struct Engine {
    config: ModelConfig,
    tokenizer: TextTokenizer,
    encoder: Encoder,
    head: SentenceHead,
    /// `EngineOptions::own_thread_pool`.
    pool: Option<JoinedPool>,
    /// With an own pool: one as large of idle-class threads, started on the first
    /// background pass (the service's asynchronous work), so that background embedding takes
    /// only the CPU that the database's own processes leave idle.
    background_pool: std::sync::OnceLock<JoinedPool>,
    /// The background pool's threads are at nice 19 in the normal class, not idle-class.
    background_softened: AtomicBool,
    memory: MemoryModel,
    max_memory: usize,
    info: EngineInfo,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("info", &self.info).finish_non_exhaustive()
    }
}

/// The large files loaded after the JSON (which is checked as it is read): each must have a
/// known checksum.
fn loaded_files(config: &ModelConfig, dir: &Path) -> Vec<String> {
    let mut files = vec!["model.safetensors".to_string(), "tokenizer.json".to_string()];
    for dense in &config.dense {
        let rel = dense.dir.join("model.safetensors");
        files.push(rel.strip_prefix(dir).unwrap_or(&rel).to_string_lossy().into_owned());
    }
    files
}

fn resolve_device(choice: DeviceChoice) -> Result<Device> {
    let cuda = |n: usize| {
        Device::new_cuda(n)
            .map_err(|e| Error::Device { device: format!("cuda:{n}"), reason: crate::error::candle_message(e) })
    };
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(n) => cuda(n),
        DeviceChoice::Auto if candle_core::utils::cuda_is_available() => cuda(0).or(Ok(Device::Cpu)),
        DeviceChoice::Auto => Ok(Device::Cpu),
    }
}

fn resolve_dtype(precision: Precision, device: &Device) -> DType {
    match (precision, device) {
        (Precision::F32, _) => DType::F32,
        (Precision::Bf16, _) => DType::BF16,
        (Precision::Auto, Device::Cpu) => DType::F32,
        (Precision::Auto, _) => DType::BF16,
    }
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        Device::Metal(_) => "metal".into(),
    }
}

/// Large activations are allocated and freed many times per forward pass; glibc would map and
/// unmap each one, paying page faults and zeroing every time. Keeping them on the heap lets
/// them be reused; the end of each call's `ReuseScope` returns them.
fn keep_large_allocations_on_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts glibc allocator thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

/// candle 0.11 runs large elementwise ops on a process-wide pool of its own, started on first
/// use with one thread per core (or `CANDLE_NUM_THREADS`) and kept for the process's life. A
/// host process that gives the engine its own pool (a PostgreSQL backend) must not get those
/// idle threads: this makes the pool empty unless the operator set `CANDLE_NUM_THREADS`, so
/// those ops run on the calling thread (the matrix products and attention still run on the
/// caller's pool).
///
/// # Safety
/// It writes the process environment: call it while the process has one thread (PostgreSQL's
/// `_PG_init`), before any thread that might read the environment exists. Returns whether it
/// set the variable (so that a host can leave it out of the environment of processes that
/// keep threads of their own, such as `embeddinggemma serve`).
pub unsafe fn confine_candle_threads() -> bool {
    if std::env::var_os(CANDLE_THREADS).is_some() {
        return false;
    }
    // SAFETY: per this function's contract, no other thread exists.
    unsafe { std::env::set_var(CANDLE_THREADS, "1") };
    true
}

/// candle's environment variable for the size of its pool.
pub const CANDLE_THREADS: &str = "CANDLE_NUM_THREADS";

impl Engine {
    /// Verifies the checksums, then loads config, tokenizer and weights from a
    /// sentence-transformers directory.
    pub fn load(dir: &Path, options: &EngineOptions) -> Result<Engine> {
        catch_panic(|| Engine::load_inner(dir, options))
    }

    fn load_inner(dir: &Path, options: &EngineOptions) -> Result<Engine> {
        let started = Instant::now();
        if options.tune_allocator {
            keep_large_allocations_on_heap();
        }
        let dir = dir.canonicalize().map_err(|e| Error::file(dir, e))?;
        if options.max_batch_tokens == 0 {
            return Err(Error::InvalidOption("max_batch_tokens must be positive".into()));
        }
        let config = ModelConfig::from_dir(&dir, &crate::config::verified_reader(&dir, &options.checksums))?;
        for file in loaded_files(&config, &dir) {
            if !options.checksums.covers(&file) {
                return Err(Error::file(dir.join(&file), "no sha256 is known for this file, so it cannot be verified"));
            }
        }
        options.checksums.verify(&dir)?;

        let device = resolve_device(options.device)?;
        let weights = resolve_dtype(options.precision, &device);
        // CPUs compute in float32 whatever the weights are stored in (candle has no bf16 matmul there).
        let activations = if device.is_cpu() { DType::F32 } else { weights };
        let at = Placement { device: device.clone(), weights, activations, portable: options.portable_kernels };

        let enc = &config.encoder;
        let tokenizer = TextTokenizer::load(
            &dir.join("tokenizer.json"),
            enc.bos_token_id,
            enc.eos_token_id,
            config.max_seq_length,
        )?;
        let file = crate::weights::SafeTensorsFile::open(&dir.join("model.safetensors"))?;
        let encoder = Encoder::load(&file, enc, &at)?;
        let head = SentenceHead::load(&config.dense, &at)?;

        let threads = if options.threads == 0 { candle_core::utils::get_num_threads() } else { options.threads };
        let pool = if options.own_thread_pool { Some(JoinedPool::new(threads, "embeddinggemma")?) } else { None };
        let memory = MemoryModel {
            hidden: enc.hidden_size,
            intermediate: enc.intermediate_size,
            heads: enc.num_attention_heads,
            kv_heads: enc.num_key_value_heads,
            head_dim: enc.head_dim,
            window: enc.sliding_half_window(),
            portable: !at.cpu_kernels(),
            threads,
        };

        let full = config.output_dim();
        let dims = std::iter::once(full).chain(MATRYOSHKA_DIMS.into_iter().filter(|&d| d < full)).collect();
        let info = EngineInfo {
            model_dir: dir.clone(),
            checksums: options.checksums.entries().map(|(p, h)| (p.to_string(), h.to_string())).collect(),
            device: device_name(&device),
            dtype: if weights == DType::BF16 { "bf16".into() } else { "f32".into() },
            threads,
            dims,
            max_seq_length: config.max_seq_length,
            prompts: config.prompts.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            max_batch_tokens: options.max_batch_tokens,
            max_batch_size: options.max_batch_size.max(1),
            load_time: started.elapsed(),
            weight_bytes: encoder.bytes() + head.bytes(),
            version: env!("CARGO_PKG_VERSION"),
        };
        Ok(Engine {
            config,
            tokenizer,
            encoder,
            head,
            pool,
            background_pool: Default::default(),
            background_softened: AtomicBool::new(false),
            memory,
            max_memory: options.max_memory,
            info,
        })
    }

    /// Runs `f` on the engine's own pool, or on one started for this call and joined after.
    fn on_pool<R>(&self, f: impl FnOnce(&rayon::ThreadPool) -> Result<R>) -> Result<R> {
        match &self.pool {
            Some(pool) => f(pool),
            None => {
                let pool = JoinedPool::new(self.info.threads, "embeddinggemma")?;
                f(&pool)
            }
        }
    }

    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Task names accepted by `embed`: the model's prompt names, then "none".
    pub fn tasks(&self) -> Vec<String> {
        self.config.prompts.keys().cloned().chain(["none".to_string()]).collect()
    }

    /// The prompt text for a task name.
    pub fn prompt(&self, task: &str) -> Result<&str> {
        if task == "none" {
            return Ok("");
        }
        self.config
            .prompts
            .get(task)
            .map(String::as_str)
            .ok_or_else(|| Error::UnknownTask { name: task.to_string(), valid: self.tasks().join(", ") })
    }

    pub fn check_dim(&self, dim: i64) -> Result<usize> {
        match usize::try_from(dim) {
            Ok(d) if self.info.dims.contains(&d) => Ok(d),
            _ => Err(Error::InvalidDim {
                dim,
                valid: self.info.dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
            }),
        }
    }

    /// Token ids the model will see for each text (after truncation).
    pub fn tokenize(&self, texts: &[&str], task: &str) -> Result<Vec<TokenizedText>> {
        let prompt = self.prompt(task)?;
        self.on_pool(|pool| catch_panic(|| pool.install(|| self.tokenizer.encode_all(prompt, texts, &|| false))))
    }

    /// Checked settings for chunking texts for `task` (see `Chunker`); `Error::InvalidOption`
    /// names the allowed ranges of `max_tokens` and `overlap`.
    pub fn chunker(&self, task: &str, max_tokens: usize, overlap: usize) -> Result<Chunker<'_>> {
        Chunker::new(&self.tokenizer, task, self.prompt(task)?, max_tokens, overlap)
    }

    /// Cuts `text` into chunks that each embed for `task` within `max_tokens` tokens (prompt,
    /// `<bos>` and `<eos>` included), the next starting about `overlap` tokens before the
    /// previous one's end. Tokenizes only; `cancel` is polled between chunks.
    pub fn chunk(
        &self,
        text: &str,
        task: &str,
        max_tokens: usize,
        overlap: usize,
        cancel: Cancel,
    ) -> Result<Vec<Chunk>> {
        catch_panic(|| self.chunker(task, max_tokens, overlap)?.chunks(text, cancel))
    }

    /// The buckets `embed` would run for texts of these token counts (of one window).
    pub fn plan(&self, lengths: &[usize]) -> Plan {
        self.plan_tokens(lengths, self.info.max_batch_tokens)
    }

    /// `plan` with passes of at most `max_tokens` tokens (and `max_batch_tokens`): smaller
    /// passes for work that must yield to other work soon.
    pub fn plan_tokens(&self, lengths: &[usize], max_tokens: usize) -> Plan {
        let memory = MemoryModel { threads: self.info.threads, ..self.memory };
        self.plan_with(lengths, &memory, max_tokens.min(self.info.max_batch_tokens)).unwrap_or_else(|p| p)
    }

    fn plan_with(&self, lengths: &[usize], memory: &MemoryModel, max_tokens: usize) -> std::result::Result<Plan, Plan> {
        let budget = self.max_memory.saturating_sub(CALL_OVERHEAD_BYTES);
        let fits = |size: usize, len: usize| memory.pass_bytes(size, len) <= budget;
        planner::plan_within(lengths, max_tokens.max(1), self.info.max_batch_size, &fits)
    }

    /// Token positions a pass computes for `real` tokens planned as `padded`: the CPU kernels
    /// run a bucket packed (no padding rows), other devices padded.
    pub fn computed_tokens(&self, real: usize, padded: usize) -> usize {
        if self.memory.portable {
            padded
        } else {
            real
        }
    }

    /// Estimated peak bytes of one call's forward pass over `size` texts padded to `len`
    /// tokens, plus the call's fixed overhead: what `max_memory` is compared with.
    pub fn estimate_memory(&self, size: usize, len: usize) -> usize {
        let memory = MemoryModel { threads: self.info.threads, ..self.memory };
        memory.pass_bytes(size, len).saturating_add(CALL_OVERHEAD_BYTES)
    }

    /// Bytes one call may use beyond the weights: buckets shrink to fit, and a text whose pass
    /// alone would need more is refused. 0 leaves no room for any pass.
    pub fn set_memory_limit(&mut self, bytes: usize) {
        self.max_memory = bytes;
    }

    pub fn memory_limit(&self) -> usize {
        self.max_memory
    }

    /// Changes the bucket limits of later calls.
    pub fn set_batch_limits(&mut self, max_batch_tokens: usize, max_batch_size: usize) {
        self.info.max_batch_tokens = max_batch_tokens.max(1);
        self.info.max_batch_size = max_batch_size.max(1);
    }

    /// One forward pass over token ids (a bucket of `plan`, ids as `tokenize` gives them;
    /// packed on the CPU kernels, else padded to the longest): unit vectors of the model's full width, in the order of `seqs`.
    /// For callers that plan texts of several requests together (the service).
    pub fn forward_ids(&self, seqs: &[&[u32]], cancel: &(dyn Fn() -> bool + Sync)) -> Result<Vec<Vec<f32>>> {
        self.on_pool(|pool| self.forward_ids_in(pool, seqs, cancel))
    }

    /// `forward_ids` for background work: with an own pool, on its low-priority twin.
    pub fn forward_ids_background(&self, seqs: &[&[u32]], cancel: &(dyn Fn() -> bool + Sync)) -> Result<Vec<Vec<f32>>> {
        if self.pool.is_none() {
            return self.forward_ids(seqs, cancel);
        }
        if self.background_pool.get().is_none() {
            // Candle starts its bf16-conversion helper thread on first use, and a thread inherits
            // its creator's class: started from an idle-class thread, interactive passes would
            // wait on it. Start it here, on the caller's (normal) thread, first.
            candle_core::utils::barrier_pool();
            let pool = JoinedPool::with_priority(self.info.threads, "embeddinggemma-bg", true)?;
            let _ = self.background_pool.set(pool);
        }
        let pool = self.background_pool.get().expect("set above");
        self.forward_ids_in(pool, seqs, cancel)
    }

    /// Whether background passes run on a pool of their own beside interactive ones: on the
    /// CPU with an own pool (a GPU runs one pass at a time).
    pub fn has_background_pool(&self) -> bool {
        self.pool.is_some() && self.info.device == "cpu"
    }

    /// Interactive passes run beside a background one: its threads leave the idle class for
    /// nice 19 meanwhile (see `JoinedPool::set_idle`: a lock they hold must not stall them).
    pub fn soften_background(&self) {
        if !self.background_softened.swap(true, Ordering::AcqRel) {
            if let Some(pool) = self.background_pool.get() {
                pool.set_idle(false);
            }
        }
    }

    /// Background threads back to the idle class (after `soften_background`).
    pub fn calm_background(&self) {
        if self.background_softened.swap(false, Ordering::AcqRel) {
            if let Some(pool) = self.background_pool.get() {
                pool.set_idle(true);
            }
        }
    }

    fn forward_ids_in(
        &self,
        pool: &rayon::ThreadPool,
        seqs: &[&[u32]],
        cancel: &(dyn Fn() -> bool + Sync),
    ) -> Result<Vec<Vec<f32>>> {
        let padded_len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        catch_panic(|| {
            pool.install(|| {
                let hidden = self.encoder.forward(seqs, padded_len, cancel)?;
                self.head.forward(&hidden, &lens, padded_len)
            })
        })
    }

    /// Embeds `texts`, returning unit vectors of `request.dim` values in input order.
    /// `cancel` is polled per text while tokenizing, between forward passes and between
    /// layers; when it returns true the call stops with `Error::Cancelled`.
    pub fn embed(
        &self,
        texts: &[&str],
        request: &Request,
        cancel: &(dyn Fn() -> bool + Sync),
    ) -> Result<(Vec<Vec<f32>>, Stats)> {
        self.on_pool(|pool| self.embed_in(pool, texts, request, cancel))
    }

    /// `embed` on the caller's thread pool, whose size sets how many CPU threads the call uses.
    pub fn embed_in(
        &self,
        pool: &rayon::ThreadPool,
        texts: &[&str],
        request: &Request,
        cancel: &(dyn Fn() -> bool + Sync),
    ) -> Result<(Vec<Vec<f32>>, Stats)> {
        let mut vectors = Vec::new();
        vectors
            .try_reserve_exact(texts.len())
            .map_err(|e| Error::out_of_memory(format!("{} vectors: {e}", texts.len())))?;
        let stats = self.embed_stream_in(pool, texts, request, cancel, &mut |_, chunk| {
            vectors.extend(chunk);
            Ok(())
        })?;
        Ok((vectors, stats))
    }

    /// `embed_in` for arrays of any length: texts are embedded `WINDOW_TEXTS` at a time and
    /// each window's vectors (input order) go to `sink(first_index, vectors)` before the next
    /// window starts, so the call holds one window at a time. `sink` runs on the calling
    /// thread (never on a pool thread); an error from it stops the call.
    pub fn embed_stream_in(
        &self,
        pool: &rayon::ThreadPool,
        texts: &[&str],
        request: &Request,
        cancel: &(dyn Fn() -> bool + Sync),
        sink: &mut dyn FnMut(usize, Vec<Vec<f32>>) -> Result<()>,
    ) -> Result<Stats> {
        // Ending the call's scope hands its freed activations back to the system.
        let _reuse = crate::reuse_alloc::ReuseScope::enter();
        (|| {
            let prompt = self.prompt(request.task)?;
            let dim = self.check_dim(request.dim as i64)?;
            let mut stats = Stats::default();
            for (n, window) in texts.chunks(WINDOW_TEXTS).enumerate() {
                if cancel() {
                    return Err(Error::Cancelled);
                }
                let first = n * WINDOW_TEXTS;
                let (vectors, window_stats) = catch_panic(|| {
                    pool.install(|| self.embed_window(first, window, prompt, dim, request.truncate, cancel))
                })?;
                stats += window_stats;
                sink(first, vectors)?;
            }
            Ok(stats)
        })()
    }

    fn embed_window(
        &self,
        first: usize,
        texts: &[&str],
        prompt: &str,
        dim: usize,
        truncate: bool,
        cancel: &(dyn Fn() -> bool + Sync),
    ) -> Result<(Vec<Vec<f32>>, Stats)> {
        let mut stats = Stats { texts: texts.len() as u64, ..Stats::default() };

        let started = Instant::now();
        let tokenized = self.tokenizer.encode_all(prompt, texts, cancel)?;
        stats.tokenize_time = started.elapsed();
        if let Some((index, t)) = tokenized.iter().enumerate().find(|(_, t)| t.truncated()) {
            if !truncate {
                return Err(Error::TooLong {
                    index: first + index,
                    tokens: t.full_len,
                    limit: self.tokenizer.max_len(),
                });
            }
        }
        stats.truncated = tokenized.iter().filter(|t| t.truncated()).count() as u64;

        let lengths: Vec<usize> = tokenized.iter().map(|t| t.ids.len()).collect();
        let memory = MemoryModel { threads: rayon::current_num_threads(), ..self.memory };
        let plan = self.plan_with(&lengths, &memory, self.info.max_batch_tokens).map_err(|plan| {
            let bucket = &plan.buckets[0];
            Error::InvalidOption(format!(
                "text {} ({} tokens) needs about {} MiB for its forward pass, more than the memory limit of {} MiB",
                first + bucket.members[0],
                bucket.padded_len,
                (memory.pass_bytes(1, bucket.padded_len) + CALL_OVERHEAD_BYTES) >> 20,
                self.max_memory >> 20
            ))
        })?;
        stats.real_tokens = plan.real_tokens as u64;
        stats.padded_tokens = self.computed_tokens(plan.real_tokens, plan.padded_tokens) as u64;

        let started = Instant::now();
        let mut vectors = vec![Vec::new(); texts.len()];
        for bucket in &plan.buckets {
            if cancel() {
                return Err(Error::Cancelled);
            }
            let seqs: Vec<&[u32]> = bucket.members.iter().map(|&i| tokenized[i].ids.as_slice()).collect();
            let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
            let hidden = self.encoder.forward(&seqs, bucket.padded_len, cancel)?;
            let full = self.head.forward(&hidden, &lens, bucket.padded_len)?;
            for (&i, v) in bucket.members.iter().zip(full) {
                vectors[i] = if dim == v.len() { v } else { normalize(&v[..dim]) };
            }
            stats.forward_passes += 1;
        }
        stats.forward_time = started.elapsed();
        Ok((vectors, stats))
    }
}
