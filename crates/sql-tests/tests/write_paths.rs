//! Triggers, backfill and statistics against a real server, with the real model.

use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

use embeddinggemma_engine::{planner, DeviceChoice, Engine, EngineOptions, DEFAULT_MAX_BATCH_SIZE};
use embeddinggemma_sql_tests::*;
use postgres::Client;

/// Same text embedded alone or in a batch: the engine's batch-invariance bound.
const SAME_TEXT: f64 = 1e-6;

/// Asserts that every row's vector equals `embed()` of its text; returns how many were checked.
fn assert_vectors_match_embed(client: &mut Client, table: &str, filter: &str) -> usize {
    let rows = client
        .query(&format!("SELECT id, body, v::real[], embed(body)::real[] FROM {table} WHERE {filter}"), &[])
        .unwrap();
    for row in &rows {
        let id: i64 = row.get(0);
        let (stored, fresh): (Option<Vec<f32>>, Option<Vec<f32>>) = (row.get(2), row.get(3));
        match (stored, fresh) {
            (None, None) => {}
            (Some(s), Some(f)) => {
                let d = cosine_distance(&s, &f);
                assert!(d <= SAME_TEXT, "{table} id {id}: stored vector is {d:e} from embed(body)");
            }
            (s, _) => panic!(
                "{table} id {id}: stored {:?} but body is {:?}",
                s.map(|_| "vector"),
                row.get::<_, Option<String>>(1)
            ),
        }
    }
    rows.len()
}

fn sentences(n: usize) -> Vec<String> {
    const SUBJECTS: [&str; 5] = ["The database", "A vector index", "Every backend", "The planner", "This trigger"];
    const VERBS: [&str; 4] = ["stores", "embeds", "ranks", "updates"];
    (0..n).map(|i| format!("{} {} row number {i} quickly.", SUBJECTS[i % 5], VERBS[i % 4])).collect()
}

