//! `halfvec` targets on every write path (issue 29): the row, statement and chunk triggers, both
//! backfills, asynchronous targets and asynchronous chunk targets fill `halfvec(768)` and
//! `halfvec(256)` columns with `embed()` rounded to half precision (within 1e-3 of `embed()` in
//! every value and in cosine distance; bit for bit `embed(…)::halfvec` where a text is embedded
//! alone), and other types are still refused with a HINT.

use embeddinggemma_sql_tests::*;
use postgres::Client;

const TEXTS: &str = "('the first halfvec document'), ('a second one, a little longer than the first'), ('x')";

/// Rows of `table` whose `column` is further than 1e-3 from `embed(text, 'document', dim)` in
/// any value, or in cosine distance. (Not compared bit for bit with `embed(…)::halfvec`: a
/// batch's values differ from one text's in the last float bits, which can move a rounding.)
fn wrong(c: &mut Client, table: &str, text: &str, column: &str, dim: i32) -> i64 {
    c.query_one(
        &format!(
            "SELECT count(*) FROM {table} d
              WHERE {column} IS NULL OR {column}::vector <=> embed({text}, 'document', {dim}) > 1e-3
                 OR (SELECT max(abs(a - b)) FROM unnest({column}::vector::real[], embed({text}, 'document', {dim})::real[]) AS u(a, b)) > 1e-3"
        ),
        &[],
    )
    .unwrap()
    .get(0)
}

fn docs(c: &mut Client, table: &str) {
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table} CASCADE;
         CREATE TABLE {table} (id serial PRIMARY KEY, body text, v halfvec(768), w halfvec(256));"
    ))
    .unwrap();
}

fn chunk_table(c: &mut Client, table: &str) {
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table};
         CREATE TABLE {table} (doc_id int, chunk int, start_offset int, end_offset int, body text,
                               embedding halfvec(768), PRIMARY KEY (doc_id, chunk));"
    ))
    .unwrap();
}

fn check_both(c: &mut Client, table: &str) {
    let rows: i64 = c.query_one(&format!("SELECT count(*) FROM {table}"), &[]).unwrap().get(0);
    assert!(rows >= 3, "{table}: {rows} rows");
    assert_eq!(wrong(c, table, "body", "v", 768), 0, "{table}: halfvec(768) values");
    assert_eq!(wrong(c, table, "body", "w", 256), 0, "{table}: halfvec(256) values");
}

#[test]
fn the_row_trigger_fills_halfvec_targets() {
    let mut c = connect();
    docs(&mut c, "hv_row");
    c.batch_execute(&format!(
        "CREATE TRIGGER embed_v BEFORE INSERT OR UPDATE ON hv_row FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v');
         CREATE TRIGGER embed_w BEFORE INSERT OR UPDATE ON hv_row FOR EACH ROW
           EXECUTE FUNCTION embeddinggemma_trigger('body', 'w', 'document', '256');
         INSERT INTO hv_row (body) VALUES {TEXTS};
         UPDATE hv_row SET body = 'changed' WHERE id = 1;"
    ))
    .unwrap();
    check_both(&mut c, "hv_row");
    c.batch_execute("DROP TABLE hv_row").unwrap();
}

/// Rounded as pgvector's own cast rounds (to nearest even): bit for bit `embed(…)::halfvec` where
/// a text is embedded alone — on the server without the service, whose calls no other session's
/// texts share (in a shared batch the float values move in their last bits).
#[test]
fn the_row_trigger_rounds_as_pgvectors_cast() {
    let mut c = connect_in_process();
    docs(&mut c, "hv_round");
    c.batch_execute(&format!(
        "CREATE TRIGGER embed_v BEFORE INSERT OR UPDATE ON hv_round FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v');
         INSERT INTO hv_round (body) VALUES {TEXTS};"
    ))
    .unwrap();
    let exact: i64 = c.query_one("SELECT count(*) FROM hv_round WHERE v = embed(body)::halfvec", &[]).unwrap().get(0);
    assert_eq!(exact, 3, "the row trigger's halfvec is not embed()::halfvec");
    c.batch_execute("DROP TABLE hv_round").unwrap();
}

#[test]
fn the_statement_trigger_fills_halfvec_targets() {
    let mut c = connect();
    docs(&mut c, "hv_stmt");
    c.batch_execute(&format!(
        "CREATE TRIGGER v_ins AFTER INSERT ON hv_stmt REFERENCING NEW TABLE AS new_rows
           FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v');
         CREATE TRIGGER w_ins AFTER INSERT ON hv_stmt REFERENCING NEW TABLE AS new_rows
           FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'w', 'document', '256');
         CREATE TRIGGER v_upd AFTER UPDATE ON hv_stmt REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
           FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v');
         CREATE TRIGGER w_upd AFTER UPDATE ON hv_stmt REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
           FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'w', 'document', '256');
         INSERT INTO hv_stmt (body) VALUES {TEXTS};
         UPDATE hv_stmt SET body = 'changed' WHERE id = 1;"
    ))
    .unwrap();
    check_both(&mut c, "hv_stmt");
    c.batch_execute("DROP TABLE hv_stmt").unwrap();
}

#[test]
fn the_backfill_fills_halfvec_targets() {
    let mut c = connect();
    docs(&mut c, "hv_fill");
    c.batch_execute(&format!("INSERT INTO hv_fill (body) VALUES {TEXTS}")).unwrap();
    c.batch_execute("CALL embeddinggemma_backfill('hv_fill', 'body', 'v')").unwrap();
    c.batch_execute("CALL embeddinggemma_backfill('hv_fill', 'body', 'w', 'document', 256)").unwrap();
    check_both(&mut c, "hv_fill");
    c.batch_execute("DROP TABLE hv_fill").unwrap();
}

