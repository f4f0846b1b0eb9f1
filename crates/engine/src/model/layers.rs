//! Building blocks shared by the encoder and the sentence head.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

use crate::error::{Error, Result};
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

/// Returns the heap pages freed while loading (float32 copies of bf16 weights, the parts of
/// stacked weights) to the system: the engine keeps freed memory on the heap for reuse, so
/// without this they would stay resident for the life of the process.
pub fn release_load_transients() {
    crate::reuse_alloc::trim_malloc();
}

/// A bias-free linear layer, weight stored [out, in] as in the checkpoint.
pub struct Linear {
    weight: Weight,
}

enum Weight {
    Tensor(Tensor),
    /// bf16 weights on a CPU with AVX512-BF16, packed for `bf16_gemm`.
    #[cfg(target_arch = "x86_64")]
    Packed(super::bf16_gemm::PackedBf16),
}

/// Set to `off` (or `0`) to keep bf16 weights widened to float32 per product even where the
/// CPU has AVX512-BF16: the path CPUs without it take, kept testable everywhere.
pub const BF16_KERNEL_ENV: &str = "EMBEDDINGGEMMA_BF16_KERNEL";

/// Whether bf16 weights at `at` are packed for the AVX512-BF16 kernel.
pub fn bf16_kernel(at: &Placement) -> bool {
    let disabled = std::env::var(BF16_KERNEL_ENV).is_ok_and(|v| matches!(v.trim(), "off" | "0" | "false"));
    #[cfg(target_arch = "x86_64")]
    let supported = super::bf16_gemm::supported();
    #[cfg(not(target_arch = "x86_64"))]
    let supported = false;
    at.device.is_cpu() && at.weights == DType::BF16 && at.activations == DType::F32 && supported && !disabled
}

impl Linear {
    pub fn load(file: &SafeTensorsFile, name: &str, out_dim: usize, in_dim: usize, at: &Placement) -> Result<Linear> {
        Linear::load_stacked(file, &[name], out_dim, in_dim, at)
    }

    /// Several projections of the same input stacked into one, outputs side by side.
    pub fn load_stacked(
        file: &SafeTensorsFile,
        names: &[&str],
        out_dim: usize,
        in_dim: usize,
        at: &Placement,
    ) -> Result<Linear> {
        #[cfg(target_arch = "x86_64")]
        if bf16_kernel(at) {
            // Read as float32 and round once while packing: no bf16 tensor in between.
            let tensors = names
                .iter()
                .map(|n| file.load(n, &[out_dim, in_dim], DType::F32, &Device::Cpu))
                .collect::<Result<Vec<_>>>()?;
            let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
            let parts = guards
                .iter()
                .map(|(s, l)| match (&**s, l.contiguous_offsets()) {
                    (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(&v[a..b]),
                    _ => Err(Error::Inference(format!("{}: expected contiguous float32 weights on the CPU", names[0]))),
                })
                .collect::<Result<Vec<_>>>()?;
            let row = |i: usize| &parts[i / out_dim][(i % out_dim) * in_dim..(i % out_dim + 1) * in_dim];
            let packed = super::bf16_gemm::PackedBf16::pack(names.len() * out_dim, in_dim, row);
            return Ok(Linear { weight: Weight::Packed(packed) });
        }
        let mut parts = names
            .iter()
            .map(|n| file.load(n, &[out_dim, in_dim], at.weights, &at.device))
            .collect::<Result<Vec<_>>>()?;
        let weight = if parts.len() == 1 { parts.pop().unwrap() } else { Tensor::cat(&parts, 0)? };
        Ok(Linear { weight: Weight::Tensor(weight) })
    }

    /// x: [n, in] → [n, out], in the activations' precision.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Tensor(w) if w.dtype() == x.dtype() => Ok(x.matmul(&w.t()?)?),
            // bfloat16 weights on a CPU without the kernel: candle has no bf16 matrix product
            // there, so the stored weights are widened per call and the product runs in float32.
            Weight::Tensor(w) => Ok(x.matmul(&w.to_dtype(x.dtype())?.t()?)?),
            #[cfg(target_arch = "x86_64")]
            Weight::Packed(p) => Ok(x.contiguous()?.apply_op1_no_bwd(p)?),
        }
    }

    pub fn bytes(&self) -> usize {
        match &self.weight {
            Weight::Tensor(w) => w.elem_count() * w.dtype().size_in_bytes(),
            #[cfg(target_arch = "x86_64")]
            Weight::Packed(p) => p.bytes(),
        }
    }
}