#[test]
fn row_trigger_embeds_writes_and_skips_unchanged_text() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS rt_docs;
         CREATE TABLE rt_docs (id bigint PRIMARY KEY, body text, other int DEFAULT 0, v vector(768));
         CREATE TRIGGER rt_docs_embed BEFORE INSERT OR UPDATE ON rt_docs
            FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v');
         INSERT INTO rt_docs (id, body) VALUES (1, 'Mars is red.'), (2, NULL), (3, '');",
    )
    .unwrap();
    assert_eq!(assert_vectors_match_embed(&mut c, "rt_docs", "true"), 3);
    assert!(c.query_one("SELECT v IS NULL FROM rt_docs WHERE id = 2", &[]).unwrap().get::<_, bool>(0));

    let before: i64 = stat(&mut c, "forward_passes");
    c.batch_execute("UPDATE rt_docs SET other = other + 1").unwrap();
    assert_eq!(stat::<i64>(&mut c, "forward_passes"), before, "an UPDATE of another column ran the model");

    c.batch_execute(
        "UPDATE rt_docs SET body = 'Venus is hot.' WHERE id = 1; UPDATE rt_docs SET body = 'now text' WHERE id = 2;",
    )
    .unwrap();
    assert_eq!(stat::<i64>(&mut c, "forward_passes"), before + 2);
    assert_vectors_match_embed(&mut c, "rt_docs", "true");
    c.batch_execute("UPDATE rt_docs SET body = NULL WHERE id = 1").unwrap();
    assert!(c.query_one("SELECT v IS NULL FROM rt_docs WHERE id = 1", &[]).unwrap().get::<_, bool>(0));

    // Task and dimension arguments.
    c.batch_execute(
        "CREATE TEMP TABLE rt_small (id bigint PRIMARY KEY, body text, v vector(128));
         CREATE TRIGGER e BEFORE INSERT ON rt_small FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v', 'query', '128');
         INSERT INTO rt_small VALUES (1, 'red planet');",
    )
    .unwrap();
    let (stored, want): (Vec<f32>, Vec<f32>) = {
        let r = c.query_one("SELECT v::real[], embed(body, 'query', 128)::real[] FROM rt_small", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert!(cosine_distance(&stored, &want) <= SAME_TEXT);
}

#[test]
fn trigger_misuse_names_the_column_or_the_rule() {
    let mut c = connect();
    c.batch_execute("CREATE TEMP TABLE bad (id int, body text, n int, v vector(768), w vector(128))").unwrap();
    let cases = [
        ("embeddinggemma_trigger('nope', 'v')", "42703", "source column \"nope\" does not exist"),
        ("embeddinggemma_trigger('body', 'nope')", "42703", "target column \"nope\" does not exist"),
        ("embeddinggemma_trigger('n', 'v')", "42804", "source column \"n\" of \"bad\" is integer, not text"),
        ("embeddinggemma_trigger('body', 'n')", "42804", "target column \"n\" of \"bad\" is integer, not vector"),
        ("embeddinggemma_trigger('body', 'w')", "42804", "is vector(128), but dim is 768"),
        ("embeddinggemma_trigger('body')", "09000", "takes a source column, a target column"),
    ];
    for (i, (call, code, text)) in cases.iter().enumerate() {
        c.batch_execute(&format!("CREATE TRIGGER t{i} BEFORE INSERT ON bad FOR EACH ROW EXECUTE FUNCTION {call}"))
            .unwrap();
        let (got_code, msg, _) = expect_error(&mut c, "INSERT INTO bad (id, body) VALUES (1, 'x')");
        assert_eq!((got_code.as_str(), msg.contains(text)), (*code, true), "{call}: {msg}");
        c.batch_execute(&format!("DROP TRIGGER t{i} ON bad")).unwrap();
    }
    c.batch_execute(
        "CREATE TRIGGER late AFTER INSERT ON bad FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v')",
    )
    .unwrap();
    let (code, msg, hint) = expect_error(&mut c, "INSERT INTO bad (id, body) VALUES (1, 'x')");
    assert_eq!(code, "09000");
    assert!(msg.contains("BEFORE INSERT OR UPDATE"), "{msg}");
    assert!(hint.unwrap().contains("CREATE TRIGGER"));
}

#[test]
fn statement_trigger_embeds_300_docstrings_in_few_passes() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS st_docs, st_source;
         CREATE TABLE st_source (id bigint PRIMARY KEY, body text);
         CREATE TABLE st_docs (id bigint PRIMARY KEY, body text, v vector(768));
         CREATE TRIGGER st_docs_embed AFTER INSERT ON st_docs REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v');
         CREATE TRIGGER st_docs_reembed AFTER UPDATE ON st_docs REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v');",
    )
    .unwrap();
    for (i, body) in docstrings(300).iter().enumerate() {
        c.execute("INSERT INTO st_source VALUES ($1, $2)", &[&(i as i64), body]).unwrap();
    }
    c.batch_execute("SELECT embeddinggemma_stats_reset()").unwrap();
    let started = Instant::now();
    c.batch_execute("INSERT INTO st_docs SELECT id, body FROM st_source").unwrap();
    let took = started.elapsed();
    let passes: i64 = stat(&mut c, "forward_passes");
    let (texts, fill): (i64, f64) = (stat(&mut c, "texts"), stat(&mut c, "fill_ratio"));
    eprintln!("INSERT … SELECT of 300 docstrings: {passes} forward passes, {texts} texts, fill {fill:.3}, {took:?}");
    assert_eq!(texts, 300);
    assert!(passes <= 30, "{passes} forward passes for 300 rows");
    // Same vectors as embed(): the shortest, the longest (truncated) and others between.
    let checked = assert_vectors_match_embed(
        &mut c,
        "st_docs",
        "id % 15 = 0 OR length(body) = (SELECT max(length(body)) FROM st_docs)",
    );
    assert!(checked >= 20);
    assert_eq!(c.query_one("SELECT count(*) FROM st_docs WHERE v IS NULL", &[]).unwrap().get::<_, i64>(0), 0);

    // Retrieval with halfvec (issue 29): top-10 of 50 queries through an HNSW index over the
    // vectors in half precision, against exact search over the float ones.
    c.batch_execute(
        "ALTER TABLE st_docs ADD COLUMN h halfvec(768);
         UPDATE st_docs SET h = v::halfvec;
         CREATE INDEX st_docs_h ON st_docs USING hnsw (h halfvec_cosine_ops);
         DROP TABLE IF EXISTS st_queries;
         CREATE TABLE st_queries AS SELECT id, embed(left(body, 80), 'query') AS q FROM st_docs WHERE id >= 100 AND id < 150;",
    )
    .unwrap();
    let mut found = 0i64;
    for row in c.query("SELECT q::text FROM st_queries", &[]).unwrap() {
        let q: String = row.get(0);
        let mut t = c.transaction().unwrap();
        t.batch_execute("SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off").unwrap();
        let exact: Vec<i64> = t
            .query("SELECT id FROM st_docs ORDER BY v <=> $1::text::vector LIMIT 10", &[&q])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        t.commit().unwrap();
        let mut t = c.transaction().unwrap();
        t.batch_execute("SET LOCAL enable_seqscan = off").unwrap();
        let plan: String = t
            .query("EXPLAIN SELECT id FROM st_docs ORDER BY h <=> $1::text::halfvec LIMIT 10", &[&q])
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        assert!(plan.contains("st_docs_h"), "the halfvec search did not use its index: {plan}");
        let approximate: Vec<i64> = t
            .query("SELECT id FROM st_docs ORDER BY h <=> $1::text::halfvec LIMIT 10", &[&q])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        t.commit().unwrap();
        found += exact.iter().filter(|id| approximate.contains(id)).count() as i64;
    }
    let recall = found as f64 / 500.0;
    eprintln!("halfvec HNSW recall@10 against exact vector search, 50 queries over 300 docstrings: {recall:.3}");
    assert!(recall >= 0.99, "halfvec recall@10 {recall:.3}");
    c.batch_execute("DROP TABLE st_queries; DROP INDEX st_docs_h; ALTER TABLE st_docs DROP COLUMN h").unwrap();

    // An UPDATE re-embeds only rows whose text changed, in one pass.
    c.batch_execute("SELECT embeddinggemma_stats_reset(); UPDATE st_docs SET body = 'changed ' || id WHERE id < 5; UPDATE st_docs SET id = id WHERE id >= 5;").unwrap();
    assert_eq!((stat::<i64>(&mut c, "texts"), stat::<i64>(&mut c, "forward_passes")), (5, 1));
    assert_vectors_match_embed(&mut c, "st_docs", "id < 5");
}

