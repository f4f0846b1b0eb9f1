//! Memory-mapped safetensors: tensors are copied out on request, except the token embedding
//! table, whose rows are read straight from the mapping so every process shares one copy in
//! the page cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use memmap2::{Advice, Mmap, UncheckedAdvice};
use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Debug, Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

pub struct SafeTensorsFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    data_start: usize,
    entries: HashMap<String, Entry>,
}

fn element_size(dtype: &str) -> Option<usize> {
    match dtype {
        "F32" => Some(4),
        "BF16" | "F16" => Some(2),
        _ => None,
    }
}

/// Reads a safetensors file's header: where the data starts and each tensor's entry, every
/// entry checked to lie inside `bytes` and to match its shape.
fn parse_header(path: &Path, bytes: &[u8]) -> Result<(usize, HashMap<String, Entry>)> {
    let bad = |reason: String| Error::file(path, reason);
    if bytes.len() < 8 {
        return Err(bad("too short to be a safetensors file".into()));
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let data_start = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&s| s <= bytes.len())
        .ok_or_else(|| bad("header length exceeds the file".into()))?;
    let mut entries: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..data_start]).map_err(|e| bad(format!("invalid header: {e}")))?;
    entries.remove("__metadata__");
    let data_len = bytes.len() - data_start;
    let entries = entries
        .into_iter()
        .map(|(name, v)| {
            let entry: Entry = serde_json::from_value(v).map_err(|e| bad(format!("tensor {name}: {e}")))?;
            let (begin, end) = entry.data_offsets;
            let elements = entry.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            let expected = element_size(&entry.dtype).map(|s| elements.and_then(|n| n.checked_mul(s)));
            if begin > end || end > data_len || expected.is_some_and(|n| n != Some(end - begin)) {
                return Err(bad(format!("tensor {name}: data offsets do not fit its shape or the file")));
            }
            Ok((name, entry))
        })
        .collect::<Result<_>>()?;
    Ok((data_start, entries))
}

/// `parse_header` for fuzzing: the number of tensors, or the error.
#[doc(hidden)]
pub fn check_header(bytes: &[u8]) -> Result<usize> {
    parse_header(Path::new("<fuzz>"), bytes).map(|(_, entries)| entries.len())
}

impl SafeTensorsFile {
    pub fn open(path: &Path) -> Result<SafeTensorsFile> {
        let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
        // SAFETY: the file is opened read-only; its checksum was verified before loading, and a
        // concurrent writer would be an operator error we cannot guard against in any reader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::file(path, e))?;
        let (data_start, entries) = parse_header(path, &mmap)?;
        Ok(SafeTensorsFile { path: path.to_path_buf(), mmap: Arc::new(mmap), data_start, entries })
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| Error::file(&self.path, format!("tensor {name} is missing")))
    }

    fn bytes(&self, entry: &Entry) -> &[u8] {
        &self.mmap[self.data_start + entry.data_offsets.0..self.data_start + entry.data_offsets.1]
    }

    /// Copies a tensor to `device` as `dtype`, checking its shape.
    pub fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let entry = self.entry(name)?;
        if entry.shape != shape {
            return Err(Error::file(
                &self.path,
                format!("tensor {name} has shape {:?}, expected {shape:?}", entry.shape),
            ));
        }
        let bytes = self.bytes(entry);
        let tensor = match entry.dtype.as_str() {
            "F32" => Tensor::from_vec(decode_f32(bytes), shape, &Device::Cpu)?,
            "BF16" => {
                Tensor::from_vec(decode_u16(bytes).map(half::bf16::from_bits).collect::<Vec<_>>(), shape, &Device::Cpu)?
            }
            "F16" => {
                Tensor::from_vec(decode_u16(bytes).map(half::f16::from_bits).collect::<Vec<_>>(), shape, &Device::Cpu)?
            }
            other => return Err(Error::file(&self.path, format!("tensor {name} has unsupported dtype {other}"))),
        };
        let tensor = tensor.to_dtype(dtype)?.to_device(device)?;
        self.release(entry);
        Ok(tensor)
    }

    /// Drops a copied tensor's pages from this process's mapping (they stay in the page cache),
    /// so resident memory shows what the process holds rather than what it once read.
    fn release(&self, entry: &Entry) {
        const PAGE: usize = 4096;
        let start = (self.data_start + entry.data_offsets.0).next_multiple_of(PAGE);
        let end = (self.data_start + entry.data_offsets.1) / PAGE * PAGE;
        if end > start {
            // SAFETY: the mapping is read-only and file-backed, so DONTNEED only unmaps pages;
            // a later read faults them back in unchanged from the file.
            let _ = unsafe { self.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
        }
    }

    /// A view of a float32 [rows, cols] table that reads rows from the mapping on demand.
    pub fn embedding_table(&self, name: &str, rows: usize, cols: usize) -> Result<EmbeddingTable> {
        let entry = self.entry(name)?;
        if entry.shape != [rows, cols] || entry.dtype != "F32" {
            return Err(Error::file(
                &self.path,
                format!("tensor {name} is {} {:?}, expected F32 [{rows}, {cols}]", entry.dtype, entry.shape),
            ));
        }
        let offset = self.data_start + entry.data_offsets.0;
        // Each token reads one row: read-ahead would only pull in rows nobody asked for.
        let _ = self.mmap.advise_range(Advice::Random, offset, rows * cols * 4);
        Ok(EmbeddingTable { mmap: self.mmap.clone(), offset, rows, cols })
    }
}

fn decode_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn decode_u16(bytes: &[u8]) -> impl Iterator<Item = u16> + '_ {
    bytes.chunks_exact(2).map(|b| u16::from_le_bytes(b.try_into().unwrap()))
}

/// Token embedding rows served from the shared, read-only file mapping.
pub struct EmbeddingTable {
    mmap: Arc<Mmap>,
    offset: usize,
    rows: usize,
    cols: usize,
}

impl EmbeddingTable {
    /// Appends row `id` times `scale` to `out`.
    pub fn gather_row(&self, id: u32, scale: f32, out: &mut Vec<f32>) -> Result<()> {
        let id = id as usize;
        if id >= self.rows {
            return Err(Error::Inference(format!("token id {id} is outside the vocabulary of {}", self.rows)));
        }
        let start = self.offset + id * self.cols * 4;
        let row = &self.mmap[start..start + self.cols * 4];
        out.extend(row.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) * scale));
        Ok(())
    }
}
