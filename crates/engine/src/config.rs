//! The sentence-transformers directory: encoder config, modules, prompts, sequence limit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::manifest::Manifest;

/// Reads a model file: the engine passes one that checks each file's bytes against the
/// manifest as it reads them, so what is parsed is what was verified.
pub type Reader<'a> = &'a dyn Fn(&Path) -> Result<Vec<u8>>;

/// A `Reader` that refuses files the manifest does not cover or whose sha256 differs.
pub fn verified_reader<'a>(dir: &'a Path, manifest: &'a Manifest) -> impl Fn(&Path) -> Result<Vec<u8>> + 'a {
    move |path: &Path| {
        let relative = path.strip_prefix(dir).unwrap_or(path).to_string_lossy().into_owned();
        if !manifest.covers(&relative) {
            return Err(Error::file(path, "no sha256 is known for this file, so it cannot be verified"));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
        manifest.check_bytes(path, &relative, &bytes)?;
        Ok(bytes)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    Full,
    Sliding,
}

/// The Gemma 3 text encoder's shape, read from `config.json` in either RoPE form.
#[derive(Debug, Clone)]
pub struct GemmaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub query_pre_attn_scalar: f64,
    pub sliding_window: usize,
    pub layer_types: Vec<LayerType>,
    pub rope_theta_full: f64,
    pub rope_theta_sliding: f64,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    pub max_position_embeddings: Option<usize>,
}

impl GemmaConfig {
    /// Sliding layers let a query see keys with |q − k| < window (transformers' bidirectional rule).
    pub fn sliding_half_window(&self) -> usize {
        self.sliding_window / 2 + 1
    }
}

#[derive(Debug, Clone)]
pub struct DenseConfig {
    pub dir: PathBuf,
    pub in_features: usize,
    pub out_features: usize,
}

/// Everything read from the model directory's JSON files.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub encoder: GemmaConfig,
    pub dense: Vec<DenseConfig>,
    pub max_seq_length: usize,
    pub prompts: BTreeMap<String, String>,
}

fn read_json(read: Reader, path: &Path) -> Result<Value> {
    json_from_slice(path, &read(path)?)
}

fn json_from_slice(path: &Path, bytes: &[u8]) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}

fn parse<T: for<'de> Deserialize<'de>>(path: &Path, value: Value) -> Result<T> {
    serde_json::from_value(value).map_err(|e| Error::file(path, e))
}

#[derive(Deserialize)]
struct RawGemma {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    rms_norm_eps: f64,
    query_pre_attn_scalar: f64,
    sliding_window: usize,
    layer_types: Option<Vec<String>>,
    #[serde(alias = "sliding_window_pattern", rename = "_sliding_window_pattern")]
    sliding_window_pattern: Option<usize>,
    rope_theta: Option<f64>,
    rope_local_base_freq: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    hidden_activation: Option<String>,
    attn_logit_softcapping: Option<f64>,
    use_bidirectional_attention: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<u32>,
    max_position_embeddings: Option<usize>,
}

fn rope_theta(raw: &RawGemma, kind: &str, legacy: Option<f64>) -> Option<f64> {
    raw.rope_parameters.as_ref().and_then(|p| p.get(kind)?.get("rope_theta")?.as_f64()).or(legacy)
}

