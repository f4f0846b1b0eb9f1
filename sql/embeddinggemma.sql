-- embeddinggemma: EmbeddingGemma-300m text embeddings as pgvector vectors.
--
-- The functions are IMMUTABLE: the same text, task and dimension always give the same vector
-- for a given model. If you change the model (embeddinggemma.model_path), re-embed stored
-- vectors and rebuild indexes built on them.
--
-- Security: no name in this extension's code resolves through the caller's search_path.
-- Every function pins `search_path = pg_catalog, pg_temp` (pg_temp last), except those that
-- must run SQL on users' tables under the caller's path, so that the tables' own triggers
-- behave as usual; their SQL is built in Rust (src/sql_text.rs) with every relation, type,
-- function and operator qualified. They are, and only they (checked by the tests):
--   embeddinggemma_statement_trigger(), embeddinggemma_chunk_trigger() — trigger functions;
--   embeddinggemma_backfill_begin(), embeddinggemma_chunk_backfill_begin(),
--   embeddinggemma_backfill_batch() — a backfill's steps;
--   embeddinggemma_backfill(), embeddinggemma_chunk_backfill() — procedures, which cannot COMMIT
--   with a SET clause; they call only schema-qualified functions.
-- No function is SECURITY DEFINER: backfill progress is written by the extension with the
-- progress table owner's rights, after checking the caller's (src/progress.rs).

CREATE FUNCTION embed(input text, task text DEFAULT 'document', dim int DEFAULT 768)
RETURNS vector
IMMUTABLE STRICT PARALLEL SAFE COST 10000
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_embed_wrapper';

COMMENT ON FUNCTION embed(text, text, int) IS
'EmbeddingGemma-300m embedding of input as a unit vector. task: a prompt name (document, query, STS, Clustering, ...) or none; dim: 768, 512, 256 or 128.';

CREATE FUNCTION embed_batch(inputs text[], task text DEFAULT 'document', dim int DEFAULT 768)
RETURNS TABLE(ord int, embedding vector)
IMMUTABLE STRICT PARALLEL SAFE COST 10000 ROWS 100
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_embed_batch_wrapper';

COMMENT ON FUNCTION embed_batch(text[], text, int) IS
'Embeds all inputs in one call: texts are bucketed by length and each bucket runs as one forward pass. ord is the 1-based array position; a NULL input gives a NULL embedding.';

CREATE FUNCTION embed_batch(ids bigint[], inputs text[], task text DEFAULT 'document', dim int DEFAULT 768)
RETURNS TABLE(id bigint, embedding vector)
IMMUTABLE STRICT PARALLEL SAFE COST 10000 ROWS 100
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_embed_batch_ids_wrapper';

COMMENT ON FUNCTION embed_batch(bigint[], text[], text, int) IS
'embed_batch keyed by ids, for UPDATE ... FROM joins. Both arrays must have the same length.';

CREATE FUNCTION embeddinggemma_info()
RETURNS TABLE(
    model_path text,
    device text,
    dtype text,
    dims int[],
    max_seq_length int,
    tasks text[],
    weights_sha256 jsonb,
    load_seconds float8,
    weights_mb float8,
    engine_version text
)
VOLATILE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_info_wrapper';

COMMENT ON FUNCTION embeddinggemma_info() IS
'The model this backend uses (loading it if needed): path, verified sha256 of its files, device, dtype, valid dims and tasks, load time, engine version.';

CREATE FUNCTION embeddinggemma_stats()
RETURNS TABLE(
    calls bigint,
    texts bigint,
    real_tokens bigint,
    padded_tokens bigint,
    fill_ratio float8,
    forward_passes bigint,
    texts_per_pass float8,
    truncated bigint,
    tokenize_seconds float8,
    forward_seconds float8,
    tokens_per_second float8,
    wait_seconds float8,
    model_loads bigint,
    load_seconds float8,
    device text,
    dtype text,
    model_memory_mb float8,
    backend_memory_mb float8
)
VOLATILE PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_stats_wrapper';

COMMENT ON FUNCTION embeddinggemma_stats() IS
'This backend''s embedding counters since it started or embeddinggemma_stats_reset(): texts, real and padded tokens, fill ratio (real/padded: how much compute went to text rather than padding), forward passes, truncated texts, time tokenizing, in forward passes, waiting for CPU threads, model loads, device, dtype, memory held.';

CREATE FUNCTION embeddinggemma_stats_reset()
RETURNS void
VOLATILE PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_stats_reset_wrapper';

