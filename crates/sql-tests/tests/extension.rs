//! embed(), embed_batch(), info, errors, cancellation — against a real server and pgvector.

use std::time::{Duration, Instant};

use embeddinggemma_engine::{DeviceChoice, Engine, EngineOptions, Manifest, Request};
use embeddinggemma_sql_tests::*;
use postgres::Client;

const F32_TOLERANCE: f64 = 1e-5;
/// Same text, same model, another batch or process: the engine's batch-invariance bound.
const SAME_TEXT: f64 = 1e-6;

fn embed_batch(client: &mut Client, texts: &[Option<&str>], task: &str, dim: i32) -> Vec<(i32, Option<Vec<f32>>)> {
    client
        .query("SELECT ord, embedding::real[] FROM embed_batch($1::text[], $2, $3)", &[&texts, &task, &dim])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn forward_passes(client: &mut Client) -> i64 {
    stat(client, "forward_passes")
}

#[test]
fn every_reference_case_through_embed_matches() {
    let worst = assert_reference_cases_through_embed(&mut connect(), F32_TOLERANCE);
    eprintln!("embed(): worst cosine distance to the reference {worst:e}");
}

#[test]
fn every_reference_case_through_one_embed_batch_matches() {
    let mut client = connect();
    let cases = reference_cases();
    // One call for all 69 cases: the prompt is part of the text and the task is 'none', which
    // is exactly what a named task does.
    let inputs: Vec<String> = cases.iter().map(|c| format!("{}{}", c.prompt, c.text)).collect();
    let inputs: Vec<Option<&str>> = inputs.iter().map(|s| Some(s.as_str())).collect();
    let before = forward_passes(&mut client);
    let rows = embed_batch(&mut client, &inputs, "none", 768);
    let passes = forward_passes(&mut client) - before;
    assert!(passes < cases.len() as i64 / 2, "{passes} forward passes for {} texts", cases.len());
    assert_eq!(rows.len(), cases.len());
    let mut worst = 0f64;
    for ((ord, v), (i, case)) in rows.iter().zip(cases.iter().enumerate()) {
        assert_eq!(*ord as usize, i + 1);
        let d = cosine_distance(v.as_ref().unwrap(), &case.embedding);
        assert!(d <= F32_TOLERANCE, "{}: cosine distance {d:e}", case.label());
        worst = worst.max(d);
    }
    eprintln!("embed_batch(): {passes} forward passes, worst cosine distance to the reference {worst:e}");
}

#[test]
fn matryoshka_dims_match_the_truncated_reference() {
    let mut client = connect();
    for case in reference_cases().iter().filter(|c| c.text.len() < 200).take(6) {
        for dim in [512, 256, 128] {
            let v = embed(&mut client, &case.text, case.task(), dim);
            assert_eq!(v.len(), dim as usize);
            let d = cosine_distance(&v, &matryoshka(&case.embedding, dim as usize));
            assert!(d <= F32_TOLERANCE, "{} dim {dim}: {d:e}", case.label());
        }
    }
}

fn engine_vectors(dir: &std::path::Path, checksums: Manifest, texts: &[&str], task: &str) -> Vec<Vec<f32>> {
    let options = EngineOptions { device: DeviceChoice::Cpu, checksums, ..EngineOptions::default() };
    let engine = Engine::load(dir, &options).unwrap();
    let dim = engine.info().dims[0];
    engine.embed(texts, &Request { task, dim, truncate: true }, &|| false).unwrap().0
}

const TEXTS: [&str; 6] = [
    "The quick brown fox jumps over the lazy dog.",
    "PostgreSQL extensions are written in C, or in Rust with pgrx.",
    "",
    "東京は日本の首都です。",
    "a",
    "Vectors are compared with cosine distance: 1 - cos(a, b).",
];

#[test]
fn sql_results_equal_the_engine_with_the_tiny_model() {
    let mut client = connect();
    use_tiny_model(&mut client);
    let want = engine_vectors(&tiny_model_dir(), Manifest::from_file(&tiny_checksums()).unwrap(), &TEXTS, "query");
    let inputs: Vec<Option<&str>> = TEXTS.iter().map(|t| Some(*t)).collect();
    let rows = embed_batch(&mut client, &inputs, "query", 48);
    for ((text, w), (_, got)) in TEXTS.iter().zip(&want).zip(&rows) {
        let alone = embed(&mut client, text, "query", 48);
        assert!(cosine_distance(got.as_ref().unwrap(), w) <= SAME_TEXT, "{text:?} embed_batch vs engine");
        assert!(cosine_distance(&alone, w) <= SAME_TEXT, "{text:?} embed vs engine");
    }
}

#[test]
fn sql_results_equal_the_engine_with_the_real_model() {
    let mut client = connect();
    let want = engine_vectors(&real_model_dir(), Manifest::embeddinggemma_300m(), &TEXTS, "document");
    for (text, w) in TEXTS.iter().zip(&want) {
        let got = embed(&mut client, text, "document", 768);
        assert!(cosine_distance(&got, w) <= SAME_TEXT, "{text:?}");
    }
}

#[test]
fn embed_batch_keeps_order_nulls_and_equals_embed() {
    let mut client = connect();
    let inputs = [Some("second"), None, Some("first, but longer than the second one"), Some(""), None];
    let rows = embed_batch(&mut client, &inputs, "document", 256);
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    for ((_, got), input) in rows.iter().zip(inputs) {
        match input {
            None => assert!(got.is_none()),
            Some(text) => {
                let alone = embed(&mut client, text, "document", 256);
                let d = cosine_distance(got.as_ref().unwrap(), &alone);
                assert!(d <= SAME_TEXT, "{text:?}: embed_batch vs embed {d:e}");
            }
        }
    }
    // NULL in, NULL out; an empty array gives no rows.
    let row =
        client.query_one("SELECT embed(NULL) IS NULL, (SELECT count(*) FROM embed_batch('{}'::text[]))", &[]).unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, i64>(1), 0);
}

