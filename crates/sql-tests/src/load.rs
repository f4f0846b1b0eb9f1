//! Load tests of a running server (issue 8): many sessions embedding short texts, first calls
//! of new connections, single-row inserts through the row trigger, one large `embed_batch`.
//! Each works in either mode (in-process, or the cluster's embedding service with the library
//! preloaded) and returns a [`Report`]. Everything is bounded: a fixed number of connections,
//! a duration, `statement_timeout` on every session, deadlines on every wait. Connections go
//! to the server of `dsn` (a Unix socket or loopback); memory is read from `/proc`, so run it
//! as root (or as the server's user) on the server's machine.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

/// No single statement of a load test may run longer than this.
const STATEMENT_TIMEOUT: &str = "300s";
/// How long sessions may take to connect and warm up (in-process: load the model) together.
const WARM_UP_LIMIT: Duration = Duration::from_secs(600);

/// One test's figures, printed as `name key=value key=value …` on one line.
#[derive(Debug, Clone)]
pub struct Report {
    pub name: &'static str,
    pub fields: Vec<(String, String)>,
}

impl Report {
    pub fn new(name: &'static str) -> Report {
        Report { name, fields: Vec::new() }
    }

    pub fn put(&mut self, key: &str, value: impl fmt::Display) -> &mut Report {
        self.fields.push((key.to_string(), value.to_string()));
        self
    }

    pub fn put_f(&mut self, key: &str, value: f64, decimals: usize) -> &mut Report {
        self.put(key, format!("{value:.decimals$}"))
    }

    /// The value of `key` as a number (None when absent or not a number).
    pub fn get(&self, key: &str) -> Option<f64> {
        self.fields.iter().find(|(k, _)| k == key).and_then(|(_, v)| v.parse().ok())
    }

    /// The value of `key` as printed.
    pub fn text(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)?;
        for (k, v) in &self.fields {
            // Values are numbers or single words; anything with a space is quoted.
            if v.contains(char::is_whitespace) || v.is_empty() {
                write!(f, " {k}={v:?}")?;
            } else {
                write!(f, " {k}={v}")?;
            }
        }
        Ok(())
    }
}

pub type Result<T> = std::result::Result<T, String>;

fn connect(dsn: &str) -> Result<Client> {
    let mut c = Client::connect(dsn, NoTls).map_err(|e| format!("cannot connect ({dsn}): {e}"))?;
    c.batch_execute(&format!("SET statement_timeout = '{STATEMENT_TIMEOUT}'")).map_err(|e| e.to_string())?;
    Ok(c)
}

fn sql_err(what: &str, e: postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{what}: {} {}", db.code().code(), db.message()),
        None => format!("{what}: {e}"),
    }
}

/// The service as the view reports it: `Some((state, pid))` where the view exists and the
/// server runs the service, `None` in in-process mode (or an extension without the view).
pub fn service(c: &mut Client) -> Option<(String, Option<i32>)> {
    let exists: bool = c.query_one("SELECT to_regclass('embeddinggemma_service') IS NOT NULL", &[]).ok()?.get(0);
    if !exists {
        return None;
    }
    let row = c.query_one("SELECT state, pid FROM embeddinggemma_service", &[]).ok()?;
    let state: String = row.get(0);
    (state != "off").then(|| (state, row.get(1)))
}

