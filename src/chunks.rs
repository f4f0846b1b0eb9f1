//! `chunks()` and `embed_chunks()` (declared in sql/embeddinggemma.sql): long documents cut on
//! the model's token boundaries, the chunks of many documents embedded together.

use std::collections::VecDeque;

use embeddinggemma_engine::Chunk;
use pgrx::prelude::*;

use crate::errors::raise_bad_cut;
use crate::functions::{Texts, CHUNK_BYTES, CHUNK_TEXTS};
use crate::routing;
use crate::vector::PgVector;

/// How documents are cut, checked for sign (the engine checks the ranges).
pub struct Cut {
    max_tokens: usize,
    overlap: usize,
    task: String,
}

impl Cut {
    pub fn new(max_tokens: i32, overlap: i32, task: &str) -> Cut {
        let non_negative = |name: &str, v: i32| {
            usize::try_from(v).unwrap_or_else(|_| raise_bad_cut(format!("{name} must not be negative, not {v}")))
        };
        Cut {
            max_tokens: non_negative("max_tokens", max_tokens),
            overlap: non_negative("overlap", overlap),
            task: task.to_string(),
        }
    }

    fn apply(&self, text: &str) -> Vec<Chunk> {
        routing::chunk(text, &self.task, self.max_tokens, self.overlap)
    }
}

/// One output row: document ordinal, chunk number, 1-based character offsets (end
/// exclusive), body and, for embed_chunks, the embedding.
type Row = (i32, i32, i32, i32, String, Option<PgVector>);

/// A chunk as cut and embedded: document ordinal, chunk number, 1-based character offsets (end
/// exclusive), body, embedding. Its vector becomes a datum only when its row is returned: a
/// datum made earlier would live in the memory of an earlier call, freed by then.
pub type Pending = (i32, i32, i32, i32, String, Option<Vec<f32>>);

/// The chunks of the documents, cut as rows are asked for and embedded a batch at a time: the
/// batches are those embed_batch would make over the same bodies.
pub struct ChunkRows {
    docs: Texts,
    next_doc: usize,
    cut: Cut,
    /// None: chunks() (no embeddings).
    dim: Option<i32>,
    /// Chunks cut but not yet embedded: (document, chunk number, offsets).
    pending: VecDeque<(usize, usize, Chunk)>,
    ready: VecDeque<Pending>,
}

impl ChunkRows {
    pub fn new(docs: Texts, cut: Cut, dim: Option<i32>) -> ChunkRows {
        if let Some(dim) = dim {
            routing::check_request(&cut.task, dim);
        }
        ChunkRows { docs, next_doc: 0, cut, dim, pending: VecDeque::new(), ready: VecDeque::new() }
    }

    fn body(&self, doc: usize, c: &Chunk) -> &str {
        &self.docs.get(doc).expect("chunks come from non-NULL documents")[c.start_byte..c.end_byte]
    }

    fn fill(&mut self) {
        let (mut batch, mut bytes) = (Vec::new(), 0);
        while batch.len() < CHUNK_TEXTS && bytes < CHUNK_BYTES {
            let Some(piece) = self.pending.pop_front() else {
                if self.next_doc == self.docs.len() {
                    break;
                }
                let doc = self.next_doc;
                self.next_doc += 1;
                if let Some(text) = self.docs.get(doc) {
                    let chunks = self.cut.apply(text);
                    self.pending.extend(chunks.into_iter().enumerate().map(|(n, c)| (doc, n, c)));
                }
                continue;
            };
            bytes += piece.2.end_byte - piece.2.start_byte;
            batch.push(piece);
        }
        let bodies: Vec<&str> = batch.iter().map(|(doc, _, c)| self.body(*doc, c)).collect();
        let vectors = match self.dim {
            Some(dim) if !bodies.is_empty() => routing::embed(&bodies, &self.cut.task, dim),
            _ => Vec::new(),
        };
        let mut vectors = vectors.into_iter();
        for (doc, n, c) in &batch {
            let offset = |chars: usize| i32::try_from(chars + 1).expect("a text is at most 1 GB");
            let body = self.body(*doc, c).to_string();
            let row = (*doc as i32 + 1, *n as i32 + 1, offset(c.start_char), offset(c.end_char), body, vectors.next());
            self.ready.push_back(row);
        }
    }
}

impl Iterator for ChunkRows {
    type Item = Pending;

    fn next(&mut self) -> Option<Pending> {
        if self.ready.is_empty() {
            self.fill();
        }
        self.ready.pop_front()
    }
}

fn returned((doc, n, start, end, body, vector): Pending) -> Row {
    (doc, n, start, end, body, vector.map(|v| PgVector::from_slice(&v)))
}

#[pg_extern(sql = "")]
fn embeddinggemma_chunks(
    input: &str,
    max_tokens: i32,
    overlap: i32,
    task: &str,
) -> TableIterator<'static, (name!(chunk, i32), name!(start_offset, i32), name!(end_offset, i32), name!(body, String))>
{
    let rows = ChunkRows::new(Texts::one(input), Cut::new(max_tokens, overlap, task), None);
    TableIterator::new(rows.map(|(_, n, start, end, body, _)| (n, start, end, body)))
}

#[pg_extern(sql = "")]
fn embeddinggemma_embed_chunks(
    input: &str,
    max_tokens: i32,
    overlap: i32,
    task: &str,
    dim: i32,
) -> TableIterator<
    'static,
    (
        name!(chunk, i32),
        name!(start_offset, i32),
        name!(end_offset, i32),
        name!(body, String),
        name!(embedding, Option<PgVector>),
    ),
> {
    let rows = ChunkRows::new(Texts::one(input), Cut::new(max_tokens, overlap, task), Some(dim));
    TableIterator::new(rows.map(returned).map(|(_, n, start, end, body, v)| (n, start, end, body, v)))
}

#[pg_extern(sql = "")]
fn embeddinggemma_embed_chunks_array(
    inputs: Array<&str>,
    max_tokens: i32,
    overlap: i32,
    task: &str,
    dim: i32,
) -> TableIterator<
    'static,
    (
        name!(ord, i32),
        name!(chunk, i32),
        name!(start_offset, i32),
        name!(end_offset, i32),
        name!(body, String),
        name!(embedding, Option<PgVector>),
    ),
> {
    TableIterator::new(ChunkRows::new(Texts::new(inputs), Cut::new(max_tokens, overlap, task), Some(dim)).map(returned))
}
