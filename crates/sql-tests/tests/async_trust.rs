//! Issue 26: trust in background work. The asynchronous worker writes vectors as each table's
//! owner, one after another in one process; nothing one owner does there may reach another:
//!
//! - owner isolation: each owner's SQL runs as a security-restricted operation in a GUC nest
//!   level of its own, rolled back afterwards, with `search_path = pg_catalog, pg_temp`: a
//!   setting made by one owner's trigger (session level or local) never reaches another owner's
//!   write, and an ordinary role cannot plant a function that a superuser's trigger then runs;
//! - the status and failure views are `security_barrier`: a leaky function of a role that
//!   cannot read a table learns nothing of its rows, and `embeddinggemma_async_wait` checks the
//!   right to read the table;
//! - stalls are bounded: a statement that never ends (`async_statement_timeout`), a row lock
//!   held by a session (`async_lock_timeout`), queue entries whose keys are huge, a target
//!   registered while the worker is busy: every other target still drains;
//! - worker slots: `async_max_workers` bounds the worker processes of the whole cluster, the
//!   databases are served in turn, and a database with targets can be dropped (by its
//!   non-superuser owner too), renamed or copied while its worker is connected, with no worker
//!   coming back for a database that is gone;
//! - memory: a row whose text is hundreds of megabytes is never held whole by the worker.
//!
//! Against the main test server, with the real model through the service. Tests that change
//! the server's settings, watch every worker or the server log, drop databases or load the
//! worker for long run alone ([`ALONE`]: the one worker of the database serves every test);
//! the others use tables, roles and schemas of their own (`tr_…`) and run beside each other.
//! Everything is created anew at the start of a test, so a failed run leaves nothing that
//! disturbs the next.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant};

use embeddinggemma_sql_tests::*;
use postgres::{Client, NoTls};

const SAME_TEXT: f64 = 1e-6;

/// How long a test waits for rows to drain where how soon is not what it tests: generous, for a
/// loaded machine (the wait ends as soon as they have).
const DRAIN: &str = "180 s";

/// Held exclusively by tests that change server settings, watch every worker or the server
/// log, drop databases or keep the worker busy for long; shared by the others.
static ALONE: RwLock<()> = RwLock::new(());

fn alone() -> RwLockWriteGuard<'static, ()> {
    ALONE.write().unwrap_or_else(|e| e.into_inner())
}

fn beside_others() -> RwLockReadGuard<'static, ()> {
    ALONE.read().unwrap_or_else(|e| e.into_inner())
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Polls `done` every 20 ms until it holds; fails after `within`.
fn poll_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "waited {within:?} in vain until {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// `embeddinggemma_async_wait` of `table`'s target `target`.
fn wait(c: &mut Client, table: &str, target: &str, within: &str) -> bool {
    c.query_one(&format!("SELECT embeddinggemma_async_wait('{table}', '{target}', timeout => '{within}')"), &[])
        .unwrap()
        .get(0)
}

/// (pending, failed) of `table`'s target `v`.
fn status(c: &mut Client, table: &str) -> (i64, i64) {
    let r = c.query_one(&format!("SELECT pending, failed FROM embeddinggemma_async_status WHERE table_name = '{table}'::regclass AND target = 'v'"), &[]).unwrap();
    (r.get(0), r.get(1))
}

/// Drops the targets of `table` (if it exists), so that the worker leaves it alone.
fn forget(c: &mut Client, table: &str) {
    let _ = c.batch_execute(&format!(
        "SELECT embeddinggemma_async_drop(relation, target) FROM embeddinggemma_async_targets WHERE relation = to_regclass('{table}')"
    ));
}

/// Drops the targets of every table in `schema`.
fn forget_schema(c: &mut Client, schema: &str) {
    let _ = c.batch_execute(&format!(
        "SELECT embeddinggemma_async_drop(t.relation, t.target) FROM embeddinggemma_async_targets t JOIN pg_class k ON k.oid = t.relation
          WHERE k.relnamespace = to_regnamespace('{schema}')"
    ));
}

/// An ordinary login role that may use `public` (where the vector type is).
fn ordinary_role(c: &mut Client, role: &str) {
    c.batch_execute(&format!(
        "BEGIN;
         -- concurrent GRANTs on one schema fail with 'tuple concurrently updated'
         SELECT pg_advisory_xact_lock(7274026);
         DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN CREATE ROLE {role} LOGIN; END IF;
         END $$;
         ALTER ROLE {role} NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS;
         GRANT USAGE ON SCHEMA public TO {role};
         COMMIT;"
    ))
    .unwrap();
}

/// An ordinary role with a new, empty schema of its own name.
fn owner_with_schema(c: &mut Client, role: &str) {
    ordinary_role(c, role);
    forget_schema(c, role);
    c.batch_execute(&format!("DROP SCHEMA IF EXISTS {role} CASCADE; CREATE SCHEMA {role} AUTHORIZATION {role};"))
        .unwrap();
}

/// Runs its closure on a fresh superuser session when dropped (test failed or not).
struct Cleanup<F: FnMut(&mut Client)>(F);

impl<F: FnMut(&mut Client)> Drop for Cleanup<F> {
    fn drop(&mut self) {
        if let Ok(mut c) = Client::connect(&dsn(), NoTls) {
            (self.0)(&mut c);
        }
    }
}

/// Server settings changed with ALTER SYSTEM, reset when dropped (test failed or not).
struct Settings(Vec<String>);

