-- embeddinggemma 0.3.0 → 0.4.0 (ALTER EXTENSION embeddinggemma UPDATE TO '0.4.0'): no name resolves
-- through the caller's search_path, no SECURITY DEFINER, progress written only by the
-- backfills, write paths in Rust. Leaves the same objects as a fresh CREATE EXTENSION of 0.4.0
-- (tested).
\echo Use "ALTER EXTENSION embeddinggemma UPDATE" to load this file. \quit

-- The plpgsql steps of the backfills and the chunk trigger, and the SECURITY DEFINER liveness
-- check, go; Rust functions replace them.
DROP VIEW embeddinggemma_backfills;
DROP FUNCTION embeddinggemma_backend_alive(int, timestamptz);
DROP FUNCTION embeddinggemma_backfill_step(embeddinggemma_backfill_state, text, int, int);
DROP FUNCTION embeddinggemma_backfill_start(regclass, text, text, text, int, int);
DROP FUNCTION embeddinggemma_chunk_backfill_step(embeddinggemma_backfill_state, int);
DROP FUNCTION embeddinggemma_chunk_backfill_start(regclass, regclass, int);
DROP FUNCTION embeddinggemma_backfill_record(embeddinggemma_backfill_state, text, text, text);
DROP FUNCTION embeddinggemma_chunk_backfill_todo(text, text, regclass, text, text, text);
DROP FUNCTION embeddinggemma_chunk_trigger_args(regclass, regclass);
DROP FUNCTION embeddinggemma_chunk_check(regclass, text[], regclass);
DROP TYPE embeddinggemma_backfill_state;

