//! The red team's findings against the asynchronous worker of 0.5.0's first draft, each kept
//! as a test (issue 26): a domain key's CHECK run as the superuser, owner code that swallows
//! its timeout, DDL hooks moved by roles that may not run the DDL, entries lost past a batch's
//! budget, retyped keys, failures shown past row-level security, advisory locks left held, a
//! terminated launcher, a dropped database's worker started again; and the second red team's
//! (DDL followed): a partition of another owner written with the target owner's rights, rows
//! of an attached partition lost to a scan that overwrote the restart; and CI's: a signal that
//! reached a thread of the worker other than its main one aborted it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use embeddinggemma_sql_tests::*;
use postgres::{Client, NoTls};

const SAME_TEXT: f64 = 1e-6;

/// Tests that change the worker's settings run alone.
static SETTINGS: Mutex<()> = Mutex::new(());

fn role(c: &mut Client, name: &str) {
    c.batch_execute(&format!(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') THEN CREATE ROLE {name} LOGIN; END IF;
         END $$;
         ALTER ROLE {name} NOSUPERUSER;
         GRANT CREATE, USAGE ON SCHEMA public TO {name};"
    ))
    .unwrap();
}

fn wait(c: &mut Client, table: &str, within: &str) -> bool {
    c.query_one(&format!("SELECT embeddinggemma_async_wait('{table}', 'v', '{within}')"), &[]).unwrap().get(0)
}

fn wrong(c: &mut Client, table: &str) -> i64 {
    c.query_one(&format!("SELECT count(*) FROM {table} WHERE v IS NULL OR v <=> embed(body) > {SAME_TEXT}"), &[])
        .unwrap()
        .get(0)
}

fn log_len() -> u64 {
    server_log().map(|p| std::fs::metadata(p).unwrap().len()).unwrap_or(0)
}

fn log_since(from: u64) -> String {
    let Some(path) = server_log() else { return String::new() };
    let bytes = std::fs::read(path).unwrap();
    String::from_utf8_lossy(&bytes[(from as usize).min(bytes.len())..]).into_owned()
}

/// Sets worker settings for a test and puts them back, even when it fails.
struct Settings<'a>(&'a mut Client, Vec<&'static str>);

impl<'a> Settings<'a> {
    fn set(c: &'a mut Client, values: &[(&'static str, &str)]) -> Self {
        for (name, value) in values {
            c.batch_execute(&format!("ALTER SYSTEM SET {name} = '{value}'")).unwrap();
        }
        c.batch_execute("SELECT pg_reload_conf()").unwrap();
        Settings(c, values.iter().map(|(n, _)| *n).collect())
    }
}

impl Drop for Settings<'_> {
    fn drop(&mut self) {
        for name in &self.1 {
            let _ = self.0.batch_execute(&format!("ALTER SYSTEM RESET {name}"));
        }
        let _ = self.0.batch_execute("SELECT pg_reload_conf()");
    }
}

#[test]
fn a_domain_keys_check_never_runs_as_the_superuser() {
    let mut admin = connect();
    role(&mut admin, "atk_domain");
    admin.batch_execute("DROP TABLE IF EXISTS atk_domain_docs; DROP DOMAIN IF EXISTS atk_evil_key; DROP FUNCTION IF EXISTS atk_escalate(int)").unwrap();
    let mut mallory = connect_as("atk_domain");
    mallory
        .batch_execute(
            "CREATE FUNCTION public.atk_escalate(int) RETURNS boolean LANGUAGE plpgsql AS $$
               BEGIN
                 IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
                   EXECUTE 'ALTER ROLE atk_domain SUPERUSER';
                 END IF;
                 RETURN true;
               END $$;
             CREATE DOMAIN public.atk_evil_key AS int CHECK (public.atk_escalate(VALUE));
             CREATE TABLE public.atk_domain_docs (id public.atk_evil_key PRIMARY KEY, body text, v vector(768));
             SELECT embeddinggemma_async('public.atk_domain_docs', 'body', 'v');
             INSERT INTO public.atk_domain_docs VALUES (1, 'a row with an evil key');",
        )
        .unwrap();
    assert!(wait(&mut mallory, "public.atk_domain_docs", "120 s"));
    let rights: bool =
        admin.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'atk_domain'", &[]).unwrap().get(0);
    admin.batch_execute("ALTER ROLE atk_domain NOSUPERUSER").unwrap();
    assert!(!rights, "the domain's CHECK ran as the superuser");
    assert_eq!(wrong(&mut admin, "atk_domain_docs"), 0);
    admin
        .batch_execute("DROP TABLE atk_domain_docs; DROP DOMAIN atk_evil_key; DROP FUNCTION atk_escalate(int)")
        .unwrap();
}

