//! What every supported PostgreSQL version must do, run against each (issue 29): on 18 against
//! the main test server, on 15 and 17 against servers whose extension was installed from its
//! Debian package (`scripts/test packages`). Parity with the reference, the three triggers, the
//! backfill, chunking, the service, an asynchronous target, and the update from the previous
//! release. `EMBEDDINGGEMMA_TEST_PG_MAJOR`, where set, is the major version the server must be.

use embeddinggemma_sql_tests::*;

const F32_TOLERANCE: f64 = 1e-5;
/// Same text, same model, another batch or process: the engine's batch-invariance bound
/// (`stale_vectors` uses it too).
const SAME_TEXT: f64 = 1e-6;

#[test]
fn the_server_is_the_version_under_test_with_the_service_serving() {
    let mut c = connect();
    let version: i32 = c.query_one("SELECT current_setting('server_version_num')::int", &[]).unwrap().get(0);
    eprintln!("server_version_num {version}");
    if let Ok(major) = std::env::var("EMBEDDINGGEMMA_TEST_PG_MAJOR") {
        assert_eq!(version / 10000, major.parse::<i32>().unwrap(), "not the server under test");
    }
    let extension: String =
        c.query_one("SELECT extversion FROM pg_extension WHERE extname = 'embeddinggemma'", &[]).unwrap().get(0);
    assert_eq!(extension, env!("CARGO_PKG_VERSION"));
    // The recommended configuration: the cluster's service embeds for this session, which
    // loads no model of its own.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let state: String = c.query_one("SELECT state FROM embeddinggemma_service", &[]).unwrap().get(0);
        if state == "running" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the service is {state}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    c.batch_execute("SELECT embed('served')").unwrap();
    assert_eq!(stat::<i64>(&mut c, "model_loads"), 0, "this session loaded a model instead of using the service");
    assert_eq!(stat::<i64>(&mut c, "texts"), 1);
}

#[test]
fn embed_and_embed_batch_match_the_reference() {
    let mut c = connect();
    let mut worst = assert_reference_cases_through_embed(&mut c, F32_TOLERANCE);
    let cases = reference_cases();
    let inputs: Vec<String> = cases.iter().map(|c| format!("{}{}", c.prompt, c.text)).collect();
    let rows = c
        .query("SELECT ord, embedding::real[] FROM embed_batch($1::text[], 'none', 768) ORDER BY ord", &[&inputs])
        .unwrap();
    assert_eq!(rows.len(), cases.len());
    for (row, case) in rows.iter().zip(&cases) {
        let d = cosine_distance(&row.get::<_, Vec<f32>>(1), &case.embedding);
        assert!(d <= F32_TOLERANCE, "embed_batch {}: cosine distance {d:e}", case.label());
        worst = worst.max(d);
    }
    eprintln!("69 cases through embed and embed_batch: worst cosine distance {worst:e}");
}

#[test]
fn the_row_and_statement_triggers_and_the_backfill_fill_their_targets() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS sv_row, sv_statement, sv_backfill;
         CREATE TABLE sv_row (id bigint PRIMARY KEY, body text, v vector(768));
         CREATE TRIGGER sv_row_embed BEFORE INSERT OR UPDATE ON sv_row
            FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v');
         CREATE TABLE sv_statement (id bigint PRIMARY KEY, body text, v vector(768));
         CREATE TRIGGER sv_statement_embed AFTER INSERT ON sv_statement REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v');
         CREATE TRIGGER sv_statement_reembed AFTER UPDATE ON sv_statement
            REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v');
         CREATE TABLE sv_backfill (id bigint PRIMARY KEY, body text, v vector(768));
         INSERT INTO sv_row SELECT i, 'row trigger text ' || i FROM generate_series(1, 12) i;
         INSERT INTO sv_row VALUES (13, NULL);
         UPDATE sv_row SET body = 'changed ' || id WHERE id <= 3;
         INSERT INTO sv_statement SELECT i, 'statement trigger text ' || i FROM generate_series(1, 30) i;
         UPDATE sv_statement SET body = 'changed ' || id WHERE id % 7 = 0;
         INSERT INTO sv_backfill SELECT i, 'backfilled text ' || i FROM generate_series(1, 120) i;",
    )
    .unwrap();
    c.batch_execute("CALL embeddinggemma_backfill('sv_backfill', 'body', 'v', batch_size => 50)").unwrap();
    for table in ["sv_row", "sv_statement", "sv_backfill"] {
        let filled: i64 = c.query_one(&format!("SELECT count(v) FROM {table}"), &[]).unwrap().get(0);
        assert!(filled >= 12, "{table}: {filled} vectors");
        assert_eq!(stale_vectors(&mut c, table), 0, "{table}");
    }
    let done: i64 = c
        .query_one("SELECT rows_done FROM embeddinggemma_backfills WHERE relation = 'sv_backfill'::regclass", &[])
        .unwrap()
        .get(0);
    assert_eq!(done, 120);
    c.batch_execute("DROP TABLE sv_row, sv_statement, sv_backfill").unwrap();
}

