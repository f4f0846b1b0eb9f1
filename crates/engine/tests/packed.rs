//! The real model on the CPU kernels, whose forward pass packs a bucket's sequences without
//! padding: one pass over texts of mixed lengths (2 to 840 tokens, so sliding layers clip their
//! window inside a sequence) must give each text what it gets alone, and the reference vectors.

mod common;

use common::*;
use embeddinggemma_engine::{Engine, Precision};

const F32_TOLERANCE: f64 = 1e-5;
const BF16_TOLERANCE: f64 = 5e-3;
const BATCH_INVARIANCE: f64 = 1e-6;

/// Reference cases (by id, task "none") spanning empty to longer than the sliding window.
const REFERENCE_IDS: [&str; 6] = ["empty", "short_en", "zh", "code_rust", "long_300w", "long_700w"];

const SHORT: [&str; 4] = [
    "Packed rows skip the padding.",
    "How fast is the embedding service under load?",
    "ok",
    "A slightly longer sentence about vector search in PostgreSQL, with an index on the column.",
];

/// The reference cases' ids first, then short sentences and docstrings as "document" texts.
fn inputs(engine: &Engine) -> (Vec<Case>, Vec<Vec<u32>>) {
    let reference: Vec<Case> = cases("embeddinggemma-300m.json")
        .into_iter()
        .filter(|c| c.task() == "none" && REFERENCE_IDS.contains(&c.id.as_str()))
        .collect();
    assert_eq!(reference.len(), REFERENCE_IDS.len());
    let docs = docstrings(12);
    let texts: Vec<&str> = SHORT.iter().copied().chain(docs.iter().map(String::as_str)).collect();
    let mut seqs: Vec<Vec<u32>> = reference.iter().map(|c| c.input_ids.clone()).collect();
    seqs.extend(engine.tokenize(&texts, "document").unwrap().into_iter().map(|t| t.ids));
    (reference, seqs)
}

/// Worst cosine distances: each text alone vs in one pass with all, and to the reference.
fn check(precision: Precision, tolerance: f64) {
    let engine = real_engine(precision);
    let (reference, seqs) = inputs(&engine);
    let all: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let together = engine.forward_ids(&all, &never).unwrap();
    let mut worst = (0.0f64, 0.0f64);
    for (i, seq) in all.iter().enumerate() {
        let alone = engine.forward_ids(&[seq], &never).unwrap();
        let d = cosine_distance(&alone[0], &together[i]);
        assert!(d <= BATCH_INVARIANCE, "{precision:?} text {i} ({} tokens) alone vs together: {d:e}", seq.len());
        worst.0 = worst.0.max(d);
    }
    for (case, v) in reference.iter().zip(&together) {
        let d = cosine_distance(v, &case.embedding);
        assert!(d <= tolerance, "{precision:?} {}: cosine distance to reference {d:e}", case.label());
        worst.1 = worst.1.max(d);
    }
    let lengths: Vec<usize> = all.iter().map(|s| s.len()).collect();
    eprintln!("{precision:?} lengths {lengths:?}: worst alone vs together {:e}, to reference {:e}", worst.0, worst.1);
}

#[test]
fn f32_one_pass_of_mixed_lengths_matches_alone_and_the_reference() {
    check(Precision::F32, F32_TOLERANCE);
}

#[test]
fn bf16_one_pass_of_mixed_lengths_matches_alone_and_the_reference() {
    check(Precision::Bf16, BF16_TOLERANCE);
}
