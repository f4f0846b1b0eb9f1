//! `embeddinggemma embed|chunk|bench|serve`: the engine from the command line.

use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use embeddinggemma_engine::service::{self, ServeOptions};
use embeddinggemma_engine::{Engine, EngineOptions, Manifest, Request};
use serde_json::json;

const USAGE: &str = "usage:
  embeddinggemma embed --model DIR [--task NAME|none] [--dim N] [--dtype auto|f32|bf16] [--device auto|cpu|cuda|cuda:N]
                       [--threads N] [--max-batch-tokens N] [--max-memory-mb N] [--checksums FILE] [--no-truncate]
      reads one JSON string per line on stdin, writes one JSON array per line on stdout
  embeddinggemma chunk --model DIR [--task NAME|none] [--max-tokens N (512)] [--overlap N (64)] [--checksums FILE]
      reads one JSON string per line on stdin, writes per line a JSON array of its chunks,
      {\"chunk\": 1-based number, \"start\": first char (0-based), \"end\": char after it, \"body\": text},
      each embedding within max-tokens tokens with the task's prompt
  embeddinggemma bench --model DIR --corpus FILE.jsonl [--limit N] [--task NAME] [--dim N] [--dtype …] [--device …]
                       [--threads N] [--max-batch-tokens N] [--max-memory-mb N] [--checksums FILE]
      embeds the corpus and ends with one line of throughput figures
  embeddinggemma serve --model DIR --socket PATH [--checksums FILE] [--device …] [--dtype …] [--threads N]
                       [--max-batch-tokens N] [--max-memory-mb N] [--batch-wait-ms N] [--max-queue-texts N] [--max-queue-mb N]
                       [--model-key KEY]
      loads the model once and serves embed and chunk requests on a Unix socket (mode 0600) until stdin
      closes, the parent dies or SIGTERM; a failed load is tried again (SIGHUP: now); SIGUSR1 drains and
      exits; with --model-key, requests naming other model settings are refused";

struct Args {
    command: String,
    model: Option<PathBuf>,
    corpus: Option<PathBuf>,
    limit: Option<usize>,
    task: String,
    /// None: the model's full width.
    dim: Option<usize>,
    truncate: bool,
    max_tokens: usize,
    overlap: usize,
    options: EngineOptions,
    socket: Option<PathBuf>,
    serve: ServeOptions,
}

fn value<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    v.parse().map_err(|e| format!("{flag} {v:?}: {e}"))
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let command = it.next().ok_or("missing command")?;
    if !["embed", "chunk", "bench", "serve"].contains(&command.as_str()) {
        return Err(format!("unknown command {command:?}"));
    }
    let mut args = Args {
        command,
        model: None,
        corpus: None,
        limit: None,
        task: "document".into(),
        dim: None,
        truncate: true,
        max_tokens: 512,
        overlap: 64,
        // A process of its own: keep the threads and tune malloc for the activations.
        options: EngineOptions { own_thread_pool: true, tune_allocator: true, ..EngineOptions::default() },
        socket: None,
        serve: ServeOptions::default(),
    };
    while let Some(flag) = it.next() {
        let o = &mut args.options;
        match flag.as_str() {
            "--model" => args.model = Some(value(&flag, it.next())?),
            "--corpus" => args.corpus = Some(value(&flag, it.next())?),
            "--limit" => args.limit = Some(value(&flag, it.next())?),
            "--task" => args.task = value(&flag, it.next())?,
            "--dim" => args.dim = Some(value(&flag, it.next())?),
            "--dtype" => o.precision = value(&flag, it.next())?,
            "--device" => o.device = value(&flag, it.next())?,
            "--threads" => o.threads = value(&flag, it.next())?,
            "--max-batch-tokens" => o.max_batch_tokens = value(&flag, it.next())?,
            "--max-batch-size" => o.max_batch_size = value(&flag, it.next())?,
            "--max-memory-mb" => o.max_memory = value::<usize>(&flag, it.next())?.saturating_mul(1 << 20),
            "--checksums" => {
                o.checksums = Manifest::from_file(&value::<PathBuf>(&flag, it.next())?).map_err(|e| e.to_string())?
            }
            "--no-truncate" => args.truncate = false,
            "--max-tokens" => args.max_tokens = value(&flag, it.next())?,
            "--overlap" => args.overlap = value(&flag, it.next())?,
            "--socket" => args.socket = Some(value(&flag, it.next())?),
            "--batch-wait-ms" => args.serve.batch_wait = std::time::Duration::from_millis(value(&flag, it.next())?),
            "--max-queue-texts" => args.serve.max_queue_texts = value(&flag, it.next())?,
            "--max-queue-mb" => args.serve.max_queue_bytes = value::<usize>(&flag, it.next())?.saturating_mul(1 << 20),
            "--model-key" => args.serve.model_key = value(&flag, it.next())?,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if args.options.threads > 0 {
        args.serve.chunk_workers = args.options.threads;
    }
    Ok(args)
}

fn never() -> bool {
    false
}

/// (VmHWM, RssAnon) of this process in MiB, from /proc/self/status.
fn memory_mb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024)
    };
    (field("VmHWM:"), field("RssAnon:"))
}

