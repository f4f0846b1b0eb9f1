//! Both bf16 paths on this machine: the AVX512-BF16 kernel (when the CPU has it) and the
//! widening path CPUs without it take, forced with EMBEDDINGGEMMA_BF16_KERNEL=off. This binary
//! holds a single test, so changing the environment between loads affects nothing else.

mod common;

use common::*;
use embeddinggemma_engine::{DeviceChoice, Engine, EngineOptions, Precision, Request};

const BF16_TOLERANCE: f64 = 5e-3;
const SWITCH: &str = "EMBEDDINGGEMMA_BF16_KERNEL";

fn tiny_bf16() -> Engine {
    Engine::load(&data("tiny/model"), &EngineOptions { precision: Precision::Bf16, ..tiny_options() }).unwrap()
}

/// The tiny model's vectors (hidden 48, MLP 96: every product has a partial panel of columns)
/// and their worst cosine distance to its float32 goldens.
fn tiny_run(name: &str) -> Vec<Vec<f32>> {
    let cases = cases("tiny/golden.json");
    let got = embed_batched(&tiny_bf16(), &cases, 48);
    let worst = got.iter().zip(&cases).map(|(v, c)| cosine_distance(v, &c.embedding)).fold(0.0, f64::max);
    eprintln!("bf16 ({name}) tiny model: worst cosine distance {worst:e}");
    assert!(worst <= BF16_TOLERANCE, "bf16 ({name}) tiny: {worst:e}");
    got
}

#[test]
fn bf16_with_and_without_the_kernel_is_close_to_the_reference() {
    assert!(std::env::var_os(SWITCH).is_none(), "run this test without {SWITCH} set");
    // real_parity checks the default path on all 69 cases; the widened path here on those
    // up to 512 tokens (its arithmetic is float32 throughout, only the wiring is at stake).
    let kernel = tiny_run("default");
    std::env::set_var(SWITCH, "off");
    let widened = tiny_run("widened");
    let reference: Vec<Case> =
        cases("embeddinggemma-300m.json").into_iter().filter(|c| c.input_ids.len() <= 512).collect();
    let options = EngineOptions { device: DeviceChoice::Cpu, precision: Precision::Bf16, ..EngineOptions::default() };
    let engine = Engine::load(&real_model_dir(), &options).unwrap();
    std::env::remove_var(SWITCH);
    let got = embed_batched(&engine, &reference, 768);
    for (dim, worst, label) in worst_distances(&reference, &got) {
        eprintln!(
            "bf16 (widened): worst cosine distance to reference at {dim}: {worst:e} ({label}, {} cases)",
            reference.len()
        );
        assert!(worst <= BF16_TOLERANCE, "bf16 (widened) {label} at {dim}: {worst:e}");
    }

    // Where the CPU has the kernel, switching it off must change the arithmetic (activations
    // stay float32 when widened), proving both paths ran.
    #[cfg(target_arch = "x86_64")]
    let has_kernel = std::is_x86_feature_detected!("avx512bf16") && std::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let has_kernel = false;
    let differ = kernel.iter().zip(&widened).any(|(a, b)| a != b);
    assert_eq!(differ, has_kernel, "kernel present: {has_kernel}, vectors differ: {differ}");

    // A text alone and padded in a batch agree on the kernel path.
    let engine = tiny_bf16();
    let request = Request { task: "none", dim: 48, truncate: true };
    let (one, _) = engine.embed(&["a single text"], &request, &never).unwrap();
    let (two, _) =
        engine.embed(&["a single text", "and a second, longer one, to pad the first"], &request, &never).unwrap();
    let d = cosine_distance(&one[0], &two[0]);
    assert!(d <= 1e-6, "alone vs batched: {d:e}");
}
