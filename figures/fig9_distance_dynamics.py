"""Figure 9: representation distance over training, one panel per run (LABEL=dynamics.parquet).

    python figures/fig9_distance_dynamics.py BT=runs/bt/dynamics.parquet NormBT=runs/normbt/dynamics.parquet
"""
import argparse

from gradscope.figures import fig9, parse_runs

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=path/to/dynamics.parquet (or a path: its folder names it)")
    ap.add_argument("--out", default="figures/fig9")
    a = ap.parse_args()
    print("\n".join(fig9(parse_runs(a.runs), a.out)))
