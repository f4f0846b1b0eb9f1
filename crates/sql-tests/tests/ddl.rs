//! Asynchronous targets follow their table through DDL (issue 27): renamed columns keep the
//! target working (in this session and in others that wrote before), a dropped table or column
//! removes the target with a NOTICE instead of breaking every later write or leaving a target
//! that spins the worker, a retyped source is embedded again, partitioned tables are served
//! through their parent, and registration refuses what the worker cannot serve.

use embeddinggemma_sql_tests::*;
use postgres::Client;

const SAME_TEXT: f64 = 1e-6;

fn wait(c: &mut Client, table: &str, target: &str) -> bool {
    c.query_one(&format!("SELECT embeddinggemma_async_wait('{table}', '{target}', '120 s')"), &[]).unwrap().get(0)
}

fn targets_on(c: &mut Client, table_oid: u32) -> i64 {
    c.query_one(
        "SELECT count(*) FROM embeddinggemma_async_targets WHERE relation::oid = $1",
        &[&postgres::types::Oid::from(table_oid)],
    )
    .unwrap()
    .get(0)
}

fn wrong(c: &mut Client, table: &str, text: &str, vector: &str) -> i64 {
    c.query_one(
        &format!("SELECT count(*) FROM {table} WHERE {vector} IS NULL OR {vector} <=> embed({text}) > {SAME_TEXT}"),
        &[],
    )
    .unwrap()
    .get(0)
}

#[test]
fn renamed_columns_keep_an_async_target_working_in_every_session() {
    let mut c = connect();
    let mut other = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS dr_docs;
         CREATE TABLE dr_docs (id int PRIMARY KEY, body text, v vector(768));
         INSERT INTO dr_docs VALUES (1, 'before the rename', NULL);
         SELECT embeddinggemma_async('dr_docs', 'body', 'v');",
    )
    .unwrap();
    // Another session writes before the rename (its trigger caches the target's columns).
    other.batch_execute("INSERT INTO dr_docs VALUES (2, 'written by another session', NULL)").unwrap();
    assert!(wait(&mut c, "dr_docs", "v"));
    c.batch_execute(
        "ALTER TABLE dr_docs RENAME COLUMN body TO content;
         ALTER TABLE dr_docs RENAME COLUMN v TO embedding;
         ALTER TABLE dr_docs RENAME COLUMN id TO doc_id;",
    )
    .unwrap();
    c.batch_execute("INSERT INTO dr_docs VALUES (3, 'after the rename', NULL); UPDATE dr_docs SET content = 'changed after the rename' WHERE doc_id = 1")
        .unwrap();
    other.batch_execute("INSERT INTO dr_docs VALUES (4, 'another session after the rename', NULL)").unwrap();
    let target: String = c
        .query_one("SELECT target FROM embeddinggemma_async_status WHERE table_name = 'dr_docs'::regclass", &[])
        .unwrap()
        .get(0);
    assert_eq!(target, "embedding", "the target did not follow the rename");
    assert!(wait(&mut c, "dr_docs", "embedding"), "the renamed target did not drain");
    assert_eq!(wrong(&mut c, "dr_docs", "content", "embedding"), 0);
    c.batch_execute("SELECT embeddinggemma_async_drop('dr_docs', 'embedding'); DROP TABLE dr_docs").unwrap();
}

