//! Where a chunk may end: paragraph, sentence and word breaks, and which characters should
//! not be parted from the one before them (combining marks, emoji joiners and modifiers).
//!
//! Every break is a byte offset on a character boundary. Paragraph, sentence and word breaks
//! sit at the start of a word, after the whitespace (which so stays in the earlier chunk);
//! a sentence break also sits right after a CJK full stop, which needs no space.

/// Bytes back from a token boundary searched for a place that parts no characters.
const SETTLE_CHARS: usize = 32;

pub(super) fn ceil_char(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

fn is_terminator(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '…' | '。' | '！' | '？' | '｡')
}

fn is_cjk_stop(c: char) -> bool {
    matches!(c, '。' | '！' | '？' | '｡')
}

/// Closing quotes and brackets, which may follow a sentence's terminator.
fn is_closer(c: char) -> bool {
    matches!(c, '"' | '\'' | ')' | ']' | '}' | '»' | '”' | '’' | '」' | '』' | '）' | '】')
}

/// Characters that belong with the one before them: the common blocks of nonspacing and
/// enclosing marks (Mn, Me) and Indic vowel signs, joiners, variation selectors, skin tones
/// and emoji tags. A cheap table, not the whole Unicode category.
fn joins_previous(c: char) -> bool {
    let c = c as u32;
    let indic = (0x0900..0x0D80).contains(&c) && {
        let o = c & 0x7F;
        matches!(o, 0x00..=0x03 | 0x3A..=0x3C | 0x3E..=0x4F | 0x51..=0x57 | 0x62..=0x63)
    };
    indic
        || matches!(
            c,
            0x0300..=0x036F
                | 0x0483..=0x0489
                | 0x0591..=0x05BD
                | 0x0610..=0x061A
                | 0x064B..=0x065F
                | 0x0670
                | 0x06D6..=0x06ED
                | 0x0E31
                | 0x0E34..=0x0E3A
                | 0x0E47..=0x0E4E
                | 0x1AB0..=0x1AFF
                | 0x1DC0..=0x1DFF
                | 0x200C..=0x200D
                | 0x20D0..=0x20FF
                | 0x302A..=0x302F
                | 0x3099..=0x309A
                | 0xFE00..=0xFE0F
                | 0xFE20..=0xFE2F
                | 0x1F3FB..=0x1F3FF
                | 0xE0020..=0xE007F
                | 0xE0100..=0xE01EF
        )
}

/// Whether a cut at `p` parts a character from one that joins it.
fn parts_cluster(text: &str, p: usize) -> bool {
    text[p..].chars().next().is_some_and(joins_previous) || text[..p].ends_with('\u{200D}')
}

/// `p`, or a little before it (never at or before `floor`) where no cluster is parted; `p`
/// when there is no such place near.
pub(super) fn settle(text: &str, p: usize, floor: usize) -> usize {
    let mut q = p;
    for _ in 0..SETTLE_CHARS {
        if !parts_cluster(text, q) {
            return q;
        }
        match text[..q].char_indices().next_back() {
            Some((prev, _)) if prev > floor => q = prev,
            _ => break,
        }
    }
    p
}

/// The last break of each kind in `low..=limit`, scanning from the chunk's `start` for context.
#[derive(Default)]
struct Breaks {
    paragraph: Option<usize>,
    sentence: Option<usize>,
    word: Option<usize>,
}

impl Breaks {
    fn scan(text: &str, start: usize, low: usize, limit: usize) -> Breaks {
        let mut found = Breaks::default();
        // The whitespace run before the current position: its newlines, and whether a
        // sentence ended just before it.
        let (mut in_space, mut newlines, mut run_after_terminator) = (false, 0, false);
        let (mut after_terminator, mut prev) = (false, None);
        let end = ceil_char(text, limit + 1);
        for (i, c) in text[start..end].char_indices() {
            let p = start + i;
            let space = c.is_whitespace();
            if (low..=limit).contains(&p) {
                if in_space && !space {
                    found.word = Some(p);
                    if newlines >= 2 {
                        found.paragraph = Some(p);
                    }
                    if run_after_terminator {
                        found.sentence = Some(p);
                    }
                }
                if !space && prev.is_some_and(is_cjk_stop) {
                    found.sentence = Some(p);
                }
            }
            if space {
                if !in_space {
                    (in_space, newlines, run_after_terminator) = (true, 0, after_terminator);
                }
                newlines += (c == '\n') as usize;
            } else {
                in_space = false;
                after_terminator = is_terminator(c) || (after_terminator && is_closer(c));
            }
            prev = Some(c);
        }
        found
    }
}

/// The end of a chunk from `start`: the last break in `low..=limit` of the most preferred
/// kind, else the token boundary `limit` (moved back off a cluster, staying past `floor`).
pub(super) fn best(text: &str, start: usize, low: usize, limit: usize, floor: usize) -> usize {
    let found = Breaks::scan(text, start, low, limit);
    found.paragraph.or(found.sentence).or(found.word).unwrap_or_else(|| settle(text, limit, floor))
}

/// The first word start in `from..end` (after whitespace, before a non-space).
pub(super) fn word_start(text: &str, from: usize, end: usize) -> Option<usize> {
    let mut after_space = text[..from].chars().next_back().is_some_and(char::is_whitespace);
    for (i, c) in text[from..end].char_indices() {
        if after_space && !c.is_whitespace() {
            return Some(from + i);
        }
        after_space = c.is_whitespace();
    }
    None
}