#[test]
fn owner_code_that_swallows_its_timeout_ends_and_holds_back_no_one() {
    let _alone = SETTINGS.lock().unwrap_or_else(|e| e.into_inner());
    let mut admin = connect();
    let from = log_len();
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS atk_stubborn, atk_bystander;
             CREATE TABLE atk_stubborn (id int PRIMARY KEY, body text, v vector(768));
             CREATE FUNCTION pg_temp.noop() RETURNS void LANGUAGE sql AS '';
             CREATE OR REPLACE FUNCTION atk_swallow() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                 IF NEW.v IS NULL THEN RETURN NEW; END IF;
                 LOOP
                   BEGIN PERFORM pg_catalog.pg_sleep(1000); EXCEPTION WHEN query_canceled THEN NULL; END;
                 END LOOP;
               END $$;
             CREATE TRIGGER swallow BEFORE UPDATE ON atk_stubborn FOR EACH ROW EXECUTE FUNCTION atk_swallow();
             CREATE TABLE atk_bystander (id int PRIMARY KEY, body text, v vector(768));",
        )
        .unwrap();
    let mut settings_session = connect();
    let _settings = Settings::set(&mut settings_session, &[("embeddinggemma.async_statement_timeout", "1000")]);
    admin
        .batch_execute(
            "SELECT embeddinggemma_async('atk_stubborn', 'body', 'v');
             SELECT embeddinggemma_async('atk_bystander', 'body', 'v');
             INSERT INTO atk_stubborn VALUES (1, 'this row never lets go');
             INSERT INTO atk_bystander SELECT i, 'a bystander row ' || i FROM generate_series(1, 5) i;",
        )
        .unwrap();
    assert!(wait(&mut admin, "atk_bystander", "120 s"), "another table waited for the stubborn one");
    assert_eq!(wrong(&mut admin, "atk_bystander"), 0);
    // The stubborn row: the worker ended twice in its trigger, then it is kept apart.
    assert!(wait(&mut admin, "atk_stubborn", "120 s"), "the stubborn row was never kept apart");
    let error: String = admin
        .query_one(
            "SELECT error FROM embeddinggemma_async_failures WHERE table_name = 'atk_stubborn'::regclass LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(error.contains("stopped twice"), "{error}");
    let log = log_since(from);
    assert!(
        crash_lines(&log).iter().all(|l| l.contains("exited with exit code 1")),
        "a crash: {:?}",
        crash_lines(&log)
    );
    admin.batch_execute("SELECT embeddinggemma_async_drop('atk_stubborn', 'v'); SELECT embeddinggemma_async_drop('atk_bystander', 'v'); DROP TABLE atk_stubborn, atk_bystander").unwrap();
}

