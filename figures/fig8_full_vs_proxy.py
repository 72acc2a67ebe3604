"""Figure 8: full ‖∇θ(r_w - r_l)‖ against ‖h_w - h_l‖, one panel per run (LABEL=pairs.parquet).

    python figures/fig8_full_vs_proxy.py base=results/base/pairs.parquet trained=results/bt/pairs.parquet
"""
import argparse

from gradscope.figures import fig8, parse_runs

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=path/to/pairs.parquet (or a path: its folder names it)")
    ap.add_argument("--out", default="figures/fig8")
    a = ap.parse_args()
    print("\n".join(fig8(parse_runs(a.runs), a.out)))
