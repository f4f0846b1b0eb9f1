-- embeddinggemma: EmbeddingGemma-300m text embeddings as pgvector vectors.
--
-- The functions are IMMUTABLE: the same text, task and dimension always give the same vector
-- for a given model. If you change the model (embeddinggemma.model_path), re-embed stored
-- vectors and rebuild indexes built on them.

CREATE FUNCTION embed(input text, task text DEFAULT 'document', dim int DEFAULT 768)
RETURNS vector
IMMUTABLE STRICT PARALLEL SAFE COST 10000
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_embed_wrapper';

COMMENT ON FUNCTION embed(text, text, int) IS
'EmbeddingGemma-300m embedding of input as a unit vector. task: a prompt name (document, query, STS, Clustering, ...) or none; dim: 768, 512, 256 or 128.';

CREATE FUNCTION embed_batch(inputs text[], task text DEFAULT 'document', dim int DEFAULT 768)
RETURNS TABLE(ord int, embedding vector)
IMMUTABLE STRICT PARALLEL SAFE COST 10000 ROWS 100
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_embed_batch_wrapper';

COMMENT ON FUNCTION embed_batch(text[], text, int) IS
'Embeds all inputs in one call: texts are bucketed by length and each bucket runs as one forward pass. ord is the 1-based array position; a NULL input gives a NULL embedding.';

CREATE FUNCTION embed_batch(ids bigint[], inputs text[], task text DEFAULT 'document', dim int DEFAULT 768)
RETURNS TABLE(id bigint, embedding vector)
IMMUTABLE STRICT PARALLEL SAFE COST 10000 ROWS 100
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
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_stats_wrapper';

COMMENT ON FUNCTION embeddinggemma_stats() IS
'This backend''s embedding counters since it started or embeddinggemma_stats_reset(): texts, real and padded tokens, fill ratio (real/padded: how much compute went to text rather than padding), forward passes, truncated texts, time tokenizing, in forward passes, waiting for CPU threads, model loads, device, dtype, memory held.';

CREATE FUNCTION embeddinggemma_stats_reset()
RETURNS void
VOLATILE PARALLEL RESTRICTED
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_stats_reset_wrapper';

-- The cluster's embedding service (with embeddinggemma in shared_preload_libraries).
CREATE FUNCTION embeddinggemma_service_status()
RETURNS TABLE(state text, pid int, restarts bigint, last_exit int, up_seconds float8, error text, stats jsonb)
VOLATILE PARALLEL RESTRICTED
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_service_status_wrapper';

CREATE VIEW embeddinggemma_service AS
SELECT s.state, s.pid, s.restarts, s.last_exit, s.up_seconds, s.error,
       (s.stats->>'requests')::bigint               AS requests,
       (s.stats->>'texts')::bigint                  AS texts,
       (s.stats->>'forward_passes')::bigint         AS forward_passes,
       (s.stats->>'texts_per_pass')::float8         AS texts_per_pass,
       (s.stats->>'connections_per_pass')::float8   AS sessions_per_pass,
       (s.stats->>'fill_ratio')::float8             AS fill_ratio,
       (s.stats->'queue'->>'texts')::bigint         AS queue_texts,
       (s.stats->'queue'->>'peak_texts')::bigint    AS queue_peak_texts,
       (s.stats->'queue_wait'->>'p50_ms')::float8   AS queue_wait_p50_ms,
       (s.stats->'queue_wait'->>'p99_ms')::float8   AS queue_wait_p99_ms,
       (s.stats->'forward_time'->>'p50_ms')::float8 AS forward_p50_ms,
       (s.stats->'forward_time'->>'p99_ms')::float8 AS forward_p99_ms,
       (s.stats->>'tokens_per_s')::float8           AS tokens_per_second,
       (s.stats->'memory'->>'rss_mb')::float8       AS rss_mb,
       (s.stats->'memory'->>'anon_mb')::float8      AS anon_mb,
       (s.stats->>'withdrawn')::bigint              AS withdrawn,
       s.stats->'errors'                            AS errors,
       s.stats->'model'                             AS model,
       s.stats
  FROM embeddinggemma_service_status() s;
GRANT SELECT ON embeddinggemma_service TO PUBLIC;

COMMENT ON VIEW embeddinggemma_service IS
'The cluster''s embedding service: state (off, down, starting, running, failed), its process, restarts, the last exit, the error it reports (e.g. a model that failed verification), and what it served: requests, texts, forward passes, texts and sessions per pass (cross-session batching), fill ratio, queue depth and its peak, queue wait and forward time (p50/p99 of a recent window), tokens/s, memory, errors by kind, the model.';

-- Write paths: keeping a vector column in step with a text column.

CREATE FUNCTION embeddinggemma_check_columns(tbl regclass, source text, target text, dim int DEFAULT 768)
RETURNS void
STABLE STRICT PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_check_columns_wrapper';

COMMENT ON FUNCTION embeddinggemma_check_columns(regclass, text, text, int) IS
'Raises an error naming the column unless source is a text column of tbl and target a vector column that holds dim values.';

CREATE FUNCTION embeddinggemma_trigger()
RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_trigger_wrapper';

COMMENT ON FUNCTION embeddinggemma_trigger() IS
'BEFORE INSERT OR UPDATE FOR EACH ROW trigger: embeddinggemma_trigger(source, target [, task [, dim]]) sets target to embed(source); an UPDATE that leaves source unchanged does no work; a NULL source gives a NULL target.';

