"""Copy the PNG figures of finished studies into a gallery folder, shrunk for committing.

    python analyses/gallery.py results/correlation-small --out docs/gallery

Each results directory's figures are redrawn from its tables first (`gradscope figures`), then
every `figures/*.png` is copied as `<results dir name>-<figure>.png`, at most 1400 px wide with a
128-colour palette (a plot loses nothing visible; the files shrink about threefold). Tables only:
no model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gradscope.figures import make_all  # noqa: E402
from gradscope.tables import atomic_write_bytes  # noqa: E402

MAX_WIDTH = 1400


def shrink_png(src: Path, dst: Path, max_width: int = MAX_WIDTH) -> Path:
    from PIL import Image

    im = Image.open(src).convert("RGB")
    if im.width > max_width:
        im = im.resize((max_width, round(im.height * max_width / im.width)), Image.LANCZOS)
    im = im.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    atomic_write_bytes(dst, lambda tmp: im.save(tmp, format="PNG", optimize=True))
    return dst


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="results directories of finished studies")
    ap.add_argument("--out", default="docs/gallery")
    args = ap.parse_args(argv)
    written = []
    for root in map(Path, args.results):
        made = make_all(root, log=print)
        for name, files in made.items():
            for f in map(Path, files):
                if f.suffix == ".png":
                    written.append(shrink_png(f, Path(args.out) / f"{root.name}-{f.name}"))
                    print(f"{name}: {written[-1]}")
    return written


if __name__ == "__main__":
    main()