#[test]
fn an_asynchronous_target_fills_halfvec_targets() {
    let mut c = connect();
    docs(&mut c, "hv_async");
    c.batch_execute(&format!(
        "INSERT INTO hv_async (body) VALUES ('there before registration');
         SELECT embeddinggemma_async('hv_async', 'body', 'v');
         SELECT embeddinggemma_async('hv_async', 'body', 'w', 'document', 256);
         INSERT INTO hv_async (body) VALUES {TEXTS};
         UPDATE hv_async SET body = 'changed' WHERE id = 2;"
    ))
    .unwrap();
    for target in ["v", "w"] {
        let done: bool = c
            .query_one(&format!("SELECT embeddinggemma_async_wait('hv_async', '{target}', '120 s')"), &[])
            .unwrap()
            .get(0);
        assert!(done, "target {target} never drained");
    }
    check_both(&mut c, "hv_async");
    c.batch_execute(
        "SELECT embeddinggemma_async_drop('hv_async', 'v'); SELECT embeddinggemma_async_drop('hv_async', 'w');
         DROP TABLE hv_async",
    )
    .unwrap();
}

/// Chunks of a halfvec chunk table, by the chunk trigger, the chunk backfill and an asynchronous
/// chunk target: each chunk's embedding is `embed(chunk body)::halfvec`.
#[test]
fn chunk_tables_with_halfvec_embeddings_are_filled_on_every_path() {
    let mut c = connect();
    let long = "A halfvec chunk table keeps half the bytes of a vector one. ".repeat(40);
    for (docs_table, chunks) in [("hv_cdocs", "hv_chunks"), ("hv_bdocs", "hv_bchunks"), ("hv_adocs", "hv_achunks")] {
        c.batch_execute(&format!(
            "DROP TABLE IF EXISTS {docs_table} CASCADE; CREATE TABLE {docs_table} (id int PRIMARY KEY, body text);"
        ))
        .unwrap();
        chunk_table(&mut c, chunks);
    }
    c.batch_execute(&format!(
        "CREATE TRIGGER chunked AFTER INSERT OR UPDATE OR DELETE ON hv_cdocs FOR EACH ROW
           EXECUTE FUNCTION embeddinggemma_chunk_trigger('id', 'body', 'hv_chunks', 'doc_id', '64', '8');
         INSERT INTO hv_cdocs VALUES (1, '{long}'), (2, 'short');
         INSERT INTO hv_bdocs VALUES (1, '{long}'), (2, 'short');
         INSERT INTO hv_adocs VALUES (1, '{long}'), (2, 'short');
         SELECT embeddinggemma_async_chunks('hv_adocs', 'hv_achunks', max_tokens => 64, overlap => 8);
         -- The backfill chunks with the settings of the table's chunk trigger, installed after the writes.
         CREATE TRIGGER chunked AFTER INSERT OR UPDATE OR DELETE ON hv_bdocs FOR EACH ROW
           EXECUTE FUNCTION embeddinggemma_chunk_trigger('id', 'body', 'hv_bchunks', 'doc_id', '64', '8');"
    ))
    .unwrap();
    c.batch_execute("CALL embeddinggemma_chunk_backfill('hv_bdocs', 'hv_bchunks')").unwrap();
    let done: bool =
        c.query_one("SELECT embeddinggemma_async_wait('hv_adocs', 'hv_achunks', '120 s')", &[]).unwrap().get(0);
    assert!(done, "the asynchronous chunk target never drained");
    for chunks in ["hv_chunks", "hv_bchunks", "hv_achunks"] {
        let (rows, wrong): (i64, i64) = {
            let r = c
                .query_one(
                    &format!(
                        "SELECT count(*), count(*) FILTER (WHERE embedding IS NULL OR embedding::vector <=> embed(body) > 1e-3
                               OR (SELECT max(abs(a - b)) FROM unnest(embedding::vector::real[], embed(body)::real[]) AS u(a, b)) > 1e-3)
                           FROM {chunks}"
                    ),
                    &[],
                )
                .unwrap();
            (r.get(0), r.get(1))
        };
        assert!(rows > 2, "{chunks}: {rows} chunks (the long document was not cut)");
        assert_eq!(wrong, 0, "{chunks}: chunks whose embedding is not their body's");
    }
    c.batch_execute(
        "SELECT embeddinggemma_async_drop('hv_adocs', 'hv_achunks');
         DROP TABLE hv_cdocs, hv_bdocs, hv_adocs, hv_chunks, hv_bchunks, hv_achunks",
    )
    .unwrap();
}

#[test]
fn other_target_types_are_still_refused_with_a_hint() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS hv_bad;
         CREATE TABLE hv_bad (id int PRIMARY KEY, body text, s sparsevec(768), h halfvec(128), r real[]);",
    )
    .unwrap();
    for (column, dim, needle) in
        [("s", 768, "not vector or halfvec"), ("r", 768, "not vector or halfvec"), ("h", 768, "halfvec(128)")]
    {
        let (code, message, hint) = expect_error(
            &mut c,
            &format!("SELECT embeddinggemma_async('hv_bad', 'body', '{column}', 'document', {dim})"),
        );
        assert_eq!(code, "42804", "{message}");
        assert!(message.contains(needle), "{message}");
        assert!(hint.is_some(), "{message}: no hint");
    }
    c.batch_execute("DROP TABLE hv_bad").unwrap();
}
