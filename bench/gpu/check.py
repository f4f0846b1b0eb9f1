"""Parity and speed of the CUDA build, in one run: what bench/gpu-check runs.

usage: check.py --device cuda|cpu --binary CUDA_CLI --out DIR [--cpu-binary CLI] [--python PY]
                [--full-model] [--quick] [--budget-s S] [--build-info BUILD.txt]

--device cuda (a lent GPU machine): a full-size EmbeddingGemma-300m-shaped model with random
weights (make_model.py) and the tiny fixture; ours on the GPU in f32 and bf16 against ours on the
CPU, against sentence-transformers on the GPU and against the tiny goldens; then speed (ours and
sentence-transformers, docstrings and 128-token texts), GPU memory, and the service under
concurrent clients.
--device cpu (CI, no GPU): the same steps with the tiny model, the CUDA build run with
`--device auto` (it must fall back to the CPU) and compared with the goldens and with the
non-CUDA build (--cpu-binary); sentence-transformers only where --python has it, and the output
says which comparisons ran. --full-model adds the full-size model on the CPU (needs torch).

Every figure goes to OUT/figures.json, the table to OUT/summary.txt and stdout. Exit status 1
when any check fails. Standard library only: torch is imported by make_model.py and
reference.py, in their own processes.
"""

import argparse
import json
import math
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ in the working tree that travels
from service_client import Client, ServiceError  # noqa: E402

TINY = os.path.join(ROOT, "crates", "engine", "tests", "data", "tiny")
DOCSTRINGS = os.path.join(ROOT, "bench", "docstrings.jsonl")

F32_TOL = 1e-5  # cosine distance, float32 against float32
BF16_TOL = 5e-3  # cosine distance, bf16 against the float32 reference
GOLDEN_ABS_TOL = 1e-5  # max abs difference to the tiny goldens (as tests/tiny_parity.rs)
SAME_BUILD_TOL = 1e-6  # max abs difference, CUDA build on the CPU against the CPU build
MIN_SPREAD = 0.01  # median cosine distance between different texts' vectors: not degenerate
ANCHOR = "vLLM, RTX 4090: 128 sequences/s at batch 64 (the issue's anchor)"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Failure(Exception):
    pass


def why(stderr):
    """What a failed process said: its `error:` line (the CLI then prints its usage), else the
    end of its output (a Python traceback ends with the exception)."""
    lines = [l.strip() for l in stderr.splitlines() if l.strip()]
    errors = [l for l in lines if "error:" in l.lower()]
    return (errors[0] if errors else " | ".join(lines[-3:]))[:1000]


class Report:
    def __init__(self):
        self.checks = []
        self.not_run = []
        self.figures = {"parity": {}, "speed": [], "service": {}, "timing_s": {}}

    def check(self, name, ok, value=None, limit=None, detail=""):
        self.checks.append({"name": name, "ok": bool(ok), "value": value, "limit": limit, "detail": detail})
        shown = f"{value:.3g} (limit {limit:g})" if isinstance(value, float) and limit is not None else ""
        log(f"  {'PASS' if ok else 'FAIL'}  {name} {shown} {detail}".rstrip())

    def skip(self, what, why):
        self.not_run.append({"what": what, "why": why})
        log(f"  NOT RUN  {what}: {why}")


# ---- vectors ----------------------------------------------------------------------------------

