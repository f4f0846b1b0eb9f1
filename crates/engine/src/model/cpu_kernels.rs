//! CPU kernels for the steps where candle's generic ops leave most of the time on the table:
//! attention that computes only what a query may see (no padding, only its sliding window),
//! and the fused gelu-tanh gate of the MLP. Both are float32 and run on the current rayon pool.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// exp(x) for float32, accurate to about one ulp on [-87, 88], written so loops vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// gelu with the tanh approximation: 0.5·x·(1 + tanh(u)) = x / (1 + e^(−2u)).
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp(-2.0 * u))
}

thread_local! {
    static BF16_ATTENTION: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with attention products in bf16 on this thread (bf16 mode on an AVX512-BF16 CPU):
/// q, k, v and the probabilities rounded to bf16, float32 accumulation and softmax.
// A thread-local rather than a field of `Attention`, which attention.rs builds per call.
pub fn with_bf16_attention<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let before = BF16_ATTENTION.with(|c| c.replace(on));
    let result = f();
    BF16_ATTENTION.with(|c| c.set(before));
    result
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else { candle_core::bail!("{what}: expected float32") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// gelu_tanh(gate) · up for contiguous `[n, 2·width]` rows that hold gate then up.
pub struct GeluGate;

impl CustomOp1 for GeluGate {
    fn name(&self) -> &'static str {
        "gelu-gate"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let gate_up = contiguous_f32(s, l, "gelu-gate")?;
        let (n, double) = l.shape().dims2()?;
        let width = double / 2;
        let mut out = vec![0f32; n * width];
        out.par_chunks_mut(width).zip(gate_up.par_chunks(double)).with_min_len(16).for_each(|(o, row)| {
            let (gate, up) = row.split_at(width);
            for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                *o = gelu_tanh(g) * u;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, width))))
    }
}

/// Bidirectional attention over packed sequences: `lengths` rows each, one after another.
///
/// q: [1, N, heads, d], k and v: [1, N, kv_heads, d] with N = Σ lengths, all contiguous
/// float32; the result is [1, N, heads · d]. A query at position p of a sequence of length L
/// sees that sequence's keys k < L, and with a `window` only those with |p − k| < window.
pub struct Attention {
    pub lengths: Vec<usize>,
    pub window: Option<usize>,
    pub scale: f32,
}

/// One unit of work: `rows` queries of one sequence against one kv head's group of heads.
struct Task {
    seq: usize,
    kv_head: usize,
    rows: std::ops::Range<usize>,
}

/// An output buffer shared by parallel tasks.
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut f32);
// SAFETY: parallel tasks write disjoint parts of the output.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    // A method, so closures capture the whole wrapper rather than its raw field.
    pub fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers pass offsets inside the output buffer.
        unsafe { self.0.add(offset) }
    }
}

impl Attention {
    fn tasks(&self, kv_heads: usize) -> Vec<Task> {
        let real: usize = self.lengths.iter().sum();
        // Small query blocks keep a window's key range tight; enough of them keep every thread busy.
        let mut block = 128;
        while block > 16 && real.div_ceil(block) * kv_heads < 4 * rayon::current_num_threads() {
            block /= 2;
        }
        let mut tasks = Vec::new();
        for (seq, &len) in self.lengths.iter().enumerate() {
            for kv_head in 0..kv_heads {
                for start in (0..len).step_by(block) {
                    tasks.push(Task { seq, kv_head, rows: start..(start + block).min(len) });
                }
            }
        }
        tasks
    }

    /// The first row of each sequence.
    fn starts(&self) -> Vec<usize> {
        self.lengths.iter().scan(0, |row, &n| Some(std::mem::replace(row, *row + n))).collect()
    }
}

