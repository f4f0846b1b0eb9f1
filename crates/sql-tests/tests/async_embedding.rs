//! Issue 18: asynchronous embedding. Writes only record; the database's worker embeds the
//! queue through the service, as the table's owner; failures are kept apart and retried;
//! nothing is lost when the service, the worker or the server dies; the model a target's
//! vectors came from is recorded, and a change of it marks the target stale. With the real
//! model on the main test server (the service preloaded), except where a test stops things:
//! those use the service suite's server, one at a time.

use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use embeddinggemma_sql_tests::*;
use postgres::{Client, NoTls};

/// Tests that stop the service, the worker or the server run alone.
static DISRUPTIVE: Mutex<()> = Mutex::new(());

fn service_dsn() -> String {
    std::env::var("EMBEDDINGGEMMA_TEST_SERVICE_DSN")
        .expect("EMBEDDINGGEMMA_TEST_SERVICE_DSN is not set: run the SQL tests through scripts/test")
}

fn wait(c: &mut Client, table: &str, within: &str) -> bool {
    c.query_one(&format!("SELECT embeddinggemma_async_wait('{table}', 'v', timeout => '{within}')"), &[])
        .unwrap()
        .get(0)
}

fn status(c: &mut Client, table: &str) -> (i64, i64, bool) {
    let r = c
        .query_one(
            &format!(
                "SELECT pending, failed, stale FROM embeddinggemma_async_status WHERE table_name = '{table}'::regclass"
            ),
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

fn fresh_table(c: &mut Client, table: &str, rows: i64) {
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table};
         CREATE TABLE {table} (id bigint PRIMARY KEY, body text, n int DEFAULT 0, v vector(768));
         INSERT INTO {table} (id, body) SELECT i, 'existing row ' || i FROM generate_series(1, {rows}) i;"
    ))
    .unwrap();
}

#[test]
fn writes_only_record_and_the_worker_embeds_every_row_as_embed_would() {
    let mut c = connect();
    fresh_table(&mut c, "as_docs", 40);
    // Rows present at registration are queued too.
    let id: i32 = c.query_one("SELECT embeddinggemma_async('as_docs', 'body', 'v')", &[]).unwrap().get(0);
    assert!(id > 0);
    assert!(wait(&mut c, "as_docs", "120 s"), "the backlog did not drain");
    assert_eq!(stale_vectors(&mut c, "as_docs"), 0);
    // A write records and returns: this session embeds nothing itself.
    c.batch_execute("SELECT embeddinggemma_stats_reset()").unwrap();
    c.batch_execute(
        "INSERT INTO as_docs (id, body) VALUES (100, 'a new row'), (101, NULL);
         UPDATE as_docs SET body = 'changed text' WHERE id = 1;
         UPDATE as_docs SET n = n + 1 WHERE id = 2;
         UPDATE as_docs SET id = 200 WHERE id = 3;
         DELETE FROM as_docs WHERE id = 4;",
    )
    .unwrap();
    assert_eq!(stat::<i64>(&mut c, "texts"), 0, "the writing session embedded");
    let cleared: bool = c.query_one("SELECT v IS NULL FROM as_docs WHERE id = 1", &[]).unwrap().get(0);
    assert!(cleared, "a changed text kept its stale vector");
    let kept: bool = c.query_one("SELECT v IS NOT NULL FROM as_docs WHERE id = 2", &[]).unwrap().get(0);
    assert!(kept, "an update of another column touched the vector");
    assert!(wait(&mut c, "as_docs", "120 s"));
    assert_eq!(stale_vectors(&mut c, "as_docs"), 0);
    let (pending, failed, is_stale) = status(&mut c, "as_docs");
    assert_eq!((pending, failed, is_stale), (0, 0, false));
    let model: String = c
        .query_one("SELECT model::text FROM embeddinggemma_async_status WHERE table_name = 'as_docs'::regclass", &[])
        .unwrap()
        .get(0);
    let model: serde_json::Value = serde_json::from_str(&model).unwrap();
    assert_eq!(model["dim"], 768, "{model}");
    assert!(model["weights_sha256"].is_string(), "{model}");
    c.batch_execute("SELECT embeddinggemma_async_drop('as_docs', 'v')").unwrap();
    let triggers: i64 =
        c.query_one("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'as_docs'::regclass", &[]).unwrap().get(0);
    assert_eq!(triggers, 0);
}

