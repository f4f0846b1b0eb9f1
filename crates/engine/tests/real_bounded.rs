//! The cut before tokenizing, checked with the real EmbeddingGemma tokenizer.

mod common;
mod texts;

use common::*;
use embeddinggemma_engine::TextTokenizer;
use texts::*;

fn real_tokenizer(max_len: usize) -> TextTokenizer {
    TextTokenizer::load(&real_model_dir().join("tokenizer.json"), 2, 1, max_len).unwrap()
}

#[test]
fn the_real_tokenizer_is_covered_by_the_boundary_rule() {
    assert!(real_tokenizer(2048).proves_cuts());
}

#[test]
fn real_cut_texts_keep_the_ids_of_the_whole_text() {
    let tok = real_tokenizer(2048);
    for seed in 1..=2 {
        for bytes in [70_000, 400_000] {
            for (label, text) in texts(bytes, seed) {
                for prompt in ["", "title: none | text: "] {
                    assert_cut_matches_whole(&tok, prompt, label, &text);
                }
            }
        }
    }
}

#[test]
fn real_cuts_at_a_small_limit_agree_on_many_random_texts() {
    // A low limit puts the kept tokens close to the cut, where a wrong cut would show.
    let tok = real_tokenizer(64);
    let mut rng = Rng(4242);
    for case in 0..400 {
        let all = texts(2100 + rng.below(4000) as usize, case);
        let (label, text) = rng.pick(&all);
        assert_cut_matches_whole(&tok, "", label, text);
    }
}

#[test]
fn real_hard_boundaries_are_boundaries_of_the_whole_text() {
    let tok = real_tokenizer(1 << 30);
    let mut total = 0;
    for (label, text) in texts(500, 3) {
        total += assert_hard_boundaries_hold(&tok, label, &text, 3);
    }
    assert!(total > 100, "only {total} hard boundaries found");
}
