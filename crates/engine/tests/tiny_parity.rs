//! The tiny fixture model against its sentence-transformers goldens.

mod common;

use common::*;
use embeddinggemma_engine::Request;

const TOLERANCE: f32 = 1e-5;

#[test]
fn input_ids_match_the_reference() {
    let engine = tiny_engine();
    for case in cases("tiny/golden.json") {
        let got = engine.tokenize(&[&case.text], case.task()).unwrap();
        assert_eq!(got[0].ids, case.input_ids, "{}", case.label());
    }
}

#[test]
fn each_case_alone_matches_the_reference() {
    let engine = tiny_engine();
    for case in cases("tiny/golden.json") {
        let request = Request { task: case.task(), dim: 48, truncate: true };
        let (v, stats) = engine.embed(&[&case.text], &request, &never).unwrap();
        let diff = max_abs_diff(&v[0], &case.embedding);
        assert!(diff <= TOLERANCE, "{}: max abs diff {diff}", case.label());
        assert_eq!(stats.forward_passes, 1);
    }
}

#[test]
fn all_cases_in_one_batch_match_the_reference() {
    let engine = tiny_engine();
    let cases = cases("tiny/golden.json");
    for task in ["none", "query", "document"] {
        let group: Vec<_> = cases.iter().filter(|c| c.task() == task).collect();
        let texts: Vec<&str> = group.iter().map(|c| c.text.as_str()).collect();
        let request = Request { task, dim: 48, truncate: true };
        let (vectors, stats) = engine.embed(&texts, &request, &never).unwrap();
        assert_eq!(stats.forward_passes, 1, "8 short texts fit one bucket");
        for (case, v) in group.iter().zip(&vectors) {
            let diff = max_abs_diff(v, &case.embedding);
            assert!(diff <= TOLERANCE, "{}: max abs diff {diff}", case.label());
        }
    }
}

#[test]
fn all_24_cases_in_one_call_match_the_reference() {
    let engine = tiny_engine();
    let cases = cases("tiny/golden.json");
    // A named task is its prompt put before the text: with task "none" and the prompt written
    // out, all three tasks share one call.
    let inputs: Vec<String> = cases.iter().map(|c| format!("{}{}", engine.prompt(c.task()).unwrap(), c.text)).collect();
    let texts: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let (vectors, stats) = engine.embed(&texts, &Request { task: "none", dim: 48, truncate: true }, &never).unwrap();
    assert_eq!(stats.texts, 24);
    assert!(stats.forward_passes < 24);
    for (case, v) in cases.iter().zip(&vectors) {
        let diff = max_abs_diff(v, &case.embedding);
        assert!(diff <= TOLERANCE, "{}: max abs diff {diff}", case.label());
    }
}

#[test]
fn portable_kernels_match_the_reference_too() {
    // The path GPUs take (candle's generic ops with masks), checked on the CPU.
    let options = embeddinggemma_engine::EngineOptions { portable_kernels: true, ..tiny_options() };
    let engine = embeddinggemma_engine::Engine::load(&data("tiny/model"), &options).unwrap();
    let cases = cases("tiny/golden.json");
    for task in ["none", "query", "document"] {
        let group: Vec<_> = cases.iter().filter(|c| c.task() == task).collect();
        let texts: Vec<&str> = group.iter().map(|c| c.text.as_str()).collect();
        let (vectors, _) = engine.embed(&texts, &Request { task, dim: 48, truncate: true }, &never).unwrap();
        for (case, v) in group.iter().zip(&vectors) {
            let diff = max_abs_diff(v, &case.embedding);
            assert!(diff <= TOLERANCE, "{}: max abs diff {diff}", case.label());
        }
    }
}

#[test]
fn long_text_is_truncated_with_eos_last_and_counted() {
    let engine = tiny_engine();
    let long = "word ".repeat(500);
    let ids = &engine.tokenize(&[&long], "none").unwrap()[0];
    assert_eq!(ids.ids.len(), 64);
    assert_eq!(*ids.ids.last().unwrap(), 1);
    assert!(ids.full_len > 64);
    let (_, stats) =
        engine.embed(&[&long, "short"], &Request { task: "none", dim: 48, truncate: true }, &never).unwrap();
    assert_eq!(stats.truncated, 1);
    let short = engine.tokenize(&["short"], "none").unwrap()[0].ids.len() as u64;
    assert_eq!(stats.real_tokens, 64 + short);
}