def cos_dist(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return 1.0 - dot / (na * nb)


def max_abs(a, b):
    return max(abs(x - y) for x, y in zip(a, b))


def worst(metric, got, want):
    if len(got) != len(want):
        raise Failure(f"{len(got)} vectors against {len(want)}")
    values = [metric(g, w) for g, w in zip(got, want)]
    i = max(range(len(values)), key=values.__getitem__)
    return values[i], i


def compare(report, name, got, want, limit, metric=cos_dist, key=None):
    value, i = worst(metric, got, want)
    report.figures["parity"][key or name] = {"worst": value, "case": i, "limit": limit,
                                             "metric": "max_abs" if metric is max_abs else "cosine_distance"}
    report.check(name, value <= limit, value, limit, f"(worst: text {i})")


def sanity(report, name, vectors, distinct):
    """Finite unit vectors, and different texts not all mapped to about the same point."""
    finite = all(math.isfinite(x) for v in vectors for x in v)
    norms = [math.sqrt(sum(x * x for x in v)) for v in vectors]
    unit = all(abs(n - 1) <= 1e-3 for n in norms)
    pairs = [cos_dist(vectors[i], vectors[j]) for i in distinct for j in distinct if i < j]
    spread = statistics.median(pairs) if pairs else 0.0
    report.figures["parity"][f"{name}: spread"] = {"median_pairwise_cosine_distance": spread, "min": min(pairs, default=0.0)}
    report.check(f"{name}: finite unit vectors, spread between texts", finite and unit and spread >= MIN_SPREAD,
                 spread, MIN_SPREAD, f"(finite={finite}, unit={unit}, median pairwise distance)")


# ---- models and texts -------------------------------------------------------------------------

class Model:
    def __init__(self, name, directory, sums, max_tokens):
        self.name, self.dir, self.sums, self.max_tokens = name, directory, sums, max_tokens
        self.max_doc_chars = None
        cfg = json.load(open(os.path.join(directory, "config_sentence_transformers.json"), encoding="utf-8"))
        self.prompts = cfg["prompts"]
        # The vectors' width: the last Dense layer's output.
        self.dim = json.load(open(os.path.join(directory, "3_Dense", "config.json"), encoding="utf-8"))["out_features"]

    def prompt(self, task):
        return "" if task in (None, "none") else self.prompts[task]


def golden_cases():
    return json.load(open(os.path.join(TINY, "golden.json"), encoding="utf-8"))["cases"]


def docstrings(limit=None):
    with open(DOCSTRINGS, encoding="utf-8") as f:
        return [json.loads(line) for n, line in enumerate(f) if limit is None or n < limit]


def parity_texts(model):
    """The golden cases (prompts written out: our task "none" and sentence-transformers without a
    prompt then see the same string) and 13 docstrings from short to the longest (truncated);
    with `model.max_doc_chars` (the full model on 2 CPU cores) 7 up to that length."""
    texts = [model.prompt(c["prompt_name"]) + c["text"] for c in golden_cases()]
    docs = docstrings()
    by_length = [i for i in sorted(range(len(docs)), key=lambda i: len(docs[i]))
                 if model.max_doc_chars is None or len(docs[i]) <= model.max_doc_chars]
    n = 13 if model.max_doc_chars is None else 7
    picks = [by_length[round(k * (len(by_length) - 1) / (n - 1))] for k in range(n)]
    texts += [model.prompt("document") + docs[i] for i in picks]
    return texts


# ---- our CLI ----------------------------------------------------------------------------------

class Cli:
    def __init__(self, binary, label, logs):
        self.binary, self.label, self.logs = binary, label, logs

    def run(self, args, stdin=None, timeout=480):
        started = time.perf_counter()
        p = subprocess.run([self.binary, *args], input=stdin, capture_output=True, text=True, timeout=timeout)
        name = f"{self.label}-{args[0]}-{len(os.listdir(self.logs))}.log"
        with open(os.path.join(self.logs, name), "w", encoding="utf-8") as f:
            f.write(f"$ {self.binary} {' '.join(args)}\nexit {p.returncode} after {time.perf_counter() - started:.1f}s\n{p.stderr}")
        return p

    def ok(self, args, stdin=None):
        p = self.run(args, stdin)
        if p.returncode != 0:
            raise Failure(f"{self.label} {args[0]} failed (exit {p.returncode}): {why(p.stderr)}")
        return p

    def embed(self, model, texts, device, dtype, extra=()):
        lines = "".join(json.dumps(t) + "\n" for t in texts)
        p = self.ok(["embed", "--model", model.dir, "--checksums", model.sums, "--task", "none",
                     "--device", device, "--dtype", dtype, *extra], lines)
        vectors = [json.loads(line) for line in p.stdout.splitlines()]
        return vectors, loaded(p.stderr)

    def chunks(self, model, texts, max_tokens):
        lines = "".join(json.dumps(t) + "\n" for t in texts)
        p = self.ok(["chunk", "--model", model.dir, "--checksums", model.sums, "--device", "cpu",
                     "--task", "document", "--max-tokens", str(max_tokens), "--overlap", "0"], lines)
        return [json.loads(line) for line in p.stdout.splitlines()]


def loaded(stderr):
    """The `loaded … device=… dtype=…` line of the CLI, as a dict."""
    for line in stderr.splitlines():
        if line.startswith("loaded "):
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            fields["load_s"] = float(line.split(" in ", 1)[1].split("s:", 1)[0])
            return fields
    return {}


def key_values(line):
    out = {}
    for field in line.split():
        if "=" in field:
            k, v = field.split("=", 1)
            try:
                out[k] = float(v) if "." in v else int(v)
            except ValueError:
                out[k] = v
    return out


class GpuMemory:
    """Peak device memory in use during a run, over what was in use before it (nvidia-smi,
    polled every 50 ms on a thread)."""

    def __init__(self, enabled):
        self.enabled, self.peak, self.baseline = enabled, None, None

    def used(self):
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30).stdout
        return int(out.split()[0])

    def __enter__(self):
        if self.enabled:
            try:
                self.baseline = self.peak = self.used()
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as e:
                log(f"  (no GPU memory figures: nvidia-smi: {e})")
                self.enabled = False
                return self
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        return self

    def poll(self):
        while not self.stop.wait(0.05):
            try:
                self.peak = max(self.peak, self.used())
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass

    def __exit__(self, *exc):
        if self.enabled:
            self.stop.set()
            self.thread.join()

    def mb(self):
        return None if self.peak is None else self.peak - self.baseline


