"""Figure 3: BT update size against distance within quantile bins of the reward difference.

    python figures/fig3_fixed_reward_diff.py results/correlate/pairs.parquet [--bins 4] [--out figures/fig3]
"""
import argparse

from gradscope.figures import fig3

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs")
    ap.add_argument("--bins", type=int, default=4)
    ap.add_argument("--out", default="figures/fig3")
    ap.add_argument("--title")
    a = ap.parse_args()
    print("\n".join(fig3(a.pairs, a.out, a.title, a.bins)))
