//! Texts held for a call, and the windows they are embedded in: a call over many rows embeds
//! them a window at a time (`WINDOW_TEXTS`, `WINDOW_BYTES`), so that it holds one window's
//! vectors at a time.

use pgrx::prelude::*;

/// Texts per engine call of embed_batch: enough for the planner to fill its buckets, few
/// enough that a call over a huge array holds only one window's vectors at a time.
pub const WINDOW_TEXTS: usize = 1024;
/// Bytes of text per window, so that a window of long texts stays small too.
pub const WINDOW_BYTES: usize = 8 << 20;

/// The texts of an array argument, copied into one buffer: the argument does not outlive the
/// first call of a set-returning function, and one String per element would cost more than
/// the texts themselves for short ones.
pub struct Texts {
    buffer: String,
    spans: Vec<Option<(u32, u32)>>,
}

impl Texts {
    pub fn one(text: &str) -> Texts {
        Texts { buffer: text.to_string(), spans: vec![Some((0, text.len() as u32))] }
    }

    pub fn new(inputs: Array<&str>) -> Texts {
        Texts::collect(inputs.iter())
    }

    pub fn collect<'a>(inputs: impl IntoIterator<Item = Option<&'a str>>) -> Texts {
        let mut buffer = String::new();
        let spans = inputs
            .into_iter()
            .map(|t| {
                t.map(|t| {
                    // An array is at most 1 GB, so offsets fit in u32.
                    let start = buffer.len() as u32;
                    buffer.push_str(t);
                    (start, t.len() as u32)
                })
            })
            .collect();
        Texts { buffer, spans }
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn get(&self, i: usize) -> Option<&str> {
        self.spans[i].map(|(start, len)| &self.buffer[start as usize..(start + len) as usize])
    }
}
