//! Issue 9: triggers on every text type, the key-and-text swap, non-unique keys, backfill
//! under concurrent updates and on big tables, least privilege, a hostile search_path, the
//! upgrades from 0.1.0 and 0.2.0, bounded memory of embed_batch. With the tiny model where the model
//! does not matter (dim 48), so these run fast.

use std::thread;
use std::time::{Duration, Instant};

use embeddinggemma_sql_tests::*;
use postgres::Client;

const TINY_DIM: i32 = 48;
/// Same text embedded alone or in a batch: the engine's batch-invariance bound.
const SAME_TEXT: f64 = 1e-6;

fn tiny() -> Client {
    let mut c = connect();
    use_tiny_model(&mut c);
    c
}

fn embed_tiny(c: &mut Client, text: &str) -> Vec<f32> {
    embed(c, text, "document", TINY_DIM)
}

/// Every row's `v` against `embed(body::text)`; returns the number of rows with a vector.
fn assert_rows_match(c: &mut Client, table: &str) -> usize {
    let rows = c.query(&format!("SELECT id::bigint, body::text, v::real[] FROM {table} ORDER BY id"), &[]).unwrap();
    let mut with_vector = 0;
    for row in rows {
        let (id, body, v): (i64, Option<String>, Option<Vec<f32>>) = (row.get(0), row.get(1), row.get(2));
        match (body, v) {
            (None, None) => {}
            (Some(body), Some(v)) => {
                let want = embed_tiny(c, &body);
                let d = cosine_distance(&v, &want);
                assert!(d <= SAME_TEXT, "{table} id {id}: vector is {d:e} from embed({body:?})");
                with_vector += 1;
            }
            (body, v) => panic!("{table} id {id}: body {body:?} but vector {:?}", v.map(|_| "set")),
        }
    }
    with_vector
}

#[test]
fn row_trigger_takes_char_varchar_and_domains_like_the_statement_trigger() {
    let mut c = tiny();
    c.batch_execute(
        "DROP TABLE IF EXISTS ty_row, ty_stmt;
         DROP DOMAIN IF EXISTS ty_short_text;
         CREATE DOMAIN ty_short_text AS varchar(40) CHECK (VALUE <> 'forbidden');
         CREATE TABLE ty_row (id int PRIMARY KEY, c char(12), vc varchar(30), d ty_short_text,
                              vc_v vector(48), c_v vector(48), d_v vector(48));
         CREATE TRIGGER c BEFORE INSERT OR UPDATE ON ty_row FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('c', 'c_v', 'document', '48');
         CREATE TRIGGER vc BEFORE INSERT OR UPDATE ON ty_row FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('vc', 'vc_v', 'document', '48');
         CREATE TRIGGER d BEFORE INSERT OR UPDATE ON ty_row FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('d', 'd_v', 'document', '48');
         CREATE TABLE ty_stmt (id int PRIMARY KEY, c char(12), c_v vector(48));
         CREATE TRIGGER s AFTER INSERT ON ty_stmt REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'c', 'c_v', 'document', '48');
         INSERT INTO ty_row VALUES (1, 'padded', 'varying', 'domain text'), (2, '  lead', 'x', NULL);
         INSERT INTO ty_stmt VALUES (1, 'padded'), (2, '  lead');",
    )
    .unwrap();
    for (id, column, text) in
        [(1, "c_v", "padded"), (1, "vc_v", "varying"), (1, "d_v", "domain text"), (2, "c_v", "  lead")]
    {
        let row = c.query_one(&format!("SELECT {column}::real[] FROM ty_row WHERE id = $1"), &[&id]).unwrap();
        let got: Vec<f32> = row.get(0);
        let want = embed_tiny(&mut c, text);
        assert!(cosine_distance(&got, &want) <= SAME_TEXT, "id {id} {column}: not embed({text:?})");
    }
    // char(n): the row trigger, the statement trigger and embed() of the cast text agree.
    for row in c.query("SELECT id, r.c_v::real[], s.c_v::real[] FROM ty_row r JOIN ty_stmt s USING (id)", &[]).unwrap()
    {
        let (id, by_row, by_statement): (i32, Vec<f32>, Vec<f32>) = (row.get(0), row.get(1), row.get(2));
        assert!(
            cosine_distance(&by_row, &by_statement) <= SAME_TEXT,
            "id {id}: row and statement triggers differ on char(n)"
        );
    }
    assert!(c.query_one("SELECT d_v IS NULL FROM ty_row WHERE id = 2", &[]).unwrap().get::<_, bool>(0));
    // Padding only: an UPDATE to the same text with other padding does no work.
    let before: i64 = stat(&mut c, "texts");
    c.batch_execute("UPDATE ty_row SET c = 'padded   ' WHERE id = 1").unwrap();
    assert_eq!(stat::<i64>(&mut c, "texts"), before);
}

