//! Bad input and broken model directories: errors that name the problem, never a panic.

mod common;

use std::path::Path;

use common::*;
use embeddinggemma_engine::{sha256_file, Engine, Error, Manifest, Request};

/// A copy of the tiny model to break, and a manifest of its (unbroken) checksums.
fn tiny_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&data("tiny/model"), dir.path());
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn load(dir: &Path) -> Result<Engine, Error> {
    Engine::load(dir, &tiny_options())
}

/// Every file of the tiny model that changes its vectors.
const MODEL_FILES: [&str; 12] = [
    "model.safetensors",
    "2_Dense/model.safetensors",
    "3_Dense/model.safetensors",
    "tokenizer.json",
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "2_Dense/config.json",
    "3_Dense/config.json",
    // Read for max_seq_length, which the tiny sentence_bert_config.json leaves out.
    "tokenizer_config.json",
];

/// A manifest matching the files as they are now in `dir`.
fn manifest_of(dir: &Path) -> Manifest {
    let text: String = MODEL_FILES.iter().map(|f| format!("{}  {f}\n", sha256_file(&dir.join(f)).unwrap())).collect();
    Manifest::parse(&text).unwrap()
}

fn request(task: &str, dim: usize) -> Request<'_> {
    Request { task, dim, truncate: true }
}

#[test]
fn unknown_task_lists_the_valid_ones() {
    let err = tiny_engine().embed(&["x"], &request("Querry", 48), &never).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::UnknownTask { .. }), "{msg}");
    assert!(
        msg.contains("\"Querry\"") && msg.contains("query") && msg.contains("document") && msg.contains("none"),
        "{msg}"
    );
}

#[test]
fn invalid_dimension_lists_the_valid_ones() {
    let engine = tiny_engine();
    for dim in [0usize, 47, 49, 768] {
        let err = engine.embed(&["x"], &request("none", dim), &never).unwrap_err();
        assert!(matches!(err, Error::InvalidDim { .. }), "{err}");
        assert!(err.to_string().contains("valid dimensions: 48"), "{err}");
    }
    assert!(engine.check_dim(-1).is_err());
}

