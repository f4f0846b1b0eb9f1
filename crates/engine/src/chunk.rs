//! Token-aware chunking: cuts a text into pieces that each embed, with a task's prompt, within
//! a token budget, cut preferably at paragraph, then sentence, then word breaks (`breaks`).
//!
//! BPE is not additive (a cut can split or join tokens), so token positions taken from a window
//! are estimates only: every chunk is checked by tokenizing `prompt + body` as `embed` does, and
//! cut shorter while it is over. Only a window from the chunk's start is tokenized, doubled
//! until it holds more than the budget, so the work is linear in the text and the memory
//! bounded by the window whatever the text's size.

mod breaks;

use crate::error::{Error, Result};
use crate::tokenize::{Cancel, TextTokenizer};

/// Tokens a window holds past the budget: the last ones may be cut short by its edge.
const WINDOW_MARGIN: usize = 8;

/// Smallest window tokenized, in bytes.
const MIN_WINDOW_BYTES: usize = 256;

/// One chunk of a text: bytes `start_byte..end_byte`, which are characters (Unicode scalar
/// values, counted from 0) `start_char..end_char`. PostgreSQL's
/// `substr(text, start_char + 1, end_char - start_char)` gives the body back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Chunk {
    pub start_byte: usize,
    pub end_byte: usize,
    pub start_char: usize,
    pub end_char: usize,
}

/// Checked chunking settings for one task; `chunks` and `for_each` cut texts with them.
///
/// Chunks cover the text in order: the first starts at 0, the last ends at its end, and each
/// starts after the previous one's start, at most at its end (exactly there when `overlap` is
/// 0), and ends after it. Whitespace stays inside chunks. An empty text has no chunks.
pub struct Chunker<'a> {
    tokenizer: &'a TextTokenizer,
    task: String,
    prompt: &'a str,
    max_tokens: usize,
    overlap: usize,
    /// Tokens of text a chunk holds by estimate: `max_tokens` less the prompt's, `<bos>`, `<eos>`.
    budget: usize,
}

/// Token spans of a window of the text, in offsets of the whole text.
struct Window {
    spans: Vec<(usize, usize)>,
    reaches_end: bool,
}

impl Window {
    /// Tokens of the window that end at or before byte `p`.
    fn tokens_to(&self, p: usize) -> usize {
        self.spans.partition_point(|s| s.1 <= p)
    }
}

/// Char offsets of byte offsets, counted from the last one asked: chunks step back a little
/// for the overlap, then on, so counting stays linear in the text.
#[derive(Default)]
struct CharCursor {
    byte: usize,
    char: usize,
}

impl CharCursor {
    fn at(&mut self, text: &str, byte: usize) -> usize {
        if byte >= self.byte {
            self.char += text[self.byte..byte].chars().count();
        } else {
            self.char -= text[byte..self.byte].chars().count();
        }
        self.byte = byte;
        self.char
    }
}

