//! Keys of every common type find their own row on every write path, whatever the writer's
//! session prints them like (issue 27): a writer with DateStyle 'SQL, DMY', a far-off TimeZone,
//! extra_float_digits -15, bytea_output 'escape' and IntervalStyle 'sql_standard' writes rows
//! with keys that differ only in what text would lose (char(n) padding, time zones, day/month
//! order); each row must end with `embed(its text)` — through an asynchronous target (queued
//! in the writer's session, written by the worker's) and through the statement trigger.

use embeddinggemma_sql_tests::*;
use postgres::Client;

const SAME_TEXT: f64 = 1e-6;

const HOSTILE: &str = "SET DateStyle = 'SQL, DMY'; SET TimeZone = 'Pacific/Chatham'; SET extra_float_digits = -15;
                       SET bytea_output = 'escape'; SET IntervalStyle = 'sql_standard';";

/// (name, column type, three key literals).
const KEYS: &[(&str, &str, [&str; 3])] = &[
    ("int2", "int2", ["1", "2", "3"]),
    ("int4", "int4", ["1", "20", "300"]),
    ("int8", "int8", ["1", "9000000000", "-5"]),
    ("numeric", "numeric", ["1.5", "2.25", "1.50001"]),
    ("text", "text", ["'a'", "'ab'", "'a b'"]),
    ("varchar", "varchar(10)", ["'a'", "'ab'", "'abc'"]),
    ("char", "char(4)", ["'a'", "'ab'", "'abc'"]),
    (
        "uuid",
        "uuid",
        [
            "'00000000-0000-0000-0000-000000000001'",
            "'00000000-0000-0000-0000-000000000002'",
            "'ffffffff-0000-0000-0000-000000000001'",
        ],
    ),
    ("date", "date", ["'2026-01-02'", "'2026-02-01'", "'2026-12-31'"]),
    ("timestamp", "timestamp", ["'2026-01-02 03:04:05'", "'2026-02-01 03:04:05'", "'2026-01-02 03:04:05.5'"]),
    (
        "timestamptz",
        "timestamptz",
        ["'2026-01-02 03:04:05+00'", "'2026-02-01 03:04:05+00'", "'2026-01-02 03:04:05+13:45'"],
    ),
    ("bytea", "bytea", ["'\\x00'", "'\\x00ff'", "'\\x61'"]),
    ("inet", "inet", ["'10.0.0.1'", "'::1'", "'192.168.0.0/16'"]),
    ("domain", "{prefix}_positive", ["1", "2", "3"]),
];

/// Rows of `table` whose vector is not `embed(body)`, and the rows in all.
fn wrong_rows(c: &mut Client, table: &str) -> (i64, i64) {
    let r = c
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE v IS NULL OR v <=> embed(body) > {SAME_TEXT}), count(*) FROM {table}"
            ),
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1))
}

fn tables(c: &mut Client, prefix: &str) {
    // A chunk table left by an earlier run (scripts/test sql reuses servers) keeps the domain.
    for (name, _, _) in KEYS {
        c.batch_execute(&format!("DROP TABLE IF EXISTS {prefix}_{name}, {prefix}_{name}_chunks")).unwrap();
    }
    c.batch_execute(&format!(
        "DROP DOMAIN IF EXISTS {prefix}_positive; CREATE DOMAIN {prefix}_positive AS int CHECK (VALUE > 0);"
    ))
    .unwrap();
    for (name, ty, _) in KEYS {
        let ty = ty.replace("{prefix}", prefix);
        c.batch_execute(&format!("CREATE TABLE {prefix}_{name} (k {ty} PRIMARY KEY, body text, v vector(768));"))
            .unwrap();
    }
}

/// In a hostile writer's session: three rows per table, then every text changed.
fn write_hostile(c: &mut Client, prefix: &str) {
    c.batch_execute(HOSTILE).unwrap();
    for (name, _, keys) in KEYS {
        let values: Vec<String> =
            keys.iter().enumerate().map(|(i, k)| format!("({k}, 'first text {i} of {name}')")).collect();
        c.batch_execute(&format!("INSERT INTO {prefix}_{name} (k, body) VALUES {}", values.join(", "))).unwrap();
        for (i, k) in keys.iter().enumerate() {
            c.batch_execute(&format!("UPDATE {prefix}_{name} SET body = 'changed text {i} of {name}' WHERE k = {k}"))
                .unwrap();
        }
    }
    c.batch_execute("RESET ALL").unwrap();
}