#[test]
fn a_chunk_table_is_kept_in_step_with_its_documents() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS sv_chunks, sv_docs;
         CREATE TABLE sv_docs (id bigint PRIMARY KEY, body text);
         CREATE TABLE sv_chunks (
            doc_id bigint REFERENCES sv_docs ON DELETE CASCADE ON UPDATE CASCADE,
            chunk int, start_offset int, end_offset int, body text, embedding vector(768),
            PRIMARY KEY (doc_id, chunk));
         CREATE TRIGGER sv_docs_chunks AFTER INSERT OR UPDATE OR DELETE ON sv_docs
            FOR EACH ROW EXECUTE FUNCTION embeddinggemma_chunk_trigger('id', 'body', 'sv_chunks', 'doc_id', 32, 8);",
    )
    .unwrap();
    let long: String = docstrings(3).join(" ");
    c.execute("INSERT INTO sv_docs VALUES (1, $1), (2, 'a short document')", &[&long]).unwrap();
    let chunks: i64 = c.query_one("SELECT count(*) FROM sv_chunks WHERE doc_id = 1", &[]).unwrap().get(0);
    let expected: i64 = c.query_one("SELECT count(*) FROM chunks($1, 32, 8)", &[&long]).unwrap().get(0);
    assert!(expected > 1, "the document fits one chunk");
    assert_eq!(chunks, expected);
    let wrong: i64 = c
        .query_one(
            "SELECT count(*) FROM sv_chunks c JOIN sv_docs d ON d.id = c.doc_id
              WHERE c.body <> substr(d.body, c.start_offset, c.end_offset - c.start_offset)
                 OR c.embedding OPERATOR(public.<=>) embed(c.body) > $1",
            &[&SAME_TEXT],
        )
        .unwrap()
        .get(0);
    assert_eq!(wrong, 0, "chunks that are not their document's text or its embedding");
    c.batch_execute("DELETE FROM sv_docs WHERE id = 1").unwrap();
    let left: i64 = c.query_one("SELECT count(*) FROM sv_chunks", &[]).unwrap().get(0);
    assert_eq!(left, 1);
    c.batch_execute("DROP TABLE sv_chunks, sv_docs").unwrap();
}

#[test]
fn an_asynchronous_target_drains() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS sv_async;
         CREATE TABLE sv_async (id bigint PRIMARY KEY, body text, v vector(768));
         INSERT INTO sv_async SELECT i, 'queued before registration ' || i FROM generate_series(1, 20) i;
         SELECT embeddinggemma_async('sv_async', 'body', 'v');
         INSERT INTO sv_async SELECT i, 'queued after registration ' || i FROM generate_series(21, 40) i;
         UPDATE sv_async SET body = 'changed' WHERE id = 1;",
    )
    .unwrap();
    let drained: bool =
        c.query_one("SELECT embeddinggemma_async_wait('sv_async', 'v', timeout => '300 s')", &[]).unwrap().get(0);
    assert!(drained, "the queue did not drain");
    assert_eq!(stale_vectors(&mut c, "sv_async"), 0);
    let (pending, failed): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT pending, failed FROM embeddinggemma_async_status WHERE table_name = 'sv_async'::regclass",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((pending, failed), (0, 0));
    c.batch_execute("SELECT embeddinggemma_async_drop('sv_async', 'v'); DROP TABLE sv_async").unwrap();
}

/// The previous release, created in a database of its own with a target recorded as it records
/// one (a row of the targets table and its trigger), updated to this one: the target drains.
#[test]
fn the_previous_release_updates_to_this_one() {
    let mut admin = connect();
    let mut c = fresh_database(&mut admin, "eg_versions_update");
    c.batch_execute(
        "CREATE EXTENSION vector;
         CREATE EXTENSION embeddinggemma VERSION '0.4.0';
         CREATE TABLE docs (id bigint PRIMARY KEY, body text, v vector(768));
         INSERT INTO docs SELECT i, 'present at registration ' || i FROM generate_series(1, 5) i;",
    )
    .unwrap();
    record_target_as_0_4_0(&mut c, "docs");
    c.batch_execute("INSERT INTO docs SELECT i, 'written on 0.4.0 ' || i FROM generate_series(6, 8) i").unwrap();
    c.batch_execute("ALTER EXTENSION embeddinggemma UPDATE").unwrap();
    let version: String =
        c.query_one("SELECT extversion FROM pg_extension WHERE extname = 'embeddinggemma'", &[]).unwrap().get(0);
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    c.batch_execute("INSERT INTO docs SELECT i, 'written after the update ' || i FROM generate_series(9, 10) i")
        .unwrap();
    let drained: bool =
        c.query_one("SELECT embeddinggemma_async_wait('docs', 'v', timeout => '300 s')", &[]).unwrap().get(0);
    assert!(drained, "the target did not drain after the update");
    assert_eq!(stale_vectors(&mut c, "docs"), 0);
    drop(c);
    admin.batch_execute("DROP DATABASE eg_versions_update WITH (FORCE)").unwrap();
}