/// Waits (polling, up to `within`) until the service is running; an error says its state and
/// error. Returns immediately in in-process mode.
pub fn wait_for_service(dsn: &str, within: Duration) -> Result<()> {
    let mut c = connect(dsn)?;
    let deadline = Instant::now() + within;
    loop {
        match service(&mut c) {
            None => return Ok(()),
            Some((state, _)) if state == "running" => return Ok(()),
            Some((state, _)) if Instant::now() >= deadline => {
                let error: Option<String> =
                    c.query_one("SELECT error FROM embeddinggemma_service", &[]).ok().and_then(|r| r.get(0));
                return Err(format!("the service is {state} after {within:?}: {error:?}"));
            }
            Some(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// `forward_passes` and `texts` of the service view (None in in-process mode).
fn service_counters(c: &mut Client) -> Option<(i64, i64)> {
    service(c)?;
    let r = c
        .query_one(
            "SELECT coalesce(forward_passes, 0)::bigint, coalesce(texts, 0)::bigint FROM embeddinggemma_service",
            &[],
        )
        .ok()?;
    Some((r.get(0), r.get(1)))
}

fn mode_of(c: &mut Client) -> &'static str {
    if service(c).is_some() {
        "service"
    } else {
        "in-process"
    }
}

/// RssAnon of a process in kB (None when it is gone or unreadable).
pub fn rss_anon_kb(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Anonymous memory (MB) of all client backends of the server and of the service process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub backends: usize,
    pub backends_mb: f64,
    pub service_mb: f64,
}

impl Memory {
    pub fn total_mb(&self) -> f64 {
        self.backends_mb + self.service_mb
    }
}

pub fn memory(c: &mut Client) -> Result<Memory> {
    let pids: Vec<i32> = c
        .query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'", &[])
        .map_err(|e| sql_err("pg_stat_activity", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut m = Memory::default();
    for pid in pids {
        if let Some(kb) = rss_anon_kb(pid) {
            m.backends += 1;
            m.backends_mb += kb as f64 / 1024.0;
        }
    }
    if let Some((state, Some(pid))) = service(c) {
        if state == "running" {
            m.service_mb = rss_anon_kb(pid).map_or(0.0, |kb| kb as f64 / 1024.0);
        }
    }
    Ok(m)
}

/// A small deterministic generator (splitmix64), so runs draw the same texts.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn pick<'a>(&mut self, words: &[&'a str]) -> &'a str {
        words[(self.next() % words.len() as u64) as usize]
    }
}

const WHO: [&str; 12] = [
    "The customer",
    "Our support team",
    "A new user",
    "The billing service",
    "The night shift",
    "My manager",
    "The delivery driver",
    "A reviewer",
    "The database",
    "Her assistant",
    "The mobile app",
    "The warehouse",
];
const DID: [&str; 12] = [
    "reported",
    "fixed",
    "asked about",
    "cancelled",
    "confirmed",
    "could not find",
    "updated",
    "rejected",
    "approved",
    "forgot",
    "scheduled",
    "complained about",
];
const WHAT: [&str; 12] = [
    "the late invoice",
    "a broken login page",
    "two missing parcels",
    "the refund request",
    "an expired password",
    "the weekly report",
    "a duplicate order",
    "the shipping address",
    "a slow search query",
    "the meeting room",
    "an unpaid subscription",
    "the product manual",
];
const WHEN: [&str; 10] = [
    "this morning",
    "yesterday afternoon",
    "last Tuesday",
    "before lunch",
    "after the outage",
    "on Friday",
    "during the demo",
    "late at night",
    "twice this week",
    "an hour ago",
];

/// A short sentence (about 10–15 tokens with the prompt's tokens left out), varied by `seed`.
pub fn short_text(seed: u64) -> String {
    let mut d = Draw(seed);
    format!("{} {} {} {} (#{}).", d.pick(&WHO), d.pick(&DID), d.pick(&WHAT), d.pick(&WHEN), d.next() % 1000)
}

/// The `p`-quantile (0..=1) of sorted durations, in ms.
fn quantile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// What one session did in the timed part.
#[derive(Default)]
struct Worker {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

/// Runs `clients` sessions: each connects and runs `warm_up`, then (once all are ready) runs
/// `step(client, seed)` in a loop until `duration` has passed. While they run, `during` is
/// called with the start and deadline (from the caller's thread, e.g. to sample memory).
/// Returns the workers' results and the seconds from the start until the last one stopped.
fn run_sessions<D>(
    dsn: &str,
    clients: usize,
    duration: Duration,
    warm_up: &(dyn Fn(&mut Client) -> std::result::Result<(), postgres::Error> + Sync),
    step: &(dyn Fn(&mut Client, u64) -> std::result::Result<(), postgres::Error> + Sync),
    during: impl FnOnce(Instant, Instant) -> D,
) -> Result<(Vec<Worker>, f64, D)> {
    thread::scope(|scope| {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let mut starts = Vec::new();
        let mut handles = Vec::new();
        for w in 0..clients {
            let (start_tx, start_rx) = mpsc::channel::<Instant>();
            starts.push(start_tx);
            let ready = ready_tx.clone();
            handles.push(scope.spawn(move || -> Worker {
                let mut result = Worker::default();
                let mut c = match connect(dsn)
                    .and_then(|mut c| warm_up(&mut c).map(|_| c).map_err(|e| sql_err("warm-up", e)))
                {
                    Ok(c) => {
                        let _ = ready.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return result;
                    }
                };
                // The start signal, or nothing (the run was called off) within the limit.
                let Ok(deadline) = start_rx.recv_timeout(WARM_UP_LIMIT) else { return result };
                let mut seed = (w as u64) << 32;
                while Instant::now() < deadline {
                    seed += 1;
                    let t0 = Instant::now();
                    match step(&mut c, seed) {
                        Ok(()) => result.latencies.push(t0.elapsed()),
                        Err(e) => {
                            result.errors += 1;
                            result.first_error.get_or_insert_with(|| sql_err("call", e));
                            // An error of a dead connection would repeat at once: stop this session.
                            if c.is_closed() {
                                break;
                            }
                        }
                    }
                }
                result
            }));
        }
        drop(ready_tx);
        let limit = Instant::now() + WARM_UP_LIMIT;
        let mut failure = None;
        for _ in 0..clients {
            match ready_rx.recv_timeout(limit.saturating_duration_since(Instant::now())) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    failure.get_or_insert(e);
                }
                Err(_) => {
                    failure.get_or_insert(format!("sessions not ready within {WARM_UP_LIMIT:?}"));
                    break;
                }
            }
        }
        if let Some(e) = failure {
            drop(starts); // the sessions waiting for the start return at once
            for h in handles {
                let _ = h.join();
            }
            return Err(e);
        }
        let start = Instant::now();
        let deadline = start + duration;
        for s in &starts {
            let _ = s.send(deadline);
        }
        let extra = during(start, deadline);
        let workers: Vec<Worker> = handles.into_iter().map(|h| h.join().unwrap_or_default()).collect();
        Ok((workers, start.elapsed().as_secs_f64(), extra))
    })
}

/// Latency quantiles, counts and errors of all workers, into the report.
fn put_calls(r: &mut Report, workers: &[Worker], seconds: f64, unit: &str) -> usize {
    let mut all: Vec<Duration> = workers.iter().flat_map(|w| w.latencies.iter().copied()).collect();
    all.sort();
    let errors: u64 = workers.iter().map(|w| w.errors).sum();
    r.put(unit, all.len());
    r.put_f(&format!("{unit}_per_s"), all.len() as f64 / seconds, 2);
    r.put_f("p50_ms", quantile_ms(&all, 0.5), 1);
    r.put_f("p99_ms", quantile_ms(&all, 0.99), 1);
    r.put("errors", errors);
    if let Some(e) = workers.iter().find_map(|w| w.first_error.clone()) {
        r.put("first_error", e);
    }
    all.len()
}

/// Sleeps until `at` (a measuring schedule, not synchronisation).
fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        thread::sleep(at - now);
    }
}

