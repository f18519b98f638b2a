"""Benchmark: the challenge F1 (``cellseg_lite.metrics``) against ``stardist.matching.matching``.

Builds a 2000 x 2000 ground truth of about 4000 touching cells and a prediction
derived from it (cells shifted, split, merged, deleted, a few spurious), times
both implementations on the whole image (no boundary rule, so that they score
the same cells), checks that the F1s are identical and writes the figures to
``benchmarks/RESULTS.md`` between this script's own markers.

Run from the repository root::

    .venv/bin/python benchmarks/bench_metrics.py
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from _results import RESULTS, machine, median_seconds, now, write_section

from cellseg_lite import metrics, synthetic


def perturb(labels: np.ndarray, rng: np.random.Generator, *, max_shift: int = 2) -> np.ndarray:
    """A plausible prediction of ``labels``: every cell shifted by up to ``max_shift`` pixels,
    4% split in two, 4% of touching pairs merged, 5% deleted, 1% spurious cells; new ids."""
    n = int(labels.max())
    h, w = labels.shape
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs]
    dy, dx = rng.integers(-max_shift, max_shift + 1, (2, n + 1))
    out = np.zeros_like(labels)
    out[np.clip(ys + dy[ids], 0, h - 1), np.clip(xs + dx[ids], 0, w - 1)] = ids
    ys, xs = np.nonzero(out)
    ids = out[ys, xs]
    centre = np.bincount(ids, xs, n + 1) / np.maximum(np.bincount(ids, minlength=n + 1), 1)
    split = (rng.random(n + 1) < 0.04)[ids] & (xs > centre[ids])
    out[ys[split], xs[split]] = n + ids[split]
    n_extra = n // 100
    lookup = np.arange(2 * n + 1 + n_extra)
    a, b = out[:, :-1].ravel(), out[:, 1:].ravel()
    pairs = np.unique(np.stack([a, b], 1)[(a != b) & (a > 0) & (b > 0)], axis=0)
    merged = pairs[rng.random(len(pairs)) < 0.04]
    lookup[merged[:, 1]] = merged[:, 0]
    lookup[rng.random(lookup.size) < 0.05] = 0
    lookup[0] = 0
    out = lookup[out]
    yy, xx = np.mgrid[-4:5, -4:5]
    disc = yy**2 + xx**2 <= 16
    for k in range(n_extra):
        top, left = rng.integers(0, (h - 9, w - 9))
        window = out[top : top + 9, left : left + 9]
        window[disc & (window == 0)] = 2 * n + 1 + k
    ids = np.concatenate([[0], 1 + rng.permutation(2 * n + n_extra)])
    return ids[out].astype(np.int32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2000, help="image side in pixels")
    parser.add_argument("--cells", type=int, default=4000, help="number of ground-truth cells")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.name}")
    args = parser.parse_args(argv)

    from stardist.matching import matching

    rng = np.random.default_rng(args.seed)
    y_true = synthetic.voronoi_labels((args.size, args.size), args.cells, rng)
    y_pred = perturb(y_true, rng)

    rows, identical = [], True
    for threshold in (0.5, 0.3):
        ours_s, ours_f1 = median_seconds(
            lambda t=threshold: metrics.f1_score(y_true, y_pred, t, drop_boundary=False),
            args.repeats,
        )
        theirs_s, theirs = median_seconds(
            lambda t=threshold: matching(y_true, y_pred, thresh=t), args.repeats
        )
        same = ours_f1 == float(theirs.f1)
        identical &= same
        rows.append((threshold, ours_s, theirs_s, ours_f1, float(theirs.f1), same))
    m = metrics.match(y_true, y_pred, drop_boundary=False)

    extra = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python benchmarks/bench_metrics.py", *extra])
    lines = [
        "## Challenge F1: `cellseg_lite.metrics` vs `stardist.matching.matching`",
        "",
        f"A {args.size} x {args.size} ground truth with {m.n_true} cells and a perturbed "
        f"prediction with {m.n_pred} cells (seed {args.seed}); both functions score the whole "
        f"image (`drop_boundary=False`); median of {args.repeats} runs after one warm-up run.",
        "",
        "| IoU threshold | cellseg_lite (s) | stardist (s) | speed-up | F1 cellseg_lite | F1 stardist | identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for threshold, ours_s, theirs_s, ours_f1, theirs_f1, same in rows:
        lines.append(
            f"| {threshold:g} | {ours_s:.4f} | {theirs_s:.4f} | {theirs_s / ours_s:.1f}x "
            f"| {ours_f1!r} | {theirs_f1!r} | {'yes' if same else 'NO'} |"
        )
    lines += [
        "",
        "At 0.5 the pairs over the threshold are one-to-one and simply counted, except for exact",
        "ties (a cell cut into two halves of IoU 0.5), whose few components go to the sparse",
        "assignment; at 0.3 split and merged cells send many more components there.",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine('numpy', 'scipy', 'stardist')}",
        f"- Date: {now()}",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section("bench_metrics", section)
        print(f"\nwritten to {RESULTS}")
    if not identical:
        print("F1 differs between the two implementations", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
