//! Chunking (issue 11): chunks() and embed_chunks() on the real model and the tiny one, the
//! array form's batching, the chunk trigger and the chunk backfill, bad arguments.

use std::thread;
use std::time::{Duration, Instant};

use embeddinggemma_sql_tests::*;
use postgres::Client;

/// Same text embedded alone or in a batch: the engine's batch-invariance bound.
const SAME_TEXT: f64 = 1e-6;

fn tiny() -> Client {
    let mut c = connect();
    use_tiny_model(&mut c);
    c
}

/// (chunk, start_offset, end_offset, body) of chunks().
type ChunkRow = (i32, i32, i32, String);

fn chunks(c: &mut Client, text: &str, max_tokens: i32, overlap: i32, task: &str) -> Vec<ChunkRow> {
    c.query(
        "SELECT chunk, start_offset, end_offset, body FROM chunks($1, $2, $3, $4) ORDER BY chunk",
        &[&text, &max_tokens, &overlap, &task],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

/// Checks the offsets against the bodies and that the chunks, without their overlaps, give
/// the text back exactly; returns the overlaps in characters.
fn assert_reassembles(text: &str, rows: &[ChunkRow]) -> Vec<usize> {
    let chars: Vec<char> = text.chars().collect();
    if text.is_empty() {
        assert!(rows.is_empty(), "an empty text has chunks: {rows:?}");
        return Vec::new();
    }
    let (mut rebuilt, mut end, mut overlaps) = (String::new(), 1usize, Vec::new());
    for (i, (n, start, stop, body)) in rows.iter().enumerate() {
        assert_eq!(*n as usize, i + 1, "chunk numbers");
        let (start, stop) = (*start as usize, *stop as usize);
        assert!(
            start >= 1 && start < stop && stop <= chars.len() + 1,
            "chunk {n}: offsets {start}..{stop} of {}",
            chars.len()
        );
        assert_eq!(
            &chars[start - 1..stop - 1].iter().collect::<String>(),
            body,
            "chunk {n}: substr(input, start_offset, end_offset - start_offset) is not the body"
        );
        assert!(
            i == 0 && start == 1 || i > 0 && start <= end,
            "chunk {n} starts at {start}, after the previous end {end}"
        );
        assert!(stop > end || i == 0, "chunk {n} ends at {stop}, not after the previous end {end}");
        overlaps.push(end.saturating_sub(start));
        rebuilt.extend(&chars[end.max(start) - 1..stop - 1]);
        end = stop;
    }
    assert_eq!(end, chars.len() + 1, "the last chunk does not end at the end of the text");
    assert!(rebuilt == text, "the chunks without their overlaps do not give the text back");
    overlaps
}

fn mixed_text() -> String {
    let parts = [
        "Tokyo (東京) est la capitale du Japon. 東京都は日本の首都であり、人口は約1400万人です。",
        "Family emoji 👨‍👩‍👧‍👦 and flags 🇯🇵🇫🇷, skin tones 👍🏽.",
        "Combining marks: e\u{301} a\u{308} n\u{303} — Zalgo: Z\u{35b}\u{316}a\u{34e}l\u{317}g\u{33c}o\u{301}.",
        "Ελληνικά και русский текст, עברית ועברית, العربية.",
        "nowhitespaceatallforquitealongstretchofcharactersthatkeepsgoing",
    ];
    (0..40).map(|i| parts[i % parts.len()]).collect::<Vec<_>>().join(if true { "\n\n" } else { " " })
}

#[test]
fn chunks_of_real_documents_fit_the_model_reassemble_and_embed_as_their_bodies() {
    let mut c = connect();
    let doc = docstrings(12).join("\n\n");
    let mixed = mixed_text();
    for (text, max_tokens, overlap, task) in
        [(&doc, 128, 16, "document"), (&doc, 96, 0, "query"), (&mixed, 64, 8, "document")]
    {
        let rows = chunks(&mut c, text, max_tokens, overlap, task);
        assert!(rows.len() >= 3, "{} chunks only", rows.len());
        let overlaps = assert_reassembles(text, &rows);
        if overlap == 0 {
            assert!(overlaps.iter().all(|&o| o == 0), "overlap 0 gave overlaps {overlaps:?}");
        } else {
            assert!(overlaps[1..].iter().all(|&o| o > 0), "overlap {overlap} gave none somewhere: {overlaps:?}");
        }
        // Each body, embedded alone with the task, fits max_tokens (prompt, <bos>, <eos>
        // included) and is not truncated.
        for (n, _, _, body) in &rows {
            let (tokens, truncated) = (stat::<i64>(&mut c, "real_tokens"), stat::<i64>(&mut c, "truncated"));
            embed(&mut c, body, task, 768);
            let used = stat::<i64>(&mut c, "real_tokens") - tokens;
            assert!(used <= max_tokens as i64, "chunk {n}: {used} tokens > {max_tokens}");
            assert!(
                used >= max_tokens as i64 / 4 || *n as usize == rows.len(),
                "chunk {n}: only {used} of {max_tokens} tokens"
            );
            assert_eq!(stat::<i64>(&mut c, "truncated"), truncated, "chunk {n} was truncated");
        }
    }
    // embed_chunks: the same chunks, each vector that of embed(body).
    let rows = c.query("SELECT chunk, start_offset, end_offset, body, embedding::real[], embed(body)::real[] FROM embed_chunks($1, 128, 16) ORDER BY chunk", &[&doc]).unwrap();
    let want = chunks(&mut c, &doc, 128, 16, "document");
    assert_eq!(rows.len(), want.len());
    for (row, w) in rows.iter().zip(&want) {
        assert_eq!(
            (row.get::<_, i32>(0), row.get::<_, i32>(1), row.get::<_, i32>(2), row.get::<_, String>(3)),
            w.clone()
        );
        let d = cosine_distance(&row.get::<_, Vec<f32>>(4), &row.get::<_, Vec<f32>>(5));
        assert!(d <= SAME_TEXT, "chunk {}: embed_chunks is {d:e} from embed(body)", w.0);
    }
}

#[test]
fn chunks_of_a_1_mb_text_and_of_edge_cases_reassemble() {
    let mut c = tiny();
    let big: String = mixed_text().repeat((1 << 20) / mixed_text().len() + 1);
    assert!(big.len() >= 1 << 20);
    let started = Instant::now();
    let rows = chunks(&mut c, &big, 48, 8, "document");
    eprintln!("1 MB text: {} chunks in {:.1} s", rows.len(), started.elapsed().as_secs_f64());
    assert_reassembles(&big, &rows);
    for text in [
        "",
        " ",
        "\n\n\n\n",
        "a",
        "é",
        "👨‍👩‍👧‍👦",
        &"x".repeat(5000),
        &"e\u{301}".repeat(3000),
        &"。".repeat(3000),
        &"word ".repeat(2000),
    ] {
        for (max_tokens, overlap) in [(48, 0), (48, 8), (24, 3)] {
            let rows = chunks(&mut c, text, max_tokens, overlap, "document");
            assert_reassembles(text, &rows);
        }
    }
    let nulls: i64 = c
        .query_one("SELECT count(*) FROM chunks(NULL), embed_chunks(ARRAY[NULL, ''], 48, 8, 'document', 48)", &[])
        .unwrap()
        .get(0);
    assert_eq!(nulls, 0, "NULL and empty documents have no chunks");
}

#[test]
fn embed_chunks_over_many_documents_batches_as_embed_batch_over_their_bodies() {
    let mut c = tiny();
    let docs = docstrings(300);
    let passes = |c: &mut Client, sql: &str| -> (i64, i64, f64, i64) {
        c.batch_execute("SELECT embeddinggemma_stats_reset()").unwrap();
        let n: i64 = c.query_one(sql, &[&docs]).unwrap().get(0);
        (n, stat(c, "forward_passes"), stat(c, "fill_ratio"), stat(c, "texts"))
    };
    let chunked = passes(&mut c, "SELECT count(*) FROM embed_chunks($1::text[], 48, 8, 'document', 48)");
    let batched = passes(
        &mut c,
        "SELECT count(*) FROM embed_batch((SELECT array_agg(c.body ORDER BY d.ord, c.chunk)
                                             FROM unnest($1::text[]) WITH ORDINALITY d(body, ord), chunks(d.body, 48, 8) c), 'document', 48)",
    );
    eprintln!("embed_chunks: {chunked:?}; embed_batch over the bodies: {batched:?}");
    assert_eq!(chunked.0, batched.0, "chunks");
    assert_eq!(chunked.3, batched.3, "texts embedded");
    assert!(chunked.1 <= batched.1, "embed_chunks ran {} forward passes, embed_batch {}", chunked.1, batched.1);
    assert!(chunked.2 >= batched.2 - 1e-9, "fill ratio {} < {}", chunked.2, batched.2);
    // ord and chunk numbers, and the vectors, as embed_batch gives them.
    let bad: i64 = c
        .query_one(
            "WITH e AS (SELECT * FROM embed_chunks($1::text[], 48, 8, 'document', 48)),
                  c AS (SELECT d.ord::int AS ord, c.* FROM unnest($1::text[]) WITH ORDINALITY d(body, ord), chunks(d.body, 48, 8) c)
             SELECT count(*) FROM e FULL JOIN c USING (ord, chunk)
              WHERE e.body IS DISTINCT FROM c.body OR e.start_offset IS DISTINCT FROM c.start_offset
                 OR (e.embedding <=> embed(c.body, 'document', 48)) > 1e-6 OR e.embedding IS NULL",
            &[&docs[..40].to_vec()],
        )
        .unwrap()
        .get(0);
    assert_eq!(bad, 0, "rows of embed_chunks that differ from chunks() and embed()");
}

