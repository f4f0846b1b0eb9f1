-- embeddinggemma 0.1.0, as released: installed beside 0.2.0 so that
-- CREATE EXTENSION embeddinggemma VERSION '0.1.0' followed by ALTER EXTENSION ... UPDATE works (and is tested).
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

-- Bulk writes: one embed_batch() over the statement's transition table, then one UPDATE.
CREATE FUNCTION embeddinggemma_statement_trigger()
RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    key_col text := TG_ARGV[0];
    source  text := TG_ARGV[1];
    target  text := TG_ARGV[2];
    task    text := coalesce(TG_ARGV[3], 'document');
    dim     int  := coalesce(TG_ARGV[4], '768')::int;
    changed text;
    any_change boolean;
BEGIN
    IF TG_LEVEL <> 'STATEMENT' OR TG_WHEN <> 'AFTER' OR TG_OP NOT IN ('INSERT', 'UPDATE') OR TG_NARGS NOT BETWEEN 3 AND 5 THEN
        RAISE EXCEPTION 'embeddinggemma_statement_trigger() must be fired AFTER INSERT or AFTER UPDATE … FOR EACH STATEMENT with arguments (key column, source column, target column [, task [, dim]])'
            USING ERRCODE = 'triggered_action_exception',
                  HINT = 'CREATE TRIGGER docs_embed AFTER INSERT ON docs REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger(''id'', ''body'', ''v'');';
    END IF;
    PERFORM @extschema@.embeddinggemma_check_columns(TG_RELID, source, target, dim);
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute
                    WHERE attrelid = TG_RELID AND attname = key_col AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'embeddinggemma: key column "%" does not exist in table %', key_col, TG_RELID::regclass
            USING ERRCODE = 'undefined_column', HINT = 'The first argument names a unique key of the table, e.g. its primary key.';
    END IF;
    IF TG_OP = 'INSERT' THEN
        changed := format('SELECT n.%1$I AS k, n.%2$I AS body FROM new_rows n WHERE n.%2$I IS NOT NULL', key_col, source);
    ELSE
        -- A row's text changed unless an old row with the same key had the same text (so an
        -- UPDATE of the key is seen too). The UPDATE this trigger issues below changes no
        -- text, so its own firing of this trigger stops here.
        changed := format('SELECT n.%1$I AS k, n.%2$I AS body FROM new_rows n
                            WHERE NOT EXISTS (SELECT FROM old_rows o
                                               WHERE o.%1$I = n.%1$I AND o.%2$I IS NOT DISTINCT FROM n.%2$I)',
                          key_col, source);
        EXECUTE format('SELECT EXISTS (%s)', changed) INTO any_change;
        IF NOT any_change THEN
            RETURN NULL;
        END IF;
        EXECUTE format('UPDATE %1$s t SET %2$I = NULL FROM (%3$s) c WHERE t.%4$I = c.k AND c.body IS NULL',
                       TG_RELID::regclass, target, changed, key_col);
        changed := format('SELECT * FROM (%s) c WHERE c.body IS NOT NULL', changed);
    END IF;
    EXECUTE format($q$
        WITH changed AS (%1$s),
             batch AS (SELECT array_agg(k) AS keys, array_agg(body) AS bodies FROM changed),
             embedded AS (SELECT b.keys[e.ord] AS k, e.embedding
                            FROM batch b, @extschema@.embed_batch(b.bodies, $1, $2) e)
        UPDATE %2$s t SET %3$I = e.embedding FROM embedded e WHERE t.%4$I = e.k
    $q$, changed, TG_RELID::regclass, target, key_col) USING task, dim;
    RETURN NULL;
EXCEPTION WHEN undefined_table THEN
    IF SQLERRM NOT LIKE '%new_rows%' AND SQLERRM NOT LIKE '%old_rows%' THEN
        RAISE;
    END IF;
    RAISE EXCEPTION 'embeddinggemma_statement_trigger(): %', SQLERRM
        USING ERRCODE = 'triggered_action_exception',
              HINT = 'Name the transition tables new_rows (and old_rows for UPDATE): REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows.';
END
$fn$;

COMMENT ON FUNCTION embeddinggemma_statement_trigger() IS
'AFTER INSERT or AFTER UPDATE FOR EACH STATEMENT trigger with transition tables new_rows (and old_rows): embeddinggemma_statement_trigger(key, source, target [, task [, dim]]) embeds all new or changed texts of the statement in one embed_batch() call, then writes the vectors with one UPDATE.';

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
    PRIMARY KEY (relation, source, target, pid, started_at)
);
GRANT SELECT, INSERT, UPDATE ON embeddinggemma_backfill_progress TO PUBLIC;

COMMENT ON TABLE embeddinggemma_backfill_progress IS
'One row per embeddinggemma_backfill() run, updated in the same transaction as each batch it commits: rows_done counts committed rows exactly.';

-- pg_stat_activity hides other roles' backend_start from ordinary users; this only answers
-- whether the session that started a run is still there.
CREATE FUNCTION embeddinggemma_backend_alive(pid int, since timestamptz)
RETURNS boolean
STABLE STRICT SECURITY DEFINER SET search_path = pg_catalog
LANGUAGE sql AS $$
    SELECT EXISTS (SELECT FROM pg_stat_activity a WHERE a.pid = $1 AND a.backend_start <= $2)
$$;

