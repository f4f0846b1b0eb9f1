//! Issue 18: the service's and the queues' figures as Prometheus metrics, through Debian's
//! prometheus-postgres-exporter with the repository's query file, scraped on localhost.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use embeddinggemma_sql_tests::*;

const EXPORTER: &str = "/usr/bin/prometheus-postgres-exporter";

struct Exporter(Child);

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// The value of the sample `name{labels…}` whose labels contain `with`.
fn sample(metrics: &str, name: &str, with: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(with))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn the_exporter_shows_the_service_and_the_queues() {
    assert!(
        std::path::Path::new(EXPORTER).exists(),
        "{EXPORTER} is missing: scripts/test installs Debian's prometheus-postgres-exporter"
    );
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS mx_docs;
         CREATE TABLE mx_docs (id bigint PRIMARY KEY, body text, v vector(768));
         INSERT INTO mx_docs SELECT i, 'metrics row ' || i FROM generate_series(1, 20) i;
         SELECT embeddinggemma_async('mx_docs', 'body', 'v');
         SELECT vector_dims(embed('a query for the counters', 'query'));",
    )
    .unwrap();
    let done: bool =
        c.query_one("SELECT embeddinggemma_async_wait('mx_docs', 'v', timeout => '120 s')", &[]).unwrap().get(0);
    assert!(done);
    let queries = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../monitoring/postgres_exporter.yaml");
    let port = free_port();
    let dsn = format!("{} sslmode=disable", dsn());
    let child = Command::new(EXPORTER)
        .arg(format!("--extend.query-path={}", queries.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .args(["--disable-default-metrics", "--disable-settings-metrics"])
        .env("DATA_SOURCE_NAME", dsn)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _exporter = Exporter(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        if let Some(m) = scrape(port).filter(|m| m.contains("embeddinggemma_async_pending")) {
            break m;
        }
        assert!(Instant::now() < deadline, "no embeddinggemma metrics on :{port}: {:?}", scrape(port));
        std::thread::sleep(Duration::from_millis(200));
    };
    let got =
        |name: &str, with: &str| sample(&metrics, name, with).unwrap_or_else(|| panic!("{name} missing:\n{metrics}"));
    eprintln!("{}", metrics.lines().filter(|l| l.starts_with("embeddinggemma_")).collect::<Vec<_>>().join("\n"));
    assert_eq!(got("embeddinggemma_service_up", "state=\"running\""), 1.0);
    assert!(got("embeddinggemma_service_requests", "") >= 1.0);
    assert!(got("embeddinggemma_service_texts", "") >= 21.0);
    assert!(got("embeddinggemma_service_forward_passes", "") >= 1.0);
    let fill = got("embeddinggemma_service_fill_ratio", "");
    assert!(fill > 0.0 && fill <= 1.0, "fill ratio {fill}");
    assert!(got("embeddinggemma_service_texts_per_pass", "") >= 1.0);
    assert!(got("embeddinggemma_service_forward_p50_ms", "") > 0.0);
    assert!(got("embeddinggemma_service_rss_mb", "") > 100.0);
    assert!(got("embeddinggemma_service_background_texts", "") >= 20.0);
    assert_eq!(got("embeddinggemma_async_pending", "table_name=\"mx_docs\""), 0.0);
    assert_eq!(got("embeddinggemma_async_failed", "table_name=\"mx_docs\""), 0.0);
    assert_eq!(got("embeddinggemma_async_embedded", "table_name=\"mx_docs\""), 20.0);
    assert!(got("embeddinggemma_async_rows_per_second", "table_name=\"mx_docs\"") > 0.0);
    c.batch_execute("SELECT embeddinggemma_async_drop('mx_docs', 'v')").unwrap();
}
