//! bf16 matrix products on CPUs with AVX512-BF16 (`vdpbf16ps`): y[m, n] = Σ_k x[m, k] · w[n, k]
//! with float32 x rounded to bf16 per product, w packed once at load, float32 accumulation.
//!
//! Register tile: `MR` rows × `NR` columns held in 2·MR zmm accumulators. Each step over a pair
//! of k broadcasts one row's bf16 pair of x (32 bits) and multiplies it into two vectors of the
//! packed weights, which hold the same pair for 32 consecutive columns.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

use super::cpu_kernels::SendPtr;

/// Columns per packed panel (two zmm of float32 results).
pub const NR: usize = 32;
/// Rows per register tile: 24 accumulators, 2 weight vectors and a broadcast fit in 32 zmm.
const MR: usize = 12;
/// Bytes of converted x a task keeps for reuse across panels (a share of a 1 MiB L2).
const X_BLOCK_BYTES: usize = 384 << 10;
const MAX_ROWS_PER_TASK: usize = 12 * MR;

/// One k-pair of one panel: columns c = 0..32, values w[c][2q], w[c][2q + 1] side by side.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; 2 * NR]);

/// Whether this CPU runs the kernel (AVX-512F with the BF16 extension).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Round to nearest even, as `vcvtne2ps2bf16` and `half::bf16::from_f32` do.
#[inline(always)]
fn to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// Weights [n, k] in panels of `NR` columns, each `pairs` lines long, zero-padded.
pub struct PackedBf16 {
    n: usize,
    k: usize,
    pairs: usize,
    lines: Vec<Line>,
}

impl PackedBf16 {
    /// Packs `n` rows of `k` values; `row(i)` gives row i of the [n, k] weight.
    pub fn pack<'a>(n: usize, k: usize, row: impl Fn(usize) -> &'a [f32]) -> PackedBf16 {
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut lines = vec![Line([0; 2 * NR]); panels * pairs];
        for p in 0..panels {
            let panel = &mut lines[p * pairs..(p + 1) * pairs];
            for c in 0..NR.min(n - p * NR) {
                let w = row(p * NR + c);
                assert_eq!(w.len(), k, "weight row {} has {} values, expected {k}", p * NR + c, w.len());
                for (line, two) in panel.iter_mut().zip(w.chunks(2)) {
                    line.0[2 * c] = to_bf16(two[0]);
                    line.0[2 * c + 1] = two.get(1).map_or(0, |&v| to_bf16(v));
                }
            }
        }
        PackedBf16 { n, k, pairs, lines }
    }

    /// Packs the transpose of `k` rows of `n` values: `col(j)` gives row j of the [k, n] source,
    /// which is column j of the [n, k] weight.
    pub fn pack_transposed<'a>(n: usize, k: usize, col: impl Fn(usize) -> &'a [f32]) -> PackedBf16 {
        let pairs = k.div_ceil(2);
        let mut lines = vec![Line([0; 2 * NR]); n.div_ceil(NR) * pairs];
        for j in 0..k {
            let src = col(j);
            assert_eq!(src.len(), n, "source row {j} has {} values, expected {n}", src.len());
            for (c, &v) in src.iter().enumerate() {
                lines[(c / NR) * pairs + j / 2].0[2 * (c % NR) + j % 2] = to_bf16(v);
            }
        }
        PackedBf16 { n, k, pairs, lines }
    }

    /// out[r·so + c] = Σ over pairs q0..q0 + pairs of x[r, 2(q − q0) + {0, 1}] · w[c, 2q + {0, 1}]
    /// for rows r < `rows` of bf16 `x` (row stride `sx`) and the columns c of `panels`, counted
    /// from the first of them (the last panel clipped to n). Single-threaded.
    ///
    /// # Safety
    /// `out` must be valid for those writes, and no other thread may access them meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn product(
        &self,
        x: &[u16],
        sx: usize,
        rows: usize,
        panels: std::ops::Range<usize>,
        q0: usize,
        pairs: usize,
        out: *mut f32,
        so: usize,
    ) {
        assert!(supported(), "the bf16 kernel needs AVX512-BF16");
        assert!(panels.end <= self.n.div_ceil(NR) && q0 + pairs <= self.pairs, "outside the packed weights");
        assert!(rows == 0 || (rows - 1) * sx + 2 * pairs <= x.len(), "x is too short");
        for p in panels.clone() {
            let cols = NR.min(self.n - p * NR);
            let w = self.lines.as_ptr().add(p * self.pairs + q0);
            for t in (0..rows).step_by(MR) {
                let c = out.add(t * so + (p - panels.start) * NR);
                tile_dispatch(MR.min(rows - t), x.as_ptr().add(t * sx), sx, w, pairs, c, so, cols);
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.lines.len() * std::mem::size_of::<Line>()
    }

    /// x: [m, k] row-major float32 → [m, n], on the current rayon pool.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert!(supported(), "the bf16 kernel needs AVX512-BF16");
        assert_eq!(x.len(), m * self.k, "x is not [{m}, {}]", self.k);
        let (n, k) = (self.n, self.k);
        if m == 0 {
            return Vec::new();
        }
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        let out_ptr = SendPtr(out.spare_capacity_mut().as_mut_ptr().cast::<f32>());
        // x rows are converted into a per-task buffer of `stride` bf16 values per row (whole
        // 32-value chunks, zero-padded) and reused from L2 across all of the task's panels.
        let stride = k.next_multiple_of(32);
        let rows = (X_BLOCK_BYTES / (2 * stride) / MR * MR).clamp(MR, MAX_ROWS_PER_TASK);
        let panels = n.div_ceil(NR);
        let row_blocks = m.div_ceil(rows);
        // Few rows (short texts, the sentence head): split the columns too, so every thread works.
        let want = 4 * rayon::current_num_threads();
        let panel_blocks = if row_blocks >= want { 1 } else { want.div_ceil(row_blocks).min(panels) };
        let per_task = panels.div_ceil(panel_blocks);
        let tasks: Vec<(usize, usize)> =
            (0..row_blocks).flat_map(|r| (0..panels).step_by(per_task).map(move |p| (r * rows, p))).collect();
        tasks.par_iter().for_each_init(Vec::<u16>::new, |buf, &(r0, p0)| {
            let (r1, p1) = ((r0 + rows).min(m), (p0 + per_task).min(panels));
            to_bf16_rows(&x[r0 * k..r1 * k], k, r1 - r0, k, buf, stride);
            // SAFETY: each task writes only rows r0..r1 of columns p0·NR..p1·NR (clipped to n).
            unsafe { self.product(buf, stride, r1 - r0, p0..p1, 0, self.pairs, out_ptr.at(r0 * n + p0 * NR), n) };
        });
        // SAFETY: the tasks cover every row and column once, so all m·n values are written.
        unsafe { out.set_len(m * n) };
        out
    }
}