#[test]
fn dropping_the_vector_column_or_the_table_removes_the_target_with_a_notice() {
    let (mut c, notices) = connect_collecting_notices(&dsn());
    c.batch_execute(
        "DROP TABLE IF EXISTS dd_docs, dd_gone;
         CREATE TABLE dd_docs (id int PRIMARY KEY, body text, v vector(768));
         CREATE TABLE dd_gone (id int PRIMARY KEY, body text, v vector(768));
         SELECT embeddinggemma_async('dd_docs', 'body', 'v');
         SELECT embeddinggemma_async('dd_gone', 'body', 'v');
         INSERT INTO dd_gone SELECT i, 'row ' || i FROM generate_series(1, 5) i;",
    )
    .unwrap();
    let docs: u32 = c.query_one("SELECT 'dd_docs'::regclass::oid", &[]).unwrap().get(0);
    let gone: u32 = c.query_one("SELECT 'dd_gone'::regclass::oid", &[]).unwrap().get(0);
    c.batch_execute("ALTER TABLE dd_docs DROP COLUMN v").unwrap();
    assert_eq!(targets_on(&mut c, docs), 0, "the target of a dropped vector column is still there");
    // Writes go on: no trigger of the removed target is left to fail them.
    c.batch_execute("INSERT INTO dd_docs VALUES (1, 'written after the drop')").unwrap();
    c.batch_execute("DROP TABLE dd_gone").unwrap();
    assert_eq!(targets_on(&mut c, gone), 0, "the target of a dropped table is still there");
    let queued: i64 = c
        .query_one("SELECT count(*) FROM embeddinggemma_async_queue q WHERE NOT EXISTS (SELECT FROM embeddinggemma_async_targets t WHERE t.id = q.target_id)", &[])
        .unwrap()
        .get(0);
    assert_eq!(queued, 0, "queue entries of removed targets are left");
    let said = notices.lock().unwrap().clone();
    assert!(said.iter().any(|n| n.contains("removed") && n.contains("\"v\" was dropped")), "{said:?}");
    assert!(said.iter().any(|n| n.contains("removed") && n.contains("table was dropped")), "{said:?}");
    c.batch_execute("DROP TABLE dd_docs").unwrap();
}

#[test]
fn registration_refuses_what_the_worker_cannot_serve() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS dg_plain CASCADE;
         DROP VIEW IF EXISTS dg_view;
         CREATE TABLE dg_plain (id int PRIMARY KEY, body text, v vector(768));
         CREATE VIEW dg_view AS SELECT * FROM dg_plain;
         CREATE TEMP TABLE dg_temp (id int PRIMARY KEY, body text, v vector(768));",
    )
    .unwrap();
    for table in ["dg_view", "dg_temp"] {
        let (code, message, hint) =
            expect_error(&mut c, &format!("SELECT embeddinggemma_async('{table}', 'body', 'v')"));
        eprintln!("{table}: {code} {message} / {hint:?}");
        assert!(code == "42809" || code == "42P17" || code == "42P01", "{table}: {code} {message}");
        assert!(hint.is_some(), "{table}: no hint");
    }
    c.batch_execute("DROP TABLE dg_plain CASCADE").unwrap();
}

/// A partitioned table registered once: rows of every partition, present and future, are
/// embedded, through the parent.
#[test]
fn a_partitioned_table_is_served_through_its_parent() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS dp_docs CASCADE;
         CREATE TABLE dp_docs (id int PRIMARY KEY, body text, v vector(768)) PARTITION BY RANGE (id);
         CREATE TABLE dp_low PARTITION OF dp_docs FOR VALUES FROM (0) TO (100);
         CREATE TABLE dp_high PARTITION OF dp_docs FOR VALUES FROM (100) TO (200);
         INSERT INTO dp_docs VALUES (1, 'a row there before', NULL), (150, 'another row there before', embed('not its text'));
         SELECT embeddinggemma_async('dp_docs', 'body', 'v');
         INSERT INTO dp_docs VALUES (2, 'written after registration', NULL), (151, 'written to the other partition', NULL);
         CREATE TABLE dp_later PARTITION OF dp_docs FOR VALUES FROM (200) TO (300);
         INSERT INTO dp_docs VALUES (250, 'a partition made after registration', NULL);",
    )
    .unwrap();
    assert!(wait(&mut c, "dp_docs", "v"));
    c.batch_execute("UPDATE dp_docs SET body = 'changed in a partition' WHERE id = 151; UPDATE dp_later SET body = 'changed through the partition' WHERE id = 250")
        .unwrap();
    assert!(wait(&mut c, "dp_docs", "v"));
    let rows: i64 = c.query_one("SELECT count(*) FROM dp_docs", &[]).unwrap().get(0);
    assert_eq!(rows, 5);
    assert_eq!(wrong(&mut c, "dp_docs", "body", "v"), 0, "a partition's rows were not embedded from their text");
    c.batch_execute("SELECT embeddinggemma_async_drop('dp_docs', 'v'); DROP TABLE dp_docs").unwrap();
}

