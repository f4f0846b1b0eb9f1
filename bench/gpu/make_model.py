"""Writes an EmbeddingGemma-300m-shaped model with random weights, in the sentence-transformers
layout that both our engine and sentence-transformers load, plus a SHA256SUMS for `--checksums`.

usage: make_model.py OUT_DIR --tokenizer-from DIR [--seed N]

The architecture is the real model's (config.json of google/embeddinggemma-300m: 24 layers,
hidden 768, 3 query heads and 1 kv head of 256, MLP 1152, sliding window 512, Dense 768→3072→768),
except the vocabulary, which is the tokenizer's from DIR (the tiny fixture's 768 tokens): the
real tokenizer (33 MB) and its 262,144-row table (805 MB) do not fit what travels to a lent GPU
machine, and each token only reads one row of the table, so the compute per token is the real
model's. Weights are N(0, 0.02²) — the model's initializer_range — and norm weights N(0, 0.05²)
around Gemma's (1 + w), so every layer's activations stay of unit scale: the vectors are neither
NaN nor all alike (check.py measures their spread). Deterministic for a seed (CPU generator).
Needs torch and safetensors (installed on the lent machine), not numpy.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

# config.json of google/embeddinggemma-300m (transformers 4.57 form), vocab_size set below.
CONFIG = {
    "_sliding_window_pattern": 6,
    "architectures": ["Gemma3TextModel"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "dtype": "float32",
    "eos_token_id": 1,
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 1152,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 4,
    "max_position_embeddings": 2048,
    "model_type": "gemma3_text",
    "num_attention_heads": 3,
    "num_hidden_layers": 24,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 512,
    "transformers_version": "4.57.0.dev0",
    "use_bidirectional_attention": True,
    "use_cache": True,
    "vocab_size": None,
}

PROMPTS = {
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
    "BitextMining": "task: search result | query: ",
    "Clustering": "task: clustering | query: ",
    "Classification": "task: classification | query: ",
    "InstructionRetrieval": "task: code retrieval | query: ",
    "MultilabelClassification": "task: classification | query: ",
    "PairClassification": "task: sentence similarity | query: ",
    "Reranking": "task: search result | query: ",
    "Retrieval": "task: search result | query: ",
    "Retrieval-query": "task: search result | query: ",
    "Retrieval-document": "title: none | text: ",
    "STS": "task: sentence similarity | query: ",
    "Summarization": "task: summarization | query: ",
}

# The module types the real model's modules.json names (every sentence-transformers version
# still resolves them).
MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"},
    {"idx": 4, "name": "4", "path": "4_Normalize", "type": "sentence_transformers.models.Normalize"},
]

POOLING = {
    "word_embedding_dimension": 768,
    "pooling_mode_cls_token": False,
    "pooling_mode_mean_tokens": True,
    "pooling_mode_max_tokens": False,
    "pooling_mode_mean_sqrt_len_tokens": False,
    "pooling_mode_weightedmean_tokens": False,
    "pooling_mode_lasttoken": False,
    "include_prompt": True,
}

WEIGHT_STD = 0.02
NORM_STD = 0.05


def vocab_size(tokenizer_json):
    tok = json.load(open(tokenizer_json, encoding="utf-8"))
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens", [])]
    return max(ids) + 1


def write_json(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def encoder_weights(cfg, gen):
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def w(*shape):
        return torch.randn(*shape, generator=gen) * WEIGHT_STD

    def norm(n):
        return torch.randn(n, generator=gen) * NORM_STD

    t = {"embed_tokens.weight": w(cfg["vocab_size"], h), "norm.weight": norm(h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"layers.{n}."
        t[p + "input_layernorm.weight"] = norm(h)
        t[p + "post_attention_layernorm.weight"] = norm(h)
        t[p + "pre_feedforward_layernorm.weight"] = norm(h)
        t[p + "post_feedforward_layernorm.weight"] = norm(h)
        t[p + "self_attn.q_proj.weight"] = w(nh * hd, h)
        t[p + "self_attn.k_proj.weight"] = w(nkv * hd, h)
        t[p + "self_attn.v_proj.weight"] = w(nkv * hd, h)
        t[p + "self_attn.o_proj.weight"] = w(h, nh * hd)
        t[p + "self_attn.q_norm.weight"] = norm(hd)
        t[p + "self_attn.k_norm.weight"] = norm(hd)
        t[p + "mlp.gate_proj.weight"] = w(i, h)
        t[p + "mlp.up_proj.weight"] = w(i, h)
        t[p + "mlp.down_proj.weight"] = w(h, i)
    return t


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--tokenizer-from", required=True, help="model directory whose tokenizer.json to use")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    out = os.path.abspath(args.out)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    gen = torch.Generator().manual_seed(args.seed)

    cfg = dict(CONFIG, vocab_size=vocab_size(os.path.join(args.tokenizer_from, "tokenizer.json")))
    write_json(os.path.join(out, "config.json"), cfg)
    shutil.copyfile(os.path.join(args.tokenizer_from, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    tok_cfg = json.load(open(os.path.join(args.tokenizer_from, "tokenizer_config.json"), encoding="utf-8"))
    tok_cfg["model_max_length"] = cfg["max_position_embeddings"]
    write_json(os.path.join(out, "tokenizer_config.json"), tok_cfg)
    write_json(os.path.join(out, "modules.json"), MODULES)
    write_json(os.path.join(out, "sentence_bert_config.json"), {"max_seq_length": 2048, "do_lower_case": False})
    write_json(
        os.path.join(out, "config_sentence_transformers.json"),
        {"model_type": "SentenceTransformer", "prompts": PROMPTS, "default_prompt_name": None, "similarity_fn_name": "cosine"},
    )
    write_json(os.path.join(out, "1_Pooling", "config.json"), POOLING)
    os.makedirs(os.path.join(out, "4_Normalize"), exist_ok=True)

    save_file(encoder_weights(cfg, gen), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    h = cfg["hidden_size"]
    for name, (n_in, n_out) in {"2_Dense": (h, 4 * h), "3_Dense": (4 * h, h)}.items():
        write_json(
            os.path.join(out, name, "config.json"),
            {"in_features": n_in, "out_features": n_out, "bias": False, "activation_function": "torch.nn.modules.linear.Identity"},
        )
        weight = torch.randn(n_out, n_in, generator=gen) * WEIGHT_STD
        save_file({"linear.weight": weight}, os.path.join(out, name, "model.safetensors"), metadata={"format": "pt"})

    # Every file that changes vectors, as the engine's --checksums wants them.
    files = [
        "model.safetensors", "2_Dense/model.safetensors", "3_Dense/model.safetensors", "tokenizer.json",
        "config.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
        "1_Pooling/config.json", "2_Dense/config.json", "3_Dense/config.json", "tokenizer_config.json",
    ]
    with open(os.path.join(out, "SHA256SUMS"), "w", encoding="utf-8") as f:
        for rel in files:
            f.write(f"{sha256(os.path.join(out, rel))}  {rel}\n")
    size = sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(out) for n in names)
    print(f"wrote {out}: vocab {cfg['vocab_size']}, {size / 2**20:.0f} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
