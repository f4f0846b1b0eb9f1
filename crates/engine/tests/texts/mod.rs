//! Generated texts of every kind that matters to the cut, and the checks the cut must pass.
#![allow(dead_code)]

use embeddinggemma_engine::TextTokenizer;

fn never() -> bool {
    false
}

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

fn char_in(rng: &mut Rng, lo: u32, hi: u32) -> char {
    loop {
        if let Some(c) = char::from_u32(lo + rng.below((hi - lo) as u64) as u32) {
            return c;
        }
    }
}

pub const PROSE: &str = "EmbeddingGemma turns text into vectors. The engine truncates long texts to 2048 tokens, \
keeping <eos> last; a PostgreSQL backend must never spend more on a text than one full sequence costs.\n\n";

/// Texts of every kind that exceed the limit when `bytes` is large enough.
pub fn texts(bytes: usize, seed: u64) -> Vec<(&'static str, String)> {
    let mut rng = Rng(seed | 1);
    let mut out = Vec::new();
    let fill = |f: &mut dyn FnMut(&mut String)| {
        let mut s = String::new();
        while s.len() < bytes {
            f(&mut s);
        }
        s
    };
    out.push(("prose", fill(&mut |s| s.push_str(PROSE))));
    let words = ["the", "a", "vector", "tokens,", "PostgreSQL", "of", "über", "naïve", "3.14", "x"];
    out.push((
        "random words",
        fill(&mut |s| {
            s.push_str(rng.pick::<&str>(&words));
            s.push_str(rng.pick::<&str>(&[" ", " ", " ", "  ", "\n", ". "]));
        }),
    ));
    out.push(("one letter", "a".repeat(bytes)));
    out.push(("one word", fill(&mut |s| s.push_str("abcdefghij"))));
    let mut r2 = Rng(seed.wrapping_add(7) | 1);
    out.push(("random letters", fill(&mut |s| s.push(char_in(&mut r2, 'a' as u32, 'z' as u32 + 1)))));
    out.push(("spaces", " ".repeat(bytes)));
    out.push(("newlines", "\n".repeat(bytes)));
    let mut r3 = Rng(seed.wrapping_add(11) | 1);
    out.push((
        "whitespace runs",
        fill(&mut |s| {
            let c = *r3.pick(&[' ', '\n', '\t', '\r']);
            for _ in 0..r3.below(40) {
                s.push(c);
            }
            if r3.below(3) == 0 {
                s.push('w');
            }
        }),
    ));
    let mut r4 = Rng(seed.wrapping_add(13) | 1);
    out.push((
        "CJK",
        fill(&mut |s| {
            s.push(char_in(&mut r4, 0x4E00, 0x9FFF));
            if r4.below(20) == 0 {
                s.push('。');
            }
        }),
    ));
    let mut r5 = Rng(seed.wrapping_add(17) | 1);
    out.push((
        "emoji and combining marks",
        fill(&mut |s| match r5.below(4) {
            0 => s.push(char_in(&mut r5, 0x1F300, 0x1FAFF)),
            1 => {
                s.push('e');
                s.push(char_in(&mut r5, 0x0300, 0x036F));
            }
            2 => s.push_str("👩\u{200d}👩\u{200d}👧"),
            _ => s.push_str("🇫🇷 "),
        }),
    ));
    let mut r6 = Rng(seed.wrapping_add(19) | 1);
    out.push((
        "random unicode with controls",
        fill(&mut |s| match r6.below(5) {
            0 => s.push(char_in(&mut r6, 0, 0x20)),
            1 => s.push(char_in(&mut r6, 0x20, 0x800)),
            2 => s.push(char_in(&mut r6, 0x800, 0x10000)),
            3 => s.push(char_in(&mut r6, 0x10000, 0x110000)),
            _ => s.push(' '),
        }),
    ));
    let mut r7 = Rng(seed.wrapping_add(23) | 1);
    out.push((
        "special token strings",
        fill(&mut |s| {
            s.push_str(r7.pick::<&str>(&[
                "<eos>",
                "<bos>",
                "<pad>",
                "<unk>",
                "<0x41>",
                "<mask>",
                "<unused0>",
                "<start_of_turn>",
                "<",
                "eos>",
                " ",
                "a",
            ]));
        }),
    ));
    out
}

/// The cut path keeps exactly the ids of tokenizing the whole text, and says it truncated.
pub fn assert_cut_matches_whole(tok: &TextTokenizer, prompt: &str, label: &str, text: &str) {
    let cut = tok.encode(prompt, text, &never).unwrap();
    let whole = tok.encode_uncut(&format!("{prompt}{text}")).unwrap();
    assert_eq!(cut.ids, whole.ids, "{label} ({} bytes): kept ids differ", text.len());
    assert_eq!(cut.truncated(), whole.truncated(), "{label}");
    if whole.truncated() {
        assert!(
            cut.full_len > tok.max_len() && cut.full_len <= whole.full_len,
            "{label}: {} vs {}",
            cut.full_len,
            whole.full_len
        );
    } else {
        assert_eq!(cut.full_len, whole.full_len, "{label}");
    }
}

/// Every position the rule calls hard really is one: the ids of the text before it are the
/// first ids of the whole text.
pub fn assert_hard_boundaries_hold(tok: &TextTokenizer, label: &str, text: &str, step: usize) -> usize {
    let all = tokens_of(tok, text);
    let mut found = 0;
    let mut p = 1;
    while p < text.len() {
        if tok.is_hard_boundary(text, p) {
            found += 1;
            let left = tokens_of(tok, &text[..p]);
            let n = left.len() - 1; // without <eos>
            assert!(n <= all.len() && left[..n] == all[..n], "{label}: position {p} is not a boundary");
        }
        p += step;
        while p < text.len() && !text.is_char_boundary(p) {
            p += 1;
        }
    }
    found
}

/// All ids of a text; `tok` must have a limit no text here reaches.
fn tokens_of(tok: &TextTokenizer, text: &str) -> Vec<u32> {
    let t = tok.encode_uncut(text).unwrap();
    assert!(!t.truncated());
    t.ids
}
