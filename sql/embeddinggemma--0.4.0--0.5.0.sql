-- embeddinggemma 0.4.0 -> 0.5.0: the asynchronous worker's queue remembers entries in hand
-- when a worker stopped mid-batch (embedded alone next, kept apart after a second stop); the
-- status views are security barriers; the target id sequence is dumped with the targets.

ALTER TABLE @extschema@.embeddinggemma_async_queue ADD COLUMN interrupted int NOT NULL DEFAULT 0;

ALTER VIEW @extschema@.embeddinggemma_async_status SET (security_barrier = true);
ALTER VIEW @extschema@.embeddinggemma_async_failures SET (security_barrier = true);

SELECT pg_catalog.pg_extension_config_dump('embeddinggemma_async_targets_id_seq', '');

COMMENT ON FUNCTION @extschema@.embeddinggemma_async_wait(regclass, text, interval) IS
'Waits (interruptibly) until nothing is pending for the target — every queued row embedded or failed — and returns true; false if timeout passes first. Needs SELECT on the table.';