#[test]
fn chunk_arguments_out_of_range_get_an_error_with_a_hint() {
    let mut c = tiny();
    for sql in [
        "SELECT * FROM chunks('some text', 3)",
        "SELECT * FROM chunks('some text', 100000)",
        "SELECT * FROM chunks('some text', -5)",
        "SELECT * FROM chunks('some text', 48, -1)",
        "SELECT * FROM chunks('some text', 48, 40)",
        "SELECT * FROM embed_chunks('some text', 48, 8, 'no such task', 48)",
        "SELECT * FROM embed_chunks(ARRAY['some text'], 48, 8, 'document', 7)",
    ] {
        let (code, message, hint) = expect_error(&mut c, sql);
        assert_eq!(code, "22023", "{sql}: {message}");
        assert!(hint.is_some_and(|h| !h.is_empty()), "{sql}: no hint ({message})");
    }
}

const CHUNK_TABLES: &str = "
    DROP TABLE IF EXISTS {t}_chunks, {t};
    CREATE TABLE {t} (id bigint PRIMARY KEY, body text, other int DEFAULT 0);
    CREATE TABLE {t}_chunks (
        doc_id bigint REFERENCES {t} ON DELETE CASCADE ON UPDATE CASCADE,
        chunk int, start_offset int, end_offset int, body text, embedding vector(48),
        PRIMARY KEY (doc_id, chunk));";