-- Raises an error unless key_col is a column of tbl with a unique index of its own: rows are
-- written back (or their chunks found) by key, and two rows with one key would be mixed up.
CREATE FUNCTION embeddinggemma_check_key(tbl regclass, key_col text)
RETURNS void
STABLE
SET search_path = pg_catalog, pg_temp
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_attribute
                    WHERE attrelid = tbl AND attname = key_col AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'embeddinggemma: key column "%" does not exist in table %', key_col, tbl
            USING ERRCODE = 'undefined_column', HINT = 'The first argument names a unique key of the table, e.g. its primary key.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                    WHERE i.indrelid = tbl AND i.indisunique AND i.indnkeyatts = 1 AND i.indpred IS NULL
                      AND a.attname = key_col) THEN
        RAISE EXCEPTION 'embeddinggemma: key column "%" of table % is not unique', key_col, tbl
            USING ERRCODE = 'invalid_object_definition',
                  HINT = format('Name a column with a unique index (e.g. the primary key), or add one: CREATE UNIQUE INDEX ON %s (%I);', tbl, key_col);
    END IF;
END
$fn$;

-- Bulk writes: one embed_batch() over the statement's transition table, then one UPDATE.
-- Objects a user created elsewhere (a trojan operator or function) must never run with the
-- privileges of whoever fired the trigger: this function's own statements run with a pinned
-- search_path, and the SQL it runs on the table qualifies every operator and function. That
-- SQL runs under the caller's search_path, so the table's own triggers see what they expect.
CREATE FUNCTION embeddinggemma_statement_trigger()
RETURNS trigger
LANGUAGE plpgsql
AS $fn$
DECLARE
    caller_path text := pg_catalog.current_setting('search_path');
    key_col text := TG_ARGV[0];
    source  text := TG_ARGV[1];
    target  text := TG_ARGV[2];
    task    text := coalesce(TG_ARGV[3], 'document');
    dim     int  := coalesce(TG_ARGV[4], '768')::int;
    -- Set while this trigger writes the vectors: its own UPDATE fires it again.
    busy    text := 'embeddinggemma_internal.statement_trigger_busy';
    changed text;
BEGIN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    IF TG_LEVEL <> 'STATEMENT' OR TG_WHEN <> 'AFTER' OR TG_OP NOT IN ('INSERT', 'UPDATE') OR TG_NARGS NOT BETWEEN 3 AND 5 THEN
        RAISE EXCEPTION 'embeddinggemma_statement_trigger() must be fired AFTER INSERT or AFTER UPDATE … FOR EACH STATEMENT with arguments (key column, source column, target column [, task [, dim]])'
            USING ERRCODE = 'triggered_action_exception',
                  HINT = 'CREATE TRIGGER docs_embed AFTER INSERT ON docs REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger(''id'', ''body'', ''v'');';
    END IF;
    IF current_setting(busy, true) = TG_RELID::oid::text THEN
        PERFORM pg_catalog.set_config('search_path', caller_path, true);
        RETURN NULL;
    END IF;
    PERFORM @extschema@.embeddinggemma_check_columns(TG_RELID, source, target, dim);
    PERFORM @extschema@.embeddinggemma_check_key(TG_RELID, key_col);
    -- A row needs a vector unless an old row had the same text and the vector it still
    -- carries: rows are told apart by their text and vector, not by a key that may change.
    changed := format('SELECT n.%1$I AS k, n.%2$I AS body FROM new_rows n WHERE n.%2$I IS NOT NULL', key_col, source);
    IF TG_OP = 'UPDATE' THEN
        changed := changed || format(' AND NOT EXISTS (SELECT FROM old_rows o WHERE o.%1$I OPERATOR(pg_catalog.=) n.%1$I
                                        AND (o.%2$I::pg_catalog.float4[] OPERATOR(pg_catalog.=) n.%2$I::pg_catalog.float4[]
                                             OR (o.%2$I IS NULL AND n.%2$I IS NULL)))', source, target);
    END IF;
    PERFORM set_config(busy, TG_RELID::oid::text, true);
    PERFORM set_config('search_path', caller_path, true);
    EXECUTE format('UPDATE %1$s t SET %2$I = NULL FROM new_rows n
                     WHERE t.%3$I OPERATOR(pg_catalog.=) n.%3$I AND n.%4$I IS NULL AND n.%2$I IS NOT NULL',
                   TG_RELID::regclass, target, key_col, source);
    EXECUTE format($q$
        WITH changed AS (%1$s),
             batch AS (SELECT pg_catalog.array_agg(k) AS keys, pg_catalog.array_agg(body) AS bodies FROM changed),
             embedded AS (SELECT b.keys[e.ord] AS k, e.embedding
                            FROM batch b, @extschema@.embed_batch(b.bodies, $1, $2) e)
        UPDATE %2$s t SET %3$I = e.embedding FROM embedded e WHERE t.%4$I OPERATOR(pg_catalog.=) e.k
    $q$, changed, TG_RELID::regclass, target, key_col) USING task, dim;
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    PERFORM set_config(busy, '', true);
    PERFORM set_config('search_path', caller_path, true);
    RETURN NULL;
EXCEPTION WHEN undefined_table THEN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    IF SQLERRM NOT LIKE '%new_rows%' AND SQLERRM NOT LIKE '%old_rows%' THEN
        RAISE;
    END IF;
    RAISE EXCEPTION 'embeddinggemma_statement_trigger(): %', SQLERRM
        USING ERRCODE = 'triggered_action_exception',
              HINT = 'Name the transition tables new_rows (and old_rows for UPDATE): REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows.';