/// `connections` sessions each loop `SELECT embed($1)` over generated short sentences for
/// `duration`. Reports calls/s (= texts/s), latency p50/p99, and the peak of a few samples,
/// taken near the end with every session open, of the anonymous memory of all client backends
/// plus the service process (and the service's part).
pub fn short_texts(dsn: &str, connections: usize, duration: Duration) -> Result<Report> {
    let mut admin = connect(dsn)?;
    let mode = mode_of(&mut admin);
    let warm = |c: &mut Client| c.query_one("SELECT embed('warm up')", &[]).map(|_| ());
    let step = |c: &mut Client, seed: u64| c.query_one("SELECT embed($1)", &[&short_text(seed)]).map(|_| ());
    let sample = |start: Instant, deadline: Instant| -> Vec<Result<Memory>> {
        let span = deadline - start;
        [0.55, 0.7, 0.85]
            .iter()
            .map(|f| {
                sleep_until(start + span.mul_f64(*f));
                memory(&mut admin)
            })
            .collect()
    };
    let (workers, seconds, samples) = run_sessions(dsn, connections, duration, &warm, &step, sample)?;
    let mut r = Report::new("short_texts");
    r.put("mode", mode).put("connections", connections).put_f("seconds", seconds, 1);
    let calls = put_calls(&mut r, &workers, seconds, "calls");
    r.put_f("texts_per_s", calls as f64 / seconds, 2);
    let samples: Vec<Memory> = samples.into_iter().collect::<Result<_>>()?;
    let peak = samples.iter().copied().max_by(|a, b| a.total_mb().total_cmp(&b.total_mb())).unwrap_or_default();
    r.put("memory_samples", samples.len())
        .put("memory_backends", peak.backends)
        .put_f("anon_mb", peak.total_mb(), 0)
        .put_f("service_anon_mb", peak.service_mb, 0)
        .put_f("backends_anon_mb", peak.backends_mb, 0);
    Ok(r)
}

