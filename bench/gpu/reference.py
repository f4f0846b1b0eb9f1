"""The reference side of bench/gpu-check: sentence-transformers on the same model directory.

usage: reference.py JOB.json RESULT.json

JOB: {"model": DIR, "device": "cuda"|"cpu", "parity_texts": [...],
      "speed": [{"name": ..., "corpus": FILE.jsonl, "limit": N}], "batch_sizes": [...],
      "dtypes": ["fp32", "bf16"]}
RESULT: versions, parity vectors per dtype (texts as given: prompts already prepended),
speed runs (texts/s, tokens/s, peak GPU memory per batch size and dtype).

Kept apart from check.py so that the check itself needs only Python's standard library:
torch is imported here alone, where it is installed (the lent GPU machine).
"""

import json
import sys
import time

import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load(model_dir, device, dtype):
    model = SentenceTransformer(model_dir, device=device)
    if dtype != "fp32":
        model = model.to(DTYPES[dtype])
    model.eval()
    return model


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def encode(model, texts, batch_size, prompt_name=None):
    with torch.inference_mode():
        v = model.encode(texts, batch_size=batch_size, prompt_name=prompt_name, convert_to_tensor=True)
    return v.float().cpu()


def token_count(model, texts, prompt):
    limit = model.max_seq_length
    ids = model.tokenizer([prompt + t for t in texts], add_special_tokens=True)["input_ids"]
    return sum(min(limit, len(i)) for i in ids)


def main():
    job = json.load(open(sys.argv[1], encoding="utf-8"))
    device = job["device"]
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32, as in our engine
    torch.backends.cudnn.allow_tf32 = False
    result = {
        "versions": {
            "torch": torch.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        },
        "parity": {},
        "speed": [],
        "not_run": [],
    }
    deadline = job.get("deadline_epoch", float("inf"))
    last = 0.0
    corpora = {}
    for spec in job.get("speed", []):
        lines = open(spec["corpus"], encoding="utf-8").read().splitlines()
        corpora[spec["name"]] = [json.loads(l) for l in lines[: spec.get("limit") or len(lines)]]

    for dtype in job.get("dtypes", ["fp32"]):
        started = time.perf_counter()
        model = load(job["model"], device, dtype)
        load_s = time.perf_counter() - started
        vectors = encode(model, job["parity_texts"], batch_size=16)
        result["parity"][dtype] = vectors.tolist()
        prompt = model.prompts["document"]
        for name, texts in corpora.items():
            tokens = token_count(model, texts, prompt)
            encode(model, texts[:16], batch_size=16, prompt_name="document")  # warm-up
            for batch in job.get("batch_sizes", [32]):
                if time.time() + last > deadline:
                    result["not_run"].append(f"{dtype} {name} batch {batch}")
                    continue
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                sync(device)
                t0 = time.perf_counter()
                encode(model, texts, batch_size=batch, prompt_name="document")
                sync(device)
                seconds = time.perf_counter() - t0
                last = max(last, seconds)
                result["speed"].append({
                    "engine": "sentence-transformers", "dtype": dtype, "corpus": name, "batch_size": batch,
                    "texts": len(texts), "tokens": tokens, "seconds": round(seconds, 3),
                    "texts_per_s": round(len(texts) / seconds, 1), "tokens_per_s": round(tokens / seconds),
                    "gpu_peak_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None,
                    "load_s": round(load_s, 2),
                })
                print(f"sentence-transformers {dtype} {name} batch {batch}: {tokens / seconds:.0f} tokens/s", file=sys.stderr)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    json.dump(result, open(sys.argv[2], "w", encoding="utf-8"))


if __name__ == "__main__":
    main()