#[test]
fn statement_trigger_swapping_keys_and_texts_leaves_no_stale_vector() {
    let mut c = tiny();
    c.batch_execute(
        "DROP TABLE IF EXISTS sw_docs;
         CREATE TABLE sw_docs (id int PRIMARY KEY DEFERRABLE, body text, v vector(48));
         CREATE TRIGGER e AFTER INSERT ON sw_docs REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v', 'document', '48');
         CREATE TRIGGER u AFTER UPDATE ON sw_docs REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v', 'document', '48');
         INSERT INTO sw_docs VALUES (1, 'x'), (2, 'y');
         UPDATE sw_docs SET id = 3 - id, body = CASE id WHEN 1 THEN 'y' ELSE 'z' END;",
    )
    .unwrap();
    assert_eq!(assert_rows_match(&mut c, "sw_docs"), 2);
    // A key change alone keeps the vector that moved with the row: no work.
    let before: i64 = stat(&mut c, "texts");
    c.batch_execute("UPDATE sw_docs SET id = id + 10").unwrap();
    assert_eq!(stat::<i64>(&mut c, "texts"), before, "a key change re-embedded unchanged texts");
    assert_eq!(assert_rows_match(&mut c, "sw_docs"), 2);
}

#[test]
fn statement_trigger_refuses_a_key_that_is_not_unique_or_allows_null() {
    let mut c = tiny();
    c.batch_execute(
        "DROP TABLE IF EXISTS nu_docs;
         CREATE TABLE nu_docs (id int, body text, v vector(48));
         CREATE TRIGGER e AFTER INSERT ON nu_docs REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v', 'document', '48');",
    )
    .unwrap();
    let (code, msg, hint) = expect_error(&mut c, "INSERT INTO nu_docs VALUES (1, 'a'), (1, 'b')");
    assert_eq!(code, "42P17", "{msg}");
    assert!(msg.contains("not unique"), "{msg}");
    assert!(hint.unwrap().contains("CREATE UNIQUE INDEX"));
    assert_eq!(c.query_one("SELECT count(*) FROM nu_docs", &[]).unwrap().get::<_, i64>(0), 0);
    // Unique but nullable: rows with a NULL key could not be written back.
    c.batch_execute("CREATE UNIQUE INDEX ON nu_docs (id)").unwrap();
    let (code, msg, hint) = expect_error(&mut c, "INSERT INTO nu_docs VALUES (1, 'a'), (NULL, 'b')");
    assert_eq!(code, "42P17", "{msg}");
    assert!(msg.contains("allows NULL"), "{msg}");
    assert!(hint.unwrap().contains("SET NOT NULL"));
    c.batch_execute("ALTER TABLE nu_docs ALTER COLUMN id SET NOT NULL; INSERT INTO nu_docs VALUES (1, 'a'), (2, 'b')")
        .unwrap();
    assert_eq!(assert_rows_match(&mut c, "nu_docs"), 2);
}

fn make_backfill_table(c: &mut Client, name: &str, rows: i64) {
    c.batch_execute(&format!(
        "DELETE FROM embeddinggemma_backfill_progress WHERE relation = to_regclass('{name}');
         DROP TABLE IF EXISTS {name};
         CREATE TABLE {name} (id bigint PRIMARY KEY, body text, n int DEFAULT 0, v vector(48));
         INSERT INTO {name} (id, body) SELECT i, 'row ' || i || ' of the backfill test' FROM generate_series(1, {rows}) i;"
    ))
    .unwrap();
}

/// Backfills `name` with the tiny model on `c`. The CALL goes alone: several statements in one
/// query string form a transaction block, where a procedure cannot COMMIT.
fn backfill(c: &mut Client, name: &str, batch: i32) -> Result<(), postgres::Error> {
    use_tiny_model(c);
    c.batch_execute("SET client_min_messages = warning")?;
    c.batch_execute(&format!(
        "CALL embeddinggemma_backfill('{name}', 'body', 'v', 'document', 48, batch_size => {batch})"
    ))
}

