-- embeddinggemma 0.1.0 → 0.2.0 (ALTER EXTENSION embeddinggemma UPDATE TO '0.2.0').
-- Leaves the same objects as a fresh CREATE EXTENSION of 0.2.0 (tested).
\echo Use "ALTER EXTENSION embeddinggemma UPDATE" to load this file. \quit

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

-- The statement trigger: rows told apart by text and vector (key swaps), unique keys,
-- a pinned search_path.
CREATE OR REPLACE FUNCTION embeddinggemma_statement_trigger()
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
    IF NOT EXISTS (SELECT FROM pg_attribute
                    WHERE attrelid = TG_RELID AND attname = key_col AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'embeddinggemma: key column "%" does not exist in table %', key_col, TG_RELID::regclass
            USING ERRCODE = 'undefined_column', HINT = 'The first argument names a unique key of the table, e.g. its primary key.';
    END IF;
    -- Vectors are written back by key: two rows with one key would get each other's.
    IF NOT EXISTS (SELECT FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                    WHERE i.indrelid = TG_RELID AND i.indisunique AND i.indnkeyatts = 1 AND i.indpred IS NULL
                      AND a.attname = key_col) THEN
        RAISE EXCEPTION 'embeddinggemma: key column "%" of table % is not unique', key_col, TG_RELID::regclass
            USING ERRCODE = 'invalid_object_definition',
                  HINT = format('Name a column with a unique index (e.g. the primary key), or add one: CREATE UNIQUE INDEX ON %s (%I);', TG_RELID::regclass, key_col);
    END IF;
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

-- Progress rows belong to the role that ran the backfill; a role sees runs on tables it can
-- read. Runs recorded by 0.1.0 are given to the role that updates the extension.
ALTER TABLE embeddinggemma_backfill_progress ADD COLUMN owner name NOT NULL DEFAULT current_user;
GRANT SELECT, INSERT, UPDATE, DELETE ON embeddinggemma_backfill_progress TO PUBLIC;
ALTER TABLE embeddinggemma_backfill_progress ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_runs ON embeddinggemma_backfill_progress
    USING (owner = current_user) WITH CHECK (owner = current_user);
CREATE POLICY readable_tables ON embeddinggemma_backfill_progress FOR SELECT
    USING (has_table_privilege(relation, 'SELECT'));

COMMENT ON TABLE embeddinggemma_backfill_progress IS
'One row per embeddinggemma_backfill() run, updated in the same transaction as each batch it commits: rows_done counts committed rows exactly. Rows belong to the role that ran the backfill (owner).';

-- The view gains owner and runs with the caller's rights (so the policies apply).
DROP VIEW embeddinggemma_backfills;
CREATE VIEW embeddinggemma_backfills WITH (security_invoker = true) AS
SELECT p.*,
       p.finished_at IS NULL AND @extschema@.embeddinggemma_backend_alive(p.pid, p.started_at) AS running
  FROM embeddinggemma_backfill_progress p;
GRANT SELECT ON embeddinggemma_backfills TO PUBLIC;

COMMENT ON VIEW embeddinggemma_backfills IS
'Backfill runs and their progress, for tables the current role can read; running is false for a run that finished or whose session ended.';

-- The backfill: a cursor over blocks instead of a scan from the start per batch.
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
    rate    float8;
    time_left interval;
    all_done bigint;
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
        WHEN s.finished THEN format('embeddinggemma_backfill %s: finished, %s rows embedded by this run in %s, %s left (NULL text, or added since)',
                                    s.relation, s.done, date_trunc('second', clock_timestamp() - s.started_at), s.remaining)
        ELSE format('embeddinggemma_backfill %s: %s rows done, %s remaining, %s rows/s, ETA %s',
                    s.relation, s.done, s.remaining, round(rate::numeric, 1), date_trunc('second', time_left))
    END;
    PERFORM set_config('search_path', caller_path, true);
    RETURN s;
END
$fn$;

-- The procedure only commits between batches: a procedure with SET search_path could not.
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
