"""Figure 4: pairs where two models disagree, by base-model distance, from a compare.json.

    python figures/fig4_disagreements.py results/compare/compare.json [--out figures/fig4]
"""
import argparse

from gradscope.figures import fig4

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compare_json")
    ap.add_argument("--out", default="figures/fig4")
    a = ap.parse_args()
    print("\n".join(fig4(a.compare_json, a.out)))
