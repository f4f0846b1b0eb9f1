//! Bidirectional grouped-query attention with per-head q/k norms and RoPE.

use candle_core::{DType, Tensor};

use super::batch::Batch;
use super::cpu_kernels;
use super::layers::{Linear, Placement, RmsNorm};
use crate::config::{GemmaConfig, LayerType};
use crate::error::Result;
use crate::weights::SafeTensorsFile;

/// Upper bound on attention scores materialised at once (elements), so that a bucket of long
/// texts does not hold every sequence's [heads, T, T] matrix together.
const SCORES_PER_CHUNK: usize = 1 << 24;

pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    pub fn load(file: &SafeTensorsFile, prefix: &str, cfg: &GemmaConfig, at: &Placement) -> Result<Attention> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let name = |n: &str| format!("{prefix}.{n}");
        Ok(Attention {
            q: Linear::load(file, &name("q_proj.weight"), nh * hd, h, at)?,
            k: Linear::load(file, &name("k_proj.weight"), nkv * hd, h, at)?,
            v: Linear::load(file, &name("v_proj.weight"), nkv * hd, h, at)?,
            o: Linear::load(file, &name("o_proj.weight"), h, nh * hd, at)?,
            q_norm: RmsNorm::load(file, &name("q_norm.weight"), hd, cfg.rms_norm_eps, &at.device)?,
            k_norm: RmsNorm::load(file, &name("k_norm.weight"), hd, cfg.rms_norm_eps, &at.device)?,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            scale: cfg.query_pre_attn_scalar.powf(-0.5),
        })
    }

    pub fn bytes(&self) -> usize {
        [&self.q, &self.k, &self.v, &self.o].iter().map(|l| l.bytes()).sum::<usize>()
            + self.q_norm.bytes()
            + self.k_norm.bytes()
    }

    /// Projects x: [B·T, hidden] to [B, T, n, head_dim] (B, T as `batch.dims()`), normed and
    /// rotated when `norm` is given.
    fn project(
        &self,
        proj: &Linear,
        norm: Option<&RmsNorm>,
        x: &Tensor,
        n: usize,
        batch: &Batch,
        kind: LayerType,
    ) -> Result<Tensor> {
        let (b, t) = batch.dims();
        let y = proj.forward(x)?.reshape((b, t, n, self.head_dim))?;
        let Some(norm) = norm else {
            return Ok(y);
        };
        let rope = batch.rope(kind);
        Ok(candle_nn::rotary_emb::rope_thd(&norm.forward(&y)?, &rope.cos, &rope.sin)?)
    }

    /// x: [B·T, hidden] → [B·T, hidden] (B·T = Σ lengths when the batch is packed).
    pub fn forward(&self, x: &Tensor, batch: &Batch, kind: LayerType) -> Result<Tensor> {
        let q = self.project(&self.q, Some(&self.q_norm), x, self.heads, batch, kind)?;
        let k = self.project(&self.k, Some(&self.k_norm), x, self.kv_heads, batch, kind)?;
        let v = self.project(&self.v, None, x, self.kv_heads, batch, kind)?;
        let out = match &batch.masks {
            None => {
                let op = cpu_kernels::Attention {
                    lengths: batch.lengths.clone(),
                    window: (kind == LayerType::Sliding).then_some(batch.window),
                    scale: self.scale as f32,
                };
                q.apply_op3_no_bwd(&k, &v, &op)?
            }
            Some(masks) => self.attend_portable(&q, &k, &v, masks.get(kind), batch)?,
        };
        let (b, t) = batch.dims();
        self.o.forward(&out.reshape((b * t, self.heads * self.head_dim))?)
    }

    /// Attention on candle's generic ops with additive masks: q [B, T, heads, d], k and v
    /// [B, T, kv_heads, d] → [B, T, heads · d].
    fn attend_portable(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, batch: &Batch) -> Result<Tensor> {
        let (b, t, hd) = (batch.size, batch.len, self.head_dim);
        let (nh, nkv) = (self.heads, self.kv_heads);
        let group = nh / nkv;
        // Query heads sharing a key/value head are stacked along the row axis, so one matrix
        // product per kv head serves the whole group without repeating keys and values.
        let q = (q.transpose(1, 2)? * self.scale)?.reshape((b, nkv, group * t, hd))?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;

        let chunk = (SCORES_PER_CHUNK / (nh * t * t)).clamp(1, b);
        let mut outputs = Vec::with_capacity(b.div_ceil(chunk));
        for start in (0..b).step_by(chunk) {
            let n = chunk.min(b - start);
            let (q, k, v) = (q.narrow(0, start, n)?, k.narrow(0, start, n)?, v.narrow(0, start, n)?);
            let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?.reshape((n, nh, t, t))?;
            let scores = scores.broadcast_add(&mask.narrow(0, start, n)?)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
            outputs.push(probs.reshape((n, nkv, group * t, t))?.matmul(&v)?);
        }
        Ok(Tensor::cat(&outputs, 0)?.reshape((b, nh, t, hd))?.transpose(1, 2)?.contiguous()?)
    }
}
