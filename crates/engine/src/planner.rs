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

/// Plans forward passes for texts of the given token `lengths`. A text longer than the budget
/// gets a bucket of its own; every bucket holds at most `max_batch_size` texts.
pub fn plan(lengths: &[usize], max_batch_tokens: usize, max_batch_size: usize) -> Plan {
    let max_batch_size = max_batch_size.max(1);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));

    let mut plan = Plan::default();
    let mut current: Option<Bucket> = None;
    for index in order {
        let len = lengths[index];
        plan.real_tokens += len;
        if let Some(bucket) = current.as_mut() {
            let fits = (bucket.members.len() + 1) * bucket.padded_len <= max_batch_tokens;
            if fits && bucket.members.len() < max_batch_size {
                bucket.members.push(index);
                continue;
            }
            plan.buckets.extend(current.take());
        }
        current = Some(Bucket { members: vec![index], padded_len: len });
    }
    plan.buckets.extend(current);
    plan.padded_tokens = plan.buckets.iter().map(|b| b.members.len() * b.padded_len).sum();
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
        assert!(p.fill_ratio() > 0.95, "fill {}", p.fill_ratio());
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
