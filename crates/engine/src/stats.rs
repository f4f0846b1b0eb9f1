//! Per-call counters of the batching pipeline.

use std::ops::AddAssign;
use std::time::Duration;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub texts: u64,
    pub real_tokens: u64,
    pub padded_tokens: u64,
    pub forward_passes: u64,
    pub truncated: u64,
    pub tokenize_time: Duration,
    pub forward_time: Duration,
}

impl Stats {
    /// Share of computed positions that held real tokens.
    pub fn fill_ratio(&self) -> f64 {
        if self.padded_tokens == 0 {
            1.0
        } else {
            self.real_tokens as f64 / self.padded_tokens as f64
        }
    }
}

impl AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.texts += o.texts;
        self.real_tokens += o.real_tokens;
        self.padded_tokens += o.padded_tokens;
        self.forward_passes += o.forward_passes;
        self.truncated += o.truncated;
        self.tokenize_time += o.tokenize_time;
        self.forward_time += o.forward_time;
    }
}