#[test]
fn backfill_finishes_every_row_while_another_session_updates_them() {
    const N: i64 = 3000;
    let mut c = tiny();
    make_backfill_table(&mut c, "cu_docs", N);
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let updater = {
        let finished = finished.clone();
        thread::spawn(move || {
            let mut u = connect();
            let mut rounds = 0;
            let deadline = Instant::now() + Duration::from_secs(600);
            // Each round locks and moves every row (new ctids), racing the backfill's claims.
            while !finished.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                u.batch_execute("UPDATE cu_docs SET n = n + 1").unwrap();
                rounds += 1;
            }
            rounds
        })
    };
    let mut b = connect();
    let result = backfill(&mut b, "cu_docs", 100);
    finished.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = updater.join().unwrap();
    result.unwrap();
    let left: i64 = c.query_one("SELECT count(*) FROM cu_docs WHERE v IS NULL", &[]).unwrap().get(0);
    let (done, remaining): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT rows_done, rows_remaining FROM embeddinggemma_backfills WHERE relation = 'cu_docs'::regclass",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    eprintln!("backfill beside {rounds} whole-table updates: {done} rows done, {left} left");
    assert!(rounds > 0, "the updater never ran");
    assert_eq!(left, 0, "the backfill stopped with rows left");
    assert_eq!((done, remaining), (N, 0), "progress counts");
    assert_eq!(assert_rows_match(&mut c, "cu_docs"), N as usize);
}

/// Heap tuples read from `table` by scans so far (sequential and TID range scans).
fn tuples_read(c: &mut Client, table: &str) -> i64 {
    c.batch_execute("SELECT pg_stat_force_next_flush(); SELECT pg_stat_clear_snapshot();").unwrap();
    c.query_one("SELECT seq_tup_read FROM pg_stat_user_tables WHERE relid = $1::text::regclass", &[&table])
        .unwrap()
        .get(0)
}

#[test]
fn backfill_batches_do_not_rescan_the_rows_already_done() {
    // 200 batches: a scan from the start of the table per batch would read ~100 × N tuples.
    const N: i64 = 20_000;
    let mut c = tiny();
    make_backfill_table(&mut c, "lin_docs", N);
    let before = tuples_read(&mut c, "lin_docs");
    backfill(&mut c, "lin_docs", 100).unwrap();
    let read = tuples_read(&mut c, "lin_docs") - before;
    eprintln!("backfill of {N} rows in batches of 100 read {read} tuples ({:.1} per row)", read as f64 / N as f64);
    assert!(read > 0, "no scan was counted");
    assert!(read < 6 * N, "the backfill read {read} tuples for {N} rows");
    let left: i64 = c.query_one("SELECT count(*) FROM lin_docs WHERE v IS NULL", &[]).unwrap().get(0);
    assert_eq!(left, 0);
}

#[test]
fn ordinary_roles_cannot_forge_or_read_others_progress() {
    let mut admin = tiny();
    make_backfill_table(&mut admin, "pv_docs", 10);
    backfill(&mut admin, "pv_docs", 5).unwrap();
    admin.batch_execute("REVOKE ALL ON pv_docs FROM PUBLIC").unwrap();
    let mut user = connect_as_ordinary_user();
    // Runs on a table the role cannot read are invisible to it, through the table and the view.
    for from in ["embeddinggemma_backfill_progress", "embeddinggemma_backfills"] {
        let seen: i64 = user
            .query_one(&format!("SELECT count(*) FROM {from} WHERE relation = 'pv_docs'::regclass"), &[])
            .unwrap()
            .get(0);
        assert_eq!(seen, 0, "{from}");
    }
    admin.batch_execute("GRANT SELECT ON pv_docs TO eg_ordinary").unwrap();
    let seen: i64 = user
        .query_one("SELECT count(*) FROM embeddinggemma_backfills WHERE relation = 'pv_docs'::regclass", &[])
        .unwrap()
        .get(0);
    assert_eq!(seen, 1);
    // Readable is not writable: only the backfills write progress rows, so no role can alter,
    // delete or forge one, not even in its own name.
    for sql in [
        "UPDATE embeddinggemma_backfill_progress SET rows_done = 0 WHERE relation = 'pv_docs'::regclass",
        "DELETE FROM embeddinggemma_backfill_progress WHERE relation = 'pv_docs'::regclass",
        "INSERT INTO embeddinggemma_backfill_progress (relation, source, target, pid, started_at, updated_at)
         VALUES ('pv_docs', 'body', 'v', 1, now(), now())",
    ] {
        let (code, msg, _) = expect_error(&mut user, sql);
        assert_eq!(code, "42501", "{sql}: {msg}");
    }
    let done: i64 = admin
        .query_one("SELECT rows_done FROM embeddinggemma_backfill_progress WHERE relation = 'pv_docs'::regclass", &[])
        .unwrap()
        .get(0);
    assert_eq!(done, 10);
}