END
$fn$;

COMMENT ON FUNCTION embeddinggemma_statement_trigger() IS
'AFTER INSERT or AFTER UPDATE FOR EACH STATEMENT trigger with transition tables new_rows (and old_rows): embeddinggemma_statement_trigger(key, source, target [, task [, dim]]) embeds all new or changed texts of the statement in one embed_batch() call, then writes the vectors with one UPDATE. key must have a unique index.';

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
    PRIMARY KEY (relation, source, target, pid, started_at)
);
GRANT SELECT, INSERT, UPDATE, DELETE ON embeddinggemma_backfill_progress TO PUBLIC;
-- A role writes only its own runs' rows and sees the runs on tables it can read.
ALTER TABLE embeddinggemma_backfill_progress ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_runs ON embeddinggemma_backfill_progress
    USING (owner = current_user) WITH CHECK (owner = current_user);
CREATE POLICY readable_tables ON embeddinggemma_backfill_progress FOR SELECT
    USING (has_table_privilege(relation, 'SELECT'));

COMMENT ON TABLE embeddinggemma_backfill_progress IS
'One row per embeddinggemma_backfill() run, updated in the same transaction as each batch it commits: rows_done counts committed rows exactly. Rows belong to the role that ran the backfill (owner).';

-- pg_stat_activity hides other roles' backend_start from ordinary users; this only answers
-- whether the session that started a run is still there.
CREATE FUNCTION embeddinggemma_backend_alive(pid int, since timestamptz)
RETURNS boolean
STABLE STRICT SECURITY DEFINER SET search_path = pg_catalog
LANGUAGE sql AS $$
    SELECT EXISTS (SELECT FROM pg_stat_activity a WHERE a.pid = $1 AND a.backend_start <= $2)
$$;

CREATE VIEW embeddinggemma_backfills WITH (security_invoker = true) AS
SELECT p.*,
       p.finished_at IS NULL AND @extschema@.embeddinggemma_backend_alive(p.pid, p.started_at) AS running
  FROM embeddinggemma_backfill_progress p;
GRANT SELECT ON embeddinggemma_backfills TO PUBLIC;

COMMENT ON VIEW embeddinggemma_backfills IS
'Backfill runs and their progress, for tables the current role can read; running is false for a run that finished or whose session ended.';

-- Where a backfill run stands between its batches.
CREATE TYPE embeddinggemma_backfill_state AS (
    relation   regclass,
    source     text,
    target     text,
    started_at timestamptz,
    -- The relations holding rows (tbl, or its partitions and children), and where the
    -- current pass is: each batch starts at the block where the last one stopped.
    leaves     regclass[],
    leaf       int,
    block      bigint,
    -- Rows claimed in this pass. A pass ends with a count of the rows left: none, and the
    -- run is done; some but none claimable (other sessions hold them), and the next claim
    -- waits for one instead of skipping it.
    pass_rows  bigint,
    waiting    boolean,
    done       bigint,
    initial    bigint,
    -- rows_done of all runs on the same columns when this one started.
    others_at_start bigint,
    remaining  bigint,
    finished   boolean,
    message    text
);

CREATE FUNCTION embeddinggemma_backfill_start(tbl regclass, source text, target text, task text, dim int, batch_size int)
RETURNS embeddinggemma_backfill_state
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    s @extschema@.embeddinggemma_backfill_state;
BEGIN
    IF batch_size < 1 THEN
        RAISE EXCEPTION 'embeddinggemma_backfill: batch_size must be positive, not %', batch_size
            USING ERRCODE = 'invalid_parameter_value', HINT = 'The default, 256, suits most tables.';
    END IF;
    PERFORM @extschema@.embeddinggemma_check_columns(tbl, source, target, dim);
    IF NOT EXISTS (SELECT FROM pg_trigger
                    WHERE tgrelid = tbl AND NOT tgisinternal
                      AND tgfoid IN ('@extschema@.embeddinggemma_trigger()'::regprocedure,
                                     '@extschema@.embeddinggemma_statement_trigger()'::regprocedure)) THEN
        RAISE WARNING 'embeddinggemma_backfill: no embeddinggemma trigger on %: rows whose % changes later keep a stale %', tbl, source, target
            USING HINT = format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger(%L, %L, %L, %L);',
                                (SELECT relname || '_embed' FROM pg_class WHERE oid = tbl), tbl, source, target, task, dim);
    END IF;
    s.relation := tbl;
    s.source := source;
    s.target := target;
    s.started_at := clock_timestamp();
    WITH RECURSIVE tree(oid) AS (
        SELECT tbl::oid
        UNION
        SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.oid)
    SELECT array_agg(c.oid::regclass ORDER BY c.oid) INTO s.leaves
      FROM tree JOIN pg_class c ON c.oid = tree.oid
     WHERE c.relkind = 'r';
    s.leaves := coalesce(s.leaves, '{}');
    s.leaf := 1;
    s.block := 0;
    s.pass_rows := 0;
    s.waiting := false;
    s.done := 0;
    EXECUTE format('SELECT count(*) FROM %s WHERE %I IS NULL AND %I IS NOT NULL', tbl, target, source) INTO s.initial;
    SELECT coalesce(sum(p.rows_done), 0) INTO s.others_at_start
      FROM @extschema@.embeddinggemma_backfill_progress p
     WHERE p.relation = tbl AND p.source = s.source AND p.target = s.target;
    s.remaining := s.initial;
    s.finished := false;
    INSERT INTO @extschema@.embeddinggemma_backfill_progress
           (relation, source, target, pid, started_at, updated_at, rows_done, rows_remaining)
    VALUES (tbl, source, target, pg_backend_pid(), s.started_at, clock_timestamp(), 0, s.remaining);
    RETURN s;
