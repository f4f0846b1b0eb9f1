//! Helpers for the end-to-end tests: connections to the test server that `scripts/test`
//! starts, fixture paths, reference cases, vector comparisons.

pub mod async_load;
pub mod load;

use std::path::PathBuf;

use postgres::{Client, NoTls};
use serde::Deserialize;

/// libpq connection string of the test server (`scripts/test` sets it).
pub fn dsn() -> String {
    std::env::var("EMBEDDINGGEMMA_TEST_DSN")
        .expect("EMBEDDINGGEMMA_TEST_DSN is not set: run the SQL tests through scripts/test")
}

/// A superuser session in the test database, the extension created. The server runs the
/// recommended configuration (the embedding service preloaded): sessions at the server's model
/// settings embed through the service, others (the tiny model) in-process.
pub fn connect() -> Client {
    Client::connect(&dsn(), NoTls).expect("cannot connect to the test server")
}

/// A superuser session on the server without the service (nothing preloaded): every backend
/// embeds in-process with a model of its own. For what only that path has (per-backend model
/// loads, CPU slots, activation memory, a setting before the library is loaded).
pub fn connect_in_process() -> Client {
    let dsn = std::env::var("EMBEDDINGGEMMA_TEST_INPROCESS_DSN")
        .expect("EMBEDDINGGEMMA_TEST_INPROCESS_DSN is not set: run the SQL tests through scripts/test");
    Client::connect(&dsn, NoTls).expect("cannot connect to the in-process test server")
}

/// A session as an ordinary role (created on first use).
pub fn connect_as_ordinary_user() -> Client {
    let mut admin = connect();
    admin
        .batch_execute(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'eg_ordinary') THEN
                 CREATE ROLE eg_ordinary LOGIN;
               END IF;
             END $$;
             GRANT ALL ON SCHEMA public TO eg_ordinary;",
        )
        .unwrap();
    Client::connect(&format!("{} user=eg_ordinary", dsn()), NoTls).expect("cannot connect as eg_ordinary")
}

fn env_path(var: &str) -> PathBuf {
    PathBuf::from(
        std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run the SQL tests through scripts/test")),
    )
}

/// The tiny fixture model, copied where the server user can read it.
pub fn tiny_model_dir() -> PathBuf {
    env_path("EMBEDDINGGEMMA_TEST_TINY_MODEL")
}

pub fn tiny_checksums() -> PathBuf {
    tiny_model_dir().parent().unwrap().join("SHA256SUMS")
}

/// Points a session at the tiny fixture model.
pub fn use_tiny_model(client: &mut Client) {
    client
        .batch_execute(&format!(
            "SET embeddinggemma.model_path = '{}'; SET embeddinggemma.model_checksums = '{}';",
            tiny_model_dir().display(),
            tiny_checksums().display()
        ))
        .unwrap();
}

pub fn real_model_dir() -> PathBuf {
    env_path("EMBEDDINGGEMMA_MODEL_DIR")
}

/// Test data of the engine crate (reference outputs, fixtures).
pub fn engine_data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/data").join(rel)
}

#[derive(Debug, Deserialize)]
pub struct Case {
    #[serde(default)]
    pub id: String,
    pub text: String,
    pub prompt_name: Option<String>,
    #[serde(default)]
    pub prompt: String,
    pub embedding: Vec<f32>,
}

impl Case {
    pub fn task(&self) -> &str {
        self.prompt_name.as_deref().unwrap_or("none")
    }

    pub fn label(&self) -> String {
        format!("{}/{}", if self.id.is_empty() { &self.text } else { &self.id }, self.task())
    }
}

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

/// The 69 cases of the real model's reference outputs.
pub fn reference_cases() -> Vec<Case> {
    let text = std::fs::read_to_string(engine_data("embeddinggemma-300m.json")).unwrap();
    serde_json::from_str::<Reference>(&text).unwrap().cases
}

/// The first `limit` passages of the benchmark corpus.
pub fn docstrings(limit: usize) -> Vec<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench/docstrings.jsonl");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .take(limit)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    1.0 - dot / (na * nb)
}

/// The first `dim` values, normalised again.
pub fn matryoshka(v: &[f32], dim: usize) -> Vec<f32> {
    let norm = v[..dim].iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    v[..dim].iter().map(|&x| (x as f64 / norm) as f32).collect()
}

/// The SQLSTATE and message of a failed statement.
pub fn sql_error(e: postgres::Error) -> (String, String, Option<String>) {
    let db = e.as_db_error().unwrap_or_else(|| panic!("not a server error: {e}"));
    (db.code().code().to_string(), db.message().to_string(), db.hint().map(str::to_string))
}

/// `embed(text, task, dim)` as floats.
pub fn embed(client: &mut Client, text: &str, task: &str, dim: i32) -> Vec<f32> {
    client.query_one("SELECT embed($1, $2, $3)::real[]", &[&text, &task, &dim]).unwrap().get(0)
}

/// Rows of `table` (bigint `id`, `body`, vector `v`) whose vector is not `embed(body)` within
/// 1e-6 (missing, extra or different): one `embed_batch` over the table, whose vectors equal
/// embed()'s.
pub fn stale_vectors(c: &mut Client, table: &str) -> i64 {
    c.query_one(
        &format!(
            "SELECT count(*) FROM {table} t
               JOIN embed_batch((SELECT array_agg(id ORDER BY id) FROM {table}), (SELECT array_agg(body ORDER BY id) FROM {table})) e
                 ON e.id = t.id
              WHERE (t.body IS NULL) <> (t.v IS NULL) OR (t.v IS NOT NULL AND t.v <=> e.embedding > 1e-6)"
        ),
        &[],
    )
    .unwrap()
    .get(0)
}

