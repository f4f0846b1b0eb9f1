//! Length-bucketed batching: sort texts by token count, cut the sorted run into buckets whose
//! padded size (members × longest member) stays under a token budget.

/// Texts run together in one forward pass, padded to `padded_len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// Input positions, longest first.
    pub members: Vec<usize>,
    pub padded_len: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub buckets: Vec<Bucket>,
    pub real_tokens: usize,
    pub padded_tokens: usize,
}

impl Plan {
    /// Share of computed positions that hold real tokens (1.0 when nothing is padded).
    pub fn fill_ratio(&self) -> f64 {
        if self.padded_tokens == 0 {
            1.0
        } else {
            self.real_tokens as f64 / self.padded_tokens as f64
        }
    }
}

/// What one more forward pass costs beyond its tokens, in padded-token equivalents (per-pass
/// setup, and smaller matrix products running a little less efficiently).
pub const PASS_COST_TOKENS: usize = 256;

/// Plans forward passes for texts of the given token `lengths`. Texts are sorted longest first
/// and the sorted run is cut where the total of padded tokens plus `PASS_COST_TOKENS` per pass
/// is smallest (an exact dynamic programme over cut points). A bucket's padded size stays
/// within `max_batch_tokens` unless it holds a single text, and it holds at most
/// `max_batch_size` texts.
pub fn plan(lengths: &[usize], max_batch_tokens: usize, max_batch_size: usize) -> Plan {
    plan_within(lengths, max_batch_tokens, max_batch_size, &|_, _| true).unwrap_or_else(|p| p)
}

/// `plan`, where a bucket of `size` texts padded to `len` must also satisfy `fits(size, len)`
/// (a memory bound). When some text fits in no pass even alone, returns Err with the plan,
/// whose first bucket holds that text.
pub fn plan_within(
    lengths: &[usize],
    max_batch_tokens: usize,
    max_batch_size: usize,
    fits: &dyn Fn(usize, usize) -> bool,
) -> Result<Plan, Plan> {
    let max_batch_size = max_batch_size.max(1);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let sorted: Vec<usize> = order.iter().map(|&i| lengths[i]).collect();

    // best[i]: cheapest plan for sorted[i..]; next[i]: where the bucket starting at i ends.
    let n = sorted.len();
    let mut best = vec![usize::MAX; n + 1];
    let mut next = vec![n; n + 1];
    best[n] = 0;
    for i in (0..n).rev() {
        for end in i + 1..=n.min(i + max_batch_size) {
            let padded = (end - i) * sorted[i];
            if end > i + 1 && (padded > max_batch_tokens || !fits(end - i, sorted[i])) {
                break;
            }
            let cost = padded + PASS_COST_TOKENS + best[end];
            if cost <= best[i] {
                best[i] = cost;
                next[i] = end;
            }
        }
    }

    let mut plan = Plan { real_tokens: sorted.iter().sum(), ..Plan::default() };
    let mut i = 0;
    while i < n {
        let members = order[i..next[i]].to_vec();
        plan.padded_tokens += members.len() * sorted[i];
        plan.buckets.push(Bucket { members, padded_len: sorted[i] });
        i = next[i];
    }
    // Longest first: if any text fits in no pass, the first bucket's does not.
    match plan.buckets.first() {
        Some(b) if !fits(1, b.padded_len) => Err(plan),
        _ => Ok(plan),
    }
}

/// Elements of attention scores the portable path materialises at once (model/attention.rs).
const PORTABLE_SCORES_PER_CHUNK: usize = 1 << 24;
/// Query rows per task of the CPU attention kernel (model/cpu_kernels.rs), at most.
const KERNEL_QUERY_BLOCK: usize = 128;

/// Estimates the peak memory of one forward pass from its bucket shape, for the memory bound.
/// Counts float32 activations (bfloat16 ones take less) that are alive together in a layer,
/// with the temporaries candle allocates in RMSNorm, RoPE and the residual adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryModel {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Keys a sliding layer's query sees: |q − k| < window.
    pub window: usize,
    /// Attention on candle's generic ops (masks and whole score matrices) instead of the kernel.
    pub portable: bool,
    /// Threads running the kernel's tasks, each with its own score block.
    pub threads: usize,
}

