-- embeddinggemma 0.4.0 -> 0.5.0: the asynchronous worker's queue remembers entries in hand
-- when a worker stopped mid-batch (embedded alone next, kept apart after a second stop) and
-- keys in their type's binary form (read back exactly whatever the writer's settings); the
-- status views are security barriers; the target id sequence is dumped with the targets.

ALTER TABLE @extschema@.embeddinggemma_async_queue ADD COLUMN interrupted int NOT NULL DEFAULT 0;
ALTER TABLE @extschema@.embeddinggemma_async_queue ADD COLUMN key_bytes bytea;
ALTER TABLE @extschema@.embeddinggemma_async_queue ADD COLUMN key_type oid;

-- Columns followed by number through renames.
ALTER TABLE @extschema@.embeddinggemma_async_targets ADD COLUMN key_attnum int2, ADD COLUMN source_attnum int2, ADD COLUMN target_attnum int2;
ALTER TABLE @extschema@.embeddinggemma_async_targets ADD COLUMN kept_existing boolean NOT NULL DEFAULT false;
UPDATE @extschema@.embeddinggemma_async_targets t
   SET key_attnum = (SELECT a.attnum FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) t.relation AND a.attname OPERATOR(pg_catalog.=) t.key_column AND NOT a.attisdropped),
       source_attnum = (SELECT a.attnum FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) t.relation AND a.attname OPERATOR(pg_catalog.=) t.source AND NOT a.attisdropped),
       target_attnum = CASE WHEN t.chunk_table IS NULL THEN
                       (SELECT a.attnum FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) t.relation AND a.attname OPERATOR(pg_catalog.=) t.target AND NOT a.attisdropped) END;

ALTER VIEW @extschema@.embeddinggemma_async_status SET (security_barrier = true);
CREATE OR REPLACE VIEW @extschema@.embeddinggemma_async_failures WITH (security_barrier) AS
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

COMMENT ON VIEW @extschema@.embeddinggemma_async_failures IS
'Rows whose write kept failing (a user trigger raised, a constraint, a dropped column) after the retries, with the last error, for the tables the current role owns (keys and errors can carry row data that row-level security hides from other readers). They block nothing; embeddinggemma_async_reembed queues them again.';

SELECT pg_catalog.pg_extension_config_dump('embeddinggemma_async_targets_id_seq', '');

COMMENT ON FUNCTION @extschema@.embeddinggemma_async_wait(regclass, text, interval) IS
'Waits (interruptibly) until nothing is pending for the target — every queued row embedded or failed — and returns true; false if timeout passes first. Needs SELECT on the table.';

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

DROP FUNCTION @extschema@.embeddinggemma_async(regclass, text, text, text, int, text, boolean);
CREATE FUNCTION @extschema@.embeddinggemma_async(tbl regclass, source text, target text, task text DEFAULT 'document', dim int DEFAULT 768,
                                                 key text DEFAULT NULL, keep_stale boolean DEFAULT false, keep_existing boolean DEFAULT false)
RETURNS int
VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'embeddinggemma_async_register_wrapper';
COMMENT ON FUNCTION @extschema@.embeddinggemma_async(regclass, text, text, text, int, text, boolean, boolean) IS
'Registers an asynchronous target on a table or a partitioned table (its partitions, present and future): writes that change source (or the key) clear target (unless keep_stale) and queue the row; a background worker embeds queued rows in large batches, with the rights of the table''s owner. Rows already there are queued too, vectors or not, so every vector of the target is its own; keep_existing => true queues only rows without a vector (the status view then shows no model until embeddinggemma_async_reembed). key: a NOT NULL unique column, the primary key by default. Only the table''s owner may register. Returns the target''s id.';
COMMENT ON FUNCTION @extschema@.embeddinggemma_async_chunks(regclass, regclass, text, text, text, int, int, text, int) IS
'embeddinggemma_async for a chunk table: a document whose text changes, or that is deleted, is queued, and the worker replaces its chunks (columns chunk_key, chunk, start_offset, end_offset, body, embedding) with embed_chunks(source).';

-- A chunk target's trigger also fires on DELETE: a deleted document's chunks go.
DO $do$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT id, relation FROM @extschema@.embeddinggemma_async_targets WHERE chunk_table IS NOT NULL LOOP
        EXECUTE pg_catalog.format(
            'CREATE OR REPLACE TRIGGER %I BEFORE INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION @extschema@.embeddinggemma_async_trigger(%L)',
            'embeddinggemma_async_' OPERATOR(pg_catalog.||) t.id, t.relation, t.id::pg_catalog.text);
    END LOOP;
END
$do$;

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