#[test]
fn a_hostile_search_path_runs_none_of_its_objects() {
    let mut c = tiny();
    // Trojan operators a user could plant in a schema on the search_path: they would run with
    // the rights of whoever fires the trigger or calls the backfill.
    c.batch_execute(
        "DROP SCHEMA IF EXISTS hostile CASCADE;
         CREATE SCHEMA hostile;
         CREATE TABLE hostile.calls (what text);
         CREATE FUNCTION hostile.text_eq(a text, b text) RETURNS boolean LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO hostile.calls VALUES ('text ='); RETURN a OPERATOR(pg_catalog.=) b; END $$;
         CREATE OPERATOR hostile.= (LEFTARG = text, RIGHTARG = text, FUNCTION = hostile.text_eq);
         CREATE FUNCTION hostile.oid_eq(a regclass, b regclass) RETURNS boolean LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO hostile.calls VALUES ('regclass ='); RETURN a::oid OPERATOR(pg_catalog.=) b::oid; END $$;
         CREATE OPERATOR hostile.= (LEFTARG = regclass, RIGHTARG = regclass, FUNCTION = hostile.oid_eq);
         DROP TABLE IF EXISTS hs_docs;
         CREATE TABLE hs_docs (id int PRIMARY KEY, body text, v vector(48));
         CREATE TRIGGER u AFTER UPDATE ON hs_docs REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v', 'document', '48');
         INSERT INTO hs_docs VALUES (1, 'one'), (2, 'two');",
    )
    .unwrap();
    c.batch_execute("SET search_path = hostile, pg_catalog, public").unwrap();
    backfill(&mut c, "hs_docs", 1).unwrap();
    c.batch_execute("UPDATE hs_docs SET body = 'uno' WHERE id = 1").unwrap();
    c.batch_execute("RESET search_path").unwrap();
    let calls: Vec<String> = c.query("SELECT what FROM hostile.calls", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(calls.is_empty(), "hostile operators ran: {calls:?}");
    assert_eq!(assert_rows_match(&mut c, "hs_docs"), 2);
    c.batch_execute("DROP SCHEMA hostile CASCADE").unwrap();
}

/// Text lines describing every member object of the extension in the database of `c`.
fn describe_extension(c: &mut Client) -> Vec<String> {
    let sql = "
        WITH members AS (
            SELECT classid, objid FROM pg_depend
             WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
               AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'embeddinggemma'))
        SELECT 'object ' || pg_describe_object(classid, objid, 0) FROM members
        UNION ALL
        SELECT 'function ' || p.oid::regprocedure || ' ' || pg_get_functiondef(p.oid) || ' acl ' || coalesce(p.proacl::text, '')
               || ' comment ' || coalesce(obj_description(p.oid, 'pg_proc'), '')
          FROM members m JOIN pg_proc p ON m.classid = 'pg_proc'::regclass AND p.oid = m.objid
        UNION ALL
        SELECT 'relation ' || c.oid::regclass || ' ' || c.relkind::text || ' rls ' || c.relrowsecurity || ' options ' || coalesce(c.reloptions::text, '')
               || ' acl ' || coalesce(c.relacl::text, '') || ' comment ' || coalesce(obj_description(c.oid, 'pg_class'), '')
               || ' view ' || coalesce(pg_get_viewdef(c.oid), '')
          FROM members m JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
        UNION ALL
        SELECT 'column ' || a.attrelid::regclass || '.' || a.attname || ' ' || a.attnum || ' ' || format_type(a.atttypid, a.atttypmod)
               || ' not null ' || a.attnotnull || ' default ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
          FROM members m JOIN pg_attribute a ON m.classid = 'pg_class'::regclass AND a.attrelid = m.objid AND a.attnum > 0 AND NOT a.attisdropped
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        UNION ALL
        SELECT 'policy ' || tablename || ' ' || policyname || ' ' || cmd || ' ' || roles::text || ' ' || coalesce(qual, '') || ' ' || coalesce(with_check, '')
          FROM pg_policies WHERE tablename LIKE 'embeddinggemma%'
        UNION ALL
        SELECT 'constraint ' || conrelid::regclass || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
         WHERE conrelid IN (SELECT objid FROM members WHERE classid = 'pg_class'::regclass)
        ORDER BY 1";
    c.query(sql, &[]).unwrap().iter().map(|r| r.get(0)).collect()
}

/// The version `CREATE EXTENSION` installs now.
const CURRENT: &str = env!("CARGO_PKG_VERSION");