def our_bench(cli, model, corpus, limit, device, dtype, max_batch_tokens, max_memory_mb, gpu):
    args = ["bench", "--model", model.dir, "--checksums", model.sums, "--corpus", corpus, "--limit", str(limit),
            "--device", device, "--dtype", dtype, "--max-batch-tokens", str(max_batch_tokens)]
    if max_memory_mb:
        args += ["--max-memory-mb", str(max_memory_mb)]
    with GpuMemory(gpu) as mem:
        p = cli.ok(args)
    figures = key_values(p.stdout.strip().splitlines()[-1])
    for line in p.stderr.splitlines():
        if line.startswith("forward_passes="):
            figures.update(key_values(line))
    info = loaded(p.stderr)
    return {"engine": "embeddinggemma", "binary": cli.label, "device": info.get("device"), "dtype": dtype,
            "max_batch_tokens": max_batch_tokens, "max_memory_mb": max_memory_mb, "gpu_peak_mb": mem.mb(),
            "texts": figures.get("passages"), "tokens": figures.get("tokens"), "seconds": figures.get("seconds"),
            "texts_per_s": figures.get("passages_per_s"), "tokens_per_s": figures.get("tokens_per_s"),
            "fill": figures.get("fill"), "forward_passes": figures.get("forward_passes"),
            "peak_rss_mb": figures.get("peak_rss_mb"), "load_s": info.get("load_s")}


# ---- the service ------------------------------------------------------------------------------

def service_run(cli, model, device, dtype, texts, levels, per_client, gpu):
    sock_dir = tempfile.mkdtemp(prefix="eg-gpu-check-")  # AF_UNIX paths are short: not under OUT
    path = os.path.join(sock_dir, "s.sock")
    args = [cli.binary, "serve", "--model", model.dir, "--checksums", model.sums, "--socket", path,
            "--device", device, "--dtype", dtype]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, stderr = queue.Queue(), []

    def drain():
        for line in proc.stderr:
            stderr.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    result = {"device": device, "dtype": dtype, "levels": []}
    try:
        deadline = time.monotonic() + 120
        while True:  # the socket is bound once it says so
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                raise Failure(f"serve exited before listening: {why(''.join(stderr))}")
            if "listening on" in line:
                break
        warm = Client(path)
        warm.embed(texts[:8], dim=model.dim)  # answered once the model is loaded (or fails with why not)
        stats = warm.stats()
        result["model_device"] = stats["model"]["device"]
        result["protocol_version"] = warm.version
        result["load_s"] = stats["model"]["load_s"]
        with GpuMemory(gpu) as mem:
            for clients in levels:
                before = warm.stats()
                latencies, errors = [], []

                def client(k):
                    try:
                        c = Client(path, version=warm.version)
                        for i in range(per_client):
                            t0 = time.perf_counter()
                            c.embed([texts[(k * per_client + i) % len(texts)]], dim=model.dim)
                            latencies.append(time.perf_counter() - t0)
                        c.close()
                    except (OSError, ServiceError) as e:
                        errors.append(str(e))

                threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                if errors:
                    raise Failure(f"service clients failed: {errors[0]}")
                after = warm.stats()
                passes = after["forward_passes"] - before["forward_passes"]
                done = after["texts"] - before["texts"]
                latencies.sort()
                result["levels"].append({
                    "clients": clients, "texts": done, "seconds": round(wall, 3),
                    "texts_per_s": round(done / wall, 1), "tokens_per_s": round((after["tokens"] - before["tokens"]) / wall),
                    "forward_passes": passes, "texts_per_pass": round(done / max(passes, 1), 2),
                    "latency_p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
                    "latency_p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2),
                })
                log(f"  service, {clients} clients: {done / wall:.1f} texts/s, {done / max(passes, 1):.2f} texts per pass")
        final = warm.stats()
        warm.close()
        result.update({"fill_ratio": final["fill_ratio"], "memory": final["memory"], "gpu_peak_mb": mem.mb()})
    finally:
        proc.stdin.close()  # serve exits when its stdin closes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:
            os.rmdir(sock_dir)
        except OSError:
            pass
    return result