END
$fn$;

-- Records a batch of a backfill run in its progress row (in the batch's transaction, so
-- rows_done counts committed work exactly) and says where the run stands.
CREATE FUNCTION embeddinggemma_backfill_record(s embeddinggemma_backfill_state, run text, unit text, finished_note text)
RETURNS embeddinggemma_backfill_state
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    rate      float8;
    time_left interval;
    all_done  bigint;
BEGIN
    IF NOT s.finished THEN
        -- Counting the table after every batch would cost more than the batch: subtract what
        -- every run on these columns did since this one started.
        SELECT coalesce(sum(p.rows_done), 0) + s.done INTO all_done
          FROM @extschema@.embeddinggemma_backfill_progress p
         WHERE p.relation = s.relation AND p.source = s.source AND p.target = s.target
           AND NOT (p.pid = pg_backend_pid() AND p.started_at = s.started_at);
        s.remaining := greatest(s.initial - (all_done - s.others_at_start), 0);
    END IF;
    rate := s.done / greatest(extract(epoch FROM clock_timestamp() - s.started_at), 1e-3);
    time_left := CASE WHEN s.remaining = 0 THEN interval '0' ELSE make_interval(secs => s.remaining / greatest(rate, 1e-9)) END;
    UPDATE @extschema@.embeddinggemma_backfill_progress p
       SET rows_done = s.done, rows_remaining = s.remaining, rows_per_second = rate, updated_at = clock_timestamp(),
           eta = CASE WHEN s.finished THEN CASE WHEN s.remaining = 0 THEN interval '0' END ELSE time_left END,
           finished_at = CASE WHEN s.finished THEN clock_timestamp() END
     WHERE p.relation = s.relation AND p.source = s.source AND p.target = s.target
       AND p.pid = pg_backend_pid() AND p.started_at = s.started_at;
    s.message := CASE
        WHEN s.finished THEN format('%s %s: finished, %s %s by this run in %s, %s left%s',
                                    run, s.relation, s.done, unit, date_trunc('second', clock_timestamp() - s.started_at), s.remaining, finished_note)
        ELSE format('%s %s: %s %s done, %s remaining, %s %s/s, ETA %s',
                    run, s.relation, s.done, split_part(unit, ' ', 1), s.remaining, round(rate::numeric, 1), split_part(unit, ' ', 1), date_trunc('second', time_left))
    END;
    RETURN s;
END
$fn$;

-- Pins search_path for its own statements and runs the batch, whose SQL qualifies every
-- operator and function, under the caller's: as embeddinggemma_statement_trigger().
CREATE FUNCTION embeddinggemma_backfill_step(s embeddinggemma_backfill_state, task text, dim int, batch_size int)
RETURNS embeddinggemma_backfill_state
LANGUAGE plpgsql
AS $fn$
DECLARE
    caller_path text := pg_catalog.current_setting('search_path');
    claimed bigint;
    n       bigint;
    last    tid;
BEGIN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    LOOP
        IF s.leaf > coalesce(array_length(s.leaves, 1), 0) THEN
            -- End of a pass. Rows another session held, or that moved behind the cursor
            -- when updated, are left for the next pass.
            EXECUTE format('SELECT count(*) FROM %s WHERE %I IS NULL AND %I IS NOT NULL', s.relation, s.target, s.source)
               INTO s.remaining;
            IF s.remaining = 0 THEN
                s.finished := true;
                EXIT;
            END IF;
            s.waiting := s.pass_rows = 0;
            s.pass_rows := 0;
            s.leaf := 1;
            s.block := 0;
            CONTINUE;
        END IF;
        -- The TID range scan starts where the last batch stopped, so a batch costs the same
        -- at the end of a big table as at its start.
        PERFORM set_config('search_path', caller_path, true);
        EXECUTE format($q$
            WITH batch AS (
                    SELECT ctid AS rid, %2$I AS body FROM ONLY %1$s
                     WHERE ctid OPERATOR(pg_catalog.>=) $4 AND %3$I IS NULL AND %2$I IS NOT NULL
                     LIMIT %4$s),
                 arrays AS (SELECT pg_catalog.array_agg(rid) AS rids, pg_catalog.array_agg(body) AS bodies,
                                   pg_catalog.max(rid) AS last FROM batch),
                 embedded AS (SELECT a.rids[e.ord] AS rid, e.embedding
                                FROM arrays a, @extschema@.embed_batch(a.bodies, $2, $3) e),
                 updated AS (UPDATE ONLY %1$s t SET %3$I = e.embedding FROM embedded e
                              WHERE t.ctid OPERATOR(pg_catalog.=) e.rid RETURNING 1)
            SELECT (SELECT pg_catalog.count(*) FROM batch), (SELECT pg_catalog.count(*) FROM updated), (SELECT last FROM arrays)
        $q$, s.leaves[s.leaf], s.source, s.target,
             -- Waiting for one row only: holding none while waiting, no deadlock.
             CASE WHEN s.waiting THEN '1 FOR UPDATE' ELSE '$1 FOR UPDATE SKIP LOCKED' END)
        INTO claimed, n, last
        USING batch_size, task, dim, format('(%s,0)', s.block)::tid;
        PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
        IF claimed > 0 THEN
            s.waiting := false;
            -- Claimed rows whose ctid changed before the update (a concurrent update of
            -- another column) are not written now; a later batch or pass finds them.
            s.block := (last::text::point)[0]::bigint;
            s.pass_rows := s.pass_rows + claimed;
            s.done := s.done + n;
            EXIT;
        END IF;
        s.leaf := s.leaf + 1;
        s.block := 0;
    END LOOP;
    s := @extschema@.embeddinggemma_backfill_record(s, 'embeddinggemma_backfill', 'rows embedded', ' (NULL text, or added since)');
    PERFORM set_config('search_path', caller_path, true);
    RETURN s;
