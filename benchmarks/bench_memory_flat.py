"""Memory of a long `gradscope correlate` run stays flat: rows stream to disk batch by batch.

Writes N copies of one demo pair (fresh ids; one pair, so that every batch has the same length:
correlate batches pairs by length, and with mixed lengths the activation memory of later, longer
batches would hide or mimic a leak) to a temporary JSONL file, runs `gradscope correlate` on it in
a subprocess, and samples the subprocess's resident memory every 0.2 s together with the number of
pairs already on disk (from the part files). Prints the peak resident memory within each tenth of
the run (flat rows mean memory does not grow with the number of pairs), and the whole run's peak
from the kernel's high-water mark (:func:`poll_peak_mb`). The first tenth includes
model loading; the last, the final merge of the part files and the figure.

    python benchmarks/bench_memory_flat.py                         # 10,000 pairs on MiniLM
    python benchmarks/bench_memory_flat.py --pairs 2000 --model smollm2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradscope.data import demo_path  # noqa: E402


def _status_mb(pid: int, field: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def rss_mb(pid: int) -> float:
    """The process's resident memory now, in MB."""
    return _status_mb(pid, "VmRSS")


def hwm_mb(pid: int) -> float:
    """The process's own peak resident memory so far (``VmHWM``: the kernel's high-water mark), in MB."""
    return _status_mb(pid, "VmHWM")


def poll_peak_mb(proc: subprocess.Popen, every: float = 0.2, on_sample=None) -> float:
    """Wait for ``proc`` and return its peak resident memory in MB: its high-water mark (``VmHWM``), read
    every ``every`` seconds, so exact but for its last ``every`` seconds, where sampling the resident
    memory itself misses any peak between samples. (Not the ``ru_maxrss`` that ``os.wait4`` reports: a
    child spawned from this process carries this process's own peak in it.) ``on_sample(rss_mb)`` sees
    each sample of the resident memory."""
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, hwm_mb(proc.pid))
        if on_sample is not None:
            on_sample(rss_mb(proc.pid))
        time.sleep(every)
    return peak


def run_measured(cmd: list[str], log: Path, on_sample=None) -> tuple[float, str]:
    """Run ``cmd`` in a child, its output (stdout and stderr) to the file ``log``, and return its peak
    resident memory in MB (:func:`poll_peak_mb`) and its output; exit with the output if it fails. A
    file, not a pipe: the parent reads nothing until the child ends, and a child that filled a pipe
    would wait forever."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
        peak = poll_peak_mb(proc, on_sample=on_sample)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:4])} failed:\n{log.read_text()}")
    return peak, log.read_text()


def pairs_done(partial: Path) -> int:
    n = 0
    for f in partial.glob("pairs-*.parquet"):
        try:
            n += len(pd.read_parquet(f, columns=["pair_id"]))
        except Exception:  # a part being renamed into place
            pass
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--pair", type=int, default=60, help="index of the demo pair to repeat (60: an arithmetic pair)")
    ap.add_argument("--mixed", action="store_true", help="cycle all demo pairs instead (mixed lengths)")
    args = ap.parse_args()

    demo = [json.loads(line) for line in demo_path().read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        with data.open("w") as f:
            for i in range(args.pairs):
                row = dict(demo[i % len(demo)] if args.mixed else demo[args.pair], id=f"pair-{i:06d}")
                f.write(json.dumps(row) + "\n")
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "gradscope", "correlate", "--model", args.model, "--data", str(data),
               "--out", str(out), "--engine", args.engine, "--batch-size", str(args.batch_size),
               "--no-progress", "--n-boot", "200"]
        t0 = time.time()
        samples = []  # (seconds, pairs done, rss MB)
        count = {"t": 0.0, "done": 0}

        def sample(rss: float) -> None:
            now = time.time() - t0
            if now - count["t"] > 5:
                count["done"], count["t"] = pairs_done(out / ".partial"), now
            samples.append((now, count["done"], rss))

        peak, log = run_measured(cmd, Path(tmp) / "correlate.log", on_sample=sample)
    df = pd.DataFrame(samples, columns=["seconds", "pairs_done", "rss_mb"])
    df["tenth"] = (df["pairs_done"] * 10 // args.pairs).clip(upper=9)
    print(f"{args.pairs} pairs, model {args.model}, engine {args.engine}, {time.time() - t0:.0f} s")
    print("| pairs done | peak RSS (MB) |\n|---|---|")
    for tenth, g in df.groupby("tenth"):
        print(f"| {int(tenth) * args.pairs // 10:,} - {(int(tenth) + 1) * args.pairs // 10:,} | {g['rss_mb'].max():.0f} |")
    print(f"peak over the whole run (the kernel's count): {peak:.0f} MB")
    print(log.strip().splitlines()[-4])


if __name__ == "__main__":
    main()