/// Installs `from`, upgrades it, and compares every object with a fresh install; then uses it.
fn upgrade_gives_the_objects_of_a_fresh_install(from: &str) {
    let mut admin = connect();
    let mut fresh = fresh_database(&mut admin, "eg_fresh");
    fresh.batch_execute("CREATE EXTENSION embeddinggemma CASCADE").unwrap();
    let mut upgraded = fresh_database(&mut admin, "eg_upgraded");
    upgraded
        .batch_execute(&format!("CREATE EXTENSION vector; CREATE EXTENSION embeddinggemma VERSION '{from}'"))
        .unwrap();
    let old = describe_extension(&mut upgraded);
    upgraded.batch_execute("ALTER EXTENSION embeddinggemma UPDATE").unwrap();
    let version: String =
        upgraded.query_one("SELECT extversion FROM pg_extension WHERE extname = 'embeddinggemma'", &[]).unwrap().get(0);
    assert_eq!(version, CURRENT);
    let (want, got) = (describe_extension(&mut fresh), describe_extension(&mut upgraded));
    assert_ne!(old, want, "{from} and {CURRENT} should differ");
    let missing: Vec<&String> = want.iter().filter(|l| !got.contains(l)).collect();
    let extra: Vec<&String> = got.iter().filter(|l| !want.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "install upgraded from {from} differs:\nmissing {missing:#?}\nextra {extra:#?}"
    );
    // The upgraded install works.
    use_tiny_model(&mut upgraded);
    upgraded
        .batch_execute(
            "CREATE TABLE up_docs (id int PRIMARY KEY, body text, v vector(48));
             INSERT INTO up_docs VALUES (1, 'one'), (2, 'two');",
        )
        .unwrap();
    backfill(&mut upgraded, "up_docs", 256).unwrap();
    assert_eq!(assert_rows_match(&mut upgraded, "up_docs"), 2);
    let chunks: i64 =
        upgraded.query_one("SELECT count(*) FROM embed_chunks('one two', 48, 0, 'document', 48)", &[]).unwrap().get(0);
    assert_eq!(chunks, 1);
    drop((fresh, upgraded));
    admin.batch_execute("DROP DATABASE eg_fresh WITH (FORCE)").unwrap();
    admin.batch_execute("DROP DATABASE eg_upgraded WITH (FORCE)").unwrap();
}

// One test: all use the same two databases.
#[test]
fn upgrading_from_0_1_0_0_2_0_0_3_0_and_0_4_0_gives_the_objects_of_a_fresh_install() {
    upgrade_gives_the_objects_of_a_fresh_install("0.1.0");
    upgrade_gives_the_objects_of_a_fresh_install("0.2.0");
    upgrade_gives_the_objects_of_a_fresh_install("0.3.0");
    upgrade_gives_the_objects_of_a_fresh_install("0.4.0");
}

/// An asynchronous target registered on 0.4.0 drains after `ALTER EXTENSION … UPDATE`: the rows
/// present at registration and those written before and after the update, each with the vector
/// embed() gives (the new library leaves a not-yet-updated install alone meanwhile, and refuses
/// new registrations there). The target is recorded as 0.4.0's `embeddinggemma_async` records
/// one: its row in the targets table (no column numbers) and its trigger.
#[test]
fn an_async_target_registered_on_0_4_0_keeps_working_after_the_upgrade() {
    let mut admin = connect();
    let mut db = fresh_database(&mut admin, "eg_async_upgrade");
    db.batch_execute(
        "CREATE EXTENSION vector; CREATE EXTENSION embeddinggemma VERSION '0.4.0';
         CREATE TABLE up_async (id int PRIMARY KEY, body text, v vector(768));
         INSERT INTO up_async SELECT i, 'present at registration ' || i FROM generate_series(1, 5) i;",
    )
    .unwrap();
    let (code, _, hint) = expect_error(&mut db, "SELECT embeddinggemma_async('up_async', 'body', 'v')");
    assert_eq!((code.as_str(), hint.as_deref()), ("55000", Some("ALTER EXTENSION embeddinggemma UPDATE first.")));
    record_target_as_0_4_0(&mut db, "up_async");
    db.batch_execute("INSERT INTO up_async SELECT i, 'written on 0.4.0 ' || i FROM generate_series(6, 8) i").unwrap();
    db.batch_execute("ALTER EXTENSION embeddinggemma UPDATE").unwrap();
    db.batch_execute("INSERT INTO up_async SELECT i, 'written on 0.5.0 ' || i FROM generate_series(9, 10) i").unwrap();
    let drained: bool = db.query_one("SELECT embeddinggemma_async_wait('up_async', 'v', '180 s')", &[]).unwrap().get(0);
    assert!(drained, "the target did not drain after the upgrade");
    let wrong: i64 =
        db.query_one("SELECT count(*) FROM up_async WHERE v IS NULL OR v <=> embed(body) > 1e-6", &[]).unwrap().get(0);
    assert_eq!(wrong, 0, "rows without the vector embed() gives");
    drop(db);
    admin.batch_execute("DROP DATABASE eg_async_upgrade WITH (FORCE)").unwrap();
}

/// Peak resident memory of the backend `pid` (VmHWM), in bytes; the tests run beside the server.
fn peak_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    kb * 1024
}