# ---- the run ----------------------------------------------------------------------------------

def reference_available(python):
    p = subprocess.run([python, "-c", "import sentence_transformers, torch"], capture_output=True, text=True)
    return p.returncode == 0, (p.stderr.strip().splitlines() or ["?"])[-1]


def run_reference(python, job, out):
    job_file, result_file = os.path.join(out, "reference-job.json"), os.path.join(out, "reference-result.json")
    json.dump(job, open(job_file, "w", encoding="utf-8"))
    p = subprocess.run([python, os.path.join(HERE, "reference.py"), job_file, result_file],
                       capture_output=True, text=True, timeout=480 if job["device"] == "cuda" else 1800)
    with open(os.path.join(out, "logs", "reference.log"), "w", encoding="utf-8") as f:
        f.write(p.stderr)
    if p.returncode != 0:
        raise Failure(f"sentence-transformers failed (exit {p.returncode}): {why(p.stderr)}")
    os.remove(job_file)
    return json.load(open(result_file, encoding="utf-8"))


def ldd(report, binary, gpu):
    p = subprocess.run(["ldd", binary], capture_output=True, text=True)
    libs = {}
    for line in p.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "=>":
            libs[parts[0]] = parts[2]
    report.figures["binary"] = {"path": binary, "bytes": os.path.getsize(binary), "libraries": libs}
    missing = [k for k, v in libs.items() if v == "not"]
    report.check("the CUDA CLI finds its libraries (ldd)", p.returncode == 0 and not missing,
                 detail=f"missing: {', '.join(missing)}" if missing else f"libcuda.so.1 => {libs.get('libcuda.so.1')}")
    if gpu:
        stub = "stubs" in (libs.get("libcuda.so.1") or "stubs")
        report.check("libcuda.so.1 is the driver's, not the link stub", not stub, detail=str(libs.get("libcuda.so.1")))


ERRORS = (Failure, subprocess.TimeoutExpired, OSError, ServiceError, KeyError, ValueError, IndexError)


def attempt(report, name, fn):
    """fn(), or None with a failed check named `name` saying why: later steps still run."""
    try:
        return fn()
    except ERRORS as e:
        report.check(name, False, detail=f"{type(e).__name__}: {e}")
        return None