/// A table attached with `ATTACH PARTITION` after registration: its rows were written without
/// the target's trigger; those without a vector are queued, the vectors it brought are kept,
/// and the target then claims no model for them.
#[test]
fn rows_of_an_attached_partition_are_queued() {
    let (mut c, notices) = connect_collecting_notices(&dsn());
    c.batch_execute(
        "DROP TABLE IF EXISTS da_docs, da_old CASCADE;
         CREATE TABLE da_docs (id int PRIMARY KEY, body text, v vector(768)) PARTITION BY RANGE (id);
         CREATE TABLE da_new PARTITION OF da_docs FOR VALUES FROM (100) TO (200);
         INSERT INTO da_docs VALUES (150, 'a row of the new partition', NULL);
         SELECT embeddinggemma_async('da_docs', 'body', 'v');",
    )
    .unwrap();
    assert!(wait(&mut c, "da_docs", "v"));
    c.batch_execute(
        "CREATE TABLE da_old (id int PRIMARY KEY, body text, v vector(768));
         INSERT INTO da_old VALUES (1, 'an archived row', NULL), (2, 'another archived row', NULL), (3, 'an archived row with a vector', embed('its own text elsewhere'));
         ALTER TABLE da_docs ATTACH PARTITION da_old FOR VALUES FROM (0) TO (100);",
    )
    .unwrap();
    assert!(notices.lock().unwrap().iter().any(|n| n.contains("attached")), "{:?}", notices.lock().unwrap());
    assert!(wait(&mut c, "da_docs", "v"));
    let missing: i64 = c
        .query_one("SELECT count(*) FROM da_docs WHERE id < 3 AND (v IS NULL OR v <=> embed(body) > 1e-6)", &[])
        .unwrap()
        .get(0);
    assert_eq!(missing, 0, "rows of an attached partition were not embedded");
    let kept: bool = c
        .query_one("SELECT v <=> embed('its own text elsewhere') < 1e-6 FROM da_docs WHERE id = 3", &[])
        .unwrap()
        .get(0);
    assert!(kept, "a vector the partition brought was replaced");
    let model: Option<String> = c
        .query_one("SELECT model::text FROM embeddinggemma_async_status WHERE table_name = 'da_docs'::regclass", &[])
        .unwrap()
        .get(0);
    assert!(model.is_none(), "the target claims a model for a vector it did not write: {model:?}");
    c.batch_execute("SELECT embeddinggemma_async_drop('da_docs', 'v'); DROP TABLE da_docs").unwrap();
}

/// One target per column: a partition's own target and its parent's would both write it.
#[test]
fn a_column_a_parents_target_writes_cannot_have_a_second_target() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS dd_docs CASCADE;
         CREATE TABLE dd_docs (id int PRIMARY KEY, body text, v vector(768)) PARTITION BY RANGE (id);
         CREATE TABLE dd_part PARTITION OF dd_docs FOR VALUES FROM (0) TO (100);
         SELECT embeddinggemma_async('dd_part', 'body', 'v', 'query');",
    )
    .unwrap();
    let (code, message, hint) = expect_error(&mut c, "SELECT embeddinggemma_async('dd_docs', 'body', 'v')");
    assert_eq!(code, "42710", "{message}");
    assert!(message.contains("dd_part") && hint.is_some_and(|h| h.contains("embeddinggemma_async_drop")), "{message}");
    c.batch_execute("SELECT embeddinggemma_async_drop('dd_part', 'v'); DROP TABLE dd_docs").unwrap();
}

/// `ALTER COLUMN … TYPE … USING` rewrites texts without firing a row trigger: the target
/// embeds every row again.
#[test]
fn retyping_the_source_column_embeds_every_row_again() {
    let (mut c, notices) = connect_collecting_notices(&dsn());
    c.batch_execute(
        "DROP TABLE IF EXISTS drt_docs;
         CREATE TABLE drt_docs (id int PRIMARY KEY, body varchar(100), v vector(768));
         INSERT INTO drt_docs VALUES (1, 'quiet words'), (2, 'more quiet words');
         SELECT embeddinggemma_async('drt_docs', 'body', 'v');",
    )
    .unwrap();
    assert!(wait(&mut c, "drt_docs", "v"));
    c.batch_execute("ALTER TABLE drt_docs ALTER COLUMN body TYPE text USING upper(body)").unwrap();
    assert!(wait(&mut c, "drt_docs", "v"));
    assert_eq!(wrong(&mut c, "drt_docs", "body", "v"), 0, "texts rewritten by ALTER TYPE kept their old vectors");
    assert!(notices.lock().unwrap().iter().any(|n| n.contains("retyped")), "{:?}", notices.lock().unwrap());
    c.batch_execute("SELECT embeddinggemma_async_drop('drt_docs', 'v'); DROP TABLE drt_docs").unwrap();
}