END
$fn$;

-- The procedure only commits between batches: a procedure with SET search_path could not.
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
    s @extschema@.embeddinggemma_backfill_state;
BEGIN
    s := @extschema@.embeddinggemma_backfill_start(tbl, source, target, task, dim, batch_size);
    COMMIT;
    LOOP
        s := @extschema@.embeddinggemma_backfill_step(s, task, dim, batch_size);
        COMMIT;
        RAISE NOTICE '%', s.message;
        EXIT WHEN s.finished;
    END LOOP;
END
$proc$;

COMMENT ON PROCEDURE embeddinggemma_backfill(regclass, text, text, text, int, int) IS
'Embeds every row whose target is NULL and source is not, batch_size rows per embed_batch() call, committing after each batch. Rows are claimed with FOR UPDATE SKIP LOCKED, so several sessions can run it on one table at once; a rerun continues where a cancelled or killed run stopped. It returns when no row is left to embed. Call it outside a transaction block.';

-- Long documents: chunks on the model's own token boundaries, and a chunk table kept in step.
CREATE FUNCTION chunks(input text, max_tokens int DEFAULT 512, overlap int DEFAULT 64, task text DEFAULT 'document')
RETURNS TABLE(chunk int, start_offset int, end_offset int, body text)
IMMUTABLE STRICT PARALLEL SAFE COST 1000 ROWS 10
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_chunks_wrapper';

COMMENT ON FUNCTION chunks(text, int, int, text) IS
'Cuts input into chunks of at most max_tokens tokens each as embedded with task''s prompt (<bos> and <eos> included), preferring paragraph, then sentence, then word breaks; consecutive chunks share about overlap tokens. body = substr(input, start_offset, end_offset - start_offset): offsets are 1-based character positions, end exclusive. An empty input has no chunks.';

CREATE FUNCTION embed_chunks(input text, max_tokens int DEFAULT 512, overlap int DEFAULT 64, task text DEFAULT 'document', dim int DEFAULT 768)
RETURNS TABLE(chunk int, start_offset int, end_offset int, body text, embedding vector)
IMMUTABLE STRICT PARALLEL SAFE COST 10000 ROWS 10
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_embed_chunks_wrapper';

COMMENT ON FUNCTION embed_chunks(text, int, int, text, int) IS
'chunks(input, max_tokens, overlap, task) with each chunk''s embedding, equal to embed(body, task, dim); the chunks are embedded together, as embed_batch.';

CREATE FUNCTION embed_chunks(inputs text[], max_tokens int DEFAULT 512, overlap int DEFAULT 64, task text DEFAULT 'document', dim int DEFAULT 768)
RETURNS TABLE(ord int, chunk int, start_offset int, end_offset int, body text, embedding vector)
IMMUTABLE STRICT PARALLEL SAFE COST 10000 ROWS 100
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_embed_chunks_array_wrapper';

COMMENT ON FUNCTION embed_chunks(text[], int, int, text, int) IS
'embed_chunks over many documents: the chunks of all of them are embedded together, as embed_batch over their bodies. ord is the document''s 1-based array position; NULL and empty documents have no chunks.';

CREATE FUNCTION embeddinggemma_check_source(tbl regclass, source text)
RETURNS void
STABLE STRICT PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_check_source_wrapper';

COMMENT ON FUNCTION embeddinggemma_check_source(regclass, text) IS
'Raises an error naming the column unless source is a text column of tbl.';

-- Checks a chunk trigger's arguments and tables; returns the settings.
CREATE FUNCTION embeddinggemma_chunk_check(tbl regclass, args text[], chunk_rel regclass)
RETURNS TABLE(key_col text, source text, chunk_table regclass, chunk_key text, max_tokens int, overlap int, task text, dim int)
STABLE
SET search_path = pg_catalog, pg_temp
LANGUAGE plpgsql AS $fn$
DECLARE
    usage constant text := 'CREATE TRIGGER docs_chunks AFTER INSERT OR UPDATE OR DELETE ON docs FOR EACH ROW EXECUTE FUNCTION embeddinggemma_chunk_trigger(''id'', ''body'', ''doc_chunks'', ''doc_id'' [, max_tokens [, overlap [, task [, dim]]]]);';
    col text;