#[test]
fn database_ddl_by_a_role_that_may_not_run_it_leaves_the_worker_alone() {
    let mut admin = connect();
    role(&mut admin, "atk_nobody");
    admin.batch_execute("DROP DATABASE IF EXISTS atk_victim WITH (FORCE)").unwrap();
    admin.batch_execute("CREATE DATABASE atk_victim").unwrap();
    let victim_dsn = format!("{} dbname=atk_victim", dsn());
    let mut victim = Client::connect(&victim_dsn, NoTls).unwrap();
    victim
        .batch_execute(
            "CREATE EXTENSION embeddinggemma CASCADE;
             CREATE TABLE docs (id int PRIMARY KEY, body text, v vector(768));
             CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN IF NEW.v IS NOT NULL THEN PERFORM pg_catalog.pg_sleep(0.2); END IF; RETURN NEW; END $$;
             CREATE TRIGGER slow BEFORE UPDATE ON docs FOR EACH ROW EXECUTE FUNCTION public.slow();
             SELECT embeddinggemma_async('docs', 'body', 'v');
             INSERT INTO docs SELECT i, 'victim row ' || i FROM generate_series(1, 20) i;",
        )
        .unwrap();
    let mut nobody = connect_as("atk_nobody");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline
        && !victim.query_one("SELECT embeddinggemma_async_wait('docs', 'v', '0 s')", &[]).unwrap().get::<_, bool>(0)
    {
        let (code, _, _) = expect_error(&mut nobody, "DROP DATABASE atk_victim");
        assert_eq!(code, "42501");
        let _ =
            nobody.batch_execute("SET statement_timeout = '3ms'; DROP DATABASE atk_victim; RESET statement_timeout");
        let _ = nobody.batch_execute("RESET statement_timeout");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(wait(&mut victim, "docs", "60 s"), "failed DROP DATABASE attempts held the victim's queue back");
    assert_eq!(wrong(&mut victim, "docs"), 0);
    drop(victim);
    // Its owner drops it; no worker comes back for it.
    let from = log_len();
    admin.batch_execute("DROP DATABASE atk_victim WITH (FORCE)").unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = log_since(from);
    let restarted: Vec<&str> =
        log.lines().filter(|l| l.contains("FATAL") && l.contains("database") && l.contains("does not exist")).collect();
    assert!(restarted.is_empty(), "a worker was started for the dropped database: {restarted:?}");
}

#[test]
fn rows_past_a_batchs_text_budget_and_refused_documents_are_not_lost() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS atk_big, atk_big_docs, atk_big_chunks;
         CREATE TABLE atk_big (id int PRIMARY KEY, body text, v vector(768));
         SELECT embeddinggemma_async('atk_big', 'body', 'v');
         INSERT INTO atk_big SELECT g, repeat('word' || g || ' ', 1500000) FROM generate_series(1, 5) g;
         CREATE TABLE atk_big_docs (id int PRIMARY KEY, body text);
         CREATE TABLE atk_big_chunks (doc_id int, chunk int, start_offset int, end_offset int, body text, embedding vector(768));
         SELECT embeddinggemma_async_chunks('atk_big_docs', 'atk_big_chunks');
         INSERT INTO atk_big_docs VALUES (1, repeat('chunk text ', 1600000));",
    )
    .unwrap();
    assert!(wait(&mut c, "atk_big", "300 s"));
    let embedded: i64 = c.query_one("SELECT count(v) FROM atk_big", &[]).unwrap().get(0);
    assert_eq!(embedded, 5, "rows past the first batch's budget were dropped");
    let drained: bool =
        c.query_one("SELECT embeddinggemma_async_wait('atk_big_docs', 'atk_big_chunks', '120 s')", &[]).unwrap().get(0);
    assert!(drained);
    let error: String = c
        .query_one(
            "SELECT error FROM embeddinggemma_async_failures WHERE table_name = 'atk_big_docs'::regclass LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(error.contains("bytes"), "{error}");
    c.batch_execute(
        "SELECT embeddinggemma_async_drop('atk_big', 'v'); SELECT embeddinggemma_async_drop('atk_big_docs', 'atk_big_chunks');
         DROP TABLE atk_big, atk_big_docs, atk_big_chunks;",
    )
    .unwrap();
}