impl<'a> Chunker<'a> {
    /// `max_tokens` must leave room for one token of text beside the prompt, `<bos>` and
    /// `<eos>`, and be at most the model's limit; `overlap` at most half the text's budget.
    pub fn new(
        tokenizer: &'a TextTokenizer,
        task: &str,
        prompt: &'a str,
        max_tokens: usize,
        overlap: usize,
    ) -> Result<Chunker<'a>> {
        let prompt_tokens = tokenizer.encode_uncut(prompt)?.full_len - 2;
        let (least, most) = (prompt_tokens + 3, tokenizer.max_len());
        if max_tokens < least {
            return Err(Error::InvalidOption(format!(
                "max_tokens {max_tokens} is below the {task:?} prompt's {prompt_tokens} tokens plus <bos>/<eos> and one token of text: use {least} to {most}"
            )));
        }
        if max_tokens > most {
            return Err(Error::InvalidOption(format!(
                "max_tokens {max_tokens} is over the model's limit of {most} tokens: use {least} to {most}"
            )));
        }
        let budget = max_tokens - prompt_tokens - 2;
        if overlap > budget / 2 {
            return Err(Error::InvalidOption(format!(
                "overlap {overlap} is over half of the {budget} tokens of text a chunk of max_tokens {max_tokens} holds beside the {task:?} prompt: use 0 to {}",
                budget / 2
            )));
        }
        Ok(Chunker { tokenizer, task: task.to_string(), prompt, max_tokens, overlap, budget })
    }

    /// The chunks of `text`, in order; `cancel` is polled between chunks.
    pub fn chunks(&self, text: &str, cancel: Cancel) -> Result<Vec<Chunk>> {
        self.chunks_up_to(text, cancel, usize::MAX)
    }

    /// `chunks`, refusing (`Error::InvalidOption`) a text of more than `most` chunks as soon as
    /// it finds one more, so that what it holds stays bounded.
    pub fn chunks_up_to(&self, text: &str, cancel: Cancel, most: usize) -> Result<Vec<Chunk>> {
        let mut chunks = Vec::new();
        self.for_each(text, cancel, |c| {
            if chunks.len() == most {
                return Err(Error::InvalidOption(format!("the text has more than {most} chunks: raise max_tokens")));
            }
            chunks.try_reserve(1).map_err(|e| Error::out_of_memory(format!("{} chunks: {e}", chunks.len() + 1)))?;
            chunks.push(c);
            Ok(())
        })?;
        Ok(chunks)
    }

    /// `chunks`, handing each chunk to `emit` as it is found (an error from it ends the call).
    pub fn for_each(&self, text: &str, cancel: Cancel, mut emit: impl FnMut(Chunk) -> Result<()>) -> Result<()> {
        let mut chars = CharCursor::default();
        let mut window_bytes = MIN_WINDOW_BYTES.max(4 * (self.budget + WINDOW_MARGIN));
        // `floor`: the previous chunk's end, which the next one must pass.
        let (mut start, mut floor) = (0, 0);
        while start < text.len() {
            if cancel() {
                return Err(Error::Cancelled);
            }
            let window = self.window(text, start, &mut window_bytes)?;
            let Some(end) = self.cut(text, start, floor, &window)? else {
                // The overlap left no room to end past the previous chunk: start at its end.
                start = floor;
                continue;
            };
            let (start_char, end_char) = (chars.at(text, start), chars.at(text, end));
            emit(Chunk { start_byte: start, end_byte: end, start_char, end_char })?;
            if end == text.len() {
                break;
            }
            start = self.next_start(text, start, end, &window);
            floor = end;
        }
        Ok(())
    }

    /// Tokens of `text` from `start`, over more than the budget unless they reach the end;
    /// `bytes` carries the window size from one chunk to the next.
    fn window(&self, text: &str, start: usize, bytes: &mut usize) -> Result<Window> {
        let wanted = self.budget + WINDOW_MARGIN;
        loop {
            let end = breaks::ceil_char(text, start.saturating_add(*bytes).min(text.len()).max(start + 1));
            let spans: Vec<(usize, usize)> = self
                .tokenizer
                .token_spans(&text[start..end])?
                .into_iter()
                .map(|(a, b)| (start + a, start + b))
                .collect();
            if spans.len() > wanted {
                // The next chunk's first try: about the bytes this one's tokens took.
                *bytes = ((spans[wanted].1 - start) * 5 / 4).max(MIN_WINDOW_BYTES);
                return Ok(Window { spans, reaches_end: end == text.len() });
            }
            if end == text.len() {
                return Ok(Window { spans, reaches_end: true });
            }
            *bytes = bytes.saturating_mul(2);
        }
    }

    /// Tokens `embed` gives `prompt + text[start..end]`, `<bos>` and `<eos>` included.
    fn tokens(&self, text: &str, start: usize, end: usize) -> Result<usize> {
        let mut s = String::with_capacity(self.prompt.len() + end - start);
        s.push_str(self.prompt);
        s.push_str(&text[start..end]);
        Ok(self.tokenizer.encode_uncut(&s)?.full_len)
    }

    /// Where the chunk from `start` ends: past `floor`, at the best break whose body fits.
    /// None when nothing past `floor` fits (only when the chunk overlaps the previous one).
    fn cut(&self, text: &str, start: usize, floor: usize, w: &Window) -> Result<Option<usize>> {
        if w.reaches_end && self.tokens(text, start, text.len())? <= self.max_tokens {
            return Ok(Some(text.len()));
        }
        // A preferred break must keep about half the budget.
        let half = match (self.budget / 2).min(w.spans.len()) {
            0 => start,
            n => w.spans[n - 1].1,
        };
        let low = half.max(floor + 1).max(start + 1);
        let mut keep = self.budget.min(w.spans.len());
        while keep > 0 {
            let limit = w.spans[keep - 1].1;
            if limit <= floor {
                break;
            }
            let end = breaks::best(text, start, low, limit, floor);
            let tokens = self.tokens(text, start, end)?;
            if tokens <= self.max_tokens {
                return Ok(Some(end));
            }
            keep = (keep - 1).min(w.tokens_to(end).saturating_sub(tokens - self.max_tokens));
        }
        if start < floor {
            return Ok(None);
        }
        // Not one token of the window fits: one character alone, if it does.
        let end = breaks::ceil_char(text, start + 1);
        let tokens = self.tokens(text, start, end)?;
        if tokens <= self.max_tokens {
            return Ok(Some(end));
        }
        Err(Error::InvalidOption(format!(
            "max_tokens {} cannot hold the character {:?} at byte {start} beside the {:?} prompt: it takes {tokens} tokens with them; use at least {tokens}",
            self.max_tokens,
            &text[start..end],
            self.task
        )))
    }

    /// Where the chunk after `start..end` starts: about `overlap` tokens before `end`, at a
    /// word start when that stretch has one, always after `start`.
    fn next_start(&self, text: &str, start: usize, end: usize, w: &Window) -> usize {
        if self.overlap == 0 {
            return end;
        }
        let inside = w.tokens_to(end);
        let first = inside.saturating_sub(self.overlap).max(1);
        let target = w.spans.get(first..inside).and_then(|s| s.iter().map(|s| s.0).find(|&p| p > start && p < end));
        match target {
            Some(target) => {
                breaks::word_start(text, target, end).unwrap_or_else(|| breaks::settle(text, target, start))
            }
            None => end,
        }
    }
}