-- Functions that run no SQL pin search_path.
ALTER FUNCTION embed(text, text, int) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION embed_batch(text[], text, int) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION embed_batch(bigint[], text[], text, int) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION embeddinggemma_info() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION embeddinggemma_stats() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION embeddinggemma_stats_reset() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION embeddinggemma_service_status() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION embeddinggemma_check_columns(regclass, text, text, int) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION embeddinggemma_trigger() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION chunks(text, int, int, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION embed_chunks(text, int, int, text, int) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION embed_chunks(text[], int, int, text, int) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION embeddinggemma_check_source(regclass, text) SET search_path = pg_catalog, pg_temp;

-- Qualified throughout: a view keeps what its names meant when it was created.
CREATE OR REPLACE VIEW embeddinggemma_service AS
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

CREATE OR REPLACE FUNCTION embeddinggemma_check_key(tbl regclass, key_col text)
RETURNS void
STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_check_key_wrapper';

COMMENT ON FUNCTION embeddinggemma_check_key(regclass, text) IS
'Raises an error naming the column unless key_col is a NOT NULL column of tbl with a unique index of its own (one key column, no predicate).';

CREATE OR REPLACE FUNCTION embeddinggemma_statement_trigger()
RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_statement_trigger_wrapper';

COMMENT ON FUNCTION embeddinggemma_statement_trigger() IS
'AFTER INSERT or AFTER UPDATE FOR EACH STATEMENT trigger with transition tables (REFERENCING NEW TABLE, and OLD TABLE for UPDATE): embeddinggemma_statement_trigger(key, source, target [, task [, dim]]) embeds all new or changed texts of the statement together, as embed_batch, then writes the vectors back by key. key must be NOT NULL with a unique index.';

-- Progress rows: written only by the backfills, with the owner's rights.
ALTER TABLE embeddinggemma_backfill_progress ADD COLUMN note text;
REVOKE ALL ON embeddinggemma_backfill_progress FROM PUBLIC;
GRANT SELECT ON embeddinggemma_backfill_progress TO PUBLIC;
DROP POLICY own_runs ON embeddinggemma_backfill_progress;
DROP POLICY readable_tables ON embeddinggemma_backfill_progress;
CREATE POLICY visible_runs ON embeddinggemma_backfill_progress FOR SELECT
    USING (owner OPERATOR(pg_catalog.=) current_user OR pg_catalog.has_table_privilege(relation, 'SELECT'));

COMMENT ON TABLE embeddinggemma_backfill_progress IS
'One row per embeddinggemma_backfill() or embeddinggemma_chunk_backfill() run, updated in the same transaction as each batch it commits: rows_done counts committed rows exactly. note says why rows were left when a run ends with some it could not claim. Written only by the backfills; owner is the role that ran it.';

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

CREATE OR REPLACE PROCEDURE embeddinggemma_backfill(
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

CREATE OR REPLACE FUNCTION embeddinggemma_chunk_trigger()
RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_chunk_trigger_wrapper';

COMMENT ON FUNCTION embeddinggemma_chunk_trigger() IS
'AFTER INSERT OR UPDATE OR DELETE FOR EACH ROW trigger: embeddinggemma_chunk_trigger(key, source, chunk_table, chunk_key [, max_tokens [, overlap [, task [, dim]]]]) replaces a document''s rows in chunk_table (columns chunk_key, chunk, start_offset, end_offset, body, embedding) with embed_chunks(source) when its text changes, moves them when only its key changes, and deletes them with the document. Updates that change neither do no work. An unqualified chunk_table is in the schema of the documents'' table.';

CREATE OR REPLACE PROCEDURE embeddinggemma_chunk_backfill(tbl regclass, chunk_table regclass, batch_size int DEFAULT 16)
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
    last_attempt timestamptz
);
CREATE INDEX embeddinggemma_async_queue_target ON embeddinggemma_async_queue (target_id, id);
REVOKE ALL ON embeddinggemma_async_targets, embeddinggemma_async_queue FROM PUBLIC;
REVOKE ALL ON SEQUENCE embeddinggemma_async_targets_id_seq, embeddinggemma_async_queue_id_seq FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('embeddinggemma_async_targets', '');

COMMENT ON TABLE embeddinggemma_async_targets IS
'Asynchronous embedding targets (embeddinggemma_async, embeddinggemma_async_chunks): the table, key, text and vector column (or chunk table), task and dimension, and where their vectors came from. Written only by the extension.';

-- What a role sees of the targets on tables it can read. Not security_invoker: the tables are
-- the extension's; the filter is the caller's right to read the table.
CREATE VIEW embeddinggemma_async_status AS
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

CREATE VIEW embeddinggemma_async_failures AS
SELECT t.relation AS table_name,
       t.target,
       q.key,
       q.last_error AS error,
       q.attempts,
       q.last_attempt
  FROM @extschema@.embeddinggemma_async_queue q
  JOIN @extschema@.embeddinggemma_async_targets t ON t.id OPERATOR(pg_catalog.=) q.target_id
 WHERE q.attempts OPERATOR(pg_catalog.>=) t.max_attempts
   AND pg_catalog.has_table_privilege(t.relation, 'SELECT');
GRANT SELECT ON embeddinggemma_async_failures TO PUBLIC;

COMMENT ON VIEW embeddinggemma_async_failures IS
'Rows whose write kept failing (a user trigger raised, a constraint, a dropped column) after the retries, with the last error. They block nothing; embeddinggemma_async_reembed queues them again.';

CREATE FUNCTION embeddinggemma_async(tbl regclass, source text, target text, task text DEFAULT 'document', dim int DEFAULT 768,
                                     key text DEFAULT NULL, keep_stale boolean DEFAULT false)
RETURNS int
VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_async_wrapper';

COMMENT ON FUNCTION embeddinggemma_async(regclass, text, text, text, int, text, boolean) IS
'Registers an asynchronous target: writes that change source (or the key) clear target (unless keep_stale) and queue the row; a background worker embeds queued rows in large batches, with the rights of the table''s owner. Rows already there are queued too. key: a NOT NULL unique column, the primary key by default. Only the table''s owner may register. Returns the target''s id.';

CREATE FUNCTION embeddinggemma_async_chunks(tbl regclass, chunk_table regclass, key text DEFAULT NULL, chunk_key text DEFAULT 'doc_id',
                                            source text DEFAULT 'body', max_tokens int DEFAULT 512, overlap int DEFAULT 64,
                                            task text DEFAULT 'document', dim int DEFAULT 768)
RETURNS int
VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_async_chunks_wrapper';

COMMENT ON FUNCTION embeddinggemma_async_chunks(regclass, regclass, text, text, text, int, int, text, int) IS
'embeddinggemma_async for a chunk table: a document whose text changes is queued, and the worker replaces its chunks (columns chunk_key, chunk, start_offset, end_offset, body, embedding) with embed_chunks(source).';

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
'Waits (interruptibly) until nothing is pending for the target — every queued row embedded or failed — and returns true; false if timeout passes first.';

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
