"""Per-pair gradient-norm engines against a plain BT training step, side by side in one run.

For each case (a model and a batch of pairs) and each engine (loop, vmap at its best chunk, ghost)
and the training step (forward + backward of the batch-mean BT loss over the same pairs: the
physical floor for any exact per-pair norm), it measures

- time: median over interleaved rounds (engine order rotates each round; these machines are noisy,
  so only ratios measured in the same run mean anything), reported as pairs/s and as the ratio to
  the training step;
- peak memory: in a fresh subprocess per (case, engine), the peak resident memory while the engine
  runs (the kernel's count, reset just before; where it cannot be reset, sampled every 2 ms), minus
  the resident memory just before it (model and batch already loaded); on CUDA,
  ``torch.cuda.max_memory_allocated`` over the same region (:func:`peak_extra_mb`).

    python benchmarks/bench_engines.py                       # all cases (about 30 min on 2 cores)
    python benchmarks/bench_engines.py --cases tiny-llama minilm --json out.json

Run by hand, not in CI. ``--json FILE`` writes {"cases": [{"model", "engine", "pairs_per_s",
"peak_mem_mb", "time_ratio_to_train_step", "mem_ratio_to_train_step", ...}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gradscope.gradients import ENGINES  # noqa: E402
from gradscope.model import RewardModel, probe_causal  # noqa: E402

CASES = {
    # name: (description, pairs, tokens per side)
    "tiny-llama": ("tiny random Llama (hidden 16, 2 layers)", 16, 64),
    "minilm": ("all-MiniLM-L6-v2 (BERT, 22.7M)", 8, 128),
    "smollm2": ("SmolLM2-135M-Instruct (Llama, 30 layers)", 4, 128),
    "wide": ("random Llama-style decoder, hidden 2048, MLP 8192, 2 layers", 2, 512),
}
ENGINE_ORDER = ["train_step", "loop", "vmap", "ghost"]
VMAP_CHUNKS = (1, 2, 4)


def build_case(name: str, device: str = "cpu"):
    """(model, input_ids, attention_mask) with (B, 2, T) random tokens, unequal lengths per side."""
    _, B, T = CASES[name]
    if name == "tiny-llama":
        from tiny import tiny_reward_model

        model = tiny_reward_model("llama", torch.float32)
    elif name in ("minilm", "smollm2"):
        from gradscope.model import load_model

        model = load_model(name, dtype="float32").model
    elif name == "wide":
        from transformers import LlamaConfig, LlamaModel

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=4096, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                          num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024,
                          tie_word_embeddings=False)
        bb = LlamaModel(cfg)
        bb.config.use_cache = False
        model = RewardModel(bb, probe_causal(bb), seed=0).eval()
    else:
        raise SystemExit(f"unknown case {name!r}; known: {', '.join(CASES)}")
    model = model.to(device)
    vocab = model.backbone.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (B, 2, T), generator=g)
    mask = torch.ones(B, 2, T, dtype=torch.long)
    mask[:, 1, T - T // 8:] = 0  # rejected sides a little shorter: right padding in every pair
    ids[:, 1, : T // 2] = ids[:, 0, : T // 2]  # a shared prompt, as in real preference pairs
    return model, ids.to(device), mask.to(device)


def train_step(model, ids, mask):
    B = ids.shape[0]
    out = model(torch.cat([ids[:, 0], ids[:, 1]]), torch.cat([mask[:, 0], mask[:, 1]]))
    loss = -torch.nn.functional.logsigmoid(out.rewards[:B] - out.rewards[B:]).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def runner(engine: str, chunk: int | None = None):
    if engine == "train_step":
        return train_step
    if engine == "vmap":
        return lambda m, i, k: ENGINES["vmap"](m, i, k, chunk_size=chunk)
    return lambda m, i, k: ENGINES[engine](m, i, k)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def report(header: list[str], rows: list[list[str]], records: list[dict], json_path: str | None) -> None:
    """Print a markdown table (``header`` and formatted ``rows``) and write ``records`` to ``json_path``."""
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if json_path:
        Path(json_path).write_text(json.dumps({"rows": records}, indent=2) + "\n")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_memory(case: str, engine: str, chunk: int | None, device: str) -> float:
    """Run in a fresh process (see --_memory): peak extra memory of one call, in MB."""
    cmd = [sys.executable, __file__, "--_memory", case, engine, str(chunk or 0), "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set size of this process (``VmHWM``; Linux ≥ 4.0), so that it then
    reads the peak since this call. False where that is not possible (no /proc, or not writable)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The kernel's peak resident set size of this process (``VmHWM``), in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def exact_peak_extra_mb(fn) -> float | None:
    """Run ``fn()`` and return its peak resident memory above the memory just before it, in MB, from
    the kernel's count reset just before it (exact, and nothing runs beside ``fn``); None, without
    running ``fn``, where that count cannot be reset."""
    base = rss_mb()
    if not reset_peak_rss():
        return None
    fn()
    return peak_rss_mb() - base


def peak_extra_mb(fn, device: str) -> float:
    """Peak memory of ``fn()`` above the memory just before it, in MB: on CUDA the allocator's
    maximum; on CPU the kernel's peak resident set size, reset just before (exact, and nothing runs
    beside ``fn``), or where it cannot be reset, the resident memory sampled every 2 ms while ``fn``
    runs, by a thread that slows ``fn`` (on 64 hh-rlhf pairs it added 18 s to the ghost engine's cold
    pass of 85 s, and 3 s to the training step's 83 s, 2026-12-06)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    exact = exact_peak_extra_mb(fn)
    if exact is not None:
        return exact
    base = rss_mb()
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    fn()
    done.set()
    t.join()
    return max(peak[0], rss_mb()) - base


def _memory_child(case: str, engine: str, chunk: int, device: str) -> None:
    model, ids, mask = build_case(case, device)
    fn = runner(engine, chunk or None)
    print(peak_extra_mb(lambda: fn(model, ids, mask), device))


def bench_case(case: str, rounds: int, device: str, engines: list[str]) -> list[dict]:
    model, ids, mask = build_case(case, device)
    B = ids.shape[0]
    # vmap at its best chunk: one timed call per chunk size, keep the fastest
    chunk = None
    if "vmap" in engines:
        best = None
        for c in VMAP_CHUNKS:
            if c > B:
                continue
            fn = runner("vmap", c)
            fn(model, ids, mask)
            sync(device)
            t0 = time.perf_counter()
            fn(model, ids, mask)
            sync(device)
            dt = time.perf_counter() - t0
            if best is None or dt < best:
                best, chunk = dt, c
    fns = {e: runner(e, chunk) for e in engines}
    for fn in fns.values():  # warm-up
        fn(model, ids, mask)
    times: dict[str, list[float]] = {e: [] for e in engines}
    for r in range(rounds):
        order = engines[r % len(engines):] + engines[: r % len(engines)]
        for e in order:
            sync(device)
            t0 = time.perf_counter()
            fns[e](model, ids, mask)
            sync(device)
            times[e].append(time.perf_counter() - t0)
    del model
    rows = []
    for e in engines:
        med = statistics.median(times[e])
        rows.append({"model": case, "engine": e, "chunk_size": chunk if e == "vmap" else None,
                     "pairs": B, "tokens_per_side": ids.shape[-1], "seconds_median": med,
                     "pairs_per_s": B / med,
                     "peak_mem_mb": measure_memory(case, e, chunk if e == "vmap" else None, device)})
    base = next(r for r in rows if r["engine"] == "train_step")
    for r in rows:
        r["time_ratio_to_train_step"] = r["seconds_median"] / base["seconds_median"]
        r["mem_ratio_to_train_step"] = r["peak_mem_mb"] / base["peak_mem_mb"] if base["peak_mem_mb"] > 0 else None
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | engine | pairs/s | time / train step | peak extra MB | memory / train step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        eng = r["engine"] + (f" (chunk {r['chunk_size']})" if r["chunk_size"] else "")
        mem_ratio = "n/a" if r["mem_ratio_to_train_step"] is None else f"{r['mem_ratio_to_train_step']:.2f}×"
        lines.append(f"| {r['model']} | {eng} | {r['pairs_per_s']:.3g} | {r['time_ratio_to_train_step']:.2f}× | "
                     f"{r['peak_mem_mb']:.0f} | {mem_ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--engines", nargs="+", default=ENGINE_ORDER, choices=ENGINE_ORDER)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median is reported)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the rows as {'cases': [...]} to this file")
    ap.add_argument("--_memory", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory:
        case, engine, chunk = args._memory
        _memory_child(case, engine, int(chunk), args.device)
        return
    engines = ["train_step"] + [e for e in args.engines if e != "train_step"]
    rows = []
    for case in args.cases:
        desc, B, T = CASES[case]
        print(f"# {case}: {desc}; {B} pairs of {T} tokens per side; device {args.device}", flush=True)
        case_rows = bench_case(case, args.rounds, args.device, engines)
        print(table(case_rows), flush=True)
        rows += case_rows
    print("\n" + table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