/// This backend's `embeddinggemma_stats()` column `name`.
pub fn stat<T: for<'a> postgres::types::FromSql<'a>>(client: &mut Client, name: &str) -> T {
    client.query_one(&format!("SELECT {name} FROM embeddinggemma_stats()"), &[]).unwrap().get(0)
}

/// Runs `sql` and returns (SQLSTATE, message, hint) of the error it must raise.
pub fn expect_error(client: &mut Client, sql: &str) -> (String, String, Option<String>) {
    sql_error(client.batch_execute(sql).expect_err(sql))
}

/// Waits until backend `pid` is inside the extension's work (pg_stat_activity shows the wait
/// event type 'Extension' while it embeds, loads or waits for CPU threads).
pub fn wait_until_embedding(client: &mut Client, pid: i32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let sql = "SELECT coalesce(wait_event_type = 'Extension', false) FROM pg_stat_activity WHERE pid = $1";
    while !client.query_opt(sql, &[&pid]).unwrap().is_some_and(|r| r.get::<_, bool>(0)) {
        assert!(std::time::Instant::now() < deadline, "backend {pid} never started embedding");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Makes `role` an ordinary login role whose default model is the tiny fixture model. An
/// ordinary role cannot `SET embeddinggemma.model_path` (superuser-only), but a superuser's
/// `ALTER ROLE … SET` applies at every login of the role, so its sessions load the tiny model
/// without any privilege. A dedicated role leaves every other test's sessions unaffected.
pub fn tiny_model_role(role: &str) {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let ident = format!("\"{}\"", role.replace('"', "\"\""));
    connect()
        .batch_execute(&format!(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {role_lit}) THEN
                 CREATE ROLE {ident} LOGIN;
               END IF;
             END $$;
             GRANT USAGE ON SCHEMA public TO {ident};
             ALTER ROLE {ident} SET embeddinggemma.model_path = {path};
             ALTER ROLE {ident} SET embeddinggemma.model_checksums = {sums};",
            role_lit = quote(role),
            path = quote(&tiny_model_dir().display().to_string()),
            sums = quote(&tiny_checksums().display().to_string()),
        ))
        .unwrap();
}

/// A session as `role` (see [`tiny_model_role`]).
pub fn connect_as(role: &str) -> Client {
    Client::connect(&format!("{} user={role}", dsn()), NoTls)
        .unwrap_or_else(|e| panic!("cannot connect as {role}: {e}"))
}

/// The test server's log file, where `scripts/test` says it is (`EMBEDDINGGEMMA_TEST_SERVER_LOG`)
/// and this process may read it.
pub fn server_log() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("EMBEDDINGGEMMA_TEST_SERVER_LOG")?);
    std::fs::File::open(&path).ok().map(|_| path)
}

/// Lines of the server log that show a backend crash or a crash recovery.
pub fn crash_lines(log: &str) -> Vec<String> {
    const SIGNS: [&str; 6] = [
        "terminated by signal",
        "was terminated by exception",
        "exited with exit code",
        "all server processes terminated; reinitializing",
        "terminating any other active server processes",
        "PANIC:",
    ];
    log.lines().filter(|l| SIGNS.iter().any(|s| l.contains(s))).map(str::to_string).collect()
}

/// NOTICE messages a session received, in order.
pub type Notices = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// A session to `dsn` whose NOTICEs are collected.
pub fn connect_collecting_notices(dsn: &str) -> (Client, Notices) {
    let notices = Notices::default();
    let sink = notices.clone();
    let mut config: postgres::Config = dsn.parse().unwrap();
    config.notice_callback(move |n| sink.lock().unwrap().push(n.message().to_string()));
    (config.connect(NoTls).unwrap(), notices)
}

/// A new, empty database `name` on the test server (dropped first if there), and a superuser
/// session in it.
pub fn fresh_database(admin: &mut Client, name: &str) -> Client {
    // One statement per call: several in one string form a transaction block.
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    Client::connect(&format!("{} dbname={name}", dsn()), NoTls).unwrap()
}

/// Registers an asynchronous target on `table` (key `id`, `body` into `v`, 768 dimensions) as
/// 0.4.0's `embeddinggemma_async` recorded one: its row in the targets table (no column
/// numbers) and its trigger. For installs of 0.4.0, whose registration the library refuses.
pub fn record_target_as_0_4_0(c: &mut Client, table: &str) -> i32 {
    let id: i32 = c
        .query_one(
            "INSERT INTO embeddinggemma_async_targets (relation, key_column, source, target, task, dim)
             VALUES ($1::text::regclass, 'id', 'body', 'v', 'document', 768) RETURNING id",
            &[&table],
        )
        .unwrap()
        .get(0);
    c.batch_execute(&format!(
        "CREATE TRIGGER embeddinggemma_async_{id} BEFORE INSERT OR UPDATE ON {table}
           FOR EACH ROW EXECUTE FUNCTION embeddinggemma_async_trigger('{id}')"
    ))
    .unwrap();
    id
}

/// Every reference case through `embed()` on `client`, each within `tolerance` (cosine
/// distance) of the reference; returns the worst distance.
pub fn assert_reference_cases_through_embed(client: &mut Client, tolerance: f64) -> f64 {
    let mut worst = 0f64;
    for case in reference_cases() {
        let v = embed(client, &case.text, case.task(), 768);
        let d = cosine_distance(&v, &case.embedding);
        assert!(d <= tolerance, "{}: cosine distance {d:e}", case.label());
        worst = worst.max(d);
    }
    worst
}
