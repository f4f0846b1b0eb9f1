//! Token-aware chunking: every chunk embeds within its budget, the chunks give the text back,
//! and cuts fall where the spec prefers, with the real EmbeddingGemma tokenizer (and the tiny
//! model's engine for the `Engine` entry point, its errors and cancellation).

mod common;
mod texts;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use common::*;
use embeddinggemma_engine::{Chunk, Chunker, Error, TextTokenizer};

fn real() -> &'static TextTokenizer {
    static TOKENIZER: OnceLock<TextTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| TextTokenizer::load(&real_model_dir().join("tokenizer.json"), 2, 1, 2048).unwrap())
}

/// The real model's prompt for a task ("none": no prompt).
fn prompt(task: &str) -> String {
    if task == "none" {
        return String::new();
    }
    let text = std::fs::read_to_string(real_model_dir().join("config_sentence_transformers.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["prompts"][task].as_str().unwrap().to_string()
}

/// Tokens `embed` sees for `prompt + body`, `<bos>` and `<eos>` included.
fn tokens(tok: &TextTokenizer, prompt: &str, body: &str) -> usize {
    tok.encode_uncut(&format!("{prompt}{body}")).unwrap().full_len
}

/// Chunks `text` and checks every property the spec promises; returns the chunks.
fn checked(tok: &TextTokenizer, task: &str, text: &str, max_tokens: usize, overlap: usize) -> Vec<Chunk> {
    let prompt = prompt(task);
    let chunker = Chunker::new(tok, task, &prompt, max_tokens, overlap).unwrap();
    let chunks = chunker.chunks(text, &never).unwrap();
    let label = format!("{task}/{max_tokens}/{overlap} on {:?}…", text.chars().take(30).collect::<String>());
    if text.is_empty() {
        assert!(chunks.is_empty(), "{label}");
        return chunks;
    }
    assert_eq!(chunks[0].start_byte, 0, "{label}");
    assert_eq!(chunks.last().unwrap().end_byte, text.len(), "{label}");
    let mut rebuilt = String::new();
    let mut prev: Option<Chunk> = None;
    for c in &chunks {
        assert!(text.is_char_boundary(c.start_byte) && text.is_char_boundary(c.end_byte), "{label}: {c:?}");
        assert_eq!(c.start_char, text[..c.start_byte].chars().count(), "{label}: {c:?}");
        assert_eq!(c.end_char - c.start_char, text[c.start_byte..c.end_byte].chars().count(), "{label}: {c:?}");
        let body = &text[c.start_byte..c.end_byte];
        let n = tokens(tok, &prompt, body);
        assert!(n <= max_tokens, "{label}: {c:?} takes {n} tokens");
        match prev {
            None => rebuilt.push_str(body),
            Some(p) => {
                assert!(
                    c.start_byte > p.start_byte && c.start_byte <= p.end_byte && c.end_byte > p.end_byte,
                    "{label}: {p:?} then {c:?}"
                );
                if overlap == 0 {
                    assert_eq!(c.start_byte, p.end_byte, "{label}");
                }
                rebuilt.push_str(&text[p.end_byte..c.end_byte]);
            }
        }
        prev = Some(*c);
    }
    assert!(rebuilt == text, "{label}: the chunks do not give the text back");
    assert_eq!(chunker.chunks(text, &never).unwrap(), chunks, "{label}: not deterministic");
    chunks
}

const COMBOS: [(&str, usize, usize); 5] =
    [("document", 512, 64), ("query", 64, 0), ("none", 128, 32), ("document", 2048, 200), ("document", 12, 0)];

#[test]
fn docstrings_fit_their_budget_and_give_the_text_back() {
    let docs = docstrings(300);
    let joined = docs.join("\n\n");
    for (task, max_tokens, overlap) in COMBOS {
        for doc in docs.iter().step_by(10) {
            checked(real(), task, doc, max_tokens, overlap);
        }
        let chunks = checked(real(), task, &joined[..joined.len().min(200_000)], max_tokens, overlap);
        assert!(chunks.len() > 1);
    }
}

#[test]
fn hard_texts_keep_every_rule() {
    let mut all = texts::texts(20_000, 5);
    all.push(("one huge word", "x".repeat(30_000)));
    all.push(("ZWJ emoji", "👩\u{200d}👩\u{200d}👧\u{200d}👦🏽".repeat(800)));
    for (label, text) in &all {
        for (task, max_tokens, overlap) in
            [("document", 64, 16), ("query", 300, 0), ("none", 2048, 500), ("none", 6, 0)]
        {
            let chunks = checked(real(), task, text, max_tokens, overlap);
            assert!(chunks.len() > 1 || max_tokens == 2048, "{label}: {} chunks", chunks.len());
        }
    }
}

#[test]
fn a_character_over_the_smallest_budget_is_refused_by_name() {
    // One token of text is the least max_tokens allows, but a rare character falls back to
    // one token per UTF-8 byte: 6 tokens hold any character, 3 do not.
    let chunker = Chunker::new(real(), "none", "", 3, 0).unwrap();
    match chunker.chunks("ab呏", &never) {
        Err(Error::InvalidOption(m)) => assert!(m.contains("\"呏\"") && m.contains("use at least 5"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(checked(real(), "none", "ab呏", 5, 0).len(), 2);
}

#[test]
fn empty_and_short_texts() {
    assert!(checked(real(), "document", "", 512, 64).is_empty());
    let text = "A short text.\n\nTwo paragraphs.";
    let chunks = checked(real(), "document", text, 512, 64);
    assert_eq!(chunks, [Chunk { start_byte: 0, end_byte: text.len(), start_char: 0, end_char: text.chars().count() }]);
}

/// The text just before each cut but the last.
fn ends<'t>(text: &'t str, chunks: &[Chunk]) -> Vec<&'t str> {
    chunks[..chunks.len() - 1]
        .iter()
        .map(|c| &text[c.start_byte.max(c.end_byte.saturating_sub(6))..c.end_byte])
        .collect()
}

#[test]
fn cuts_prefer_paragraphs_then_sentences_then_words() {
    let sentence = "The engine cuts long texts where a reader would pause. ";
    let paragraphs: String = (0..60).map(|i| format!("Paragraph {i}. {}\n\n", sentence.repeat(1 + i % 3))).collect();
    let chunks = checked(real(), "document", &paragraphs, 200, 0);
    for end in ends(&paragraphs, &chunks) {
        assert!(end.ends_with("\n\n"), "not at a paragraph break: {end:?}");
    }
    let sentences = sentence.repeat(300);
    let chunks = checked(real(), "document", &sentences, 200, 0);
    for end in ends(&sentences, &chunks) {
        assert!(end.ends_with(". "), "not at a sentence break: {end:?}");
    }
    let words = "lorem ipsum dolor sit amet ".repeat(300);
    let chunks = checked(real(), "document", &words, 200, 0);
    for (c, end) in chunks.iter().zip(ends(&words, &chunks)) {
        assert!(end.ends_with(' '), "not at a word break: {end:?}");
        let n = tokens(real(), &prompt("document"), &words[c.start_byte..c.end_byte]);
        assert!(n >= 100, "a word break kept only {n} of 200 tokens");
    }
    // A sentence break far before the budget's half is not taken: a word break is.
    let late = format!("Short. {}", "word ".repeat(400));
    let chunks = checked(real(), "document", &late, 100, 0);
    assert!(chunks[0].end_byte > 100, "{:?}", chunks[0]);
    // CJK full stops need no space after them.
    let cjk = "我们把长文本切成小块。".repeat(200);
    let chunks = checked(real(), "document", &cjk, 100, 0);
    for end in ends(&cjk, &chunks) {
        assert!(end.ends_with('。'), "not after a full stop: {end:?}");
    }
}

#[test]
fn cuts_keep_combining_marks_with_their_letter() {
    let text = "e\u{301}a\u{308}".repeat(3000);
    for (max_tokens, overlap) in [(40, 0), (64, 16)] {
        for c in checked(real(), "none", &text, max_tokens, overlap) {
            for p in [c.start_byte, c.end_byte] {
                assert!(
                    !matches!(text[p..].chars().next(), Some('\u{301}' | '\u{308}')),
                    "a cut at {p} parts a mark from its letter"
                );
            }
        }
    }
}

#[test]
fn overlap_is_about_as_asked() {
    let text = texts::PROSE.repeat(200);
    for overlap in [8, 32, 100] {
        let chunks = checked(real(), "document", &text, 256, overlap);
        for pair in chunks.windows(2) {
            let shared = &text[pair[1].start_byte..pair[0].end_byte];
            let n = tokens(real(), "", shared) - 2;
            assert!(
                n + 4 + overlap / 4 >= overlap && n <= overlap + 3,
                "asked {overlap} tokens of overlap, got {n}: {shared:?}"
            );
        }
    }
}

#[test]
fn a_megabyte_chunks_quickly() {
    let mut text = String::new();
    for (_, t) in texts::texts(100_000, 9) {
        text.push_str(&t);
    }
    text.push_str(&docstrings(1000).join("\n\n"));
    text.truncate(text.floor_char_boundary(1 << 20));
    let prompt = prompt("document");
    let chunker = Chunker::new(real(), "document", &prompt, 512, 64).unwrap();
    let started = Instant::now();
    let chunks = chunker.chunks(&text, &never).unwrap();
    let took = started.elapsed();
    eprintln!("1 MiB: {} chunks in {took:?}", chunks.len());
    assert!(took.as_secs_f64() < 30.0, "1 MiB took {took:?}");
    assert_eq!(chunks.last().unwrap().end_byte, text.len());
    assert!(chunks.windows(2).all(|p| p[1].start_byte > p[0].start_byte && p[1].end_byte > p[0].end_byte));
}

#[test]
fn the_engine_chunks_and_refuses_bad_arguments() {
    let engine = tiny_engine();
    let text = texts::PROSE.repeat(20);
    let chunks = engine.chunk(&text, "query", 64, 8, &never).unwrap();
    assert!(chunks.len() > 1 && chunks.last().unwrap().end_byte == text.len());
    for c in &chunks {
        let t = engine.tokenize(&[&text[c.start_byte..c.end_byte]], "query").unwrap();
        assert!(t[0].full_len <= 64, "{c:?}: {} tokens", t[0].full_len);
    }
    let prompt_tokens = engine.tokenize(&[""], "query").unwrap()[0].full_len - 2;
    let max = engine.info().max_seq_length;
    let invalid = |max_tokens, overlap| match engine.chunk(&text, "query", max_tokens, overlap, &never) {
        Err(Error::InvalidOption(m)) => m,
        other => panic!("max_tokens {max_tokens} overlap {overlap}: {other:?}"),
    };
    let range = format!("use {} to {max}", prompt_tokens + 3);
    assert!(invalid(prompt_tokens + 2, 0).contains(&range), "{}", invalid(prompt_tokens + 2, 0));
    assert!(invalid(max + 1, 0).contains(&range));
    assert!(invalid(64, 64).contains(&format!("use 0 to {}", (64 - prompt_tokens - 2) / 2)), "{}", invalid(64, 64));
    assert!(engine.chunk(&text, "query", prompt_tokens + 3, 0, &never).is_ok());
    assert!(matches!(engine.chunk(&text, "nope", 64, 0, &never), Err(Error::UnknownTask { .. })));
}

#[test]
fn chunking_can_be_cancelled() {
    let engine = tiny_engine();
    let text = texts::PROSE.repeat(50);
    assert!(matches!(engine.chunk(&text, "none", 32, 0, &|| true), Err(Error::Cancelled)));
    let polls = AtomicUsize::new(0);
    let after_three = || polls.fetch_add(1, Ordering::Relaxed) >= 3;
    assert!(matches!(engine.chunk(&text, "none", 32, 0, &after_three), Err(Error::Cancelled)));
    assert_eq!(polls.load(Ordering::Relaxed), 4, "cancel is polled once per chunk");
}
