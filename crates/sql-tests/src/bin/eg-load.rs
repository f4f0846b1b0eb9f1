//! eg-load: the load tests of issue 8 against a running server, one report line each.
//!
//!   eg-load short-texts --dsn DSN [--connections 32] [--seconds 60]
//!   eg-load first-call  --dsn DSN [--n 20]
//!   eg-load row-trigger --dsn DSN [--connections 16] [--seconds 60]
//!   eg-load one-batch   --dsn DSN [--n 300]
//!   eg-load wait        --dsn DSN [--seconds 180]     (until the service runs; at once in-process)
//!
//! Run it as root (or the server's user) on the server's machine: memory is read from /proc.

use std::process::ExitCode;
use std::time::Duration;

use embeddinggemma_sql_tests::load;

const USAGE: &str = "usage: eg-load short-texts|first-call|row-trigger|one-batch|wait --dsn DSN [--connections N] [--seconds S] [--n N]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let mut dsn = None;
    let (mut connections, mut seconds, mut n) = (None, None, None);
    let mut rest = args[1..].iter();
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
