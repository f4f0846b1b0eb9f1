//! EmbeddingGemma-300m in pure Rust on candle: sentence-transformers-exact embeddings with
//! length-bucketed batching. No PostgreSQL dependency; the extension is a thin layer on top.

mod chunk;
mod config;
mod engine;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod manifest;
mod model;
mod options;
pub mod planner;
pub mod reuse_alloc;
pub mod service;
mod stats;
mod threads;
mod tokenize;
mod weights;

pub use chunk::{Chunk, Chunker};
pub use engine::{confine_candle_threads, Engine, EngineInfo, CANDLE_THREADS, WINDOW_TEXTS};
pub use error::{Error, Result};
pub use manifest::{sha256_file, Manifest};
pub use options::{
    DeviceChoice, EngineOptions, Precision, Request, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_MEMORY,
};
pub use planner::{Bucket, MemoryModel, Plan};
pub use stats::Stats;
pub use threads::{with_signals_blocked, JoinedPool};
pub use tokenize::{Cancel, TextTokenizer, TokenizedText};