/// keep_existing => true: vectors already there stay (and the target claims no model for
/// them); rows without one are embedded; a re-embed then makes every vector its own.
#[test]
fn keep_existing_keeps_vectors_and_claims_no_model_for_them() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS dke_docs;
         CREATE TABLE dke_docs (id int PRIMARY KEY, body text, v vector(768));
         INSERT INTO dke_docs VALUES (1, 'kept as it was', embed('a vector of another text')), (2, 'no vector yet', NULL);
         SELECT embeddinggemma_async('dke_docs', 'body', 'v', keep_existing => true);",
    )
    .unwrap();
    assert!(wait(&mut c, "dke_docs", "v"));
    let kept: bool = c
        .query_one("SELECT v <=> embed('a vector of another text') < 1e-6 FROM dke_docs WHERE id = 1", &[])
        .unwrap()
        .get(0);
    assert!(kept, "keep_existing replaced a vector");
    let filled: bool = c.query_one("SELECT v <=> embed(body) < 1e-6 FROM dke_docs WHERE id = 2", &[]).unwrap().get(0);
    assert!(filled, "a row without a vector was not embedded");
    // The worker settles the models of all targets in its first round without work: a witness
    // target registered without keep_existing shows when that round has come.
    c.batch_execute(
        "DROP TABLE IF EXISTS dke_witness;
         CREATE TABLE dke_witness (id int PRIMARY KEY, body text, v vector(768));
         INSERT INTO dke_witness VALUES (1, 'a witness');
         SELECT embeddinggemma_async('dke_witness', 'body', 'v');",
    )
    .unwrap();
    assert!(wait(&mut c, "dke_witness", "v"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while c
        .query_one(
            "SELECT model IS NULL FROM embeddinggemma_async_status WHERE table_name = 'dke_witness'::regclass",
            &[],
        )
        .unwrap()
        .get::<_, bool>(0)
    {
        assert!(std::time::Instant::now() < deadline, "the witness target's model was never settled");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let model: Option<String> = c
        .query_one("SELECT model::text FROM embeddinggemma_async_status WHERE table_name = 'dke_docs'::regclass", &[])
        .unwrap()
        .get(0);
    assert!(model.is_none(), "a target that kept vectors it did not write claims a model: {model:?}");
    c.batch_execute("SELECT embeddinggemma_async_reembed('dke_docs', 'v')").unwrap();
    assert!(wait(&mut c, "dke_docs", "v"));
    assert_eq!(wrong(&mut c, "dke_docs", "body", "v"), 0, "a re-embed left a kept vector");
    c.batch_execute("SELECT embeddinggemma_async_drop('dke_docs', 'v'); SELECT embeddinggemma_async_drop('dke_witness', 'v'); DROP TABLE dke_docs, dke_witness").unwrap();
}

/// A user's BEFORE trigger that fires after the target's (triggers fire in name order) and
/// sets the text: the row is embedded from the text as stored.
#[test]
fn a_text_set_by_a_later_before_trigger_is_embedded_as_stored() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS dz_docs;
         CREATE TABLE dz_docs (id int PRIMARY KEY, title text, body text, v vector(768));
         CREATE OR REPLACE FUNCTION dz_compose() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN NEW.body := 'about ' || NEW.title; RETURN NEW; END $$;
         CREATE TRIGGER zz_compose BEFORE INSERT OR UPDATE ON dz_docs FOR EACH ROW EXECUTE FUNCTION dz_compose();
         SELECT embeddinggemma_async('dz_docs', 'body', 'v');
         INSERT INTO dz_docs (id, title) VALUES (1, 'whales'), (2, 'volcanoes');",
    )
    .unwrap();
    assert!(wait(&mut c, "dz_docs", "v"));
    c.batch_execute("UPDATE dz_docs SET title = 'deserts' WHERE id = 1").unwrap();
    assert!(wait(&mut c, "dz_docs", "v"));
    assert_eq!(wrong(&mut c, "dz_docs", "body", "v"), 0, "a text set by a later BEFORE trigger was not embedded");
    c.batch_execute("SELECT embeddinggemma_async_drop('dz_docs', 'v'); DROP TABLE dz_docs; DROP FUNCTION dz_compose()")
        .unwrap();
}