#[test]
fn embed_batch_with_ids_joins_back() {
    let mut client = connect();
    client
        .batch_execute(
            "CREATE TEMP TABLE t (id bigint PRIMARY KEY, body text, v vector(768));
             INSERT INTO t VALUES (10, 'ten'), (3, 'three'), (7, NULL), (12, 'twelve');
             UPDATE t SET v = e.embedding
               FROM (SELECT * FROM embed_batch((SELECT array_agg(id ORDER BY id) FROM t),
                                               (SELECT array_agg(body ORDER BY id) FROM t))) e
              WHERE t.id = e.id;",
        )
        .unwrap();
    for row in client.query("SELECT id, body, v::real[] FROM t", &[]).unwrap() {
        let body: Option<String> = row.get(1);
        let v: Option<Vec<f32>> = row.get(2);
        match body {
            None => assert!(v.is_none()),
            Some(body) => {
                let want = embed(&mut client, &body, "document", 768);
                assert!(cosine_distance(&v.unwrap(), &want) <= SAME_TEXT, "id {}", row.get::<_, i64>(0));
            }
        }
    }
    let err = client.query("SELECT * FROM embed_batch(ARRAY[1, 2]::bigint[], ARRAY['one'])", &[]).unwrap_err();
    let (code, message, _) = sql_error(err);
    assert_eq!(code, "2202E", "{message}");
    assert!(message.contains("2 ids but 1 inputs"), "{message}");
}

const PLANETS: [&str; 4] = [
    "Venus is often called Earth's twin because of its similar size and proximity.",
    "Mars, known for its reddish appearance, is often referred to as the Red Planet.",
    "Jupiter, the largest planet in our solar system, has a prominent red spot.",
    "Saturn, famous for its rings, is sometimes mistaken for the Red Planet.",
];