#[test]
fn every_key_type_gets_its_own_vector_through_an_async_target_whatever_the_writer_prints() {
    let mut c = connect();
    tables(&mut c, "ka");
    for (name, _, _) in KEYS {
        c.batch_execute(&format!("SELECT embeddinggemma_async('ka_{name}', 'body', 'v')")).unwrap();
    }
    write_hostile(&mut c, "ka");
    let mut failures = Vec::new();
    for (name, _, _) in KEYS {
        let table = format!("ka_{name}");
        let drained: bool =
            c.query_one(&format!("SELECT embeddinggemma_async_wait('{table}', 'v', '120 s')"), &[]).unwrap().get(0);
        let failed: i64 = c
            .query_one(
                &format!("SELECT failed FROM embeddinggemma_async_status WHERE table_name = '{table}'::regclass"),
                &[],
            )
            .unwrap()
            .get(0);
        let (wrong, rows) = wrong_rows(&mut c, &table);
        eprintln!("{table}: drained {drained}, {wrong} of {rows} rows without embed(body), {failed} failed");
        if !drained || wrong != 0 || rows != 3 || failed != 0 {
            failures.push(table.clone());
        }
        c.batch_execute(&format!("SELECT embeddinggemma_async_drop('{table}', 'v')")).unwrap();
    }
    assert!(failures.is_empty(), "key types whose rows did not get their own vector: {failures:?}");
}

#[test]
fn every_key_type_gets_its_own_vector_through_the_statement_trigger_whatever_the_writer_prints() {
    let mut c = connect();
    tables(&mut c, "ks");
    for (name, _, _) in KEYS {
        c.batch_execute(&format!(
            "CREATE TRIGGER ins AFTER INSERT ON ks_{name} REFERENCING NEW TABLE AS new_rows
               FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('k', 'body', 'v');
             CREATE TRIGGER upd AFTER UPDATE ON ks_{name} REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
               FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('k', 'body', 'v');"
        ))
        .unwrap();
    }
    write_hostile(&mut c, "ks");
    let mut failures = Vec::new();
    for (name, _, _) in KEYS {
        let table = format!("ks_{name}");
        let (wrong, rows) = wrong_rows(&mut c, &table);
        eprintln!("{table}: {wrong} of {rows} rows without embed(body)");
        if wrong != 0 || rows != 3 {
            failures.push(table);
        }
    }
    assert!(failures.is_empty(), "key types whose rows did not get their own vector: {failures:?}");
}

#[test]
fn every_key_type_gets_its_own_vector_through_the_backfill_whatever_the_caller_prints() {
    let mut c = connect();
    tables(&mut c, "kb");
    write_hostile(&mut c, "kb");
    c.batch_execute(HOSTILE).unwrap();
    let mut failures = Vec::new();
    for (name, _, _) in KEYS {
        let table = format!("kb_{name}");
        c.batch_execute(&format!("CALL embeddinggemma_backfill('{table}', 'body', 'v')")).unwrap();
        let (wrong, rows) = wrong_rows(&mut c, &table);
        if wrong != 0 || rows != 3 {
            eprintln!("{table}: {wrong} of {rows} rows without embed(body)");
            failures.push(table);
        }
    }
    assert!(failures.is_empty(), "key types whose rows did not get their own vector: {failures:?}");
}

/// Documents and chunk tables keyed by each type.
fn chunk_tables(c: &mut Client, prefix: &str) {
    tables(c, prefix);
    for (name, ty, _) in KEYS {
        let ty = ty.replace("{prefix}", prefix);
        c.batch_execute(&format!(
            "DROP TABLE IF EXISTS {prefix}_{name}_chunks;
             CREATE TABLE {prefix}_{name}_chunks (doc_id {ty}, chunk int, start_offset int, end_offset int, body text, embedding vector(768),
                                                  PRIMARY KEY (doc_id, chunk));"
        ))
        .unwrap();
    }
}