fn dim(engine: &Engine, args: &Args) -> usize {
    args.dim.unwrap_or(engine.info().dims[0])
}

fn embed(engine: &Engine, args: &Args) -> Result<(), String> {
    let request = Request { task: &args.task, dim: dim(engine, args), truncate: args.truncate };
    let stdin = std::io::stdin().lock();
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut lines = stdin.lines().enumerate().peekable();
    while lines.peek().is_some() {
        let mut texts = Vec::new();
        for (n, line) in lines.by_ref().take(1024) {
            let line = line.map_err(|e| format!("stdin: {e}"))?;
            texts.push(
                serde_json::from_str::<String>(&line).map_err(|e| format!("line {}: not a JSON string: {e}", n + 1))?,
            );
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let (vectors, _) = engine.embed(&refs, &request, &never).map_err(|e| e.to_string())?;
        for v in vectors {
            serde_json::to_writer(&mut out, &v).map_err(|e| e.to_string())?;
            out.write_all(b"\n").map_err(|e| e.to_string())?;
        }
    }
    out.flush().map_err(|e| e.to_string())
}

fn chunk(engine: &Engine, args: &Args) -> Result<(), String> {
    let chunker = engine.chunker(&args.task, args.max_tokens, args.overlap).map_err(|e| e.to_string())?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.map_err(|e| format!("stdin: {e}"))?;
        let text =
            serde_json::from_str::<String>(&line).map_err(|e| format!("line {}: not a JSON string: {e}", n + 1))?;
        let chunks = chunker.chunks(&text, &never).map_err(|e| format!("line {}: {e}", n + 1))?;
        let rows: Vec<_> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| json!({"chunk": i + 1, "start": c.start_char, "end": c.end_char, "body": &text[c.start_byte..c.end_byte]}))
            .collect();
        serde_json::to_writer(&mut out, &rows).map_err(|e| e.to_string())?;
        out.write_all(b"\n").map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())
}

