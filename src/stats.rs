//! `embeddinggemma_stats()`: what this backend's embedding work cost, at a glance.

use pgrx::prelude::*;

use crate::model;

/// Resident anonymous memory of this backend, from /proc/self/status.
fn anon_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: i64 = status.lines().find_map(|l| l.strip_prefix("RssAnon:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}

fn mb(bytes: f64) -> f64 {
    bytes / (1u64 << 20) as f64
}

#[pg_extern(sql = "")]
#[allow(clippy::type_complexity)]
fn embeddinggemma_stats() -> TableIterator<
    'static,
    (
        name!(calls, i64),
        name!(texts, i64),
        name!(real_tokens, i64),
        name!(padded_tokens, i64),
        name!(fill_ratio, f64),
        name!(forward_passes, i64),
        name!(texts_per_pass, f64),
        name!(truncated, i64),
        name!(tokenize_seconds, f64),
        name!(forward_seconds, f64),
        name!(tokens_per_second, f64),
        name!(wait_seconds, f64),
        name!(model_loads, i64),
        name!(load_seconds, f64),
        name!(device, Option<String>),
        name!(dtype, Option<String>),
        name!(model_memory_mb, Option<f64>),
        name!(backend_memory_mb, Option<f64>),
    ),
> {
    let s = model::stats();
    let e = s.engine;
    let busy = (e.tokenize_time + e.forward_time).as_secs_f64();
    let facts = model::loaded_model();
    TableIterator::once((
        s.calls as i64,
        e.texts as i64,
        e.real_tokens as i64,
        e.padded_tokens as i64,
        e.fill_ratio(),
        e.forward_passes as i64,
        if e.forward_passes == 0 { 0.0 } else { e.texts as f64 / e.forward_passes as f64 },
        e.truncated as i64,
        e.tokenize_time.as_secs_f64(),
        e.forward_time.as_secs_f64(),
        if busy > 0.0 { e.real_tokens as f64 / busy } else { 0.0 },
        s.wait_time.as_secs_f64(),
        s.loads as i64,
        s.load_time.as_secs_f64(),
        facts.as_ref().map(|f| f.device.clone()),
        facts.as_ref().map(|f| f.dtype.clone()),
        facts.as_ref().map(|f| mb(f.weight_bytes as f64)),
        anon_bytes().map(|b| mb(b as f64)),
    ))
}

#[pg_extern(sql = "")]
fn embeddinggemma_stats_reset() {
    model::reset_stats();
}
