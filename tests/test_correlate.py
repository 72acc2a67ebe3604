"""`gradscope correlate` end to end on a tiny local model: the table contract, resume, atomicity."""

import json

import numpy as np
import pandas as pd
import pytest

import gradscope.correlate as correlate_mod
from gradscope import tables as T
from gradscope.cli import main
from gradscope.correlate import CorrelateConfig, run_correlate


def cfg(model, out, **kw):
    base = dict(model=str(model), out=str(out), data="demo", dtype="float64", batch_size=8, max_batch_tokens=None,
                n_boot=200, progress=False, limit=24, sample="stratified")
    return CorrelateConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def demo_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = run_correlate(cfg(tiny_model_dir, out), log=lambda m: None)
    return out, summary


def test_contract_columns_and_files(demo_run):
    out, summary = demo_run
    pairs = pd.read_parquet(out / T.PAIRS_FILE)
    assert list(pairs.columns[: len(T.PAIRS_COLUMNS)]) == list(T.PAIRS_COLUMNS)
    assert len(pairs) == 24 and pairs[T.PAIR_ID].is_unique
    assert set(pairs[T.CATEGORY]) == {"chat", "chat-hard", "safety", "reasoning"}
    np.testing.assert_allclose(pairs[T.REWARD_DIFF], pairs[T.REWARD_CHOSEN] - pairs[T.REWARD_REJECTED])
    np.testing.assert_allclose(pairs[T.GRAD_NORM] ** 2, pairs[T.GRAD_NORM_HEAD] ** 2 + pairs[T.GRAD_NORM_BACKBONE] ** 2)
    np.testing.assert_allclose(pairs[T.GRAD_NORM_HEAD], pairs[T.PROXY_L2], rtol=1e-9)  # linear head
    sig = 1 / (1 + np.exp(pairs[T.REWARD_DIFF]))
    np.testing.assert_allclose(pairs[T.BT_GRAD_NORM], sig * pairs[T.GRAD_NORM], rtol=1e-12)

    blocks = pd.read_parquet(out / T.GRAD_BLOCKS_FILE)
    assert list(blocks.columns) == list(T.GRAD_BLOCKS_COLUMNS)
    assert set(blocks[T.BLOCK]) == {"embedding", "layer.0", "layer.1", "final_norm", "head"}
    total = blocks.assign(sq=blocks[T.GRAD_NORM] ** 2).groupby(T.PAIR_ID)["sq"].sum() ** 0.5
    np.testing.assert_allclose(total[pairs[T.PAIR_ID]].to_numpy(), pairs[T.GRAD_NORM].to_numpy(), rtol=1e-12)

    s = json.loads((out / T.SUMMARY_FILE).read_text())
    for key in ("model", "data", "n_pairs", "engine", "dtype", "seconds", "versions", "config",
                "correlations", "by_category", "by_reward_diff_bin"):
        assert key in s, key
    c = s["correlations"][T.PROXY_L2]["overall"]["without_head"]
    assert set(c) == {"pearson_r", "pearson_ci95", "spearman_rho", "n"} and c["n"] == 24
    assert set(s["correlations"][T.PROXY_COSINE]) == {"overall", "chat", "chat-hard", "safety", "reasoning"}
    assert s["by_category"]["reasoning"][T.PROXY_L2]["count"] == 9  # round-robin over 5 subsets: code 5, math 4
    assert sum(b["n"] for b in s["by_reward_diff_bin"]) == 24
    assert (out / T.FIG8_FILE).stat().st_size > 10_000
    assert not (out / correlate_mod.PARTIAL_DIR).exists()


@pytest.mark.parametrize("engine,pack", [("loop", False), ("vmap", True)])
def test_engines_give_the_same_table(demo_run, tiny_model_dir, tmp_path, engine, pack):
    """Every engine, packed (the default) or not, gives the ghost engine's packed table."""
    out, summary = demo_run
    assert (summary["engine"], summary["engine_requested"]) == ("ghost", "auto")
    s = run_correlate(cfg(tiny_model_dir, tmp_path, engine=engine, padding_side="left", batch_size=5, pack=pack),
                      log=lambda m: None)
    assert s["batching"]["pack"] is pack
    a, b = pd.read_parquet(out / T.PAIRS_FILE), pd.read_parquet(tmp_path / T.PAIRS_FILE)
    pd.testing.assert_frame_equal(a, b, rtol=1e-6)


