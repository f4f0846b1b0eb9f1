//! Load tests of asynchronous embedding (issue 18), against a server with the service
//! preloaded: single-row inserts from many clients into a table with no embedding, with an
//! asynchronous target, or with the synchronous row trigger; the drain of a backlog; search
//! latency while a backlog drains. Each returns a [`Report`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

use crate::load::{document_tokens, short_text, Report};

type Result<T> = std::result::Result<T, String>;

fn connect(dsn: &str) -> Result<Client> {
    Client::connect(dsn, NoTls).map_err(|e| format!("connect: {e}"))
}

fn sql(c: &mut Client, what: &str, query: &str) -> Result<()> {
    c.batch_execute(query)
        .map_err(|e| format!("{what}: {}", e.as_db_error().map_or(e.to_string(), |d| d.message().to_string())))
}

/// What the insert load writes into.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// No embedding at all: the baseline.
    Plain,
    /// An asynchronous target: the write records, the worker embeds.
    Async,
    /// The synchronous row trigger: the write waits for the model.
    RowTrigger,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Plain => "plain",
            Kind::Async => "async",
            Kind::RowTrigger => "row_trigger",
        }
    }
}

/// `clients` sessions insert single short rows for `duration`; for an asynchronous target,
/// then waits for the backlog to drain and checks every vector against `embed(body)`. Two cores
/// embed a few dozen short rows a second, so all but the first `keep` rows are deleted before
/// the drain (their queue entries stay: the worker finds them gone).
pub fn inserts(dsn: &str, kind: Kind, clients: usize, duration: Duration, keep: usize) -> Result<Report> {
    let table = format!("eg_async_load_{}", kind.name());
    let mut admin = connect(dsn)?;
    sql(&mut admin, "create the table", &format!("DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id bigserial PRIMARY KEY, body text NOT NULL, v vector(768))"))?;
    match kind {
        Kind::Plain => {}
        Kind::Async => sql(&mut admin, "register", &format!("SELECT embeddinggemma_async('{table}', 'body', 'v')"))?,
        Kind::RowTrigger => sql(
            &mut admin,
            "the trigger",
            &format!("CREATE TRIGGER e BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v')"),
        )?,
    }
    // Each run starts alike: the dead rows of the runs before vacuumed (else autovacuum works
    // through them during this one), and no checkpoint owed.
    sql(&mut admin, "vacuum", "VACUUM")?;
    sql(&mut admin, "checkpoint", "CHECKPOINT")?;
    let insert = format!("INSERT INTO {table} (body) VALUES ($1)");
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let counts: Vec<Result<(u64, Vec<Duration>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|w| {
                let (insert, stop) = (&insert, &stop);
                s.spawn(move || -> Result<(u64, Vec<Duration>)> {
                    let mut c = connect(dsn)?;
                    let (mut n, mut latencies) = (0u64, Vec::new());
                    let mut seed = (w as u64) << 32;
                    while !stop.load(Ordering::Relaxed) {
                        seed += 1;
                        let t0 = Instant::now();
                        c.execute(insert.as_str(), &[&format!("Note: {}", short_text(seed))])
                            .map_err(|e| format!("insert: {e}"))?;
                        latencies.push(t0.elapsed());
                        n += 1;
                    }
                    Ok((n, latencies))
                })
            })
            .collect();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a client panicked".into()))).collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let mut rows = 0;
    let mut latencies = Vec::new();
    for c in counts {
        let (n, l) = c?;
        rows += n;
        latencies.extend(l);
    }
    latencies.sort();
    let p50 = latencies.get(latencies.len() / 2).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let mut r = Report::new("inserts");
    r.put("kind", kind.name()).put("clients", clients).put_f("seconds", seconds, 1).put("rows", rows);
    r.put_f("rows_per_s", rows as f64 / seconds, 1).put_f("p50_ms", p50, 2);
    if kind == Kind::Async {
        let backlog: i64 = admin
            .query_one(
                &format!("SELECT pending FROM embeddinggemma_async_status WHERE table_name = '{table}'::regclass"),
                &[],
            )
            .map_err(|e| format!("status: {e}"))?
            .get(0);
        let deleted = admin
            .execute(&format!("DELETE FROM {table} WHERE id >= (SELECT min(id) FROM {table}) + $1"), &[&(keep as i64)])
            .map_err(|e| format!("delete: {e}"))?;
        r.put("backlog_at_stop", backlog).put("deleted_before_drain", deleted);
        let t0 = Instant::now();
        let drained: bool = admin
            .query_one(&format!("SELECT embeddinggemma_async_wait('{table}', 'v', timeout => '3600 s')"), &[])
            .map_err(|e| format!("wait: {e}"))?
            .get(0);
        r.put("drained", drained).put_f("drain_seconds", t0.elapsed().as_secs_f64(), 1);
        let wrong: i64 = admin
            .query_one(&format!("SELECT count(*) FROM {table} WHERE v IS NULL OR v <=> embed(body) > 1e-6"), &[])
            .map_err(|e| format!("check: {e}"))?
            .get(0);
        r.put("wrong_vectors", wrong);
        sql(&mut admin, "drop the target", &format!("SELECT embeddinggemma_async_drop('{table}', 'v')"))?;
    }
    sql(&mut admin, "drop the table", &format!("DROP TABLE {table}"))?;
    Ok(r)
}