#[test]
fn model_card_query_ranks_mars_first_through_an_hnsw_index() {
    let mut client = connect();
    client.batch_execute("CREATE TEMP TABLE planets (id serial PRIMARY KEY, body text, v vector(768))").unwrap();
    for body in PLANETS {
        client.execute("INSERT INTO planets (body) VALUES ($1)", &[&body]).unwrap();
    }
    client
        .batch_execute(
            "UPDATE planets SET v = embed(body);
             CREATE INDEX planets_v ON planets USING hnsw (v vector_cosine_ops);
             ANALYZE planets;
             SET enable_seqscan = off;",
        )
        .unwrap();
    let query =
        "SELECT body FROM planets ORDER BY v <=> embed('Which planet is known as the Red Planet?', 'query') LIMIT 4";
    let plan: Vec<String> = client.query(&format!("EXPLAIN {query}"), &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(plan.iter().any(|l| l.contains("Index Scan using planets_v")), "plan: {plan:#?}");
    let ranked: Vec<String> = client.query(query, &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(ranked[0], PLANETS[1], "ranking: {ranked:#?}");
}

#[test]
fn info_describes_the_loaded_model() {
    let mut client = connect();
    let row = client
        .query_one("SELECT model_path, device, dtype, dims, max_seq_length, tasks, weights_sha256->>'model.safetensors', engine_version FROM embeddinggemma_info()", &[])
        .unwrap();
    assert_eq!(row.get::<_, String>(0), real_model_dir().canonicalize().unwrap().display().to_string());
    assert_eq!(row.get::<_, String>(1), "cpu");
    assert_eq!(row.get::<_, String>(2), "f32");
    assert_eq!(row.get::<_, Vec<i32>>(3), vec![768, 512, 256, 128]);
    assert_eq!(row.get::<_, i32>(4), 2048);
    let tasks: Vec<String> = row.get(5);
    assert!(tasks.contains(&"query".to_string()) && tasks.contains(&"none".to_string()), "{tasks:?}");
    assert_eq!(row.get::<_, String>(6), "cbf5a78393b6a033e0b8a63a57549964f7ed5c6fbeb4ba0694214f36123f2fd2");
    assert!(!row.get::<_, String>(7).is_empty());
}

#[test]
fn changing_the_model_reloads_it() {
    let mut client = connect_in_process();
    assert_eq!(embed(&mut client, "x", "none", 768).len(), 768);
    let loads =
        |c: &mut Client| c.query_one("SELECT model_loads FROM embeddinggemma_stats()", &[]).unwrap().get::<_, i64>(0);
    let before = loads(&mut client);
    use_tiny_model(&mut client);
    assert_eq!(embed(&mut client, "x", "none", 48).len(), 48);
    client.batch_execute("RESET embeddinggemma.model_path; RESET embeddinggemma.model_checksums").unwrap();
    assert_eq!(embed(&mut client, "x", "none", 768).len(), 768);
    assert_eq!(loads(&mut client), before + 2);
}

#[test]
fn bad_input_gets_a_clear_error_and_never_crashes_the_backend() {
    let mut client = connect();
    let started: std::time::SystemTime = client.query_one("SELECT pg_postmaster_start_time()", &[]).unwrap().get(0);
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);

    let (code, msg, hint) = expect_error(&mut client, "SELECT embed('x', 'nonsense')");
    assert_eq!(code, "22023");
    assert!(msg.contains("unknown task \"nonsense\"") && msg.contains("query") && msg.contains("none"), "{msg}");
    assert!(hint.is_some());

    let (code, msg, _) = expect_error(&mut client, "SELECT embed('x', 'query', 300)");
    assert_eq!(code, "22023");
    assert!(msg.contains("768, 512, 256, 128"), "{msg}");

    let (code, msg, hint) =
        expect_error(&mut client, "SET embeddinggemma.truncate = off; SELECT embed(repeat('word ', 3000))");
    assert_eq!(code, "54000");
    assert!(msg.contains("more than the model's limit of 2048"), "{msg}");
    assert!(hint.unwrap().contains("embeddinggemma.truncate"));
    client.batch_execute("RESET embeddinggemma.truncate").unwrap();

    let (code, msg, hint) =
        expect_error(&mut client, "SET embeddinggemma.model_path = '/nonexistent/model'; SELECT embed('x')");
    assert_eq!(code, "58P01");
    assert!(msg.contains("/nonexistent/model"), "{msg}");
    let hint = hint.unwrap();
    assert!(hint.contains("embeddinggemma.model_path") && hint.contains("scripts/fetch-model"), "{hint}");

    let (code, msg, hint) = expect_error(&mut client, "SET embeddinggemma.model_path = ''; SELECT embed('x')");
    assert_eq!(code, "58P01");
    assert!(msg.contains("embeddinggemma.model_path is not set"), "{msg}");
    assert!(hint.unwrap().contains("embeddinggemma.model_path"));

    // The tiny model's files checked against checksums that do not match.
    let wrong = std::env::temp_dir().join("embeddinggemma-wrong.sha256");
    let manifest = std::fs::read_to_string(tiny_checksums()).unwrap().replacen(|c: char| c.is_ascii_hexdigit(), "0", 1);
    let manifest = if manifest == std::fs::read_to_string(tiny_checksums()).unwrap() {
        manifest.replacen('0', "1", 1)
    } else {
        manifest
    };
    std::fs::write(&wrong, manifest).unwrap();
    let (code, msg, hint) = expect_error(
        &mut client,
        &format!(
            "SET embeddinggemma.model_path = '{}'; SET embeddinggemma.model_checksums = '{}'; SELECT embed('x')",
            tiny_model_dir().display(),
            wrong.display()
        ),
    );
    assert_eq!(code, "XX001");
    assert!(msg.contains("checksum mismatch"), "{msg}");
    assert!(hint.unwrap().contains("fetch-model"));
    client.batch_execute("RESET embeddinggemma.model_path; RESET embeddinggemma.model_checksums").unwrap();

    let (code, _, _) = expect_error(&mut client, "SET embeddinggemma.device = 'gpu0'");
    assert_eq!(code, "22023");

    // Still the same backend, still the same server.
    assert_eq!(embed(&mut client, "still alive", "query", 128).len(), 128);
    assert_eq!(client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get::<_, i32>(0), pid);
    let now: std::time::SystemTime = client.query_one("SELECT pg_postmaster_start_time()", &[]).unwrap().get(0);
    assert_eq!(now, started, "the server restarted: a backend crashed");
}

#[test]
fn only_a_superuser_may_point_at_model_files() {
    // Once the library is loaded (preloaded, as on the main test server), SET itself is refused.
    let mut user = connect_as_ordinary_user();
    assert_eq!(embed(&mut user, "ordinary users can embed", "query", 128).len(), 128);
    // The model's files, its device and precision (embed() is IMMUTABLE), and where it runs are
    // the superuser's to choose.
    for (setting, value) in [
        ("model_path", "/tmp"),
        ("model_checksums", "/tmp/x"),
        ("dtype", "bf16"),
        ("device", "cpu"),
        ("service", "off"),
    ] {
        let (code, msg, _) = expect_error(&mut user, &format!("SET embeddinggemma.{setting} = '{value}'"));
        assert_eq!(code, "42501", "{setting}: {msg}");
    }
    // How a session batches and how many threads it uses are its own business.
    user.batch_execute(
        "SET embeddinggemma.threads = 1; SET embeddinggemma.truncate = off; SET embeddinggemma.max_batch_tokens = 1024",
    )
    .unwrap();
    assert_eq!(embed(&mut user, "still embedding", "query", 128).len(), 128);

    // Without preloading, before the library is loaded the setting is only a placeholder;
    // PostgreSQL discards a value an ordinary user gave it when the library defines the real
    // setting.
    let mut admin = connect_in_process();
    admin
        .batch_execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'eg_ordinary') THEN CREATE ROLE eg_ordinary LOGIN; END IF; END $$;
             GRANT USAGE ON SCHEMA public TO eg_ordinary;",
        )
        .unwrap();
    let dsn = std::env::var("EMBEDDINGGEMMA_TEST_INPROCESS_DSN").unwrap();
    let mut fresh = Client::connect(&format!("{dsn} user=eg_ordinary"), postgres::NoTls).unwrap();
    fresh.batch_execute("SET embeddinggemma.model_path = '/tmp'").unwrap();
    assert_eq!(embed(&mut fresh, "placeholder ignored", "query", 128).len(), 128);
    let shown: String = fresh.query_one("SHOW embeddinggemma.model_path", &[]).unwrap().get(0);
    assert_eq!(std::path::Path::new(&shown), real_model_dir().as_path());
}