#[test]
fn embed_batch_over_200000_elements_keeps_backend_memory_flat() {
    let mut c = tiny();
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let count = |c: &mut Client, n: i32| -> i64 {
        c.query_one("SELECT count(embedding) FROM embed_batch(ARRAY(SELECT 'w' || (i % 97) FROM generate_series(1, $1) i), 'document', 48)", &[&n])
            .unwrap()
            .get(0)
    };
    assert_eq!(count(&mut c, 20_000), 20_000);
    let small = peak_rss(pid);
    assert_eq!(count(&mut c, 200_000), 200_000);
    let large = peak_rss(pid);
    let growth = large.saturating_sub(small) as f64 / (1 << 20) as f64;
    eprintln!(
        "embed_batch peak RSS: {:.1} MB after 20,000 elements, {:.1} MB after 200,000 (+{growth:.1} MB)",
        small as f64 / 1048576.0,
        large as f64 / 1048576.0
    );
    // Holding every result (vector, Rust copy, datum) would add well over 60 MB for 180,000
    // more; the argument array itself and the copied texts add about 5 MB.
    assert!(growth < 24.0, "peak RSS grew by {growth:.1} MB");
}

/// A statement that keeps the real model busy for minutes on this machine.
const LONG_EMBED: &str = "SELECT count(*) FROM embed_batch(ARRAY(SELECT i || repeat(' the quick brown fox jumps over the lazy dog', 220) FROM generate_series(1, 64) i))";

/// Runs `sql` with `statement_timeout = '1s'` on a fresh ordinary-role connection; returns the
/// SQLSTATE it failed with and how long after it was sent.
fn under_one_second_timeout(sql: &str) -> (String, Duration) {
    let mut user = connect_as_ordinary_user();
    user.batch_execute("SET statement_timeout = '1s'").unwrap();
    let sent = Instant::now();
    let err = user.batch_execute(sql).expect_err(sql);
    let took = sent.elapsed();
    (sql_error(err).0, took)
}

/// The bound: a 1 s statement timeout returns within 1.5 s whatever the call does.
const TIMEOUT_RETURNS_WITHIN: Duration = Duration::from_millis(1500);

#[test]
fn a_one_second_statement_timeout_returns_within_1_5_s_from_any_call() {
    for (what, sql) in [
        // A new connection: the first call loads the model (seconds).
        ("first call, loading the model", "SELECT embed('hello')"),
        ("long embed_batch", LONG_EMBED),
        ("64 MB text", "SELECT embed(repeat('word ', 13421773))"),
        (
            "embed_batch of 200,000 texts",
            "SELECT count(*) FROM embed_batch(ARRAY(SELECT 'text ' || i FROM generate_series(1, 200000) i))",
        ),
    ] {
        let (code, took) = under_one_second_timeout(sql);
        eprintln!("statement_timeout 1s, {what}: {code} after {took:?}");
        assert_eq!(code, "57014", "{what}");
        assert!(took <= TIMEOUT_RETURNS_WITHIN, "{what}: returned after {took:?}");
    }
    // The backend that timed out is usable at once, and embeds correctly.
    let mut user = connect_as_ordinary_user();
    user.batch_execute("SET statement_timeout = '1s'").unwrap();
    assert!(user.batch_execute(LONG_EMBED).is_err());
    user.batch_execute("SET statement_timeout = 0").unwrap();
    let v = embed(&mut user, "after a timeout", "query", 768);
    let mut fresh = connect();
    let w = embed(&mut fresh, "after a timeout", "query", 768);
    assert!(cosine_distance(&v, &w) <= SAME_TEXT);
}

#[test]
fn transaction_timeout_ends_a_long_call_promptly() {
    let mut user = connect_as_ordinary_user();
    let mut admin = connect();
    let pid: i32 = user.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    user.batch_execute("SET transaction_timeout = '1s'").unwrap();
    let sent = Instant::now();
    let err = user.batch_execute(LONG_EMBED).unwrap_err();
    let took = sent.elapsed();
    eprintln!("transaction_timeout 1s: {err} after {took:?}");
    assert!(took <= TIMEOUT_RETURNS_WITHIN, "returned after {took:?}");
    assert!(err.is_closed() || err.as_db_error().is_some_and(|e| e.code().code() == "25P04"), "{err}");
    wait_until_gone(&mut admin, pid, Duration::from_secs(10));
}

fn wait_until_gone(admin: &mut Client, pid: i32, within: Duration) -> Duration {
    let started = Instant::now();
    while admin.query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", &[&pid]).unwrap().get::<_, i64>(0) > 0
    {
        assert!(started.elapsed() < within, "backend {pid} still there after {within:?}");
        thread::sleep(Duration::from_millis(10));
    }
    started.elapsed()
}

