"""Inputs and checks for bench/compare-llamacpp (run with the reference venv's python).

  prompts MODEL_DIR CORPUS N SEP OUT    the first N passages with the document prompt, cut to the
                                        model's 2048 tokens as the engine does, joined by SEP
  cases REFERENCE_JSON SEP OUT          the reference cases up to 2048 tokens, prompts prepended;
                                        prints how many
  check REFERENCE_JSON LLAMA_OUT MIN    cosine of llama.cpp's vectors to the reference; fails
                                        below MIN
  tensors GGUF                          number of tensors in a GGUF file (gguf-py on PYTHONPATH)
"""
import json
import math
import sys

MAX_TOKENS = 2048  # <bos> + text + <eos>


def prompts(model_dir, corpus, n, sep, out):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = []
    with open(corpus) as f:
        for line in f:
            if len(texts) == int(n):
                break
            text = "title: none | text: " + json.loads(line)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            budget = MAX_TOKENS - 2
            while len(ids) > MAX_TOKENS - 2:  # decoding may re-tokenize a little longer
                text = tok.decode(ids[:budget])
                ids = tok(text, add_special_tokens=False)["input_ids"]
                budget -= 8
            texts.append(text)
    write(texts, sep, out)


def usable_cases(reference):
    cases = json.load(open(reference))["cases"]
    return [c for c in cases if len(c["input_ids"]) < MAX_TOKENS and c["text"]]


def cases(reference, sep, out):
    meta = json.load(open(reference))["meta"]
    chosen = usable_cases(reference)
    write([meta["prompts"].get(c.get("prompt_name") or "", "") + c["text"] for c in chosen], sep, out)
    print(len(chosen))


def write(texts, sep, out):
    assert not any(sep in t for t in texts), "the separator occurs in a text"
    with open(out, "w") as f:
        f.write(sep.join(texts))


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def check(reference, llama_out, minimum):
    chosen = usable_cases(reference)
    text = open(llama_out).read()
    vectors = json.loads(text[text.index("[["): text.rindex("]]") + 2])
    assert len(vectors) == len(chosen), f"{len(vectors)} vectors for {len(chosen)} cases"
    scores = [(cosine(v, c["embedding"]), f'{c["id"]}/{c.get("prompt_name") or "none"}') for v, c in zip(vectors, chosen)]
    worst = min(scores)
    print(f"{len(scores)} cases: worst cosine {worst[0]:.6f} ({worst[1]}), mean {sum(s for s, _ in scores) / len(scores):.6f}")
    if worst[0] < float(minimum):
        sys.exit(f"llama.cpp's vectors are not the reference model's (cosine {worst[0]:.6f} < {minimum})")


def tensors(path):
    from gguf import GGUFReader

    print(len(GGUFReader(path).tensors))


if __name__ == "__main__":
    {"prompts": prompts, "cases": cases, "check": check, "tensors": tensors}[sys.argv[1]](*sys.argv[2:])