impl Settings {
    fn set(c: &mut Client, pairs: &[(&str, &str)]) -> Settings {
        let guard = Settings(pairs.iter().map(|(name, _)| name.to_string()).collect());
        for (name, value) in pairs {
            c.batch_execute(&format!("ALTER SYSTEM SET {name} = {value}"))
                .unwrap_or_else(|e| panic!("ALTER SYSTEM SET {name}: {e}"));
        }
        c.batch_execute("SELECT pg_reload_conf()").unwrap();
        guard
    }
}

impl Drop for Settings {
    fn drop(&mut self) {
        if let Ok(mut c) = Client::connect(&dsn(), NoTls) {
            for name in &self.0 {
                let _ = c.batch_execute(&format!("ALTER SYSTEM RESET {name}"));
            }
            let _ = c.batch_execute("SELECT pg_reload_conf()");
        }
    }
}

/// A row queued and embedded after a reload: the worker has been through a round since it was
/// signalled, so it works with the new settings.
fn round_trip(c: &mut Client, table: &str) {
    forget(c, table);
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table};
         CREATE TABLE {table} (id bigint PRIMARY KEY, body text, v vector(768));
         INSERT INTO {table} VALUES (1, 'a probe after the reload');
         SELECT embeddinggemma_async('{table}', 'body', 'v');"
    ))
    .unwrap();
    assert!(wait(c, table, "v", DRAIN), "the worker did not embed a probe row after the reload");
    forget(c, table);
}

/// (pid, database, wait event) of every asynchronous worker in the cluster.
fn workers(c: &mut Client) -> Vec<(i32, Option<String>, Option<String>)> {
    c.query(
        "SELECT pid, datname::text, wait_event FROM pg_stat_activity WHERE backend_type = 'embeddinggemma async'",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Samples `sample` every `every` on a session of its own until finished (once more then).
struct Sampler<T> {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<T>>,
}

impl<T: Send + 'static> Sampler<T> {
    fn start(every: Duration, mut state: T, mut sample: impl FnMut(&mut Client, &mut T) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut c = connect();
            loop {
                let last = flag.load(Ordering::Acquire);
                sample(&mut c, &mut state);
                if last {
                    return state;
                }
                thread::sleep(every);
            }
        });
        Sampler { stop, thread: Some(thread) }
    }

    fn finish(mut self) -> T {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().expect("the sampler failed")
    }
}

impl<T> Drop for Sampler<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn log_path() -> std::path::PathBuf {
    server_log().expect("EMBEDDINGGEMMA_TEST_SERVER_LOG is not set or not readable: this test reads the server log")
}

fn log_len() -> u64 {
    std::fs::metadata(log_path()).unwrap().len()
}

/// What the server logged after `offset`.
fn log_since(offset: u64) -> String {
    let mut file = std::fs::File::open(log_path()).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).unwrap();
    String::from_utf8_lossy(&bytes).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Owner isolation

/// The settings owner A's triggers change, and the values they set: (name, session value,
/// local value).
const PLANTED: &[(&str, &str, &str)] = &[
    ("search_path", "tr_a, pg_catalog", "tr_a, public, pg_catalog"),
    ("statement_timeout", "987s", "876s"),
    ("lock_timeout", "654s", "543s"),
    ("default_transaction_read_only", "on", "on"),
    ("embeddinggemma.truncate", "off", "off"),
];

/// A trigger function of owner A that sets every setting of [`PLANTED`] when the worker writes
/// a vector, at session level (`local` false) or for the transaction.
fn planting_function(name: &str, local: bool) -> String {
    let sets: String = PLANTED
        .iter()
        .map(|(setting, session, tx)| {
            format!("PERFORM pg_catalog.set_config('{setting}', '{}', {local});\n", if local { tx } else { session })
        })
        .collect();
    format!(
        "CREATE FUNCTION tr_a.{name}() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.v IS NOT NULL THEN
             {sets}
             INSERT INTO tr_a.ran VALUES ('{name}');
           END IF;
           RETURN NEW;
         END $$;"
    )
}