#[test]
fn statement_trigger_follows_key_changes_and_null_text() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS sk_docs;
         CREATE TABLE sk_docs (id bigint PRIMARY KEY DEFERRABLE, body text, v vector(768));
         CREATE TRIGGER e AFTER INSERT ON sk_docs REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v');
         CREATE TRIGGER r AFTER UPDATE ON sk_docs REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v');
         INSERT INTO sk_docs VALUES (1, 'one'), (2, 'two'), (3, 'three'), (4, NULL);
         UPDATE sk_docs SET id = id + 10, body = body || ' moved' WHERE id = 1;
         -- Swapping two keys (checked at statement end) gives each key the other's text.
         UPDATE sk_docs SET id = CASE id WHEN 2 THEN 3 ELSE 2 END WHERE id IN (2, 3);
         UPDATE sk_docs SET body = NULL WHERE id = 11;
         UPDATE sk_docs SET body = 'four' WHERE id = 4;",
    )
    .unwrap();
    assert!(c.query_one("SELECT v IS NULL FROM sk_docs WHERE id = 11", &[]).unwrap().get::<_, bool>(0));
    assert_eq!(assert_vectors_match_embed(&mut c, "sk_docs", "true"), 4);
    // Transition tables may have any names; without one the trigger says how to declare it.
    c.batch_execute(
        "CREATE TEMP TABLE sk_named (id int PRIMARY KEY, body text, v vector(768));
         CREATE TRIGGER e AFTER INSERT ON sk_named REFERENCING NEW TABLE AS inserted
            FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v');
         INSERT INTO sk_named VALUES (1, 'x');
         CREATE TEMP TABLE sk_bad (id int PRIMARY KEY, body text, v vector(768));
         CREATE TRIGGER e AFTER INSERT ON sk_bad FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v');",
    )
    .unwrap();
    let named: Vec<f32> = c.query_one("SELECT v::real[] FROM sk_named", &[]).unwrap().get(0);
    assert!(cosine_distance(&named, &embed(&mut c, "x", "document", 768)) <= SAME_TEXT);
    let (code, msg, hint) = expect_error(&mut c, "INSERT INTO sk_bad VALUES (1, 'x')");
    assert_eq!(code, "09000", "{msg}");
    assert!(hint.unwrap().contains("REFERENCING NEW TABLE AS new_rows"));
}

