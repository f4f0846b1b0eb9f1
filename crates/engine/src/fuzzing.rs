//! Entry points for the fuzz targets (crates/engine/fuzz) and their seeded CI run
//! (tests/fuzz_inputs.rs): each feeds untrusted bytes to one parser and panics only when an
//! invariant breaks, never for an input that is merely invalid.

use std::path::Path;

use crate::config::ModelConfig;
use crate::error::Error;
use crate::manifest::Manifest;
use crate::tokenize::TextTokenizer;

/// Tensors in a valid safetensors header.
pub fn safetensors_tensors(bytes: &[u8]) -> crate::error::Result<usize> {
    crate::weights::check_header(bytes)
}

/// A safetensors header: parsed or refused.
pub fn safetensors_header(bytes: &[u8]) {
    let _ = crate::weights::check_header(bytes);
}

/// A manifest: parsed or refused; what parses lists only relative paths inside the directory.
pub fn manifest(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    if let Ok(m) = Manifest::parse(text) {
        for (path, hash) in m.entries() {
            assert!(!path.starts_with('/') && !path.split('/').any(|p| p == ".."), "{path:?}");
            assert!(hash.len() == 64, "{hash:?}");
        }
    }
}

/// The JSON files `model_config` reads, in the order of the input's NUL-separated parts.
pub const CONFIG_FILES: [&str; 8] = [
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "2_Dense/config.json",
    "3_Dense/config.json",
    "tokenizer_config.json",
];

/// The model directory's JSON files, split from one input at NUL bytes (`CONFIG_FILES`),
/// read from memory.
pub fn model_config(bytes: &[u8]) {
    let parts: Vec<&[u8]> = bytes.split(|&b| b == 0).collect();
    let dir = Path::new("/fuzz");
    let read = |path: &Path| -> crate::error::Result<Vec<u8>> {
        let rel = path.strip_prefix(dir).map_err(|_| Error::file(path, "outside the directory"))?;
        let i = CONFIG_FILES.iter().position(|f| Path::new(f) == rel).ok_or_else(|| Error::file(path, "missing"))?;
        parts.get(i).map(|p| p.to_vec()).ok_or_else(|| Error::file(path, "missing"))
    };
    let _ = crate::config::GemmaConfig::from_slice(Path::new("config.json"), parts[0]);
    if let Ok(config) = ModelConfig::from_dir(dir, &read) {
        assert!(config.max_seq_length >= 2);
        for d in &config.dense {
            assert!(d.dir.starts_with(dir), "{:?}", d.dir);
        }
    }
}

/// A text through the cut: the kept ids equal those of the whole text.
pub fn tokenize_cut(tok: &TextTokenizer, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    if text.is_empty() {
        return;
    }
    // Repeat short inputs past the size at which texts are cut.
    let long = text.repeat((4096 / text.len()).max(1) + 1);
    for t in [&*text, &long] {
        let cut = tok.encode("", t, &|| false).expect("tokenize");
        let whole = tok.encode_uncut(t).expect("tokenize");
        assert_eq!(cut.ids, whole.ids, "cut ids differ for {t:?}");
        assert_eq!(cut.truncated(), whole.truncated());
    }
}
