#![allow(dead_code)]

use std::path::{Path, PathBuf};

use embeddinggemma_engine::{DeviceChoice, Engine, EngineOptions, Manifest, Precision, Request};
use serde::Deserialize;

pub fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(rel)
}

pub fn tiny_options() -> EngineOptions {
    EngineOptions {
        device: DeviceChoice::Cpu,
        checksums: Manifest::from_file(&data("tiny/SHA256SUMS")).unwrap(),
        ..EngineOptions::default()
    }
}

pub fn tiny_engine() -> Engine {
    Engine::load(&data("tiny/model"), &tiny_options()).unwrap()
}

/// The real model, fetched by `scripts/fetch-model`. Missing is a failure, not a skip.
pub fn real_model_dir() -> PathBuf {
    let dir = std::env::var_os("EMBEDDINGGEMMA_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/embeddinggemma/embeddinggemma-300m"));
    assert!(
        dir.join("model.safetensors").exists(),
        "the real model is not at {} — run scripts/fetch-model (or set EMBEDDINGGEMMA_MODEL_DIR)",
        dir.display()
    );
    dir
}

/// Device under test: EMBEDDINGGEMMA_TEST_DEVICE (cpu by default, e.g. cuda on a GPU machine).
pub fn test_device() -> DeviceChoice {
    std::env::var("EMBEDDINGGEMMA_TEST_DEVICE").map_or(DeviceChoice::Cpu, |d| d.parse().unwrap())
}

pub fn real_engine(precision: Precision) -> Engine {
    let options = EngineOptions { device: test_device(), precision, ..EngineOptions::default() };
    Engine::load(&real_model_dir(), &options).unwrap()
}

#[derive(Debug, Deserialize)]
pub struct Case {
    #[serde(default)]
    pub id: String,
    pub text: String,
    pub prompt_name: Option<String>,
    pub input_ids: Vec<u32>,
    pub embedding: Vec<f32>,
}

impl Case {
    pub fn task(&self) -> &str {
        self.prompt_name.as_deref().unwrap_or("none")
    }

    pub fn label(&self) -> String {
        format!("{:?}/{}", if self.id.is_empty() { &self.text } else { &self.id }, self.task())
    }
}

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

pub fn cases(rel: &str) -> Vec<Case> {
    let text = std::fs::read_to_string(data(rel)).unwrap();
    serde_json::from_str::<Reference>(&text).unwrap().cases
}

pub fn never() -> bool {
    false
}

pub fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    1.0 - dot / (na * nb)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The first `dim` values, normalised again.
pub fn matryoshka(v: &[f32], dim: usize) -> Vec<f32> {
    let norm = v[..dim].iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    v[..dim].iter().map(|&x| (x as f64 / norm) as f32).collect()
}

/// Embeds every case, one call per task (so each call holds all texts of that task).
pub fn embed_batched(engine: &Engine, cases: &[Case], dim: usize) -> Vec<Vec<f32>> {
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

/// The worst cosine distance of `got` to the reference at 768 and each Matryoshka width (the
/// 768-wide vectors truncated and normalised again), with the case it occurs on.
pub fn worst_distances(cases: &[Case], got: &[Vec<f32>]) -> Vec<(usize, f64, String)> {
    [768, 512, 256, 128]
        .into_iter()
        .map(|dim| {
            let (d, label) = cases
                .iter()
                .zip(got)
                .map(|(c, v)| (cosine_distance(&matryoshka(v, dim), &matryoshka(&c.embedding, dim)), c.label()))
                .fold((0.0, String::new()), |a, b| if b.0 > a.0 { b } else { a });
            (dim, d, label)
        })
        .collect()
}

/// The first `n` passages of bench/docstrings.jsonl.
pub fn docstrings(n: usize) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/docstrings.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines().take(n).map(|l| serde_json::from_str(l).unwrap()).collect()
}
