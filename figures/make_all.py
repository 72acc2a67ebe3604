"""Regenerate every figure whose tables exist under a results directory (same as `gradscope figures`).

    python figures/make_all.py results/ [--out results/figures]
"""
import argparse

from gradscope.figures import make_all

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results_dir")
    ap.add_argument("--out")
    a = ap.parse_args()
    make_all(a.results_dir, a.out)