#[test]
fn one_owners_session_settings_never_reach_another_owners_write() {
    let _shared = beside_others();
    let mut c = connect();
    owner_with_schema(&mut c, "tr_a");
    owner_with_schema(&mut c, "tr_b");
    let _cleanup = Cleanup(|c: &mut Client| {
        forget_schema(c, "tr_a");
        forget_schema(c, "tr_b");
    });
    // Owner A: two tables, registered by A, whose triggers change settings at session level and
    // locally while the worker writes their vectors.
    let mut a = connect_as("tr_a");
    a.batch_execute(&format!(
        "CREATE TABLE tr_a.ran (what text);
         CREATE TABLE tr_a.docs (id bigint PRIMARY KEY, body text, v vector(768));
         CREATE TABLE tr_a.docs_local (id bigint PRIMARY KEY, body text, v vector(768));
         {}
         {}
         CREATE TRIGGER zz_plant BEFORE UPDATE ON tr_a.docs FOR EACH ROW EXECUTE FUNCTION tr_a.plant_session();
         CREATE TRIGGER zz_plant BEFORE UPDATE ON tr_a.docs_local FOR EACH ROW EXECUTE FUNCTION tr_a.plant_local();
         SELECT embeddinggemma_async('tr_a.docs', 'body', 'v');
         SELECT embeddinggemma_async('tr_a.docs_local', 'body', 'v');
         INSERT INTO tr_a.docs SELECT i, 'owner a row ' || i FROM generate_series(1, 3) i;
         INSERT INTO tr_a.docs_local SELECT i, 'owner a local row ' || i FROM generate_series(1, 3) i;",
        planting_function("plant_session", false),
        planting_function("plant_local", true),
    ))
    .unwrap();
    assert!(wait(&mut c, "tr_a.docs", "v", DRAIN), "owner A's rows did not drain");
    assert!(wait(&mut c, "tr_a.docs_local", "v", DRAIN), "owner A's rows did not drain");
    assert_eq!(stale_vectors(&mut c, "tr_a.docs"), 0, "owner A's rows were not written");
    assert_eq!(stale_vectors(&mut c, "tr_a.docs_local"), 0, "owner A's rows were not written");
    let ran: Vec<String> =
        c.query("SELECT DISTINCT what FROM tr_a.ran ORDER BY 1", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(ran, ["plant_local", "plant_session"], "owner A's triggers did not run in the worker");
    // Owner B's table, written after A's, records the settings its write runs with.
    let mut b = connect_as("tr_b");
    b.batch_execute(
        "CREATE TABLE tr_b.seen (search_path text, statement_timeout text, lock_timeout text, read_only text, truncate text);
         CREATE TABLE tr_b.docs (id bigint PRIMARY KEY, body text, v vector(768));
         CREATE FUNCTION tr_b.record() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.v IS NOT NULL THEN
             INSERT INTO tr_b.seen VALUES (pg_catalog.current_setting('search_path'), pg_catalog.current_setting('statement_timeout'),
                                           pg_catalog.current_setting('lock_timeout'), pg_catalog.current_setting('default_transaction_read_only'),
                                           pg_catalog.current_setting('embeddinggemma.truncate'));
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER zz_record BEFORE UPDATE ON tr_b.docs FOR EACH ROW EXECUTE FUNCTION tr_b.record();
         SELECT embeddinggemma_async('tr_b.docs', 'body', 'v');
         INSERT INTO tr_b.docs SELECT i, 'owner b row ' || i FROM generate_series(1, 3) i;",
    )
    .unwrap();
    assert!(wait(&mut c, "tr_b.docs", "v", DRAIN), "owner B's rows did not drain");
    assert_eq!(stale_vectors(&mut c, "tr_b.docs"), 0, "owner B's rows were not written right");
    let seen = c
        .query("SELECT search_path, statement_timeout, lock_timeout, read_only, truncate FROM tr_b.seen", &[])
        .unwrap();
    assert!(!seen.is_empty(), "owner B's trigger never ran in the worker");
    for row in &seen {
        let got: Vec<String> = (0..5).map(|i| row.get(i)).collect();
        eprintln!("owner B's write ran with {got:?}");
        assert_eq!(got[0], "pg_catalog, pg_temp", "search_path of owner B's write");
        for (i, (setting, session, local)) in PLANTED.iter().enumerate().skip(1) {
            if *setting == "default_transaction_read_only" {
                assert_eq!(got[i], "off", "{setting} of owner B's write: owner A's reached it");
            } else if *setting == "embeddinggemma.truncate" {
                assert_eq!(got[i], "on", "{setting} of owner B's write: owner A's reached it");
            } else {
                assert!(got[i] != *session && got[i] != *local, "{setting} of owner B's write is owner A's {}", got[i]);
            }
        }
    }
}

#[test]
fn an_ordinary_role_cannot_become_superuser_through_the_worker() {
    let _shared = beside_others();
    let mut c = connect();
    owner_with_schema(&mut c, "tr_m");
    forget(&mut c, "tr_su_docs");
    let _cleanup = Cleanup(|c: &mut Client| {
        forget_schema(c, "tr_m");
        forget(c, "tr_su_docs");
        let _ = c.batch_execute("ALTER ROLE tr_m NOSUPERUSER");
    });
    // The attacker plants now() in its schema, and its trigger puts the schema first in the
    // worker's search_path, for good (session level).
    let mut m = connect_as("tr_m");
    m.batch_execute(
        "CREATE TABLE tr_m.ran (who text);
         GRANT USAGE ON SCHEMA tr_m TO PUBLIC;
         GRANT INSERT ON tr_m.ran TO PUBLIC;
         CREATE FUNCTION tr_m.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
         BEGIN
           BEGIN EXECUTE 'ALTER ROLE tr_m SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
           BEGIN INSERT INTO tr_m.ran VALUES (current_user); EXCEPTION WHEN OTHERS THEN NULL; END;
           RETURN pg_catalog.statement_timestamp();
         END $$;
         CREATE TABLE tr_m.docs (id bigint PRIMARY KEY, body text, v vector(768));
         CREATE FUNCTION tr_m.plant() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           PERFORM pg_catalog.set_config('search_path', 'tr_m, pg_catalog', false);
           RETURN NEW;
         END $$;
         CREATE TRIGGER zz_plant BEFORE UPDATE ON tr_m.docs FOR EACH ROW EXECUTE FUNCTION tr_m.plant();
         SELECT embeddinggemma_async('tr_m.docs', 'body', 'v');
         INSERT INTO tr_m.docs SELECT i, 'an attacker row ' || i FROM generate_series(1, 2) i;",
    )
    .unwrap();
    assert!(wait(&mut c, "tr_m.docs", "v", DRAIN), "the attacker's rows did not drain");
    assert_eq!(stale_vectors(&mut c, "tr_m.docs"), 0, "the attacker's rows were not written (its trigger did not run)");
    // A superuser's table whose trigger calls now() unqualified, written after.
    c.batch_execute(
        "DROP TABLE IF EXISTS tr_su_docs;
         CREATE TABLE tr_su_docs (id bigint PRIMARY KEY, body text, updated_at timestamptz, v vector(768));
         CREATE OR REPLACE FUNCTION tr_su_touch() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           NEW.updated_at := now();
           RETURN NEW;
         END $$;
         CREATE TRIGGER zz_touch BEFORE UPDATE ON tr_su_docs FOR EACH ROW EXECUTE FUNCTION tr_su_touch();
         INSERT INTO tr_su_docs (id, body) SELECT i, 'a superuser row ' || i FROM generate_series(1, 2) i;
         SELECT embeddinggemma_async('tr_su_docs', 'body', 'v');",
    )
    .unwrap();
    assert!(wait(&mut c, "tr_su_docs", "v", DRAIN), "the superuser's rows did not drain");
    assert_eq!(stale_vectors(&mut c, "tr_su_docs"), 0);
    let touched: i64 = c.query_one("SELECT count(updated_at) FROM tr_su_docs", &[]).unwrap().get(0);
    assert_eq!(touched, 2, "the superuser's trigger did not run in the worker");
    let planted: Vec<String> = c.query("SELECT who FROM tr_m.ran", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(planted.is_empty(), "the attacker's now() ran in the worker as {planted:?}");
    let superuser: bool = c.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'tr_m'", &[]).unwrap().get(0);
    assert!(!superuser, "tr_m became a superuser through the worker");
}

// ---------------------------------------------------------------------------------------------
// Views and waiting

#[test]
fn the_status_and_failure_views_leak_nothing_to_a_role_that_cannot_read_the_table() {
    let _shared = beside_others();
    let mut c = connect();
    for view in ["embeddinggemma_async_status", "embeddinggemma_async_failures"] {
        let options: String =
            c.query_one(&format!("SELECT coalesce(array_to_string(reloptions, ','), '') FROM pg_class WHERE oid = '{view}'::regclass"), &[]).unwrap().get(0);
        assert!(options.contains("security_barrier=true"), "{view} has reloptions '{options}'");
    }
    owner_with_schema(&mut c, "tr_peek");
    forget(&mut c, "tr_secret_docs");
    let _cleanup = Cleanup(|c: &mut Client| forget(c, "tr_secret_docs"));
    // A superuser's table whose one row fails for good, its text in the error.
    c.batch_execute(
        "DROP TABLE IF EXISTS tr_secret_docs;
         CREATE TABLE tr_secret_docs (id bigint PRIMARY KEY, body text, secret_vec_col vector(768));
         CREATE OR REPLACE FUNCTION tr_secret_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.secret_vec_col IS NOT NULL THEN RAISE EXCEPTION 'tr_secret refused row %: %', NEW.id, NEW.body; END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER zz_refuse BEFORE UPDATE ON tr_secret_docs FOR EACH ROW EXECUTE FUNCTION tr_secret_refuse();
         INSERT INTO tr_secret_docs VALUES (7770777, 'tr_secret_body_q9z', NULL);",
    )
    .unwrap();
    c.batch_execute(
        "SELECT embeddinggemma_async('tr_secret_docs', 'body', 'secret_vec_col');
         UPDATE embeddinggemma_async_targets SET max_attempts = 1 WHERE relation = 'tr_secret_docs'::regclass;",
    )
    .unwrap();
    let failure = || -> Option<String> {
        connect()
            .query_opt(
                "SELECT error FROM embeddinggemma_async_failures WHERE table_name = 'tr_secret_docs'::regclass",
                &[],
            )
            .unwrap()
            .map(|r| r.get(0))
    };
    poll_until("the secret row is listed as failed", secs(60), || failure().is_some());
    let error = failure().unwrap();
    eprintln!("the secret row failed with: {error}");
    let secrets = ["7770777", "tr_secret", "secret_vec_col", error.as_str()];
    // A role without any right on the table, with a leaky function cheaper than any filter.
    let (mut peek, notices) = connect_collecting_notices(&format!("{} user=tr_peek", dsn()));
    peek.batch_execute(
        "CREATE FUNCTION tr_peek.tr_leak(anyelement) RETURNS boolean LANGUAGE plpgsql COST 0.0000001 AS $$
         BEGIN RAISE NOTICE 'leak: %', $1; RETURN true; END $$;",
    )
    .unwrap();
    let mut shown: Vec<String> = Vec::new();
    for sql in [
        "SELECT concat_ws(' ', table_name, target, key, error) FROM embeddinggemma_async_failures
          WHERE tr_peek.tr_leak(key) AND tr_peek.tr_leak(error) AND tr_peek.tr_leak(table_name::text) AND tr_peek.tr_leak(target)",
        "SELECT concat_ws(' ', table_name, target) FROM embeddinggemma_async_status
          WHERE tr_peek.tr_leak(table_name::text) AND tr_peek.tr_leak(target)",
    ] {
        shown.extend(peek.query(sql, &[]).unwrap().iter().map(|r| r.get::<_, String>(0)));
    }
    let notices = notices.lock().unwrap().clone();
    eprintln!("{} rows shown, {} NOTICEs", shown.len(), notices.len());
    for text in shown.iter().chain(&notices) {
        for secret in secrets {
            assert!(!text.contains(secret), "a role that cannot read tr_secret_docs learned '{secret}': {text}");
        }
    }
}

#[test]
fn waiting_on_a_target_needs_the_right_to_read_its_table() {
    let _shared = beside_others();
    let mut c = connect();
    ordinary_role(&mut c, "tr_nosel");
    forget(&mut c, "tr_wait_secret");
    let _cleanup = Cleanup(|c: &mut Client| forget(c, "tr_wait_secret"));
    c.batch_execute(
        "DROP TABLE IF EXISTS tr_wait_secret;
         CREATE TABLE tr_wait_secret (id bigint PRIMARY KEY, body text, v vector(768));
         INSERT INTO tr_wait_secret SELECT i, 'a row only its owner reads ' || i FROM generate_series(1, 2) i;
         SELECT embeddinggemma_async('tr_wait_secret', 'body', 'v');",
    )
    .unwrap();
    let mut user = connect_as("tr_nosel");
    let (code, msg, _) = expect_error(&mut user, "SELECT embeddinggemma_async_wait('tr_wait_secret', 'v', '1 s')");
    assert_eq!(code, "42501", "{msg}");
    // With the right to read it, the same call waits.
    c.batch_execute("GRANT SELECT ON tr_wait_secret TO tr_nosel").unwrap();
    assert!(wait(&mut user, "tr_wait_secret", "v", DRAIN));
}

// ---------------------------------------------------------------------------------------------
// Stalls

#[test]
fn a_statement_that_never_ends_in_one_owners_trigger_does_not_stall_another_owners_target() {
    let _alone = alone();
    let mut c = connect();
    ordinary_role(&mut c, "tr_st");
    forget(&mut c, "tr_st_sleepy");
    forget(&mut c, "tr_st_other");
    let _settings = Settings::set(&mut c, &[("embeddinggemma.async_statement_timeout", "2000")]);
    // Before the settings are reset: the sleeping target goes first.
    let _cleanup = Cleanup(|c: &mut Client| {
        if thread::panicking() {
            // Where nothing bounds it, the worker would sleep for an hour.
            let _ = c.batch_execute(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE backend_type = 'embeddinggemma async' AND wait_event = 'PgSleep'",
            );
        }
        forget(c, "tr_st_sleepy");
        forget(c, "tr_st_other");
        forget(c, "tr_st_probe");
        // Its trigger too (rows the worker has in hand may be tried again): before the limit goes.
        let _ = c.batch_execute("DROP TABLE IF EXISTS tr_st_sleepy");
    });
    round_trip(&mut c, "tr_st_probe");
    c.batch_execute(
        "DROP TABLE IF EXISTS tr_st_sleepy, tr_st_other;
         CREATE TABLE tr_st_sleepy (id bigint PRIMARY KEY, body text, v vector(768));
         CREATE TABLE tr_st_other (id bigint PRIMARY KEY, body text, v vector(768));
         CREATE OR REPLACE FUNCTION tr_st_sleep() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.v IS NOT NULL THEN PERFORM pg_catalog.pg_sleep(3600); END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER zz_sleep BEFORE UPDATE ON tr_st_sleepy FOR EACH ROW EXECUTE FUNCTION tr_st_sleep();
         ALTER TABLE tr_st_sleepy OWNER TO tr_st;
         INSERT INTO tr_st_sleepy SELECT i, 'a row whose write never ends ' || i FROM generate_series(1, 2) i;
         SELECT embeddinggemma_async('tr_st_sleepy', 'body', 'v');",
    )
    .unwrap();
    poll_until("the worker sleeps in owner A's trigger", secs(60), || {
        workers(&mut c).iter().any(|w| w.2.as_deref() == Some("PgSleep"))
    });
    c.batch_execute(
        "INSERT INTO tr_st_other SELECT i, 'another owner''s row ' || i FROM generate_series(1, 3) i;
         SELECT embeddinggemma_async('tr_st_other', 'body', 'v');",
    )
    .unwrap();
    let started = Instant::now();
    assert!(
        wait(&mut c, "tr_st_other", "v", "60 s"),
        "another owner's target stalled behind a trigger that never ends"
    );
    eprintln!("the other target drained in {:.1} s beside the sleeping one", started.elapsed().as_secs_f64());
    assert_eq!(stale_vectors(&mut c, "tr_st_other"), 0);
}

#[test]
fn a_row_lock_held_by_a_session_stalls_only_its_own_rows() {
    let _alone = alone();
    let mut c = connect();
    forget(&mut c, "tr_lk_x");
    forget(&mut c, "tr_lk_y");
    let _settings = Settings::set(&mut c, &[("embeddinggemma.async_lock_timeout", "1000")]);
    let _cleanup = Cleanup(|c: &mut Client| {
        forget(c, "tr_lk_x");
        forget(c, "tr_lk_y");
        forget(c, "tr_lk_probe");
    });
    round_trip(&mut c, "tr_lk_probe");
    c.batch_execute(
        "DROP TABLE IF EXISTS tr_lk_x, tr_lk_y;
         CREATE TABLE tr_lk_x (id bigint PRIMARY KEY, body text, v vector(768));
         CREATE TABLE tr_lk_y (id bigint PRIMARY KEY, body text, v vector(768));
         INSERT INTO tr_lk_x SELECT i, 'a row of the locked table ' || i FROM generate_series(1, 3) i;
         INSERT INTO tr_lk_y SELECT i, 'a row of the free table ' || i FROM generate_series(1, 3) i;",
    )
    .unwrap();
    // Dropped before the cleanup runs: its lock would hold the cleanup up.
    let mut locker = connect();
    locker.batch_execute("BEGIN; SELECT id FROM tr_lk_x WHERE id = 1 FOR UPDATE;").unwrap();
    // The lock is held as long as the test takes: the locked row's retries must not run out
    // meanwhile (5 by default, over about 15 s).
    c.batch_execute(
        "SELECT embeddinggemma_async('tr_lk_x', 'body', 'v');
         UPDATE embeddinggemma_async_targets SET max_attempts = 20 WHERE relation = 'tr_lk_x'::regclass;",
    )
    .unwrap();
    poll_until("the worker meets the locked row", secs(60), || {
        c.query_one(
            "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE backend_type = 'embeddinggemma async' AND wait_event_type = 'Lock')
                 OR EXISTS (SELECT FROM tr_lk_x WHERE id <> 1 AND v IS NOT NULL)",
            &[],
        )
        .unwrap()
        .get(0)
    });
    c.batch_execute("SELECT embeddinggemma_async('tr_lk_y', 'body', 'v')").unwrap();
    let started = Instant::now();
    assert!(wait(&mut c, "tr_lk_y", "v", "60 s"), "a target stalled behind another table's locked row");
    eprintln!("the free table drained in {:.1} s beside the locked row", started.elapsed().as_secs_f64());
    assert_eq!(stale_vectors(&mut c, "tr_lk_y"), 0);
    let locked_row_empty: bool = c.query_one("SELECT v IS NULL FROM tr_lk_x WHERE id = 1", &[]).unwrap().get(0);
    assert!(locked_row_empty, "the locked row was written while locked");
    locker.batch_execute("ROLLBACK").unwrap();
    assert!(wait(&mut c, "tr_lk_x", "v", DRAIN), "the locked table did not drain once the lock was gone");
    assert_eq!(stale_vectors(&mut c, "tr_lk_x"), 0, "rows of the locked table were not written once the lock was gone");
    assert_eq!(status(&mut c, "tr_lk_x"), (0, 0));
}

#[test]
fn entries_with_huge_keys_all_drain_and_none_stays_leased() {
    let _alone = alone();
    let mut c = connect();
    ordinary_role(&mut c, "tr_hk");
    forget(&mut c, "tr_hk_docs");
    forget(&mut c, "tr_hk_small");
    let _cleanup = Cleanup(|c: &mut Client| {
        forget(c, "tr_hk_docs");
        forget(c, "tr_hk_small");
    });
    c.batch_execute(
        "DROP TABLE IF EXISTS tr_hk_docs, tr_hk_small;
         CREATE TABLE tr_hk_docs (id text PRIMARY KEY, body text, v vector(768));
         CREATE TABLE tr_hk_small (id bigint PRIMARY KEY, body text, v vector(768));
         ALTER TABLE tr_hk_small OWNER TO tr_hk;
         SELECT embeddinggemma_async('tr_hk_docs', 'body', 'v');
         SELECT embeddinggemma_async('tr_hk_small', 'body', 'v');",
    )
    .unwrap();
    // Keys of 150,400 bytes (about 2 kB compressed: they fit the primary key's btree), 9 MB
    // together; then another owner's small rows, queued after them.
    c.batch_execute(
        "INSERT INTO tr_hk_docs (id, body) SELECT repeat(md5(i::text), 4700), 'a row with a huge key ' || i FROM generate_series(1, 60) i;
         INSERT INTO tr_hk_small SELECT i, 'a small row after the huge keys ' || i FROM generate_series(1, 5) i;",
    )
    .unwrap();
    let drained = (wait(&mut c, "tr_hk_docs", "v", "120 s"), wait(&mut c, "tr_hk_small", "v", "120 s"));
    let left = (status(&mut c, "tr_hk_docs"), status(&mut c, "tr_hk_small"));
    assert_eq!(drained, (true, true), "(pending, failed) left: huge keys {:?}, small rows {:?}", left.0, left.1);
    assert_eq!(left, ((0, 0), (0, 0)), "entries left in the queue");
    let wrong: i64 = c
        .query_one(&format!("SELECT count(*) FROM tr_hk_docs WHERE v IS NULL OR v <=> embed(body) > {SAME_TEXT}"), &[])
        .unwrap()
        .get(0);
    assert_eq!(wrong, 0, "rows with huge keys without their vector");
    assert_eq!(stale_vectors(&mut c, "tr_hk_small"), 0);
}

#[test]
fn a_target_registered_while_the_worker_is_busy_is_served_too() {
    let _alone = alone();
    let mut c = connect();
    ordinary_role(&mut c, "tr_busy");
    forget(&mut c, "tr_busy_big");
    forget(&mut c, "tr_busy_new");
    let _cleanup = Cleanup(|c: &mut Client| {
        forget(c, "tr_busy_big");
        forget(c, "tr_busy_new");
    });
    // Several seconds of work for the worker (the real model, two cores).
    const BIG: i64 = 150;
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS tr_busy_big, tr_busy_new;
         CREATE TABLE tr_busy_big (id bigint PRIMARY KEY, body text, v vector(768));
         CREATE TABLE tr_busy_new (id bigint PRIMARY KEY, body text, v vector(768));
         ALTER TABLE tr_busy_new OWNER TO tr_busy;
         INSERT INTO tr_busy_big SELECT i, 'a row of the big target ' || i FROM generate_series(1, {BIG}) i;
         INSERT INTO tr_busy_new SELECT i, 'a row of the new target ' || i FROM generate_series(1, 3) i;
         SELECT embeddinggemma_async('tr_busy_big', 'body', 'v');"
    ))
    .unwrap();
    poll_until("the worker has the big target's rows in hand", secs(60), || {
        c.query_one("SELECT NOT scanning AND pending > 0 FROM embeddinggemma_async_status WHERE table_name = 'tr_busy_big'::regclass", &[])
            .unwrap()
            .get(0)
    });
    c.batch_execute("SELECT embeddinggemma_async('tr_busy_new', 'body', 'v')").unwrap();
    let pending_then = status(&mut c, "tr_busy_big").0;
    let started = Instant::now();
    assert!(wait(&mut c, "tr_busy_new", "v", "120 s"), "a target registered while the worker was busy did not drain");
    eprintln!(
        "registered with {pending_then} rows of the big target pending; drained in {:.1} s, {} pending then",
        started.elapsed().as_secs_f64(),
        status(&mut c, "tr_busy_big").0
    );
    assert_eq!(stale_vectors(&mut c, "tr_busy_new"), 0);
    assert!(wait(&mut c, "tr_busy_big", "v", DRAIN), "the big target did not drain");
    let done: i64 = c.query_one("SELECT count(v) FROM tr_busy_big", &[]).unwrap().get(0);
    assert_eq!(done, BIG);
}

