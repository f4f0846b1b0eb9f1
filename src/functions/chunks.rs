//! `chunks()` and `embed_chunks()` (declared in sql/embeddinggemma.sql): long documents cut on
//! the model's token boundaries, the chunks of many documents embedded together.

use pgrx::prelude::*;

use crate::embedding::chunking::{ChunkRows, Cut, Pending};
use crate::embedding::texts::Texts;
use crate::pg::vector::PgVector;

/// One output row: document ordinal, chunk number, 1-based character offsets (end
/// exclusive), body and, for embed_chunks, the embedding.
type Row = (i32, i32, i32, i32, String, Option<PgVector>);

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
