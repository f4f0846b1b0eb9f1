//! eg-load: the load tests of issue 8 against a running server, one report line each.
//!
//!   eg-load short-texts --dsn DSN [--connections 32] [--seconds 60]
//!   eg-load first-call  --dsn DSN [--n 20]
//!   eg-load row-trigger --dsn DSN [--connections 16] [--seconds 60]
//!   eg-load one-batch   --dsn DSN [--n 300]
//!   eg-load wait        --dsn DSN [--seconds 180]     (until the service runs; at once in-process)
//!   eg-load async-inserts plain|async|row-trigger --dsn DSN [--connections 16] [--seconds 60] [--n 3000 rows kept to drain]
//!   eg-load async-insert-ratio --dsn DSN [--connections 16] [--seconds 30 per run, two runs of each] [--n 3000]
//!   eg-load async-drain docstrings|short --dsn DSN [--n 300|3000]
//!   eg-load async-queries short|docstrings --dsn DSN [--n 3000|300]
//!                                                    (query latency idle, then while N rows drain: short
//!                                                    rows once the first is written; docstrings back
//!                                                    to back from registration)
//!   eg-load short-corpus [--n 3000]                  (the short rows as a JSONL corpus, for the engine's bench)
//!
//! Run it as root (or the server's user) on the server's machine: memory is read from /proc.

use std::process::ExitCode;
use std::time::Duration;

use embeddinggemma_sql_tests::{async_load, load};

const USAGE: &str = "usage: eg-load short-texts|first-call|row-trigger|one-batch|wait|async-inserts KIND|async-insert-ratio|async-drain BACKLOG|async-queries BACKLOG --dsn DSN [--connections N] [--seconds S] [--n N]";

/// `n` generated one-line rows, as the insert load writes them.
fn short_rows(n: usize) -> Vec<String> {
    (0..n as u64).map(|i| format!("Note: {}", load::short_text(i))).collect()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let mut dsn = None;
    let (mut connections, mut seconds, mut n) = (None, None, None);
    // The async commands take a word after them.
    let word = args.get(1).filter(|a| !a.starts_with("--")).cloned();
    let mut rest = args[1 + word.is_some() as usize..].iter();
    while let Some(flag) = rest.next() {
        let value = rest.next();
        let number = || value.and_then(|v| v.parse::<usize>().ok()).filter(|&v| v > 0);
        match (flag.as_str(), value) {
            ("--dsn", Some(v)) => dsn = Some(v.clone()),
            ("--connections", _) if number().is_some() => connections = number(),
            ("--seconds", _) if number().is_some() => seconds = number(),
            ("--n", _) if number().is_some() => n = number(),
            _ => {
                eprintln!("bad argument {flag} {}\n{USAGE}", value.map_or("", String::as_str));
                return ExitCode::from(2);
            }
        }
    }
    if command == "short-corpus" {
        for text in short_rows(n.unwrap_or(3000)) {
            println!("{}", serde_json::to_string(&text).expect("a string"));
        }
        return ExitCode::SUCCESS;
    }
    let Some(dsn) = dsn else {
        eprintln!("--dsn is required\n{USAGE}");
        return ExitCode::from(2);
    };
    let secs = |default: usize| Duration::from_secs(seconds.unwrap_or(default) as u64);
    let result = match command.as_str() {
        "short-texts" => load::short_texts(&dsn, connections.unwrap_or(32), secs(60)).map(Some),
        "first-call" => load::first_call(&dsn, n.unwrap_or(20)).map(Some),
        "row-trigger" => load::row_trigger_inserts(&dsn, connections.unwrap_or(16), secs(60)).map(Some),
        "one-batch" => load::one_batch(&dsn, n.unwrap_or(300)).map(Some),
        "wait" => load::wait_for_service(&dsn, secs(180)).map(|()| None),
        "async-inserts" => {
            let kind = match word.as_deref() {
                Some("plain") => async_load::Kind::Plain,
                Some("async") => async_load::Kind::Async,
                Some("row-trigger") => async_load::Kind::RowTrigger,
                _ => {
                    eprintln!("async-inserts takes plain, async or row-trigger\n{USAGE}");
                    return ExitCode::from(2);
                }
            };
            async_load::inserts(&dsn, kind, connections.unwrap_or(16), secs(60), n.unwrap_or(3000)).map(Some)
        }
        "async-insert-ratio" => {
            async_load::insert_ratio(&dsn, connections.unwrap_or(16), secs(30), 2, n.unwrap_or(3000)).map(Some)
        }
        "async-drain" => {
            let (name, texts) = match word.as_deref() {
                Some("docstrings") => ("docstrings", embeddinggemma_sql_tests::docstrings(n.unwrap_or(300))),
                Some("short") => ("short", short_rows(n.unwrap_or(3000))),
                _ => {
                    eprintln!("async-drain takes docstrings or short\n{USAGE}");
                    return ExitCode::from(2);
                }
            };
            let model = std::env::var("EMBEDDINGGEMMA_MODEL_DIR")
                .unwrap_or_else(|_| "/var/cache/embeddinggemma/embeddinggemma-300m".into());
            async_load::drain(&dsn, name, &texts, std::path::Path::new(&model)).map(Some)
        }
        "async-queries" => match word.as_deref() {
            Some("short") => {
                async_load::queries_during_drain(&dsn, "short", &short_rows(n.unwrap_or(3000)), 20, false).map(Some)
            }
            Some("docstrings") => {
                let texts = embeddinggemma_sql_tests::docstrings(n.unwrap_or(300));
                async_load::queries_during_drain(&dsn, "docstrings", &texts, 15, true).map(Some)
            }
            _ => {
                eprintln!("async-queries takes short or docstrings\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("unknown command {command}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(report) => {
            println!("{}", report.map_or_else(|| "service ready".to_string(), |r| r.to_string()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("eg-load {command}: {e}");
            ExitCode::FAILURE
        }
    }
}
