//! The cluster's embedding service (issues 8 and 17), against a server with embeddinggemma in
//! shared_preload_libraries: parity with the reference and with in-process results, backends
//! that never load the model, a kill -9 of the model process, a withdrawn request, a model
//! that fails verification or arrives late, routing by the session's effective settings, a
//! reload that replaces the service under a running backfill. Tests share the one service, so
//! they run one at a time.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use embeddinggemma_engine::{DeviceChoice, Engine, EngineOptions, Request};
use embeddinggemma_sql_tests::*;
use postgres::{Client, NoTls};

const F32_TOLERANCE: f64 = 1e-5;
const SAME_TEXT: f64 = 1e-6;

/// The service is shared state: a test that restarts it must not overlap another.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn service_dsn() -> String {
    std::env::var("EMBEDDINGGEMMA_TEST_SERVICE_DSN")
        .expect("EMBEDDINGGEMMA_TEST_SERVICE_DSN is not set: run the SQL tests through scripts/test")
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
        let local =
            engine.embed(&[&case.text], &Request { task: case.task(), dim: 768, truncate: true }, &|| false).unwrap().0;
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

/// A statement's result and when it ended.
type Ended = (Result<(), postgres::Error>, Instant);

/// Starts `sql` on its own connection; returns the backend pid and the handle with its result
/// and when it ended.
fn in_background(sql: &'static str) -> (i32, thread::JoinHandle<Ended>) {
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
    let (queued, handle) = in_background(
        "SELECT count(*) FROM embed_batch(ARRAY(SELECT 'queued text ' || i FROM generate_series(1, 500) i))",
    );
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
    let _reset = ResetServerSettings;
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
    for (text, task) in
        [("Which planet is known as the Red Planet?", "query"), ("Mars, the fourth planet, is red.", "document")]
    {
        let d = cosine_distance(&embed(&mut standby, text, task, 768), &embed(&mut primary, text, task, 768));
        assert!(d <= SAME_TEXT, "{text}: the standby's vector is {d:e} from in-process");
    }
    let chunks: i64 = standby
        .query_one("SELECT count(*) FROM embed_chunks(repeat('A sentence of text. ', 200), 64, 8)", &[])
        .unwrap()
        .get(0);
    assert!(chunks > 1, "{chunks} chunks");
    let loads: i64 = standby.query_one("SELECT model_loads FROM embeddinggemma_stats()", &[]).unwrap().get(0);
    assert_eq!(loads, 0, "the standby's backend loaded the model itself");
    eprintln!("standby: service pid {pid} running, embed and embed_chunks served");
}

const ROUTED_TEXT: &str = "Which planet is known as the Red Planet?";

/// The bf16 vector of ROUTED_TEXT computed in-process, and the service's (f32) one.
fn bf16_and_service_vectors() -> (Vec<f32>, Vec<f32>) {
    let mut local = connect_service();
    local.batch_execute("SET embeddinggemma.service = off; SET embeddinggemma.dtype = 'bf16'").unwrap();
    let bf16 = embed(&mut local, ROUTED_TEXT, "query", 768);
    let served = embed(&mut connect_service(), ROUTED_TEXT, "query", 768);
    (bf16, served)
}

/// A session's vector of ROUTED_TEXT, and whether this backend loaded a model for it.
fn routed(c: &mut Client) -> (Vec<f32>, i64) {
    let v = embed(c, ROUTED_TEXT, "query", 768);
    (v, c.query_one("SELECT model_loads FROM embeddinggemma_stats()", &[]).unwrap().get(0))
}