fn chunk_tables(c: &mut Client, t: &str, trigger: bool) {
    c.batch_execute(&CHUNK_TABLES.replace("{t}", t)).unwrap();
    if trigger {
        add_chunk_trigger(c, t);
    }
}

fn add_chunk_trigger(c: &mut Client, t: &str) {
    c.batch_execute(&format!(
        "CREATE TRIGGER {t}_chunks AFTER INSERT OR UPDATE OR DELETE ON {t}
            FOR EACH ROW EXECUTE FUNCTION embeddinggemma_chunk_trigger('id', 'body', '{t}_chunks', 'doc_id', '48', '8', 'document', '48')"
    ))
    .unwrap();
}

/// Chunk rows that differ from embed_chunks() of their document's current text (missing,
/// extra, other offsets, bodies or vectors).
fn stale_chunks(c: &mut Client, t: &str) -> i64 {
    c.query_one(
        &format!(
            "WITH want AS (SELECT d.id AS doc_id, e.* FROM {t} d, embed_chunks(d.body, 48, 8, 'document', 48) e)
             SELECT count(*) FROM want w FULL JOIN {t}_chunks g USING (doc_id, chunk)
              WHERE w.body IS DISTINCT FROM g.body OR w.start_offset IS DISTINCT FROM g.start_offset
                 OR w.end_offset IS DISTINCT FROM g.end_offset OR w.embedding IS NULL OR g.embedding IS NULL
                 OR (w.embedding <=> g.embedding) > 1e-6"
        ),
        &[],
    )
    .unwrap()
    .get(0)
}

