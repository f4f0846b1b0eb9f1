//! Expected sha256 of model files, in `sha256sum` format, and their verification.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The published checksums of google/embeddinggemma-300m (also read by `scripts/fetch-model`).
const EMBEDDINGGEMMA_300M: &str = include_str!("../../../models/embeddinggemma-300m.sha256");

/// Relative path → lowercase hex sha256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    files: BTreeMap<String, String>,
}

impl Manifest {
    pub fn embeddinggemma_300m() -> Manifest {
        Manifest::parse(EMBEDDINGGEMMA_300M).expect("built-in manifest is valid")
    }

    /// Parses `<64 hex>  <path>` lines (`sha256sum` output; `*` binary marker allowed).
    pub fn parse(text: &str) -> std::result::Result<Manifest, String> {
        let mut files = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (hash, path) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| format!("line {}: expected '<sha256>  <path>'", n + 1))?;
            let path = path.trim_start().trim_start_matches('*');
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("line {}: {hash:?} is not a sha256", n + 1));
            }
            if path.is_empty() || path.split('/').any(|p| p == "..") || path.starts_with('/') {
                return Err(format!("line {}: invalid path {path:?}", n + 1));
            }
            files.insert(path.to_string(), hash.to_ascii_lowercase());
        }
        if files.is_empty() {
            return Err("no checksums in manifest".into());
        }
        Ok(Manifest { files })
    }

    pub fn from_file(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        Manifest::parse(&text).map_err(|e| Error::file(path, e))
    }

    pub fn covers(&self, relative: &str) -> bool {
        self.files.contains_key(relative)
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.files.iter().map(|(p, h)| (p.as_str(), h.as_str()))
    }

    /// Checks bytes read from `path` (listed as `relative`) against the manifest.
    pub fn check_bytes(&self, path: &Path, relative: &str, bytes: &[u8]) -> Result<()> {
        let expected = self
            .files
            .get(relative)
            .ok_or_else(|| Error::file(path, "no sha256 is known for this file, so it cannot be verified"))?;
        let actual = format!("{:x}", Sha256::digest(bytes));
        if &actual != expected {
            return Err(Error::Checksum { path: path.to_path_buf(), expected: expected.clone(), actual });
        }
        Ok(())
    }

    /// Hashes every listed file under `dir`; the first missing or different file is an error.
    pub fn verify(&self, dir: &Path) -> Result<()> {
        for (relative, expected) in &self.files {
            let path = dir.join(relative);
            let actual = sha256_file(&path)?;
            if &actual != expected {
                return Err(Error::Checksum { path, expected: expected.clone(), actual });
            }
        }
        Ok(())
    }
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::file(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_manifest_lists_every_file_that_changes_vectors() {
        let m = Manifest::embeddinggemma_300m();
        for f in [
            "model.safetensors",
            "2_Dense/model.safetensors",
            "3_Dense/model.safetensors",
            "tokenizer.json",
            "config.json",
            "modules.json",
            "sentence_bert_config.json",
            "config_sentence_transformers.json",
            "1_Pooling/config.json",
            "2_Dense/config.json",
            "3_Dense/config.json",
        ] {
            assert!(m.covers(f), "{f}");
        }
    }

    #[test]
    fn parse_rejects_bad_lines() {
        assert!(Manifest::parse("abc  model.safetensors").is_err());
        assert!(Manifest::parse(&format!("{}  ../etc/passwd", "0".repeat(64))).is_err());
        assert!(Manifest::parse("").is_err());
        let m = Manifest::parse(&format!("{} *a/b.bin\n", "A".repeat(64))).unwrap();
        assert_eq!(m.entries().next(), Some(("a/b.bin", "a".repeat(64).as_str())));
    }
}
