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
            if end > i + 1 && padded > max_batch_tokens {
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
    plan
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
