//! Text → token ids exactly as sentence-transformers does it: `<bos>` + tokens(prompt + text)
//! + `<eos>`, truncated to the model limit with `<eos>` kept last.

use std::path::Path;

use rayon::prelude::*;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

pub struct TextTokenizer {
    inner: Tokenizer,
    eos: u32,
    max_len: usize,
}

/// One text's ids after truncation, and how many it had before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedText {
    pub ids: Vec<u32>,
    pub full_len: usize,
}

impl TokenizedText {
    pub fn truncated(&self) -> bool {
        self.full_len > self.ids.len()
    }
}

impl TextTokenizer {
    pub fn load(path: &Path, bos: u32, eos: u32, max_len: usize) -> Result<TextTokenizer> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| Error::file(path, e))?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| Error::file(path, e))?;
        let tokenizer = TextTokenizer { inner, eos, max_len };
        let empty = tokenizer.encode_one("")?;
        if empty.ids != [bos, eos] {
            return Err(Error::file(path, format!(
                "the tokenizer turns \"\" into {:?}, expected [<bos> {bos}, <eos> {eos}]", empty.ids
            )));
        }
        Ok(tokenizer)
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    fn encode_one(&self, text: &str) -> Result<TokenizedText> {
        let encoding = self.inner.encode_fast(text, true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        let full_len = ids.len();
        if full_len > self.max_len {
            ids.truncate(self.max_len - 1);
            ids.push(self.eos);
        }
        Ok(TokenizedText { ids, full_len })
    }

    /// Tokenizes `prompt + text` for every text, in parallel on the current rayon pool.
    pub fn encode_all(&self, prompt: &str, texts: &[&str]) -> Result<Vec<TokenizedText>> {
        texts
            .par_iter()
            .with_min_len(8)
            .map(|text| {
                let mut input = String::with_capacity(prompt.len() + text.len());
                input.push_str(prompt);
                input.push_str(text);
                self.encode_one(&input)
            })
            .collect()
    }
}
