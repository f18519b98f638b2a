"""Sparse cells and the challenge's percentile normalisation: which images the mended rule changes,
and what it does to them.

The challenge baseline rescales each channel from its 1st to its 99th percentile. Where the cells
cover under about 1% of an image, the 99th percentile is background: the rule stretches the
background noise over 0..255 and the cells drown in it. ``io.normalize_image(sparse_cells=True)``
raises the upper bound towards the 99.9th percentile for such images and leaves the others as the
baseline has them. This script

1. surveys real-mini (TRAIN and VAL) and a run's synthetic images: per image, the share of cell
   pixels and the tail ratio that decides the rule (how many times farther from the 1st percentile
   the 99.9th lies than the 99th; the largest over the channels), and lists the images it changes;
2. for those images, the share of background pixels at or above mid-grey after each rule;
3. segments them with each segmenter that ``benchmarks/bench_quality.py`` wrote (``--work``), with
   the challenge's rule and the mended one (same weights and thresholds), challenge F1 per image.
   Every other image gets the same input either way, so its F1 cannot change.

    .venv/bin/python benchmarks/bench_quality.py --routing validated   # trains a segmenter
    .venv/bin/python benchmarks/bench_normalization.py --work runs/bench_quality   # 1 minute
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, now, real_mini, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: the share of cell pixels below which an image counts as sparse in the survey
SPARSE_SHARE = 0.01


def tail_ratio(image: np.ndarray) -> float:
    """The largest over the (first three) channels of ``(p99.9 - p1) / (p99 - p1)`` of the
    non-zero pixels: the quantity :func:`cellseg_lite.io.normalize_image` compares with
    ``io.SPARSE_TAIL_RATIO``."""
    from cellseg_lite import io

    channels = (
        [image] if image.ndim == 2 else [image[..., c] for c in range(min(3, image.shape[2]))]
    )
    ratios = []
    for channel in channels:
        values = channel[channel != 0]
        if values.size == 0:
            continue
        low, high, tail = np.percentile(values, [1, 99, io.SPARSE_TAIL_PERCENTILE])
        ratios.append((tail - low) / (high - low) if high - low > 1e-3 else 1.0)
    return max(ratios, default=1.0)


def survey(sets: dict) -> list[dict]:
    """One row per image: set, stem, cell share, tail ratio, whether the mended rule changes it,
    and the share of background pixels at or above 128 under each rule; a changed image's row
    keeps its raw image and labels for the segmenters."""
    from cellseg_lite import io

    rows = []
    for set_name, samples in sets.items():
        for sample in samples:
            image, labels = io.read_image(sample.image_path), io.read_labels(sample.label_path)
            challenge = io.normalize_image(image)
            mended = io.normalize_image(image, sparse_cells=True)
            background = labels == 0
            changed = not np.array_equal(challenge, mended)
            rows.append(
                {
                    "set": set_name,
                    "sample": sample,
                    "cells": float((labels > 0).mean()),
                    "ratio": tail_ratio(image),
                    "changed": changed,
                    "bright challenge": float((challenge.max(-1)[background] >= 128).mean()),
                    "bright mended": float((mended.max(-1)[background] >= 128).mean()),
                    "raw": (image, labels) if changed else None,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--work",
        type=Path,
        nargs="+",
        default=[REPO / "runs" / "bench_quality"],
        help="folders of bench_quality.py runs (model.pt, synthetic_train, synthetic_test)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from cellseg_lite import datasets, infer, io, metrics

    for work in args.work:
        if not (work / "model.pt").is_file() or not (work / "synthetic_test").is_dir():
            raise SystemExit(f"{work}: no segmenter from benchmarks/bench_quality.py there")
    started = time.perf_counter()
    real = real_mini(required=True)
    first = args.work[0]
    sets = {
        "real-mini TRAIN": real.train,
        "real-mini VAL": real.val,
        f"synthetic ({first.name} train + held-out)": [
            *datasets.find_pairs(first / "synthetic_train"),
            *datasets.find_pairs(first / "synthetic_test"),
        ],
    }
    rows = survey(sets)

    survey_lines = [
        "| set | images | cells on under 1% of the pixels: images, tail ratios | the others: "
        "largest tail ratio | images the mended rule changes |",
        "|---|---|---|---|---|",
    ]
    for set_name in sets:
        mine = [r for r in rows if r["set"] == set_name]
        sparse = sorted(r["ratio"] for r in mine if r["cells"] < SPARSE_SHARE)
        dense = [r["ratio"] for r in mine if r["cells"] >= SPARSE_SHARE]
        shown = ", ".join(f"{v:.1f}" for v in sparse) if sparse else "-"
        survey_lines.append(
            f"| {set_name} | {len(mine)} | {len(sparse)}: {shown} | "
            f"{max(dense, default=float('nan')):.2f} | {sum(r['changed'] for r in mine)} |"
        )
    print("\n".join(survey_lines), flush=True)

    changed = [r for r in rows if r["changed"]]
    segmenters = {}
    for work in args.work:
        mended = infer.MultiStreamSegmenter.load(work / "model.pt")
        mended.sparse_cells = True
        challenge = copy.copy(mended)
        challenge.sparse_cells = False
        segmenters[work] = (challenge, mended)
    header = (
        "| set | image | cells: % of pixels (cells) | tail ratio | background >= 128: challenge, "
        "mended | "
        + " | ".join(f"`{w.name}` F1 (objects found): challenge, mended" for w in args.work)
        + " |"
    )
    image_lines = [header, "|---|---|---|---|---|" + "---|" * len(args.work)]
    gains = {w: {} for w in args.work}
    for r in changed:
        sample, (image, labels) = r["sample"], r["raw"]
        cells = []
        for work, (challenge, mended) in segmenters.items():
            found = [challenge.segment(image), mended.segment(image)]
            before, after = (metrics.f1_score(labels, p) for p in found)
            gains[work].setdefault(r["set"], []).append(after - before)
            n_before, n_after = (len(np.unique(p)) - 1 for p in found)
            cells.append(f"{before:.3f} ({n_before}), {after:.3f} ({n_after})")
        image_lines.append(
            f"| {r['set']} | {sample.stem} | {100 * r['cells']:.2f} ({labels.max()}) | "
            f"{r['ratio']:.1f} | "
            f"{r['bright challenge']:.2f}, {r['bright mended']:.2f} | " + " | ".join(cells) + " |"
        )
        print(image_lines[-1], flush=True)
    totals = []
    for work in args.work:
        for set_name, samples in sets.items():
            if set_name in gains[work]:
                change = sum(gains[work][set_name]) / len(samples)
                totals.append(f"`{work.name}` on {set_name}: {change:+.4f}")
    minutes = (time.perf_counter() - started) / 60
    works = " ".join(str(w.resolve().relative_to(REPO) if w.resolve().is_relative_to(REPO) else w)
                     for w in args.work)  # fmt: skip
    section = f"""## Normalisation: sparse cells under the challenge's percentile rule

