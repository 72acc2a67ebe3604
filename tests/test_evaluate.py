"""RewardBench scoring rules on hand-made tables; scoring independent of batch size and padding;
`gradscope compare` on hand-made tables; both commands end to end on a tiny model."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from gradscope import tables as T
from gradscope.cli import main
from gradscope.compare import disagreements, exclusive_counts, paired_bootstrap_diff, seed_table
from gradscope.data import PairEncoder, load_pairs
from gradscope.evaluate import results_markdown, scores_table, section_scores, subset_accuracies
from gradscope.model import load_model
from gradscope.scoring import score_pairs


def table(rows):
    """rows: (subset, category, reward_chosen, reward_rejected)."""
    df = pd.DataFrame(rows, columns=[T.SUBSET, T.CATEGORY, T.REWARD_CHOSEN, T.REWARD_REJECTED])
    df.insert(0, T.PAIR_ID, [f"p{i}" for i in range(len(df))])
    return scores_table(df)


HAND = table(
    [("hep-python", "reasoning", 1, 0)] * 3 + [("hep-python", "reasoning", 0, 1)]  # 3/4
    + [("math-prm", "reasoning", 2, 1), ("math-prm", "reasoning", 1, 1)]  # 1/2: a tie is wrong
    + [("alpacaeval-easy", "chat", 1, 0)] * 2 + [("mt-bench-easy", "chat", 0, 1)]  # 1.0 and 0.0
    + [("my-safety", "safety", 1, 0)] * 2 + [("my-safety", "safety", 0, 1)] * 2  # unknown subset: 2/4
    + [("xstest-should-refuse", "safety", 3, 2)] * 2  # 2/2
)


def test_section_scores_follow_rewardbench_by_hand():
    subsets = subset_accuracies(HAND)
    assert subsets["math-prm"]["accuracy"] == 0.5 and subsets["hep-python"]["accuracy"] == 0.75
    s = section_scores(subsets)
    reasoning = (0.5 * 984 + 0.75 * 164) / (984 + 164)  # math-prm weighs 984
    chat = (1.0 * 100 + 0.0 * 28) / (100 + 28)
    safety = (0.5 * 4 + 1.0 * 154) / (4 + 154)  # unknown subset weighted by its 4 rows
    assert math.isclose(s["sections"]["reasoning"], reasoning, rel_tol=1e-12)
    assert math.isclose(s["sections"]["chat"], chat, rel_tol=1e-12)
    assert math.isclose(s["sections"]["safety"], safety, rel_tol=1e-12)
    assert math.isnan(s["sections"]["chat-hard"])  # missing, never 0
    assert s["missing_sections"] == ["chat-hard"]
    assert s["partial_sections"] == ["chat", "safety", "reasoning"]
    assert "hep-go" in s["missing_subsets"]["reasoning"] and "mt-bench-hard" in s["missing_subsets"]["chat-hard"]
    assert math.isclose(s["average"], (chat + safety + reasoning) / 3, rel_tol=1e-12)
    md = results_markdown({"m": {**s, "accuracy": 0.0}})
    assert "| m | " in md and "n/a" in md and "no pairs for chat-hard" in md


def test_complete_rewardbench_average_is_mean_of_four_sections():
    from gradscope.rewardbench import SECTIONS

    rows = [(s, c, 1, 0) for c, subs in SECTIONS.items() for s in subs]
    rows += [("donotanswer", "safety", 0, 1)]  # donotanswer 1/2
    s = section_scores(subset_accuracies(table(rows)))
    safety = (100 + 100 + 154 + 250 + 0.5 * 136) / (100 + 100 + 154 + 250 + 136)
    assert s["partial_sections"] == [] and s["missing_sections"] == []
    assert math.isclose(s["average"], (1 + 1 + safety + 1) / 4, rel_tol=1e-12)


def test_rewards_do_not_depend_on_batch_size_or_padding(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype="float32")
    pairs = load_pairs("demo", limit=20)
    enc = [PairEncoder(loaded.tokenizer, max_length=64).encode(p) for p in pairs]
    ref = score_pairs(loaded, enc, batch_size=1)
    for bs, side, budget in [(16, "right", None), (16, "left", None), (7, "left", None), (16, "right", 200)]:
        got = score_pairs(loaded, enc, batch_size=bs, padding_side=side, max_batch_tokens=budget)
        np.testing.assert_allclose(got[T.REWARD_CHOSEN], ref[T.REWARD_CHOSEN], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[T.REWARD_REJECTED], ref[T.REWARD_REJECTED], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[T.PROXY_L2], ref[T.PROXY_L2], rtol=1e-5, atol=1e-6)
    assert list(ref[T.PAIR_ID]) == [p.pair_id for p in pairs]


def test_compare_on_hand_made_tables():
    a = table([("c", "chat", 1, 0), ("c", "chat", 1, 0), ("c", "chat", 0, 1), ("r", "reasoning", 0, 1),
               ("r", "reasoning", 1, 0), ("r", "reasoning", 0, 1)])
    b = table([("c", "chat", 1, 0), ("c", "chat", 0, 1), ("c", "chat", 1, 0), ("r", "reasoning", 1, 0),
               ("r", "reasoning", 1, 0), ("r", "reasoning", 1, 0)])
    dist = pd.DataFrame({T.PAIR_ID: a[T.PAIR_ID], T.DISTANCE: [5.0, 6.0, 0.5, 0.1, 3.0, 0.2]})
    d, edges = disagreements(a, b, dist, edges=[0, 1, 4, 10])
    assert list(d[T.PAIR_ID]) == ["p1", "p2", "p3", "p5"]
    assert list(d[T.WINNER]) == ["a", "b", "b", "b"]
    assert list(d[T.REGION]) == ["large", "small", "small", "small"]
    counts = exclusive_counts(d, len(edges) - 1)
    assert counts[["a", "b"]].values.tolist() == [[0, 3], [0, 0], [1, 0]]
    diff = paired_bootstrap_diff(a, b, n_boot=500, seed=0)
    assert math.isclose(diff["overall"]["diff_b_minus_a"], 5 / 6 - 3 / 6)
    assert math.isclose(diff["reasoning"]["diff_b_minus_a"], 1 - 1 / 3)
    lo, hi = diff["overall"]["diff_ci95"]
    assert lo <= diff["overall"]["diff_b_minus_a"] <= hi
    seeds = seed_table([a, b])
    assert math.isclose(seeds["chat"]["mean"], 2 / 3) and seeds["chat"]["stderr"] == 0
    assert math.isclose(seeds["reasoning"]["mean"], (1 / 3 + 1) / 2)
    assert math.isclose(seeds["reasoning"]["stderr"], np.std([1 / 3, 1], ddof=1) / math.sqrt(2))


def test_evaluate_and_compare_end_to_end(tiny_model_dir, tmp_path, capsys):
    args = ["--data", "demo", "--limit", "24", "--sample", "stratified", "--no-progress"]
    assert main(["evaluate", "--model", str(tiny_model_dir), "--out", str(tmp_path / "a"), *args]) == 0
    scores = pd.read_parquet(tmp_path / "a" / T.SCORES_FILE)
    assert list(scores.columns) == list(T.SCORES_COLUMNS) and len(scores) == 24
    res = json.loads((tmp_path / "a" / T.RESULTS_FILE).read_text())
    assert set(res["sections"]) >= {"chat", "chat-hard", "safety", "reasoning"}
    assert "| Model | Average | Chat | Chat-Hard | Safety | Reasoning |" in (tmp_path / "a" / T.RESULTS_MD_FILE).read_text()
    # several models: one row each
    assert main(["evaluate", "--model", str(tiny_model_dir), "--model", str(tiny_model_dir), "--seed", "1",
                 "--out", str(tmp_path / "two"), *args]) == 0
    assert (tmp_path / "two" / T.RESULTS_MD_FILE).read_text().count("| 0-") == 1
    # B: the same backbone with another head seed
    assert main(["evaluate", "--model", str(tiny_model_dir), "--seed", "3", "--out", str(tmp_path / "b"), *args]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--data", "demo", "--distance-model",
                 str(tiny_model_dir), "--bins", "4", "--out", str(tmp_path / "cmp"), "--no-progress",
                 "--n-boot", "200"]) == 0
    assert "disagreements" in capsys.readouterr().out
    d = pd.read_parquet(tmp_path / "cmp" / T.DISAGREEMENTS_FILE)
    assert list(d.columns) == list(T.DISAGREEMENTS_COLUMNS)
    assert (d[T.CORRECT_A] != d[T.CORRECT_B]).all()
    s = json.loads((tmp_path / "cmp" / T.COMPARE_FILE).read_text())
    assert s["n_pairs"] == 24 and sum(r["a"] + r["b"] for r in s["exclusive_correct"]) == len(d)
    assert (tmp_path / "cmp" / T.FIG4_FILE).stat().st_size > 5_000


@pytest.mark.parametrize("command", ["evaluate", "compare"])
def test_ctrl_c_does_not_advise_a_resume_the_command_lacks(command, tiny_model_dir, tmp_path, capsys, monkeypatch):
    import gradscope.evaluate
    import gradscope.scoring
    from gradscope.cli import main

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(gradscope.scoring, "score_pairs", interrupted)
    monkeypatch.setattr(gradscope.evaluate, "score_pairs", interrupted)
    args = {"evaluate": ["evaluate", "--model", str(tiny_model_dir)],
            "compare": ["compare", str(tiny_model_dir), str(tiny_model_dir)]}[command]
    code = main([*args, "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and err[-1].startswith("gradscope: interrupted;") and "--resume" not in err[-1]
