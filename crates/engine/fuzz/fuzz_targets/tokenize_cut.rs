#![no_main]

use std::sync::LazyLock;

use embeddinggemma_engine::TextTokenizer;

/// The tiny fixture's tokenizer (same pipeline as EmbeddingGemma's), with a 64-token limit.
static TOKENIZER: LazyLock<TextTokenizer> = LazyLock::new(|| {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/tiny/model/tokenizer.json");
    TextTokenizer::load(std::path::Path::new(path), 2, 1, 64).expect("tiny tokenizer")
});

libfuzzer_sys::fuzz_target!(|data: &[u8]| embeddinggemma_engine::fuzzing::tokenize_cut(&TOKENIZER, data));