CREATE VIEW embeddinggemma_backfills AS
SELECT p.*,
       p.finished_at IS NULL AND @extschema@.embeddinggemma_backend_alive(p.pid, p.started_at) AS running
  FROM embeddinggemma_backfill_progress p;
GRANT SELECT ON embeddinggemma_backfills TO PUBLIC;

COMMENT ON VIEW embeddinggemma_backfills IS
'Backfill runs and their progress; running is false for a run that finished or whose session ended.';

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
    started   timestamptz := clock_timestamp();
    done      bigint := 0;
    remaining bigint;
    batches   bigint := 0;
    n         bigint;
    rate      float8;
    time_left interval;
    count_sql text := format('SELECT count(*) FROM %s WHERE %I IS NULL AND %I IS NOT NULL', tbl, target, source);
    batch_sql text := format($q$
        WITH batch AS (
                SELECT tableoid AS rel, ctid AS rid, %2$I AS body FROM %1$s
                 WHERE %3$I IS NULL AND %2$I IS NOT NULL
                 LIMIT $1 FOR UPDATE SKIP LOCKED),
             arrays AS (SELECT array_agg(rel) AS rels, array_agg(rid) AS rids, array_agg(body) AS bodies FROM batch),
             embedded AS (SELECT a.rels[e.ord] AS rel, a.rids[e.ord] AS rid, e.embedding
                            FROM arrays a, @extschema@.embed_batch(a.bodies, $2, $3) e)
        -- ctid is unique only within one relation: with partitions or inheritance, match both.
        UPDATE %1$s t SET %3$I = e.embedding FROM embedded e WHERE t.tableoid = e.rel AND t.ctid = e.rid
    $q$, tbl, source, target);
BEGIN
    IF batch_size < 1 THEN
        RAISE EXCEPTION 'embeddinggemma_backfill: batch_size must be positive, not %', batch_size
            USING ERRCODE = 'invalid_parameter_value', HINT = 'The default, 256, suits most tables.';
    END IF;
    PERFORM @extschema@.embeddinggemma_check_columns(tbl, source, target, dim);
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_trigger
                    WHERE tgrelid = tbl AND NOT tgisinternal
                      AND tgfoid IN ('@extschema@.embeddinggemma_trigger()'::regprocedure,
                                     '@extschema@.embeddinggemma_statement_trigger()'::regprocedure)) THEN
        RAISE WARNING 'embeddinggemma_backfill: no embeddinggemma trigger on %: rows whose % changes later keep a stale %', tbl, source, target
            USING HINT = format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger(%L, %L, %L, %L);',
                                (SELECT relname || '_embed' FROM pg_catalog.pg_class WHERE oid = tbl), tbl, source, target, task, dim);
    END IF;
    EXECUTE count_sql INTO remaining;
    INSERT INTO @extschema@.embeddinggemma_backfill_progress
           (relation, source, target, pid, started_at, updated_at, rows_done, rows_remaining)
    VALUES (tbl, source, target, pg_backend_pid(), started, clock_timestamp(), 0, remaining);
    COMMIT;
    LOOP
        EXECUTE batch_sql USING batch_size, task, dim;
        GET DIAGNOSTICS n = ROW_COUNT;
        EXIT WHEN n = 0;
        done := done + n;
        batches := batches + 1;
        -- Other sessions may be backfilling too: count again now and then.
        IF batches % 10 = 0 THEN
            EXECUTE count_sql INTO remaining;
        ELSE
            remaining := greatest(remaining - n, 0);
        END IF;
        rate := done / greatest(extract(epoch FROM clock_timestamp() - started), 1e-3);
        time_left := make_interval(secs => remaining / greatest(rate, 1e-9));
        UPDATE @extschema@.embeddinggemma_backfill_progress
           SET rows_done = done, rows_remaining = remaining, rows_per_second = rate, eta = time_left,
               updated_at = clock_timestamp()
         WHERE relation = tbl AND pid = pg_backend_pid() AND started_at = started
           AND embeddinggemma_backfill_progress.source = embeddinggemma_backfill.source
           AND embeddinggemma_backfill_progress.target = embeddinggemma_backfill.target;
        COMMIT;
        RAISE NOTICE 'embeddinggemma_backfill %: % rows done, % remaining, % rows/s, ETA %',
            tbl, done, remaining, round(rate::numeric, 1), date_trunc('second', time_left);
    END LOOP;
    EXECUTE count_sql INTO remaining;
    UPDATE @extschema@.embeddinggemma_backfill_progress
       SET rows_remaining = remaining, finished_at = clock_timestamp(), updated_at = clock_timestamp(),
           eta = CASE WHEN remaining = 0 THEN interval '0' END
     WHERE relation = tbl AND pid = pg_backend_pid() AND started_at = started
       AND embeddinggemma_backfill_progress.source = embeddinggemma_backfill.source
       AND embeddinggemma_backfill_progress.target = embeddinggemma_backfill.target;
    COMMIT;
    RAISE NOTICE 'embeddinggemma_backfill %: finished, % rows embedded by this run in %, % left (locked by other sessions or NULL text)',
        tbl, done, date_trunc('second', clock_timestamp() - started), remaining;
END
$proc$;

COMMENT ON PROCEDURE embeddinggemma_backfill(regclass, text, text, text, int, int) IS
'Embeds every row whose target is NULL and source is not, batch_size rows per embed_batch() call, committing after each batch. Rows are claimed with FOR UPDATE SKIP LOCKED, so several sessions can run it on one table at once; a rerun continues where a cancelled or killed run stopped. Call it outside a transaction block.';