#[cfg(target_arch = "x86_64")]
impl Attention {
    /// The same attention with bf16 products: each (sequence, kv head) has its keys packed as
    /// the columns of q·kᵀ and its values, transposed, as the columns of p·v.
    fn bf16(&self, q: &[f32], k: &[f32], v: &[f32], (heads, kv_heads, d): (usize, usize, usize), out: SendPtr) {
        use super::bf16_gemm::{to_bf16_rows, PackedBf16, NR};
        let (group, q_row, kv_row) = (heads / kv_heads, heads * d, kv_heads * d);
        let starts = self.starts();
        let packed: Vec<(PackedBf16, PackedBf16)> = (0..self.lengths.len() * kv_heads)
            .into_par_iter()
            .map(|i| {
                let at = |j: usize| starts[i / kv_heads] * kv_row + (i % kv_heads) * d + j * kv_row;
                let len = self.lengths[i / kv_heads];
                (
                    PackedBf16::pack(len, d, |j| &k[at(j)..at(j) + d]),
                    PackedBf16::pack_transposed(d, len, |j| &v[at(j)..at(j) + d]),
                )
            })
            .collect();
        let d_stride = d.next_multiple_of(32);
        self.tasks(kv_heads).par_iter().for_each_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(qs, scores, probs): &mut (Vec<u16>, Vec<f32>, Vec<u16>), task| {
                let len = self.lengths[task.seq];
                let (k0, k1) = match self.window {
                    Some(w) => (task.rows.start.saturating_sub(w - 1), (task.rows.end + w - 1).min(len)),
                    None => (0, len),
                };
                let k0 = k0 / NR * NR; // whole panels of keys; the extra ones get probability 0
                let (m, n) = (task.rows.len(), k1 - k0);
                let panels = k0 / NR..k1.div_ceil(NR);
                let sn = panels.len() * NR;
                scores.resize(m * sn, 0.0);
                let (keys, values) = &packed[task.seq * kv_heads + task.kv_head];
                for head in task.kv_head * group..(task.kv_head + 1) * group {
                    let q_at = (starts[task.seq] + task.rows.start) * q_row + head * d;
                    to_bf16_rows(&q[q_at..], q_row, m, d, qs, d_stride);
                    // SAFETY: `scores` holds m rows of sn values; the output rows `task.rows` of
                    // `head` belong to this task alone.
                    unsafe { keys.product(qs, d_stride, m, panels.clone(), 0, d.div_ceil(2), scores.as_mut_ptr(), sn) };
                    for (i, row) in scores.chunks_exact_mut(sn).enumerate() {
                        let p = task.rows.start + i;
                        let (lo, hi) = match self.window {
                            Some(w) => (p.saturating_sub(w - 1).max(k0) - k0, (p + w).min(k1) - k0),
                            None => (0, n),
                        };
                        let row = &mut row[..n];
                        row[lo..hi].iter_mut().for_each(|x| *x *= self.scale);
                        softmax_in_place(row, lo, hi);
                    }
                    to_bf16_rows(scores, sn, m, n, probs, n.next_multiple_of(32));
                    unsafe {
                        values.product(
                            probs,
                            n.next_multiple_of(32),
                            m,
                            0..d.div_ceil(NR),
                            k0 / 2,
                            n.div_ceil(2),
                            out.at(q_at),
                            q_row,
                        )
                    };
                }
            },
        );
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "embeddinggemma-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = contiguous_f32(sq, lq, "attention q")?;
        let k = contiguous_f32(sk, lk, "attention k")?;
        let v = contiguous_f32(sv, lv, "attention v")?;
        let (b, t, heads, d) = lq.shape().dims4()?;
        let (kb, kt, kv_heads, kd) = lk.shape().dims4()?;
        if (kb, kt, kd) != (b, t, d) || lv.shape() != lk.shape() || heads % kv_heads != 0 {
            candle_core::bail!("attention: inconsistent shapes {:?} {:?} {:?}", lq.shape(), lk.shape(), lv.shape())
        }
        if b != 1 || self.lengths.iter().sum::<usize>() != t {
            candle_core::bail!(
                "attention: expected [1, Σ lengths = {}, …] packed rows, got {:?}",
                self.lengths.iter().sum::<usize>(),
                lq.shape()
            )
        }
        let group = heads / kv_heads;
        let (q_row, kv_row) = (heads * d, kv_heads * d);
        let starts = self.starts();
        let mut out = vec![0f32; t * heads * d];
        let out_ptr = SendPtr(out.as_mut_ptr());
        #[cfg(target_arch = "x86_64")]
        if BF16_ATTENTION.with(std::cell::Cell::get) {
            self.bf16(q, k, v, (heads, kv_heads, d), out_ptr);
            return Ok((CpuStorage::F32(out), Shape::from((1, t, heads * d))));
        }

