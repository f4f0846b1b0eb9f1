//! How to load the model: device, precision, threads, batching limits, expected checksums.

use std::fmt;
use std::str::FromStr;

use crate::manifest::Manifest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The first CUDA device when the build has CUDA and one is present, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}; valid devices: auto, cpu, cuda, cuda:N")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => write!(f, "auto"),
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// float32 on a CPU (exact), bfloat16 on CUDA (fast).
    Auto,
    F32,
    Bf16,
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Precision::Auto),
            "f32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown dtype {s:?}; valid dtypes: auto, f32, bf16")),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// Padded tokens per forward pass. Chosen by measurement (docs/performance.md): larger buckets
/// stop paying once matrix products are big enough to keep both cores busy.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 8192;
pub const DEFAULT_MAX_BATCH_SIZE: usize = 256;

/// Memory one call may use beyond the loaded weights, unless set otherwise.
pub const DEFAULT_MAX_MEMORY: usize = 2 << 30;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub device: DeviceChoice,
    pub precision: Precision,
    /// CPU threads for one call; 0 means one per core.
    pub threads: usize,
    pub max_batch_tokens: usize,
    pub max_batch_size: usize,
    /// Files whose sha256 must match before anything is loaded.
    pub checksums: Manifest,
    /// Run attention and the MLP gate on candle's generic ops instead of the float32 CPU
    /// kernels: the code path GPUs take, kept testable on a CPU.
    pub portable_kernels: bool,
    /// Bytes one call may use beyond the weights (activations, tokens, vectors); buckets are
    /// planned to fit. See `Engine::set_memory_limit`.
    pub max_memory: usize,
    /// Keep a pool of `threads` threads for `embed` for the engine's life (the CLI). Off, `embed`
    /// starts its threads per call and joins them before returning, so an idle process holds
    /// none (with candle's own pool confined by the host: `confine_candle_threads`); `embed_in`
    /// always runs on the caller's pool.
    pub own_thread_pool: bool,
    /// Tune glibc's malloc for repeated large activations (mmap and trim thresholds at
    /// 512 MiB). Process-wide, so off by default: a host such as PostgreSQL keeps its settings.
    pub tune_allocator: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: DeviceChoice::Auto,
            precision: Precision::Auto,
            threads: 0,
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            max_batch_size: DEFAULT_MAX_BATCH_SIZE,
            checksums: Manifest::embeddinggemma_300m(),
            portable_kernels: false,
            max_memory: DEFAULT_MAX_MEMORY,
            own_thread_pool: false,
            tune_allocator: false,
        }
    }
}

/// What one call asks for.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// A prompt name of the model, or "none" for raw text.
    pub task: &'a str,
    pub dim: usize,
    /// Truncate texts over the model's limit (counted in the stats) instead of refusing them.
    pub truncate: bool,
}