/// A bare protocol-3 client on the server's Unix socket, so the test can vanish mid-query
/// the way a crashed application does.
fn raw_session(app: &str, sql: &str) -> std::os::unix::net::UnixStream {
    use std::io::{Read, Write};
    let dsn = dsn();
    let field =
        |key: &str| dsn.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{key}="))).unwrap().to_string();
    let mut stream =
        std::os::unix::net::UnixStream::connect(format!("{}/.s.PGSQL.{}", field("host"), field("port"))).unwrap();
    let mut body = 196608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", field("user")), ("database", field("dbname")), ("application_name", app.to_string())] {
        body.extend_from_slice(format!("{k}\0{v}\0").as_bytes());
    }
    body.push(0);
    stream.write_all(&((body.len() + 4) as u32).to_be_bytes()).unwrap();
    stream.write_all(&body).unwrap();
    // Read messages up to ReadyForQuery.
    loop {
        let mut header = [0u8; 5];
        stream.read_exact(&mut header).unwrap();
        let len = u32::from_be_bytes(header[1..].try_into().unwrap()) as usize - 4;
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).unwrap();
        assert_ne!(header[0], b'E', "startup failed: {}", String::from_utf8_lossy(&payload));
        if header[0] == b'Z' {
            break;
        }
    }
    let mut query = vec![b'Q'];
    query.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    query.extend_from_slice(sql.as_bytes());
    query.push(0);
    stream.write_all(&query).unwrap();
    stream
}

#[test]
fn a_vanished_client_ends_its_backend_mid_call() {
    let mut admin = connect();
    let stream = raw_session("eg_vanishing", &format!("SET client_connection_check_interval = '100ms'; {LONG_EMBED}"));
    let deadline = Instant::now() + Duration::from_secs(120);
    let pid = loop {
        if let Some(row) =
            admin.query_opt("SELECT pid FROM pg_stat_activity WHERE application_name = 'eg_vanishing'", &[]).unwrap()
        {
            break row.get::<_, i32>(0);
        }
        assert!(Instant::now() < deadline, "the raw session never showed up");
        thread::sleep(Duration::from_millis(10));
    };
    wait_until_embedding(&mut admin, pid);
    drop(stream);
    let took = wait_until_gone(&mut admin, pid, Duration::from_secs(10));
    eprintln!("client vanished mid-call: backend gone after {took:?}");
    assert!(took <= TIMEOUT_RETURNS_WITHIN, "backend lingered {took:?}");
}

#[test]
fn a_64_mb_text_costs_what_a_2048_token_text_costs() {
    let mut user = connect_as_ordinary_user();
    let pid: i32 = user.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    // Load the model first, so the peak below is the call's, not the load's.
    embed(&mut user, "warm up", "document", 768);
    let loaded = peak_rss(pid);
    let huge: Vec<f32> = user.query_one("SELECT embed(repeat('word ', 13421773))::real[]", &[]).unwrap().get(0);
    let peak = peak_rss(pid).saturating_sub(loaded) as f64 / (1 << 20) as f64;
    // Its first 2047 tokens (with the prompt) are what the model sees: the same vector as a
    // text cut well past them.
    let cut: Vec<f32> = user.query_one("SELECT embed(repeat('word ', 4096))::real[]", &[]).unwrap().get(0);
    let d = cosine_distance(&huge, &cut);
    eprintln!("embed() of 64 MB: peak RSS {peak:.0} MB above the loaded model; distance to a 4096-word text {d:e}");
    assert!(d <= SAME_TEXT, "64 MB text vs its truncation: {d:e}");
    // The 64 MB argument itself is in the backend (twice, as text and as the repeat() result).
    assert!(peak <= 600.0, "peak RSS grew {peak:.0} MB");
}

/// RssAnon of the backend `pid`, in MB.
fn anon_mb(pid: i32) -> f64 {
    load::rss_anon_kb(pid).expect("backend status unreadable") as f64 / 1024.0
}

/// In-process calls keep their freed activation blocks for the rest of the transaction (so a
/// row-by-row UPDATE faults them in once, not once per row) and give them back when it commits,
/// rolls back or fails; an idle backend holds the model and not its activations.
#[test]
fn activation_memory_is_kept_for_the_transaction_and_returned_at_its_end() {
    let mut c = connect_in_process();
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    // About 1,500 tokens: some 60 MB of activation blocks of 1 MiB and more.
    let long = "SELECT vector_dims(embed(repeat('the quick brown fox jumps over the lazy dog ', 170)))";
    c.batch_execute(long).unwrap(); // loads the model
    c.batch_execute(long).unwrap(); // a statement of its own: its blocks go at its end
    let idle = anon_mb(pid);
    for end in ["COMMIT", "ROLLBACK", "SELECT 1/0"] {
        c.batch_execute("BEGIN").unwrap();
        c.batch_execute(long).unwrap();
        let held = anon_mb(pid);
        let ended = c.batch_execute(end);
        assert_eq!(ended.is_err(), end == "SELECT 1/0");
        // The client may see an ERROR before the backend has aborted; ROLLBACK's answer comes after.
        c.batch_execute("ROLLBACK").unwrap();
        let after = anon_mb(pid);
        eprintln!("{end}: backend RssAnon idle {idle:.0} MB, in the transaction {held:.0} MB, after {after:.0} MB");
        assert!(held > after + 30.0, "{end}: no activations kept in the transaction, or not returned at its end ({held:.0} MB, then {after:.0} MB)");
        assert!(after < idle + 20.0, "{end}: memory outlived the transaction ({after:.0} MB, idle {idle:.0} MB)");
    }
}