BEGIN
    IF coalesce(array_length(args, 1), 0) NOT BETWEEN 4 AND 8 THEN
        RAISE EXCEPTION 'embeddinggemma_chunk_trigger() takes a key column, a text column, a chunk table and its key column, then optionally max_tokens, overlap, task and dim'
            USING ERRCODE = 'triggered_action_exception', HINT = usage;
    END IF;
    args := args[array_lower(args, 1):array_upper(args, 1)];  -- TG_ARGV counts from 0
    key_col := args[1];
    source := args[2];
    chunk_table := chunk_rel;
    IF chunk_table IS NULL THEN
        RAISE EXCEPTION 'embeddinggemma: chunk table % does not exist', args[3]
            USING ERRCODE = 'undefined_table',
                  HINT = 'CREATE TABLE doc_chunks (doc_id bigint REFERENCES docs ON DELETE CASCADE ON UPDATE CASCADE, chunk int, start_offset int, end_offset int, body text, embedding vector(768), PRIMARY KEY (doc_id, chunk));';
    END IF;
    chunk_key := args[4];
    BEGIN
        max_tokens := coalesce(args[5], '512')::int;
        overlap := coalesce(args[6], '64')::int;
        dim := coalesce(args[8], '768')::int;
    EXCEPTION WHEN invalid_text_representation OR numeric_value_out_of_range THEN
        RAISE EXCEPTION 'embeddinggemma_chunk_trigger(): max_tokens, overlap and dim must be integers, not %, %, %', args[5], args[6], args[8]
            USING ERRCODE = 'triggered_action_exception', HINT = usage;
    END;
    task := coalesce(args[7], 'document');
    PERFORM @extschema@.embeddinggemma_check_key(tbl, key_col);
    PERFORM @extschema@.embeddinggemma_check_columns(chunk_table, 'body', 'embedding', dim);
    FOREACH col IN ARRAY ARRAY[chunk_key, 'chunk', 'start_offset', 'end_offset'] LOOP
        IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = chunk_table AND attname = col AND attnum > 0 AND NOT attisdropped) THEN
            RAISE EXCEPTION 'embeddinggemma: chunk table % has no column "%"', chunk_table, col
                USING ERRCODE = 'undefined_column',
                      HINT = format('A chunk table has the columns %I, chunk, start_offset, end_offset, body and embedding: CREATE TABLE doc_chunks (doc_id bigint REFERENCES docs ON DELETE CASCADE ON UPDATE CASCADE, chunk int, start_offset int, end_offset int, body text, embedding vector(768), PRIMARY KEY (doc_id, chunk));', chunk_key);
        END IF;
    END LOOP;
    PERFORM @extschema@.embeddinggemma_check_source(tbl, source);
    RETURN NEXT;
END
$fn$;

-- Keeps a chunk table in step with its documents, row by row. As the statement trigger, it
-- pins search_path for its own statements and runs the SQL on the user's tables, with every
-- operator and function qualified, under the caller's.
CREATE FUNCTION embeddinggemma_chunk_trigger()
RETURNS trigger
LANGUAGE plpgsql
AS $fn$
DECLARE
    caller_path text := pg_catalog.current_setting('search_path');
    -- The chunk table is named as the key and text columns are: in the caller's terms.
    chunk_rel regclass := pg_catalog.to_regclass(TG_ARGV[2]);
    c record;
    text_changed boolean := true;
    key_changed boolean := true;
BEGIN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    IF TG_LEVEL <> 'ROW' OR TG_WHEN <> 'AFTER' THEN
        RAISE EXCEPTION 'embeddinggemma_chunk_trigger() must be fired AFTER INSERT OR UPDATE OR DELETE … FOR EACH ROW'
            USING ERRCODE = 'triggered_action_exception',
                  HINT = 'CREATE TRIGGER docs_chunks AFTER INSERT OR UPDATE OR DELETE ON docs FOR EACH ROW EXECUTE FUNCTION embeddinggemma_chunk_trigger(''id'', ''body'', ''doc_chunks'', ''doc_id'');';
    END IF;
    SELECT * INTO c FROM @extschema@.embeddinggemma_chunk_check(TG_RELID, TG_ARGV, chunk_rel);
    IF TG_OP = 'UPDATE' THEN
        EXECUTE format('SELECT ($1).%1$I::text IS DISTINCT FROM ($2).%1$I::text, ($1).%2$I IS DISTINCT FROM ($2).%2$I', c.source, c.key_col)
           INTO text_changed, key_changed USING OLD, NEW;
        IF NOT text_changed AND NOT key_changed THEN
            PERFORM pg_catalog.set_config('search_path', caller_path, true);
            RETURN NULL;
        END IF;
    END IF;
    PERFORM pg_catalog.set_config('search_path', caller_path, true);
    IF TG_OP = 'UPDATE' AND NOT text_changed THEN
        -- Only the key changed: the chunks move with it (a foreign key with ON UPDATE
        -- CASCADE has moved them already).
        EXECUTE format('UPDATE %s SET %I = ($2).%I WHERE %2$I OPERATOR(pg_catalog.=) ($1).%4$I', c.chunk_table, c.chunk_key, c.key_col, c.key_col)
          USING OLD, NEW;
    ELSE
        -- With a new key too, a foreign key's ON UPDATE CASCADE has moved the old chunks to it.
        IF TG_OP = 'UPDATE' THEN
            EXECUTE format('DELETE FROM %s WHERE %I OPERATOR(pg_catalog.=) ($1).%I OR %2$I OPERATOR(pg_catalog.=) ($2).%3$I',
                           c.chunk_table, c.chunk_key, c.key_col) USING OLD, NEW;
        ELSIF TG_OP = 'DELETE' THEN
            EXECUTE format('DELETE FROM %s WHERE %I OPERATOR(pg_catalog.=) ($1).%I', c.chunk_table, c.chunk_key, c.key_col) USING OLD;
        END IF;
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            EXECUTE format($q$
                INSERT INTO %1$s (%2$I, chunk, start_offset, end_offset, body, embedding)
                SELECT ($1).%3$I, e.chunk, e.start_offset, e.end_offset, e.body, e.embedding
                  FROM @extschema@.embed_chunks(($1).%4$I::pg_catalog.text, $2, $3, $4, $5) e
            $q$, c.chunk_table, c.chunk_key, c.key_col, c.source)
            USING NEW, c.max_tokens, c.overlap, c.task, c.dim;
        END IF;
    END IF;
    RETURN NULL;
