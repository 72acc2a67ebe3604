"""The quickstart notebook executes (tiny setting), and the smoke analyses run end to end."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_executes(tiny_model_dir, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("GRADSCOPE_QUICKSTART_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("GRADSCOPE_QUICKSTART_PAIRS", "12")
    nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # two figures
    assert any("grad_norm" in str(o.get("data", {}).get("text/plain", "")) for o in outputs)  # the table


@pytest.mark.parametrize("script", ["correlation_study", "bt_vs_normbt"])
def test_smoke_analyses_run_end_to_end(script, tiny_model_dir, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "analyses"))
    try:
        mod = __import__(script)
    finally:
        sys.path.remove(str(REPO / "analyses"))
    argv = ["--scale", "smoke", "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")]
    if script == "bt_vs_normbt":
        argv += ["--seeds", "2", "--publish", str(tmp_path / "published")]
    out = mod.main(argv)
    report = (out / "REPORT.md").read_text()
    assert "Command:" in report and "Figures:" in report
    pngs = list((out / "figures").glob("*.png"))
    expected = {"correlation_study": {"fig2_base.png", "fig3_base.png", "fig2_trained.png", "fig8.png", "fig9.png"},
                "bt_vs_normbt": {"fig4.png", "fig9.png"}}[script]
    assert expected <= {p.name for p in pngs}
    assert all(p.stat().st_size > 5_000 for p in pngs)
    if script == "bt_vs_normbt":
        published = {p.name for p in (tmp_path / "published").iterdir()}
        assert {"REPORT.md", "study.json", "runs.csv", "compare.json", "fig4.png", "fig9.png"} <= published

    # --resume keeps every finished stage (nothing is recomputed) and rewrites the same report
    capsys.readouterr()
    assert mod.main(argv + ["--resume"]) == out
    kept = [line for line in capsys.readouterr().out.splitlines() if line.startswith("kept ")]
    # bt_vs_normbt: the caches, 8 sweep runs (2 BT rates, 3 NormBT, 3 label smoothing), 5 final runs, 5 evaluations
    assert len(kept) == {"correlation_study": 3, "bt_vs_normbt": 19}[script], kept
    def without_command(text):
        return [line for line in text.splitlines() if not line.startswith("Command:")]

    assert without_command((out / "REPORT.md").read_text()) == without_command(report)
