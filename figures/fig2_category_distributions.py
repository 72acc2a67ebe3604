"""Figure 2: per-category BT gradient norms and representation distances, from a correlate pairs.parquet.

    python figures/fig2_category_distributions.py results/correlate/pairs.parquet [--out figures/fig2]
"""
import argparse

from gradscope.figures import fig2

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs")
    ap.add_argument("--out", default="figures/fig2")
    ap.add_argument("--title")
    a = ap.parse_args()
    print("\n".join(fig2(a.pairs, a.out, a.title)))
