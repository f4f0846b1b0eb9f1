//! The engine leaves no thread behind and starts its threads with every signal blocked. One
//! test in its own binary: the thread count of the process is what it checks.

mod common;

use common::*;
use embeddinggemma_engine::{Engine, JoinedPool, Request};

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Waits until the process has `expected` threads. A joined thread can still be listed for a
/// moment: the kernel wakes the joiner before it removes the exited thread from the group. A
/// thread left idle never goes, so the deadline still catches it.
fn settles_at(expected: usize) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while thread_count() != expected {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap().trim().to_string())
        .collect()
}

/// SigBlk of the calling thread, from /proc/thread-self/status.
fn blocked_signals() -> u64 {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let hex = status.lines().find_map(|l| l.strip_prefix("SigBlk:")).unwrap().trim();
    u64::from_str_radix(hex, 16).unwrap()
}

#[test]
fn no_idle_threads_and_signals_blocked_from_birth() {
    // As a host does at start (PostgreSQL's _PG_init): this binary's one test runs it before
    // anything else reads the environment.
    unsafe { embeddinggemma_engine::confine_candle_threads() };
    let before = thread_count();
    let engine = Engine::load(&data("tiny/model"), &tiny_options()).unwrap();
    assert_eq!(thread_count(), before, "load started threads");
    let texts: Vec<String> = (0..300).map(|i| format!("text {i} ").repeat(1 + i % 20)).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let request = Request { task: "query", dim: 48, truncate: true };
    engine.embed(&refs, &request, &never).unwrap();
    engine.tokenize(&refs, "document").unwrap();
    assert!(settles_at(before), "threads outlived the call: {:?}", thread_names());

    let pool = JoinedPool::new(3, "test").unwrap();
    assert_eq!(thread_count(), before + 3);
    let masks: Vec<u64> = pool.install(|| rayon::broadcast(|_| blocked_signals()));
    // Every signal PostgreSQL handles (SIGURG wakes its latches).
    let signals = [
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGTERM,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGPIPE,
        libc::SIGCHLD,
        libc::SIGURG,
    ];
    for mask in masks {
        for sig in signals {
            assert!(mask & (1 << (sig - 1)) != 0, "signal {sig} not blocked: {mask:x}");
        }
    }
    engine.embed_in(&pool, &refs, &request, &never).unwrap();
    assert_eq!(thread_count(), before + 3);
    drop(pool);
    assert!(settles_at(before), "dropping the pool joins its threads: {:?}", thread_names());
    // The caller's own mask is as it was.
    assert_eq!(blocked_signals() & (1 << (libc::SIGINT - 1)), 0);

    let own = Engine::load(
        &data("tiny/model"),
        &embeddinggemma_engine::EngineOptions { own_thread_pool: true, threads: 2, ..tiny_options() },
    )
    .unwrap();
    assert_eq!(thread_count(), before + 2, "own_thread_pool keeps its threads");
    own.embed(&refs, &request, &never).unwrap();
    drop(own);
    assert!(settles_at(before), "dropping the engine joins its threads: {:?}", thread_names());
}
