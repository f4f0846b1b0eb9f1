//! `embed()`, `embed_batch()` and `embeddinggemma_info()` (declared in sql/embeddinggemma.sql).

use std::collections::VecDeque;

use pgrx::prelude::*;
use pgrx::{JsonB, PgSqlErrorCode};

use crate::embedding;
use crate::embedding::texts::{Texts, WINDOW_BYTES, WINDOW_TEXTS};
use crate::pg::errors::raise;
use crate::pg::vector::PgVector;

/// Embeds the texts a window at a time as rows are asked for; NULL entries give NULL vectors.
struct Windowed {
    texts: Texts,
    next: usize,
    ready: VecDeque<Option<Vec<f32>>>,
    task: String,
    dim: i32,
}

impl Windowed {
    fn new(texts: Texts, task: &str, dim: i32) -> Windowed {
        Windowed { texts, next: 0, ready: VecDeque::new(), task: task.to_string(), dim }
    }

    fn fill(&mut self) {
        let start = self.next;
        let (mut count, mut bytes) = (0, 0);
        while self.next < self.texts.len() && count < WINDOW_TEXTS && bytes < WINDOW_BYTES {
            if let Some(text) = self.texts.get(self.next) {
                count += 1;
                bytes += text.len();
            }
            self.next += 1;
        }
        let window: Vec<Option<&str>> = (start..self.next).map(|i| self.texts.get(i)).collect();
        let texts: Vec<&str> = window.iter().flatten().copied().collect();
        let mut vectors =
            if texts.is_empty() { Vec::new() } else { embedding::embed(&texts, &self.task, self.dim) }.into_iter();
        self.ready.extend(window.iter().map(|t| t.and_then(|_| vectors.next())));
    }
}

impl Iterator for Windowed {
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
    let v = embedding::embed(&[input], task, dim);
    PgVector::from_slice(&v[0])
}

#[pg_extern(sql = "")]
fn embeddinggemma_embed_batch(
    inputs: Array<&str>,
    task: &str,
    dim: i32,
) -> TableIterator<'static, (name!(ord, i32), name!(embedding, Option<PgVector>))> {
    embedding::check_request(task, dim);
    let rows = Windowed::new(Texts::new(inputs), task, dim);
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
    embedding::check_request(task, dim);
    let ids: Vec<Option<i64>> = ids.iter().collect();
    let rows = Windowed::new(Texts::new(inputs), task, dim);
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
    let m = embedding::info();
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