#[test]
fn a_row_whose_write_fails_is_kept_apart_and_blocks_nothing() {
    let mut c = connect();
    fresh_table(&mut c, "af_docs", 10);
    c.batch_execute(
        "CREATE OR REPLACE FUNCTION af_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF NEW.v IS NOT NULL AND NEW.body = 'refused row' THEN RAISE EXCEPTION 'af_refuse: no vector for this row'; END IF;
             RETURN NEW;
           END $$;
         CREATE TRIGGER refuse BEFORE UPDATE ON af_docs FOR EACH ROW EXECUTE FUNCTION af_refuse();
         UPDATE af_docs SET body = 'refused row' WHERE id = 5;",
    )
    .unwrap();
    c.batch_execute("SELECT embeddinggemma_async('af_docs', 'body', 'v')").unwrap();
    // The refused row is retried with backoff (1, 2, 4, 8 s), then kept as failed.
    assert!(wait(&mut c, "af_docs", "120 s"), "pending rows never drained");
    let rows = c
        .query(
            "SELECT key, error, attempts FROM embeddinggemma_async_failures WHERE table_name = 'af_docs'::regclass",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 1, "failures: {rows:?}");
    let (key, error, attempts): (String, String, i32) = (rows[0].get(0), rows[0].get(1), rows[0].get(2));
    eprintln!("failed row {key}: {error} after {attempts} attempts");
    assert_eq!(key, "5");
    assert!(error.contains("af_refuse"), "{error}");
    let others: i64 = c.query_one("SELECT count(*) FROM af_docs WHERE id <> 5 AND v IS NULL", &[]).unwrap().get(0);
    assert_eq!(others, 0, "other rows were held back");
    assert_eq!(status(&mut c, "af_docs").1, 1);
    c.batch_execute("SELECT embeddinggemma_async_drop('af_docs', 'v')").unwrap();
}

#[test]
fn a_row_updated_or_deleted_while_it_is_embedded_ends_with_its_latest_text() {
    let mut c = connect();
    fresh_table(&mut c, "ar_docs", 0);
    c.batch_execute("SELECT embeddinggemma_async('ar_docs', 'body', 'v')").unwrap();
    // Writes keep coming while the worker embeds: every text of row 1 is its latest for a while.
    let mut writer = connect();
    for round in 0..30 {
        writer
            .execute(
                "INSERT INTO ar_docs (id, body) VALUES ($1, $2)",
                &[&(1000 + round as i64), &format!("row {round}")],
            )
            .unwrap();
        writer
            .execute(
                "INSERT INTO ar_docs (id, body) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                &[&format!("version {round} of row one")],
            )
            .unwrap();
        if round % 3 == 0 {
            writer.execute("DELETE FROM ar_docs WHERE id = $1", &[&(1000 + round as i64)]).unwrap();
        }
        thread::sleep(Duration::from_millis(50));
    }
    assert!(wait(&mut c, "ar_docs", "120 s"));
    assert_eq!(stale_vectors(&mut c, "ar_docs"), 0, "a row kept the vector of an earlier text");
    let body: String = c.query_one("SELECT body FROM ar_docs WHERE id = 1", &[]).unwrap().get(0);
    assert_eq!(body, "version 29 of row one");
    c.batch_execute("SELECT embeddinggemma_async_drop('ar_docs', 'v')").unwrap();
}

#[test]
fn a_chunk_table_is_kept_in_step_asynchronously() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS ac_chunks, ac_docs;
         CREATE TABLE ac_docs (id bigint PRIMARY KEY, body text);
         CREATE TABLE ac_chunks (doc_id bigint REFERENCES ac_docs ON DELETE CASCADE, chunk int, start_offset int, end_offset int,
                                 body text, embedding vector(768), PRIMARY KEY (doc_id, chunk));
         INSERT INTO ac_docs SELECT i, repeat('Sentence ' || i || ' of an existing document. ', 40) FROM generate_series(1, 3) i;",
    )
    .unwrap();
    c.batch_execute("SELECT embeddinggemma_async_chunks('ac_docs', 'ac_chunks', max_tokens => 64, overlap => 8)")
        .unwrap();
    c.batch_execute("INSERT INTO ac_docs VALUES (10, repeat('A new document sentence. ', 30)); UPDATE ac_docs SET body = 'short now' WHERE id = 2").unwrap();
    let done: bool = c
        .query_one("SELECT embeddinggemma_async_wait('ac_docs', 'ac_chunks', timeout => '180 s')", &[])
        .unwrap()
        .get(0);
    assert!(done);
    let wrong: i64 = c
        .query_one(
            "WITH want AS (SELECT d.id AS doc_id, e.* FROM ac_docs d, embed_chunks(d.body, 64, 8) e)
             SELECT count(*) FROM want w FULL JOIN ac_chunks g USING (doc_id, chunk)
              WHERE w.body IS DISTINCT FROM g.body OR g.embedding IS NULL OR w.embedding IS NULL OR (w.embedding <=> g.embedding) > 1e-6",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(wrong, 0, "chunk rows that differ from embed_chunks() of the current text");
    c.batch_execute("SELECT embeddinggemma_async_drop('ac_docs', 'ac_chunks')").unwrap();
}