/// `rows` rows of `k` float32 values, `sx` apart in `x`, → bf16 rows of `stride` values (a
/// multiple of 32, at least k) in `out`, zero-padded.
pub fn to_bf16_rows(x: &[f32], sx: usize, rows: usize, k: usize, out: &mut Vec<u16>, stride: usize) {
    assert!(supported(), "the bf16 kernel needs AVX512-BF16");
    assert!(stride.is_multiple_of(32) && stride >= k && (rows == 0 || (rows - 1) * sx + k <= x.len()));
    out.resize(rows * stride, 0);
    // SAFETY: checked just above.
    unsafe { convert_rows(x, sx, rows, k, out, stride) }
}

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn convert_rows(x: &[f32], sx: usize, rows: usize, k: usize, out: &mut [u16], stride: usize) {
    use std::arch::x86_64::*;
    let mask = |c: usize| if c == 16 { 0xffff } else { ((1u32 << c) - 1) as u16 };
    for r in 0..rows {
        let (src, dst) = (x.as_ptr().add(r * sx), out.as_mut_ptr().add(r * stride));
        for j in (0..stride).step_by(32) {
            let left = k.saturating_sub(j);
            let (lo, hi) = (left.min(16), left.saturating_sub(16).min(16));
            let p = src.add(j.min(k));
            let v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(mask(hi), p.add(lo)), _mm512_maskz_loadu_ps(mask(lo), p));
            _mm512_storeu_si512(dst.add(j).cast(), std::mem::transmute::<__m512bh, __m512i>(v));
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_dispatch(
    r: usize,
    a: *const u16,
    sa: usize,
    w: *const Line,
    pairs: usize,
    c: *mut f32,
    sc: usize,
    cols: usize,
) {
    match r {
        12 => tile::<12>(a, sa, w, pairs, c, sc, cols),
        11 => tile::<11>(a, sa, w, pairs, c, sc, cols),
        10 => tile::<10>(a, sa, w, pairs, c, sc, cols),
        9 => tile::<9>(a, sa, w, pairs, c, sc, cols),
        8 => tile::<8>(a, sa, w, pairs, c, sc, cols),
        7 => tile::<7>(a, sa, w, pairs, c, sc, cols),
        6 => tile::<6>(a, sa, w, pairs, c, sc, cols),
        5 => tile::<5>(a, sa, w, pairs, c, sc, cols),
        4 => tile::<4>(a, sa, w, pairs, c, sc, cols),
        3 => tile::<3>(a, sa, w, pairs, c, sc, cols),
        2 => tile::<2>(a, sa, w, pairs, c, sc, cols),
        1 => tile::<1>(a, sa, w, pairs, c, sc, cols),
        _ => unreachable!("tile of {r} rows"),
    }
}

/// R rows of bf16 x (row stride `sa`) times one packed panel → R × `cols` float32 outputs.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile<const R: usize>(
    a: *const u16,
    sa: usize,
    w: *const Line,
    pairs: usize,
    c: *mut f32,
    sc: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for q in 0..pairs {
        let line = w.add(q).cast::<__m512bh>();
        let (w0, w1) = (line.read(), line.add(1).read());
        for (r, acc) in acc.iter_mut().enumerate() {
            let pair = a.add(r * sa + 2 * q).cast::<i32>().read_unaligned();
            let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            acc[0] = _mm512_dpbf16_ps(acc[0], x, w0);
            acc[1] = _mm512_dpbf16_ps(acc[1], x, w1);
        }
    }
    let (m0, m1) = if cols == NR {
        (0xffff, 0xffff)
    } else {
        let m = (1u32 << cols) - 1;
        (m as u16, (m >> 16) as u16)
    };
    for (r, acc) in acc.iter().enumerate() {
        let row = c.add(r * sc);
        _mm512_mask_storeu_ps(row, m0, acc[0]);
        _mm512_mask_storeu_ps(row.add(16), m1, acc[1]);
    }
}

/// The product as a candle op on a contiguous float32 [m, k] input.
impl CustomOp1 for PackedBf16 {
    fn name(&self) -> &'static str {
        "bf16-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = s else { candle_core::bail!("bf16-linear: expected float32 activations") };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("bf16-linear: expected a contiguous input")
        };
        let (m, k) = l.shape().dims2()?;
        if k != self.k {
            candle_core::bail!("bf16-linear: input has {k} columns, weights {}", self.k)
        }
        Ok((CpuStorage::F32(self.matmul(&data[a..b], m)), Shape::from((m, self.n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn round(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| half::bf16::from_f32(x).to_f64()).collect()
    }

    /// Against a naive product of the bf16-rounded inputs accumulated in f64: the only
    /// difference left is float32 accumulation, bounded relative to Σ|x·w|.
    fn check(m: usize, n: usize, k: usize, threads: usize) {
        let (x, w) = (values(m * k, (m * 31 + k) as u64), values(n * k, (n * 17 + k) as u64));
        let packed = PackedBf16::pack(n, k, |i| &w[i * k..(i + 1) * k]);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let got = pool.install(|| packed.matmul(&x, m));
        assert_eq!(got.len(), m * n);
        let (xr, wr) = (round(&x), round(&w));
        for i in 0..m {
            for j in 0..n {
                let (xi, wj) = (&xr[i * k..(i + 1) * k], &wr[j * k..(j + 1) * k]);
                let want: f64 = xi.iter().zip(wj).map(|(a, b)| a * b).sum();
                let scale: f64 = xi.iter().zip(wj).map(|(a, b)| (a * b).abs()).sum();
                let err = (got[i * n + j] as f64 - want).abs();
                assert!(
                    err <= 1e-5 * scale + 1e-30,
                    "m={m} n={n} k={k} at ({i}, {j}): got {} want {want}",
                    got[i * n + j]
                );
            }
        }
    }

    #[test]
    fn matches_a_naive_product_on_odd_shapes() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 32, 32),
            (1, 768, 3072),
            (1, 7, 5),
            (2, 33, 31),
            (11, 45, 67),
            (12, 64, 768),
            (13, 100, 3072),
            (25, 31, 1001),
            (37, 257, 1152),
            (150, 70, 33),
            (300, 40, 768),
        ] {
            for threads in [1, 2] {
                check(m, n, k, threads);
            }
        }
    }

    #[test]
    fn empty_input_gives_empty_output() {
        if !supported() {
            return;
        }
        let w = values(40 * 8, 3);
        let packed = PackedBf16::pack(40, 8, |i| &w[i * 8..(i + 1) * 8]);
        assert!(packed.matmul(&[], 0).is_empty());
    }
}