/// Plain and asynchronous inserts alternated over `rounds` rounds of `duration` each (plain
/// first in even rounds, async first in odd ones), so that the machine drifting — on a shared
/// VM the plain rate alone moves by ±30 % from one minute to the next — weighs on both alike.
/// Prints each run; reports rows/s of each kind over all its runs and their ratio.
pub fn insert_ratio(dsn: &str, clients: usize, duration: Duration, rounds: usize, keep: usize) -> Result<Report> {
    let (mut rows, mut seconds, mut wrong) = ([0.0f64; 2], [0.0f64; 2], 0.0);
    for round in 0..rounds {
        let order = if round % 2 == 0 { [Kind::Plain, Kind::Async] } else { [Kind::Async, Kind::Plain] };
        for kind in order {
            let r = inserts(dsn, kind, clients, duration, keep)?;
            println!("{r}");
            let i = usize::from(kind == Kind::Async);
            rows[i] += r.get("rows").unwrap_or(0.0);
            seconds[i] += r.get("seconds").unwrap_or(0.0);
            wrong += r.get("wrong_vectors").unwrap_or(0.0);
        }
    }
    let rate = |i: usize| rows[i] / seconds[i].max(1e-9);
    let mut r = Report::new("insert_ratio");
    r.put("clients", clients).put("rounds", rounds).put_f("seconds_each", seconds[0], 1);
    r.put_f("plain_rows_per_s", rate(0), 1).put_f("async_rows_per_s", rate(1), 1).put_f("ratio", rate(1) / rate(0), 2);
    r.put("wrong_vectors", wrong);
    Ok(r)
}

/// A backlog of `texts` (already in the table when the target is registered) drained by the
/// worker: seconds and tokens/s from registration to empty.
pub fn drain(dsn: &str, name: &str, texts: &[String], model_dir: &std::path::Path) -> Result<Report> {
    let table = format!("eg_async_drain_{name}");
    let mut c = connect(dsn)?;
    sql(&mut c, "create the table", &format!("DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id bigint PRIMARY KEY, body text NOT NULL, v vector(768))"))?;
    let ids: Vec<i64> = (1..=texts.len() as i64).collect();
    c.execute(&format!("INSERT INTO {table} SELECT * FROM unnest($1::bigint[], $2::text[])"), &[&ids, &texts])
        .map_err(|e| format!("insert: {e}"))?;
    // Ready without an interactive call: one would keep the first background passes small
    // (the service's policy for the 10 s after a search), which is not what an idle drain meets.
    crate::load::wait_for_service(dsn, Duration::from_secs(180))?;
    let t0 = Instant::now();
    sql(&mut c, "register", &format!("SELECT embeddinggemma_async('{table}', 'body', 'v')"))?;
    let drained: bool = c
        .query_one(&format!("SELECT embeddinggemma_async_wait('{table}', 'v', timeout => '7200 s')"), &[])
        .map_err(|e| format!("wait: {e}"))?
        .get(0);
    let seconds = t0.elapsed().as_secs_f64();
    let tokens = document_tokens(model_dir, texts)?;
    let mut r = Report::new("drain");
    r.put("backlog", name).put("texts", texts.len()).put("drained", drained).put_f("seconds", seconds, 1);
    r.put("tokens", tokens).put_f("tokens_per_s", tokens as f64 / seconds, 1);
    sql(&mut c, "drop", &format!("SELECT embeddinggemma_async_drop('{table}', 'v'); DROP TABLE {table}"))?;
    Ok(r)
}