#[test]
fn database_role_and_startup_settings_choose_the_model_never_the_service_s() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut admin = connect_service();
    wait_running(&mut admin, Duration::from_secs(180));
    let (bf16, served) = bf16_and_service_vectors();
    let apart = cosine_distance(&bf16, &served);
    assert!(apart > 1e-7, "bf16 and f32 vectors too close ({apart:e}) to tell the model apart");
    admin.batch_execute("DROP DATABASE IF EXISTS eg_route_db WITH (FORCE)").unwrap();
    admin
        .batch_execute(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'eg_route_role') THEN CREATE ROLE eg_route_role LOGIN; END IF;
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'eg_route_on') THEN CREATE ROLE eg_route_on LOGIN; END IF;
             END $$;
             ALTER ROLE eg_route_role SET embeddinggemma.dtype = 'bf16';
             ALTER ROLE eg_route_on SET embeddinggemma.dtype = 'bf16';
             ALTER ROLE eg_route_on SET embeddinggemma.service = 'on';
             GRANT USAGE ON SCHEMA public TO eg_route_role, eg_route_on;",
        )
        .unwrap();
    admin.batch_execute("CREATE DATABASE eg_route_db").unwrap();
    admin.batch_execute("ALTER DATABASE eg_route_db SET embeddinggemma.dtype = 'bf16'").unwrap();
    let mut db = Client::connect(&format!("{} dbname=eg_route_db", service_dsn()), NoTls).unwrap();
    db.batch_execute("CREATE EXTENSION embeddinggemma CASCADE").unwrap();
    let mut db = Client::connect(&format!("{} dbname=eg_route_db", service_dsn()), NoTls).unwrap();
    let mut role = Client::connect(&format!("{} user=eg_route_role", service_dsn()), NoTls).unwrap();
    let mut startup =
        Client::connect(&format!("{} options='-c embeddinggemma.dtype=bf16'", service_dsn()), NoTls).unwrap();
    for (name, session) in [("database", &mut db), ("role", &mut role), ("startup option", &mut startup)] {
        let shown: String = session.query_one("SHOW embeddinggemma.dtype", &[]).unwrap().get(0);
        assert_eq!(shown, "bf16", "{name}");
        let (v, loads) = routed(session);
        let d = cosine_distance(&v, &bf16);
        eprintln!("dtype from the {name}: {d:e} from in-process bf16 ({apart:e} from the service's f32), {loads} model load(s) in the backend");
        assert!(
            d <= SAME_TEXT,
            "dtype from the {name}: {d:e} from the bf16 vector (the service's f32 is {apart:e} from it)"
        );
        assert_eq!(loads, 1, "dtype from the {name}: computed by the service");
    }
    // With service = on, a session whose settings differ is refused, saying why.
    let mut on = Client::connect(&format!("{} user=eg_route_on", service_dsn()), NoTls).unwrap();
    let (code, msg, hint) = expect_error(&mut on, &format!("SELECT embed('{ROUTED_TEXT}', 'query')"));
    assert_eq!(code, "55000", "{msg}");
    assert!(msg.contains("differ from the service"), "{msg}");
    assert!(hint.is_some_and(|h| h.contains("pg_reload_conf")));
    // Sessions at the server's settings are served, and load nothing.
    let (v, loads) = routed(&mut connect_service());
    assert!(cosine_distance(&v, &served) <= SAME_TEXT);
    assert_eq!(loads, 0);
    drop((db, role, startup, on));
    admin.batch_execute("DROP DATABASE eg_route_db WITH (FORCE)").unwrap();
}

/// A directory the server's user can read, for a model that is not there yet.
fn model_home() -> PathBuf {
    let home = tempfile::Builder::new().prefix("eg-model-").tempdir_in("/tmp").unwrap().keep();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
    home.join("model")
}

/// Puts the tiny fixture model at `to`, readable by the server's user.
fn bring_model(to: &std::path::Path) {
    let status = std::process::Command::new("cp").arg("-r").arg(tiny_model_dir()).arg(to).status().unwrap();
    assert!(status.success());
    let status = std::process::Command::new("chmod").args(["-R", "a+rX"]).arg(to).status().unwrap();
    assert!(status.success());
}

fn point_server_at(admin: &mut Client, model: &std::path::Path) {
    // One statement per call: ALTER SYSTEM cannot run in a transaction block.
    admin.batch_execute(&format!("ALTER SYSTEM SET embeddinggemma.model_path = '{}'", model.display())).unwrap();
    admin
        .batch_execute(&format!("ALTER SYSTEM SET embeddinggemma.model_checksums = '{}'", tiny_checksums().display()))
        .unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
}

/// Puts the service test server's configuration back as `scripts/test` made it, also when a
/// test fails half-way (the next test must not inherit its settings).
struct ResetServerSettings;

impl Drop for ResetServerSettings {
    fn drop(&mut self) {
        let mut admin = connect_service();
        for setting in ["model_path", "model_checksums", "max_threads"] {
            admin.batch_execute(&format!("ALTER SYSTEM RESET embeddinggemma.{setting}")).unwrap();
        }
        admin.batch_execute("SELECT pg_reload_conf()").unwrap();
        wait_running(&mut admin, Duration::from_secs(180));
    }
}

