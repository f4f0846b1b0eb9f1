-- The demo: a small table of documents, embedded in place, searched by meaning.
\set ON_ERROR_STOP on
CREATE EXTENSION IF NOT EXISTS embeddinggemma CASCADE;

DROP TABLE IF EXISTS demo_docs;
CREATE TABLE demo_docs (
    id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    body text NOT NULL,
    v    vector(768)
);

INSERT INTO demo_docs (body) VALUES
    ('Venus is often called Earth''s twin because of its similar size and proximity.'),
    ('Mars, known for its reddish appearance, is often referred to as the Red Planet.'),
    ('Jupiter, the largest planet in our solar system, has a prominent red spot.'),
    ('Saturn, famous for its rings, is sometimes mistaken for the Red Planet.'),
    ('PostgreSQL is an open-source relational database with a strong focus on extensibility.'),
    ('pgvector adds a vector type and nearest-neighbour search with HNSW and IVFFlat indexes.'),
    ('An HNSW index trades a little recall for much faster approximate nearest-neighbour queries.'),
    ('The Great Barrier Reef is the largest coral reef system in the world.'),
    ('Sourdough bread rises thanks to wild yeast and lactic acid bacteria.'),
    ('Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.'),
    ('La tour Eiffel a été construite pour l''Exposition universelle de 1889.'),
    ('東京は日本の首都であり、世界最大の都市圏の一つです。');

\echo 'Embedding the documents: UPDATE demo_docs SET v = embed(body);'
\timing on
UPDATE demo_docs SET v = embed(body);
\timing off
CREATE INDEX ON demo_docs USING hnsw (v vector_cosine_ops);

\echo
\echo 'Query: Which planet is known as the Red Planet?'
SELECT round((1 - (v <=> embed('Which planet is known as the Red Planet?', 'query')))::numeric, 3) AS similarity, body
FROM demo_docs ORDER BY v <=> embed('Which planet is known as the Red Planet?', 'query') LIMIT 3;

\echo 'Query: how do I find similar rows quickly in Postgres?'
SELECT round((1 - (v <=> embed('how do I find similar rows quickly in Postgres?', 'query')))::numeric, 3) AS similarity, body
FROM demo_docs ORDER BY v <=> embed('how do I find similar rows quickly in Postgres?', 'query') LIMIT 3;

\echo 'Query: famous landmarks in France'
SELECT round((1 - (v <=> embed('famous landmarks in France', 'query')))::numeric, 3) AS similarity, body
FROM demo_docs ORDER BY v <=> embed('famous landmarks in France', 'query') LIMIT 3;

SELECT model_path, device, dtype, dims, round(load_seconds::numeric, 2) AS load_seconds FROM embeddinggemma_info();

\echo 'The embedding service: one model for the whole cluster, loaded once at server start.'
SELECT state, pid, round(up_seconds::numeric, 1) AS up_seconds, requests, texts, forward_passes, rss_mb, error
  FROM embeddinggemma_service;

\echo 'A new connection embeds at once (the service holds the model): its first call, then a warm one.'
\c
\timing on
SELECT vector_dims(embed('the first call of a new connection', 'query')) AS first_call;
SELECT vector_dims(embed('a warm call on the same connection', 'query')) AS warm_call;
\timing off
SELECT model_loads AS models_loaded_by_this_backend FROM embeddinggemma_stats();