fn query_latencies(c: &mut Client, n: usize) -> Result<Vec<f64>> {
    let mut ms = Vec::new();
    for i in 0..n {
        let t0 = Instant::now();
        c.query_one("SELECT vector_dims(embed($1, 'query'))", &[&format!("which planet is red? {i}")])
            .map_err(|e| format!("query: {e}"))?;
        ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    eprintln!("latencies in order (ms): {}", ms.iter().map(|m| format!("{m:.0}")).collect::<Vec<_>>().join(" "));
    ms.sort_by(f64::total_cmp);
    Ok(ms)
}

/// `embed(…, 'query')` latency of a search session, idle and while a backlog of `texts`
/// drains: p50 of each. The queries start once the first row is written, or (`at_once`) back
/// to back from the moment the target is registered.
pub fn queries_during_drain(dsn: &str, backlog: &str, texts: &[String], n: usize, at_once: bool) -> Result<Report> {
    let table = "eg_async_query_load";
    let mut c = connect(dsn)?;
    let mut search = connect(dsn)?;
    // Idle means the service has nothing queued (an earlier run's backlog may still be in it).
    let deadline = Instant::now() + Duration::from_secs(600);
    while search
        .query_one("SELECT coalesce(stats->'queue'->>'requests', '0') <> '0' FROM embeddinggemma_service_status()", &[])
        .map_err(|e| format!("service status: {e}"))?
        .get::<_, bool>(0)
    {
        if Instant::now() > deadline {
            return Err("the service never became idle".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    query_latencies(&mut search, 3)?;
    let idle = query_latencies(&mut search, n)?;
    sql(&mut c, "create the table", &format!("DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id bigint PRIMARY KEY, body text NOT NULL, v vector(768))"))?;
    let ids: Vec<i64> = (1..=texts.len() as i64).collect();
    c.execute(&format!("INSERT INTO {table} SELECT * FROM unnest($1::bigint[], $2::text[])"), &[&ids, &texts])
        .map_err(|e| format!("insert: {e}"))?;
    sql(&mut c, "register", &format!("SELECT embeddinggemma_async('{table}', 'body', 'v')"))?;
    // Wait until the worker is writing, so the queries meet a draining backlog (at once: back
    // to back from registration, so that they also meet the worker's first, full-sized passes).
    let deadline = Instant::now() + Duration::from_secs(600);
    while !at_once
        && !c.query_one(&format!("SELECT count(v) > 0 FROM {table}"), &[]).map_err(|e| e.to_string())?.get::<_, bool>(0)
    {
        if Instant::now() > deadline {
            return Err("the backlog never started draining".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let busy = query_latencies(&mut search, n)?;
    let written: i64 = c.query_one(&format!("SELECT count(v) FROM {table}"), &[]).map_err(|e| e.to_string())?.get(0);
    let mut r = Report::new("queries_during_drain");
    let p50 = |v: &[f64]| v[v.len() / 2];
    r.put("backlog", backlog).put("queries", n).put_f("idle_p50_ms", p50(&idle), 1).put_f(
        "draining_p50_ms",
        p50(&busy),
        1,
    );
    r.put_f("ratio", p50(&busy) / p50(&idle), 2).put_f("draining_max_ms", busy[busy.len() - 1], 1);
    r.put("rows", texts.len()).put("written_after", written);
    sql(&mut c, "drop", &format!("SELECT embeddinggemma_async_drop('{table}', 'v'); DROP TABLE {table}"))?;
    Ok(r)
}
