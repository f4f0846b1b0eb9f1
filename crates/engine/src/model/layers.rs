//! Building blocks shared by the encoder and the sentence head.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::weights::SafeTensorsFile;

/// Where and in which precision weights live, and the precision activations flow in.
#[derive(Debug, Clone)]
pub struct Placement {
    pub device: Device,
    pub weights: DType,
    pub activations: DType,
    /// Use candle's generic ops even where a CPU kernel exists (the path GPUs take).
    pub portable: bool,
}

impl Placement {
    /// Whether the float32 CPU kernels (`cpu_kernels`) run attention and the MLP gate.
    pub fn cpu_kernels(&self) -> bool {
        self.device.is_cpu() && self.activations == DType::F32 && !self.portable
    }
}

/// Gemma's RMSNorm: x · rsqrt(mean(x²) + eps) · (1 + w), always computed in float32.
pub struct RmsNorm {
    alpha: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(file: &SafeTensorsFile, name: &str, dim: usize, eps: f64, device: &Device) -> Result<RmsNorm> {
        let w = file.load(name, &[dim], DType::F32, device)?;
        Ok(RmsNorm { alpha: (w + 1.0)?, eps: eps as f32 })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let y = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?.contiguous()?, &self.alpha, self.eps)?;
        Ok(y.to_dtype(dtype)?)
    }

    pub fn bytes(&self) -> usize {
        self.alpha.elem_count() * 4
    }
}

/// A bias-free linear layer, weight stored [out, in] as in the checkpoint.
pub struct Linear {
    weight: Tensor,
}

impl Linear {
    pub fn load(file: &SafeTensorsFile, name: &str, out_dim: usize, in_dim: usize, at: &Placement) -> Result<Linear> {
        Ok(Linear { weight: file.load(name, &[out_dim, in_dim], at.weights, &at.device)? })
    }

    /// Several projections of the same input stacked into one, outputs side by side.
    pub fn load_stacked(file: &SafeTensorsFile, names: &[&str], out_dim: usize, in_dim: usize, at: &Placement) -> Result<Linear> {
        let parts = names
            .iter()
            .map(|n| file.load(n, &[out_dim, in_dim], at.weights, &at.device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Linear { weight: Tensor::cat(&parts, 0)? })
    }

    /// x: [n, in] → [n, out], in the activations' precision.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.weight.dtype() == x.dtype() {
            return Ok(x.matmul(&self.weight.t()?)?);
        }
        // bfloat16 weights on a CPU: candle has no bf16 matrix product there, so the stored
        // weights are widened per call and the product runs in float32.
        let w = self.weight.to_dtype(x.dtype())?;
        Ok(x.matmul(&w.t()?)?)
    }

    pub fn bytes(&self) -> usize {
        self.weight.elem_count() * self.weight.dtype().size_in_bytes()
    }
}