const FIRST_CALL_TEXT: &str = "a short sentence about the weather in Lisbon today";

/// `n` new connections each time their first `SELECT embed(…)` of a short sentence; then one
/// warm connection times `n` calls. Reports both p50s, their difference, and the most model
/// loads any new connection made (0 when the service embeds for it).
pub fn first_call(dsn: &str, n: usize) -> Result<Report> {
    let mut admin = connect(dsn)?;
    let mode = mode_of(&mut admin);
    let embed = "SELECT embed($1)";
    let mut first = Vec::with_capacity(n);
    let mut connect_times = Vec::with_capacity(n);
    let mut loads_max = 0i64;
    for _ in 0..n {
        let t0 = Instant::now();
        let mut c = connect(dsn)?;
        connect_times.push(t0.elapsed());
        let t1 = Instant::now();
        c.query_one(embed, &[&FIRST_CALL_TEXT]).map_err(|e| sql_err("first embed", e))?;
        first.push(t1.elapsed());
        let loads: i64 = c
            .query_one("SELECT model_loads FROM embeddinggemma_stats()", &[])
            .map_err(|e| sql_err("embeddinggemma_stats", e))?
            .get(0);
        loads_max = loads_max.max(loads);
    }
    let mut warm_conn = connect(dsn)?;
    warm_conn.query_one(embed, &[&FIRST_CALL_TEXT]).map_err(|e| sql_err("warm-up", e))?;
    let mut warm = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        warm_conn.query_one(embed, &[&FIRST_CALL_TEXT]).map_err(|e| sql_err("warm embed", e))?;
        warm.push(t0.elapsed());
    }
    for v in [&mut first, &mut warm, &mut connect_times] {
        v.sort();
    }
    let (first_p50, warm_p50) = (quantile_ms(&first, 0.5), quantile_ms(&warm, 0.5));
    let mut r = Report::new("first_call");
    r.put("mode", mode)
        .put("n", n)
        .put_f("connect_p50_ms", quantile_ms(&connect_times, 0.5), 1)
        .put_f("first_p50_ms", first_p50, 1)
        .put_f("first_max_ms", first.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0), 1)
        .put_f("warm_p50_ms", warm_p50, 1)
        .put_f("first_minus_warm_ms", first_p50 - warm_p50, 1)
        .put("model_loads_max", loads_max);
    Ok(r)
}

/// A table name of its own for this run (tests and benchmarks may overlap).
fn scratch_table(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{prefix}_{}_{nanos}", std::process::id())
}

/// `clients` sessions each insert single short rows (~15-token notes, autocommit) into a table
/// with the row trigger for `duration`. Reports rows/s and latency; with the service, the
/// change of its forward_passes and texts over the run (texts per forward pass; other work on
/// the same service in that time counts too) and its sessions per pass.
pub fn row_trigger_inserts(dsn: &str, clients: usize, duration: Duration) -> Result<Report> {
    let mut admin = connect(dsn)?;
    let mode = mode_of(&mut admin);
    let table = scratch_table("eg_load_notes");
    admin
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigserial PRIMARY KEY, body text NOT NULL, v vector(768));
             CREATE TRIGGER embed_body BEFORE INSERT OR UPDATE ON {table}
               FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v');"
        ))
        .map_err(|e| sql_err("create the table", e))?;
    let insert = format!("INSERT INTO {table} (body) VALUES ($1)");
    let warm = |c: &mut Client| c.query_one("SELECT embed('warm up')", &[]).map(|_| ());
    let step = |c: &mut Client, seed: u64| c.execute(&insert, &[&format!("Note: {}", short_text(seed))]).map(|_| ());
    let before = std::cell::Cell::new(None);
    let (workers, seconds, ()) = run_sessions(dsn, clients, duration, &warm, &step, |_, _| {
        before.set(service_counters(&mut admin));
    })
    .inspect_err(|_| {
        let _ = admin.batch_execute(&format!("DROP TABLE IF EXISTS {table}"));
    })?;
    let after = service_counters(&mut admin);
    let stored: i64 = admin
        .query_one(&format!("SELECT count(v) FROM {table}"), &[])
        .map_err(|e| sql_err("count the rows", e))?
        .get(0);
    admin.batch_execute(&format!("DROP TABLE {table}")).map_err(|e| sql_err("drop the table", e))?;
    let mut r = Report::new("row_trigger");
    r.put("mode", mode).put("clients", clients).put_f("seconds", seconds, 1);
    let rows = put_calls(&mut r, &workers, seconds, "rows");
    if stored as usize != rows {
        r.put("rows_stored", stored);
    }
    if let (Some((p0, t0)), Some((p1, t1))) = (before.get(), after) {
        let (passes, texts) = (p1 - p0, t1 - t0);
        r.put("service_passes", passes).put("service_texts", texts);
        r.put_f("texts_per_pass", if passes > 0 { texts as f64 / passes as f64 } else { 0.0 }, 2);
        let sessions: Option<f64> = admin
            .query_one("SELECT sessions_per_pass FROM embeddinggemma_service", &[])
            .ok()
            .and_then(|row| row.get(0));
        if let Some(s) = sessions {
            r.put_f("sessions_per_pass_recent", s, 2);
        }
    }
    Ok(r)
}