END
$fn$;

COMMENT ON FUNCTION embeddinggemma_chunk_trigger() IS
'AFTER INSERT OR UPDATE OR DELETE FOR EACH ROW trigger: embeddinggemma_chunk_trigger(key, source, chunk_table, chunk_key [, max_tokens [, overlap [, task [, dim]]]]) replaces a document''s rows in chunk_table (columns chunk_key, chunk, start_offset, end_offset, body, embedding) with embed_chunks(source) when its text changes, moves them when only its key changes, and deletes them with the document. Updates that change neither do no work.';

-- The arguments of the chunk trigger on tbl that writes chunk_table: the backfill chunks as it does.
CREATE FUNCTION embeddinggemma_chunk_trigger_args(tbl regclass, chunk_table regclass)
RETURNS text[]
STABLE
SET search_path = pg_catalog, pg_temp
LANGUAGE sql AS $$
    SELECT a.args
      FROM pg_trigger t,
           LATERAL (SELECT (string_to_array(encode(t.tgargs, 'escape'), '\000'))[1:t.tgnargs] AS args) a
     WHERE t.tgrelid = tbl AND NOT t.tgisinternal AND t.tgnargs >= 3
       AND t.tgfoid = '@extschema@.embeddinggemma_chunk_trigger()'::regprocedure
       -- By name, as the trigger's argument may be unqualified: [schema.]name of chunk_table.
       AND (SELECT p[array_length(p, 1)] = c.relname AND (array_length(p, 1) = 1 OR p[1] = n.nspname)
              FROM parse_ident(a.args[3], false) p, pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = chunk_table)
     ORDER BY t.tgname
     LIMIT 1
$$;

-- The chunk backfill claims documents that have a text but no chunks, a batch at a time,
-- with the block cursor of embeddinggemma_backfill_step.
CREATE FUNCTION embeddinggemma_chunk_backfill_start(tbl regclass, chunk_table regclass, batch_size int)
RETURNS embeddinggemma_backfill_state
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    s @extschema@.embeddinggemma_backfill_state;
    c record;
    found_args text[];
BEGIN
    IF batch_size < 1 THEN
        RAISE EXCEPTION 'embeddinggemma_chunk_backfill: batch_size must be positive, not %', batch_size
            USING ERRCODE = 'invalid_parameter_value', HINT = 'The default, 16 documents, suits most tables.';
    END IF;
    found_args := @extschema@.embeddinggemma_chunk_trigger_args(tbl, chunk_table);
    IF found_args IS NULL THEN
        RAISE EXCEPTION 'embeddinggemma_chunk_backfill: no embeddinggemma_chunk_trigger on % writes %', tbl, chunk_table
            USING ERRCODE = 'undefined_object',
                  HINT = format('The backfill chunks as the trigger does, with its settings: CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION embeddinggemma_chunk_trigger(''id'', ''body'', %L, ''doc_id'');',
                                (SELECT relname || '_chunks' FROM pg_class WHERE oid = tbl), tbl, chunk_table::text);
    END IF;
    SELECT * INTO c FROM @extschema@.embeddinggemma_chunk_check(tbl, found_args, chunk_table);
    s.relation := tbl;
    s.source := c.source;
    s.target := chunk_table::text;
    s.started_at := clock_timestamp();
    WITH RECURSIVE tree(oid) AS (
        SELECT tbl::oid
        UNION
        SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.oid)
    SELECT array_agg(pc.oid::regclass ORDER BY pc.oid) INTO s.leaves
      FROM tree JOIN pg_class pc ON pc.oid = tree.oid
     WHERE pc.relkind = 'r';
    s.leaves := coalesce(s.leaves, '{}');
    s.leaf := 1;
    s.block := 0;
    s.pass_rows := 0;
    s.waiting := false;
    s.done := 0;
    EXECUTE @extschema@.embeddinggemma_chunk_backfill_todo(c.key_col, c.source, c.chunk_table, c.chunk_key, 'SELECT pg_catalog.count(*)', tbl::text)
       INTO s.initial;
    SELECT coalesce(sum(p.rows_done), 0) INTO s.others_at_start
      FROM @extschema@.embeddinggemma_backfill_progress p
     WHERE p.relation = tbl AND p.source = s.source AND p.target = s.target;
    s.remaining := s.initial;
    s.finished := false;
    INSERT INTO @extschema@.embeddinggemma_backfill_progress
           (relation, source, target, pid, started_at, updated_at, rows_done, rows_remaining)
    VALUES (tbl, s.source, s.target, pg_backend_pid(), s.started_at, clock_timestamp(), 0, s.remaining);
    RETURN s;
END
$fn$;

-- The documents a chunk backfill has to do: a text, and no chunks.
CREATE FUNCTION embeddinggemma_chunk_backfill_todo(key_col text, source text, chunk_table regclass, chunk_key text, what text, rel text)
RETURNS text
STABLE
SET search_path = pg_catalog, pg_temp
LANGUAGE sql AS $$
    SELECT format('%s FROM %s d WHERE d.%I IS NOT NULL AND d.%I::pg_catalog.text OPERATOR(pg_catalog.<>) %L
                     AND NOT EXISTS (SELECT FROM %s c WHERE c.%I OPERATOR(pg_catalog.=) d.%I)',
                  what, rel, source, source, '', chunk_table, chunk_key, key_col)
