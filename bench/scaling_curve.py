"""Walked validation τ of several fits against tokens seen and against distinct training sequences.

    python bench/scaling_curve.py --out docs/images/draft-data-axis.png \
        44089=runs/a/curves.json 22000=runs/b/curves.json ...

Each argument is `SEQUENCES=CURVES`: a fit's `curves.json` and how many distinct training sequences it
drew from (`fit --max-train-sequences`, or the whole set). Prints walked τ per fit at each evaluated step
and at the last step every fit reached, and plots both views; fits must share `--batch-tokens`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def walked(curves: Path) -> list[tuple[int, float]]:
    """(step, val_walk_tau) at every evaluation of one fit."""
    return [(r["step"], r["val_walk_tau"]) for r in json.loads(curves.read_text()) if "val_walk_tau" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fits", nargs="+", metavar="SEQUENCES=CURVES")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="padded target tokens per fit step")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (needs matplotlib)")
    args = parser.parse_args()
    fits: dict[int, list[tuple[int, float]]] = {}
    for item in args.fits:
        count, _, path = item.partition("=")
        if not path:
            parser.error(f"expected SEQUENCES=CURVES, got {item!r}")
        fits[int(count)] = walked(Path(path))
    common = min(max(step for step, _ in points) for points in fits.values())
    for count, points in sorted(fits.items()):
        at_common = [tau for step, tau in points if step == common]
        row = " ".join(f"{step}:{tau:.3f}" for step, tau in points)
        print(f"{count:>8} sequences: {row}  | at step {common}: {at_common[0] if at_common else float('nan'):.3f}")
    if args.out is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_tokens, by_data) = plt.subplots(1, 2, figsize=(11, 4))
    for count, points in sorted(fits.items()):
        by_tokens.plot([s * args.batch_tokens / 1e6 for s, _ in points], [t for _, t in points], "o-",
                       label=f"{count:,} sequences")
    by_tokens.set_xlabel("padded tokens seen (millions)")
    by_tokens.set_ylabel("walked validation τ")
    by_tokens.legend()
    steps = sorted({s for points in fits.values() for s, _ in points if s <= common and s >= common // 2})
    for step in steps:
        xs = [(c, t) for c, points in sorted(fits.items()) for s, t in points if s == step]
        by_data.plot([c for c, _ in xs], [t for _, t in xs], "o-", label=f"step {step} "
                     f"({step * args.batch_tokens / 1e6:.0f}M tokens)")
    by_data.set_xscale("log")
    by_data.set_xlabel("distinct training sequences")
    by_data.set_ylabel("walked validation τ")
    by_data.legend()
    for ax in (by_tokens, by_data):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