#[test]
fn a_backfill_ends_when_the_rows_left_are_rows_it_cannot_claim() {
    tiny_model_role("eg_rls_role");
    let mut admin = tiny();
    admin
        .batch_execute(
            "DELETE FROM embeddinggemma_backfill_progress WHERE relation = to_regclass('rls_docs');
             DROP TABLE IF EXISTS rls_docs;
             CREATE TABLE rls_docs (id bigint PRIMARY KEY, body text, v vector(48));
             INSERT INTO rls_docs (id, body) SELECT i, 'row ' || i FROM generate_series(1, 40) i;
             ALTER TABLE rls_docs ENABLE ROW LEVEL SECURITY;
             CREATE POLICY see ON rls_docs FOR SELECT TO eg_rls_role USING (true);
             CREATE POLICY change ON rls_docs FOR UPDATE TO eg_rls_role USING (id % 2 = 0) WITH CHECK (true);
             GRANT SELECT, UPDATE ON rls_docs TO eg_rls_role;",
        )
        .unwrap();
    let (mut role, notices) = connect_collecting_notices(&format!("{} user=eg_rls_role", dsn()));
    // A backfill that spins would run into this instead of returning.
    role.batch_execute("SET statement_timeout = '60s'; SET client_min_messages = notice").unwrap();
    let started = Instant::now();
    role.batch_execute("CALL embeddinggemma_backfill('rls_docs', 'body', 'v', 'document', 48, batch_size => 5)")
        .unwrap();
    let took = started.elapsed();
    let last = notices.lock().unwrap().last().cloned().unwrap_or_default();
    eprintln!("backfill under row-level security returned in {took:?}: {last}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(last.contains("20 left that this run cannot claim") && last.contains("row-level security"), "{last}");
    let row = admin
        .query_one("SELECT rows_done, rows_remaining, note, finished_at IS NOT NULL FROM embeddinggemma_backfill_progress WHERE relation = 'rls_docs'::regclass", &[])
        .unwrap();
    let (done, remaining, note, finished): (i64, i64, Option<String>, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!((done, remaining, finished), (20, 20, true));
    assert!(note.is_some_and(|n| n.contains("cannot claim")));
    let odd_with_vector: i64 =
        admin.query_one("SELECT count(*) FROM rls_docs WHERE (id % 2 = 1) = (v IS NOT NULL)", &[]).unwrap().get(0);
    assert_eq!(odd_with_vector, 0, "the rows it could claim are embedded, the others not");
}

#[test]
fn a_backfill_beside_the_statement_row_and_chunk_triggers_embeds_each_row_once() {
    let mut c = tiny();
    c.batch_execute(
        "DELETE FROM embeddinggemma_backfill_progress WHERE relation = to_regclass('once_docs');
         DROP TABLE IF EXISTS once_chunks, once_docs;
         CREATE TABLE once_docs (id bigint PRIMARY KEY, body text, v vector(48));
         CREATE TABLE once_chunks (doc_id bigint, chunk int, start_offset int, end_offset int, body text, embedding vector(48),
                                   PRIMARY KEY (doc_id, chunk));
         INSERT INTO once_docs (id, body) SELECT i, 'row ' || i FROM generate_series(1, 30) i;
         CREATE TRIGGER i AFTER INSERT ON once_docs REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v', 'document', '48');
         CREATE TRIGGER u AFTER UPDATE ON once_docs REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v', 'document', '48');
         CREATE TRIGGER r BEFORE UPDATE ON once_docs FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v', 'document', '48');
         CREATE TRIGGER c AFTER UPDATE ON once_docs FOR EACH ROW
            EXECUTE FUNCTION embeddinggemma_chunk_trigger('id', 'body', 'once_chunks', 'doc_id', '48', '8', 'document', '48');
         SELECT embeddinggemma_stats_reset();",
    )
    .unwrap();
    c.batch_execute("CALL embeddinggemma_backfill('once_docs', 'body', 'v', 'document', 48, batch_size => 7)").unwrap();
    let texts: i64 = stat(&mut c, "texts");
    eprintln!("backfill of 30 rows beside the statement, row and chunk triggers: {texts} texts embedded");
    assert_eq!(texts, 30, "rows embedded more than once");
    assert_eq!(assert_rows_match(&mut c, "once_docs"), 30);
}
