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

fn embed_batched(engine: &Engine, dim: usize) -> Vec<Vec<f32>> {
    common::embed_batched(engine, reference(), dim)
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
        let (alone, _) =
            engine.embed(&[&case.text], &Request { task: case.task(), dim: 768, truncate: true }, &never).unwrap();
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

/// bf16 on this CPU: the AVX512-BF16 kernel where the CPU has it (bf16 weights and
/// activations, f32 accumulation), else float32 products of widened bf16 weights.
fn bf16_engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| real_engine(Precision::Bf16))
}

#[test]
fn bf16_batched_is_close_to_the_reference_at_every_width() {
    let engine = bf16_engine();
    assert_eq!(engine.info().dtype, "bf16");
    let got = embed_batched(engine, 768);
    for (dim, worst, label) in worst_distances(reference(), &got) {
        eprintln!("bf16: worst cosine distance to reference at {dim}: {worst:e} ({label})");
        assert!(worst <= BF16_TOLERANCE, "{label} bf16 at {dim}: cosine distance {worst:e}");
    }
}

/// Ranks `docs` by cosine similarity to `query` (all unit vectors), best first.
fn ranking(query: &[f32], docs: &[Vec<f32>]) -> Vec<usize> {
    let dot = |d: &Vec<f32>| d.iter().zip(query).map(|(a, b)| a * b).sum::<f32>();
    let mut order: Vec<usize> = (0..docs.len()).collect();
    order.sort_by(|&a, &b| dot(&docs[b]).total_cmp(&dot(&docs[a])));
    order
}

#[test]
fn bf16_keeps_the_model_card_ranking() {
    const QUERY: &str = "Which planet is known as the Red Planet?";
    const PLANETS: [&str; 4] = [
        "Venus is often called Earth's twin because of its similar size and proximity.",
        "Mars, known for its reddish appearance, is often referred to as the Red Planet.",
        "Jupiter, the largest planet in our solar system, has a prominent red spot.",
        "Saturn, famous for its rings, is sometimes mistaken for the Red Planet.",
    ];
    let rank = |engine: &Engine| {
        let (q, _) = engine.embed(&[QUERY], &Request { task: "query", dim: 768, truncate: true }, &never).unwrap();
        let (docs, _) =
            engine.embed(&PLANETS, &Request { task: "document", dim: 768, truncate: true }, &never).unwrap();
        ranking(&q[0], &docs)
    };
    let (f32_order, bf16_order) = (rank(engine()), rank(bf16_engine()));
    assert_eq!(f32_order[0], 1, "f32 ranks Mars first: {f32_order:?}");
    assert_eq!(bf16_order, f32_order);
}

/// Retrieval on real passages: each of the first 50 docstrings queries the first 100 (itself
/// left out, `document` prompt on both sides); bf16's top 10 must share ≥ 95 % with f32's.
/// (bench/retrieval-bf16 measures the same over all 1000 passages.)
#[test]
fn bf16_retrieval_matches_f32_on_docstrings() {
    let corpus = docstrings(100);
    let texts: Vec<&str> = corpus.iter().map(String::as_str).collect();
    let request = Request { task: "document", dim: 768, truncate: true };
    let (f32_vectors, _) = engine().embed(&texts, &request, &never).unwrap();
    let (bf16_vectors, _) = bf16_engine().embed(&texts, &request, &never).unwrap();
    let top10 = |vectors: &[Vec<f32>], q: usize| -> Vec<usize> {
        ranking(&vectors[q], vectors).into_iter().filter(|&i| i != q).take(10).collect()
    };
    let shared: usize = (0..50)
        .map(|q| {
            let want = top10(&f32_vectors, q);
            top10(&bf16_vectors, q).iter().filter(|i| want.contains(i)).count()
        })
        .sum();
    let overlap = shared as f64 / 500.0;
    eprintln!("bf16 vs f32: top-10 overlap {:.1} % (50 queries, 100 passages)", overlap * 100.0);
    assert!(overlap >= 0.95, "top-10 overlap {overlap}");
}