fn long_texts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("document {i}: {}", "the quick brown fox jumps over the lazy dog ".repeat(220))).collect()
}

/// Starts a long embed_batch on its own connection; returns its pid and a handle yielding the
/// error it ends with and when.
fn long_embed_batch(setup: &str) -> (i32, std::thread::JoinHandle<(postgres::Error, Instant)>) {
    let mut client = connect();
    client.batch_execute(setup).unwrap();
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let handle = std::thread::spawn(move || {
        let texts = long_texts(24);
        let err = client.query("SELECT count(*) FROM embed_batch($1::text[])", &[&texts]).unwrap_err();
        (err, Instant::now())
    });
    (pid, handle)
}

/// How long a cancel may take: the engine checks between layers, so well under a pass.
const CANCEL_WITHIN: Duration = Duration::from_secs(3);

#[test]
fn cancel_stops_a_long_embed_batch_promptly() {
    let (pid, handle) = long_embed_batch("SELECT 1");
    let mut admin = connect();
    wait_until_embedding(&mut admin, pid);
    let asked = Instant::now();
    assert!(admin.query_one("SELECT pg_cancel_backend($1)", &[&pid]).unwrap().get::<_, bool>(0));
    let (err, ended) = handle.join().unwrap();
    let (code, msg, _) = sql_error(err);
    assert_eq!(code, "57014", "{msg}");
    let took = ended.duration_since(asked);
    eprintln!("cancel took {took:?}");
    assert!(took < CANCEL_WITHIN, "cancel took {took:?}");
}