fn bench(engine: &Engine, args: &Args) -> Result<(), String> {
    let corpus = args.corpus.as_ref().ok_or("bench needs --corpus")?;
    let file = std::fs::File::open(corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
    let mut texts = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        if args.limit.is_some_and(|l| texts.len() >= l) {
            break;
        }
        let line = line.map_err(|e| format!("{}: {e}", corpus.display()))?;
        texts.push(serde_json::from_str::<String>(&line).map_err(|e| format!("{}:{}: {e}", corpus.display(), n + 1))?);
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let request = Request { task: &args.task, dim: dim(engine, args), truncate: true };
    engine.embed(&refs[..refs.len().min(8)], &request, &never).map_err(|e| e.to_string())?;

    let started = Instant::now();
    let (_, stats) = engine.embed(&refs, &request, &never).map_err(|e| e.to_string())?;
    let seconds = started.elapsed().as_secs_f64();
    let (peak, anon) = memory_mb();
    eprintln!(
        "forward_passes={} padded_tokens={} truncated={} tokenize_s={:.2} forward_s={:.2}",
        stats.forward_passes,
        stats.padded_tokens,
        stats.truncated,
        stats.tokenize_time.as_secs_f64(),
        stats.forward_time.as_secs_f64()
    );
    println!(
        "passages={} tokens={} seconds={:.2} passages_per_s={:.2} tokens_per_s={:.0} fill={:.3} peak_rss_mb={} anon_mb={}",
        stats.texts,
        stats.real_tokens,
        seconds,
        stats.texts as f64 / seconds,
        stats.real_tokens as f64 / seconds,
        stats.fill_ratio(),
        peak,
        anon
    );
    Ok(())
}

/// Listens first, then loads (callers wait for the load); a model that fails to load is
/// reported to every caller and tried again. Signals, taken on the main thread (blocked in
/// every other, which inherit the mask): SIGHUP tries a failed load again now; SIGUSR1 drains
/// (finishes what was asked, refuses new requests) and exits, for a replacement that binds the
/// socket path anew; SIGTERM and SIGINT exit.
fn serve(args: Args, model: PathBuf) -> Result<(), String> {
    let signals = block_signals(&[libc::SIGHUP, libc::SIGUSR1, libc::SIGTERM, libc::SIGINT]);
    let socket = args.socket.as_ref().ok_or("serve needs --socket PATH")?;
    let listener = service::bind(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    let file = service::SocketFile::of(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    service::exit_with_parent(file.clone());
    eprintln!("embeddinggemma serve: listening on {}", socket.display());
    let options = args.options;
    let load = move || {
        let engine = Engine::load(&model, &options);
        if let Ok(engine) = &engine {
            log_loaded(engine);
        }
        engine
    };
    let service = service::start(listener, load, args.serve).map_err(|e| e.to_string())?;
    loop {
        let mut signal = 0;
        // SAFETY: waits for one of the signals blocked above.
        if unsafe { libc::sigwait(&signals, &mut signal) } != 0 {
            continue;
        }
        match signal {
            libc::SIGHUP => service.retry_load(),
            libc::SIGUSR1 => {
                eprintln!("embeddinggemma serve: draining");
                let service = service.clone();
                std::thread::spawn(move || {
                    service.drain();
                    service.wait_drained();
                    eprintln!("embeddinggemma serve: drained; exiting");
                    std::process::exit(0);
                });
            }
            _ => {
                file.remove_if_ours();
                std::process::exit(0);
            }
        }
    }
}

/// Blocks `signals` in this thread (and the threads it starts); returns the set for sigwait.
fn block_signals(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: a sigset built with the libc calls, then set as this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn log_loaded(engine: &Engine) {
    let info = engine.info();
    eprintln!(
        "loaded {} in {:.2}s: device={} dtype={} threads={} max_batch_tokens={} weights_mb={} anon_mb={}",
        info.model_dir.display(),
        info.load_time.as_secs_f64(),
        info.device,
        info.dtype,
        info.threads,
        info.max_batch_tokens,
        info.weight_bytes >> 20,
        memory_mb().1
    );
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let model = args.model.clone().ok_or("--model DIR is required")?;
    if args.command == "serve" {
        return serve(args, model);
    }
    let engine = Engine::load(&model, &args.options).map_err(|e| e.to_string())?;
    log_loaded(&engine);
    match args.command.as_str() {
        "embed" => embed(&engine, &args),
        "chunk" => chunk(&engine, &args),
        _ => bench(&engine, &args),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("embeddinggemma: error: {e}\n{USAGE}");
            ExitCode::FAILURE
        }
    }
}