/// The window of the reproduction, held open: the worker has read its targets for a
/// round and is stopped (scanning another target's table, which a session holds locked) when a
/// new target is registered and its rows queued. 0.4.0 then claimed the new target's entries in
/// that round without a target to give them to, and left them leased for ever.
#[test]
fn a_target_registered_between_a_rounds_start_and_its_claims_is_served() {
    let _alone = alone();
    let mut c = connect();
    forget(&mut c, "tr_mid_a");
    forget(&mut c, "tr_mid_b");
    let _cleanup = Cleanup(|c: &mut Client| {
        forget(c, "tr_mid_a");
        forget(c, "tr_mid_b");
    });
    c.batch_execute(
        "DROP TABLE IF EXISTS tr_mid_a, tr_mid_b;
         CREATE TABLE tr_mid_a (id bigint PRIMARY KEY, body text, v vector(768));
         CREATE TABLE tr_mid_b (id bigint PRIMARY KEY, body text, v vector(768));
         INSERT INTO tr_mid_a VALUES (1, 'a row of the first target');
         SELECT embeddinggemma_async('tr_mid_a', 'body', 'v');",
    )
    .unwrap();
    assert!(wait(&mut c, "tr_mid_a", "v", "120 s"));
    // The first target's scan (restarted by a re-embed) waits for this lock: the round has read
    // its targets and not yet claimed.
    let mut holder = connect();
    holder.batch_execute("BEGIN; LOCK TABLE tr_mid_a IN ACCESS EXCLUSIVE MODE").unwrap();
    c.batch_execute("SELECT embeddinggemma_async_reembed('tr_mid_a', 'v')").unwrap();
    poll_until("the worker waits for the first target's table", secs(30), || {
        c.query_one(
            "SELECT EXISTS (SELECT FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                             WHERE NOT l.granted AND l.relation = 'tr_mid_a'::regclass
                               AND a.backend_type LIKE 'embeddinggemma async%' AND a.backend_type <> 'embeddinggemma async launcher')",
            &[],
        )
        .unwrap()
        .get(0)
    });
    c.batch_execute(
        "SELECT embeddinggemma_async('tr_mid_b', 'body', 'v');
         INSERT INTO tr_mid_b VALUES (1, 'a row of the target registered mid-round'), (2, 'and another');",
    )
    .unwrap();
    holder.batch_execute("COMMIT").unwrap();
    assert!(wait(&mut c, "tr_mid_b", "v", "120 s"), "a target registered mid-round was never served");
    assert_eq!(stale_vectors(&mut c, "tr_mid_b"), 0);
    assert!(wait(&mut c, "tr_mid_a", "v", "120 s"));
}