#[test]
fn statement_timeout_stops_a_long_embed_batch() {
    let started = Instant::now();
    let (_, handle) = long_embed_batch("SET statement_timeout = '5s'");
    let (err, ended) = handle.join().unwrap();
    let (code, msg, _) = sql_error(err);
    assert_eq!(code, "57014");
    assert!(msg.contains("statement timeout"), "{msg}");
    let took = ended.duration_since(started);
    assert!(took < Duration::from_secs(5) + CANCEL_WITHIN + Duration::from_secs(5), "took {took:?}");
}

#[test]
fn terminate_ends_only_that_backend() {
    let (pid, handle) = long_embed_batch("SELECT 1");
    let mut admin = connect();
    wait_until_embedding(&mut admin, pid);
    let started: std::time::SystemTime = admin.query_one("SELECT pg_postmaster_start_time()", &[]).unwrap().get(0);
    assert!(admin.query_one("SELECT pg_terminate_backend($1, 10000)", &[&pid]).unwrap().get::<_, bool>(0));
    let (err, _) = handle.join().unwrap();
    assert!(err.is_closed() || err.as_db_error().is_some_and(|e| e.code().code() == "57P01"), "{err}");
    let now: std::time::SystemTime = admin.query_one("SELECT pg_postmaster_start_time()", &[]).unwrap().get(0);
    assert_eq!(now, started);
}

#[test]
fn concurrent_backends_share_the_cpu_threads() {
    let run = || {
        std::thread::spawn(|| {
            let mut client = connect_in_process();
            client.batch_execute("SELECT embeddinggemma_stats_reset()").unwrap();
            let texts = long_texts(2);
            client.query("SELECT count(*) FROM embed_batch($1::text[])", &[&texts]).unwrap();
            client.query_one("SELECT wait_seconds FROM embeddinggemma_stats()", &[]).unwrap().get::<_, f64>(0)
        })
    };
    let (a, b) = (run(), run());
    let waits = [a.join().unwrap(), b.join().unwrap()];
    // With every core's thread in use by one backend, the other waits for it.
    assert!(waits.iter().any(|&w| w > 0.5), "waits {waits:?}");
}