-- The cluster's embedding service (with embeddinggemma in shared_preload_libraries).
CREATE FUNCTION embeddinggemma_service_status()
RETURNS TABLE(state text, pid int, restarts bigint, last_exit int, up_seconds float8, error text, stats jsonb)
VOLATILE PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_service_status_wrapper';

-- Qualified throughout: a view keeps what its names meant when it was created.
CREATE VIEW embeddinggemma_service AS
SELECT s.state, s.pid, s.restarts, s.last_exit, s.up_seconds, s.error,
       (s.stats OPERATOR(pg_catalog.#>>) '{requests}')::pg_catalog.int8 AS requests,
       (s.stats OPERATOR(pg_catalog.#>>) '{texts}')::pg_catalog.int8 AS texts,
       (s.stats OPERATOR(pg_catalog.#>>) '{forward_passes}')::pg_catalog.int8 AS forward_passes,
       (s.stats OPERATOR(pg_catalog.#>>) '{texts_per_pass}')::pg_catalog.float8 AS texts_per_pass,
       (s.stats OPERATOR(pg_catalog.#>>) '{connections_per_pass}')::pg_catalog.float8 AS sessions_per_pass,
       (s.stats OPERATOR(pg_catalog.#>>) '{fill_ratio}')::pg_catalog.float8 AS fill_ratio,
       (s.stats OPERATOR(pg_catalog.#>>) '{queue,texts}')::pg_catalog.int8 AS queue_texts,
       (s.stats OPERATOR(pg_catalog.#>>) '{queue,peak_texts}')::pg_catalog.int8 AS queue_peak_texts,
       (s.stats OPERATOR(pg_catalog.#>>) '{queue_wait,p50_ms}')::pg_catalog.float8 AS queue_wait_p50_ms,
       (s.stats OPERATOR(pg_catalog.#>>) '{queue_wait,p99_ms}')::pg_catalog.float8 AS queue_wait_p99_ms,
       (s.stats OPERATOR(pg_catalog.#>>) '{forward_time,p50_ms}')::pg_catalog.float8 AS forward_p50_ms,
       (s.stats OPERATOR(pg_catalog.#>>) '{forward_time,p99_ms}')::pg_catalog.float8 AS forward_p99_ms,
       (s.stats OPERATOR(pg_catalog.#>>) '{tokens_per_s}')::pg_catalog.float8 AS tokens_per_second,
       (s.stats OPERATOR(pg_catalog.#>>) '{memory,rss_mb}')::pg_catalog.float8 AS rss_mb,
       (s.stats OPERATOR(pg_catalog.#>>) '{memory,anon_mb}')::pg_catalog.float8 AS anon_mb,
       (s.stats OPERATOR(pg_catalog.#>>) '{withdrawn}')::pg_catalog.int8 AS withdrawn,
       s.stats OPERATOR(pg_catalog.->) 'errors' AS errors,
       s.stats OPERATOR(pg_catalog.->) 'model' AS model,
       s.stats,
       (s.stats OPERATOR(pg_catalog.#>>) '{load_attempts}')::pg_catalog.int8 AS load_attempts,
       (s.stats OPERATOR(pg_catalog.#>>) '{next_attempt_s}')::pg_catalog.float8 AS next_attempt_s
  FROM @extschema@.embeddinggemma_service_status() s;
GRANT SELECT ON embeddinggemma_service TO PUBLIC;

COMMENT ON VIEW embeddinggemma_service IS
'The cluster''s embedding service: state (off, down, starting, running, failed), its process, restarts, the last exit, the error it reports (e.g. a model that failed verification; the service tries a failed load again: load_attempts, next_attempt_s), and what it served: requests, texts, forward passes, texts and sessions per pass (cross-session batching), fill ratio, queue depth and its peak, queue wait and forward time (p50/p99 of a recent window), tokens/s, memory, errors by kind, the model.';

-- Write paths: keeping a vector column in step with a text column.

CREATE FUNCTION embeddinggemma_check_columns(tbl regclass, source text, target text, dim int DEFAULT 768)
RETURNS void
STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_check_columns_wrapper';

COMMENT ON FUNCTION embeddinggemma_check_columns(regclass, text, text, int) IS
'Raises an error naming the column unless source is a text column of tbl and target a vector column that holds dim values.';

CREATE FUNCTION embeddinggemma_trigger()
RETURNS trigger
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_trigger_wrapper';

COMMENT ON FUNCTION embeddinggemma_trigger() IS
'BEFORE INSERT OR UPDATE FOR EACH ROW trigger: embeddinggemma_trigger(source, target [, task [, dim]]) sets target to embed(source); an UPDATE that leaves source unchanged does no work; a NULL source gives a NULL target.';


-- Raises an error unless key_col is a NOT NULL column of tbl with a unique index of its own:
-- rows are written back (or their chunks found) by key; two rows with one key, or rows with
-- none, would be mixed up or lost.
CREATE FUNCTION embeddinggemma_check_key(tbl regclass, key_col text)
RETURNS void
STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_check_key_wrapper';

COMMENT ON FUNCTION embeddinggemma_check_key(regclass, text) IS
'Raises an error naming the column unless key_col is a NOT NULL column of tbl with a unique index of its own (one key column, no predicate).';

-- Bulk writes: the statement's new or changed texts embedded together, then written back by
-- key. Runs its SQL on the table under the caller's search_path (see the top of this file).
CREATE FUNCTION embeddinggemma_statement_trigger()
RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_statement_trigger_wrapper';

COMMENT ON FUNCTION embeddinggemma_statement_trigger() IS
'AFTER INSERT or AFTER UPDATE FOR EACH STATEMENT trigger with transition tables (REFERENCING NEW TABLE, and OLD TABLE for UPDATE): embeddinggemma_statement_trigger(key, source, target [, task [, dim]]) embeds all new or changed texts of the statement together, as embed_batch, then writes the vectors back by key. key must be NOT NULL with a unique index.';

-- Backfill: resumable, several sessions at once, progress visible to others.
CREATE TABLE embeddinggemma_backfill_progress (
    relation        regclass    NOT NULL,
    source          text        NOT NULL,
    target          text        NOT NULL,
    pid             int         NOT NULL,
    started_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    finished_at     timestamptz,
    rows_done       bigint      NOT NULL DEFAULT 0,
    rows_remaining  bigint,
    rows_per_second float8,
    eta             interval,
    owner           name        NOT NULL DEFAULT current_user,
    note            text,
    PRIMARY KEY (relation, source, target, pid, started_at)
);
-- Written only by the backfills, with this table's owner's rights after checking that the
-- caller may write the table it backfills (src/progress.rs): no role can forge or alter a row.
REVOKE ALL ON embeddinggemma_backfill_progress FROM PUBLIC;
GRANT SELECT ON embeddinggemma_backfill_progress TO PUBLIC;
-- A role sees its own runs and the runs on tables it can read.
ALTER TABLE embeddinggemma_backfill_progress ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible_runs ON embeddinggemma_backfill_progress FOR SELECT
    USING (owner OPERATOR(pg_catalog.=) current_user OR pg_catalog.has_table_privilege(relation, 'SELECT'));

COMMENT ON TABLE embeddinggemma_backfill_progress IS
'One row per embeddinggemma_backfill() or embeddinggemma_chunk_backfill() run, updated in the same transaction as each batch it commits: rows_done counts committed rows exactly. note says why rows were left when a run ends with some it could not claim. Written only by the backfills; owner is the role that ran it.';

-- Whether the session that started a run is still there (reads the backends' status array,
-- so it answers for other roles' sessions too, with no special rights).
CREATE FUNCTION embeddinggemma_backend_alive(pid int, since timestamptz)
RETURNS boolean
VOLATILE STRICT PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_backend_alive_wrapper';

CREATE VIEW embeddinggemma_backfills WITH (security_invoker = true) AS
SELECT p.*,
       p.finished_at IS NULL AND @extschema@.embeddinggemma_backend_alive(p.pid, p.started_at) AS running
  FROM @extschema@.embeddinggemma_backfill_progress p;
GRANT SELECT ON embeddinggemma_backfills TO PUBLIC;

COMMENT ON VIEW embeddinggemma_backfills IS
'Backfill runs and their progress, for tables the current role can read (and its own runs); running is false for a run that finished or whose session ended.';

-- A backfill's steps (src/backfill.rs): begin checks, counts and records a run in this session;
-- each batch claims, embeds and writes rows and records the run's progress. They run SQL on the
-- table under the caller's search_path (see the top of this file).
CREATE FUNCTION embeddinggemma_backfill_begin(tbl regclass, source text, target text, task text, dim int, batch_size int)
RETURNS bigint
VOLATILE STRICT PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_backfill_begin_wrapper';

CREATE FUNCTION embeddinggemma_chunk_backfill_begin(tbl regclass, chunk_table regclass, batch_size int)
RETURNS bigint
VOLATILE STRICT PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_chunk_backfill_begin_wrapper';

CREATE FUNCTION embeddinggemma_backfill_batch(run bigint)
RETURNS TABLE(message text, finished boolean)
VOLATILE STRICT PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_backfill_batch_wrapper';

-- The procedures only commit between batches: a procedure with SET search_path could not.
-- Every name in them is schema-qualified.
CREATE PROCEDURE embeddinggemma_backfill(
    tbl regclass,
    source text,
    target text,
    task text DEFAULT 'document',
    dim int DEFAULT 768,
    batch_size int DEFAULT 256
)
LANGUAGE plpgsql AS $proc$
DECLARE
    run  pg_catalog.int8 := @extschema@.embeddinggemma_backfill_begin(tbl, source, target, task, dim, batch_size);
    note pg_catalog.text;
    done pg_catalog.bool;
BEGIN
    COMMIT;
    LOOP
        SELECT b.message, b.finished INTO note, done FROM @extschema@.embeddinggemma_backfill_batch(run) b;
        COMMIT;
        RAISE NOTICE '%', note;
        EXIT WHEN done;
    END LOOP;
END
$proc$;

COMMENT ON PROCEDURE embeddinggemma_backfill(regclass, text, text, text, int, int) IS
'Embeds every row whose target is NULL and source is not, batch_size rows per forward-pass batch, committing after each batch. Rows are claimed with FOR UPDATE SKIP LOCKED, so several sessions can run it on one table at once; a rerun continues where a cancelled or killed run stopped. It returns when no row is left that it can claim, saying how many it could not. Call it outside a transaction block.';

-- Long documents: chunks on the model's own token boundaries, and a chunk table kept in step.
CREATE FUNCTION chunks(input text, max_tokens int DEFAULT 512, overlap int DEFAULT 64, task text DEFAULT 'document')
RETURNS TABLE(chunk int, start_offset int, end_offset int, body text)
IMMUTABLE STRICT PARALLEL SAFE COST 1000 ROWS 10
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_chunks_wrapper';

COMMENT ON FUNCTION chunks(text, int, int, text) IS
'Cuts input into chunks of at most max_tokens tokens each as embedded with task''s prompt (<bos> and <eos> included), preferring paragraph, then sentence, then word breaks; consecutive chunks share about overlap tokens. body = substr(input, start_offset, end_offset - start_offset): offsets are 1-based character positions, end exclusive. An empty input has no chunks.';

CREATE FUNCTION embed_chunks(input text, max_tokens int DEFAULT 512, overlap int DEFAULT 64, task text DEFAULT 'document', dim int DEFAULT 768)
RETURNS TABLE(chunk int, start_offset int, end_offset int, body text, embedding vector)
IMMUTABLE STRICT PARALLEL SAFE COST 10000 ROWS 10
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_embed_chunks_wrapper';

COMMENT ON FUNCTION embed_chunks(text, int, int, text, int) IS
'chunks(input, max_tokens, overlap, task) with each chunk''s embedding, equal to embed(body, task, dim); the chunks are embedded together, as embed_batch.';

CREATE FUNCTION embed_chunks(inputs text[], max_tokens int DEFAULT 512, overlap int DEFAULT 64, task text DEFAULT 'document', dim int DEFAULT 768)
RETURNS TABLE(ord int, chunk int, start_offset int, end_offset int, body text, embedding vector)
IMMUTABLE STRICT PARALLEL SAFE COST 10000 ROWS 100
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_embed_chunks_array_wrapper';

COMMENT ON FUNCTION embed_chunks(text[], int, int, text, int) IS
'embed_chunks over many documents: the chunks of all of them are embedded together, as embed_batch over their bodies. ord is the document''s 1-based array position; NULL and empty documents have no chunks.';

CREATE FUNCTION embeddinggemma_check_source(tbl regclass, source text)
RETURNS void
STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_check_source_wrapper';

COMMENT ON FUNCTION embeddinggemma_check_source(regclass, text) IS
'Raises an error naming the column unless source is a text column of tbl.';


-- Keeps a chunk table in step with its documents, row by row. Runs its SQL on the tables under
-- the caller's search_path (see the top of this file); an unqualified chunk table is looked up
-- in the schema of the documents' table, never through the writer's path.
CREATE FUNCTION embeddinggemma_chunk_trigger()
RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_chunk_trigger_wrapper';

COMMENT ON FUNCTION embeddinggemma_chunk_trigger() IS
'AFTER INSERT OR UPDATE OR DELETE FOR EACH ROW trigger: embeddinggemma_chunk_trigger(key, source, chunk_table, chunk_key [, max_tokens [, overlap [, task [, dim]]]]) replaces a document''s rows in chunk_table (columns chunk_key, chunk, start_offset, end_offset, body, embedding) with embed_chunks(source) when its text changes, moves them when only its key changes, and deletes them with the document. Updates that change neither do no work. An unqualified chunk_table is in the schema of the documents'' table.';

CREATE PROCEDURE embeddinggemma_chunk_backfill(tbl regclass, chunk_table regclass, batch_size int DEFAULT 16)
LANGUAGE plpgsql AS $proc$
DECLARE
    run  pg_catalog.int8 := @extschema@.embeddinggemma_chunk_backfill_begin(tbl, chunk_table, batch_size);
    note pg_catalog.text;
    done pg_catalog.bool;
BEGIN
    COMMIT;
    LOOP
        SELECT b.message, b.finished INTO note, done FROM @extschema@.embeddinggemma_backfill_batch(run) b;
        COMMIT;
        RAISE NOTICE '%', note;
        EXIT WHEN done;
    END LOOP;
END
$proc$;

COMMENT ON PROCEDURE embeddinggemma_chunk_backfill(regclass, regclass, int) IS
'Fills chunk_table for every document of tbl that has a non-empty text and no chunks, with the settings of the embeddinggemma_chunk_trigger on tbl that writes chunk_table, batch_size documents per batch, committing after each batch. Several sessions can run it at once; a rerun continues where a cancelled or killed run stopped. Progress shows in embeddinggemma_backfills (target = the chunk table). Call it outside a transaction block.';

CREATE FUNCTION embeddinggemma_backfill_shards(tbl regclass)
RETURNS TABLE(shard bigint, source text, target text, rows_done bigint, rows_remaining bigint, rows_per_second float8,
              running boolean, started_at timestamptz, finished_at timestamptz, note text)
VOLATILE STRICT PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
LANGUAGE plpgsql AS $fn$
DECLARE
    command pg_catalog.text;
BEGIN
    IF pg_catalog.to_regprocedure('pg_catalog.run_command_on_shards(pg_catalog.regclass, pg_catalog.text, pg_catalog.bool)') IS NULL THEN
        RAISE EXCEPTION 'embeddinggemma_backfill_shards: Citus is not installed'
            USING HINT = 'Backfills of a table of this node show in embeddinggemma_backfills.';
    END IF;
    -- Each shard's latest run, from its worker's own embeddinggemma_backfills (%L: the shard).
    command := pg_catalog.format(
        'SELECT pg_catalog.row_to_json(b) FROM %I.embeddinggemma_backfills b
          WHERE b.relation OPERATOR(pg_catalog.=) %%L::pg_catalog.regclass ORDER BY b.started_at DESC LIMIT 1',
        (SELECT n.nspname FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace
          WHERE e.extname OPERATOR(pg_catalog.=) 'embeddinggemma'));
    RETURN QUERY
    SELECT r.shardid,
           j OPERATOR(pg_catalog.->>) 'source',
           j OPERATOR(pg_catalog.->>) 'target',
           (j OPERATOR(pg_catalog.->>) 'rows_done')::pg_catalog.int8,
           (j OPERATOR(pg_catalog.->>) 'rows_remaining')::pg_catalog.int8,
           (j OPERATOR(pg_catalog.->>) 'rows_per_second')::pg_catalog.float8,
           (j OPERATOR(pg_catalog.->>) 'running')::pg_catalog.bool,
           (j OPERATOR(pg_catalog.->>) 'started_at')::pg_catalog.timestamptz,
           (j OPERATOR(pg_catalog.->>) 'finished_at')::pg_catalog.timestamptz,
           CASE WHEN r.success THEN j OPERATOR(pg_catalog.->>) 'note' ELSE r.result END
      FROM pg_catalog.run_command_on_shards(tbl, command) r,
           LATERAL (SELECT CASE WHEN r.success AND r.result OPERATOR(pg_catalog.<>) '' THEN r.result::pg_catalog.jsonb END AS j) x
     ORDER BY r.shardid;
END
$fn$;

COMMENT ON FUNCTION embeddinggemma_backfill_shards(regclass) IS
'Citus: the latest backfill run of every shard of the distributed table tbl, read from the shards'' workers while a backfill called on the coordinator runs there (one row per shard; no run yet: NULLs).';

-- Asynchronous embedding (src/async_targets.rs, src/async_worker.rs): a write records that a
-- row needs a vector; a background worker per database embeds the queue in large batches
-- through the service, with the rights of the table's owner. Only the extension's own code
-- writes these tables.
CREATE TABLE embeddinggemma_async_targets (
    id               serial PRIMARY KEY,
    relation         regclass    NOT NULL,
    key_column       text        NOT NULL,
    source           text        NOT NULL,
    -- The vector column, or for a chunk target the chunk table's name.
    target           text        NOT NULL,
    chunk_table      regclass,
    chunk_key        text,
    task             text        NOT NULL,
    dim              int         NOT NULL,
    max_tokens       int,
    overlap          int,
    keep_stale       boolean     NOT NULL DEFAULT false,
    max_attempts     int         NOT NULL DEFAULT 5,
    -- Where its vectors came from, and the model the worker embeds with now.
    model            jsonb,
    serving          jsonb,
    -- Rows present when registered (or re-embedded) are enqueued a batch at a time, after the
    -- last key done: resumable.
    scanning         boolean     NOT NULL DEFAULT true,
    scan_all         boolean     NOT NULL DEFAULT false,
    scan_after       text,
    embedded         bigint      NOT NULL DEFAULT 0,
    last_embedded_at timestamptz,
    rows_per_second  float8,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- The key, source and vector columns by number: followed through renames (follow.rs).
    key_attnum       int2,
    source_attnum    int2,
    target_attnum    int2,
    -- Registered with keep_existing: the vectors there then were kept, so its model is not known.
    kept_existing    boolean     NOT NULL DEFAULT false,
    UNIQUE (relation, target)
);
CREATE TABLE embeddinggemma_async_queue (
    id           bigserial   PRIMARY KEY,
    target_id    int         NOT NULL,  -- no foreign key: its per-row lock on the target would serialize writers; _async_drop deletes the entries
    key          text        NOT NULL,
    enqueued_at  timestamptz NOT NULL DEFAULT now(),
    attempts     int         NOT NULL DEFAULT 0,
    not_before   timestamptz,
    leased       boolean     NOT NULL DEFAULT false,
    last_error   text,
    last_attempt timestamptz,
    -- Times this entry was in hand when a worker stopped mid-batch (a crash, an immediate
    -- shutdown): once, it is embedded alone next; twice, it is kept apart as failed.
    interrupted  int         NOT NULL DEFAULT 0,
    -- The key as its type's send function writes it (the trigger's entries): the worker reads
    -- it back whatever the writer's DateStyle, TimeZone or extra_float_digits; key is for people.
    key_bytes    bytea,
    -- The type key_bytes were sent as: read back only by that type (a key column retyped
    -- since falls back to the text).
    key_type     oid
);
CREATE INDEX embeddinggemma_async_queue_target ON embeddinggemma_async_queue (target_id, id);
REVOKE ALL ON embeddinggemma_async_targets, embeddinggemma_async_queue FROM PUBLIC;
REVOKE ALL ON SEQUENCE embeddinggemma_async_targets_id_seq, embeddinggemma_async_queue_id_seq FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('embeddinggemma_async_targets', '');
-- Restored databases go on numbering targets after the dumped ones.
SELECT pg_catalog.pg_extension_config_dump('embeddinggemma_async_targets_id_seq', '');

COMMENT ON TABLE embeddinggemma_async_targets IS
'Asynchronous embedding targets (embeddinggemma_async, embeddinggemma_async_chunks): the table, key, text and vector column (or chunk table), task and dimension, and where their vectors came from. Written only by the extension.';

-- What a role sees of the targets on tables it can read. Not security_invoker: the tables are
-- the extension's; the filter is the caller's right to read the table. security_barrier: a
-- caller's function in WHERE sees only the rows that filter lets through.
CREATE VIEW embeddinggemma_async_status WITH (security_barrier) AS
SELECT t.relation AS table_name,
       t.target,
       (SELECT pg_catalog.count(*) FROM @extschema@.embeddinggemma_async_queue q
         WHERE q.target_id OPERATOR(pg_catalog.=) t.id AND q.attempts OPERATOR(pg_catalog.<) t.max_attempts) AS pending,
       (SELECT pg_catalog.count(*) FROM @extschema@.embeddinggemma_async_queue q
         WHERE q.target_id OPERATOR(pg_catalog.=) t.id AND q.attempts OPERATOR(pg_catalog.>=) t.max_attempts) AS failed,
       pg_catalog.now() OPERATOR(pg_catalog.-) (SELECT pg_catalog.min(q.enqueued_at) FROM @extschema@.embeddinggemma_async_queue q
         WHERE q.target_id OPERATOR(pg_catalog.=) t.id AND q.attempts OPERATOR(pg_catalog.<) t.max_attempts) AS oldest_pending_age,
       t.last_embedded_at,
       t.rows_per_second,
       t.model,
       (t.model IS NOT NULL AND t.serving IS NOT NULL AND t.model OPERATOR(pg_catalog.<>) t.serving) AS stale,
       t.scanning,
       t.embedded,
       t.task,
       t.dim
  FROM @extschema@.embeddinggemma_async_targets t
 WHERE pg_catalog.has_table_privilege(t.relation, 'SELECT');
GRANT SELECT ON embeddinggemma_async_status TO PUBLIC;

COMMENT ON VIEW embeddinggemma_async_status IS
'One row per asynchronous target on a table the current role can read: rows pending (queued, not failed), failed (retries used up: see embeddinggemma_async_failures), the age of the oldest pending row, when and how fast rows were last embedded, the model its vectors came from, and stale: the serving model differs (embeddinggemma_async_reembed). scanning: rows present at registration are still being queued.';

CREATE VIEW embeddinggemma_async_failures WITH (security_barrier) AS
SELECT t.relation AS table_name,
       t.target,
       q.key,
       q.last_error AS error,
       q.attempts,
       q.last_attempt
  FROM @extschema@.embeddinggemma_async_queue q
  JOIN @extschema@.embeddinggemma_async_targets t ON t.id OPERATOR(pg_catalog.=) q.target_id
 WHERE q.attempts OPERATOR(pg_catalog.>=) t.max_attempts
   AND pg_catalog.pg_has_role((SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) t.relation), 'USAGE');
GRANT SELECT ON embeddinggemma_async_failures TO PUBLIC;

COMMENT ON VIEW embeddinggemma_async_failures IS
'Rows whose write kept failing (a user trigger raised, a constraint, a dropped column) after the retries, with the last error, for the tables the current role owns (keys and errors can carry row data that row-level security hides from other readers). They block nothing; embeddinggemma_async_reembed queues them again.';

CREATE FUNCTION embeddinggemma_async(tbl regclass, source text, target text, task text DEFAULT 'document', dim int DEFAULT 768,
                                     key text DEFAULT NULL, keep_stale boolean DEFAULT false, keep_existing boolean DEFAULT false)
RETURNS int
VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_async_register_wrapper';

COMMENT ON FUNCTION embeddinggemma_async(regclass, text, text, text, int, text, boolean, boolean) IS
'Registers an asynchronous target on a table or a partitioned table (its partitions, present and future): writes that change source (or the key) clear target (unless keep_stale) and queue the row; a background worker embeds queued rows in large batches, with the rights of the table''s owner. Rows already there are queued too, vectors or not, so every vector of the target is its own; keep_existing => true queues only rows without a vector (the status view then shows no model until embeddinggemma_async_reembed). key: a NOT NULL unique column, the primary key by default. Only the table''s owner may register. Returns the target''s id.';

CREATE FUNCTION embeddinggemma_async_chunks(tbl regclass, chunk_table regclass, key text DEFAULT NULL, chunk_key text DEFAULT 'doc_id',
                                            source text DEFAULT 'body', max_tokens int DEFAULT 512, overlap int DEFAULT 64,
                                            task text DEFAULT 'document', dim int DEFAULT 768)
RETURNS int
VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_async_chunks_wrapper';

COMMENT ON FUNCTION embeddinggemma_async_chunks(regclass, regclass, text, text, text, int, int, text, int) IS
'embeddinggemma_async for a chunk table: a document whose text changes, or that is deleted, is queued, and the worker replaces its chunks (columns chunk_key, chunk, start_offset, end_offset, body, embedding) with embed_chunks(source).';

CREATE FUNCTION embeddinggemma_async_trigger()
RETURNS trigger
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_async_trigger_wrapper';

COMMENT ON FUNCTION embeddinggemma_async_trigger() IS
'Installed by embeddinggemma_async: queues rows whose text or key changed (and clears their stale vector). Records only; never embeds.';

CREATE FUNCTION embeddinggemma_async_wait(tbl regclass, target text, timeout interval DEFAULT '60 s')
RETURNS boolean
VOLATILE STRICT PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_async_wait_wrapper';

COMMENT ON FUNCTION embeddinggemma_async_wait(regclass, text, interval) IS
'Waits (interruptibly) until nothing is pending for the target — every queued row embedded or failed — and returns true; false if timeout passes first. Needs SELECT on the table.';

CREATE FUNCTION embeddinggemma_async_reembed(tbl regclass, target text)
RETURNS void
VOLATILE STRICT PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_async_reembed_wrapper';

COMMENT ON FUNCTION embeddinggemma_async_reembed(regclass, text) IS
'Queues every row of the target again (a batch at a time, by the worker), failed ones included: after the model changed (stale in embeddinggemma_async_status). Vectors stay until replaced.';

CREATE FUNCTION embeddinggemma_async_drop(tbl regclass, target text)
RETURNS void
VOLATILE STRICT PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_async_drop_wrapper';

COMMENT ON FUNCTION embeddinggemma_async_drop(regclass, text) IS
'Removes the target, its trigger and its queue. Vectors already written stay.';

-- Targets follow their tables (src/asynchronous/follow.rs): a dropped table, chunk table or
-- named column removes the target with a NOTICE; a renamed column keeps it working.
CREATE FUNCTION embeddinggemma_async_follow(relations oid[])
RETURNS void
VOLATILE STRICT PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_async_follow_wrapper';

COMMENT ON FUNCTION embeddinggemma_async_follow(oid[]) IS
'Called by the extension''s event triggers with the tables a DDL command touched: reconciles their asynchronous targets with the catalog (renamed columns followed, targets whose table or columns are gone removed).';

CREATE FUNCTION embeddinggemma_async_follow_ddl()
RETURNS event_trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    touched oid[];
BEGIN
    IF TG_EVENT OPERATOR(pg_catalog.=) 'sql_drop' THEN
        touched := ARRAY(SELECT DISTINCT o.objid FROM pg_catalog.pg_event_trigger_dropped_objects() o
                          WHERE o.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass);
    ELSE
        touched := ARRAY(SELECT DISTINCT c.objid FROM pg_catalog.pg_event_trigger_ddl_commands() c
                          WHERE c.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass);
    END IF;
    IF pg_catalog.cardinality(touched) OPERATOR(pg_catalog.>) 0 THEN
        PERFORM @extschema@.embeddinggemma_async_follow(touched);
    END IF;
END
$fn$;

CREATE EVENT TRIGGER embeddinggemma_async_follow_drop ON sql_drop
    EXECUTE FUNCTION embeddinggemma_async_follow_ddl();
CREATE EVENT TRIGGER embeddinggemma_async_follow_alter ON ddl_command_end WHEN TAG IN ('ALTER TABLE')
    EXECUTE FUNCTION embeddinggemma_async_follow_ddl();

-- pg_dump keeps the queue (rows pending at dump time are embedded after a restore) and the
-- queue's numbering.
SELECT pg_catalog.pg_extension_config_dump('embeddinggemma_async_queue', '');
SELECT pg_catalog.pg_extension_config_dump('embeddinggemma_async_queue_id_seq', '');

-- A target row inserted (a registration, or pg_restore copying the targets back) numbers its
-- columns from their names as the table is now (a restored table has no dropped columns, so
-- its numbers may differ), and wakes the database's worker when it commits. A queue entry
-- restored while leased is not one a worker holds.
CREATE FUNCTION embeddinggemma_async_target_numbered()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    NEW.key_attnum := (SELECT a.attnum FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) NEW.relation
                          AND a.attname OPERATOR(pg_catalog.=) NEW.key_column AND NOT a.attisdropped);
    NEW.source_attnum := (SELECT a.attnum FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) NEW.relation
                             AND a.attname OPERATOR(pg_catalog.=) NEW.source AND NOT a.attisdropped);
    NEW.target_attnum := CASE WHEN NEW.chunk_table IS NULL THEN
                             (SELECT a.attnum FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) NEW.relation
                                 AND a.attname OPERATOR(pg_catalog.=) NEW.target AND NOT a.attisdropped) END;
    RETURN NEW;
END
$fn$;

CREATE TRIGGER numbered BEFORE INSERT ON embeddinggemma_async_targets
    FOR EACH ROW EXECUTE FUNCTION embeddinggemma_async_target_numbered();

CREATE FUNCTION embeddinggemma_async_wake()
RETURNS trigger
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_async_wake_wrapper';

CREATE TRIGGER wake AFTER INSERT ON embeddinggemma_async_targets
    FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_async_wake();

CREATE FUNCTION embeddinggemma_async_entry_restored()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    NEW.leased := false;
    RETURN NEW;
END
$fn$;

CREATE TRIGGER restored BEFORE INSERT ON embeddinggemma_async_queue
    FOR EACH ROW WHEN (NEW.leased) EXECUTE FUNCTION embeddinggemma_async_entry_restored();