def parity(report, args, model, ours, cpu, device, reference, goldens):
    """ours/cpu: Cli; device: what ours runs on; reference: {dtype: vectors} or None."""
    gpu = args.device == "cuda"
    texts = parity_texts(model)
    n_golden = len(golden_cases())
    expect = "cuda:0" if gpu else "cpu"
    tag = model.name

    def run(label, cli, dev, dtype, extra=()):
        got = attempt(report, f"{tag}: {label} ran", lambda: cli.embed(model, texts, dev, dtype, extra))
        return got if got else (None, {})

    f32, info = run(f"ours --device {device} f32", ours, device, "f32")
    single, _ = run(f"ours --device {device} f32, one text per pass", ours, device, "f32", ["--max-batch-tokens", "1"])
    bf16, info16 = run(f"ours --device {device} bf16", ours, device, "bf16")
    on_cpu, _ = run("ours --device cpu f32", cpu, "cpu", "f32")
    if f32 is not None:
        report.check(f"{tag}: ours --device {device} runs on {expect}", info.get("device") == expect,
                     detail=f"(log says device={info.get('device')})")
        sanity(report, f"{tag} f32 on {expect}", f32, list(range(n_golden, len(texts))))
    if bf16 is not None:
        report.check(f"{tag}: ours bf16 loads as bf16 on {expect}", info16.get("dtype") == "bf16" and info16.get("device") == expect,
                     detail=f"(device={info16.get('device')} dtype={info16.get('dtype')})")

    def cmp(name, got, want, limit, metric=cos_dist):
        if got is None or want is None:
            report.check(name, False, detail="not compared: a run it needs failed (above)")
        else:
            compare(report, name, got, want, limit, metric)

    where = f"{tag} ({len(texts)} texts)"
    if gpu:
        cmp(f"{where}: ours GPU f32 vs ours CPU f32", f32, on_cpu, F32_TOL)
    else:
        cmp(f"{where}: CUDA build (auto → CPU) vs the CPU build, f32", f32, on_cpu, SAME_BUILD_TOL, max_abs)
    cmp(f"{where}: ours {expect} f32, one text per pass vs batched", single, f32, F32_TOL)
    if reference is not None:
        ref_where = "GPU" if gpu else "CPU"
        cmp(f"{where}: ours {expect} f32 vs sentence-transformers {ref_where} fp32", f32, reference["fp32"], F32_TOL)
        cmp(f"{where}: ours {expect} f32 one per pass vs sentence-transformers fp32", single, reference["fp32"], F32_TOL)
        cmp(f"{where}: ours {expect} bf16 vs sentence-transformers fp32", bf16, reference["fp32"], BF16_TOL)
        if "bf16" in reference:
            value, _ = worst(cos_dist, reference["bf16"], reference["fp32"])
            report.figures["parity"][f"{where}: sentence-transformers bf16 vs fp32 (context)"] = {"worst": value}
            log(f"  info  {where}: sentence-transformers bf16 vs its fp32: worst cosine distance {value:.3g}")
    else:
        cmp(f"{where}: ours {expect} bf16 vs ours CPU f32", bf16, on_cpu, BF16_TOL)
    if bf16 is not None and f32 is not None:
        value, _ = worst(cos_dist, bf16, f32)
        report.figures["parity"][f"{where}: ours bf16 vs ours f32 (context)"] = {"worst": value}
    if goldens:
        want = [c["embedding"] for c in golden_cases()]
        head = lambda v: None if v is None else v[:n_golden]  # noqa: E731
        cmp(f"tiny goldens (24): ours {expect} f32", head(f32), want, GOLDEN_ABS_TOL, max_abs)
        cmp(f"tiny goldens (24): ours {expect} f32 one per pass", head(single), want, GOLDEN_ABS_TOL, max_abs)
        cmp(f"tiny goldens (24): ours {expect} bf16", head(bf16), want, BF16_TOL)
        cmp("tiny goldens (24): ours on the CPU" + ("" if gpu else " (the CPU build)"), head(on_cpu), want, GOLDEN_ABS_TOL, max_abs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], required=True)
    ap.add_argument("--binary", required=True, help="the CUDA build of the CLI")
    ap.add_argument("--cpu-binary", help="the CPU build of the CLI (cpu mode: compared with the CUDA build)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--build-info", help="BUILD.txt of the packed CLI (which build this is)")
    ap.add_argument("--python", default=sys.executable, help="a Python with sentence-transformers and torch")
    ap.add_argument("--full-model", action="store_true", help="cpu mode: add the full-size random model")
    ap.add_argument("--quick", action="store_true", help="smaller corpora (a first try)")
    ap.add_argument("--budget-s", type=float, default=300,
                    help="speed runs that would end later than this many seconds after the start are not run (and listed)")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    started = time.perf_counter()
    deadline = started + args.budget_s
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    report = Report()
    report.figures.update({"mode": args.device, "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                           "anchor": ANCHOR, "tolerances": {"f32_cosine": F32_TOL, "bf16_cosine": BF16_TOL,
                                                            "golden_max_abs": GOLDEN_ABS_TOL, "same_build_max_abs": SAME_BUILD_TOL}})
    phase = [time.perf_counter()]

    def lap(name):
        now = time.perf_counter()
        report.figures["timing_s"][name] = round(now - phase[0], 1)
        log(f"==> {name}: {now - phase[0]:.1f} s (total {now - started:.0f} s)")
        phase[0] = now
        save(report, out, started, final=False)  # a run cut short by a timeout keeps what it had

    if args.build_info:
        report.figures["build"] = open(args.build_info, encoding="utf-8").read().strip().splitlines()
    ours = Cli(args.binary, "cuda-build", os.path.join(out, "logs"))
    if gpu:
        cpu = Cli(args.binary, "cuda-build-on-cpu", os.path.join(out, "logs"))
        device = "cuda"
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=60)
            report.figures["gpu"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            report.figures["gpu"] = f"nvidia-smi: {e}"
    else:
        if not args.cpu_binary or not os.path.exists(args.cpu_binary):
            raise SystemExit(f"--cpu-binary: no CPU build of the CLI at {args.cpu_binary} "
                             "(cargo build --release -p embeddinggemma-engine --bin embeddinggemma)")
        cpu = Cli(args.cpu_binary, "cpu-build", os.path.join(out, "logs"))
        device = "auto"  # what a CUDA build is configured with; must pick the CPU here
        report.figures["gpu"] = None
    failed = False
    scratch = tempfile.mkdtemp(prefix="eg-gpu-check-")
    try:
        log(f"==> gpu-check --device {args.device}: {args.binary}")
        ldd(report, args.binary, gpu)

        has_ref, why = reference_available(args.python)
        if gpu and not has_ref:
            report.check("sentence-transformers and torch are importable", False, detail=why)
        elif not has_ref:
            report.skip("sentence-transformers reference", f"not importable with {args.python} ({why}); the tiny "
                        "goldens — sentence-transformers 6.2.0, float32 — are the reference, and the CPU build")

        tiny = Model("tiny", os.path.join(TINY, "model"), os.path.join(TINY, "SHA256SUMS"), 64)
        models = [tiny]
        if gpu or args.full_model:
            # Outside OUT: 408 MB that must not travel back.
            full_dir = os.path.join(scratch, "model-300m-random")

            def make():
                p = subprocess.run([args.python, os.path.join(HERE, "make_model.py"), full_dir,
                                    "--tokenizer-from", tiny.dir], capture_output=True, text=True, timeout=300)
                if p.returncode != 0:
                    raise Failure(f"make_model.py failed: {why(p.stderr)}")
                return Model("300m-random", full_dir, os.path.join(full_dir, "SHA256SUMS"), 2048)

            full = attempt(report, "the full-size random model is made (make_model.py)", make)
            if full:
                models.append(full)
                if not gpu:
                    full.max_doc_chars = 1600  # up to about 650 tokens: past one sliding window
        else:
            report.skip("the full-size random model", "cpu mode without --full-model: make_model.py needs torch; "
                        "every step runs on the tiny model")
        speed_model = models[-1]
        lap("models")

        # The speed corpora: docstrings, and texts of at most 128 tokens with the document prompt
        # (chunks of the docstrings cut by our tokenizer; at most the model's length).
        # Sizes: a GPU run's fit its time budget; a CPU run of the full model (2 cores) is a
        # smoke test of the pipeline only.
        cpu_full = not gpu and speed_model is not tiny
        n_docs = 16 if cpu_full else 200 if args.quick or not gpu else 500
        chunk_tokens = min(128, speed_model.max_tokens)
        docs = docstrings(n_docs)
        short = []
        for pieces in ours.chunks(speed_model, docs, chunk_tokens):
            full = pieces[:-1] if len(pieces) > 1 else pieces  # a text's last chunk is its remainder
            short += [c["body"] for c in full]
        short = short[: (32 if cpu_full else 512 if args.quick or not gpu else 2048)]
        short_file = os.path.join(out, f"corpus-{chunk_tokens}-tokens.jsonl")
        with open(short_file, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(t) + "\n" for t in short)
        corpora = [("docstrings", DOCSTRINGS, n_docs), (f"{chunk_tokens}-token texts", short_file, len(short))]
        lap("corpora")

        # sentence-transformers: parity vectors of every model, speed on the speed model.
        references = {}
        if has_ref:
            for model in models:
                job = {"model": model.dir, "device": "cuda" if gpu else "cpu", "parity_texts": parity_texts(model),
                       "dtypes": ["fp32", "bf16"] if gpu else ["fp32"], "batch_sizes": [16, 32, 64, 128] if gpu else [16]}
                if model is speed_model and cpu_full:
                    report.skip("sentence-transformers speed on the full model", "cpu mode: minutes on 2 cores for "
                                "nothing a GPU run does not measure better (its parity runs)")
                elif model is speed_model:
                    job["speed"] = [{"name": n, "corpus": c, "limit": k} for n, c, k in corpora]
                    job["deadline_epoch"] = time.time() + (deadline - time.perf_counter())
                with GpuMemory(gpu) as mem:
                    result = attempt(report, f"sentence-transformers ran on {model.name}",
                                     lambda: run_reference(args.python, job, out))
                if result is None:
                    continue
                references[model.name] = result["parity"]
                report.figures["reference_versions"] = result["versions"]
                for run in result["speed"]:
                    run["gpu_peak_mb"] = mem.mb()  # the whole reference process
                report.figures["speed"] += result["speed"]
                for what in result.get("not_run", []):
                    report.skip(f"sentence-transformers {what}", f"time budget (--budget-s {args.budget_s:g})")
            lap("sentence-transformers")

        for model in models:
            log(f"==> parity: {model.name}")
            parity(report, args, model, ours, cpu, device, references.get(model.name), goldens=model is tiny)
            if has_ref and model.name not in references:
                report.check(f"{model.name}: compared with sentence-transformers", False, detail="its run failed (above)")
        if not gpu:
            # Asked for CUDA where there is none, a CUDA build must say so, not crash or hang.
            p = ours.run(["embed", "--model", tiny.dir, "--checksums", tiny.sums, "--device", "cuda"], "\"x\"\n")
            clean = p.returncode == 1 and "cuda" in p.stderr.lower() and "panicked" not in p.stderr
            message = next((l for l in p.stderr.splitlines() if "error" in l), p.stderr.strip()[:200])
            report.figures["no_gpu_refusal"] = {"exit": p.returncode, "message": message}
            report.check("no GPU: --device cuda is refused with an error, not a crash", clean,
                         detail=f"(exit {p.returncode}: {message.strip()})")
        else:
            got = attempt(report, "--device auto ran", lambda: ours.embed(tiny, ["auto picks the GPU"], "auto", "auto"))
            info = got[1] if got else {}
            report.check("--device auto picks the GPU, dtype auto is bf16",
                         info.get("device") == "cuda:0" and info.get("dtype") == "bf16",
                         detail=f"(device={info.get('device')} dtype={info.get('dtype')})")
            report.skip("no-GPU refusal of --device cuda", "a GPU is present (checked in cpu mode)")
        lap("parity")

        log(f"==> speed: {speed_model.name}")
        settings = [(8192, None), (32768, 32768)] if gpu else [(8192, None)]
        longest = 0.0
        # The default bucket size first: what the time budget leaves out is the larger one.
        for max_tokens, memory in settings:
            for name, corpus, limit in corpora:
                for dtype in ("f32", "bf16"):
                    if time.perf_counter() + longest > deadline:
                        report.skip(f"ours {dtype} {name} max_batch_tokens {max_tokens}",
                                    f"time budget (--budget-s {args.budget_s:g})")
                        continue
                    t0 = time.perf_counter()
                    run = attempt(report, f"ours bench {dtype} {name} max_batch_tokens {max_tokens} ran",
                                  lambda: our_bench(ours, speed_model, corpus, limit, device, dtype, max_tokens, memory, gpu))
                    longest = max(longest, time.perf_counter() - t0)
                    if run is None:
                        continue
                    run["corpus"] = name
                    report.figures["speed"].append(run)
                    log(f"  ours {dtype} {name} max_batch_tokens {max_tokens}: {run['tokens_per_s']} tokens/s, "
                        f"{run['texts_per_s']} texts/s, fill {run['fill']}")
        lap("speed")

        log(f"==> service: {speed_model.name}, concurrent clients")
        levels, per_client = ([1, 8, 32], 100) if gpu else ([1, 4], 4 if cpu_full else 25)
        service = attempt(report, "the service ran under concurrent clients",
                          lambda: service_run(ours, speed_model, device, "auto", short, levels, per_client, gpu))
        if service:
            report.figures["service"] = service
            report.check(f"service runs on {'cuda:0' if gpu else 'cpu'}", service["model_device"] == ("cuda:0" if gpu else "cpu"),
                         detail=f"(model device {service['model_device']})")
        lap("service")
    except ERRORS as e:
        report.check("gpu-check ran to the end", False, detail=f"{type(e).__name__}: {e}")
        failed = True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(save(report, out, started, final=True))
    bad = [c for c in report.checks if not c["ok"]]
    print(f"gpu-check --device {args.device}: {len(report.checks) - len(bad)}/{len(report.checks)} checks passed, "
          f"{len(report.not_run)} not run; figures in {os.path.join(out, 'figures.json')}")
    sys.exit(1 if bad or failed else 0)


def save(report, out, started, final):
    """Writes figures.json and summary.txt (again after every phase); returns the table."""
    report.figures["checks"] = report.checks
    report.figures["not_run"] = report.not_run
    report.figures["total_s"] = round(time.perf_counter() - started, 1)
    report.figures["complete"] = final
    report.figures["side_by_side"] = side_by_side(report.figures["speed"])
    summary = table(report)
    for name, text in (("summary.txt", summary + "\n"), ("figures.json", json.dumps(report.figures, indent=1))):
        with open(os.path.join(out, name + ".tmp"), "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    return summary


def side_by_side(runs):
    """Per corpus: the fastest run of each engine and precision, and ours against the reference."""
    lines = []
    for corpus in dict.fromkeys(r["corpus"] for r in runs):
        best = {}
        for r in runs:
            if r["corpus"] == corpus and r.get("tokens_per_s"):
                key = (r["engine"], r["dtype"])
                if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
                    best[key] = r
        parts = []
        for (engine, dtype), r in best.items():
            how = f"batch {r['batch_size']}" if r.get("batch_size") else f"{r['max_batch_tokens']} tokens/pass"
            parts.append(f"{'ours' if engine == 'embeddinggemma' else 'sentence-transformers'} {dtype}: "
                         f"{r['tokens_per_s']:,} tokens/s, {r['texts_per_s']} seq/s ({how})")
        ref = {d: best.get(("sentence-transformers", d)) for d in ("fp32", "bf16")}
        ratios = []
        for ours_d, ref_d in (("f32", "fp32"), ("bf16", "bf16")):
            o, r = best.get(("embeddinggemma", ours_d)), ref.get(ref_d)
            if o and r:
                ratios.append(f"ours {ours_d} / sentence-transformers {ref_d} = {o['tokens_per_s'] / r['tokens_per_s']:.2f}")
        lines.append(f"{corpus}: " + "; ".join(parts))
        if ratios:
            lines.append("  " + ", ".join(ratios))
    return lines


def table(report):
    f = report.figures
    rows = [f"gpu-check --device {f['mode']}  ({f.get('gpu') or 'no GPU'}; total {f['total_s']} s"
            f"{'' if f['complete'] else '; INCOMPLETE: still running, or cut short'})", ""]
    rows.append("checks:")
    for c in report.checks:
        value = f"  {c['value']:.2e} ≤ {c['limit']:g}" if isinstance(c["value"], float) and c["limit"] is not None else ""
        rows.append(f"  {'PASS' if c['ok'] else 'FAIL'}  {c['name']}{value}")
        if not c["ok"] and c["detail"]:
            rows.append(f"          {c['detail'][:300]}")
    for n in report.not_run:
        rows.append(f"  NOT RUN  {n['what']}: {n['why']}")
    if f["speed"]:
        rows += ["", "speed (one run each; tokens with the document prompt):",
                 f"  {'engine':<22}{'dtype':<6}{'corpus':<18}{'batch':>7}{'tokens/s':>10}{'texts/s':>9}{'fill':>7}{'GPU MB':>8}"]
        for r in f["speed"]:
            batch = r.get("batch_size") or f"{r.get('max_batch_tokens')}t"
            rows.append(f"  {r['engine']:<22}{r['dtype']:<6}{r['corpus']:<18}{batch!s:>7}{r['tokens_per_s']!s:>10}"
                        f"{r['texts_per_s']!s:>9}{r.get('fill') or '':>7}{r.get('gpu_peak_mb') if r.get('gpu_peak_mb') is not None else '':>8}")
        rows.append(f"  anchor: {ANCHOR}")
        rows += ["", "side by side, best of each (ours: over bucket sizes; sentence-transformers: over batch sizes):"]
        for line in side_by_side(f["speed"]):
            rows.append("  " + line)
    s = f.get("service") or {}
    if s.get("levels"):
        rows += ["", f"service ({s['model_device']}, dtype {s['dtype']}; one text per request; fill {s.get('fill_ratio')}):",
                 f"  {'clients':>7}{'texts/s':>10}{'tokens/s':>10}{'texts/pass':>12}{'p50 ms':>9}{'p99 ms':>9}"]
        for lv in s["levels"]:
            rows.append(f"  {lv['clients']:>7}{lv['texts_per_s']:>10}{lv['tokens_per_s']:>10}{lv['texts_per_pass']:>12}"
                        f"{lv['latency_p50_ms']:>9}{lv['latency_p99_ms']:>9}")
    rows.append("")
    rows.append("timing: " + ", ".join(f"{k} {v} s" for k, v in f["timing_s"].items()))
    return "\n".join(rows)


if __name__ == "__main__":
    main()
