//! The reusing global allocator, installed as a PostgreSQL backend installs it: freed large
//! blocks are reused inside a scope (also dirty, also by other threads, also grown for larger
//! requests) and all returned when it ends, nothing is kept outside one, and the real model's vectors are bit for bit the same
//! whether its activations land in fresh or reused blocks.

mod common;

use std::sync::Mutex;

use common::*;
use embeddinggemma_engine::reuse_alloc::{cached_bytes, ReuseScope, ReusingAllocator, CACHE_LIMIT};
use embeddinggemma_engine::{Precision, Request};

#[global_allocator]
static ALLOCATOR: ReusingAllocator = ReusingAllocator;

/// The cache is process-wide: tests that look at it run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const MIB: usize = 1 << 20;

#[test]
fn large_blocks_are_reused_only_inside_a_scope() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = 3 * MIB / 4; // 3 MiB of f32

    drop(vec![1.0f32; n]);
    assert_eq!(cached_bytes(), 0, "kept a block outside a scope");

    let scope = ReuseScope::enter();
    let first = vec![1.0f32; n];
    let at = first.as_ptr();
    drop(first);
    assert!(cached_bytes() >= 3 * MIB);
    let zeroed = vec![0.0f32; n];
    assert_eq!(zeroed.as_ptr(), at, "a block of the same class was not reused");
    assert!(zeroed.iter().all(|&x| x == 0.0), "a reused block handed out as zeroed was not");
    drop(zeroed);

    // A smaller request takes the cached block too, if at least half its size; a larger one
    // grows it rather than leaving it cached and mapping another.
    let smaller = Vec::<f32>::with_capacity(2 * n / 3);
    assert_eq!(smaller.as_ptr(), at);
    drop(smaller);
    let cached = cached_bytes();
    let larger = vec![2.0f32; 2 * n];
    assert_eq!(cached_bytes(), 0, "a larger request left the {cached} cached bytes unused");
    assert!(larger.iter().all(|&x| x == 2.0));
    drop(larger);
    assert!(cached_bytes() >= 6 * MIB);

    // Growing through the classes keeps the contents.
    let mut grown: Vec<u32> = Vec::new();
    for i in 0..(40 * MIB / 4) as u32 {
        grown.push(i);
    }
    assert!(grown.iter().enumerate().all(|(i, &x)| x == i as u32));
    drop(grown);

    // The cache never holds more than its limit, however much is freed at once.
    let blocks: Vec<Vec<u8>> = (0..(CACHE_LIMIT / (100 * MIB) + 2)).map(|_| Vec::with_capacity(100 * MIB)).collect();
    drop(blocks);
    assert!(cached_bytes() <= CACHE_LIMIT, "{} cached", cached_bytes());

    let inner = ReuseScope::enter();
    drop(inner);
    assert!(cached_bytes() > 0, "an inner scope's end emptied an outer scope's cache");
    drop(scope);
    assert_eq!(cached_bytes(), 0, "the last scope's end did not free the cache");
}

#[test]
fn threads_share_the_cache_without_mixing_blocks() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let scope = ReuseScope::enter();
    std::thread::scope(|s| {
        for t in 0..4u32 {
            s.spawn(move || {
                for round in 0..200u32 {
                    let words = MIB / 4 * (1 + ((t + round) % 5) as usize) + round as usize;
                    let tag = t << 16 | round;
                    let block = vec![tag; words];
                    assert!(block.iter().all(|&x| x == tag), "thread {t} round {round}: block changed under it");
                }
            });
        }
    });
    drop(scope);
    assert_eq!(cached_bytes(), 0);
}

#[test]
fn vectors_do_not_depend_on_reused_blocks() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let engine = real_engine(Precision::Bf16);
    let docs = docstrings(12);
    let texts: Vec<&str> = docs.iter().map(String::as_str).collect();
    let request = Request { task: "document", dim: 768, truncate: true };

    let (fresh, _) = engine.embed(&texts, &request, &never).unwrap();
    assert_eq!(cached_bytes(), 0, "an engine call left blocks cached");

    // Held across calls, the scope hands the second call the first call's dirty blocks.
    let scope = ReuseScope::enter();
    let (first, _) = engine.embed(&texts, &request, &never).unwrap();
    assert!(cached_bytes() >= MIB, "the forward pass freed no large block into the cache");
    let (reused, _) = engine.embed(&texts, &request, &never).unwrap();
    drop(scope);
    assert_eq!(first, fresh);
    assert_eq!(reused, fresh, "vectors changed when computed in reused blocks");
}

#[test]
fn a_small_request_does_not_take_a_much_larger_block() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let scope = ReuseScope::enter();
    drop(Vec::<u8>::with_capacity(64 * MIB));
    let cached = cached_bytes();
    assert!(cached >= 64 * MIB);
    let small = Vec::<u8>::with_capacity(MIB);
    assert_eq!(cached_bytes(), cached, "a 1 MiB request took the 64 MiB block");
    drop(small);
    // Up to twice its size, a cached block serves.
    drop(scope);
    let scope = ReuseScope::enter();
    drop(Vec::<u8>::with_capacity(2 * MIB));
    let half = Vec::<u8>::with_capacity(MIB + MIB / 8);
    assert_eq!(cached_bytes(), 0, "a request of over half a cached block's size did not take it");
    drop(half);
    drop(scope);
    assert_eq!(cached_bytes(), 0);
}

static PAUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static GO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Holds the first free that reaches it until GO.
fn pause_once() {
    embeddinggemma_engine::reuse_alloc::set_give_back_hook(None);
    PAUSED.store(true, std::sync::atomic::Ordering::SeqCst);
    while !GO.load(std::sync::atomic::Ordering::SeqCst) {
        std::hint::spin_loop();
    }
}

#[test]
fn no_block_stays_cached_after_the_last_scope_even_when_a_free_races_its_end() {
    use std::sync::atomic::Ordering::SeqCst;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let scope = ReuseScope::enter();
    let block = vec![7u8; 2 * MIB];
    embeddinggemma_engine::reuse_alloc::set_give_back_hook(Some(pause_once));
    // A free, held on its way to the cache while the last scope ends.
    let freeing = std::thread::spawn(move || drop(block));
    while !PAUSED.load(SeqCst) {
        std::hint::spin_loop();
    }
    drop(scope);
    GO.store(true, SeqCst);
    freeing.join().unwrap();
    assert_eq!(cached_bytes(), 0, "a block freed as the last scope ended stayed cached");
}