// ---------------------------------------------------------------------------------------------
// Worker slots

const DATABASES: [&str; 5] = ["tr_db1", "tr_db2", "tr_db3", "tr_db4", "tr_db5"];

fn drop_databases(c: &mut Client) {
    for db in DATABASES.iter().chain(&["tr_db6", "tr_db4r"]) {
        // One statement per call: several in one string form a transaction block.
        let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
    }
}

fn db_session(db: &str) -> Client {
    Client::connect(&format!("{} dbname={db}", dsn()), NoTls).unwrap_or_else(|e| panic!("cannot connect to {db}: {e}"))
}

/// Queues `rows` new rows in `db` and waits until a worker is connected to it.
fn keep_busy(c: &mut Client, db: &str, rows: i64) {
    db_session(db)
        .batch_execute(&format!(
            "INSERT INTO docs SELECT i, 'more work for {db}, row ' || i FROM generate_series(1000, 999 + {rows}) i"
        ))
        .unwrap();
    poll_until(&format!("a worker serves {db}"), secs(60), || workers(c).iter().any(|w| w.1.as_deref() == Some(db)));
}

#[test]
fn async_workers_are_bounded_cluster_wide_and_databases_with_targets_can_be_dropped_renamed_and_copied() {
    let _alone = alone();
    let mut c = connect();
    drop_databases(&mut c);
    let _cleanup = Cleanup(drop_databases);
    for db in DATABASES {
        c.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
        db_session(db)
            .batch_execute(&format!(
                "CREATE EXTENSION embeddinggemma CASCADE;
                 CREATE TABLE docs (id bigint PRIMARY KEY, body text, v vector(768));
                 INSERT INTO docs SELECT i, 'a row of {db} ' || i FROM generate_series(1, 5) i;"
            ))
            .unwrap();
    }
    let settings = Settings::set(&mut c, &[("embeddinggemma.async_max_workers", "1")]);
    poll_until("at most one asynchronous worker runs", secs(60), || workers(&mut c).len() <= 1);
    let sampler = Sampler::start(Duration::from_millis(20), (0usize, 0usize), |c, (most, samples)| {
        *most = (*most).max(workers(c).len());
        *samples += 1;
    });
    for db in DATABASES {
        db_session(db).batch_execute("SELECT embeddinggemma_async('docs', 'body', 'v')").unwrap();
    }
    let started = Instant::now();
    for db in DATABASES {
        let mut s = db_session(db);
        assert!(wait(&mut s, "docs", "v", DRAIN), "{db} did not drain with one worker for the cluster");
        assert_eq!(stale_vectors(&mut s, "docs"), 0, "{db}");
    }
    let (most, samples) = sampler.finish();
    eprintln!(
        "5 databases drained in {:.1} s; at most {most} workers in {samples} samples",
        started.elapsed().as_secs_f64()
    );
    assert!(samples > 10, "too few samples");
    assert!(most <= 1, "{most} asynchronous workers ran with embeddinggemma.async_max_workers = 1");
    drop(settings);

    // The owner of a database, not a superuser, drops it while its worker is connected.
    c.batch_execute(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tr_dbowner') THEN CREATE ROLE tr_dbowner LOGIN CREATEDB; END IF;
         END $$;
         ALTER ROLE tr_dbowner NOSUPERUSER CREATEDB;",
    )
    .unwrap();
    c.batch_execute("ALTER DATABASE tr_db1 OWNER TO tr_dbowner").unwrap();
    keep_busy(&mut c, "tr_db1", 30);
    let mut owner = Client::connect(&format!("{} user=tr_dbowner", dsn()), NoTls).unwrap();
    if let Err(e) = owner.batch_execute("DROP DATABASE tr_db1") {
        panic!("its owner cannot drop a database with targets: {:?}", sql_error(e));
    }

    // Dropped with FORCE while it drains: no worker comes back for it.
    let oid: u32 = c.query_one("SELECT oid FROM pg_database WHERE datname = 'tr_db2'", &[]).unwrap().get(0);
    keep_busy(&mut c, "tr_db2", 60);
    let log_from = log_len();
    c.batch_execute("DROP DATABASE tr_db2 WITH (FORCE)").unwrap();
    let dropped = Instant::now();
    while dropped.elapsed() < secs(5) {
        let log = log_since(log_from);
        let again: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("does not exist") && (l.contains("tr_db2") || l.contains(&oid.to_string())))
            .collect();
        assert!(
            again.is_empty(),
            "a worker came back for the dropped database tr_db2 (oid {oid}):\n{}",
            again.join("\n")
        );
        thread::sleep(Duration::from_millis(250));
    }

    // Copied, and renamed, while their workers are connected.
    keep_busy(&mut c, "tr_db3", 30);
    if let Err(e) = c.batch_execute("CREATE DATABASE tr_db6 TEMPLATE tr_db3") {
        panic!("a database with targets cannot be copied: {:?}", sql_error(e));
    }
    keep_busy(&mut c, "tr_db4", 30);
    if let Err(e) = c.batch_execute("ALTER DATABASE tr_db4 RENAME TO tr_db4r") {
        panic!("a database with targets cannot be renamed: {:?}", sql_error(e));
    }
}

