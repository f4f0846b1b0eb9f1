//! Time and peak memory of embedding a 64 MB text vs a text of exactly 2048 tokens (issue 9).
//! cargo run --release -p embeddinggemma-engine --example cut_cost -- MODEL_DIR [THREADS]

use std::time::Instant;

use embeddinggemma_engine::{Engine, EngineOptions, Request};

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find_map(|l| l.strip_prefix(field)).unwrap().split_whitespace().next().unwrap().parse().unwrap()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("MODEL_DIR");
    let threads = args.next().map_or(2, |t| t.parse().unwrap());
    let engine = Engine::load(dir.as_ref(), &EngineOptions { threads, ..EngineOptions::default() }).unwrap();
    let request = Request { task: "document", dim: 768, truncate: true };
    let prose = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let long = prose.repeat(4);
    // The longest prefix of whole characters that tokenizes to exactly 2048 ids, untruncated.
    let (mut lo, mut hi) = (0, long.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        let end = (0..=mid).rev().find(|&i| long.is_char_boundary(i)).unwrap();
        let t = &engine.tokenize(&[&long[..end]], "document").unwrap()[0];
        if t.full_len <= 2048 {
            lo = mid
        } else {
            hi = mid - 1
        }
    }
    let end = (0..=lo).rev().find(|&i| long.is_char_boundary(i)).unwrap();
    let exact = &long[..end];
    assert_eq!(engine.tokenize(&[exact], "document").unwrap()[0].full_len, 2048);
    let huge = prose.repeat((64 << 20) / prose.len() + 1);
    let huge = &huge[..(0..=64 << 20).rev().find(|&i| huge.is_char_boundary(i)).unwrap()];
    engine.embed(&["warm up"], &request, &|| false).unwrap();
    for (label, text) in [("2048 tokens", exact), ("64 MB", huge), ("2048 tokens", exact), ("64 MB", huge)] {
        std::fs::write("/proc/self/clear_refs", "5").unwrap(); // resets VmHWM to the current RSS
        let rss = status_kb("VmRSS:");
        let started = Instant::now();
        let (v, stats) = engine.embed(&[text], &request, &|| false).unwrap();
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{label:>12}: {} bytes, {:.2} s (tokenize {:.3} s), peak +{} MB over {} MB RSS, truncated={}, dims={}",
            text.len(),
            seconds,
            stats.tokenize_time.as_secs_f64(),
            (status_kb("VmHWM:") - rss) / 1024,
            rss / 1024,
            stats.truncated,
            v[0].len()
        );
    }
}
