"""Regenerate every paper figure whose tables exist under a results directory (no torch, no models)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from . import tables as T

FORMATS = ("png", "pdf")


def _label(path: Path, root: Path) -> str:
    rel = path.parent.relative_to(root)
    return str(rel) if str(rel) != "." else root.name


def _find(root: Path, name: str) -> list[Path]:
    return sorted(p for p in root.rglob(name) if "figures" not in p.relative_to(root).parts[:-1]
                  and ".partial" not in p.parts and not any(part.startswith("checkpoint-") for part in p.parts))


def parse_runs(items: list[str]) -> dict[str, str]:
    """``LABEL=path`` (or a bare path, labelled by its folder) -> {label: path}.

    >>> parse_runs(["BT=runs/bt/dynamics.parquet", "runs/normbt/dynamics.parquet"])
    {'BT': 'runs/bt/dynamics.parquet', 'normbt': 'runs/normbt/dynamics.parquet'}
    """
    out = {}
    for item in items:
        label, path = item.split("=", 1) if "=" in item else (Path(item).parent.name or item, item)
        out[label] = path
    return out


def fig2(pairs_path, out, title=None) -> list[str]:
    from .plots.fig2 import plot_fig2
    from .plotting import save

    return save(plot_fig2(pd.read_parquet(pairs_path), title=title), Path(out), FORMATS)


def fig3(pairs_path, out, title=None, n_bins: int = 4) -> list[str]:
    from .plots.fig3 import plot_fig3
    from .plotting import save

    return save(plot_fig3(pd.read_parquet(pairs_path), n_bins=n_bins, title=title), Path(out), FORMATS)


def fig4(compare_json, out) -> list[str]:
    from .plots.fig4 import plot_fig4
    from .plotting import save

    s = json.loads(Path(compare_json).read_text())
    if "exclusive_correct" not in s:
        raise ValueError(f"{compare_json}: missing field exclusive_correct")
    counts = pd.DataFrame(s["exclusive_correct"])
    return save(plot_fig4(counts, s.get("label_a", "A"), s.get("label_b", "B")), Path(out), FORMATS)


def fig8(pairs_paths: dict[str, str | Path], out) -> list[str]:
    from .plots.fig8 import Panel, plot_fig8
    from .plotting import save

    panels = [Panel(label, pd.read_parquet(p)) for label, p in pairs_paths.items()]
    return save(plot_fig8(panels), Path(out), FORMATS)


def fig9(dynamics_paths: dict[str, str | Path], out) -> list[str]:
    from .plots.fig9 import plot_fig9
    from .plotting import save

    return save(plot_fig9({label: pd.read_parquet(p) for label, p in dynamics_paths.items()}), Path(out), FORMATS)


def make_all(results_dir: str | Path, out: str | Path | None = None, log=print) -> dict[str, list[str]]:
    """Draw Figures 2, 3, 4, 8 and 9 from the tables found under ``results_dir`` into
    ``out`` (default ``results_dir/figures``); say which were skipped and why."""
    import matplotlib.pyplot as plt

    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such results directory")
    out = Path(out) if out else root / "figures"
    pairs = _find(root, T.PAIRS_FILE)
    compares = _find(root, T.COMPARE_FILE)
    dynamics = _find(root, "dynamics.parquet")
    jobs = []
    for p in pairs:
        tag = _label(p, root).replace("/", "_")
        jobs.append((f"fig2 ({_label(p, root)})", lambda p=p, tag=tag: fig2(p, out / f"fig2_{tag}", _label(p, root))))
        jobs.append((f"fig3 ({_label(p, root)})", lambda p=p, tag=tag: fig3(p, out / f"fig3_{tag}", _label(p, root))))
    if pairs:
        jobs.append(("fig8", lambda: fig8({_label(p, root): p for p in pairs}, out / "fig8")))
    for c in compares:
        jobs.append((f"fig4 ({_label(c, root)})", lambda c=c: fig4(c, out / f"fig4_{_label(c, root).replace('/', '_')}")))
    if dynamics:
        jobs.append(("fig9", lambda: fig9({_label(d, root): d for d in dynamics}, out / "fig9")))
    made: dict[str, list[str]] = {}
    for name, job in jobs:
        try:
            made[name] = job()
            log(f"made {name}: {', '.join(made[name])}")
        except (ValueError, KeyError) as e:
            log(f"skipped {name}: {e}")
        finally:
            plt.close("all")
    for fig, table, found in [("fig2, fig3, fig8", T.PAIRS_FILE, pairs), ("fig4", T.COMPARE_FILE, compares),
                              ("fig9", "dynamics.parquet", dynamics)]:
        if not found:
            log(f"skipped {fig}: no {table} under {root}")
    return made
