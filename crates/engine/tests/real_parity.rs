//! The real EmbeddingGemma-300m against sentence-transformers' outputs (69 cases).

mod common;

use std::sync::OnceLock;

use common::*;
use embeddinggemma_engine::{Engine, Precision, Request};

const F32_TOLERANCE: f64 = 1e-5;
const BF16_TOLERANCE: f64 = 5e-3;
const BATCH_INVARIANCE: f64 = 1e-6;

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| real_engine(Precision::F32))
}

fn reference() -> &'static [Case] {
    static CASES: OnceLock<Vec<Case>> = OnceLock::new();
    CASES.get_or_init(|| cases("embeddinggemma-300m.json"))
}

/// Embeds every case, one call per task (so each call holds all texts of that task).
fn embed_batched(engine: &Engine, dim: usize) -> Vec<Vec<f32>> {
    let cases = reference();
    let mut out = vec![Vec::new(); cases.len()];
    for task in ["none", "query", "document"] {
        let idx: Vec<usize> = (0..cases.len()).filter(|&i| cases[i].task() == task).collect();
        let texts: Vec<&str> = idx.iter().map(|&i| cases[i].text.as_str()).collect();
        let (vectors, stats) = engine.embed(&texts, &Request { task, dim, truncate: true }, &never).unwrap();
        assert!(stats.forward_passes < texts.len() as u64, "batched call ran one pass per text");
        for (i, v) in idx.into_iter().zip(vectors) {
            out[i] = v;
        }
    }
    out
}

#[test]
fn there_are_69_cases() {
    assert_eq!(reference().len(), 69);
}

#[test]
fn input_ids_match_the_reference() {
    for case in reference() {
        let got = engine().tokenize(&[&case.text], case.task()).unwrap();
        assert_eq!(got[0].ids, case.input_ids, "{}", case.label());
    }
}

#[test]
fn f32_alone_and_batched_match_the_reference_and_each_other() {
    let engine = engine();
    let batched = embed_batched(engine, 768);
    let mut worst = (0.0f64, 0.0f64);
    for (case, b) in reference().iter().zip(&batched) {
        let (alone, _) = engine.embed(&[&case.text], &Request { task: case.task(), dim: 768, truncate: true }, &never).unwrap();
        let d_alone = cosine_distance(&alone[0], &case.embedding);
        let d_batched = cosine_distance(b, &case.embedding);
        let d_between = cosine_distance(&alone[0], b);
        assert!(d_alone <= F32_TOLERANCE, "{} alone: cosine distance {d_alone:e}", case.label());
        assert!(d_batched <= F32_TOLERANCE, "{} batched: cosine distance {d_batched:e}", case.label());
        assert!(d_between <= BATCH_INVARIANCE, "{} alone vs batched: {d_between:e}", case.label());
        worst = (worst.0.max(d_alone), worst.1.max(d_between));
    }
    eprintln!("f32: worst cosine distance to reference {:e}, alone vs batched {:e}", worst.0, worst.1);
}

#[test]
fn matryoshka_dimensions_match_the_truncated_reference() {
    for dim in [512, 256, 128] {
        let got = embed_batched(engine(), dim);
        for (case, v) in reference().iter().zip(&got) {
            assert_eq!(v.len(), dim);
            let d = cosine_distance(v, &matryoshka(&case.embedding, dim));
            assert!(d <= F32_TOLERANCE, "{} dim {dim}: cosine distance {d:e}", case.label());
            let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{} dim {dim}: norm {norm}", case.label());
        }
    }
}

#[test]
fn bf16_batched_is_close_to_the_reference() {
    let engine = real_engine(Precision::Bf16);
    assert_eq!(engine.info().dtype, "bf16");
    let got = embed_batched(&engine, 768);
    let mut worst = 0.0f64;
    for (case, v) in reference().iter().zip(&got) {
        let d = cosine_distance(v, &case.embedding);
        assert!(d <= BF16_TOLERANCE, "{} bf16: cosine distance {d:e}", case.label());
        worst = worst.max(d);
    }
    eprintln!("bf16: worst cosine distance to reference {worst:e}");
}
