//! `embeddinggemma serve` on the tiny model: results equal to in-process `embed`, batching
//! across connections, withdrawal, fairness, errors, the socket and the process's lifetime; a
//! failed load tried again, draining, model settings checked per request, bounded chunking.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use embeddinggemma_engine::service::{self, protocol, Client, ErrorKind, ServeOptions};
use embeddinggemma_engine::{Engine, EngineOptions, Manifest, Request};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

fn engine_options() -> EngineOptions {
    EngineOptions { own_thread_pool: true, threads: 1, ..tiny_options() }
}

fn socket_path() -> PathBuf {
    tempfile::tempdir().unwrap().keep().join("embeddinggemma.sock")
}

/// A server in this process (left running until the test binary exits).
fn start(options: ServeOptions, engine: EngineOptions) -> PathBuf {
    let path = socket_path();
    let listener = service::bind(&path).unwrap();
    service::start(listener, move || Engine::load(&data("tiny/model"), &engine), options).unwrap();
    path
}

fn connect(path: &Path) -> Client {
    Client::connect(path, T).unwrap()
}

fn stats(path: &Path) -> Value {
    serde_json::from_str(&connect(path).stats(T).unwrap()).unwrap()
}

/// Polls the stats until `ready` holds for them.
fn wait_for(path: &Path, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let s = stats(path);
        if ready(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {s:#}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn texts(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix} {i}: {}", "a few more words ".repeat(i % 5))).collect()
}

fn in_process(engine: &Engine, task: &str, texts: &[String]) -> Vec<Vec<f32>> {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    engine.embed(&refs, &Request { task, dim: 48, truncate: true }, &never).unwrap().0
}

#[test]
fn concurrent_clients_get_in_process_results() {
    let max_queue_texts = 12;
    let path = start(ServeOptions { max_queue_texts, ..ServeOptions::default() }, engine_options());
    let engine = Arc::new(Engine::load(&data("tiny/model"), &engine_options()).unwrap());
    let golden: Vec<String> = cases("tiny/golden.json").into_iter().map(|c| c.text).collect();
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let (path, engine, golden) = (path.clone(), engine.clone(), golden.clone());
            std::thread::spawn(move || {
                let mut client = connect(&path);
                for (r, task) in ["query", "document", "none", "STS"].iter().enumerate() {
                    let mut batch = texts(&format!("client {t} request {r}"), 1 + (t + r) % 8);
                    batch.push(golden[(t * 4 + r) % golden.len()].clone());
                    let got = client.embed(task, 48, true, &batch, T).unwrap();
                    assert_eq!((got.len(), got.dim, got.stats.texts), (batch.len(), 48, batch.len() as u64));
                    assert!(got.stats.forward_passes >= 1 && got.stats.tokens > 0);
                    for (i, want) in in_process(&engine, task, &batch).iter().enumerate() {
                        assert!(max_abs_diff(got.vector(i), want) <= 1e-6, "client {t} {task} text {i}");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = stats(&path);
    assert_eq!(s["requests"], 24);
    assert!(s["queue"]["peak_texts"].as_u64().unwrap() <= max_queue_texts as u64, "{s:#}");
    assert_eq!(s["queue"]["texts"], 0);
    assert_eq!(s["model"]["dims"], serde_json::json!([48]));
    assert!(s["fill_ratio"].as_f64().unwrap() > 0.0 && s["queue_wait"]["samples"] == 24);
}

#[test]
fn requests_arriving_together_share_forward_passes() {
    let options = ServeOptions { batch_wait: Duration::from_millis(400), ..ServeOptions::default() };
    let path = start(options, engine_options());
    let barrier = Arc::new(Barrier::new(6));
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let (path, barrier) = (path.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut client = connect(&path);
                barrier.wait();
                client.embed("query", 48, true, &[format!("short note {t}")], T).unwrap()
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let s = stats(&path);
    assert!(s["connections_per_pass"].as_f64().unwrap() > 1.0, "{s:#}");
    assert!(s["texts_per_pass"].as_f64().unwrap() > 1.0, "{s:#}");
    assert!(s["forward_passes"].as_u64().unwrap() < 6, "{s:#}");
    assert!(results.iter().all(|r| r.stats.forward_passes == 1));
}

#[test]
fn a_withdrawn_request_runs_no_forward_pass() {
    let options = ServeOptions { batch_wait: Duration::from_millis(300), ..ServeOptions::default() };
    let path = start(options, engine_options());
    let mut leaving = connect(&path);
    leaving.send_embed("document", 48, true, "", false, &texts("withdrawn", 50)).unwrap();
    assert!(leaving.poll_reply(Duration::ZERO).is_none());
    wait_for(&path, "the request to be queued", |s| s["queue"]["requests"] == 1);
    drop(leaving);
    wait_for(&path, "the withdrawal", |s| s["withdrawn"] == 1 && s["queue"]["texts"] == 0);

    let staying = connect(&path).embed("document", 48, true, &texts("staying", 3), T).unwrap();
    let s = stats(&path);
    assert_eq!(s["forward_passes"].as_u64(), Some(staying.stats.forward_passes), "{s:#}");
    assert_eq!((s["texts"].as_u64(), s["requests"].as_u64()), (Some(3), Some(1)));
}

#[test]
fn a_huge_request_does_not_starve_a_small_one() {
    // Larger than the queue's bound, too: it is admitted alone, and the small one beside it.
    let options = ServeOptions { max_queue_texts: 1_000, ..ServeOptions::default() };
    let path = start(options, EngineOptions { max_batch_tokens: 256, ..engine_options() });
    let engine = Engine::load(&data("tiny/model"), &engine_options()).unwrap();
    let huge = texts("bulk", 5_000);
    let mut big = connect(&path);
    big.send_embed("document", 48, true, "", false, &huge).unwrap();
    let mut big_reply = None;
    // Sending takes polls too; wait until the huge request is under way.
    while stats(&path)["forward_passes"].as_u64() == Some(0) {
        big_reply = big.poll_reply(Duration::from_millis(5));
        assert!(big_reply.is_none());
    }
    let small = connect(&path).embed("query", 48, true, &["a small one".to_string()], T).unwrap();
    assert!(big.poll_reply(Duration::ZERO).is_none(), "the huge request finished before the small one");
    assert_eq!(small.vector(0), &in_process(&engine, "query", &["a small one".to_string()])[0][..]);

    let deadline = Instant::now() + T;
    while big_reply.is_none() {
        assert!(Instant::now() < deadline, "the huge request did not finish");
        big_reply = big.poll_reply(Duration::from_millis(100));
    }
    let got = big_reply.unwrap().unwrap();
    assert_eq!(got.len(), huge.len());
    assert!(got.stats.forward_passes > 10);
    for i in [0, 1, 2_499, 4_999] {
        let want = &in_process(&engine, "document", &huge[i..=i])[0];
        assert!(max_abs_diff(got.vector(i), want) <= 1e-6, "text {i}");
    }
}

#[test]
fn a_full_queue_holds_new_requests_back_while_stats_get_through() {
    let options = ServeOptions { max_queue_texts: 300, ..ServeOptions::default() };
    let path = start(options, EngineOptions { max_batch_tokens: 256, ..engine_options() });
    let mut big = connect(&path);
    big.send_embed("document", 48, true, "", false, &texts("bulk", 300)).unwrap();
    // Polling sends the request too.
    while stats(&path)["forward_passes"].as_u64() == Some(0) {
        assert!(big.poll_reply(Duration::from_millis(5)).is_none());
    }
    let mut small = connect(&path);
    small.send_embed("query", 48, true, "", false, &["small".to_string()]).unwrap();
    let deadline = Instant::now() + T;
    let (mut big_done, mut small_done) = (None, None);
    while big_done.is_none() || small_done.is_none() {
        assert!(Instant::now() < deadline, "the requests did not finish");
        assert!(stats(&path)["queue"]["requests"].as_u64() <= Some(1));
        if big_done.is_none() {
            big_done = big.poll_reply(Duration::from_millis(5)).map(|r| (r.unwrap(), Instant::now()));
        }
        if small_done.is_none() {
            small_done = small.poll_reply(Duration::from_millis(5)).map(|r| (r.unwrap(), Instant::now()));
            if small_done.is_some() && big_done.is_none() {
                // The big reply, sent first, may have come while this loop waited for the small one.
                big_done =
                    big.poll_reply(Duration::from_millis(100)).map(|r| (r.unwrap(), small_done.as_ref().unwrap().1));
            }
        }
    }
    // The large request filled the queue: the small one waited until it was answered.
    assert!(small_done.unwrap().1 >= big_done.unwrap().1);
    let s = stats(&path);
    assert_eq!((s["queue"]["peak_requests"].as_u64(), s["requests"].as_u64()), (Some(1), Some(2)), "{s:#}");
}

#[test]
fn requests_wait_for_the_model_to_load() {
    let path = socket_path();
    let listener = service::bind(&path).unwrap();
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let load = move || {
        gate.recv().unwrap();
        Engine::load(&data("tiny/model"), &engine_options())
    };
    service::start(listener, load, ServeOptions::default()).unwrap();
    let s = stats(&path);
    assert_eq!((s["loading"].as_bool(), s["ready"].as_bool()), (Some(true), Some(false)), "{s:#}");
    let mut client = connect(&path);
    client.send_embed("query", 48, true, "", false, &["early".to_string()]).unwrap();
    assert!(client.poll_reply(Duration::from_millis(50)).is_none());
    release.send(()).unwrap();
    let got = client.poll_reply(T).expect("a reply once loaded").unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(stats(&path)["ready"], true);
}

#[test]
fn bad_requests_get_errors_of_their_kind_and_the_connection_goes_on() {
    let path = start(ServeOptions::default(), engine_options());
    let mut client = connect(&path);
    let one = ["text".to_string()];
    let e = client.embed("nope", 48, true, &one, T).unwrap_err();
    assert_eq!(e.kind, ErrorKind::UnknownTask, "{e}");
    assert!(e.message.contains("query"), "{e}");
    assert_eq!(client.embed("query", 7, true, &one, T).unwrap_err().kind, ErrorKind::InvalidDim);
    let long = ["word ".repeat(500)];
    let e = client.embed("query", 48, false, &long, T).unwrap_err();
    assert_eq!(e.kind, ErrorKind::TooLong, "{e}");
    let ok = client.embed("query", 48, true, &long, T).unwrap();
    assert_eq!(ok.stats.truncated, 1);
    assert!(client.embed::<String>("query", 48, true, &[], T).unwrap().is_empty());
    assert_eq!(client.ping(T).unwrap(), env!("CARGO_PKG_VERSION"));
    let s = stats(&path);
    assert_eq!((s["errors"]["UnknownTask"].as_u64(), s["errors"]["TooLong"].as_u64()), (Some(1), Some(1)), "{s:#}");
}

#[test]
fn chunk_requests_get_the_engine_s_chunks() {
    let path = start(ServeOptions::default(), engine_options());
    let engine = Engine::load(&data("tiny/model"), &engine_options()).unwrap();
    let mut client = connect(&path);
    let long =
        format!("{}\n\nA second paragraph: ünïcode, 漢字 and 👩\u{200d}👧. ", "Sentences of a text. ".repeat(30))
            .repeat(4);
    for (text, task, max_tokens, overlap) in
        [(long.as_str(), "query", 48, 8), (&long, "none", 30, 0), ("", "query", 48, 8), ("short", "document", 64, 8)]
    {
        let expected = engine.chunk(text, task, max_tokens, overlap, &never).unwrap();
        assert_eq!(
            client.chunk(text, task, max_tokens, overlap, T).unwrap(),
            expected,
            "{task} {max_tokens} {overlap}"
        );
    }
    let e = client.chunk(&long, "query", 4, 0, T).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidOption, "{e}");
    assert!(e.message.contains("use "), "{e}");
    assert_eq!(client.chunk(&long, "nope", 48, 0, T).unwrap_err().kind, ErrorKind::UnknownTask);
    assert_eq!(client.chunk(&long, "query", usize::MAX, 0, T).unwrap_err().kind, ErrorKind::InvalidOption);
    assert_eq!(client.ping(T).unwrap(), env!("CARGO_PKG_VERSION"));
}

#[test]
fn a_service_without_chunking_is_named_as_such() {
    // What a service from before Chunk answers: a Pong, then a Protocol error for the new tag.
    let path = socket_path();
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        for reply in [
            protocol::Response::Pong("0.2.0".into()),
            protocol::Response::error(ErrorKind::Protocol, "malformed request: unknown request tag 4"),
        ] {
            let len = protocol::read_len(&mut s).unwrap().unwrap();
            protocol::read_payload(&mut s, len).unwrap();
            s.write_all(&reply.encode().unwrap()).unwrap();
        }
    });
    let e = connect(&path).chunk("text", "query", 48, 0, T).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Protocol);
    assert!(e.message.contains("does not know chunking"), "{e}");
}

/// Sends raw bytes and reads one response frame.
fn raw_exchange(path: &Path, bytes: &[u8]) -> protocol::Response {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(bytes).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut payload = vec![0; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut payload).unwrap();
    protocol::Response::decode(&payload).unwrap()
}

#[test]
fn oversized_frames_and_other_versions_are_refused() {
    let path = start(ServeOptions::default(), engine_options());
    let too_big = (protocol::MAX_FRAME as u32 + 1).to_le_bytes();
    let protocol::Response::Error { kind, message } = raw_exchange(&path, &too_big) else { panic!() };
    assert_eq!(kind, ErrorKind::Protocol);
    assert!(message.contains("limit"), "{message}");
    let mut ping = protocol::Request::Ping.encode().unwrap();
    ping[4] = protocol::VERSION + 1;
    let protocol::Response::Error { kind, message } = raw_exchange(&path, &ping) else { panic!() };
    assert_eq!(kind, ErrorKind::Protocol);
    assert!(message.contains("version"), "{message}");
}

/// The tiny model's checksums with the first one wrong.
fn bad_checksums() -> tempfile::NamedTempFile {
    let sums = tempfile::NamedTempFile::new().unwrap();
    let good = std::fs::read_to_string(data("tiny/SHA256SUMS")).unwrap();
    let (first, rest) = good.split_once(' ').unwrap();
    std::fs::write(sums.path(), format!("{} {rest}", "0".repeat(first.len()))).unwrap();
    sums
}

#[test]
fn a_model_that_fails_verification_serves_the_reason() {
    let sums = bad_checksums();
    let options = EngineOptions { checksums: Manifest::from_file(sums.path()).unwrap(), ..engine_options() };
    let path = start(ServeOptions::default(), options);
    for _ in 0..2 {
        let e = connect(&path).embed("query", 48, true, &["x".to_string()], T).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Checksum, "{e}");
        assert!(e.message.contains("model.safetensors"), "{e}");
    }
    let s = stats(&path);
    assert_eq!(s["ready"], false);
    assert!(s["load_error"].as_str().unwrap().contains("checksum mismatch"), "{s:#}");
    assert_eq!(s["errors"]["Checksum"], 2);
}

fn serve_command(path: &Path, checksums: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_embeddinggemma"));
    c.arg("serve").arg("--model").arg(data("tiny/model")).arg("--checksums").arg(checksums);
    c.args(["--device", "cpu", "--threads", "1", "--socket"]).arg(path);
    c.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn wait_connect(path: &Path, child: &mut std::process::Child) -> Client {
    let deadline = Instant::now() + T;
    loop {
        if let Ok(c) = Client::connect(path, T) {
            return c;
        }
        assert!(child.try_wait().unwrap().is_none(), "the service exited");
        assert!(Instant::now() < deadline, "the service did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_binary_serves_on_a_private_socket_and_exits_when_stdin_closes() {
    let path = socket_path();
    // A stale socket file from a dead service is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let mut child = serve_command(&path, &data("tiny/SHA256SUMS")).spawn().unwrap();
    let mut client = wait_connect(&path, &mut child);
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let got = client.embed("query", 48, true, &["hello".to_string()], T).unwrap();
    let engine = Engine::load(&data("tiny/model"), &engine_options()).unwrap();
    assert_eq!(got.vector(0), &in_process(&engine, "query", &["hello".to_string()])[0][..]);

    drop(child.stdin.take());
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the service outlived its stdin");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
    assert!(!path.exists());
    assert_eq!(client.ping(T).unwrap_err().kind, ErrorKind::Unavailable);
}

#[test]
fn the_binary_reports_a_model_it_cannot_verify() {
    let path = socket_path();
    let sums = bad_checksums();
    let mut child = serve_command(&path, sums.path()).spawn().unwrap();
    let mut client = wait_connect(&path, &mut child);
    let e = client.embed("query", 48, true, &["x".to_string()], T).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Checksum, "{e}");
    let s: Value = serde_json::from_str(&client.stats(T).unwrap()).unwrap();
    let reason = s["load_error"].as_str().unwrap().to_string();
    assert!(e.message.starts_with(&reason), "{e} / {reason}");
    assert!(e.message.contains("tries again within"), "{e}");
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&reason));
}

/// A load that fails until `available` is set, then loads the tiny model.
fn load_when(
    available: &Arc<std::sync::atomic::AtomicBool>,
) -> impl Fn() -> embeddinggemma_engine::Result<Engine> + Send + 'static {
    let available = available.clone();
    move || {
        let dir = if available.load(std::sync::atomic::Ordering::SeqCst) {
            data("tiny/model")
        } else {
            PathBuf::from("/nonexistent/model")
        };
        Engine::load(&dir, &engine_options())
    }
}

#[test]
fn a_failed_load_is_tried_again_with_backoff_and_at_once_when_asked() {
    for asked in [true, false] {
        let available = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let path = socket_path();
        let service =
            service::start(service::bind(&path).unwrap(), load_when(&available), ServeOptions::default()).unwrap();
        let e = connect(&path).embed("query", 48, true, &["x".to_string()], T).unwrap_err();
        assert_eq!(e.kind, ErrorKind::ModelFile, "{e}");
        assert!(e.message.contains("tries again within"), "{e}");
        let s = wait_for(&path, "a failed load", |s| {
            s["load_attempts"].as_u64() >= Some(1) && s["next_attempt_s"].is_number()
        });
        assert_eq!(s["ready"], false);
        available.store(true, std::sync::atomic::Ordering::SeqCst);
        let fixed = Instant::now();
        if asked {
            service.retry_load();
        }
        wait_for(&path, "the model once its files are there", |s| s["ready"] == true);
        eprintln!("loaded {:?} after the files came ({})", fixed.elapsed(), if asked { "asked" } else { "backoff" });
        assert_eq!(connect(&path).embed("query", 48, true, &["x".to_string()], T).unwrap().len(), 1);
    }
}

/// Sends `busy`'s request (a client sends while it polls) until the service has it queued.
fn in_progress(path: &Path, busy: &mut Client) {
    let deadline = Instant::now() + T;
    while stats(path)["queue"]["texts"].as_u64() == Some(0) {
        assert!(busy.poll_reply(Duration::from_millis(5)).is_none(), "answered before it was seen queued");
        assert!(Instant::now() < deadline, "the request never reached the queue");
    }
}

#[test]
fn draining_finishes_the_requests_in_hand_and_refuses_new_ones() {
    let path = socket_path();
    let engine = engine_options();
    let service = service::start(
        service::bind(&path).unwrap(),
        move || Engine::load(&data("tiny/model"), &engine),
        ServeOptions::default(),
    )
    .unwrap();
    let mut busy = connect(&path);
    let bulk = texts("bulk", 3000);
    busy.send_embed("document", 48, true, "", false, &bulk).unwrap();
    in_progress(&path, &mut busy);
    service.drain();
    let e = connect(&path).embed("query", 48, true, &["late".to_string()], T).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
    assert!(e.message.contains("restarting"), "{e}");
    assert_eq!(stats(&path)["draining"], true);
    let done = busy.poll_reply(T * 4).expect("the request in hand is answered").unwrap();
    assert_eq!(done.len(), bulk.len());
    let drained = std::thread::spawn(move || service.wait_drained());
    let deadline = Instant::now() + T;
    while !drained.is_finished() {
        assert!(Instant::now() < deadline, "the service never drained");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn requests_naming_other_model_settings_are_refused() {
    let options = ServeOptions { model_key: "model_path=/m\ndtype=f32".into(), ..ServeOptions::default() };
    let path = start(options, engine_options());
    let mut client = connect(&path);
    let one = ["text".to_string()];
    client.send_embed("query", 48, true, "model_path=/m\ndtype=bf16", false, &one).unwrap();
    let e = client.poll_reply(T).unwrap().unwrap_err();
    assert_eq!(e.kind, ErrorKind::ModelMismatch, "{e}");
    client.send_chunk("some text", "query", 48, 8, "model_path=/other\ndtype=f32").unwrap();
    assert_eq!(client.poll_chunks(T).unwrap().unwrap_err().kind, ErrorKind::ModelMismatch);
    for model in ["model_path=/m\ndtype=f32", ""] {
        client.send_embed("query", 48, true, model, false, &one).unwrap();
        assert_eq!(client.poll_reply(T).unwrap().unwrap().len(), 1, "{model:?}");
    }
}

#[test]
fn chunk_requests_run_on_at_most_chunk_workers_at_once() {
    let workers = 2;
    let path = start(ServeOptions { chunk_workers: workers, ..ServeOptions::default() }, engine_options());
    let engine = Engine::load(&data("tiny/model"), &engine_options()).unwrap();
    let long = "Sentences of a longer text, cut into many chunks. ".repeat(8000);
    let expected = engine.chunk(&long, "document", 48, 8, &never).unwrap();
    let barrier = Arc::new(Barrier::new(6));
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (path, long, barrier) = (path.clone(), long.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut c = connect(&path);
                barrier.wait();
                c.chunk(&long, "document", 48, 8, T * 4).unwrap()
            })
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap(), expected);
    }
    let s = stats(&path);
    let peak = s["chunking"]["peak"].as_u64().unwrap();
    eprintln!("6 concurrent chunk requests, {workers} workers: at most {peak} at once");
    assert!((1..=workers as u64).contains(&peak), "{s:#}");
}