fn count(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn chunk_trigger_replaces_moves_and_deletes_chunks_and_leaves_unchanged_documents_alone() {
    let mut c = tiny();
    chunk_tables(&mut c, "ct_docs", true);
    let long = docstrings(3).join("\n\n");
    c.execute("INSERT INTO ct_docs (id, body) VALUES (1, $1), (2, 'A short note.'), (3, NULL), (4, '')", &[&long])
        .unwrap();
    assert!(count(&mut c, "SELECT count(*) FROM ct_docs_chunks WHERE doc_id = 1") >= 3);
    assert_eq!(count(&mut c, "SELECT count(*) FROM ct_docs_chunks WHERE doc_id IN (3, 4)"), 0);
    assert_eq!(stale_chunks(&mut c, "ct_docs"), 0);

    let passes: i64 = stat(&mut c, "forward_passes");
    c.batch_execute("UPDATE ct_docs SET other = other + 1").unwrap();
    assert_eq!(stat::<i64>(&mut c, "forward_passes"), passes, "an update that leaves the text alone ran the model");
    c.batch_execute("UPDATE ct_docs SET id = 20 WHERE id = 2").unwrap();
    assert_eq!(stat::<i64>(&mut c, "forward_passes"), passes, "a key change re-embedded the chunks");
    assert_eq!(count(&mut c, "SELECT count(*) FROM ct_docs_chunks WHERE doc_id = 20"), 1);

    c.batch_execute("UPDATE ct_docs SET body = 'Now one short chunk.' WHERE id = 1; UPDATE ct_docs SET body = 'text at last' WHERE id = 3").unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM ct_docs_chunks WHERE doc_id = 1"), 1);
    assert_eq!(stale_chunks(&mut c, "ct_docs"), 0);
    // Key and text at once: the foreign key moves the old chunks, the trigger replaces them.
    c.batch_execute("UPDATE ct_docs SET id = 30, body = 'Another text.' WHERE id = 20").unwrap();
    assert_eq!(stale_chunks(&mut c, "ct_docs"), 0);
    c.batch_execute("UPDATE ct_docs SET body = NULL WHERE id = 3; DELETE FROM ct_docs WHERE id = 30").unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM ct_docs_chunks WHERE doc_id IN (3, 20, 30)"), 0);
    assert_eq!(stale_chunks(&mut c, "ct_docs"), 0);

    // Without a foreign key, the trigger deletes and moves the chunks itself.
    c.batch_execute(
        "ALTER TABLE ct_docs_chunks DROP CONSTRAINT ct_docs_chunks_doc_id_fkey;
         UPDATE ct_docs SET id = 10 WHERE id = 1; DELETE FROM ct_docs WHERE id = 3;",
    )
    .unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM ct_docs_chunks WHERE doc_id NOT IN (SELECT id FROM ct_docs)"), 0);
    assert_eq!(stale_chunks(&mut c, "ct_docs"), 0);

    // Misuse: a missing chunk column, a non-unique key.
    c.batch_execute("ALTER TABLE ct_docs_chunks RENAME COLUMN start_offset TO s").unwrap();
    let (code, _, hint) = expect_error(&mut c, "INSERT INTO ct_docs (id, body) VALUES (50, 'x')");
    assert_eq!(code, "42703");
    assert!(hint.unwrap().contains("CREATE TABLE"));
}

fn chunk_backfill_table(c: &mut Client, t: &str, n: i64) {
    chunk_tables(c, t, false);
    c.execute(
        &format!("INSERT INTO {t} (id, body) SELECT i, CASE WHEN i % 10 = 0 THEN NULL ELSE repeat('Sentence ' || i || ' of a document. ', 3 + (i % 7)::int) END FROM generate_series(1, $1::bigint) i"),
        &[&n],
    )
    .unwrap();
    add_chunk_trigger(c, t);
}

fn chunk_progress(c: &mut Client, t: &str) -> i64 {
    count(
        c,
        &format!(
            "SELECT coalesce(sum(rows_done), 0)::bigint FROM embeddinggemma_backfills WHERE relation = '{t}'::regclass"
        ),
    )
}

#[test]
fn chunk_backfill_survives_termination_shares_work_and_writes_every_chunk_once() {
    const N: i64 = 400;
    let mut c = tiny();
    chunk_backfill_table(&mut c, "cb_docs", N);
    let call = "CALL embeddinggemma_chunk_backfill('cb_docs', 'cb_docs_chunks', batch_size => 5)";
    // A run killed inside the engine, after it committed some batches.
    let mut run = tiny();
    let pid: i32 = run.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let handle = thread::spawn(move || run.batch_execute(call));
    let deadline = Instant::now() + Duration::from_secs(300);
    while chunk_progress(&mut c, "cb_docs") < 20 {
        assert!(Instant::now() < deadline, "no progress");
        thread::sleep(Duration::from_millis(50));
    }
    wait_until_embedding(&mut c, pid);
    assert!(c.query_one("SELECT pg_terminate_backend($1, 10000)", &[&pid]).unwrap().get::<_, bool>(0));
    assert!(handle.join().unwrap().is_err(), "the backfill was not interrupted");
    let done = chunk_progress(&mut c, "cb_docs");
    assert!(done < N * 9 / 10, "finished before it was terminated");
    // Two sessions finish it together, while a third changes documents (the trigger).
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let mut s = tiny();
            thread::spawn(move || s.batch_execute(call))
        })
        .collect();
    c.batch_execute(
        "UPDATE cb_docs SET body = body || ' Changed.' WHERE id % 50 = 1; DELETE FROM cb_docs WHERE id % 50 = 2",
    )
    .unwrap();
    for r in runs {
        r.join().unwrap().unwrap();
    }
    let documents = count(&mut c, "SELECT count(*) FROM cb_docs WHERE body <> ''");
    assert_eq!(count(&mut c, "SELECT count(DISTINCT doc_id) FROM cb_docs_chunks"), documents, "documents with chunks");
    assert_eq!(stale_chunks(&mut c, "cb_docs"), 0, "chunk rows that differ from embed_chunks() of the current text");
    let remaining = count(&mut c, "SELECT rows_remaining FROM embeddinggemma_backfills WHERE relation = 'cb_docs'::regclass ORDER BY finished_at DESC NULLS LAST LIMIT 1");
    assert_eq!(remaining, 0);
    // Without its chunk trigger the backfill refuses, saying how to add one.
    c.batch_execute("DROP TRIGGER cb_docs_chunks ON cb_docs").unwrap();
    let (code, _, hint) = expect_error(&mut c, call);
    assert_eq!(code, "42704");
    assert!(hint.unwrap().contains("embeddinggemma_chunk_trigger"));
}