#[test]
fn a_key_column_retyped_while_rows_are_queued_keeps_their_vectors_right() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS atk_retype;
         CREATE TABLE atk_retype (k int8 PRIMARY KEY, body text, v vector(768));
         SELECT embeddinggemma_async('atk_retype', 'body', 'v');
         INSERT INTO atk_retype VALUES (1, 'one'), (2, 'two'), (3, 'three');",
    )
    .unwrap();
    assert!(wait(&mut c, "atk_retype", "120 s"));
    c.batch_execute(
        "BEGIN; UPDATE atk_retype SET body = body || ' changed'; ALTER TABLE atk_retype ALTER k TYPE float8; COMMIT;",
    )
    .unwrap();
    assert!(wait(&mut c, "atk_retype", "120 s"));
    assert_eq!(wrong(&mut c, "atk_retype"), 0, "rows queued before the retype lost their vectors");
    c.batch_execute("SELECT embeddinggemma_async_drop('atk_retype', 'v'); DROP TABLE atk_retype").unwrap();
}

#[test]
fn failures_are_shown_only_to_the_tables_owner_and_advisory_locks_do_not_outlive_an_owners_work() {
    let mut admin = connect();
    role(&mut admin, "atk_reader");
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS atk_rls;
             CREATE TABLE atk_rls (id int PRIMARY KEY, body text, v vector(768));
             CREATE OR REPLACE FUNCTION atk_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                 PERFORM pg_catalog.pg_advisory_lock(4242);
                 IF NEW.v IS NOT NULL AND NEW.id = 2 THEN RAISE EXCEPTION 'secret row data: %', NEW.body; END IF;
                 RETURN NEW;
               END $$;
             CREATE TRIGGER refuse BEFORE UPDATE ON atk_rls FOR EACH ROW EXECUTE FUNCTION public.atk_refuse();
             ALTER TABLE atk_rls ENABLE ROW LEVEL SECURITY;
             CREATE POLICY mine ON atk_rls FOR SELECT USING (current_user <> 'atk_reader');
             GRANT SELECT ON atk_rls TO atk_reader;
             SELECT embeddinggemma_async('atk_rls', 'body', 'v');
             UPDATE embeddinggemma_async_targets SET max_attempts = 1 WHERE relation = 'atk_rls'::regclass;
             INSERT INTO atk_rls VALUES (1, 'fine'), (2, 'the hidden text');",
        )
        .unwrap();
    assert!(wait(&mut admin, "atk_rls", "120 s"));
    let owner_sees: i64 =
        admin.query_one("SELECT count(DISTINCT key) FROM embeddinggemma_async_failures WHERE table_name = 'atk_rls'::regclass AND key = '2'", &[]).unwrap().get(0);
    assert_eq!(owner_sees, 1, "the owner does not see the failed row");
    let mut reader = connect_as("atk_reader");
    let reader_sees: i64 = reader.query_one("SELECT count(*) FROM embeddinggemma_async_failures", &[]).unwrap().get(0);
    assert_eq!(reader_sees, 0, "a reader the table's policy hides rows from saw their errors");
    let held: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'advisory' AND a.backend_type = 'embeddinggemma async'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(held, 0, "the worker still holds an owner's advisory lock");
    admin.batch_execute("SELECT embeddinggemma_async_drop('atk_rls', 'v'); DROP TABLE atk_rls").unwrap();
}

