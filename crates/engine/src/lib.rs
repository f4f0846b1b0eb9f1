//! EmbeddingGemma-300m in pure Rust on candle: sentence-transformers-exact embeddings with
//! length-bucketed batching. No PostgreSQL dependency; the extension is a thin layer on top.

mod config;
mod engine;
mod error;
mod manifest;
mod model;
mod options;
pub mod planner;
mod stats;
mod tokenize;
mod weights;

pub use engine::{Engine, EngineInfo};
pub use error::{Error, Result};
pub use manifest::{sha256_file, Manifest};
pub use options::{DeviceChoice, EngineOptions, Precision, Request, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS};
pub use planner::{Bucket, Plan};
pub use stats::Stats;
pub use tokenize::TokenizedText;