impl MemoryModel {
    pub fn pass_bytes(&self, size: usize, len: usize) -> usize {
        let tokens = size.saturating_mul(len);
        let (h, i) = (self.hidden, self.intermediate);
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        // Attention half: x, its norm (+2 temporaries), q/k/v before and after norm and RoPE
        // (+2 norm temporaries), the output, o_proj, post-norm, sum.
        let attention = 8 * h + 5 * (q + 2 * kv);
        // MLP half: x, its norm (+2), gate|up, gated, down, its norm (+2), sum.
        let mlp = 8 * h + 3 * i;
        // Gathered embeddings and the head's float32 copy of the last state.
        let per_token = attention.max(mlp) + 2 * h;
        let mut floats = tokens.saturating_mul(per_token);
        let square = len.saturating_mul(len);
        if self.portable {
            let chunk =
                (PORTABLE_SCORES_PER_CHUNK / self.heads.max(1).saturating_mul(square).max(1)).clamp(1, size.max(1));
            // scores, masked scores, probabilities and their cast; the sliding mask [B, 1, T, T].
            floats = floats.saturating_add(4 * chunk * self.heads * square);
            if len > self.window {
                floats = floats.saturating_add(size.saturating_mul(square));
            }
        } else {
            let keys = len.min(KERNEL_QUERY_BLOCK + 2 * self.window);
            floats = floats.saturating_add(self.threads.max(1) * KERNEL_QUERY_BLOCK * keys);
        }
        floats.saturating_mul(4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_text_is_planned_once_under_the_budget() {
        let lengths: Vec<usize> = (0..500).map(|i| 2 + (i * 7919) % 2047).collect();
        let p = plan(&lengths, 4096, 64);
        let mut seen: Vec<usize> = p.buckets.iter().flat_map(|b| b.members.clone()).collect();
        seen.sort();
        assert_eq!(seen, (0..500).collect::<Vec<_>>());
        for b in &p.buckets {
            assert!(b.members.len() <= 64);
            assert!(b.members.len() == 1 || b.members.len() * b.padded_len <= 4096);
            assert_eq!(b.padded_len, b.members.iter().map(|&i| lengths[i]).max().unwrap());
        }
        assert_eq!(p.real_tokens, lengths.iter().sum::<usize>());
        assert!(p.fill_ratio() > 0.97, "fill {}", p.fill_ratio());
    }

    #[test]
    fn cuts_where_padding_outweighs_a_pass() {
        // Greedy filling would pad the three short texts to 1000 tokens each.
        let p = plan(&[1000, 10, 10, 10], 4096, 64);
        assert_eq!(p.buckets.len(), 2);
        assert_eq!(p.padded_tokens, 1030);
        // Near-equal lengths share a pass.
        assert_eq!(plan(&[100, 99, 98], 4096, 64).buckets.len(), 1);
    }

    #[test]
    fn long_texts_run_alone_and_batch_size_caps_short_ones() {
        let p = plan(&[5000, 3, 3, 3, 3, 3], 4096, 2);
        assert_eq!(p.buckets[0], Bucket { members: vec![0], padded_len: 5000 });
        assert_eq!(p.buckets.len(), 4);
        assert_eq!(p.padded_tokens, 5000 + 15);
    }

    #[test]
    fn a_memory_bound_shrinks_buckets_and_names_a_text_too_big_alone() {
        let lengths = vec![100; 64];
        let fits = |size: usize, len: usize| size * len <= 1000;
        let p = plan_within(&lengths, 1 << 20, 256, &fits).unwrap();
        assert!(p.buckets.iter().all(|b| b.members.len() * b.padded_len <= 1000));
        assert_eq!(p.buckets.iter().map(|b| b.members.len()).sum::<usize>(), 64);
        let err = plan_within(&[10, 2000, 10], 1 << 20, 256, &fits).unwrap_err();
        assert_eq!(err.buckets[0].members, vec![1]);
    }

    #[test]
    fn memory_estimates_grow_with_the_bucket() {
        let m = MemoryModel {
            hidden: 768,
            intermediate: 1152,
            heads: 3,
            kv_heads: 1,
            head_dim: 256,
            window: 257,
            portable: false,
            threads: 2,
        };
        assert!(m.pass_bytes(1, 2048) < m.pass_bytes(2, 2048));
        assert!(m.pass_bytes(4, 2048) >= 4 * 2048 * (8 * 768 + 3 * 1152) * 4);
        let portable = MemoryModel { portable: true, ..m };
        // Portable attention holds score matrices and the sliding mask: quadratic in length.
        assert!(portable.pass_bytes(1, 2048) > m.pass_bytes(1, 2048) + 2048 * 2048 * 4);
    }

    #[test]
    fn empty_input_plans_nothing() {
        let p = plan(&[], 4096, 8);
        assert!(p.buckets.is_empty());
        assert_eq!(p.fill_ratio(), 1.0);
    }

    #[test]
    fn equal_lengths_keep_input_order() {
        let p = plan(&[4, 4, 4], 100, 8);
        assert_eq!(p.buckets[0].members, vec![0, 1, 2]);
    }
}
