//! A distributed table on the three-node Citus cluster of `scripts/citus` (a coordinator and
//! two workers, each with its own embedding service): every write path embeds on the workers
//! and gives the vectors a single server gives. What is checked is plumbing (where each path
//! embeds, what reaches the shards), so `scripts/test` has the nodes serve the tiny fixture
//! model (48 dimensions); single-node references come from the main test server
//! (`EMBEDDINGGEMMA_TEST_DSN`) in a session pointed at the same model.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use embeddinggemma_sql_tests::{connect, docstrings, expect_error, load::short_text, use_tiny_model};
use postgres::{Client, NoTls};

/// The tests share the cluster's services, whose counters they read: one at a time.
static CLUSTER: Mutex<()> = Mutex::new(());

fn node_dsn(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the SQL tests through scripts/test (it starts scripts/citus)")
    })
}

fn coordinator() -> Client {
    Client::connect(&node_dsn("EMBEDDINGGEMMA_TEST_CITUS_DSN"), NoTls).expect("cannot connect to the Citus coordinator")
}

fn workers() -> Vec<Client> {
    ["EMBEDDINGGEMMA_TEST_CITUS_WORKER1_DSN", "EMBEDDINGGEMMA_TEST_CITUS_WORKER2_DSN"]
        .iter()
        .map(|v| Client::connect(&node_dsn(v), NoTls).expect("cannot connect to a Citus worker"))
        .collect()
}

/// The tiny model's width: the vector columns, and `dim` wherever it is not the default 768.
const DIM: i32 = 48;

/// A session of the main test server with the tiny model (in-process): the single-node reference.
fn single_node() -> Client {
    let mut c = connect();
    use_tiny_model(&mut c);
    c
}

/// Texts each node's service has embedded so far: [coordinator, worker1, worker2].
fn served() -> [i64; 3] {
    let mut nodes = vec![coordinator()];
    nodes.extend(workers());
    let n: Vec<i64> = nodes
        .iter_mut()
        .map(|c| c.query_one("SELECT coalesce(texts, 0) FROM embeddinggemma_service", &[]).unwrap().get(0))
        .collect();
    [n[0], n[1], n[2]]
}

/// The work between `before` and now was done by the workers' services, both of them, and
/// not by the coordinator's.
fn assert_on_workers(before: [i64; 3], what: &str) {
    let after = served();
    let d: Vec<i64> = (0..3).map(|i| after[i] - before[i]).collect();
    eprintln!("{what}: texts embedded by the coordinator's service {}, worker1's {}, worker2's {}", d[0], d[1], d[2]);
    assert_eq!(d[0], 0, "{what}: the coordinator's service embedded texts");
    assert!(d[1] > 0 && d[2] > 0, "{what}: a worker's service embedded nothing: {d:?}");
}

/// A row's key, text and vector.
type VectorRow = (i64, Option<String>, Option<Vec<f32>>);

