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