#[test]
fn a_terminated_launcher_comes_back() {
    let _alone = SETTINGS.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = connect();
    let launcher = |c: &mut Client| -> Option<i32> {
        c.query_opt("SELECT pid FROM pg_stat_activity WHERE backend_type = 'embeddinggemma async launcher'", &[])
            .unwrap()
            .map(|r| r.get(0))
    };
    let before = launcher(&mut c).expect("no launcher");
    assert!(c.query_one("SELECT pg_terminate_backend($1)", &[&before]).unwrap().get::<_, bool>(0));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if launcher(&mut c).is_some_and(|pid| pid != before) {
            break;
        }
        assert!(Instant::now() < deadline, "the launcher did not come back");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A partition (or a chunk table) owned by another role than the target's table: the worker
/// writes through the parent as the parent's owner, which would fire that role's triggers with
/// the owner's rights, whenever that role inserts a row. Refused at ATTACH; a later change of
/// owner makes the worker refuse to write (the rows fail), never run the trigger.
#[test]
fn a_partition_of_another_owner_is_never_written_with_the_targets_rights() {
    let _settings = SETTINGS.lock().unwrap_or_else(|e| e.into_inner());
    let mut admin = connect();
    role(&mut admin, "atk_tenant");
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS atk_parts, atk_tenant_part CASCADE;
             DROP FUNCTION IF EXISTS atk_tenant_escalate();
             CREATE TABLE atk_parts (id int PRIMARY KEY, body text, v vector(768)) PARTITION BY RANGE (id);
             CREATE TABLE atk_parts_low PARTITION OF atk_parts FOR VALUES FROM (0) TO (100);
             SELECT embeddinggemma_async('atk_parts', 'body', 'v');
             CREATE TABLE atk_tenant_part (id int NOT NULL, body text, v vector(768));
             ALTER TABLE atk_tenant_part OWNER TO atk_tenant;",
        )
        .unwrap();
    let (code, message, hint) = expect_error(
        &mut admin,
        "ALTER TABLE atk_parts ATTACH PARTITION atk_tenant_part FOR VALUES FROM (100) TO (200)",
    );
    assert_eq!(code, "42501", "{message}");
    assert!(hint.is_some_and(|h| h.contains("OWNER TO")), "{message}");
    // Made by the owner, then handed to the tenant.
    admin
        .batch_execute(
            "CREATE TABLE atk_parts_high PARTITION OF atk_parts FOR VALUES FROM (100) TO (200);
             ALTER TABLE atk_parts_high OWNER TO atk_tenant;
             UPDATE embeddinggemma_async_targets SET max_attempts = 1 WHERE relation = 'atk_parts'::regclass;",
        )
        .unwrap();
    let mut tenant = connect_as("atk_tenant");
    tenant
        .batch_execute(
            "CREATE FUNCTION public.atk_tenant_escalate() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN EXECUTE 'ALTER ROLE atk_tenant SUPERUSER'; RETURN NEW; END $$;
             CREATE TRIGGER escalate BEFORE UPDATE ON atk_parts_high FOR EACH ROW EXECUTE FUNCTION public.atk_tenant_escalate();
             INSERT INTO atk_parts_high VALUES (150, 'a tenant row', NULL);",
        )
        .unwrap();
    assert!(wait(&mut admin, "atk_parts", "120 s"));
    let superuser: bool =
        admin.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'atk_tenant'", &[]).unwrap().get(0);
    assert!(!superuser, "the worker ran a partition owner's trigger with the target owner's rights");
    let failed: String = admin
        .query_one(
            "SELECT coalesce(string_agg(DISTINCT error, '; '), '') FROM embeddinggemma_async_failures
              WHERE table_name = 'atk_parts'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(failed.contains("not owned by the owner"), "{failed}");
    admin
        .batch_execute(
            "SELECT embeddinggemma_async_drop('atk_parts', 'v'); DROP TABLE atk_parts, atk_tenant_part;
             DROP FUNCTION atk_tenant_escalate();",
        )
        .unwrap();
}

/// Partitions attached one after another while the worker scans for the first: each attach
/// restarts the scan, and the worker's end of a scan never overwrites a restart it did not see.
#[test]
fn rows_of_partitions_attached_while_the_worker_scans_are_all_embedded() {
    let mut admin = connect();
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS atk_scan CASCADE;
             CREATE TABLE atk_scan (k int PRIMARY KEY, body text, v vector(768)) PARTITION BY RANGE (k);
             CREATE TABLE atk_scan_0 PARTITION OF atk_scan FOR VALUES FROM (0) TO (10);
             SELECT embeddinggemma_async('atk_scan', 'body', 'v');",
        )
        .unwrap();
    for i in 1..=4 {
        admin
            .batch_execute(&format!(
                "CREATE TABLE atk_scan_{i} (k int NOT NULL, body text, v vector(768));
                 INSERT INTO atk_scan_{i} VALUES ({a}, 'attached row {a}'), ({b}, 'attached row {b}');
                 ALTER TABLE atk_scan ATTACH PARTITION atk_scan_{i} FOR VALUES FROM ({a}) TO ({c});",
                a = i * 10,
                b = i * 10 + 1,
                c = i * 10 + 10
            ))
            .unwrap();
    }
    assert!(wait(&mut admin, "atk_scan", "120 s"));
    assert_eq!(wrong(&mut admin, "atk_scan"), 0, "rows of an attached partition were left without a vector");
    admin.batch_execute("SELECT embeddinggemma_async_drop('atk_scan', 'v'); DROP TABLE atk_scan").unwrap();
}