/// The model directory the server uses (root reads it beside the server), or the default.
fn model_dir(c: &mut Client) -> PathBuf {
    c.query_one("SELECT current_setting('embeddinggemma.model_path', true)", &[])
        .ok()
        .and_then(|r| r.get::<_, Option<String>>(0))
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from("/var/cache/embeddinggemma/embeddinggemma-300m"), PathBuf::from)
}

/// Real tokens the model sees for `texts` with the `document` prompt (the engine's tokenizer:
/// what embeddinggemma_stats().real_tokens counts), the same figure in both modes.
pub fn document_tokens(dir: &Path, texts: &[String]) -> Result<usize> {
    let settings = |file: &str| -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(dir.join(file)).map_err(|e| format!("{}: {e}", dir.join(file).display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{file}: {e}"))
    };
    let config = settings("config.json")?;
    let id = |k: &str| config[k].as_u64().map(|v| v as u32).ok_or(format!("config.json has no {k}"));
    let max_len = settings("sentence_bert_config.json")?["max_seq_length"].as_u64().unwrap_or(2048) as usize;
    let prompt = settings("config_sentence_transformers.json")?["prompts"]["document"]
        .as_str()
        .ok_or("no document prompt")?
        .to_string();
    let tokenizer = embeddinggemma_engine::TextTokenizer::load(
        &dir.join("tokenizer.json"),
        id("bos_token_id")?,
        id("eos_token_id")?,
        max_len,
    )
    .map_err(|e| e.to_string())?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let encoded = tokenizer.encode_all(&prompt, &refs, &|| false).map_err(|e| e.to_string())?;
    Ok(encoded.iter().map(|t| t.ids.len()).sum())
}

/// One session's `embed_batch` of the first `n_docstrings` passages of bench/docstrings.jsonl
/// with the default task: seconds, texts/s and tokens/s (tokens counted by the engine's
/// tokenizer, so both modes divide the same number). The session embeds one text first, so an
/// in-process model load is not timed.
pub fn one_batch(dsn: &str, n_docstrings: usize) -> Result<Report> {
    let texts = crate::docstrings(n_docstrings);
    let mut c = connect(dsn)?;
    let mode = mode_of(&mut c);
    c.query_one("SELECT embed('warm up')", &[]).map_err(|e| sql_err("warm-up", e))?;
    let backend_tokens = |c: &mut Client| -> Option<i64> {
        c.query_one("SELECT real_tokens FROM embeddinggemma_stats()", &[]).ok().map(|r| r.get(0))
    };
    let tokens_before = backend_tokens(&mut c);
    let t0 = Instant::now();
    let embedded: i64 = c
        .query_one("SELECT count(embedding) FROM embed_batch($1::text[])", &[&texts])
        .map_err(|e| sql_err("embed_batch", e))?
        .get(0);
    let seconds = t0.elapsed().as_secs_f64();
    let tokens_after = backend_tokens(&mut c);
    let mut r = Report::new("one_batch");
    r.put("mode", mode).put("texts", texts.len()).put("embedded", embedded).put_f("seconds", seconds, 2).put_f(
        "texts_per_s",
        texts.len() as f64 / seconds,
        2,
    );
    match document_tokens(&model_dir(&mut c), &texts) {
        Ok(tokens) => {
            r.put("tokens", tokens).put_f("tokens_per_s", tokens as f64 / seconds, 1);
        }
        Err(e) => {
            r.put("tokens_error", e);
        }
    }
    // In-process, the backend's own count (a cross-check of the tokenizer's figure).
    if let (Some(a), Some(b)) = (tokens_before, tokens_after) {
        if b > a {
            r.put("backend_real_tokens", b - a);
        }
    }
    Ok(r)
}
