"""The benchmarks' own measuring tools: a wrong peak would make every memory table wrong."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_engines import peak_extra_mb, reset_peak_rss  # noqa: E402


def _touch(mb: int) -> None:
    x = torch.ones(mb * 2**20 // 4)  # every page written, then freed (a large block goes back to the system)
    del x


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_extra_mb_reads_the_peak_of_the_call_alone():
    assert reset_peak_rss()
    _touch(400)  # an earlier, larger peak of the same process must not show
    peak = peak_extra_mb(lambda: _touch(100), "cpu")
    assert 95 <= peak <= 150, peak
    assert peak_extra_mb(lambda: None, "cpu") < 20


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_poll_peak_mb_is_the_childs_own_exact_peak():
    """A peak that lasts a moment (sampling the resident memory every 0.2 s, as the memory benchmarks
    did, can miss it), in a child of a process whose own memory is larger (``ru_maxrss`` would carry it)."""
    import subprocess

    from bench_memory_flat import poll_peak_mb

    ballast = torch.ones(500 * 2**20 // 4)  # this process: at least 500 MB resident
    code = "import time, numpy as np; x = np.ones(300 * 2**20 // 8); del x; time.sleep(1.0)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    peak = poll_peak_mb(proc, every=0.05)
    assert proc.returncode == 0
    assert 300 <= peak <= 400, peak
    del ballast


def test_interleaved_schedule_runs_every_batch_once_in_step_with_each_pass():
    from bench_interleaved import schedule

    order = schedule({"packed": 2, "unpacked": 4})
    assert sorted(order) == [("packed", 0), ("packed", 1)] + [("unpacked", i) for i in range(4)]
    assert order == [("unpacked", 0), ("packed", 0), ("unpacked", 1), ("unpacked", 2), ("packed", 1), ("unpacked", 3)]
    assert schedule({"packed": 2, "unpacked": 4}, reverse=True)[:3] == [("unpacked", 0), ("unpacked", 1), ("packed", 0)]
    for p in ("packed", "unpacked"):  # each pass's batches in their own order
        idx = [i for q, i in order if q == p]
        assert idx == sorted(idx)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_run_measured_lets_a_chatty_child_finish_and_reports_a_failure(tmp_path):
    """Its output goes to a file: 1 MB of it would fill a pipe that nobody reads until the child ends."""
    from bench_memory_flat import run_measured

    peak, out = run_measured([sys.executable, "-c", "print('x' * 2**20); print('end')"], tmp_path / "a.log")
    assert out.splitlines()[-1] == "end" and peak > 0
    with pytest.raises(SystemExit, match="boom"):
        run_measured([sys.executable, "-c", "raise SystemExit('boom')"], tmp_path / "b.log")


def test_batch_best_sums_each_batchs_fastest_pass():
    from bench_packing import batch_best

    assert batch_best([[3.0, 1.0, 2.0], [2.0, 4.0, 2.5]]) == 2.0 + 1.0 + 2.0
