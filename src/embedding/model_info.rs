//! `embeddinggemma_info()`'s row: the model a call would use, wherever it is held.

#[derive(Clone)]
pub struct ModelInfo {
    pub path: String,
    pub device: String,
    pub dtype: String,
    pub dims: Vec<i32>,
    pub max_seq_length: i32,
    pub tasks: Vec<String>,
    /// File name → sha256, as verified at load.
    pub checksums: serde_json::Value,
    pub load_seconds: f64,
    pub weights_mb: f64,
    pub version: String,
}
