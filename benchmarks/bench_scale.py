"""Cells rescaled to one size in training (Cellpose's recipe): what it is worth, and what it costs
to find each test image's scale.

The `lite` HoVer stream sees cells from 6 to 90 pixels across (real-mini fluorescence nuclei to
synthetic class-2 cells) through a 4-pixel stem. Cellpose (Stringer et al., Nature Methods 2021)
rescales every training image so that its cells share one diameter, and every test image by an
estimate of its cells' diameter. This script trains the HoVer stream (`lite` preset, from
scratch, the same budget and seed per variant) on the 156 real-mini TRAIN images and 24 synthetic
images per class, three ways:

- ``native``: images as they are (the `lite` preset);
- ``normalised``: every training image resized so that its cells' typical diameter
  (:func:`cellseg_lite.infer.inscribed_diameter` of its labels) is ``--diameter`` pixels
  (factor clipped to 0.25-4);
- ``mixed``: every training image twice per epoch, as it is and normalised.

Each model is scored on the 40 real-mini VAL images and 40 held-out synthetic images (challenge
F1, mean of per-image F1, at the thresholds of `train._threshold_grid("hover")` best on VAL, the
same thresholds on synthetic), each image segmented at a scale chosen by one rule:

- ``one pass``: its own scale;
- ``small cells x1.5``: the package's rule (a second pass 1.5 times larger where the first
  pass's cells are narrower than ``infer.MIN_DIAMETER``);
- ``oracle``: resized by ``diameter / d`` with ``d`` from its ground truth: what a perfect
  estimate of the cells' size would give (an upper bound, not a method);
- ``estimated``: resized by ``diameter / d`` with ``d`` from a first pass at its own scale
  (default thresholds), as a segmenter would have to do.

How close the first pass's estimate comes to the truth is reported per set.

    .venv/bin/python benchmarks/bench_scale.py            # 3 x 6 minutes of training, ~25 in all
    .venv/bin/python benchmarks/bench_scale.py --minutes 2 --variants native mixed --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import MODALITIES, machine, mean, now, real_mini, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("native", "normalised", "mixed")
RULES = ("one pass", "small cells x1.5", "oracle", "estimated")
#: Rescaling factors are kept within these bounds (a 4-pixel nucleus is not enlarged 6 times).
FACTOR_RANGE = (0.25, 4.0)
#: Suffix of the sample stems that the ``mixed`` variant normalises (the other copy stays native).
NORMALISED = "#normalised"


def factor_for(diameter: float, target: float) -> float:
    """The resizing factor that brings cells of ``diameter`` pixels to ``target``; 1 without cells."""
    if not np.isfinite(diameter) or diameter <= 0:
        return 1.0
    return float(np.clip(target / diameter, *FACTOR_RANGE))


def resized(image: np.ndarray, labels: np.ndarray | None, factor: float):
    """``image`` (bilinear) and ``labels`` (nearest) resized by ``factor``."""
    from skimage.transform import resize

    if factor == 1.0:
        return image, labels
    shape = (max(round(image.shape[0] * factor), 8), max(round(image.shape[1] * factor), 8))
    out = resize(image, (*shape, *image.shape[2:]), order=1, preserve_range=True)
    out = out.astype(image.dtype)
    if labels is None:
        return out, None
    small = resize(labels, shape, order=0, preserve_range=True, anti_aliasing=False)
    return out, small.astype(np.int32)


@contextlib.contextmanager
def training_scale(variant: str, target: float):
    """Patch ``datasets.load_sample`` (what ``PatchDataset`` reads images with) to normalise the
    cells' size of every sample (``normalised``) or of the marked copies (``mixed``)."""
    from cellseg_lite import datasets, infer

    original = datasets.load_sample

    def load(sample):
        image, labels = original(sample)
        if variant == "mixed" and not sample.stem.endswith(NORMALISED):
            return image, labels
        factor = factor_for(infer.inscribed_diameter(labels), target)
        return resized(image, labels, factor)

    if variant != "native":
        datasets.load_sample = load
    try:
        yield
    finally:
        datasets.load_sample = original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=6.0, help="training budget per variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--diameter", type=float, default=24.0, help="normalised cell diameter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_scale")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started_all = time.perf_counter()

    from cellseg_lite import datasets, infer, metrics, synthetic, train

    real = real_mini(required=True)
    syn_train, syn_test = args.work / "synthetic_train", args.work / "synthetic_test"
    synthetic.make_dataset(syn_train, 24, size=(256, 256), seed=args.seed)
    synthetic.make_dataset(syn_test, 10, size=(256, 256), seed=args.seed + 1000)
    samples = [*real.train, *datasets.find_pairs(syn_train)]
    sets = {
        "real-mini VAL": train._load_val(real.val),
        "synthetic held-out": train._load_val(datasets.find_pairs(syn_test)),
    }
    grid = train._threshold_grid("hover")
    first_pass = {"prob_thresh": 0.6}  # the paper's threshold, before any tuning

    def predict_at(model, image, factor):
        return train.predict_maps(model, resized(image, None, factor)[0])

    def labels_at(model, image, factor, thresholds):
        labels = train.segment_maps("hover", predict_at(model, image, factor), thresholds)
        return labels if factor == 1.0 else infer._shrink_labels(labels, image)

    rows, estimates, runs = [], {}, []
    for variant in args.variants:
        run_samples = samples
        if variant == "mixed":
            run_samples = samples + [s._replace(stem=s.stem + NORMALISED) for s in samples]
        config = train.preset(
            "lite", stream="hover", pretrained=False, minutes=args.minutes, seed=args.seed,
            val_every=10**6,  # no validation inside the budget
        )  # fmt: skip
        started = time.perf_counter()
        with training_scale(variant, args.diameter):
            model, history = train.train_stream(run_samples, config, progress=False)
        runs.append((variant, history.steps, time.perf_counter() - started))
        print(f"{variant}: {history.steps} steps", flush=True)

        # per image: its first pass at its own scale gives both rules' estimates
        factors: dict[str, dict[str, list[float]]] = {}
        for set_name, images in sets.items():
            per_rule = {rule: [] for rule in RULES}
            for _, image, labels in images:
                truth = infer.inscribed_diameter(labels)
                seen = infer.inscribed_diameter(labels_at(model, image, 1.0, first_pass))
                if np.isfinite(truth) and np.isfinite(seen):
                    estimates.setdefault((variant, set_name), []).append(seen / truth)
                small = np.isfinite(seen) and seen < infer.MIN_DIAMETER
                per_rule["one pass"].append(1.0)
                per_rule["small cells x1.5"].append(infer.UPSCALE if small else 1.0)
                per_rule["oracle"].append(factor_for(truth, args.diameter))
                per_rule["estimated"].append(factor_for(seen, args.diameter))
            factors[set_name] = per_rule
        for rule in RULES:
            if variant == "native" and rule in ("oracle", "estimated"):
                continue  # a native model has no size to rescale to
            if variant != "native" and rule == "small cells x1.5":
                continue
            entries = {
                set_name: [
                    (stem, image, labels, factor, predict_at(model, image, factor))
                    for (stem, image, labels), factor in zip(
                        images, factors[set_name][rule], strict=True
                    )
                ]
                for set_name, images in sets.items()
            }

            def scores(entries, thresholds):
                out = []
                for _, image, labels, factor, maps in entries:
                    pred = train.segment_maps("hover", maps, thresholds)
                    if factor != 1.0:
                        pred = infer._shrink_labels(pred, image)
                    out.append(metrics.f1_score(labels, pred))
                return out

            val_entries = entries["real-mini VAL"]
            per_threshold = [np.mean(scores(val_entries, t)) for t in grid]
            best = grid[int(np.argmax(per_threshold))]
            val_scores = scores(val_entries, best)
            per_modality = [
                mean(
                    f
                    for entry, f in zip(val_entries, val_scores, strict=True)
                    if real.modality[entry[0]] == m
                )
                for m in MODALITIES
            ]
            syn = scores(entries["synthetic held-out"], best)
            line = (
                f"| {variant} | {rule} | **{np.mean(val_scores):.3f}** | "
                + " | ".join(f"{v:.3f}" for v in per_modality)
                + f" | {np.mean(syn):.3f} | {best['prob_thresh']}, {best['marker_threshold']} |"
            )
            print(line, flush=True)
            rows.append(line)

    def spread(ratios):
        r = np.asarray(ratios)
        inside = np.mean((r > 1 / 1.25) & (r < 1.25))
        return f"{np.median(r):.2f} | {inside:.0%} | {r.min():.2f}-{r.max():.2f}"

    estimate_lines = [
        f"| {variant} | {set_name} | {spread(ratios)} |"
        for (variant, set_name), ratios in estimates.items()
    ]
    run_lines = [f"| {v} | {steps} | {seconds / max(steps, 1):.2f} |" for v, steps, seconds in runs]
    minutes_all = (time.perf_counter() - started_all) / 60
    options = (
        f" --minutes {args.minutes:g}"
        + ("" if args.variants == list(VARIANTS) else f" --variants {' '.join(args.variants)}")
        + ("" if args.diameter == 24.0 else f" --diameter {args.diameter:g}")
        + ("" if args.seed == 0 else f" --seed {args.seed}")
    )
    section = f"""## Cells rescaled to one size in training ({args.minutes:g} CPU minutes of HoVer per variant)

The HoVer stream trained from scratch (`lite` preset, seed {args.seed}, no validation inside the
budget) for {args.minutes:g} minutes on the 156 real-mini TRAIN images and 96 synthetic ones, three
ways: `native` (images as they are: the `lite` preset), `normalised` (every training image resized
so that its cells' typical diameter, `infer.inscribed_diameter` of its labels, is
{args.diameter:g} px; factor within {FACTOR_RANGE[0]:g}-{FACTOR_RANGE[1]:g}) and `mixed` (every image twice per
epoch, as it is and normalised). Test images resized by one rule each: `one pass` (own
scale), `small cells x1.5` (the package's second pass, `infer.MIN_DIAMETER`), `oracle` (to
{args.diameter:g} px by the ground truth's diameter: an upper bound, not a method) and
`estimated` (to {args.diameter:g} px by the diameter of a first pass at the image's own scale,
probability threshold 0.6). Challenge F1, mean of per-image F1, at the HoVer thresholds best on
VAL (`train._threshold_grid("hover")`); synthetic at the same thresholds.

| variant | steps | s / step |
|---|---|---|
{chr(10).join(run_lines)}

| variant | test scale | VAL F1 | {" | ".join(MODALITIES)} | synthetic F1 | thresholds (prob, marker) |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

The first pass's diameter against the ground truth's (ratio per image):

| variant | set | median ratio | within x1.25 | range |
|---|---|---|---|---|
{chr(10).join(estimate_lines)}

Took {minutes_all:.0f} minutes.

- Command: `.venv/bin/python benchmarks/bench_scale.py{options}`
- Machine: {machine("torch", "timm")}; bf16 on CPU: {train.cpu_has_bf16()}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        write_section("bench_scale", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