def test_a_token_budget_changes_the_batches_not_the_numbers(demo_run, tiny_model_dir, tmp_path):
    out, summary = demo_run
    batching = summary["batching"]  # 24 pairs, 8 a batch, packed and unpacked apart
    assert batching["max_batch_tokens"] is None and batching["n_batches"] >= 3
    assert batching["pack"] and 0 < batching["packed_pairs"] <= 24 and batching["tokens_run"] < batching["tokens_unpacked"]
    assert CorrelateConfig().max_batch_tokens == 2048  # the command's default
    for budget in (700, 300):
        s = run_correlate(cfg(tiny_model_dir, tmp_path / str(budget), max_batch_tokens=budget), log=lambda m: None)
        a, b = pd.read_parquet(out / T.PAIRS_FILE), pd.read_parquet(tmp_path / str(budget) / T.PAIRS_FILE)
        pd.testing.assert_frame_equal(a, b, rtol=1e-10)
        assert s["batching"]["max_batch_tokens"] == budget and s["batching"]["n_batches"] > batching["n_batches"]


def test_length_batches_keep_the_budget_and_every_pair_once():
    from gradscope.data import EncodedPair, Pair, length_batches

    p = Pair("p", (), (), "", "all")
    lengths = [(5, 3), (40, 41), (12, 2), (100, 7), (9, 9), (30, 1)]
    enc = [EncodedPair(p, tuple(range(a)), tuple(range(b)), False) for a, b in lengths]
    batches = length_batches(enc, batch_size=3, max_batch_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(len(enc)))
    longest = [max(lengths[i]) for b in batches for i in b]
    assert longest == sorted(longest)  # shortest first
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or 2 * len(b) * max(max(lengths[i]) for i in b) <= 100  # alone if over the budget
    assert [3] in batches  # the 100-token pair, alone
    assert length_batches(enc, batch_size=4) == [[0, 4, 2, 5], [1, 3]]


def test_interrupted_run_leaves_no_result_and_resumes(demo_run, tiny_model_dir, tmp_path, monkeypatch):
    out, _ = demo_run
    real = correlate_mod.batch_rows
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(correlate_mod, "batch_rows", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_correlate(cfg(tiny_model_dir, tmp_path), log=lambda m: None)
    assert not any((tmp_path / f).exists() for f in (T.PAIRS_FILE, T.GRAD_BLOCKS_FILE, T.SUMMARY_FILE, T.FIG8_FILE))
    parts = sorted((tmp_path / correlate_mod.PARTIAL_DIR).glob("pairs-*.parquet"))
    assert len(parts) == 2
    done = sum(len(pd.read_parquet(f)) for f in parts)

    monkeypatch.setattr(correlate_mod, "batch_rows", real)
    messages = []
    with pytest.raises(Exception, match="different options"):
        run_correlate(cfg(tiny_model_dir, tmp_path, resume=True, max_length=7), log=messages.append)
    summary = run_correlate(cfg(tiny_model_dir, tmp_path, resume=True), log=messages.append)
    assert f"resuming: {done} of 24 pairs already done" in messages
    assert summary["resumed"] is True
    pd.testing.assert_frame_equal(pd.read_parquet(out / T.PAIRS_FILE), pd.read_parquet(tmp_path / T.PAIRS_FILE),
                                  rtol=1e-9)
    pd.testing.assert_frame_equal(pd.read_parquet(out / T.GRAD_BLOCKS_FILE),
                                  pd.read_parquet(tmp_path / T.GRAD_BLOCKS_FILE), rtol=1e-9)


def test_cli_runs_and_prints_correlations(tiny_model_dir, tmp_path, capsys):
    code = main(["correlate", "--model", str(tiny_model_dir), "--limit", "6", "--out", str(tmp_path),
                 "--no-progress", "--n-boot", "50"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "6 pairs, engine ghost" in printed and "grad_norm vs proxy_l2" in printed
    assert (tmp_path / T.SUMMARY_FILE).exists()


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["correlate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--data", "--out", "--engine", "--limit", "--resume", "--max-length",
                 "--chat-template", "--trust-remote-code", "pairs.parquet"):
        assert flag in text


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_shard_and_merge_to_the_single_process_table(demo_run, tiny_model_dir, tmp_path):
    """`accelerate launch` with two CPU processes (gloo): disjoint shards, one merged table."""
    import subprocess
    import sys
    from pathlib import Path

    out, _ = demo_run
    c = cfg(tiny_model_dir, tmp_path)
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "gradscope", "correlate", "--model", c.model, "--out", str(tmp_path), "--dtype", "float64",
           "--limit", "24", "--sample", "stratified", "--n-boot", "200", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / T.SUMMARY_FILE).read_text())
    assert summary["processes"] == 2
    pd.testing.assert_frame_equal(pd.read_parquet(out / T.PAIRS_FILE), pd.read_parquet(tmp_path / T.PAIRS_FILE),
                                  rtol=1e-9)
    pd.testing.assert_frame_equal(pd.read_parquet(out / T.GRAD_BLOCKS_FILE),
                                  pd.read_parquet(tmp_path / T.GRAD_BLOCKS_FILE), rtol=1e-9)