fn wait_state(c: &mut Client, want: &str, within: Duration) -> (Option<String>, Duration) {
    let started = Instant::now();
    loop {
        let (state, _, _, error) = service_state(c);
        if state == want {
            return (error, started.elapsed());
        }
        assert!(started.elapsed() < within, "service {state}, not {want}, after {within:?}: {error:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_model_that_arrives_after_the_service_started_is_served_after_a_reload_or_by_itself() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut admin = connect_service();
    wait_running(&mut admin, Duration::from_secs(180));
    let _reset = ResetServerSettings;
    for reload in [true, false] {
        // The model is not there when the service starts (a first run: preload, start, then fetch).
        let model = model_home();
        point_server_at(&mut admin, &model);
        let (error, _) = wait_state(&mut admin, "failed", Duration::from_secs(60));
        eprintln!("service without its model: {error:?}");
        let (next,): (Option<f64>,) =
            admin.query_one("SELECT next_attempt_s FROM embeddinggemma_service", &[]).map(|r| (r.get(0),)).unwrap();
        assert!(next.is_some(), "the view does not show the next attempt");
        let mut user = connect_service();
        let (code, msg, _) = expect_error(&mut user, "SELECT embed('x')");
        assert_eq!(code, "58P01", "{msg}");
        bring_model(&model);
        let arrived = Instant::now();
        if reload {
            admin.batch_execute("SELECT pg_reload_conf()").unwrap();
        }
        let limit = Duration::from_secs(if reload { 30 } else { 90 });
        wait_state(&mut admin, "running", limit);
        let took = arrived.elapsed();
        eprintln!("model served {took:?} after it arrived ({})", if reload { "pg_reload_conf()" } else { "no reload" });
        assert_eq!(embed(&mut connect_service(), "healed", "query", 48).len(), 48);
    }
}

#[test]
fn a_reload_that_restarts_the_service_lets_a_running_backfill_finish_each_row_once() {
    const N: i64 = 600;
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut admin = connect_service();
    let old_pid = wait_running(&mut admin, Duration::from_secs(180));
    let _reset = ResetServerSettings;
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS rl_docs, rl_audit;
             CREATE TABLE rl_docs (id bigint PRIMARY KEY, body text, v vector(768));
             CREATE TABLE rl_audit (id bigint);
             CREATE OR REPLACE FUNCTION rl_audit() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN INSERT INTO rl_audit VALUES (NEW.id); RETURN NULL; END $$;
             CREATE TRIGGER audit AFTER UPDATE ON rl_docs FOR EACH ROW WHEN (OLD.v IS DISTINCT FROM NEW.v) EXECUTE FUNCTION rl_audit();
             INSERT INTO rl_docs (id, body) SELECT i, 'short row number ' || i FROM generate_series(1, {N}) i;"
        ))
        .unwrap();
    let (pid, handle) = in_background("CALL embeddinggemma_backfill('rl_docs', 'body', 'v', batch_size => 10)");
    let progress = |c: &mut Client| -> i64 {
        c.query_one("SELECT coalesce(sum(rows_done), 0)::bigint FROM embeddinggemma_backfills WHERE relation = 'rl_docs'::regclass", &[]).unwrap().get(0)
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while progress(&mut admin) == 0 {
        assert!(Instant::now() < deadline, "the backfill made no progress");
        thread::sleep(Duration::from_millis(20));
    }
    admin.batch_execute("ALTER SYSTEM SET embeddinggemma.max_threads = 1").unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let new_pid = loop {
        let (state, p, _, _) = service_state(&mut admin);
        if state == "running" && p.is_some_and(|p| p != old_pid) {
            break p.unwrap();
        }
        assert!(Instant::now() < deadline, "the service was not replaced");
        thread::sleep(Duration::from_millis(20));
    };
    let at_restart = progress(&mut admin);
    eprintln!("service {old_pid} replaced by {new_pid} with {at_restart} of {N} rows done (backend {pid})");
    assert!(at_restart < N, "the backfill ended before the service was replaced");
    handle.join().unwrap().0.expect("the backfill failed across the reload");
    let once: (i64, i64, i64) = {
        let r = admin
            .query_one(
                "SELECT count(*), count(DISTINCT id), (SELECT count(*) FROM rl_docs WHERE v IS NULL) FROM rl_audit",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(once, (N, N, 0), "(writes, rows written, rows left)");
    let stale: i64 = admin
        .query_one("SELECT count(*) FROM rl_docs WHERE id % 37 = 0 AND v <=> embed(body) > 1e-6", &[])
        .unwrap()
        .get(0);
    assert_eq!(stale, 0);
}