// ---------------------------------------------------------------------------------------------
// Memory

/// VmHWM of process `pid` in kB (the tests run beside the server).
fn peak_rss_kb(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.split_whitespace().next()?.parse().ok()
}

/// Three rows here; the same test with 20 rows (`generate_series(1, 20)`) is run by hand.
#[test]
fn a_huge_text_is_never_held_whole_by_the_worker() {
    let _alone = alone();
    let mut c = connect();
    owner_with_schema(&mut c, "tr_mem");
    let _cleanup = Cleanup(|c: &mut Client| {
        forget_schema(c, "tr_mem");
        let _ = c.batch_execute("DROP SCHEMA IF EXISTS tr_mem CASCADE");
    });
    let log_from = log_len();
    let sampler = Sampler::start(Duration::from_millis(50), HashMap::<i32, u64>::new(), |c, peaks| {
        for (pid, _, _) in workers(c) {
            if let Some(kb) = peak_rss_kb(pid) {
                let peak = peaks.entry(pid).or_default();
                *peak = (*peak).max(kb);
            }
        }
    });
    // 207.9 MB of text per row (about 2 MB compressed), written by an ordinary role.
    let mut owner = connect_as("tr_mem");
    owner
        .batch_execute(
            "CREATE TABLE tr_mem.docs (id bigint PRIMARY KEY, body text, v vector(768));
             SELECT embeddinggemma_async('tr_mem.docs', 'body', 'v');",
        )
        .unwrap();
    owner.batch_execute("INSERT INTO tr_mem.docs SELECT i, repeat('lorem ipsum dolor sit amet ', 7700000) FROM generate_series(1, 3) i").unwrap();
    let started = Instant::now();
    let drained = wait(&mut c, "tr_mem.docs", "v", "300 s");
    let peaks = sampler.finish();
    eprintln!(
        "3 rows of 208 MB drained ({drained}) in {:.1} s; workers' peak RSS (kB): {peaks:?}",
        started.elapsed().as_secs_f64()
    );
    assert!(drained, "the huge rows did not drain");
    let rows = c
        .query(
            "SELECT d.id, vector_norm(d.v),
                    EXISTS (SELECT FROM embeddinggemma_async_failures f WHERE f.table_name = 'tr_mem.docs'::regclass AND f.key = d.id::text)
               FROM tr_mem.docs d ORDER BY d.id",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 3);
    for r in &rows {
        let (id, norm, failed): (i64, Option<f64>, bool) = (r.get(0), r.get(1), r.get(2));
        assert!(
            norm.is_some_and(|n| (n - 1.0).abs() < 1e-3) || failed,
            "row {id}: neither embedded (norm {norm:?}) nor listed as failed"
        );
    }
    let crashes = crash_lines(&log_since(log_from));
    assert!(crashes.is_empty(), "the server log shows crashes:\n{}", crashes.join("\n"));
    assert!(!peaks.is_empty(), "no asynchronous worker was seen");
    let (pid, kb) = peaks.iter().max_by_key(|(_, kb)| **kb).map(|(p, k)| (*p, *k)).unwrap();
    assert!(kb < 512 * 1024, "worker {pid} peaked at {} MB", kb / 1024);
}
