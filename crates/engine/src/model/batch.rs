//! Per-forward-pass inputs shared by every layer: sequence lengths, RoPE tables and, for the
//! portable path, attention masks.
//!
//! With the CPU kernels a batch is packed: the sequences' rows follow each other with no
//! padding, so row-wise work (projections, norms, MLP) runs on real tokens only. Elsewhere it
//! is right-padded to `len`, the shape candle's generic attention with masks needs.

use candle_core::{DType, Device, Tensor};

use super::layers::Placement;
use crate::config::{GemmaConfig, LayerType};
use crate::error::Result;

/// Added to the scores of keys a query must not see. Finite on purpose: a padded query row
/// whose keys are all masked then gets a uniform softmax instead of NaN.
const MASKED: f32 = -1e30;

/// cos and sin of the rotary angles, one row [head_dim / 2] per row of the batch's
/// [1 or B, T, heads, head_dim] projections (rope_thd's layout).
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    /// Angles in float32 the way transformers computes them: inv_freq = 1 / base^(2i/d),
    /// angle = position · inv_freq.
    fn new(base: f64, head_dim: usize, len: usize, dtype: DType, device: &Device) -> Result<Rope> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0f32 / (base as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for pos in 0..len {
            for &f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let table = |v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (len, half), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
        };
        Ok(Rope { cos: table(cos)?, sin: table(sin)? })
    }

    /// Row i takes the angles of position `positions[i]`.
    fn gather(self, positions: &Tensor) -> Result<Rope> {
        Ok(Rope { cos: self.cos.index_select(positions, 0)?, sin: self.sin.index_select(positions, 0)? })
    }
}

/// Float32 additive masks for candle's generic attention: [B, 1, 1, T] hiding padding keys,
/// and [B, 1, T, T] also hiding keys outside the sliding window (`None` when the window covers
/// the whole sequence).
pub struct Masks {
    full: Tensor,
    sliding: Option<Tensor>,
}

impl Masks {
    fn new(lengths: &[usize], len: usize, window: usize, device: &Device) -> Result<Masks> {
        let size = lengths.len();
        let keys: Vec<f32> =
            lengths.iter().flat_map(|&n| (0..len).map(move |k| if k < n { 0.0 } else { MASKED })).collect();
        let full = Tensor::from_vec(keys, (size, 1, 1, len), &Device::Cpu)?.to_device(device)?;
        let sliding = if len > window {
            let mut m = Vec::with_capacity(size * len * len);
            for &n in lengths {
                for q in 0..len {
                    m.extend((0..len).map(|k| if k < n && q.abs_diff(k) < window { 0.0 } else { MASKED }));
                }
            }
            Some(Tensor::from_vec(m, (size, 1, len, len), &Device::Cpu)?.to_device(device)?)
        } else {
            None
        };
        Ok(Masks { full, sliding })
    }

    pub fn get(&self, kind: LayerType) -> &Tensor {
        match (kind, &self.sliding) {
            (LayerType::Sliding, Some(m)) => m,
            _ => &self.full,
        }
    }
}

/// A bucket of sequences, longest `len`: packed (CPU kernels) or right-padded to `len`.
pub struct Batch {
    pub size: usize,
    pub len: usize,
    pub lengths: Vec<usize>,
    /// Rows hold only real tokens, sequence after sequence.
    pub packed: bool,
    /// Keys a sliding layer's query sees: |q − k| < window.
    pub window: usize,
    pub rope_full: Rope,
    pub rope_sliding: Rope,
    /// Set when attention runs on candle's generic ops (GPU, or forced for testing).
    pub masks: Option<Masks>,
}

impl Batch {
    pub fn new(lengths: &[usize], len: usize, cfg: &GemmaConfig, at: &Placement) -> Result<Batch> {
        let window = cfg.sliding_half_window();
        let packed = at.cpu_kernels();
        let masks = if packed { None } else { Some(Masks::new(lengths, len, window, &at.device)?) };
        let rope = |base: f64| -> Result<Rope> {
            let table = Rope::new(base, cfg.head_dim, len, at.activations, &at.device)?;
            if !packed {
                return Ok(table);
            }
            let positions: Vec<u32> = lengths.iter().flat_map(|&n| 0..n as u32).collect();
            let n = positions.len();
            table.gather(&Tensor::from_vec(positions, n, &at.device)?)
        };
        Ok(Batch {
            size: lengths.len(),
            len,
            lengths: lengths.to_vec(),
            packed,
            window,
            rope_full: rope(cfg.rope_theta_full)?,
            rope_sliding: rope(cfg.rope_theta_sliding)?,
            masks,
        })
    }

    /// The [B, T] the rows are laid out as: [1, Σ lengths] packed, [B, len] padded.
    pub fn dims(&self) -> (usize, usize) {
        if self.packed {
            (1, self.lengths.iter().sum())
        } else {
            (self.size, self.len)
        }
    }

    pub fn rope(&self, kind: LayerType) -> &Rope {
        match kind {
            LayerType::Full => &self.rope_full,
            LayerType::Sliding => &self.rope_sliding,
        }
    }
}
