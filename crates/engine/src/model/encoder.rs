//! The bidirectional Gemma 3 encoder: scaled token embeddings, sandwich-normed attention and
//! gelu-tanh gated MLP blocks, final norm.

use candle_core::{Device, Tensor};

use super::attention::Attention;
use super::batch::Batch;
use super::cpu_kernels;
use super::layers::{self, Linear, Placement, RmsNorm};
use crate::config::{GemmaConfig, LayerType};
use crate::error::{Error, Result};
use crate::weights::{EmbeddingTable, SafeTensorsFile};

/// down(gelu_tanh(gate(x)) · up(x)), gate and up computed as one stacked projection.
struct Mlp {
    gate_up: Linear,
    down: Linear,
    width: usize,
}

impl Mlp {
    fn load(file: &SafeTensorsFile, prefix: &str, cfg: &GemmaConfig, at: &Placement) -> Result<Mlp> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let names = [format!("{prefix}.gate_proj.weight"), format!("{prefix}.up_proj.weight")];
        Ok(Mlp {
            gate_up: Linear::load_stacked(file, &[&names[0], &names[1]], i, h, at)?,
            down: Linear::load(file, &format!("{prefix}.down_proj.weight"), h, i, at)?,
            width: i,
        })
    }

    fn forward(&self, x: &Tensor, at: &Placement) -> Result<Tensor> {
        let gate_up = self.gate_up.forward(x)?;
        let gated = if at.cpu_kernels() {
            gate_up.apply_op1_no_bwd(&cpu_kernels::GeluGate)?
        } else {
            (gate_up.narrow(1, 0, self.width)?.gelu()? * gate_up.narrow(1, self.width, self.width)?)?
        };
        self.down.forward(&gated)
    }

    fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }
}

struct Layer {
    kind: LayerType,
    input_norm: RmsNorm,
    attention: Attention,
    post_attention_norm: RmsNorm,
    pre_feedforward_norm: RmsNorm,
    mlp: Mlp,
    post_feedforward_norm: RmsNorm,
}

impl Layer {
    fn load(file: &SafeTensorsFile, index: usize, cfg: &GemmaConfig, at: &Placement) -> Result<Layer> {
        let prefix = format!("layers.{index}");
        let norm = |n: &str| {
            RmsNorm::load(file, &format!("{prefix}.{n}.weight"), cfg.hidden_size, cfg.rms_norm_eps, &at.device)
        };
        Ok(Layer {
            kind: cfg.layer_types[index],
            input_norm: norm("input_layernorm")?,
            attention: Attention::load(file, &format!("{prefix}.self_attn"), cfg, at)?,
            post_attention_norm: norm("post_attention_layernorm")?,
            pre_feedforward_norm: norm("pre_feedforward_layernorm")?,
            mlp: Mlp::load(file, &format!("{prefix}.mlp"), cfg, at)?,
            post_feedforward_norm: norm("post_feedforward_layernorm")?,
        })
    }

    fn forward(&self, x: &Tensor, batch: &Batch, at: &Placement) -> Result<Tensor> {
        let attended = self.attention.forward(&self.input_norm.forward(x)?, batch, self.kind)?;
        let x = (x + self.post_attention_norm.forward(&attended)?)?;
        let fed = self.mlp.forward(&self.pre_feedforward_norm.forward(&x)?, at)?;
        Ok((x + self.post_feedforward_norm.forward(&fed)?)?)
    }

    fn bytes(&self) -> usize {
        self.attention.bytes()
            + self.mlp.bytes()
            + [&self.input_norm, &self.post_attention_norm, &self.pre_feedforward_norm, &self.post_feedforward_norm]
                .iter()
                .map(|n| n.bytes())
                .sum::<usize>()
    }
}

pub struct Encoder {
    cfg: GemmaConfig,
    at: Placement,
    embeddings: EmbeddingTable,
    embed_scale: f32,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// Attention products in bf16 too (bf16 weights packed for the AVX512-BF16 kernel).
    bf16_attention: bool,
}

impl Encoder {
    pub fn load(file: &SafeTensorsFile, cfg: &GemmaConfig, at: &Placement) -> Result<Encoder> {
        let layers = (0..cfg.layer_types.len()).map(|i| Layer::load(file, i, cfg, at)).collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(file, "norm.weight", cfg.hidden_size, cfg.rms_norm_eps, &at.device)?;
        layers::release_load_transients();
        // On CUDA the uploads ran on this thread's stream (candle uses per-thread streams), and
        // forward passes run on other threads' streams, which do not wait for it.
        at.device.synchronize()?;
        Ok(Encoder {
            embeddings: file.embedding_table("embed_tokens.weight", cfg.vocab_size, cfg.hidden_size)?,
            embed_scale: (cfg.hidden_size as f32).sqrt(),
            layers,
            norm,
            cfg: cfg.clone(),
            at: at.clone(),
            bf16_attention: layers::bf16_kernel(at) && at.cpu_kernels(),
        })
    }

    /// Bytes of weights held in this process (the embedding table is shared, not counted).
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(Layer::bytes).sum::<usize>() + self.norm.bytes()
    }

    /// Runs `seqs` (each at most `len` ids) to the last hidden state: [Σ lengths, hidden] with
    /// the sequences' rows one after another on the CPU kernels (packed: no compute is spent on
    /// padding), else [B·len, hidden] right-padded. `SentenceHead::forward` takes either.
    /// `cancel` is polled between layers.
    pub fn forward(&self, seqs: &[&[u32]], len: usize, cancel: &(dyn Fn() -> bool + Sync)) -> Result<Tensor> {
        let hidden = self.cfg.hidden_size;
        let lengths: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let batch = Batch::new(&lengths, len, &self.cfg, &self.at)?;
        let (b, t) = batch.dims();
        let pad = if batch.packed { 0 } else { len };
        let mut rows = Vec::with_capacity(b * t * hidden);
        for seq in seqs {
            for &id in seq.iter().chain(std::iter::repeat_n(&self.cfg.pad_token_id, pad.saturating_sub(seq.len()))) {
                self.embeddings.gather_row(id, self.embed_scale, &mut rows)?;
            }
        }
        let mut x = Tensor::from_vec(rows, (b * t, hidden), &Device::Cpu)?
            .to_dtype(self.at.activations)?
            .to_device(&self.at.device)?;
        for layer in &self.layers {
            if cancel() {
                return Err(Error::Cancelled);
            }
            x = cpu_kernels::with_bf16_attention(self.bf16_attention, || layer.forward(&x, &batch, &self.at))?;
        }
        self.norm.forward(&x)
    }
}