#[test]
fn only_the_owner_registers_and_no_role_writes_the_queue() {
    let mut c = connect();
    fresh_table(&mut c, "ao_docs", 3);
    c.batch_execute("GRANT SELECT, UPDATE ON ao_docs TO PUBLIC").unwrap();
    let mut user = connect_as_ordinary_user();
    let (code, msg, _) = expect_error(&mut user, "SELECT embeddinggemma_async('ao_docs', 'body', 'v')");
    assert_eq!(code, "42501", "{msg}");
    for sql in [
        "INSERT INTO embeddinggemma_async_queue (target_id, key) VALUES (1, '1')",
        "DELETE FROM embeddinggemma_async_queue",
        "UPDATE embeddinggemma_async_targets SET keep_stale = true",
        "SELECT * FROM embeddinggemma_async_queue",
    ] {
        let (code, msg, _) = expect_error(&mut user, sql);
        assert_eq!(code, "42501", "{sql}: {msg}");
    }
    // A role that may write the table queues its rows through the trigger, and nothing else.
    c.batch_execute("SELECT embeddinggemma_async('ao_docs', 'body', 'v')").unwrap();
    user.batch_execute("UPDATE ao_docs SET body = 'written by an ordinary role' WHERE id = 1").unwrap();
    assert!(wait(&mut c, "ao_docs", "120 s"));
    assert_eq!(stale_vectors(&mut c, "ao_docs"), 0);
    c.batch_execute("SELECT embeddinggemma_async_drop('ao_docs', 'v')").unwrap();
}

/// A session on the service suite's server.
fn service_session() -> Client {
    Client::connect(&service_dsn(), NoTls).unwrap()
}