/// A session that wrote through a target before DROP EXTENSION / CREATE EXTENSION, where the
/// new target has the old one's id on other columns: it follows the new target.
#[test]
fn a_long_lived_session_follows_a_recreated_extension() {
    use postgres::NoTls;
    let mut admin = connect();
    admin.batch_execute("DROP DATABASE IF EXISTS dx_db WITH (FORCE)").unwrap();
    admin.batch_execute("CREATE DATABASE dx_db").unwrap();
    let db_dsn = format!("{} dbname=dx_db", dsn());
    let mut setup = Client::connect(&db_dsn, NoTls).unwrap();
    let mut writer = Client::connect(&db_dsn, NoTls).unwrap();
    setup
        .batch_execute(
            "CREATE EXTENSION embeddinggemma CASCADE;
             CREATE TABLE docs (id int PRIMARY KEY, a text, b text, v vector(768));
             SELECT embeddinggemma_async('docs', 'a', 'v');",
        )
        .unwrap();
    writer.batch_execute("INSERT INTO docs VALUES (1, 'the first text', 'the second text')").unwrap();
    setup
        .batch_execute(
            "DROP EXTENSION embeddinggemma CASCADE;
             CREATE EXTENSION embeddinggemma;
             SELECT embeddinggemma_async('docs', 'b', 'v');",
        )
        .unwrap();
    let id: i32 = setup.query_one("SELECT id FROM embeddinggemma_async_targets", &[]).unwrap().get(0);
    assert_eq!(id, 1, "the new target does not reuse the old id: the test proves nothing");
    assert!(setup.query_one("SELECT embeddinggemma_async_wait('docs', 'v', '120 s')", &[]).unwrap().get::<_, bool>(0));
    // Only b changes: the new target's source.
    writer.batch_execute("UPDATE docs SET b = 'the second text, changed' WHERE id = 1").unwrap();
    assert!(setup.query_one("SELECT embeddinggemma_async_wait('docs', 'v', '120 s')", &[]).unwrap().get::<_, bool>(0));
    let right: bool = setup.query_one("SELECT v <=> embed(b) < 1e-6 FROM docs WHERE id = 1", &[]).unwrap().get(0);
    assert!(right, "the long-lived session wrote through the dropped extension's target");
    drop(setup);
    drop(writer);
    admin.batch_execute("DROP DATABASE dx_db WITH (FORCE)").unwrap();
}

/// `CREATE DATABASE … TEMPLATE` of a database with a target: the copy has a working target and
/// a worker at once (rows queued in the source at copy time drain there too).
#[test]
fn a_database_copied_from_a_template_is_served() {
    use postgres::NoTls;
    let mut admin = connect();
    for sql in [
        "DROP DATABASE IF EXISTS dt_copy WITH (FORCE)",
        "DROP DATABASE IF EXISTS dt_src WITH (FORCE)",
        "CREATE DATABASE dt_src",
    ] {
        admin.batch_execute(sql).unwrap();
    }
    let mut src = Client::connect(&format!("{} dbname=dt_src", dsn()), NoTls).unwrap();
    src.batch_execute(
        "CREATE EXTENSION embeddinggemma CASCADE;
         CREATE TABLE docs (id int PRIMARY KEY, body text, v vector(768));
         SELECT embeddinggemma_async('docs', 'body', 'v');
         INSERT INTO docs SELECT i, 'row ' || i FROM generate_series(1, 40) i;",
    )
    .unwrap();
    drop(src);
    admin.batch_execute("CREATE DATABASE dt_copy TEMPLATE dt_src").unwrap();
    let mut copy = Client::connect(&format!("{} dbname=dt_copy", dsn()), NoTls).unwrap();
    copy.batch_execute("INSERT INTO docs VALUES (1000, 'written in the copy'); UPDATE docs SET body = 'changed in the copy' WHERE id = 1").unwrap();
    assert!(wait(&mut copy, "docs", "v"), "the copy's target never drained");
    assert_eq!(wrong(&mut copy, "docs", "body", "v"), 0, "rows of the copy were not embedded");
    drop(copy);
    admin.batch_execute("DROP DATABASE dt_copy WITH (FORCE)").unwrap();
    admin.batch_execute("DROP DATABASE dt_src WITH (FORCE)").unwrap();
}

