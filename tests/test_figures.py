"""Figure scripts: they run on synthetic tables, write non-empty PNG and PDF, never import torch,
and fail with a message naming the missing table or column."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradscope import tables as T
from gradscope.figures import make_all

REPO = Path(__file__).resolve().parents[1]


def synthetic_pairs(n=40, seed=0):
    rng = np.random.default_rng(seed)
    cats = np.array(["chat", "chat-hard", "safety", "reasoning"])[np.arange(n) % 4]
    dist = rng.gamma(2.0, 2.0, n)
    d = rng.normal(0, 0.5, n)
    grad = 4 * dist + rng.normal(0, 1, n).clip(-1, 1) + 2
    return pd.DataFrame({T.PAIR_ID: [f"p{i}" for i in range(n)], T.SUBSET: cats, T.CATEGORY: cats,
                         T.REWARD_DIFF: d, T.PROXY_L2: dist, T.GRAD_NORM: grad, T.GRAD_NORM_BACKBONE: grad * 0.9,
                         T.BT_GRAD_NORM: grad / (1 + np.exp(d))})


def synthetic_results(root: Path) -> Path:
    (root / "base").mkdir(parents=True)
    synthetic_pairs().to_parquet(root / "base" / T.PAIRS_FILE)
    (root / "trained").mkdir()
    synthetic_pairs(seed=1).to_parquet(root / "trained" / T.PAIRS_FILE)
    steps = np.arange(1, 21)
    for run in ("bt", "normbt"):
        (root / run).mkdir()
        base = 3 + np.sin(steps / 3)
        pd.DataFrame({"step": steps, "dist_mean": base, "dist_min": base - 2.5, "dist_p10": base - 2,
                      "dist_p25": base - 1, "dist_p75": base + 1, "dist_p90": base + 2, "dist_max": base + 4}
                     ).to_parquet(root / run / "dynamics.parquet")
    (root / "cmp").mkdir()
    counts = [{"distance_bin": i, "a": 10 - i, "b": 3 + i, "distance_low": float(i), "distance_high": i + 1.0,
               "region": ["small", "small", "medium", "medium", "large", "large"][i]} for i in range(6)]
    (root / "cmp" / T.COMPARE_FILE).write_text(json.dumps({"label_a": "BT", "label_b": "NormBT",
                                                           "exclusive_correct": counts}))
    return root


def test_make_all_draws_every_figure(tmp_path):
    root = synthetic_results(tmp_path / "results")
    messages = []
    made = make_all(root, log=messages.append)
    assert set(made) == {"fig2 (base)", "fig3 (base)", "fig2 (trained)", "fig3 (trained)", "fig8", "fig4 (cmp)", "fig9"}
    for files in made.values():
        assert {Path(f).suffix for f in files} == {".png", ".pdf"}
        assert all(Path(f).stat().st_size > 5_000 for f in files)
    assert not any(m.startswith("skipped") for m in messages)


def test_make_all_says_what_it_skipped(tmp_path):
    (tmp_path / "only").mkdir()
    synthetic_pairs().to_parquet(tmp_path / "only" / T.PAIRS_FILE)
    messages = []
    make_all(tmp_path, log=messages.append)
    assert any("skipped fig4: no compare.json" in m for m in messages)
    assert any("skipped fig9: no dynamics.parquet" in m for m in messages)


@pytest.mark.parametrize("script,args", [
    ("fig2_category_distributions.py", ["base/pairs.parquet"]),
    ("fig3_fixed_reward_diff.py", ["base/pairs.parquet", "--bins", "3"]),
    ("fig4_disagreements.py", ["cmp/compare.json"]),
    ("fig8_full_vs_proxy.py", ["base=base/pairs.parquet", "trained=trained/pairs.parquet"]),
    ("fig9_distance_dynamics.py", ["BT=bt/dynamics.parquet", "NormBT=normbt/dynamics.parquet"]),
    ("make_all.py", ["."]),
])
def test_figure_scripts_run_without_torch(tmp_path, script, args):
    root = synthetic_results(tmp_path / "r")
    code = (f"import runpy, sys; sys.argv = {[script, *args, '--out', str(tmp_path / 'out' / 'fig')]!r};"
            f"runpy.run_path({str(REPO / 'figures' / script)!r}, run_name='__main__');"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'figure code imported torch'")
    if script == "make_all.py":
        code = code.replace(f"'--out', {str(tmp_path / 'out' / 'fig')!r}", f"'--out', {str(tmp_path / 'out')!r}")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pngs = list((tmp_path / "out").glob("*.png"))
    assert pngs and all(p.stat().st_size > 5_000 for p in pngs)


def test_missing_column_is_named(tmp_path):
    from gradscope.figures import fig2

    bad = synthetic_pairs().drop(columns=[T.BT_GRAD_NORM])
    bad.to_parquet(tmp_path / "p.parquet")
    with pytest.raises(ValueError, match="pairs.parquet: missing column\\(s\\) bt_grad_norm"):
        fig2(tmp_path / "p.parquet", tmp_path / "fig2")


def test_cli_figures(tmp_path, capsys):
    from gradscope.cli import main

    root = synthetic_results(tmp_path / "results")
    assert main(["figures", str(root)]) == 0
    assert "made fig9" in capsys.readouterr().out
    assert main(["figures", str(tmp_path / "nope")]) == 2


def test_fig9_lays_many_runs_out_in_rows_of_three():
    from gradscope.plots.fig9 import plot_fig9

    steps = np.arange(1, 6)
    df = pd.DataFrame({c: steps * 1.0 for c in ("dist_mean", "dist_min", "dist_p10", "dist_p25", "dist_p75",
                                                 "dist_p90", "dist_max")}).assign(step=steps)
    fig = plot_fig9({f"{loss}-s{s}": df for loss in ("bt", "normbt") for s in range(2)} | {"extra": df})
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(fig.axes) == 6 and [ax.get_title() for ax in shown] == [
        "bt-s0", "bt-s1", "normbt-s0", "normbt-s1", "extra"]
    assert len({round(ax.get_position().y0, 3) for ax in shown}) == 2  # two rows


def test_cli_help_and_figures_do_not_import_torch(tmp_path):
    root = synthetic_results(tmp_path / "results")
    code = ("import contextlib, io, sys\n"
            "from gradscope.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n"
            "        main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "assert 'correlate' in out.getvalue() and 'train' in out.getvalue()\n"
            f"assert main(['figures', {str(root)!r}]) == 0\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (root / "figures" / "fig9.png").exists()


def test_gallery_copies_shrunk_pngs_of_every_figure(tmp_path):
    from PIL import Image

    sys.path.insert(0, str(REPO / "analyses"))
    try:
        import gallery
    finally:
        sys.path.remove(str(REPO / "analyses"))
    root = synthetic_results(tmp_path / "study")
    written = gallery.main([str(root), "--out", str(tmp_path / "gallery")])
    names = {p.name for p in written}
    assert {"study-fig2_base.png", "study-fig8.png", "study-fig9.png", "study-fig4_cmp.png"} <= names
    for p in written:
        original = root / "figures" / p.name.removeprefix("study-")
        with Image.open(p) as im:
            assert im.width <= gallery.MAX_WIDTH and im.mode == "P"
        assert 0 < p.stat().st_size <= original.stat().st_size
