//! The SQL-callable functions (declared in sql/embeddinggemma.sql).

use std::collections::VecDeque;

use pgrx::prelude::*;
use pgrx::{JsonB, PgSqlErrorCode};

use crate::errors::raise;
use crate::routing;
use crate::vector::PgVector;

/// Texts per engine call of embed_batch: enough for the planner to fill its buckets, few
/// enough that a call over a huge array holds only one chunk's vectors at a time.
pub(crate) const CHUNK_TEXTS: usize = 1024;
/// Bytes of text per chunk, so that a chunk of long texts stays small too.
pub(crate) const CHUNK_BYTES: usize = 8 << 20;

/// The texts of an array argument, copied into one buffer: the argument does not outlive the
/// first call of a set-returning function, and one String per element would cost more than
/// the texts themselves for short ones.
pub(crate) struct Texts {
    buffer: String,
    spans: Vec<Option<(u32, u32)>>,
}

impl Texts {
    pub(crate) fn one(text: &str) -> Texts {
        Texts { buffer: text.to_string(), spans: vec![Some((0, text.len() as u32))] }
    }

    pub(crate) fn new(inputs: Array<&str>) -> Texts {
        Texts::collect(inputs.iter())
    }

    pub(crate) fn collect<'a>(inputs: impl IntoIterator<Item = Option<&'a str>>) -> Texts {
        let mut buffer = String::new();
        let spans = inputs
            .into_iter()
            .map(|t| {
                t.map(|t| {
                    // An array is at most 1 GB, so offsets fit in u32.
                    let start = buffer.len() as u32;
                    buffer.push_str(t);
                    (start, t.len() as u32)
                })
            })
            .collect();
        Texts { buffer, spans }
    }

    pub(crate) fn len(&self) -> usize {
        self.spans.len()
    }

    pub(crate) fn get(&self, i: usize) -> Option<&str> {
        self.spans[i].map(|(start, len)| &self.buffer[start as usize..(start + len) as usize])
    }
}

/// Embeds the texts a chunk at a time as rows are asked for; NULL entries give NULL vectors.
struct Chunked {
    texts: Texts,
    next: usize,
    ready: VecDeque<Option<Vec<f32>>>,
    task: String,
    dim: i32,
}

impl Chunked {
    fn new(texts: Texts, task: &str, dim: i32) -> Chunked {
        Chunked { texts, next: 0, ready: VecDeque::new(), task: task.to_string(), dim }
    }

    fn fill(&mut self) {
        let start = self.next;
        let (mut count, mut bytes) = (0, 0);
        while self.next < self.texts.spans.len() && count < CHUNK_TEXTS && bytes < CHUNK_BYTES {
            if let Some((_, len)) = self.texts.spans[self.next] {
                count += 1;
                bytes += len as usize;
            }
            self.next += 1;
        }
        let chunk: Vec<Option<&str>> = (start..self.next).map(|i| self.texts.get(i)).collect();
        let texts: Vec<&str> = chunk.iter().flatten().copied().collect();
        let mut vectors =
            if texts.is_empty() { Vec::new() } else { routing::embed(&texts, &self.task, self.dim) }.into_iter();
        self.ready.extend(chunk.iter().map(|t| t.and_then(|_| vectors.next())));
    }
}

impl Iterator for Chunked {
    type Item = Option<PgVector>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.ready.is_empty() {
            self.fill();
        }
        self.ready.pop_front().map(|v| v.map(|v| PgVector::from_slice(&v)))
    }
}

#[pg_extern(sql = "")]
fn embeddinggemma_embed(input: &str, task: &str, dim: i32) -> PgVector {
    let v = routing::embed(&[input], task, dim);
    PgVector::from_slice(&v[0])
}

#[pg_extern(sql = "")]
fn embeddinggemma_embed_batch(
    inputs: Array<&str>,
    task: &str,
    dim: i32,
) -> TableIterator<'static, (name!(ord, i32), name!(embedding, Option<PgVector>))> {
    routing::check_request(task, dim);
    let rows = Chunked::new(Texts::new(inputs), task, dim);
    TableIterator::new(rows.enumerate().map(|(i, v)| (i as i32 + 1, v)))
}

#[pg_extern(sql = "")]
fn embeddinggemma_embed_batch_ids(
    ids: Array<i64>,
    inputs: Array<&str>,
    task: &str,
    dim: i32,
) -> TableIterator<'static, (name!(id, Option<i64>), name!(embedding, Option<PgVector>))> {
    if ids.len() != inputs.len() {
        raise(
            PgSqlErrorCode::ERRCODE_ARRAY_ELEMENT_ERROR,
            format!("embed_batch: {} ids but {} inputs", ids.len(), inputs.len()),
            "Pass arrays of the same length, e.g. array_agg(id ORDER BY id) and array_agg(body ORDER BY id).",
        )
    }
    routing::check_request(task, dim);
    let ids: Vec<Option<i64>> = ids.iter().collect();
    let rows = Chunked::new(Texts::new(inputs), task, dim);
    TableIterator::new(ids.into_iter().zip(rows))
}

#[pg_extern(sql = "")]
#[allow(clippy::type_complexity)] // pgrx spells a table's columns in the signature
fn embeddinggemma_info() -> TableIterator<
    'static,
    (
        name!(model_path, String),
        name!(device, String),
        name!(dtype, String),
        name!(dims, Vec<i32>),
        name!(max_seq_length, i32),
        name!(tasks, Vec<String>),
        name!(weights_sha256, JsonB),
        name!(load_seconds, f64),
        name!(weights_mb, f64),
        name!(engine_version, String),
    ),
> {
    let m = routing::info();
    TableIterator::once((
        m.path,
        m.device,
        m.dtype,
        m.dims,
        m.max_seq_length,
        m.tasks,
        JsonB(m.checksums),
        m.load_seconds,
        m.weights_mb,
        m.version,
    ))
}