#[test]
fn a_deleted_document_loses_its_chunks_without_a_foreign_key() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS dk_docs, dk_chunks;
         CREATE TABLE dk_docs (id int PRIMARY KEY, body text);
         CREATE TABLE dk_chunks (doc_id int, chunk int, start_offset int, end_offset int, body text, embedding vector(768),
                                 PRIMARY KEY (doc_id, chunk));
         INSERT INTO dk_docs VALUES (1, 'the first document'), (2, 'the second document');
         SELECT embeddinggemma_async_chunks('dk_docs', 'dk_chunks');",
    )
    .unwrap();
    let drained = |c: &mut Client| -> bool {
        c.query_one("SELECT embeddinggemma_async_wait('dk_docs', 'dk_chunks', '120 s')", &[]).unwrap().get(0)
    };
    assert!(drained(&mut c));
    let chunks = |c: &mut Client, id: i32| -> i64 {
        c.query_one("SELECT count(*) FROM dk_chunks WHERE doc_id = $1", &[&id]).unwrap().get(0)
    };
    assert!(chunks(&mut c, 1) > 0 && chunks(&mut c, 2) > 0);
    c.batch_execute("DELETE FROM dk_docs WHERE id = 1").unwrap();
    assert!(drained(&mut c));
    assert_eq!(chunks(&mut c, 1), 0, "the deleted document kept its chunks");
    assert!(chunks(&mut c, 2) > 0, "another document lost its chunks");
    c.batch_execute("SELECT embeddinggemma_async_drop('dk_docs', 'dk_chunks'); DROP TABLE dk_docs, dk_chunks").unwrap();
}

#[test]
fn registration_replaces_vectors_the_table_already_had() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS dv_docs;
         CREATE TABLE dv_docs (id int PRIMARY KEY, body text, v vector(768));
         INSERT INTO dv_docs SELECT i, 'row ' || i, embed('something else entirely') FROM generate_series(1, 4) i;
         SELECT embeddinggemma_async('dv_docs', 'body', 'v');",
    )
    .unwrap();
    assert!(wait(&mut c, "dv_docs", "v"));
    assert_eq!(wrong(&mut c, "dv_docs", "body", "v"), 0, "vectors written before registration were kept");
    c.batch_execute("SELECT embeddinggemma_async_drop('dv_docs', 'v'); DROP TABLE dv_docs").unwrap();
}

#[test]
fn registration_refuses_unknown_tasks_and_inheritance_parents() {
    let mut c = connect();
    // The task is checked against the serving model's tasks once it is loaded.
    c.batch_execute("SELECT embed('the model is loaded')").unwrap();
    c.batch_execute(
        "DROP TABLE IF EXISTS dt_docs, dt_child, dt_parent CASCADE;
         CREATE TABLE dt_docs (id int PRIMARY KEY, body text, v vector(768));
         CREATE TABLE dt_parent (id int PRIMARY KEY, body text, v vector(768));
         CREATE TABLE dt_child () INHERITS (dt_parent);",
    )
    .unwrap();
    let (code, message, hint) =
        expect_error(&mut c, "SELECT embeddinggemma_async('dt_docs', 'body', 'v', task => 'nonsense')");
    assert_eq!(code, "22023", "{message}");
    assert!(hint.is_some_and(|h| h.contains("document")), "{message}");
    let (code, message, hint) = expect_error(&mut c, "SELECT embeddinggemma_async('dt_parent', 'body', 'v')");
    assert_eq!(code, "42809", "{message}");
    assert!(hint.is_some(), "{message}");
    c.batch_execute("DROP TABLE dt_docs, dt_parent CASCADE").unwrap();
}

