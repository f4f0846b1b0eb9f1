//! The fuzz targets' short CI run: seeded, generated and mutated inputs through the same entry
//! points as crates/engine/fuzz (scripts/fuzz-engine runs the long campaign).

mod common;
mod texts;

use common::*;
use embeddinggemma_engine::{fuzzing, TextTokenizer};
use texts::Rng;

/// Byte-level mutations of a valid seed: flips, insertions, deletions, splices, truncation,
/// and numbers replaced by extreme ones.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = if v.is_empty() { 0 } else { rng.below(v.len() as u64) as usize };
        match rng.below(7) {
            0 if !v.is_empty() => v[at] ^= 1 << rng.below(8),
            1 => v.insert(at, rng.below(256) as u8),
            2 if !v.is_empty() => {
                v.remove(at);
            }
            3 => v.truncate(at),
            4 => {
                let piece = *rng.pick(&[
                    "18446744073709551615",
                    "-1",
                    "1e309",
                    "null",
                    "[]",
                    "{}",
                    "\"\"",
                    "0",
                    "\"../x\"",
                    "\"/etc\"",
                ]);
                v.splice(at..at, piece.bytes());
            }
            5 if v.len() > 2 => {
                let from = rng.below(v.len() as u64) as usize;
                let len = rng.below((v.len() - from) as u64 + 1) as usize;
                let chunk = v[from..from + len].to_vec();
                v.splice(at..at, chunk);
            }
            _ => v.push(rng.below(256) as u8),
        }
    }
    v
}

fn safetensors_seed() -> Vec<u8> {
    let header = br#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]},"__metadata__":{"k":"v"}}"#;
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header);
    v.extend_from_slice(&[0u8; 32]);
    v
}

fn model_config_seed() -> Vec<u8> {
    let dir = data("tiny/model");
    let parts: Vec<Vec<u8>> = fuzzing::CONFIG_FILES.iter().map(|f| std::fs::read(dir.join(f)).unwrap()).collect();
    parts.join(&0u8)
}

#[test]
fn seeded_inputs_never_panic_the_parsers() {
    let mut rng = Rng(0x5eed);
    let safetensors = safetensors_seed();
    let config = model_config_seed();
    let manifest = std::fs::read(data("tiny/SHA256SUMS")).unwrap();
    // The seeds themselves are valid.
    assert_eq!(embeddinggemma_engine::fuzzing::safetensors_tensors(&safetensors).unwrap(), 2);
    let mut tried = 0;
    for _ in 0..3000 {
        fuzzing::safetensors_header(&mutate(&mut rng, &safetensors));
        fuzzing::model_config(&mutate(&mut rng, &config));
        fuzzing::manifest(&mutate(&mut rng, &manifest));
        tried += 3;
    }
    // Random bytes too.
    for _ in 0..1000 {
        let len = rng.below(300) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
        fuzzing::safetensors_header(&bytes);
        fuzzing::model_config(&bytes);
        fuzzing::manifest(&bytes);
        tried += 3;
    }
    eprintln!("{tried} parser inputs");
}

#[test]
fn seeded_texts_cut_like_the_whole_text() {
    let tok = TextTokenizer::load(&data("tiny/model/tokenizer.json"), 2, 1, 64).unwrap();
    let mut rng = Rng(0x7e47);
    let mut tried = 0;
    for case in 0..60 {
        for (_, text) in texts::texts(200 + rng.below(400) as usize, case) {
            let bytes = mutate(&mut rng, text.as_bytes());
            fuzzing::tokenize_cut(&tok, &bytes);
            tried += 1;
        }
    }
    for _ in 0..300 {
        let len = 1 + rng.below(200) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
        fuzzing::tokenize_cut(&tok, &bytes);
        tried += 1;
    }
    eprintln!("{tried} texts");
}
