"""How well does a face-identity scorer verify pairs at small image sizes?

dlib on LFW (the real-face scorer), as in shared/docs/real-faces-on-cpu.md: each 250 px image is
centre-cropped to a `--crop` px box, resized to `--size` px, then handed to the scorer (which
upsamples it to 256 px itself):

    python benchmarks/scorer_pairs.py --scorer dlib --n-pairs 300 --size 32 --crop 120

The synthetic scorer on fresh pairs of private-namespace synthetic identities it never trained on:

    python benchmarks/scorer_pairs.py --scorer synthetic --n-pairs 1000 --size 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from loraleak.errors import LoraleakError
from loraleak.imaging import center_crop_resize, open_rgb
from loraleak.scoring.base import make_scorer
from loraleak.scoring.pairs import balanced_subset, read_lfw_pairs, verification_accuracy

DEFAULT_PAIRS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "lfw" / "pairs.tsv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scorer", choices=("dlib", "synthetic"), default="dlib")
    p.add_argument("--scorer-path", type=Path, default=None, help="saved synthetic scorer dir (default: shipped)")
    p.add_argument("--data", choices=("lfw", "synthetic"), default=None,
                   help="pairs to score (default: lfw for dlib, synthetic for the synthetic scorer)")
    p.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS, help="LFW pairs.tsv")
    p.add_argument("--n-pairs", type=int, default=300, help="half same-person, half different")
    p.add_argument("--size", type=int, default=32, help="image size handed to the scorer (px)")
    p.add_argument("--crop", type=int, default=120, help="LFW: centre crop box before resizing (px)")
    p.add_argument("--seed", type=int, default=0, help="synthetic: pair sampling seed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = args.data or ("lfw" if args.scorer == "dlib" else "synthetic")
    try:
        scorer = make_scorer(args.scorer, args.scorer_path)
        if data == "lfw":
            pairs = balanced_subset(read_lfw_pairs(args.pairs), args.n_pairs)

            def preprocess(path: Path):
                image = open_rgb(path)
                return center_crop_resize(image, args.size, crop_fraction=args.crop / min(image.size))

            setting = f"LFW crop {args.crop} -> {args.size} px"
        else:
            from loraleak.scoring.synthetic_scorer import synthetic_pairs

            pairs, preprocess = synthetic_pairs(args.n_pairs, size=args.size, seed=args.seed)
            setting = f"synthetic private identities, {args.size} px"
        start = time.perf_counter()
        result = verification_accuracy(scorer, pairs, preprocess)
        elapsed = time.perf_counter() - start
    except LoraleakError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_images = len({x for p in pairs for x in (p.a, p.b)})
    rows = [
        ("pairs (same / different)", f"{result.n_pairs} ({sum(p.same for p in pairs)} / "
                                     f"{sum(not p.same for p in pairs)})"),
        ("images", f"{n_images}"),
        ("face found", f"{result.found_rate:.3f}"),
        ("pairs with both faces", f"{result.n_found_pairs}"),
        ("accuracy, all pairs", f"{result.accuracy_all:.3f}"),
        ("accuracy, pairs with both faces", f"{result.accuracy_found:.3f}"),
        ("mean distance, same", f"{result.mean_distance_same:.3f}"),
        ("mean distance, different", f"{result.mean_distance_different:.3f}"),
        ("threshold", f"{scorer.threshold:.3f}"),
        ("seconds per image", f"{elapsed / n_images:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'metric'.ljust(width)} | value\n{'-' * width}-|------")
    for k, v in rows:
        print(f"{k.ljust(width)} | {v}")
    print(f"{scorer.name} on {setting}: found {result.found_rate:.3f}, accuracy {result.accuracy_all:.3f} (all pairs) "
          f"/ {result.accuracy_found:.3f} (both found), {elapsed / n_images:.3f} s/image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