$$;

CREATE FUNCTION embeddinggemma_chunk_backfill_step(s embeddinggemma_backfill_state, batch_size int)
RETURNS embeddinggemma_backfill_state
LANGUAGE plpgsql
AS $fn$
DECLARE
    caller_path text := pg_catalog.current_setting('search_path');
    c record;
    rids    tid[];
    last    tid;
BEGIN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    SELECT * INTO c FROM @extschema@.embeddinggemma_chunk_check(s.relation, @extschema@.embeddinggemma_chunk_trigger_args(s.relation, s.target::regclass), s.target::regclass);
    LOOP
        IF s.leaf > coalesce(array_length(s.leaves, 1), 0) THEN
            EXECUTE @extschema@.embeddinggemma_chunk_backfill_todo(c.key_col, c.source, c.chunk_table, c.chunk_key, 'SELECT pg_catalog.count(*)', s.relation::text)
               INTO s.remaining;
            IF s.remaining = 0 THEN
                s.finished := true;
                EXIT;
            END IF;
            s.waiting := s.pass_rows = 0;
            s.pass_rows := 0;
            s.leaf := 1;
            s.block := 0;
            CONTINUE;
        END IF;
        PERFORM pg_catalog.set_config('search_path', caller_path, true);
        -- Claim (lock) the documents first; the chunks are replaced by later statements, whose
        -- snapshots see chunks a concurrent trigger committed after this one's.
        EXECUTE format('SELECT pg_catalog.array_agg(rid), pg_catalog.max(rid) FROM (%s LIMIT %s) b',
                       @extschema@.embeddinggemma_chunk_backfill_todo(c.key_col, c.source, c.chunk_table, c.chunk_key, 'SELECT d.ctid AS rid',
                                                                      format('ONLY %s', s.leaves[s.leaf]))
                         || ' AND d.ctid OPERATOR(pg_catalog.>=) $2',
                       CASE WHEN s.waiting THEN '1 FOR UPDATE OF d' ELSE '$1 FOR UPDATE OF d SKIP LOCKED' END)
           INTO rids, last USING batch_size, format('(%s,0)', s.block)::tid;
        IF rids IS NOT NULL THEN
            EXECUTE format('DELETE FROM %s c USING ONLY %s d WHERE d.ctid OPERATOR(pg_catalog.=) ANY ($1) AND c.%I OPERATOR(pg_catalog.=) d.%I',
                           c.chunk_table, s.leaves[s.leaf], c.chunk_key, c.key_col) USING rids;
            EXECUTE format($q$
                WITH docs AS (SELECT pg_catalog.array_agg(d.%4$I ORDER BY d.ctid) AS keys,
                                     pg_catalog.array_agg(d.%5$I::pg_catalog.text ORDER BY d.ctid) AS bodies
                                FROM ONLY %1$s d WHERE d.ctid OPERATOR(pg_catalog.=) ANY ($1))
                INSERT INTO %2$s (%3$I, chunk, start_offset, end_offset, body, embedding)
                SELECT docs.keys[e.ord], e.chunk, e.start_offset, e.end_offset, e.body, e.embedding
                  FROM docs, @extschema@.embed_chunks(docs.bodies, $2, $3, $4, $5) e
            $q$, s.leaves[s.leaf], c.chunk_table, c.chunk_key, c.key_col, c.source)
            USING rids, c.max_tokens, c.overlap, c.task, c.dim;
        END IF;
        PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
        IF rids IS NOT NULL THEN
            s.waiting := false;
            s.block := (last::text::point)[0]::bigint;
            s.pass_rows := s.pass_rows + array_length(rids, 1);
            s.done := s.done + array_length(rids, 1);
            EXIT;
        END IF;
        s.leaf := s.leaf + 1;
        s.block := 0;
    END LOOP;
    s := @extschema@.embeddinggemma_backfill_record(s, 'embeddinggemma_chunk_backfill', 'documents chunked', '');
    PERFORM set_config('search_path', caller_path, true);
    RETURN s;
END
$fn$;

CREATE PROCEDURE embeddinggemma_chunk_backfill(tbl regclass, chunk_table regclass, batch_size int DEFAULT 16)
LANGUAGE plpgsql AS $proc$
DECLARE
    s @extschema@.embeddinggemma_backfill_state;
BEGIN
    s := @extschema@.embeddinggemma_chunk_backfill_start(tbl, chunk_table, batch_size);
    COMMIT;
    LOOP
        s := @extschema@.embeddinggemma_chunk_backfill_step(s, batch_size);
        COMMIT;
        RAISE NOTICE '%', s.message;
        EXIT WHEN s.finished;
    END LOOP;
END
$proc$;

COMMENT ON PROCEDURE embeddinggemma_chunk_backfill(regclass, regclass, int) IS
'Fills chunk_table for every document of tbl that has a non-empty text and no chunks, with the settings of the embeddinggemma_chunk_trigger on tbl that writes chunk_table, batch_size documents per embed_chunks() call, committing after each batch. Several sessions can run it at once; a rerun continues where a cancelled or killed run stopped. Progress shows in embeddinggemma_backfills (target = the chunk table). Call it outside a transaction block.';