extern "C" {
    /// glibc's wrapper of the tgkill system call: a signal to one thread of a process.
    fn tgkill(tgid: i32, tid: i32, sig: i32) -> i32;
}

/// Every thread the extension starts in the worker blocks PostgreSQL's signals. One delivered
/// to such a thread runs the worker's handler there, and pgrx aborts the process when
/// PostgreSQL is called off the main thread; the postmaster then restarts the whole cluster.
/// Found by CI: the watchdog of owner code was started with signals unblocked, and a terminate
/// that reached it crashed the server. Here SIGHUP, SIGINT and SIGTERM go to each other thread
/// of the worker, again and again, while it runs a slow owner trigger (the watchdog alive).
#[test]
fn a_signal_to_any_thread_of_the_worker_never_crashes_the_cluster() {
    const SIGNALS: [i32; 3] = [1, 2, 15]; // SIGHUP, SIGINT, SIGTERM
    let mut c = connect();
    let from = log_len();
    c.batch_execute(
        "DROP TABLE IF EXISTS sg_docs;
         CREATE TABLE sg_docs (id bigint PRIMARY KEY, body text, v vector(768));
         CREATE OR REPLACE FUNCTION sg_slow() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.v IS NOT NULL THEN PERFORM pg_sleep(0.2); END IF; RETURN NEW; END $$;
         CREATE TRIGGER sg_slow BEFORE UPDATE ON sg_docs FOR EACH ROW EXECUTE FUNCTION sg_slow();
         INSERT INTO sg_docs SELECT i, 'a row written slowly ' || i FROM generate_series(1, 30) i;
         SELECT embeddinggemma_async('sg_docs', 'body', 'v');",
    )
    .unwrap();
    let embedded = |c: &mut Client| -> i64 { c.query_one("SELECT count(v) FROM sg_docs", &[]).unwrap().get(0) };
    let mut signalled = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while embedded(&mut c) < 30 {
        assert!(Instant::now() < deadline, "the rows were not all embedded");
        let workers: Vec<i32> = c
            .query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'embeddinggemma async'", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for pid in workers {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
            for tid in tasks.filter_map(|t| t.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
                if tid == pid {
                    continue;
                }
                for signal in SIGNALS {
                    // SAFETY: a signal to one thread of the worker process.
                    unsafe { tgkill(pid, tid, signal) };
                }
                signalled.insert(tid);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("signalled {} threads of the worker", signalled.len());
    assert!(!signalled.is_empty(), "the worker never had a thread besides its main one to signal");
    // A panic that only ended its thread is a defect too (the worker lost its watchdog).
    let log = log_since(from);
    let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked at")).collect();
    assert!(panics.is_empty(), "a signal made a thread of the worker panic: {panics:?}");
    // (A worker or launcher that another test terminates exits with code 1: no crash.)
    let crashes: Vec<String> =
        crash_lines(&log).into_iter().filter(|l| !l.contains("exited with exit code 1")).collect();
    assert!(crashes.is_empty(), "a signal crashed the server: {crashes:?}");
    assert!(wait(&mut c, "sg_docs", "120 s"));
    assert_eq!(wrong(&mut c, "sg_docs"), 0);
    c.batch_execute("SELECT embeddinggemma_async_drop('sg_docs', 'v'); DROP TABLE sg_docs; DROP FUNCTION sg_slow()")
        .unwrap();
}
