"""Patch size of the `lite` preset: which spends a few CPU minutes better, 128 or 256 pixels?

Trains each stream (``train.train_stream``, `lite` preset, from scratch) for the same wall-time
budget on the real-mini TRAIN split plus 48 synthetic images, once per patch size (batch 8
either way), and scores the last weights on the real-mini VAL split with the challenge F1 at the
probability threshold that is best there (the threshold grid of ``train.evaluate_stream``).
Smaller patches make a step about 4x cheaper, so the run takes about 4x more optimisation steps;
the question is whether more updates on less context learn more per minute.

    .venv/bin/python benchmarks/bench_patch_size.py                 # 5 minutes per run, ~25 in all
    .venv/bin/python benchmarks/bench_patch_size.py --minutes 2 --no-write
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import MODALITIES, machine, now, real_mini, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget of each run")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--streams", nargs="+", default=["stardist", "hover"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_patch_size")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from cellseg_lite import datasets, metrics, synthetic, train

    real = real_mini(required=True)
    real_train, real_val, modality = real.train, real.val, real.modality
    syn = args.work / "synthetic_train"
    synthetic.make_dataset(syn, 12, size=(256, 256), seed=0)
    samples = [*real_train, *datasets.find_pairs(syn)]
    val = train._load_val(real_val)

    lines = []
    for stream in args.streams:
        for size in args.sizes:
            config = train.preset(
                "lite", stream=stream, patch_size=size, pretrained=False, minutes=args.minutes,
                val_every=10**6,  # no validation inside the budget: every second trains
            )  # fmt: skip
            started = time.perf_counter()
            model, history = train.train_stream(samples, config, progress=False)
            seconds = time.perf_counter() - started
            f1, thresholds = train.evaluate_stream(
                model, stream, val, train._threshold_grid(stream)
            )
            per_image = {}
            for stem, image, labels in val:
                maps = train.predict_maps(model, image)
                pred = train.segment_maps(stream, maps, thresholds)
                per_image[stem] = metrics.f1_score(labels, pred)
            per = [
                np.mean([v for s, v in per_image.items() if modality[s] == m]) for m in MODALITIES
            ]
            line = (
                f"| {stream} | {size} | {history.steps} | {seconds / max(history.steps, 1):.2f} | "
                f"{f1:.3f} | "
                + " | ".join(f"{v:.3f}" for v in per)
                + f" | {thresholds['prob_thresh']} |"
            )
            print(line, flush=True)
            lines.append(line)

    section = f"""## Patch size of the `lite` preset: {args.minutes:g} CPU minutes per run

Each stream trained from scratch (`lite`, batch 8, AdamW 1e-3, the paper's augmentations) for
{args.minutes:g} minutes of wall time on the 156 real-mini TRAIN images and 48 synthetic ones;
the last weights scored on the 40 real-mini VAL images (challenge F1, mean of per-image F1) at
the probability threshold best there. Seconds per step include the data pipeline (StarDist's
targets are computed per patch, after augmentation).

| stream | patch | steps | s / step | val F1 | {" | ".join(MODALITIES)} | prob_thresh |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}

The `lite` preset uses {train.preset("lite").patch_size}-pixel patches.

- Command: `.venv/bin/python benchmarks/bench_patch_size.py --minutes {args.minutes:g}`
- Machine: {machine("torch", "timm", "stardist")}; bf16 on CPU: {train.cpu_has_bf16()}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        write_section("bench_patch_size", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