/// A table of `n` rows to backfill, with an audit of every committed write of `v`.
fn backfill_table(c: &mut Client, name: &str, n: usize) {
    c.batch_execute(&format!(
        "DELETE FROM embeddinggemma_backfill_progress WHERE relation = to_regclass('{name}');
         DROP TABLE IF EXISTS {name}, {name}_audit;
         CREATE TABLE {name} (id bigint PRIMARY KEY, body text, v vector(768));
         CREATE TABLE {name}_audit (id bigint, at timestamptz DEFAULT clock_timestamp());
         CREATE OR REPLACE FUNCTION {name}_audit() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO {name}_audit (id) VALUES (NEW.id); RETURN NULL; END $$;
         CREATE TRIGGER audit AFTER UPDATE ON {name} FOR EACH ROW
            WHEN (OLD.v IS DISTINCT FROM NEW.v) EXECUTE FUNCTION {name}_audit();
         CREATE TRIGGER keep_fresh BEFORE UPDATE ON {name} FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v');"
    ))
    .unwrap();
    let bodies = sentences(n);
    let ids: Vec<i64> = (1..=n as i64).collect();
    c.execute(
        &format!("INSERT INTO {name} (id, body) SELECT * FROM unnest($1::bigint[], $2::text[])"),
        &[&ids, &bodies],
    )
    .unwrap();
}

fn progress(c: &mut Client, table: &str) -> (i64, i64) {
    let r = c
        .query_one(
            "SELECT coalesce(sum(rows_done), 0)::bigint, count(*) FROM embeddinggemma_backfills WHERE relation = $1::text::regclass",
            &[&table],
        )
        .unwrap();
    (r.get(0), r.get(1))
}