/// Rows (id, text, vector) of `table` in the cluster, by id.
fn vectors(c: &mut Client, table: &str, text: &str, vector: &str) -> Vec<VectorRow> {
    c.query(&format!("SELECT id::int8, {text}, {vector}::real[] FROM {table} ORDER BY id"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Every row's vector is single-node embed() of its text (NULL for a NULL text).
fn assert_single_node_vectors(rows: &[VectorRow], what: &str) {
    let mut single = single_node();
    let texts: Vec<Option<String>> = rows.iter().map(|r| r.1.clone()).collect();
    let expected: Vec<Option<Vec<f32>>> = single
        .query(
            "SELECT e.embedding::real[] FROM embed_batch($1::text[], 'document', $2) e ORDER BY e.ord",
            &[&texts, &DIM],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for ((id, text, got), want) in rows.iter().zip(&expected) {
        match (got, want) {
            (Some(g), Some(w)) => {
                let diff = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff <= 1e-6, "{what}: row {id}: the vector differs from single-node embed() by {diff}");
            }
            (None, None) => {}
            _ => {
                panic!("{what}: row {id} (text {text:?}): vector {:?}, single node {:?}", got.is_some(), want.is_some())
            }
        }
    }
}

/// Chunks of `table`'s documents equal single-node embed_chunks() of the documents' texts.
fn assert_single_node_chunks(c: &mut Client, docs: &str, chunks: &str, max_tokens: i32, overlap: i32) -> usize {
    let documents: Vec<(i64, String)> = c
        .query(&format!("SELECT id::int8, body FROM {docs} ORDER BY id"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut single = single_node();
    let mut total = 0;
    for (id, body) in documents {
        let got: Vec<(i32, String, Vec<f32>)> = c
            .query(
                &format!("SELECT chunk, body, embedding::real[] FROM {chunks} WHERE doc_id = $1 ORDER BY chunk"),
                &[&id],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let want: Vec<(i32, String, Vec<f32>)> = single
            .query(
                "SELECT chunk, body, embedding::real[] FROM embed_chunks($1, $2, $3, 'document', $4) ORDER BY chunk",
                &[&body, &max_tokens, &overlap, &DIM],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(got.len(), want.len(), "document {id}: {} chunks, single node {}", got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((g.0, &g.1), (w.0, &w.1), "document {id}: chunk {} differs", g.0);
            let diff = g.2.iter().zip(&w.2).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff <= 1e-6, "document {id} chunk {}: differs from single-node embed_chunks() by {diff}", g.0);
        }
        total += got.len();
    }
    total
}

fn short_rows(n: usize, seed: u64) -> Vec<String> {
    (0..n as u64).map(|i| format!("Note: {}", short_text(seed + i))).collect()
}

/// Runs statements one at a time: Citus propagates a DDL statement by its query string, so it
/// refuses several statements in one.
fn each(c: &mut Client, sql: &str) {
    for statement in sql.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
        c.batch_execute(statement).unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

fn distributed_table(c: &mut Client, name: &str, columns: &str, shards: i32) {
    each(c, &format!("DROP TABLE IF EXISTS {name} CASCADE;\nCREATE TABLE {name} ({columns})"));
    let key = if columns.starts_with("doc_id") { "doc_id" } else { "id" };
    c.execute(&format!("SELECT create_distributed_table('{name}', '{key}', shard_count => $1)"), &[&shards]).unwrap();
}

/// Distributed `docs` (id, body) with a chunk table `<docs>_chunks` distributed by doc_id as
/// `distribution` says, and the chunk trigger (48 tokens, overlap 8) writing it.
fn documents_with_chunk_trigger(c: &mut Client, docs: &str, distribution: &str) {
    distributed_table(c, docs, "id bigint PRIMARY KEY, body text", 4);
    let chunks = format!("{docs}_chunks");
    each(
        c,
        &format!(
            "DROP TABLE IF EXISTS {chunks};\n\
             CREATE TABLE {chunks} (doc_id bigint, chunk int, start_offset int, end_offset int, body text, embedding vector({DIM}), PRIMARY KEY (doc_id, chunk));\n\
             SELECT create_distributed_table('{chunks}', 'doc_id', {distribution});\n\
             CREATE TRIGGER c AFTER INSERT OR UPDATE OR DELETE ON {docs} FOR EACH ROW \
               EXECUTE FUNCTION embeddinggemma_chunk_trigger('id', 'body', '{chunks}', 'doc_id', '48', '8', 'document', '{DIM}')"
        ),
    );
}

#[test]
fn a_distributed_update_embeds_on_the_workers_as_one_server_would() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = coordinator();
    distributed_table(&mut c, "c_update", &format!("id bigint PRIMARY KEY, body text, v vector({DIM})"), 4);
    let texts = short_rows(60, 1000);
    c.execute(
        "INSERT INTO c_update (id, body) SELECT i, t FROM unnest($1::text[]) WITH ORDINALITY AS x(t, i)",
        &[&texts],
    )
    .unwrap();
    c.execute("UPDATE c_update SET body = NULL WHERE id = 7", &[]).unwrap();
    let before = served();
    let n = c.execute("UPDATE c_update SET v = embed(body, 'document', $1)", &[&DIM]).unwrap();
    assert_eq!(n, 60);
    assert_on_workers(before, "UPDATE c_update SET v = embed(body, 'document', 48)");
    assert_single_node_vectors(&vectors(&mut c, "c_update", "body", "v"), "distributed UPDATE");
    c.batch_execute("DROP TABLE c_update").unwrap();
}

#[test]
fn row_statement_and_chunk_triggers_fire_on_the_shards() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = coordinator();
    // The row trigger.
    distributed_table(&mut c, "c_row", &format!("id bigint PRIMARY KEY, body text, v vector({DIM})"), 4);
    c.batch_execute(&format!("CREATE TRIGGER e BEFORE INSERT OR UPDATE ON c_row FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v', 'document', '{DIM}')")).unwrap();
    let before = served();
    let texts = short_rows(24, 2000);
    c.execute("INSERT INTO c_row (id, body) SELECT i, t FROM unnest($1::text[]) WITH ORDINALITY AS x(t, i)", &[&texts])
        .unwrap();
    c.execute("UPDATE c_row SET body = 'A changed note about the garden.' WHERE id IN (3, 11)", &[]).unwrap();
    c.execute("UPDATE c_row SET body = NULL WHERE id = 5", &[]).unwrap();
    assert_on_workers(before, "row trigger");
    assert_single_node_vectors(&vectors(&mut c, "c_row", "body", "v"), "row trigger");

    // The statement trigger (a distributed table's key cannot change: Citus refuses that).
    distributed_table(
        &mut c,
        "c_stmt",
        &format!("id bigint PRIMARY KEY, body text, n int DEFAULT 0, v vector({DIM})"),
        4,
    );
    each(
        &mut c,
        &format!(
            "CREATE TRIGGER i AFTER INSERT ON c_stmt REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v', 'document', '{DIM}');
         CREATE TRIGGER u AFTER UPDATE ON c_stmt REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v', 'document', '{DIM}');"
        ),
    );
    let before = served();
    let texts = short_rows(24, 3000);
    c.execute(
        "INSERT INTO c_stmt (id, body) SELECT i, t FROM unnest($1::text[]) WITH ORDINALITY AS x(t, i)",
        &[&texts],
    )
    .unwrap();
    c.execute("UPDATE c_stmt SET body = body || ' Again.' WHERE id % 3 = 0", &[]).unwrap();
    c.execute("UPDATE c_stmt SET n = n + 1", &[]).unwrap();
    assert_on_workers(before, "statement trigger");
    assert_single_node_vectors(&vectors(&mut c, "c_stmt", "body", "v"), "statement trigger");

    // The chunk trigger, its chunk table co-located by the document key.
    documents_with_chunk_trigger(&mut c, "c_docs", "colocate_with => 'c_docs'");
    let before = served();
    let docs: Vec<String> = (0..8).map(|i| short_rows(6, 4000 + 10 * i).join(" ")).collect();
    c.execute("INSERT INTO c_docs (id, body) SELECT i, t FROM unnest($1::text[]) WITH ORDINALITY AS x(t, i)", &[&docs])
        .unwrap();
    c.execute("UPDATE c_docs SET body = 'One short text now.' WHERE id = 2", &[]).unwrap();
    c.execute("DELETE FROM c_docs WHERE id = 3", &[]).unwrap();
    assert_on_workers(before, "chunk trigger");
    let chunks = assert_single_node_chunks(&mut c, "c_docs", "c_docs_chunks", 48, 8);
    assert!(chunks > 7, "{chunks} chunks");
    let orphans: i64 = c.query_one("SELECT count(*) FROM c_docs_chunks WHERE doc_id = 3", &[]).unwrap().get(0);
    assert_eq!(orphans, 0, "the deleted document's chunks stay");

    // Not co-located: a clear error on the shard, with the way that works.
    documents_with_chunk_trigger(&mut c, "c_apart", "shard_count => 3, colocate_with => 'none'");
    let (_, message, hint) = expect_error(&mut c, "INSERT INTO c_apart VALUES (1, 'Some text to chunk.')");
    assert!(message.contains("not co-located"), "{message}");
    assert!(hint.unwrap_or_default().contains("colocate_with"));
    c.batch_execute("DROP TABLE c_row, c_stmt, c_docs_chunks, c_docs, c_apart_chunks, c_apart").unwrap();
}

/// Starts `call` on the coordinator in a thread; once some rows are done (`progress` > 0),
/// kills it there and its shards' sessions on the workers. Returns what `progress` said then.
fn kill_midway(call: &str, progress: &str) -> i64 {
    let mut c = coordinator();
    let pid: i32 = {
        let mut runner = coordinator();
        let pid: i32 = runner.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        let call = call.to_string();
        std::thread::spawn(move || {
            let _ = runner.batch_execute(&call);
        });
        pid
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    let done = loop {
        let done: i64 = c.query_one(progress, &[]).unwrap().get(0);
        if done > 0 {
            break done;
        }
        assert!(Instant::now() < deadline, "{call}: nothing done after 10 minutes");
        std::thread::sleep(Duration::from_millis(100));
    };
    // While it runs, the coordinator sees its run and, through the workers, each shard's.
    c.execute("SELECT pg_terminate_backend($1::int)", &[&pid]).unwrap();
    c.batch_execute(
        "SELECT run_command_on_workers($$SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                                          WHERE query LIKE 'CALL %backfill%' AND pid <> pg_backend_pid()$$)",
    )
    .unwrap();
    done
}

#[test]
fn both_backfills_run_from_the_coordinator_on_every_shard_and_resume_after_a_kill() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = coordinator();
    distributed_table(&mut c, "c_fill", &format!("id bigint PRIMARY KEY, body text, v vector({DIM})"), 4);
    c.batch_execute(&format!("CREATE TRIGGER e BEFORE INSERT OR UPDATE ON c_fill FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v', 'document', '{DIM}')")).unwrap();
    c.batch_execute("ALTER TABLE c_fill DISABLE TRIGGER e").unwrap();
    let texts = short_rows(600, 5000);
    c.execute(
        "INSERT INTO c_fill (id, body) SELECT i, t FROM unnest($1::text[]) WITH ORDINALITY AS x(t, i)",
        &[&texts],
    )
    .unwrap();
    c.batch_execute("ALTER TABLE c_fill ENABLE TRIGGER e").unwrap();
    let before = served();
    let call = "CALL embeddinggemma_backfill('c_fill', 'body', 'v', dim => 48, batch_size => 4)";
    let done = kill_midway(call, "SELECT count(v) FROM c_fill");
    let after_kill: i64 = c.query_one("SELECT count(v) FROM c_fill", &[]).unwrap().get(0);
    eprintln!("killed with {done} rows done ({after_kill} once the shards' sessions were gone)");
    assert!(after_kill < 600, "the backfill finished before the kill");
    c.batch_execute(call).unwrap();
    assert_on_workers(before, "embeddinggemma_backfill");
    assert_single_node_vectors(&vectors(&mut c, "c_fill", "body", "v"), "backfill");
    // Progress on the coordinator: the distributed run, finished, and each shard's own.
    let (state, left): (bool, i64) = c
        .query_one(
            "SELECT finished_at IS NOT NULL, rows_remaining FROM embeddinggemma_backfills
              WHERE relation = 'c_fill'::regclass ORDER BY started_at DESC LIMIT 1",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert!(state && left == 0, "the coordinator's run: finished {state}, {left} left");
    let shards: Vec<(i64, Option<i64>, Option<bool>)> = c
        .query(
            "SELECT shard, rows_remaining, finished_at IS NOT NULL FROM embeddinggemma_backfill_shards('c_fill')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(shards.len(), 4, "{shards:?}");
    assert!(shards.iter().all(|s| s.1 == Some(0) && s.2 == Some(true)), "{shards:?}");

    // The chunk backfill.
    documents_with_chunk_trigger(&mut c, "c_cdocs", "colocate_with => 'c_cdocs'");
    c.batch_execute("ALTER TABLE c_cdocs DISABLE TRIGGER c").unwrap();
    let docs: Vec<String> = (0..48).map(|i| short_rows(4, 9000 + 10 * i).join(" ")).collect();
    c.execute(
        "INSERT INTO c_cdocs (id, body) SELECT i, t FROM unnest($1::text[]) WITH ORDINALITY AS x(t, i)",
        &[&docs],
    )
    .unwrap();
    c.batch_execute("ALTER TABLE c_cdocs ENABLE TRIGGER c").unwrap();
    let before = served();
    let call = "CALL embeddinggemma_chunk_backfill('c_cdocs', 'c_cdocs_chunks', batch_size => 1)";
    kill_midway(call, "SELECT count(DISTINCT doc_id) FROM c_cdocs_chunks");
    let chunked: i64 = c.query_one("SELECT count(DISTINCT doc_id) FROM c_cdocs_chunks", &[]).unwrap().get(0);
    assert!(chunked < 48, "the chunk backfill finished before the kill");
    c.batch_execute(call).unwrap();
    assert_on_workers(before, "embeddinggemma_chunk_backfill");
    let n = assert_single_node_chunks(&mut c, "c_cdocs", "c_cdocs_chunks", 48, 8);
    assert!(n >= 48, "{n} chunks");
    c.batch_execute("DROP TABLE c_fill, c_cdocs_chunks, c_cdocs").unwrap();
}

#[test]
fn hnsw_search_on_a_distributed_table_finds_the_exact_top_10_with_the_query_embedded_once() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = coordinator();
    distributed_table(&mut c, "c_search", &format!("id bigint PRIMARY KEY, body text, v vector({DIM})"), 4);
    let passages = docstrings(350);
    let (corpus, queries) = passages.split_at(300);
    c.execute(
        "INSERT INTO c_search (id, body) SELECT i, t FROM unnest($1::text[]) WITH ORDINALITY AS x(t, i)",
        &[&corpus.to_vec()],
    )
    .unwrap();
    c.execute("UPDATE c_search SET v = embed(body, 'document', $1)", &[&DIM]).unwrap();
    each(
        &mut c,
        "CREATE INDEX ON c_search USING hnsw (v vector_cosine_ops);
         DROP TABLE IF EXISTS c_search_single;
         CREATE TABLE c_search_single AS SELECT id, v FROM c_search;",
    );
    let queries: Vec<String> = queries.iter().map(|q| q.chars().take(160).collect()).collect();
    let before = served();
    let mut found = 0;
    for q in &queries {
        let mut t = c.transaction().unwrap();
        // SET is not propagated to the workers; SET LOCAL is, with this. A shard of ~75 rows
        // would be scanned, not searched, without enable_seqscan = off.
        t.batch_execute("SET LOCAL citus.propagate_set_commands = 'local'; SET LOCAL hnsw.ef_search = 200; SET LOCAL enable_seqscan = off").unwrap();
        let plan: String = t
            .query("EXPLAIN SELECT id FROM c_search ORDER BY v <=> embed($1, 'query', 48) LIMIT 10", &[q])
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(plan.contains("hnsw") || plan.contains("Index Scan"), "the shards do not use the index:\n{plan}");
        let approx: Vec<i64> = t
            .query("SELECT id FROM c_search ORDER BY v <=> embed($1, 'query', 48) LIMIT 10", &[q])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        t.commit().unwrap();
        let exact: Vec<i64> = c
            .query("SELECT id FROM c_search_single ORDER BY v <=> embed($1, 'query', 48) LIMIT 10", &[q])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        found += approx.iter().filter(|id| exact.contains(id)).count();
    }
    let after = served();
    let recall = found as f64 / (10 * queries.len()) as f64;
    eprintln!("recall@10 over {} queries: {recall}", queries.len());
    assert_eq!(recall, 1.0);
    // Each query text was embedded by the coordinator only (EXPLAIN, search and exact search:
    // three calls of one text per query), never by the workers.
    assert_eq!([after[1] - before[1], after[2] - before[2]], [0, 0], "the workers embedded the query");
    assert!(after[0] - before[0] <= 3 * queries.len() as i64, "the query was embedded more than once per statement");
    c.batch_execute("DROP TABLE c_search, c_search_single").unwrap();
}

#[test]
fn what_citus_cannot_do_is_refused_with_the_way_that_works() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = coordinator();
    distributed_table(&mut c, "c_refused", &format!("id bigint PRIMARY KEY, body text, v vector({DIM})"), 4);
    let (code, message, hint) =
        expect_error(&mut c, "SELECT embeddinggemma_async('c_refused', 'body', 'v', dim => 48)");
    assert_eq!(code, "0A000", "{message}");
    assert!(message.contains("distributed"), "{message}");
    assert!(hint.unwrap_or_default().contains("embeddinggemma_trigger"));
    c.batch_execute("DROP TABLE c_refused").unwrap();
}
