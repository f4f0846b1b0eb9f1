"""SQL throughput of the extension on the docstrings corpus, all in one run.

usage: sql_bench.py DSN MODEL_DIR CORPUS N ENGINE_BIN [DTYPE]

DTYPE (f32, the default, or bf16) is set for the session (embeddinggemma.dtype) and passed to
the engine's bench; with bf16 the client pipeline (d), a float32 yardstick, is left out.

(a) UPDATE docs SET v = embed(body)                        -- row by row, one forward pass per row
(b) CALL embeddinggemma_backfill('docs', 'body', 'v')       -- embed_batch per 256 rows, COMMIT each
(c) UPDATE docs SET v = e.embedding FROM embed_batch(ids, bodies) e WHERE docs.id = e.id
(d) a client pipeline: read rows, sentence-transformers (float32, batch 32), write back
(e) the engine's own bench on the same texts, the yardstick for (a)-(c): run before (a) and
    after (c), the ratio taken to the mean of the two, so a machine whose speed drifts (shared
    cores) moves the yardstick with the runs
(f) write paths: INSERT … SELECT through the row trigger vs the statement trigger, on these
    texts and on 1000 one-line sentences (WRITE_PATHS=0 leaves them out)
Each prints rows/s and tokens/s (real tokens, as embeddinggemma_stats() counts them).
"""
import os
import json
import re
import subprocess
import sys
import time

import psycopg

dsn, model_dir, corpus, n, engine_bin = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
dtype = sys.argv[6] if len(sys.argv) > 6 else "f32"
texts = [json.loads(line) for line in open(corpus)][:n]

with psycopg.connect(dsn + " dbname=postgres", autocommit=True) as admin:
    if not admin.execute("SELECT 1 FROM pg_database WHERE datname = 'embeddinggemma_bench'").fetchone():
        admin.execute("CREATE DATABASE embeddinggemma_bench")
bench_dsn = dsn + " dbname=embeddinggemma_bench"

conn = psycopg.connect(bench_dsn, autocommit=True)
conn.execute("CREATE EXTENSION IF NOT EXISTS embeddinggemma CASCADE")
conn.execute("DROP TABLE IF EXISTS docs")
conn.execute("CREATE TABLE docs (id bigint PRIMARY KEY, body text NOT NULL, v vector(768))")
with conn.cursor().copy("COPY docs (id, body) FROM STDIN") as copy:
    for i, t in enumerate(texts):
        copy.write_row((i, t))
conn.execute("VACUUM ANALYZE docs")
conn.execute(f"SET embeddinggemma.dtype = '{dtype}'")
# In-process, unless SERVICE=1 (the demo server runs the service; with it, the session's dtype
# must be the server's for the service to compute the calls).
conn.execute(f"SET embeddinggemma.service = {'auto' if os.environ.get('SERVICE') == '1' else 'off'}")
conn.execute("SELECT embed('warm up')")  # loads the model in this backend (or reaches the service)
print(f"dtype {conn.execute('SELECT dtype FROM embeddinggemma_info()').fetchone()[0]}", flush=True)


def stats():
    return conn.execute("SELECT forward_passes, real_tokens, fill_ratio FROM embeddinggemma_stats()").fetchone()


results = []


def measure(name, sql_or_fn):
    conn.execute("UPDATE docs SET v = NULL")
    conn.execute("VACUUM docs")
    conn.execute("SELECT embeddinggemma_stats_reset()")
    t0 = time.perf_counter()
    if callable(sql_or_fn):
        sql_or_fn()
    else:
        conn.execute(sql_or_fn)
    dt = time.perf_counter() - t0
    passes, tokens, fill = stats()
    missing = conn.execute("SELECT count(*) FROM docs WHERE v IS NULL").fetchone()[0]
    assert missing == 0, f"{name}: {missing} rows not embedded"
    results.append((name, dt, tokens, passes, fill))
    print(f"{name}: rows={n} seconds={dt:.1f} rows_per_s={n/dt:.2f} tokens_per_s={tokens/dt:.0f} "
          f"forward_passes={passes} fill={fill:.3f}", flush=True)