        self.tasks(kv_heads).par_iter().for_each_init(Vec::new, |scores: &mut Vec<f32>, task| {
            let len = self.lengths[task.seq];
            let (k0, k1) = match self.window {
                Some(w) => (task.rows.start.saturating_sub(w - 1), (task.rows.end + w - 1).min(len)),
                None => (0, len),
            };
            let (m, n) = (task.rows.len(), k1 - k0);
            scores.resize(m * n, 0.0);
            let seq_q = starts[task.seq] * q_row;
            let seq_kv = starts[task.seq] * kv_row + task.kv_head * d;
            for head in task.kv_head * group..(task.kv_head + 1) * group {
                let q_at = seq_q + task.rows.start * q_row + head * d;
                // SAFETY: every pointer/stride pair stays inside its slice: rows < len, keys in
                // k0..k1 ≤ len from the sequence's start (starts + lengths ≤ t), head < heads,
                // and d columns from each row start.
                unsafe {
                    gemm(
                        m,
                        n,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        q.as_ptr().add(q_at),
                        1,
                        q_row as isize,
                        k.as_ptr().add(seq_kv + k0 * kv_row),
                        kv_row as isize,
                        1,
                        0.0,
                        self.scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                for (i, row) in scores.chunks_exact_mut(n).enumerate() {
                    let p = task.rows.start + i;
                    let (lo, hi) = match self.window {
                        Some(w) => (p.saturating_sub(w - 1).max(k0) - k0, (p + w).min(k1) - k0),
                        None => (0, n),
                    };
                    softmax_in_place(row, lo, hi);
                }
                // SAFETY: as above; this task alone writes rows `task.rows` of `head`.
                unsafe {
                    gemm(
                        m,
                        d,
                        n,
                        out_ptr.at(seq_q + task.rows.start * q_row + head * d),
                        1,
                        q_row as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        n as isize,
                        v.as_ptr().add(seq_kv + k0 * kv_row),
                        1,
                        kv_row as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((1, t, heads * d))))
    }
}

/// Softmax over `row[lo..hi]`; everything outside becomes 0.
fn softmax_in_place(row: &mut [f32], lo: usize, hi: usize) {
    row[..lo].fill(0.0);
    row[hi..].fill(0.0);
    let live = &mut row[lo..hi];
    let max = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for x in live.iter_mut() {
        *x = exp(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    live.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// n reproducible values in [-1, 1).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// bf16 attention against float32 on ragged lengths, with and without a window: each
    /// output row must point the same way (inputs and probabilities rounded to bf16).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn bf16_attention_is_close_to_f32() {
        use candle_core::{Device, Tensor};
        if !super::super::bf16_gemm::supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let (lengths, heads, kv, d) = (vec![301, 33, 2], 3, 1, 256);
        let t: usize = lengths.iter().sum();
        let tensor = |v: Vec<f32>, h: usize| Tensor::from_vec(v, (1, t, h, d), &Device::Cpu).unwrap();
        let q = tensor(values(t * heads * d, 1), heads);
        let k = tensor(values(t * kv * d, 2), kv);
        let v = tensor(values(t * kv * d, 3), kv);
        for window in [None, Some(40)] {
            let op = Attention { lengths: lengths.clone(), window, scale: 0.3 };
            let run = |bf16| {
                with_bf16_attention(bf16, || {
                    q.apply_op3_no_bwd(&k, &v, &op).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
                })
            };
            let (want, got) = (run(false), run(true));
            for (row, (w, g)) in want.chunks(d).zip(got.chunks(d)).enumerate() {
                let dot: f32 = w.iter().zip(g).map(|(a, b)| a * b).sum();
                let norms = w.iter().map(|a| a * a).sum::<f32>().sqrt() * g.iter().map(|a| a * a).sum::<f32>().sqrt();
                assert!(dot / norms > 0.999, "window {window:?} row {row}: cosine {}", dot / norms);
            }
        }
    }

    /// Each sequence of a packed run reads only its own rows: its output equals running it alone.
    #[test]
    fn packed_sequences_match_each_alone() {
        use candle_core::{Device, Tensor};
        let (lengths, heads, kv, d) = ([7usize, 130, 1, 45], 4, 2, 32);
        let t: usize = lengths.iter().sum();
        let (q, k, v) = (values(t * heads * d, 1), values(t * kv * d, 2), values(t * kv * d, 3));
        let run = |lengths: &[usize], rows: std::ops::Range<usize>, window, bf16| {
            let n = rows.len();
            let tensor = |x: &[f32], h: usize| {
                Tensor::from_slice(&x[rows.start * h * d..rows.end * h * d], (1, n, h, d), &Device::Cpu).unwrap()
            };
            let op = Attention { lengths: lengths.to_vec(), window, scale: 0.2 };
            let out =
                with_bf16_attention(bf16, || tensor(&q, heads).apply_op3_no_bwd(&tensor(&k, kv), &tensor(&v, kv), &op));
            out.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        #[cfg(target_arch = "x86_64")]
        let modes = if super::super::bf16_gemm::supported() { vec![false, true] } else { vec![false] };
        #[cfg(not(target_arch = "x86_64"))]
        let modes = vec![false];
        for bf16 in modes {
            for window in [None, Some(16)] {
                let packed = run(&lengths, 0..t, window, bf16);
                let mut start = 0;
                for &n in &lengths {
                    let alone = run(&[n], start..start + n, window, bf16);
                    assert_eq!(
                        alone,
                        packed[start * heads * d..(start + n) * heads * d],
                        "bf16 {bf16} window {window:?} length {n}"
                    );
                    start += n;
                }
            }
        }
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((exp(x) as f64) - (x as f64).exp()).abs() / (x as f64).exp();
            worst = worst.max(rel);
            x += 0.001;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
    }

    #[test]
    fn gelu_matches_the_tanh_formula() {
        for i in -2000..2000 {
            let x = i as f32 / 100.0;
            let want = 0.5
                * x as f64
                * (1.0 + ((2.0f64 / std::f64::consts::PI).sqrt() * (x as f64 + 0.044715 * (x as f64).powi(3))).tanh());
            assert!((gelu_tanh(x) as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3), "x={x}");
        }
    }
}
