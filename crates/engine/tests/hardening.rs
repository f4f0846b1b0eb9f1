//! Calls stay bounded: cancel reaches every loop over inputs, a memory bound shapes the
//! buckets, and large arrays stream window by window.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use common::*;
use embeddinggemma_engine::{Error, JoinedPool, Request, WINDOW_TEXTS};

fn request() -> Request<'static> {
    Request { task: "document", dim: 48, truncate: true }
}

#[test]
fn cancel_stops_200000_texts_promptly() {
    let engine = tiny_engine();
    let owned: Vec<String> = (0..200_000).map(|i| format!("text number {i} with a few words")).collect();
    let texts: Vec<&str> = owned.iter().map(String::as_str).collect();
    // Cancel once the call is well under way: after 20,000 polls.
    let polls = AtomicUsize::new(0);
    let cancelled_at = Mutex::new(None);
    let cancel = || {
        if polls.fetch_add(1, Ordering::Relaxed) < 20_000 {
            return false;
        }
        cancelled_at.lock().unwrap().get_or_insert_with(Instant::now);
        true
    };
    let pool = JoinedPool::new(2, "test").unwrap();
    let err = engine.embed_in(&pool, &texts, &request(), &cancel).unwrap_err();
    let latency = cancelled_at.lock().unwrap().expect("cancel was asked").elapsed();
    assert!(matches!(err, Error::Cancelled), "{err}");
    eprintln!("cancel latency with 200,000 texts: {latency:?}");
    assert!(latency.as_millis() < 500, "{latency:?}");
}

#[test]
fn a_memory_limit_shrinks_buckets_without_changing_vectors() {
    let mut engine = tiny_engine();
    let owned: Vec<String> = (0..64).map(|i| "word ".repeat(1 + i % 13)).collect();
    let texts: Vec<&str> = owned.iter().map(String::as_str).collect();
    let (free, free_stats) = engine.embed(&texts, &request(), &never).unwrap();
    // Room for a pass of at most four 20-token texts.
    let limit = engine.estimate_memory(4, 20);
    engine.set_memory_limit(limit);
    for bucket in engine.plan(&texts.iter().map(|_| 20).collect::<Vec<_>>()).buckets {
        assert!(engine.estimate_memory(bucket.members.len(), bucket.padded_len) <= limit);
    }
    let (bound, bound_stats) = engine.embed(&texts, &request(), &never).unwrap();
    assert!(bound_stats.forward_passes > free_stats.forward_passes, "{bound_stats:?} vs {free_stats:?}");
    for (a, b) in free.iter().zip(&bound) {
        assert!(max_abs_diff(a, b) < 1e-5);
    }
}

#[test]
fn a_text_too_big_for_the_memory_limit_is_a_clear_error() {
    let mut engine = tiny_engine();
    engine.set_memory_limit(engine.estimate_memory(1, 10));
    let long = "word ".repeat(100);
    let err = engine.embed(&["short", &long], &request(), &never).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::InvalidOption(_)), "{msg}");
    assert!(msg.contains("text 1") && msg.contains("memory limit"), "{msg}");
}

#[test]
fn streaming_hands_over_each_window_in_order() {
    let engine = tiny_engine();
    let owned: Vec<String> = (0..WINDOW_TEXTS + 100).map(|i| format!("t{}", i % 97)).collect();
    let texts: Vec<&str> = owned.iter().map(String::as_str).collect();
    let pool = JoinedPool::new(2, "test").unwrap();
    let caller = std::thread::current().id();
    let mut windows = Vec::new();
    let mut all = Vec::new();
    let stats = engine
        .embed_stream_in(&pool, &texts, &request(), &never, &mut |first, vectors| {
            assert_eq!(std::thread::current().id(), caller, "sink runs on the calling thread");
            assert_eq!(first, all.len());
            windows.push(vectors.len());
            all.extend(vectors);
            Ok(())
        })
        .unwrap();
    assert_eq!(windows, vec![WINDOW_TEXTS, 100]);
    assert_eq!(stats.texts as usize, texts.len());
    // Same vectors as one call per text.
    for i in [0, 96, WINDOW_TEXTS - 1, WINDOW_TEXTS + 99] {
        let (one, _) = engine.embed(&[texts[i]], &request(), &never).unwrap();
        assert!(max_abs_diff(&one[0], &all[i]) < 1e-5, "text {i}");
    }
    // An error from the sink stops the call.
    let err = engine.embed_stream_in(&pool, &texts, &request(), &never, &mut |_, _| Err(Error::Cancelled)).unwrap_err();
    assert!(matches!(err, Error::Cancelled));
}

#[test]
fn too_long_names_the_index_in_the_whole_array() {
    let engine = tiny_engine();
    let long = "word ".repeat(200);
    let mut texts = vec!["x"; WINDOW_TEXTS + 5];
    texts[WINDOW_TEXTS + 3] = &long;
    let err = engine.embed(&texts, &Request { truncate: false, ..request() }, &never).unwrap_err();
    assert!(matches!(err, Error::TooLong { index, .. } if index == WINDOW_TEXTS + 3), "{err}");
}
