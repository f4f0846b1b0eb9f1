//! Bounded work per text: a text cut before tokenizing keeps exactly the ids of the whole text.

mod common;
mod texts;

use common::*;
use embeddinggemma_engine::TextTokenizer;
use texts::*;

fn tiny_tokenizer() -> TextTokenizer {
    TextTokenizer::load(&data("tiny/model/tokenizer.json"), 2, 1, 64).unwrap()
}

#[test]
fn the_tiny_tokenizer_is_covered_by_the_boundary_rule() {
    assert!(tiny_tokenizer().proves_cuts());
}

#[test]
fn cut_texts_keep_the_ids_of_the_whole_text() {
    let tok = tiny_tokenizer();
    for seed in 1..=3 {
        for bytes in [3_000, 20_000, 150_000] {
            for (label, text) in texts(bytes, seed) {
                for prompt in ["", "task: search result | query: "] {
                    assert_cut_matches_whole(&tok, prompt, label, &text);
                }
            }
        }
    }
}

#[test]
fn random_texts_around_the_cut_size_agree() {
    let tok = tiny_tokenizer();
    let mut rng = Rng(99);
    for case in 0..300 {
        let all = texts(1000 + rng.below(6000) as usize, case);
        let (label, text) = rng.pick(&all);
        assert_cut_matches_whole(&tok, "", label, text);
    }
}

#[test]
fn hard_boundaries_are_boundaries_of_the_whole_text() {
    // The lemma itself, checked at every 7th position of short texts of each kind.
    let big = TextTokenizer::load(&data("tiny/model/tokenizer.json"), 2, 1, 1 << 30).unwrap();
    let mut total = 0;
    for (label, text) in texts(600, 5) {
        total += assert_hard_boundaries_hold(&big, label, &text, 7);
    }
    assert!(total > 50, "only {total} hard boundaries found");
}

#[test]
fn a_huge_text_costs_about_what_a_full_one_does() {
    let tok = TextTokenizer::load(&data("tiny/model/tokenizer.json"), 2, 1, 2048).unwrap();
    let huge = PROSE.repeat((64 << 20) / PROSE.len());
    let started = std::time::Instant::now();
    let t = tok.encode("", &huge, &never).unwrap();
    let elapsed = started.elapsed();
    assert_eq!(t.ids.len(), 2048);
    assert!(t.truncated());
    // Tokenizing all 64 MB takes tens of seconds and gigabytes; the cut reads ~100 kB.
    assert!(elapsed.as_millis() < 2000, "{elapsed:?}");
    let head = &huge[..200_000];
    assert_eq!(t.ids, tok.encode_uncut(head).unwrap().ids);
}

#[test]
fn cancel_is_polled_while_tokenizing_a_long_text() {
    let tok = tiny_tokenizer();
    let huge = "a".repeat(10 << 20);
    let err = tok.encode("", &huge, &|| true).unwrap_err();
    assert!(matches!(err, embeddinggemma_engine::Error::Cancelled), "{err}");
}
