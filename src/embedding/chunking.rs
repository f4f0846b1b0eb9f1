//! Documents cut on the model's token boundaries and their chunks embedded, a window at a time:
//! the windows are those embed_batch would make over the same bodies.

use std::collections::VecDeque;

use embeddinggemma_engine::Chunk;

use crate::embedding;
use crate::embedding::texts::{Texts, WINDOW_BYTES, WINDOW_TEXTS};
use crate::pg::errors::raise_bad_cut;

/// How documents are cut, checked for sign (the engine checks the ranges).
pub struct Cut {
    max_tokens: usize,
    overlap: usize,
    task: String,
}

impl Cut {
    pub fn new(max_tokens: i32, overlap: i32, task: &str) -> Cut {
        let non_negative = |name: &str, v: i32| {
            usize::try_from(v).unwrap_or_else(|_| raise_bad_cut(format!("{name} must not be negative, not {v}")))
        };
        Cut {
            max_tokens: non_negative("max_tokens", max_tokens),
            overlap: non_negative("overlap", overlap),
            task: task.to_string(),
        }
    }

    fn apply(&self, text: &str) -> Vec<Chunk> {
        embedding::chunk(text, &self.task, self.max_tokens, self.overlap)
    }
}

/// A chunk as cut and embedded: document ordinal, chunk number, 1-based character offsets (end
/// exclusive), body, embedding. Its vector becomes a datum only when its row is returned: a
/// datum made earlier would live in the memory of an earlier call, freed by then.
pub type Pending = (i32, i32, i32, i32, String, Option<Vec<f32>>);

/// The chunks of the documents, cut as rows are asked for and embedded a window at a time.
pub struct ChunkRows {
    docs: Texts,
    next_doc: usize,
    cut: Cut,
    /// None: chunks() (no embeddings).
    dim: Option<i32>,
    /// Chunks cut but not yet embedded: (document, chunk number, offsets).
    pending: VecDeque<(usize, usize, Chunk)>,
    ready: VecDeque<Pending>,
}

impl ChunkRows {
    pub fn new(docs: Texts, cut: Cut, dim: Option<i32>) -> ChunkRows {
        if let Some(dim) = dim {
            embedding::check_request(&cut.task, dim);
        }
        ChunkRows { docs, next_doc: 0, cut, dim, pending: VecDeque::new(), ready: VecDeque::new() }
    }

    fn body(&self, doc: usize, c: &Chunk) -> &str {
        &self.docs.get(doc).expect("chunks come from non-NULL documents")[c.start_byte..c.end_byte]
    }

    fn fill(&mut self) {
        let (mut window, mut bytes) = (Vec::new(), 0);
        while window.len() < WINDOW_TEXTS && bytes < WINDOW_BYTES {
            let Some(piece) = self.pending.pop_front() else {
                if self.next_doc == self.docs.len() {
                    break;
                }
                let doc = self.next_doc;
                self.next_doc += 1;
                if let Some(text) = self.docs.get(doc) {
                    let chunks = self.cut.apply(text);
                    self.pending.extend(chunks.into_iter().enumerate().map(|(n, c)| (doc, n, c)));
                }
                continue;
            };
            bytes += piece.2.end_byte - piece.2.start_byte;
            window.push(piece);
        }
        let bodies: Vec<&str> = window.iter().map(|(doc, _, c)| self.body(*doc, c)).collect();
        let vectors = match self.dim {
            Some(dim) if !bodies.is_empty() => embedding::embed(&bodies, &self.cut.task, dim),
            _ => Vec::new(),
        };
        let mut vectors = vectors.into_iter();
        for (doc, n, c) in &window {
            let offset = |chars: usize| i32::try_from(chars + 1).expect("a text is at most 1 GB");
            let body = self.body(*doc, c).to_string();
            let row = (*doc as i32 + 1, *n as i32 + 1, offset(c.start_char), offset(c.end_char), body, vectors.next());
            self.ready.push_back(row);
        }
    }
}

impl Iterator for ChunkRows {
    type Item = Pending;

    fn next(&mut self) -> Option<Pending> {
        if self.ready.is_empty() {
            self.fill();
        }
        self.ready.pop_front()
    }
}
