//! The cluster's embedding service (issue 8), against a server with embeddinggemma in
//! shared_preload_libraries: parity with the reference and with in-process results, backends
//! that never load the model, a kill -9 of the model process, a withdrawn request, a model
//! that fails verification. Tests share the one service, so they run one at a time.

use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use embeddinggemma_engine::{DeviceChoice, Engine, EngineOptions, Manifest, Request};
use embeddinggemma_sql_tests::*;
use postgres::{Client, NoTls};

const F32_TOLERANCE: f64 = 1e-5;
const SAME_TEXT: f64 = 1e-6;

/// The service is shared state: a test that restarts it must not overlap another.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn service_dsn() -> String {
    std::env::var("EMBEDDINGGEMMA_TEST_SERVICE_DSN").expect("EMBEDDINGGEMMA_TEST_SERVICE_DSN is not set: run the SQL tests through scripts/test")
}

fn connect_service() -> Client {
    Client::connect(&service_dsn(), NoTls).expect("cannot connect to the service test server")
}

/// (state, pid, restarts, error) of the service view.
fn service_state(c: &mut Client) -> (String, Option<i32>, i64, Option<String>) {
    let r = c.query_one("SELECT state, pid, restarts, error FROM embeddinggemma_service", &[]).unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

/// Waits until the service is running (loaded, answering); returns its pid.
fn wait_running(c: &mut Client, within: Duration) -> i32 {
    let started = Instant::now();
    loop {
        let (state, pid, _, error) = service_state(c);
        if state == "running" {
            return pid.unwrap();
        }
        assert!(started.elapsed() < within, "service {state} after {within:?}: {error:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn service_stat(c: &mut Client, column: &str) -> i64 {
    c.query_one(&format!("SELECT coalesce({column}, 0)::bigint FROM embeddinggemma_service"), &[]).unwrap().get(0)
}

#[test]
fn every_reference_case_matches_through_the_service_and_in_process() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = connect_service();
    wait_running(&mut c, Duration::from_secs(180));
    let cases = reference_cases();
    let options = EngineOptions { device: DeviceChoice::Cpu, ..EngineOptions::default() };
    let engine = Engine::load(&real_model_dir(), &options).unwrap();
    let mut worst = (0f64, 0f64);
    for case in &cases {
        let v = embed(&mut c, &case.text, case.task(), 768);
        let local = engine.embed(&[&case.text], &Request { task: case.task(), dim: 768, truncate: true }, &|| false).unwrap().0;
        let (to_reference, to_local) = (cosine_distance(&v, &case.embedding), cosine_distance(&v, &local[0]));
        assert!(to_reference <= F32_TOLERANCE, "{}: {to_reference:e} from the reference", case.label());
        assert!(to_local <= SAME_TEXT, "{}: {to_local:e} from in-process", case.label());
        worst = (worst.0.max(to_reference), worst.1.max(to_local));
    }
    let inputs: Vec<String> = cases.iter().map(|c| format!("{}{}", c.prompt, c.text)).collect();
    let rows = c.query("SELECT ord, embedding::real[] FROM embed_batch($1::text[], 'none')", &[&inputs]).unwrap();
    assert_eq!(rows.len(), cases.len());
    for (row, case) in rows.iter().zip(&cases) {
        let d = cosine_distance(&row.get::<_, Vec<f32>>(1), &case.embedding);
        assert!(d <= F32_TOLERANCE, "{} in embed_batch: {d:e}", case.label());
        worst.0 = worst.0.max(d);
    }
    eprintln!("service: worst cosine distance {:e} to the reference, {:e} to in-process", worst.0, worst.1);
    // The backend never loaded the model: the service did.
    let (loads, memory): (i64, f64) = {
        let r = c.query_one("SELECT model_loads, backend_memory_mb FROM embeddinggemma_stats()", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    eprintln!("service: backend anonymous memory {memory:.0} MB after {} texts", cases.len() * 2);
    assert_eq!(loads, 0, "the backend loaded the model itself");
    assert!(memory < 100.0, "backend holds {memory:.0} MB");
}

/// Starts `sql` on its own connection; returns the backend pid and the handle with its result
/// and when it ended.
fn in_background(sql: &'static str) -> (i32, thread::JoinHandle<(Result<(), postgres::Error>, Instant)>) {
    let mut c = connect_service();
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    (pid, thread::spawn(move || (c.batch_execute(sql), Instant::now())))
}

const LONG: &str = "SELECT count(*) FROM embed_batch(ARRAY(SELECT i || repeat(' the quick brown fox jumps over the lazy dog', 220) FROM generate_series(1, 48) i))";

/// One forward pass of 4 texts of 2048 tokens: seconds of work for the service.
const BUSY: &str = "SELECT count(*) FROM embed_batch(ARRAY(SELECT i || repeat(' the quick brown fox jumps over the lazy dog', 220) FROM generate_series(1, 4) i))";

fn wait_for_embedding(admin: &mut Client, pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let sql = "SELECT coalesce(wait_event_type = 'Extension', false) FROM pg_stat_activity WHERE pid = $1";
    while !admin.query_opt(sql, &[&pid]).unwrap().is_some_and(|r| r.get::<_, bool>(0)) {
        assert!(Instant::now() < deadline, "backend {pid} never waited on the service");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn killing_the_model_process_fails_calls_fast_and_the_service_comes_back() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut admin = connect_service();
    let service_pid = wait_running(&mut admin, Duration::from_secs(180));
    let (_, _, restarts, _) = service_state(&mut admin);
    let postmaster: std::time::SystemTime = admin.query_one("SELECT pg_postmaster_start_time()", &[]).unwrap().get(0);
    let mut bystander = connect_service();
    bystander.batch_execute("CREATE TABLE IF NOT EXISTS kill_docs (id int PRIMARY KEY, body text, v vector(768)); TRUNCATE kill_docs;
                             INSERT INTO kill_docs SELECT i, 'row ' || i || repeat(' filler words', 200) FROM generate_series(1, 40) i;").unwrap();
    let (a, first) = in_background(LONG);
    let (b, second) = in_background("UPDATE kill_docs SET v = embed(body)");
    wait_for_embedding(&mut admin, a);
    wait_for_embedding(&mut admin, b);
    // SAFETY: a signal to the service process, a child of the server's supervisor.
    assert_eq!(unsafe { libc_kill(service_pid, 9) }, 0, "kill -9 {service_pid}");
    let killed = Instant::now();
    for (name, handle) in [("embed_batch", first), ("UPDATE", second)] {
        let (result, ended) = handle.join().unwrap();
        let (code, msg, hint) = sql_error(result.expect_err(name));
        let took = ended.duration_since(killed);
        eprintln!("{name} after kill -9: {code} {msg} in {took:?}");
        assert_eq!(code, "08006", "{name}: {msg}");
        assert!(hint.is_some_and(|h| h.contains("run the statement again")), "{name}");
        assert!(took < Duration::from_secs(1), "{name} failed after {took:?}");
    }
    // No transaction half-applied, no crash recovery, the bystander still connected.
    assert_eq!(bystander.query_one("SELECT count(v) FROM kill_docs", &[]).unwrap().get::<_, i64>(0), 0);
    let now: std::time::SystemTime = admin.query_one("SELECT pg_postmaster_start_time()", &[]).unwrap().get(0);
    assert_eq!(now, postmaster, "the cluster restarted");
    let back = Instant::now();
    let new_pid = wait_running(&mut admin, Duration::from_secs(10));
    eprintln!("service back (pid {new_pid}) {:?} after the kill", back.duration_since(killed) + back.elapsed());
    assert_ne!(new_pid, service_pid);
    assert_eq!(service_state(&mut admin).2, restarts + 1);
    assert_eq!(embed(&mut bystander, "after the restart", "query", 128).len(), 128);
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

#[test]
fn a_cancelled_queued_request_costs_no_forward_pass() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut admin = connect_service();
    wait_running(&mut admin, Duration::from_secs(180));
    let (busy, long) = in_background(BUSY);
    wait_for_embedding(&mut admin, busy);
    let texts_before = service_stat(&mut admin, "texts");
    let withdrawn_before = service_stat(&mut admin, "withdrawn");
    // Queued behind the long request, then cancelled before the model gets to it.
    let (queued, handle) = in_background("SELECT count(*) FROM embed_batch(ARRAY(SELECT 'queued text ' || i FROM generate_series(1, 500) i))");
    wait_for_embedding(&mut admin, queued);
    let deadline = Instant::now() + Duration::from_secs(30);
    while service_stat(&mut admin, "queue_texts") < 500 {
        assert!(Instant::now() < deadline, "the request never reached the queue");
        thread::sleep(Duration::from_millis(10));
    }
    assert!(admin.query_one("SELECT pg_cancel_backend($1)", &[&queued]).unwrap().get::<_, bool>(0));
    let (result, _) = handle.join().unwrap();
    assert_eq!(sql_error(result.unwrap_err()).0, "57014");
    long.join().unwrap().0.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while service_stat(&mut admin, "withdrawn") == withdrawn_before {
        assert!(Instant::now() < deadline, "the service never saw the request withdrawn");
        thread::sleep(Duration::from_millis(10));
    }
    let served = service_stat(&mut admin, "texts") - texts_before;
    assert_eq!(served, 4, "texts served besides the busy request's 4");
}

#[test]
fn a_model_that_fails_verification_is_reported_and_every_call_says_why() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut admin = connect_service();
    wait_running(&mut admin, Duration::from_secs(180));
    // A checksum file the real weights do not match, where the server's user can read it.
    let sums = tiny_checksums();
    admin.batch_execute(&format!("ALTER SYSTEM SET embeddinggemma.model_checksums = '{}'", sums.display())).unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let error = loop {
        let (state, _, _, error) = service_state(&mut admin);
        if state == "failed" {
            break error.unwrap();
        }
        assert!(Instant::now() < deadline, "service state {state}, never failed");
        thread::sleep(Duration::from_millis(50));
    };
    eprintln!("service reports: {error}");
    assert!(error.contains("checksum") || error.contains("sha256"), "{error}");
    let mut user = connect_service();
    let (code, msg, hint) = expect_error(&mut user, "SELECT embed('x')");
    assert!(msg.contains(&error) || msg.contains("checksum"), "{msg}");
    assert!(hint.is_some(), "{code} {msg}");
    admin.batch_execute("ALTER SYSTEM RESET embeddinggemma.model_checksums").unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_running(&mut admin, Duration::from_secs(60));
    assert_eq!(embed(&mut user, "verified again", "query", 128).len(), 128);
}

#[test]
fn chunks_through_the_service_equal_in_process_and_the_backend_loads_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = connect_service();
    wait_running(&mut c, Duration::from_secs(180));
    let mut local = connect();
    let doc = docstrings(6).join("\n\n");
    let rows = |c: &mut Client| -> Vec<(i32, i32, i32, String, Vec<f32>)> {
        c.query("SELECT chunk, start_offset, end_offset, body, embedding::real[] FROM embed_chunks($1, 128, 16, 'document', 768) ORDER BY chunk", &[&doc])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect()
    };
    let (served, in_process) = (rows(&mut c), rows(&mut local));
    assert!(served.len() >= 3, "{} chunks", served.len());
    assert_eq!(served.len(), in_process.len());
    for (s, l) in served.iter().zip(&in_process) {
        assert_eq!((s.0, s.1, s.2, &s.3), (l.0, l.1, l.2, &l.3), "chunk {} differs", s.0);
        let d = cosine_distance(&s.4, &l.4);
        assert!(d <= SAME_TEXT, "chunk {}: {d:e} from in-process", s.0);
    }
    let (code, _, hint) = expect_error(&mut c, "SELECT * FROM chunks('text', 3)");
    assert_eq!(code, "22023");
    assert!(hint.is_some());
    let loads: i64 = c.query_one("SELECT model_loads FROM embeddinggemma_stats()", &[]).unwrap().get(0);
    assert_eq!(loads, 0, "the backend loaded the model to chunk");
}

#[test]
fn a_hot_standby_embeds_and_chunks_through_its_own_service() {
    let dsn = std::env::var("EMBEDDINGGEMMA_TEST_STANDBY_DSN")
        .expect("EMBEDDINGGEMMA_TEST_STANDBY_DSN is not set: run the SQL tests through scripts/test");
    let mut standby = Client::connect(&dsn, NoTls).expect("cannot connect to the standby");
    assert!(standby.query_one("SELECT pg_is_in_recovery()", &[]).unwrap().get::<_, bool>(0), "not a standby");
    let pid = wait_running(&mut standby, Duration::from_secs(180));
    let mut primary = connect();
    for (text, task) in [("Which planet is known as the Red Planet?", "query"), ("Mars, the fourth planet, is red.", "document")] {
        let d = cosine_distance(&embed(&mut standby, text, task, 768), &embed(&mut primary, text, task, 768));
        assert!(d <= SAME_TEXT, "{text}: the standby's vector is {d:e} from in-process");
    }
    let chunks: i64 = standby.query_one("SELECT count(*) FROM embed_chunks(repeat('A sentence of text. ', 200), 64, 8)", &[]).unwrap().get(0);
    assert!(chunks > 1, "{chunks} chunks");
    let loads: i64 = standby.query_one("SELECT model_loads FROM embeddinggemma_stats()", &[]).unwrap().get(0);
    assert_eq!(loads, 0, "the standby's backend loaded the model itself");
    eprintln!("standby: service pid {pid} running, embed and embed_chunks served");
}
