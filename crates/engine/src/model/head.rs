//! Sentence head: mean pooling over real tokens, the Dense projections, L2 normalisation.

use candle_core::{DType, Device, Tensor};

use super::layers::{Linear, Placement};
use crate::config::DenseConfig;
use crate::error::Result;
use crate::weights::SafeTensorsFile;

pub struct SentenceHead {
    dense: Vec<Linear>,
    at: Placement,
}

impl SentenceHead {
    pub fn load(configs: &[DenseConfig], at: &Placement) -> Result<SentenceHead> {
        let dense = configs
            .iter()
            .map(|c| {
                let file = SafeTensorsFile::open(&c.dir.join("model.safetensors"))?;
                Linear::load(&file, "linear.weight", c.out_features, c.in_features, at)
            })
            .collect::<Result<Vec<_>>>()?;
        super::layers::release_load_transients();
        // As in `Encoder::load`: the uploads must be done before another thread's stream uses them.
        at.device.synchronize()?;
        Ok(SentenceHead { dense, at: at.clone() })
    }

    pub fn bytes(&self) -> usize {
        self.dense.iter().map(Linear::bytes).sum()
    }

    /// hidden: [Σ lengths, width] packed or [B·len, width] right-padded (`Encoder::forward`)
    /// → B unit vectors. The row count tells the layouts apart; where it cannot, they agree.
    pub fn forward(&self, hidden: &Tensor, lengths: &[usize], len: usize) -> Result<Vec<Vec<f32>>> {
        let width = hidden.dim(1)?;
        let packed = hidden.dim(0)? == lengths.iter().sum::<usize>();
        let hidden = hidden.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let values = hidden.flatten_all()?.to_vec1::<f32>()?;
        let mut pooled = Vec::with_capacity(lengths.len() * width);
        let mut start = 0;
        for &n in lengths {
            let rows = &values[start * width..(start + n) * width];
            start += if packed { n } else { len };
            let mut sum = vec![0f64; width];
            for row in rows.chunks_exact(width) {
                sum.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
            }
            pooled.extend(sum.iter().map(|&s| (s / n as f64) as f32));
        }
        let mut x = Tensor::from_vec(pooled, (lengths.len(), width), &Device::Cpu)?
            .to_dtype(self.at.activations)?
            .to_device(&self.at.device)?;
        for dense in &self.dense {
            x = dense.forward(&x)?;
        }
        let x = x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
        Ok(x.into_iter().map(|v| normalize(&v)).collect())
    }
}

/// v / ‖v‖ (a zero vector stays zero, as with torch's F.normalize).
pub fn normalize(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt().max(1e-12);
    v.iter().map(|&x| (x as f64 / norm) as f32).collect()
}