#[test]
fn refusing_long_texts_names_their_length() {
    let long = "word ".repeat(200);
    let err = tiny_engine()
        .embed(&["short", &long], &Request { task: "none", dim: 48, truncate: false }, &never)
        .unwrap_err();
    match err {
        Error::TooLong { index, tokens, limit } => {
            assert_eq!((index, limit), (1, 64));
            assert!(tokens > 64, "{tokens}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn empty_input_list_embeds_nothing() {
    let (vectors, stats) = tiny_engine().embed(&[], &request("query", 48), &never).unwrap();
    assert!(vectors.is_empty());
    assert_eq!(stats.forward_passes, 0);
}

#[test]
fn cancel_stops_with_cancelled() {
    let err = tiny_engine().embed(&["x", "y"], &request("none", 48), &|| true).unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
}

#[test]
fn missing_directory_or_file_is_named() {
    let err = load(Path::new("/nonexistent/model")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/model"), "{err}");

    for file in ["config.json", "tokenizer.json", "2_Dense/model.safetensors", "sentence_bert_config.json"] {
        let dir = tiny_copy();
        std::fs::remove_file(dir.path().join(file)).unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(err.to_string().contains(file), "{file}: {err}");
    }
}

#[test]
fn wrong_checksum_names_the_file_and_both_hashes() {
    let dir = tiny_copy();
    let path = dir.path().join("tokenizer.json");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let err = load(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Checksum { .. }), "{msg}");
    assert!(msg.contains("tokenizer.json") && msg.contains("74899acb"), "{msg}");
}

#[test]
fn the_real_model_checksums_refuse_other_weights() {
    // The default manifest is the published one: the tiny model's files do not match it.
    let options = embeddinggemma_engine::EngineOptions { checksums: Manifest::embeddinggemma_300m(), ..tiny_options() };
    let err = Engine::load(&data("tiny/model"), &options).unwrap_err();
    assert!(matches!(err, Error::Checksum { .. }), "{err}");
}

#[test]
fn a_manifest_must_cover_every_loaded_file() {
    let partial = Manifest::parse(&format!(
        "{}  model.safetensors\n",
        sha256_file(&data("tiny/model/model.safetensors")).unwrap()
    ))
    .unwrap();
    let options = embeddinggemma_engine::EngineOptions { checksums: partial, ..tiny_options() };
    let err = Engine::load(&data("tiny/model"), &options).unwrap_err();
    assert!(err.to_string().contains("no sha256 is known"), "{err}");
}

#[test]
fn the_tiny_manifest_lists_every_file_that_changes_vectors() {
    let m = Manifest::from_file(&data("tiny/SHA256SUMS")).unwrap();
    for f in MODEL_FILES {
        assert!(m.covers(f), "{f}");
    }
}

#[test]
fn a_changed_prompt_is_refused_by_the_checksum() {
    let dir = tiny_copy();
    let path = dir.path().join("config_sentence_transformers.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("task: search result | query: "), "{text}");
    std::fs::write(&path, text.replace("task: search result | query: ", "task: anything | query: ")).unwrap();
    let err = load(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Checksum { .. }), "{msg}");
    assert!(msg.contains("config_sentence_transformers.json"), "{msg}");
    // Unchanged, the same copy loads.
    std::fs::write(&path, text).unwrap();
    load(dir.path()).unwrap();
}

#[test]
fn every_config_file_read_must_be_covered() {
    let dir = tiny_copy();
    for file in [
        "config.json",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
        "1_Pooling/config.json",
        "3_Dense/config.json",
        "tokenizer_config.json",
    ] {
        let text: String = MODEL_FILES
            .iter()
            .filter(|f| **f != file)
            .map(|f| format!("{}  {f}\n", sha256_file(&dir.path().join(f)).unwrap()))
            .collect();
        let options =
            embeddinggemma_engine::EngineOptions { checksums: Manifest::parse(&text).unwrap(), ..tiny_options() };
        let err = Engine::load(dir.path(), &options).unwrap_err();
        assert!(err.to_string().contains("no sha256 is known") && err.to_string().contains(file), "{file}: {err}");
    }
}

#[test]
fn a_module_path_outside_the_directory_is_refused() {
    let err = load_corrupted("modules.json", |p| {
        let text = std::fs::read_to_string(p).unwrap().replace("\"2_Dense\"", "\"../2_Dense\"");
        std::fs::write(p, text).unwrap();
    });
    assert!(err.to_string().contains("leaves the model directory"), "{err}");
}

/// Corrupt files whose checksums were (re)computed: the loader itself must refuse them.
fn load_corrupted(file: &str, corrupt: impl FnOnce(&Path)) -> Error {
    let dir = tiny_copy();
    corrupt(&dir.path().join(file));
    let options = embeddinggemma_engine::EngineOptions { checksums: manifest_of(dir.path()), ..tiny_options() };
    Engine::load(dir.path(), &options).unwrap_err()
}

/// A file of the model directory, and how to corrupt it.
type Corruption = (&'static str, Box<dyn FnOnce(&Path)>);

#[test]
fn corrupt_model_files_are_errors_naming_them() {
    let cases: Vec<Corruption> = vec![
        (
            "model.safetensors",
            Box::new(|p: &Path| {
                let bytes = std::fs::read(p).unwrap();
                std::fs::write(p, &bytes[..bytes.len() / 2]).unwrap();
            }),
        ),
        (
            "model.safetensors",
            Box::new(|p: &Path| std::fs::write(p, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap()),
        ),
        ("2_Dense/model.safetensors", Box::new(|p: &Path| std::fs::write(p, b"").unwrap())),
        ("tokenizer.json", Box::new(|p: &Path| std::fs::write(p, b"{not json").unwrap())),
        ("config.json", Box::new(|p: &Path| std::fs::write(p, b"{\"hidden_size\": 48}").unwrap())),
        (
            "config.json",
            Box::new(|p: &Path| {
                let text = std::fs::read_to_string(p)
                    .unwrap()
                    .replace("\"use_bidirectional_attention\": true", "\"use_bidirectional_attention\": false");
                std::fs::write(p, text).unwrap();
            }),
        ),
        ("modules.json", Box::new(|p: &Path| std::fs::write(p, b"[]").unwrap())),
        (
            "config.json",
            Box::new(|p: &Path| {
                let text = std::fs::read_to_string(p).unwrap().replacen(
                    "\"rope_type\": \"default\"",
                    "\"rope_type\": \"linear\", \"factor\": 2.0",
                    1,
                );
                std::fs::write(p, text).unwrap();
            }),
        ),
    ];
    for (file, corrupt) in cases {
        let err = load_corrupted(file, corrupt);
        assert!(matches!(err, Error::ModelFile { .. }), "{file}: {err}");
        assert!(err.to_string().contains(file.rsplit('/').next().unwrap()), "{file}: {err}");
    }
}

#[test]
fn wrong_tensor_shape_is_named() {
    // The same weights under a config that declares another width.
    let err = load_corrupted("config.json", |p| {
        let text =
            std::fs::read_to_string(p).unwrap().replace("\"intermediate_size\": 96", "\"intermediate_size\": 97");
        std::fs::write(p, text).unwrap();
    });
    let msg = err.to_string();
    assert!(msg.contains("model.safetensors") && msg.contains("mlp") && msg.contains("shape"), "{msg}");
}
