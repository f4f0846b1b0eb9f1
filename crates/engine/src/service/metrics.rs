//! Counters of the service since it started, and the JSON the `Stats` request returns.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::protocol::ErrorKind;
use crate::engine::EngineInfo;

/// Requests (for queue wait) and passes (for forward time) whose percentiles are reported.
const RECENT: usize = 1000;

/// The last `RECENT` durations.
#[derive(Default)]
struct Recent(VecDeque<Duration>);

impl Recent {
    fn push(&mut self, d: Duration) {
        if self.0.len() == RECENT {
            self.0.pop_front();
        }
        self.0.push_back(d);
    }

    /// (p50, p99) in milliseconds, nearest rank.
    fn percentiles(&self) -> Value {
        let mut ms: Vec<f64> = self.0.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        if ms.is_empty() {
            return json!({ "p50_ms": null, "p99_ms": null, "samples": 0 });
        }
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        json!({ "p50_ms": round3(at(0.50)), "p99_ms": round3(at(0.99)), "samples": ms.len() })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

#[derive(Default)]
struct Counters {
    requests: u64,
    texts: u64,
    tokens: u64,
    truncated: u64,
    withdrawn: u64,
    passes: u64,
    pass_texts: u64,
    pass_connections: u64,
    real_tokens: u64,
    padded_tokens: u64,
    forward_time: Duration,
    connections: u64,
    errors: HashMap<ErrorKind, u64>,
    queue_wait: Recent,
    forward: Recent,
    /// Background requests (asynchronous queues draining): their own count and queue wait, so
    /// that the interactive figures stay what a query sees.
    background_requests: u64,
    background_texts: u64,
    background_queue_wait: Recent,
    /// Times a background pass let interactive requests through between its layers.
    preempted: u64,
    /// Time background work waited for other processes' CPU use to drop.
    yielded: Duration,
}

/// Queue depth, read from the queue when stats are asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Depth {
    pub texts: usize,
    pub requests: usize,
    pub bytes: usize,
    pub peak_texts: usize,
    pub peak_requests: usize,
}

pub struct Metrics {
    started: Instant,
    counters: Mutex<Counters>,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics { started: Instant::now(), counters: Mutex::default() }
    }

    fn with(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut self.counters.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn connection(&self) {
        self.with(|c| c.connections += 1);
    }

    pub fn served(&self, texts: u64, tokens: u64, truncated: u64, queue_wait: Duration, background: bool) {
        self.with(|c| {
            c.requests += 1;
            c.texts += texts;
            c.tokens += tokens;
            c.truncated += truncated;
            if background {
                c.background_requests += 1;
                c.background_texts += texts;
                c.background_queue_wait.push(queue_wait);
            } else {
                c.queue_wait.push(queue_wait);
            }
        });
    }

    pub fn yielded(&self, time: Duration) {
        self.with(|c| c.yielded += time);
    }

    pub fn preempted(&self) {
        self.with(|c| c.preempted += 1);
    }

    pub fn withdrawn(&self) {
        self.with(|c| c.withdrawn += 1);
    }

    pub fn error(&self, kind: ErrorKind) {
        self.with(|c| *c.errors.entry(kind).or_default() += 1);
    }

    pub fn pass(&self, texts: usize, connections: usize, real: usize, padded: usize, time: Duration) {
        self.with(|c| {
            c.passes += 1;
            c.pass_texts += texts as u64;
            c.pass_connections += connections as u64;
            c.real_tokens += real as u64;
            c.padded_tokens += padded as u64;
            c.forward_time += time;
            c.forward.push(time);
        });
    }

    /// Everything as a JSON object; `state` adds the service's own fields (its model's load
    /// attempts, whether it drains).
    pub fn json(
        &self,
        depth: Depth,
        settings: Value,
        info: Option<&EngineInfo>,
        load_error: Option<&str>,
        state: Value,
    ) -> String {
        let c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let per_pass = |n: u64| if c.passes == 0 { 0.0 } else { round3(n as f64 / c.passes as f64) };
        let forward_s = c.forward_time.as_secs_f64();
        let (rss, anon) = memory_kb();
        let errors: serde_json::Map<String, Value> =
            ErrorKind::ALL.iter().filter_map(|k| c.errors.get(k).map(|n| (k.name().to_string(), json!(n)))).collect();
        let mut stats = json!({
            "uptime_s": round3(self.started.elapsed().as_secs_f64()),
            "pid": std::process::id(),
            "ready": info.is_some(),
            "loading": info.is_none() && load_error.is_none(),
            "load_error": load_error,
            "requests": c.requests,
            "texts": c.texts,
            "tokens": c.tokens,
            "truncated": c.truncated,
            "withdrawn": c.withdrawn,
            "connections": c.connections,
            "forward_passes": c.passes,
            "texts_per_pass": per_pass(c.pass_texts),
            "connections_per_pass": per_pass(c.pass_connections),
            "fill_ratio": if c.padded_tokens == 0 { 1.0 } else { round3(c.real_tokens as f64 / c.padded_tokens as f64) },
            "forward_s": round3(forward_s),
            "tokens_per_s": if forward_s > 0.0 { (c.real_tokens as f64 / forward_s).round() } else { 0.0 },
            "queue": {
                "texts": depth.texts, "requests": depth.requests, "bytes": depth.bytes,
                "peak_texts": depth.peak_texts, "peak_requests": depth.peak_requests,
            },
            "queue_wait": c.queue_wait.percentiles(),
            "background": {
                "requests": c.background_requests,
                "texts": c.background_texts,
                "queue_wait": c.background_queue_wait.percentiles(),
                "preempted": c.preempted,
                "yielded_s": c.yielded.as_secs_f64(),
            },
            "forward_time": c.forward.percentiles(),
            "memory": { "rss_mb": rss / 1024, "anon_mb": anon / 1024, "peak_rss_mb": peak_rss_kb() / 1024 },
            "errors": errors,
            "settings": settings,
            "model": info.map(info_json),
        });
        if let (Some(all), Value::Object(extra)) = (stats.as_object_mut(), state) {
            all.extend(extra);
        }
        stats.to_string()
    }
}

fn info_json(i: &EngineInfo) -> Value {
    json!({
        "path": i.model_dir.display().to_string(),
        "device": i.device,
        "dtype": i.dtype,
        "threads": i.threads,
        "dims": i.dims,
        "max_seq_length": i.max_seq_length,
        "tasks": i.prompts.iter().map(|(name, _)| name.as_str()).chain(["none"]).collect::<Vec<_>>(),
        "max_batch_tokens": i.max_batch_tokens,
        "max_batch_size": i.max_batch_size,
        "load_s": round3(i.load_time.as_secs_f64()),
        "weights_mb": i.weight_bytes >> 20,
        "version": i.version,
        "checksums": i.checksums.iter().map(|(f, h)| (f.clone(), json!(h))).collect::<serde_json::Map<_, _>>(),
    })
}

fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// (VmRSS, RssAnon) in KiB; zeros where /proc is absent.
fn memory_kb() -> (u64, u64) {
    (status_kb("VmRSS:"), status_kb("RssAnon:"))
}

fn peak_rss_kb() -> u64 {
    status_kb("VmHWM:")
}