fn service_pid(c: &mut Client) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let r = c.query_one("SELECT state, pid FROM embeddinggemma_service", &[]).unwrap();
        let (state, pid): (String, Option<i32>) = (r.get(0), r.get(1));
        if state == "running" {
            return pid.unwrap();
        }
        assert!(Instant::now() < deadline, "the service is {state}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn worker_pid(c: &mut Client) -> Option<i32> {
    c.query_opt("SELECT pid FROM pg_stat_activity WHERE backend_type = 'embeddinggemma async'", &[])
        .unwrap()
        .map(|r| r.get(0))
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

#[test]
fn nothing_is_lost_when_the_service_or_the_worker_dies_mid_drain() {
    let _alone = DISRUPTIVE.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = service_session();
    let service = service_pid(&mut c);
    // More rows than one claim (1,024 entries), so that the kill comes between batches.
    const N: i64 = 1300;
    fresh_table(&mut c, "ak_docs", N);
    c.batch_execute("SELECT embeddinggemma_async('ak_docs', 'body', 'v')").unwrap();
    let embedded = |c: &mut Client| -> i64 { c.query_one("SELECT count(v) FROM ak_docs", &[]).unwrap().get(0) };
    let deadline = Instant::now() + Duration::from_secs(120);
    while embedded(&mut c) == 0 {
        assert!(Instant::now() < deadline, "the worker never wrote");
        thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: a signal to the service process, a child of the server's supervisor.
    assert_eq!(unsafe { libc_kill(service, 9) }, 0);
    let at_kill = embedded(&mut c);
    let deadline = Instant::now() + Duration::from_secs(120);
    let worker = loop {
        if let Some(pid) = worker_pid(&mut c) {
            break pid;
        }
        assert!(Instant::now() < deadline, "no worker");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(c.query_one("SELECT pg_terminate_backend($1)", &[&worker]).unwrap().get::<_, bool>(0));
    eprintln!("killed the service with {at_kill} of {N} rows embedded, then terminated the worker");
    assert!(at_kill < N, "the drain ended before the kill");
    assert!(wait(&mut c, "ak_docs", "300 s"), "the queue did not drain after the kill");
    assert_eq!(stale_vectors(&mut c, "ak_docs"), 0);
    let (pending, failed, _) = status(&mut c, "ak_docs");
    assert_eq!((pending, failed), (0, 0), "rows failed because the service died");
    c.batch_execute("SELECT embeddinggemma_async_drop('ak_docs', 'v')").unwrap();
}

#[test]
fn a_change_of_model_marks_the_target_stale_until_it_is_re_embedded() {
    let _alone = DISRUPTIVE.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = service_session();
    service_pid(&mut c);
    fresh_table(&mut c, "am_docs", 20);
    c.batch_execute("SELECT embeddinggemma_async('am_docs', 'body', 'v')").unwrap();
    assert!(wait(&mut c, "am_docs", "120 s"));
    let settled = |c: &mut Client| -> Option<serde_json::Value> {
        let model: Option<String> = c
            .query_one(
                "SELECT model::text FROM embeddinggemma_async_status WHERE table_name = 'am_docs'::regclass",
                &[],
            )
            .unwrap()
            .get(0);
        model.map(|m| serde_json::from_str(&m).unwrap())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while settled(&mut c).is_none() {
        assert!(Instant::now() < deadline, "the target never recorded its model");
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(settled(&mut c).unwrap()["dtype"], "f32");
    // The server's dtype changes: the service restarts in bf16 and the worker notices.
    c.batch_execute("ALTER SYSTEM SET embeddinggemma.dtype = 'bf16'").unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !status(&mut service_session(), "am_docs").2 {
        assert!(Instant::now() < deadline, "the target never became stale");
        thread::sleep(Duration::from_millis(100));
    }
    let mut bf16 = service_session();
    bf16.batch_execute("SELECT embeddinggemma_async_reembed('am_docs', 'v')").unwrap();
    assert!(wait(&mut bf16, "am_docs", "180 s"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&mut bf16, "am_docs").2 {
        assert!(Instant::now() < deadline, "still stale after the re-embed");
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(settled(&mut bf16).unwrap()["dtype"], "bf16");
    assert_eq!(stale_vectors(&mut bf16, "am_docs"), 0, "vectors are not the bf16 model's");
    bf16.batch_execute("ALTER SYSTEM RESET embeddinggemma.dtype").unwrap();
    bf16.batch_execute("SELECT pg_reload_conf()").unwrap();
    service_pid(&mut service_session());
    service_session().batch_execute("SELECT embeddinggemma_async_drop('am_docs', 'v')").unwrap();
}

#[test]
fn nothing_is_lost_when_the_server_restarts_immediately_mid_drain() {
    let _alone = DISRUPTIVE.lock().unwrap_or_else(|e| e.into_inner());
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the SQL tests through scripts/test"))
    };
    let (pg_bin, data, user) = (
        var("EMBEDDINGGEMMA_TEST_PG_BIN"),
        var("EMBEDDINGGEMMA_TEST_SERVICE_DATA"),
        var("EMBEDDINGGEMMA_TEST_PG_USER"),
    );
    let mut c = service_session();
    service_pid(&mut c);
    const N: i64 = 1300;
    fresh_table(&mut c, "ai_docs", N);
    c.batch_execute("SELECT embeddinggemma_async('ai_docs', 'body', 'v')").unwrap();
    let embedded = |c: &mut Client| -> i64 { c.query_one("SELECT count(v) FROM ai_docs", &[]).unwrap().get(0) };
    let deadline = Instant::now() + Duration::from_secs(120);
    while embedded(&mut c) == 0 {
        assert!(Instant::now() < deadline, "the worker never wrote");
        thread::sleep(Duration::from_millis(20));
    }
    drop(c);
    // A crash of the whole server: no shutdown, recovery at the next start.
    let restarted = std::process::Command::new("sudo")
        .args([
            "-u",
            &user,
            "-H",
            &format!("{pg_bin}/pg_ctl"),
            "-D",
            &data,
            "-l",
            &format!("{data}/server.log"),
            "-m",
            "immediate",
            "-w",
            "restart",
        ])
        .status()
        .unwrap();
    assert!(restarted.success(), "pg_ctl restart -m immediate: {restarted}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut c = loop {
        if let Ok(c) = Client::connect(&service_dsn(), NoTls) {
            break c;
        }
        assert!(Instant::now() < deadline, "the server did not come back");
        thread::sleep(Duration::from_millis(100));
    };
    let at_restart = embedded(&mut c);
    eprintln!("server restarted immediately with {at_restart} of {N} rows embedded");
    assert!(at_restart < N, "the drain ended before the restart");
    assert!(wait(&mut c, "ai_docs", "300 s"), "the queue did not drain after the restart");
    assert_eq!(stale_vectors(&mut c, "ai_docs"), 0);
    assert_eq!(status(&mut c, "ai_docs").1, 0, "rows failed because the server restarted");
    c.batch_execute("SELECT embeddinggemma_async_drop('ai_docs', 'v')").unwrap();
}
