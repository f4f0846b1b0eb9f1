//! Text → token ids exactly as sentence-transformers does it: `<bos>` + tokens(prompt + text)
//! + `<eos>`, truncated to the model limit with `<eos>` kept last.
//!
//! A text far over the limit is cut before tokenizing, so that any text costs about as much as
//! one that just fills the model. The cut is placed at a *hard boundary*: a position p that no
//! step of the tokenizer can join across. For the pipeline this module accepts (added-token
//! split, char-local `Replace` normalizer, single-character `Split` pre-tokenizer, BPE with
//! complete byte fallback), p is hard when
//!   - no added token occurs in the text touching p, and
//!   - no merge (A, B) exists with A a vocabulary token ending at p and B one starting at p
//!     (in the normalized text).
//!
//! Every symbol BPE builds is a vocabulary token over a substring of the normalized text (byte
//! fallback symbols never merge: checked at load), and a symbol spanning p would have been
//! made by a merge of two symbols meeting at p. So no symbol spans p, and BPE on the part left
//! of p runs exactly as it runs on that part alone: merges are applied in (rank, position)
//! order and those left of p only ever see symbols left of p. Hence the tokens of `text[..p]`
//! are the first tokens of the whole text, and when they reach the limit the kept ids are
//! exactly those of the whole text. Tokenizers outside that pipeline, and texts without a hard
//! boundary near the cut (e.g. one letter repeated), fall back to comparing the ids of two
//! cuts, the second twice as long, growing until they agree.

use std::collections::HashMap;
use std::path::Path;

use aho_corasick::AhoCorasick;
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::Value;
use tokenizers::{Model, Tokenizer};

use crate::error::{Error, Result};

/// The caller's cancel check, polled per text and between the steps of a long text.
pub type Cancel<'a> = &'a (dyn Fn() -> bool + Sync);

/// Characters around a cut searched for a hard boundary.
const BOUNDARY_SCAN_CHARS: usize = 256;

pub struct TextTokenizer {
    inner: Tokenizer,
    eos: u32,
    max_len: usize,
    proof: Option<BoundaryProof>,
    /// Raw bytes one token can cover at most (`usize::MAX` when unknown).
    token_bytes: usize,
}

/// What deciding a hard boundary needs to know about the tokenizer.
struct BoundaryProof {
    /// The normalizer as per-character replacements, applied in order.
    replace: Vec<(char, String)>,
    /// Merge pairs as `left id << 32 | right id`, sorted.
    merges: Vec<u64>,
    /// Longest vocabulary token, in normalized bytes.
    max_token_bytes: usize,
    added: Option<AhoCorasick>,
    max_added_bytes: usize,
}

/// One text's ids after truncation, and how many it had before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedText {
    pub ids: Vec<u32>,
    /// Ids of the whole text before truncation. For a text cut before tokenizing this is a
    /// lower bound, still above the limit, so `truncated()` stays right.
    pub full_len: usize,
}

impl TokenizedText {
    pub fn truncated(&self) -> bool {
        self.full_len > self.ids.len()
    }
}

#[derive(Deserialize)]
struct RawFile {
    normalizer: Option<Value>,
    pre_tokenizer: Option<Value>,
    #[serde(default)]
    added_tokens: Vec<RawAdded>,
    model: RawModel,
}

#[derive(Deserialize)]
struct RawAdded {
    content: String,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default)]
    normalized: bool,
}

