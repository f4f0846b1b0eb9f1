//! Per-forward-pass inputs shared by every layer: sequence lengths, RoPE tables and, for the
//! portable path, attention masks.

use candle_core::{DType, Device, Tensor};

use super::layers::Placement;
use crate::config::{GemmaConfig, LayerType};
use crate::error::Result;

/// Added to the scores of keys a query must not see. Finite on purpose: a padded query row
/// whose keys are all masked then gets a uniform softmax instead of NaN.
const MASKED: f32 = -1e30;

/// cos and sin of the rotary angles for positions 0..T, each [T, head_dim / 2].
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    /// Angles in float32 the way transformers computes them: inv_freq = 1 / base^(2i/d),
    /// angle = position · inv_freq.
    fn new(base: f64, head_dim: usize, len: usize, dtype: DType, device: &Device) -> Result<Rope> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0f32 / (base as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
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
        let keys: Vec<f32> = lengths
            .iter()
            .flat_map(|&n| (0..len).map(move |k| if k < n { 0.0 } else { MASKED }))
            .collect();
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

/// A bucket of right-padded sequences of equal padded length `len`.
pub struct Batch {
    pub size: usize,
    pub len: usize,
    pub lengths: Vec<usize>,
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
        let masks = if at.cpu_kernels() { None } else { Some(Masks::new(lengths, len, window, &at.device)?) };
        Ok(Batch {
            size: lengths.len(),
            len,
            lengths: lengths.to_vec(),
            window,
            rope_full: Rope::new(cfg.rope_theta_full, cfg.head_dim, len, at.activations, &at.device)?,
            rope_sliding: Rope::new(cfg.rope_theta_sliding, cfg.head_dim, len, at.activations, &at.device)?,
            masks,
        })
    }

    pub fn rope(&self, kind: LayerType) -> &Rope {
        match kind {
            LayerType::Full => &self.rope_full,
            LayerType::Sliding => &self.rope_sliding,
        }
    }
}