/// A copy of the tiny model's directory at `to`.
fn copy_tiny_model(to: &Path) {
    for entry in walk(&data("tiny/model")) {
        let rel = entry.strip_prefix(data("tiny/model")).unwrap();
        std::fs::create_dir_all(to.join(rel).parent().unwrap()).unwrap();
        std::fs::copy(&entry, to.join(rel)).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flat_map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p)
            } else {
                vec![p]
            }
        })
        .collect()
}

#[test]
fn the_binary_loads_again_on_sighup_and_drains_then_exits_on_sigusr1() {
    let path = socket_path();
    let home = tempfile::tempdir().unwrap();
    let model = home.path().join("model");
    let mut command = serve_command(&path, &data("tiny/SHA256SUMS"));
    command.args(["--model"]).arg(&model);
    let mut child = command.spawn().unwrap();
    let mut client = wait_connect(&path, &mut child);
    let e = client.embed("query", 48, true, &["x".to_string()], T).unwrap_err();
    assert_eq!(e.kind, ErrorKind::ModelFile, "{e}");
    copy_tiny_model(&model);
    // SAFETY: signals our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
    wait_for(&path, "the model after SIGHUP", |s| s["ready"] == true);
    let mut busy = connect(&path);
    busy.send_embed("document", 48, true, "", false, &texts("bulk", 3000)).unwrap();
    in_progress(&path, &mut busy);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) }, 0);
    wait_for(&path, "draining", |s| s["draining"] == true);
    assert_eq!(
        connect(&path).embed("query", 48, true, &["late".to_string()], T).unwrap_err().kind,
        ErrorKind::Unavailable
    );
    assert_eq!(busy.poll_reply(T * 4).expect("answered while draining").unwrap().len(), 3000);
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the drained service did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn interactive_requests_overtake_a_background_backlog() {
    let path = start(ServeOptions::default(), engine_options());
    let mut backlog = connect(&path);
    let bulk = texts("backlog", 20_000);
    backlog.send_embed("document", 48, true, "", true, &bulk).unwrap();
    in_progress(&path, &mut backlog);
    // Search queries while the backlog drains: each is answered before the backlog is.
    let mut query = connect(&path);
    for i in 0..5 {
        let started = Instant::now();
        let got = query.embed("query", 48, true, &[format!("query {i}")], T).unwrap();
        assert_eq!(got.len(), 1);
        assert!(
            backlog.poll_reply(Duration::ZERO).is_none(),
            "query {i} waited for the whole backlog ({:?})",
            started.elapsed()
        );
    }
    let done = backlog.poll_reply(T * 4).expect("the backlog is answered").unwrap();
    assert_eq!(done.len(), bulk.len());
    let s = stats(&path);
    eprintln!("background: {:#}", s["background"]);
    assert_eq!(s["background"]["texts"], 20_000);
    assert_eq!(s["background"]["requests"], 1);
}
