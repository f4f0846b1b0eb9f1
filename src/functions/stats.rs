//! `embeddinggemma_stats()`: what this backend's embedding work cost, at a glance.

use pgrx::prelude::*;

use crate::embedding::{counters, in_process, service_client, service_state};

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
    let s = counters::get();
    let e = s.engine;
    let busy = (e.tokenize_time + e.forward_time).as_secs_f64();
    let facts = in_process::loaded_model();
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
    counters::reset();
}

/// The cluster's embedding service as its supervisor and the service itself report it.
#[pg_extern(sql = "")]
#[allow(clippy::type_complexity)]
fn embeddinggemma_service_status() -> TableIterator<
    'static,
    (
        name!(state, String),
        name!(pid, Option<i32>),
        name!(restarts, i64),
        name!(last_exit, Option<i32>),
        name!(up_seconds, Option<f64>),
        name!(error, Option<String>),
        name!(stats, Option<pgrx::JsonB>),
    ),
> {
    use std::sync::atomic::Ordering::Relaxed;
    if !service_state::preloaded() {
        let why = "embeddinggemma is not in shared_preload_libraries: every backend embeds in-process".to_string();
        return TableIterator::once(("off".into(), None, 0, None, None, Some(why), None));
    }
    let status = service_state::STATUS.get();
    let pid = status.pid.load(Relaxed);
    let restarts = status.starts.load(Relaxed).saturating_sub(1) as i64;
    let last_exit = (status.exits.load(Relaxed) > 0).then(|| status.last_exit.load(Relaxed));
    let reply = service_client::stats();
    let stats: Option<serde_json::Value> = reply.as_ref().ok().and_then(|s| serde_json::from_str(s).ok());
    let load_error = stats.as_ref().and_then(|s| s.get("load_error")?.as_str().map(str::to_string));
    let ready = stats.as_ref().and_then(|s| s.get("ready")?.as_bool()).unwrap_or(false);
    let (state, error) = match (&reply, load_error) {
        _ if pid == 0 => ("down", reply.err()),
        (Err(e), _) => ("starting", Some(e.clone())),
        (Ok(_), Some(e)) => ("failed", Some(e)),
        (Ok(_), None) if !ready => ("starting", None),
        (Ok(_), None) => ("running", None),
    };
    let up = stats.as_ref().and_then(|s| s.get("uptime_s")?.as_f64());
    TableIterator::once((
        state.into(),
        (pid != 0).then_some(pid),
        restarts,
        last_exit,
        up,
        error,
        stats.map(pgrx::JsonB),
    ))
}