def engine_bench():
    out = subprocess.run([engine_bin, "bench", "--model", model_dir, "--corpus", corpus, "--limit", str(n),
                          "--threads", "2", "--dtype", dtype], capture_output=True, text=True, check=True).stdout
    line = out.strip().splitlines()[-1]
    print(f"(e) engine bench: {line}", flush=True)
    return float(re.search(r"tokens_per_s=([0-9.]+)", line).group(1))


engine_before = engine_bench()
measure("(a) UPDATE docs SET v = embed(body)", "UPDATE docs SET v = embed(body)")
measure("(b) CALL embeddinggemma_backfill", "CALL embeddinggemma_backfill('docs', 'body', 'v')")
measure("(c) UPDATE … FROM embed_batch(ids, bodies)",
        "UPDATE docs SET v = e.embedding FROM embed_batch((SELECT array_agg(id ORDER BY id) FROM docs), "
        "(SELECT array_agg(body ORDER BY id) FROM docs)) e WHERE docs.id = e.id")
tokens = results[0][2]


def client_pipeline():
    import torch
    from sentence_transformers import SentenceTransformer
    torch.set_num_threads(2)
    model = SentenceTransformer(model_dir, device="cpu")
    t0 = time.perf_counter()
    rows = conn.execute("SELECT id, body FROM docs ORDER BY id").fetchall()
    with torch.no_grad():
        vectors = model.encode([b for _, b in rows], prompt_name="document", batch_size=32)
    with conn.cursor() as cur:
        cur.executemany("UPDATE docs SET v = %s::vector WHERE id = %s",
                        [("[" + ",".join(map(repr, map(float, v))) + "]", i) for (i, _), v in zip(rows, vectors)])
    return time.perf_counter() - t0


if dtype == "f32":
    conn.execute("UPDATE docs SET v = NULL")
    dt = client_pipeline()  # model loading is outside the timed part, as for the extension's warm-up
    print(f"(d) client pipeline (psycopg + sentence-transformers): rows={n} seconds={dt:.1f} rows_per_s={n/dt:.2f} "
          f"tokens_per_s={tokens/dt:.0f}", flush=True)
    results.append(("(d) client pipeline", dt, tokens, None, None))

engine_tps = (engine_before + engine_bench()) / 2
print(f"    the engine, mean of both runs: {engine_tps:.0f} tokens/s")
for name, dt, tok, _, _ in results:
    print(f"    {name}: {tok/dt/engine_tps:.2f} × the engine")


ROW_TRIGGER = ("CREATE TRIGGER e BEFORE INSERT OR UPDATE ON w FOR EACH ROW "
               "EXECUTE FUNCTION embeddinggemma_trigger('body', 'v')")
STATEMENT_TRIGGER = ("CREATE TRIGGER e AFTER INSERT ON w REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
                     "EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v')")
if os.environ.get("WRITE_PATHS", "1") == "0":
    sys.exit(0)
conn.execute("DROP TABLE IF EXISTS sentences")
conn.execute("CREATE TABLE sentences AS SELECT g::bigint AS id, format('Sentence %s: the quick brown fox jumps over the lazy dog.', g) AS body "
             "FROM generate_series(1, 1000) g")
print("(f) write paths, INSERT INTO w SELECT id, body FROM …:")
for source in ["docs", "sentences"]:
    for name, trigger in [("row trigger", ROW_TRIGGER), ("statement trigger", STATEMENT_TRIGGER)]:
        conn.execute("DROP TABLE IF EXISTS w")
        conn.execute("CREATE TABLE w (id bigint PRIMARY KEY, body text, v vector(768))")
        conn.execute(trigger)
        conn.execute("SELECT embeddinggemma_stats_reset()")
        t0 = time.perf_counter()
        conn.execute(f"INSERT INTO w SELECT id, body FROM {source}")
        dt = time.perf_counter() - t0
        rows = conn.execute("SELECT count(*) FROM w WHERE v IS NOT NULL").fetchone()[0]
        passes, tok, fill = stats()
        print(f"    {source} ({rows} rows), {name}: seconds={dt:.1f} rows_per_s={rows/dt:.1f} "
              f"tokens_per_s={tok/dt:.0f} forward_passes={passes} fill={fill:.3f}", flush=True)