#[test]
fn a_generated_source_column_is_embedded_as_stored() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS dgen_docs;
         CREATE TABLE dgen_docs (id int PRIMARY KEY, title text, body text GENERATED ALWAYS AS ('about ' || title) STORED, v vector(768));
         SELECT embeddinggemma_async('dgen_docs', 'body', 'v');
         INSERT INTO dgen_docs (id, title) VALUES (1, 'whales'), (2, 'volcanoes');",
    )
    .unwrap();
    assert!(wait(&mut c, "dgen_docs", "v"));
    c.batch_execute("UPDATE dgen_docs SET title = 'deserts' WHERE id = 1").unwrap();
    assert!(wait(&mut c, "dgen_docs", "v"));
    assert_eq!(wrong(&mut c, "dgen_docs", "body", "v"), 0, "a generated text was not embedded as stored");
    c.batch_execute("SELECT embeddinggemma_async_drop('dgen_docs', 'v'); DROP TABLE dgen_docs").unwrap();
}

/// `pg_dump` of a database whose target has rows pending, restored into a new database: the
/// target works there, its pending rows are embedded without a restart, and the next
/// registration gets a new id.
#[test]
fn pg_dump_and_pg_restore_keep_targets_and_their_pending_rows() {
    use postgres::NoTls;
    let pg_bin = std::env::var("EMBEDDINGGEMMA_TEST_PG_BIN")
        .expect("EMBEDDINGGEMMA_TEST_PG_BIN is not set: run the SQL tests through scripts/test");
    let mut admin = connect();
    for db in ["dump_src", "dump_dst"] {
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
    }
    let db_dsn = |db: &str| format!("{} dbname={db}", dsn());
    let mut src = Client::connect(&db_dsn("dump_src"), NoTls).unwrap();
    // Writes of the vectors fail while the gate is closed: the rows stay queued.
    src.batch_execute(
        "CREATE EXTENSION embeddinggemma CASCADE;
         CREATE TABLE gate (open boolean);
         INSERT INTO gate VALUES (false);
         CREATE TABLE docs (id int PRIMARY KEY, body text, v vector(768));
         CREATE FUNCTION closed() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF NEW.v IS NOT NULL AND NOT (SELECT open FROM public.gate) THEN RAISE EXCEPTION 'the gate is closed'; END IF;
             RETURN NEW;
           END $$;
         CREATE TRIGGER closed BEFORE UPDATE ON docs FOR EACH ROW EXECUTE FUNCTION closed();
         INSERT INTO docs SELECT i, 'pending at dump time ' || i FROM generate_series(1, 6) i;
         SELECT embeddinggemma_async('docs', 'body', 'v');
         UPDATE embeddinggemma_async_targets SET max_attempts = 1000;",
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while src
        .query_one("SELECT count(*) FROM embeddinggemma_async_queue WHERE attempts > 0", &[])
        .unwrap()
        .get::<_, i64>(0)
        < 6
    {
        assert!(std::time::Instant::now() < deadline, "the rows were never tried");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let dump = std::process::Command::new(format!("{pg_bin}/pg_dump"))
        .args(["-Fc", "-d", &db_dsn("dump_src")])
        .output()
        .unwrap();
    assert!(dump.status.success(), "pg_dump: {}", String::from_utf8_lossy(&dump.stderr));
    let mut restore = std::process::Command::new(format!("{pg_bin}/pg_restore"))
        .args(["-d", &db_dsn("dump_dst")])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(restore.stdin.as_mut().unwrap(), &dump.stdout).unwrap();
    let restored = restore.wait_with_output().unwrap();
    assert!(restored.status.success(), "pg_restore: {}", String::from_utf8_lossy(&restored.stderr));
    drop(src);
    admin.batch_execute("DROP DATABASE dump_src WITH (FORCE)").unwrap();
    let mut dst = Client::connect(&db_dsn("dump_dst"), NoTls).unwrap();
    let pending: i64 = dst.query_one("SELECT count(*) FROM embeddinggemma_async_queue", &[]).unwrap().get(0);
    assert!(pending >= 6, "the pending rows were not restored: {pending} queue entries");
    dst.batch_execute("UPDATE gate SET open = true").unwrap();
    assert!(wait(&mut dst, "docs", "v"), "the restored target did not drain");
    assert_eq!(wrong(&mut dst, "docs", "body", "v"), 0);
    dst.batch_execute(
        "CREATE TABLE more (id int PRIMARY KEY, body text, v vector(768));
         SELECT embeddinggemma_async('more', 'body', 'v');",
    )
    .unwrap();
    drop(dst);
    admin.batch_execute("DROP DATABASE dump_dst WITH (FORCE)").unwrap();
}