/// Tables whose documents do not each have exactly their own chunks (every chunk's text taken
/// from its own document, none missing, none of another key).
fn chunk_failures(c: &mut Client, prefix: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, _, _) in KEYS {
        let (docs, chunks) = (format!("{prefix}_{name}"), format!("{prefix}_{name}_chunks"));
        let r = c
            .query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM {chunks} c LEFT JOIN {docs} d ON d.k = c.doc_id
                              WHERE d.k IS NULL OR strpos(d.body, c.body) = 0),
                            (SELECT count(*) FROM {docs} d WHERE NOT EXISTS (SELECT FROM {chunks} c WHERE c.doc_id = d.k))"
                ),
                &[],
            )
            .unwrap();
        let (foreign, missing): (i64, i64) = (r.get(0), r.get(1));
        if foreign != 0 || missing != 0 {
            eprintln!("{docs}: {foreign} chunks not of their document, {missing} documents without chunks");
            failures.push(docs);
        }
    }
    failures
}

#[test]
fn every_key_type_gets_its_own_chunks_through_the_chunk_trigger_whatever_the_writer_prints() {
    let mut c = connect();
    chunk_tables(&mut c, "kc");
    for (name, _, _) in KEYS {
        c.batch_execute(&format!(
            "CREATE TRIGGER chunks AFTER INSERT OR UPDATE OR DELETE ON kc_{name}
               FOR EACH ROW EXECUTE FUNCTION embeddinggemma_chunk_trigger('k', 'body', 'kc_{name}_chunks', 'doc_id');"
        ))
        .unwrap();
    }
    write_hostile(&mut c, "kc");
    let failures = chunk_failures(&mut c, "kc");
    assert!(failures.is_empty(), "key types whose documents did not get their own chunks: {failures:?}");
}

#[test]
fn every_key_type_gets_its_own_chunks_through_the_chunk_backfill_and_an_async_chunk_target() {
    let mut c = connect();
    chunk_tables(&mut c, "kd");
    write_hostile(&mut c, "kd");
    // The backfill chunks as the table's chunk trigger does, with its settings: installed
    // after the writes, so that only the backfill chunks them.
    for (name, _, _) in KEYS {
        c.batch_execute(&format!(
            "CREATE TRIGGER chunks AFTER INSERT OR UPDATE OR DELETE ON kd_{name}
               FOR EACH ROW EXECUTE FUNCTION embeddinggemma_chunk_trigger('k', 'body', 'kd_{name}_chunks', 'doc_id');"
        ))
        .unwrap();
    }
    c.batch_execute(HOSTILE).unwrap();
    for (name, _, _) in KEYS {
        c.batch_execute(&format!("CALL embeddinggemma_chunk_backfill('kd_{name}', 'kd_{name}_chunks')")).unwrap();
    }
    let failures = chunk_failures(&mut c, "kd");
    assert!(
        failures.is_empty(),
        "chunk backfill: key types whose documents did not get their own chunks: {failures:?}"
    );
    // The same documents kept in step asynchronously: registered, then written again by the
    // hostile writer (the worker re-chunks every document).
    c.batch_execute("RESET ALL").unwrap();
    for (name, _, _) in KEYS {
        c.batch_execute(&format!(
            "DROP TRIGGER chunks ON kd_{name}; TRUNCATE kd_{name}_chunks;
             SELECT embeddinggemma_async_chunks('kd_{name}', 'kd_{name}_chunks', key => 'k')"
        ))
        .unwrap();
    }
    c.batch_execute(HOSTILE).unwrap();
    for (name, _, keys) in KEYS {
        c.batch_execute(&format!("UPDATE kd_{name} SET body = body || ' again' WHERE k = {}", keys[0])).unwrap();
    }
    c.batch_execute("RESET ALL").unwrap();
    for (name, _, _) in KEYS {
        let drained: bool = c
            .query_one(&format!("SELECT embeddinggemma_async_wait('kd_{name}', 'kd_{name}_chunks', '120 s')"), &[])
            .unwrap()
            .get(0);
        assert!(drained, "kd_{name} did not drain");
    }
    let failures = chunk_failures(&mut c, "kd");
    for (name, _, _) in KEYS {
        c.batch_execute(&format!("SELECT embeddinggemma_async_drop('kd_{name}', 'kd_{name}_chunks')")).unwrap();
    }
    assert!(failures.is_empty(), "async chunks: key types whose documents did not get their own chunks: {failures:?}");
}