The challenge's preprocessing (`io.normalize_image`) rescales each channel from its 1st to its 99th
percentile. In an image whose cells cover under about 1% of the pixels the 99th percentile is
background, so the background noise is stretched over 0..255 and the cells are lost in it.
`io.normalize_image(sparse_cells=True)`, which training and `MultiStreamSegmenter.segment` use,
raises the upper bound to `max(p99, p1 + (p99.9 - p1) / {io.SPARSE_TAIL_RATIO:g})`: it departs from
the baseline only where the {io.SPARSE_TAIL_PERCENTILE:g}th percentile lies more than
{io.SPARSE_TAIL_RATIO:g} times as far from the 1st as the 99th (the tail ratio; the largest over the
channels).

Which images that is (cell share from the labels):

{chr(10).join(survey_lines)}

The images the rule changes, the share of their background pixels at or above mid-grey (128, the
brightest channel) under each rule, and the challenge F1 of segmenters that `bench_quality.py`
trained on the challenge's rule (every other image gets the same input under both rules, so only
these rows can differ). TRAIN and synthetic-train images were seen in training:

{chr(10).join(image_lines)}

Change of the mean F1 of each whole set: {"; ".join(totals) if totals else "none"}.
An image whose only cell touches the border scores 0 under the challenge's rule whatever the
segmenter does. Took {minutes:.1f} minutes.

- Command: `.venv/bin/python benchmarks/bench_normalization.py --work {works}`
- Machine: {machine("torch", "timm", "stardist")}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        write_section("bench_normalization", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