#[derive(Deserialize)]
struct RawModel {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    vocab: HashMap<String, u32>,
    #[serde(default)]
    merges: Vec<RawMerge>,
    #[serde(default)]
    byte_fallback: bool,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    dropout: Option<f32>,
    #[serde(default)]
    ignore_merges: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawMerge {
    Pair(String, String),
    Joined(String),
}

fn single_char(s: &str) -> Option<char> {
    let mut chars = s.chars();
    chars.next().filter(|_| chars.next().is_none())
}

/// `Replace` normalizers of one character by a non-empty string, alone or in a `Sequence`.
fn char_replacements(normalizer: &Option<Value>) -> Option<Vec<(char, String)>> {
    let Some(n) = normalizer.as_ref().filter(|n| !n.is_null()) else {
        return Some(Vec::new());
    };
    let one = |n: &Value| -> Option<(char, String)> {
        if n.get("type")?.as_str()? != "Replace" {
            return None;
        }
        let from = single_char(n.get("pattern")?.get("String")?.as_str()?)?;
        let to = n.get("content")?.as_str()?;
        (!to.is_empty()).then(|| (from, to.to_string()))
    };
    match n.get("type")?.as_str()? {
        "Sequence" => n.get("normalizers")?.as_array()?.iter().map(one).collect(),
        _ => one(n).map(|r| vec![r]),
    }
}

/// No pre-tokenizer, or a split on one literal character (its pieces only add boundaries).
fn pre_tokenizer_ok(pre: &Option<Value>) -> bool {
    let Some(p) = pre.as_ref().filter(|p| !p.is_null()) else {
        return true;
    };
    p.get("type").and_then(Value::as_str) == Some("Split")
        && p.get("invert").and_then(Value::as_bool) == Some(false)
        && p.get("pattern").and_then(|v| v.get("String")).and_then(Value::as_str).and_then(single_char).is_some()
}

fn normalize_into(replace: &[(char, String)], c: char, out: &mut String) {
    let mut s = c.to_string();
    for (from, to) in replace {
        if s.contains(*from) {
            s = s.replace(*from, to);
        }
    }
    out.push_str(&s);
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

impl BoundaryProof {
    /// `None` when the tokenizer has a step the boundary rule does not cover.
    fn new(raw: &RawFile, inner: &Tokenizer) -> Option<BoundaryProof> {
        let m = &raw.model;
        let plain_bpe = m.kind.as_deref().is_none_or(|k| k == "BPE")
            && m.byte_fallback
            && m.continuing_subword_prefix.as_deref().is_none_or(str::is_empty)
            && m.end_of_word_suffix.as_deref().is_none_or(str::is_empty)
            && m.dropout.is_none_or(|d| d == 0.0)
            && !m.ignore_merges;
        let replace = char_replacements(&raw.normalizer)?;
        if !plain_bpe || !pre_tokenizer_ok(&raw.pre_tokenizer) {
            return None;
        }
        if raw.added_tokens.iter().any(|a| a.lstrip || a.rstrip || a.normalized) {
            return None;
        }
        let model = inner.get_model();
        // Complete byte fallback: no character ever becomes <unk> (which could fuse across p).
        let bytes: Vec<u32> = (0..=255u8).map(|b| model.token_to_id(&format!("<{b:#04X}>"))).collect::<Option<_>>()?;
        let mut merges = Vec::with_capacity(m.merges.len());
        for merge in &m.merges {
            let (a, b) = match merge {
                RawMerge::Pair(a, b) => (a.as_str(), b.as_str()),
                RawMerge::Joined(s) => s.split_once(' ')?,
            };
            let (a, b) = (model.token_to_id(a)?, model.token_to_id(b)?);
            if bytes.contains(&a) || bytes.contains(&b) {
                return None;
            }
            merges.push((a as u64) << 32 | b as u64);
        }
        merges.sort_unstable();
        let contents: Vec<&str> =
            raw.added_tokens.iter().map(|a| a.content.as_str()).filter(|c| !c.is_empty()).collect();
        let added = if contents.is_empty() { None } else { Some(AhoCorasick::new(&contents).ok()?) };
        Some(BoundaryProof {
            merges,
            max_token_bytes: m.vocab.keys().map(String::len).max().unwrap_or(0),
            max_added_bytes: contents.iter().map(|c| c.len()).max().unwrap_or(0),
            added,
            replace,
        })
    }

    /// Whether no tokenizer step can join across byte position `p` of `s` (see the module doc).
    fn is_hard(&self, model: &impl Model, s: &str, p: usize) -> bool {
        if p == 0 || p >= s.len() || !s.is_char_boundary(p) {
            return false;
        }
        if let Some(ac) = &self.added {
            let lo = floor_char_boundary(s, p.saturating_sub(self.max_added_bytes));
            let hi = ceil_char_boundary(s, p + self.max_added_bytes);
            if ac.find_overlapping_iter(&s[lo..hi]).any(|m| lo + m.start() <= p && p <= lo + m.end()) {
                return false;
            }
        }
        // Normalized text on each side, as far as one token reaches.
        let mut left_chars = Vec::new();
        let mut width = 0;
        for c in s[..p].chars().rev() {
            let mut n = String::new();
            normalize_into(&self.replace, c, &mut n);
            width += n.len();
            if width > self.max_token_bytes {
                break;
            }
            left_chars.push(n);
        }
        let mut lefts = Vec::new();
        let mut suffix = String::new();
        for n in &left_chars {
            suffix.insert_str(0, n);
            if let Some(id) = model.token_to_id(&suffix) {
                lefts.push(id as u64);
            }
        }
        if lefts.is_empty() {
            return true;
        }
        let mut prefix = String::new();
        for c in s[p..].chars() {
            normalize_into(&self.replace, c, &mut prefix);
            if prefix.len() > self.max_token_bytes {
                break;
            }
            if let Some(b) = model.token_to_id(&prefix) {
                if lefts.iter().any(|a| self.merges.binary_search(&(a << 32 | b as u64)).is_ok()) {
                    return false;
                }
            }
        }
        true
    }
}

impl TextTokenizer {
    pub fn load(path: &Path, bos: u32, eos: u32, max_len: usize) -> Result<TextTokenizer> {
        // Tokenizers would otherwise run some steps on rayon's global pool: its threads would
        // start outside any pool the caller set up (and stay idle in a PostgreSQL backend).
        tokenizers::utils::parallelism::set_parallelism(false);
        let mut inner = Tokenizer::from_file(path).map_err(|e| Error::file(path, e))?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| Error::file(path, e))?;
        let text = std::fs::read(path).map_err(|e| Error::file(path, e))?;
        let raw: RawFile = serde_json::from_slice(&text).map_err(|e| Error::file(path, e))?;
        drop(text);
        let proof = BoundaryProof::new(&raw, &inner);
        let token_bytes = match &proof {
            // A normalized character comes from a raw one at most as long, or from a replaced
            // one; every added token is matched in the raw text.
            Some(p) => {
                let widest_source = p.replace.iter().map(|(c, _)| c.len_utf8()).max().unwrap_or(0);
                let per_char = |t: &str| t.chars().map(|c| c.len_utf8().max(widest_source)).sum::<usize>();
                raw.model.vocab.keys().map(|t| per_char(t)).max().unwrap_or(1).max(p.max_added_bytes).max(4)
            }
            None => usize::MAX,
        };
        drop(raw);
        let tokenizer = TextTokenizer { inner, eos, max_len, proof, token_bytes };
        let empty = tokenizer.encode_uncut("")?;
        if empty.ids != [bos, eos] {
            return Err(Error::file(
                path,
                format!("the tokenizer turns \"\" into {:?}, expected [<bos> {bos}, <eos> {eos}]", empty.ids),
            ));
        }
        Ok(tokenizer)
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Whether cuts are placed by the hard-boundary rule (else only the two-cut comparison).
    pub fn proves_cuts(&self) -> bool {
        self.proof.is_some()
    }

    fn ids(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Byte ranges in `text` of its tokens, `<bos>`/`<eos>` left out; the byte-fallback tokens
    /// of one character each span that whole character. Tokenizes all of `text`: callers bound it.
    pub fn token_spans(&self, text: &str) -> Result<Vec<(usize, usize)>> {
        let encoding = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_offsets().to_vec())
    }

    fn truncate(&self, mut ids: Vec<u32>, full_len: usize) -> TokenizedText {
        if ids.len() > self.max_len {
            ids.truncate(self.max_len - 1);
            ids.push(self.eos);
        }
        TokenizedText { ids, full_len }
    }

    /// Tokenizes the whole text, then truncates: the reference the cut must reproduce.
    pub fn encode_uncut(&self, text: &str) -> Result<TokenizedText> {
        let ids = self.ids(text)?;
        let n = ids.len();
        Ok(self.truncate(ids, n))
    }

    /// Texts up to this many bytes are tokenized whole.
    fn whole_bytes(&self) -> usize {
        (16 * self.max_len).max(1024)
    }

    /// Most bytes ever read from a text: past them at least `max_len` tokens are certain.
    fn read_limit(&self) -> usize {
        self.max_len.saturating_mul(self.token_bytes).saturating_mul(4).max(4 * self.whole_bytes())
    }

    /// Whether byte `p` of `text` is a hard boundary (module doc); false when the tokenizer is
    /// outside what the rule covers.
    pub fn is_hard_boundary(&self, text: &str, p: usize) -> bool {
        self.proof.as_ref().is_some_and(|proof| proof.is_hard(self.inner.get_model(), text, p))
    }

    /// A hard boundary within `BOUNDARY_SCAN_CHARS` characters of byte `c`, nearest first.
    fn boundary_near(&self, s: &str, c: usize) -> Option<usize> {
        let proof = self.proof.as_ref()?;
        let model = self.inner.get_model();
        let (mut down, mut up) = (floor_char_boundary(s, c), ceil_char_boundary(s, c));
        for _ in 0..BOUNDARY_SCAN_CHARS {
            if proof.is_hard(model, s, down) {
                return Some(down);
            }
            if up != down && proof.is_hard(model, s, up) {
                return Some(up);
            }
            down = floor_char_boundary(s, down.saturating_sub(1));
            up = ceil_char_boundary(s, up + 1);
        }
        None
    }

    /// `prompt + text`, tokenized and truncated; a long text is cut first (module doc), so
    /// the work is bounded whatever its size.
    pub fn encode(&self, prompt: &str, text: &str, cancel: Cancel) -> Result<TokenizedText> {
        let total = prompt.len() + text.len();
        let join = |text_bytes: usize| -> Result<String> {
            let end = floor_char_boundary(text, text_bytes);
            let mut s = String::new();
            s.try_reserve_exact(prompt.len() + end)
                .map_err(|e| Error::out_of_memory(format!("a text of {end} bytes: {e}")))?;
            s.push_str(prompt);
            s.push_str(&text[..end]);
            Ok(s)
        };
        if total <= 2 * self.whole_bytes() {
            return self.encode_uncut(&join(text.len())?);
        }
        let s = join(self.read_limit().saturating_sub(prompt.len()))?;
        let complete = s.len() == total;
        // Content tokens a cut must hold: the kept ones plus one that proves truncation.
        let need = self.max_len - 1;
        let cut = |ids: Vec<u32>| {
            let n = ids.len() + 1; // the rest of the text adds at least one token
            self.truncate(ids, n)
        };
        let mut c = self.whole_bytes();
        loop {
            if cancel() {
                return Err(Error::Cancelled);
            }
            if c >= s.len() {
                if complete {
                    return self.encode_uncut(&s);
                }
                // Past the read limit: only tokenizers the proof does not cover get here.
                return self.encode_uncut(&join(text.len())?);
            }
            if let Some(p) = self.boundary_near(&s, c) {
                let ids = self.ids(&s[..p])?;
                if ids.len() - 2 >= need {
                    return Ok(cut(ids));
                }
                c = p.max(c) * 2;
                continue;
            }
            let c1 = floor_char_boundary(&s, c);
            let ids = self.ids(&s[..c1])?;
            if ids.len() - 2 < need {
                c *= 2;
                continue;
            }
            let c2 = floor_char_boundary(&s, 2 * c1);
            if c2 >= s.len() && complete {
                return self.encode_uncut(&s);
            }
            let longer = self.ids(&s[..c2])?;
            if longer.len() > need && ids[..=need] == longer[..=need] {
                return Ok(cut(ids));
            }
            if c2 >= s.len() && self.proof.is_some() {
                // Disagreeing cuts hundreds of kilobytes apart, in a text longer still: keep
                // the longer cut rather than tokenize without bound.
                return Ok(cut(longer));
            }
            c = 2 * c1;
        }
    }

    /// Tokenizes `prompt + text` for every text, in parallel on the current rayon pool,
    /// polling `cancel` before each text.
    pub fn encode_all(&self, prompt: &str, texts: &[&str], cancel: Cancel) -> Result<Vec<TokenizedText>> {
        texts
            .par_iter()
            .with_min_len(8)
            .map(|text| {
                if cancel() {
                    return Err(Error::Cancelled);
                }
                self.encode(prompt, text, cancel)
            })
            .collect()
    }
}