impl GemmaConfig {
    /// Parses `config.json`'s contents (`path` names it in errors).
    pub fn from_slice(path: &Path, bytes: &[u8]) -> Result<GemmaConfig> {
        let raw: RawGemma = parse(path, json_from_slice(path, bytes)?)?;
        let bad = |reason: String| Error::file(path, reason);
        if raw.use_bidirectional_attention == Some(false) {
            return Err(bad("use_bidirectional_attention is false: not an embedding model".into()));
        }
        if let Some(act) = &raw.hidden_activation {
            if act != "gelu_pytorch_tanh" {
                return Err(bad(format!("hidden_activation {act:?} is not supported")));
            }
        }
        let scaled = |v: &Value| v.get("rope_type").and_then(Value::as_str).is_some_and(|t| t != "default");
        let rope_scaled = raw.rope_scaling.as_ref().is_some_and(|v| !v.is_null())
            || raw.rope_parameters.as_ref().and_then(Value::as_object).is_some_and(|p| p.values().any(scaled));
        if rope_scaled {
            return Err(bad("RoPE scaling is not supported (only rope_type \"default\")".into()));
        }
        if raw.attn_logit_softcapping.is_some() {
            return Err(bad("attn_logit_softcapping is not supported".into()));
        }
        let layer_types = match (&raw.layer_types, raw.sliding_window_pattern) {
            (Some(types), _) => types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(LayerType::Full),
                    "sliding_attention" => Ok(LayerType::Sliding),
                    other => Err(bad(format!("unknown layer type {other:?}"))),
                })
                .collect::<Result<Vec<_>>>()?,
            (None, Some(p)) if p > 0 => (0..raw.num_hidden_layers)
                .map(|i| if (i + 1) % p == 0 { LayerType::Full } else { LayerType::Sliding })
                .collect(),
            _ => return Err(bad("neither layer_types nor sliding_window_pattern is set".into())),
        };
        if layer_types.len() != raw.num_hidden_layers {
            return Err(bad(format!(
                "layer_types lists {} layers, num_hidden_layers is {}",
                layer_types.len(),
                raw.num_hidden_layers
            )));
        }
        if raw.num_key_value_heads == 0 || !raw.num_attention_heads.is_multiple_of(raw.num_key_value_heads) {
            return Err(bad("num_attention_heads must be a multiple of num_key_value_heads".into()));
        }
        let rope_theta_full = rope_theta(&raw, "full_attention", raw.rope_theta)
            .ok_or_else(|| bad("no RoPE base for full attention".into()))?;
        let rope_theta_sliding = rope_theta(&raw, "sliding_attention", raw.rope_local_base_freq)
            .ok_or_else(|| bad("no RoPE base for sliding attention".into()))?;
        let eos_token_id = match &raw.eos_token_id {
            Some(Value::Number(n)) => n.as_u64().map(|n| n as u32),
            Some(Value::Array(a)) => a.first().and_then(Value::as_u64).map(|n| n as u32),
            _ => None,
        };
        Ok(GemmaConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads,
            head_dim: raw.head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            query_pre_attn_scalar: raw.query_pre_attn_scalar,
            sliding_window: raw.sliding_window,
            layer_types,
            rope_theta_full,
            rope_theta_sliding,
            bos_token_id: raw.bos_token_id.unwrap_or(2),
            eos_token_id: eos_token_id.unwrap_or(1),
            pad_token_id: raw.pad_token_id.unwrap_or(0),
            max_position_embeddings: raw.max_position_embeddings,
        })
    }
}