fn audit_counts(c: &mut Client, table: &str) -> HashMap<i64, i64> {
    c.query(&format!("SELECT id, count(*) FROM {table}_audit GROUP BY id"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn start_backfill(table: &'static str, batch: i32) -> (i32, thread::JoinHandle<Result<(), postgres::Error>>) {
    let mut c = connect();
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let handle = thread::spawn(move || {
        c.batch_execute(&format!("CALL embeddinggemma_backfill('{table}', 'body', 'v', batch_size => {batch})"))
    });
    (pid, handle)
}

#[test]
fn backfill_survives_terminations_and_embeds_every_row_once() {
    // Three terminations, each after at least one more committed batch of 50, and still rows
    // left for the last run: 400 rows leave room for three batches a round.
    const N: usize = 400;
    let mut c = connect();
    backfill_table(&mut c, "bf_docs", N);
    let mut done_before = 0;
    for round in 1..=3 {
        let (pid, handle) = start_backfill("bf_docs", 50);
        // Wait for at least one more committed batch, then kill the session mid-run.
        let deadline = Instant::now() + Duration::from_secs(300);
        while progress(&mut c, "bf_docs").0 <= done_before {
            assert!(Instant::now() < deadline, "round {round}: no progress");
            thread::sleep(Duration::from_millis(100));
        }
        // Kill it inside a call of the engine, not between batches.
        wait_until_embedding(&mut c, pid);
        assert!(c.query_one("SELECT pg_terminate_backend($1, 10000)", &[&pid]).unwrap().get::<_, bool>(0));
        assert!(handle.join().unwrap().is_err(), "round {round}: the backfill was not interrupted");
        done_before = progress(&mut c, "bf_docs").0;
        eprintln!("round {round}: terminated after {done_before} rows committed");
        assert!(done_before < N as i64, "round {round}: the backfill finished before it was terminated");
    }
    let mut last = connect();
    last.batch_execute("SELECT embeddinggemma_stats_reset()").unwrap();
    // CALL alone: several statements in one query string form a transaction block, where a
    // procedure cannot COMMIT.
    last.batch_execute("CALL embeddinggemma_backfill('bf_docs', 'body', 'v', batch_size => 50)").unwrap();

    let (rows_done, runs) = progress(&mut c, "bf_docs");
    assert_eq!((rows_done, runs), (N as i64, 4), "committed rows over all runs");
    let last_run: i64 = c
        .query_one("SELECT rows_done FROM embeddinggemma_backfills WHERE relation = 'bf_docs'::regclass ORDER BY started_at DESC LIMIT 1", &[])
        .unwrap()
        .get(0);
    assert_eq!(stat::<i64>(&mut last, "texts"), last_run, "the last run's texts counter and its committed rows");
    let audit = audit_counts(&mut c, "bf_docs");
    assert_eq!(audit.len(), N, "rows embedded");
    assert!(
        audit.values().all(|&n| n == 1),
        "a row was embedded twice: {:?}",
        audit.iter().filter(|(_, &n)| n > 1).collect::<Vec<_>>()
    );
    assert_eq!(assert_vectors_match_embed(&mut c, "bf_docs", "true"), N);
}

#[test]
fn two_sessions_backfill_one_table_without_overlap_and_a_third_sees_progress() {
    // Six batches of 50 rows: each session claims several while the third one edits.
    const N: usize = 300;
    let mut c = connect();
    backfill_table(&mut c, "bf_one", N);
    let started = Instant::now();
    c.batch_execute("CALL embeddinggemma_backfill('bf_one', 'body', 'v', batch_size => 50)").unwrap();
    let one = started.elapsed();

    backfill_table(&mut c, "bf_two", N);
    let started = Instant::now();
    let (_, a) = start_backfill("bf_two", 50);
    let (_, b) = start_backfill("bf_two", 50);
    // A third session watches, and changes some texts while the backfill runs.
    let mut seen_running = false;
    let mut edited: i64 = 0;
    while !(a.is_finished() && b.is_finished()) {
        let r = c.query_one("SELECT count(*) FILTER (WHERE running), coalesce(sum(rows_done), 0)::bigint FROM embeddinggemma_backfills WHERE relation = 'bf_two'::regclass", &[]).unwrap();
        if r.get::<_, i64>(0) > 0 && r.get::<_, i64>(1) > 0 {
            seen_running = true;
        }
        if edited < 20 {
            edited += 1;
            c.execute("UPDATE bf_two SET body = body || ' (edited)' WHERE id = $1", &[&(1 + edited * 29 % N as i64)])
                .unwrap();
        }
        thread::sleep(Duration::from_millis(200));
    }
    a.join().unwrap().unwrap();
    b.join().unwrap().unwrap();
    let two = started.elapsed();
    eprintln!("backfill of {N} rows: one session {one:?}, two sessions {two:?}");
    assert!(seen_running, "a third session never saw the backfill running");

    let per_run: Vec<i64> = c
        .query("SELECT rows_done FROM embeddinggemma_backfills WHERE relation = 'bf_two'::regclass", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(per_run.len(), 2);
    assert!(per_run.iter().all(|&n| n > 0), "one session did nothing: {per_run:?}");
    // Each row was written by exactly one session, plus the re-embedding of edited rows.
    let audit = audit_counts(&mut c, "bf_two");
    assert_eq!(audit.len(), N);
    let twice = audit.values().filter(|&&n| n > 1).count();
    assert!(twice <= edited as usize, "{twice} rows written more than once, {edited} edited");
    // Edited rows not yet backfilled were embedded by the trigger instead.
    let claimed: i64 = per_run.iter().sum();
    assert!(claimed <= N as i64 && claimed >= N as i64 - edited, "rows claimed by the sessions: {claimed}");
    // No vector is stale, edited rows included.
    assert_eq!(assert_vectors_match_embed(&mut c, "bf_two", "true"), N);
}

#[test]
fn backfill_of_a_partitioned_table_writes_each_row_its_own_vector() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS bp_docs;
         CREATE TABLE bp_docs (id bigint, body text, v vector(768)) PARTITION BY RANGE (id);
         CREATE TABLE bp_docs_a PARTITION OF bp_docs FOR VALUES FROM (0) TO (100);
         CREATE TABLE bp_docs_b PARTITION OF bp_docs FOR VALUES FROM (100) TO (200);
         INSERT INTO bp_docs (id, body) VALUES (1, 'first partition'), (2, 'also the first'), (101, 'second partition'), (102, NULL);
         -- the second partition's first row already has a vector: it must not be overwritten
         UPDATE bp_docs SET v = embed('keep me') WHERE id = 101;",
    )
    .unwrap();
    c.batch_execute("CALL embeddinggemma_backfill('bp_docs', 'body', 'v')").unwrap();
    let kept: Vec<f32> = c.query_one("SELECT v::real[] FROM bp_docs WHERE id = 101", &[]).unwrap().get(0);
    assert!(cosine_distance(&kept, &embed(&mut c, "keep me", "document", 768)) <= SAME_TEXT);
    assert_vectors_match_embed(&mut c, "bp_docs", "id <> 101");
    let done: i64 = c
        .query_one("SELECT rows_done FROM embeddinggemma_backfills WHERE relation = 'bp_docs'::regclass", &[])
        .unwrap()
        .get(0);
    assert_eq!(done, 2);
}

#[test]
fn stats_report_what_the_planner_did() {
    let texts: Vec<String> = docstrings(40).into_iter().skip(20).collect();
    let engine =
        Engine::load(&real_model_dir(), &EngineOptions { device: DeviceChoice::Cpu, ..EngineOptions::default() })
            .unwrap();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let lengths: Vec<usize> = engine.tokenize(&refs, "document").unwrap().iter().map(|t| t.ids.len()).collect();

    let mut c = connect_in_process();
    c.batch_execute("SET embeddinggemma.max_batch_tokens = 2048; SELECT embeddinggemma_stats_reset()").unwrap();
    c.query("SELECT count(*) FROM embed_batch($1::text[])", &[&texts]).unwrap();
    let plan = planner::plan(&lengths, 2048, DEFAULT_MAX_BATCH_SIZE);
    assert!(plan.buckets.len() > 1);
    assert_eq!(stat::<i64>(&mut c, "forward_passes"), plan.buckets.len() as i64);
    assert_eq!(stat::<i64>(&mut c, "real_tokens"), plan.real_tokens as i64);
    // The CPU kernels run each bucket packed: the positions computed are the real tokens.
    let computed = engine.computed_tokens(plan.real_tokens, plan.padded_tokens);
    assert_eq!(computed, plan.real_tokens, "the CPU path computes padding");
    assert_eq!(stat::<i64>(&mut c, "padded_tokens"), computed as i64);
    assert!((stat::<f64>(&mut c, "fill_ratio") - 1.0).abs() < 1e-12);
    assert_eq!(stat::<i64>(&mut c, "texts"), 20);
    assert_eq!(stat::<i64>(&mut c, "calls"), 1);
    let memory: Option<f64> = stat(&mut c, "model_memory_mb");
    assert!(memory.unwrap() > 300.0);
    assert_eq!(stat::<Option<String>>(&mut c, "device").as_deref(), Some("cpu"));
}
