//! The `embeddinggemma` command line on the tiny model.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_embeddinggemma"))
}

fn model_args() -> Vec<String> {
    vec![
        "--model".into(),
        data("tiny/model").display().to_string(),
        "--checksums".into(),
        data("tiny/SHA256SUMS").display().to_string(),
        "--device".into(),
        "cpu".into(),
    ]
}

#[test]
fn embed_writes_one_vector_per_input_line_in_order() {
    let cases = cases("tiny/golden.json");
    let query: Vec<_> = cases.iter().filter(|c| c.task() == "query").collect();
    let mut child = cli()
        .arg("embed")
        .args(model_args())
        .args(["--task", "query", "--dim", "48"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input: String = query.iter().map(|c| serde_json::to_string(&c.text).unwrap() + "\n").collect();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Vec<f32>> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), query.len());
    for (case, v) in query.iter().zip(&lines) {
        assert!(max_abs_diff(v, &case.embedding) <= 1e-5, "{}", case.label());
    }
}

#[test]
fn chunk_writes_the_chunks_of_each_line() {
    let long = "Chunks of a long text. ".repeat(40);
    let mut child = cli()
        .arg("chunk")
        .args(model_args())
        .args(["--task", "query", "--max-tokens", "40", "--overlap", "5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = format!("{}\n\"\"\n", serde_json::to_string(&long).unwrap());
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    let chunks = lines[0].as_array().unwrap();
    assert!(chunks.len() > 2, "{chunks:?}");
    let chars: Vec<char> = long.chars().collect();
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c["chunk"], i + 1);
        let (start, end) = (c["start"].as_u64().unwrap() as usize, c["end"].as_u64().unwrap() as usize);
        assert_eq!(c["body"].as_str().unwrap(), chars[start..end].iter().collect::<String>());
    }
    assert_eq!(lines[1], serde_json::json!([]));
}

#[test]
fn bench_ends_with_the_figures_line() {
    let corpus = tempfile::NamedTempFile::new().unwrap();
    let texts: String =
        (0..30).map(|i| serde_json::to_string(&format!("passage {i} {}", "word ".repeat(i))).unwrap() + "\n").collect();
    std::fs::write(corpus.path(), texts).unwrap();
    let out = cli()
        .arg("bench")
        .args(model_args())
        .args(["--corpus", corpus.path().to_str().unwrap(), "--limit", "25"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().unwrap();
    let keys: Vec<&str> = last.split(' ').map(|kv| kv.split('=').next().unwrap()).collect();
    assert_eq!(
        keys,
        ["passages", "tokens", "seconds", "passages_per_s", "tokens_per_s", "fill", "peak_rss_mb", "anon_mb"],
        "{last}"
    );
    assert!(last.starts_with("passages=25 "), "{last}");
}

#[test]
fn bad_arguments_and_input_fail_with_a_message() {
    let out = cli().args(["embed", "--model", "/nonexistent"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent"));

    let out = cli().args(["embed", "--dtype", "f16"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("valid dtypes: auto, f32, bf16"));

    let mut child = cli()
        .arg("embed")
        .args(model_args())
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"not json\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1: not a JSON string"));
}