#[derive(Deserialize)]
struct RawModule {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct RawDense {
    in_features: usize,
    out_features: usize,
    #[serde(default)]
    bias: bool,
    activation_function: Option<String>,
}

fn module_kind(kind: &str) -> &str {
    kind.rsplit('.').next().unwrap_or(kind)
}

fn check_pooling(read: Reader, path: &Path) -> Result<()> {
    let v = read_json(read, path)?;
    let mean = v.get("pooling_mode").and_then(Value::as_str) == Some("mean")
        || v.get("pooling_mode_mean_tokens").and_then(Value::as_bool) == Some(true);
    let include_prompt = v.get("include_prompt").and_then(Value::as_bool).unwrap_or(true);
    if !mean || !include_prompt {
        return Err(Error::file(path, "only mean pooling over all tokens (prompt included) is supported"));
    }
    Ok(())
}

/// sentence-transformers' rule: `sentence_bert_config.json`'s max_seq_length, else the smaller
/// of the tokenizer's model_max_length and the encoder's max_position_embeddings.
fn max_seq_length(read: Reader, dir: &Path, encoder: &GemmaConfig) -> Result<usize> {
    let st_path = dir.join("sentence_bert_config.json");
    let configured = read_json(read, &st_path)?.get("max_seq_length").and_then(Value::as_u64);
    let limit = match configured {
        Some(n) => n as usize,
        None => {
            let tok_path = dir.join("tokenizer_config.json");
            let from_tokenizer = read_json(read, &tok_path)?.get("model_max_length").and_then(Value::as_u64);
            [from_tokenizer.map(|n| n as usize), encoder.max_position_embeddings]
                .into_iter()
                .flatten()
                .min()
                .ok_or_else(|| Error::file(&st_path, "max_seq_length is missing"))?
        }
    };
    if limit < 2 {
        return Err(Error::file(&st_path, "max_seq_length must be at least 2"));
    }
    Ok(limit)
}

impl ModelConfig {
    /// Reads the directory's JSON files through `read`.
    pub fn from_dir(dir: &Path, read: Reader) -> Result<ModelConfig> {
        let config_path = dir.join("config.json");
        let encoder = GemmaConfig::from_slice(&config_path, &read(&config_path)?)?;

        let modules_path = dir.join("modules.json");
        let modules: Vec<RawModule> = parse(&modules_path, read_json(read, &modules_path)?)?;
        let kinds: Vec<&str> = modules.iter().map(|m| module_kind(&m.kind)).collect();
        let mut dense = Vec::new();
        let mut pooling = false;
        let mut normalize = false;
        for (module, kind) in modules.iter().zip(&kinds) {
            let relative = Path::new(&module.path);
            if relative.is_absolute() || relative.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                return Err(Error::file(
                    &modules_path,
                    format!("module path {:?} leaves the model directory", module.path),
                ));
            }
            let mdir = dir.join(relative);
            match *kind {
                "Transformer" if module.path.is_empty() => {}
                "Pooling" => {
                    check_pooling(read, &mdir.join("config.json"))?;
                    pooling = true;
                }
                "Dense" => {
                    let cfg_path = mdir.join("config.json");
                    let raw: RawDense = parse(&cfg_path, read_json(read, &cfg_path)?)?;
                    let identity = raw.activation_function.as_deref().is_none_or(|a| a.ends_with("Identity"));
                    if raw.bias || !identity {
                        return Err(Error::file(
                            cfg_path,
                            "only bias-free Dense layers with identity activation are supported",
                        ));
                    }
                    dense.push(DenseConfig { dir: mdir, in_features: raw.in_features, out_features: raw.out_features });
                }
                "Normalize" => normalize = true,
                other => {
                    return Err(Error::file(
                        &modules_path,
                        format!("unsupported module {other:?} at {:?}", module.path),
                    ))
                }
            }
        }
        if kinds.first() != Some(&"Transformer") || !pooling || !normalize {
            return Err(Error::file(&modules_path, "expected Transformer, Pooling, Dense…, Normalize"));
        }
        let mut width = encoder.hidden_size;
        for d in &dense {
            if d.in_features != width {
                return Err(Error::file(
                    d.dir.join("config.json"),
                    format!("in_features {} does not follow width {width}", d.in_features),
                ));
            }
            width = d.out_features;
        }

        let max_seq_length = max_seq_length(read, dir, &encoder)?;

        let prompts_path = dir.join("config_sentence_transformers.json");
        let prompts = match read_json(read, &prompts_path) {
            Ok(v) => match v.get("prompts") {
                Some(p) => parse(&prompts_path, p.clone())?,
                None => BTreeMap::new(),
            },
            Err(_) if !prompts_path.exists() => BTreeMap::new(),
            Err(e) => return Err(e),
        };

        Ok(ModelConfig { encoder, dense, max_seq_length, prompts })
    }

    /// Width of the final sentence vector.
    pub fn output_dim(&self) -> usize {
        self.dense.last().map_or(self.encoder.hidden_size, |d| d.out_features)
    }
}
