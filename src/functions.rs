//! The SQL-callable functions (declared in sql/embeddinggemma.sql).

use pgrx::prelude::*;
use pgrx::{JsonB, PgSqlErrorCode};

use crate::errors::raise;
use crate::model;
use crate::vector::PgVector;

/// Embeds the non-NULL entries of `inputs`; NULL entries stay NULL.
fn embed_optional(inputs: &[Option<&str>], task: &str, dim: i32) -> Vec<Option<Vec<f32>>> {
    let texts: Vec<&str> = inputs.iter().flatten().copied().collect();
    let mut vectors = model::embed(&texts, task, dim).into_iter();
    inputs.iter().map(|t| t.and_then(|_| vectors.next())).collect()
}

#[pg_extern(sql = "")]
fn embeddinggemma_embed(input: &str, task: &str, dim: i32) -> PgVector {
    let v = model::embed(&[input], task, dim);
    PgVector::from_slice(&v[0])
}

#[pg_extern(sql = "")]
fn embeddinggemma_embed_batch(
    inputs: Array<&str>,
    task: &str,
    dim: i32,
) -> TableIterator<'static, (name!(ord, i32), name!(embedding, Option<PgVector>))> {
    let inputs: Vec<Option<&str>> = inputs.iter().collect();
    let vectors = embed_optional(&inputs, task, dim);
    TableIterator::new(
        vectors
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i as i32 + 1, v.map(|v| PgVector::from_slice(&v)))),
    )
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
    let ids: Vec<Option<i64>> = ids.iter().collect();
    let inputs: Vec<Option<&str>> = inputs.iter().collect();
    let vectors = embed_optional(&inputs, task, dim);
    TableIterator::new(ids.into_iter().zip(vectors).map(|(id, v)| (id, v.map(|v| PgVector::from_slice(&v)))))
}

#[pg_extern(sql = "")]
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
    let row = model::with_engine(|engine, _| {
        let info = engine.info();
        let sha: serde_json::Map<String, serde_json::Value> =
            info.checksums.iter().map(|(f, h)| (f.clone(), serde_json::Value::String(h.clone()))).collect();
        (
            info.model_dir.display().to_string(),
            info.device.clone(),
            info.dtype.clone(),
            info.dims.iter().map(|&d| d as i32).collect(),
            info.max_seq_length as i32,
            engine.tasks(),
            JsonB(serde_json::Value::Object(sha)),
            info.load_time.as_secs_f64(),
            info.weight_bytes as f64 / (1 << 20) as f64,
            info.version.to_string(),
        )
    });
    TableIterator::once(row)
}
