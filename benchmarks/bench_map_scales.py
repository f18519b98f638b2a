"""Maps averaged over two scales, through the segmenter: ``TrainConfig(map_scales=(1, 1.5))``.

A segmenter that ``benchmarks/bench_quality.py`` trained predicts each image's maps at the
image's own scale, and segments an image of small nuclei a second time, 1.5 times larger, where
a rule on its first pass says so (``infer.MIN_DIAMETER``). With ``map_scales`` its models'
thresholds are tuned on the mean of the maps of the image and of the image 1.5 times larger
(``infer.MAP_SCALES``, :func:`cellseg_lite.infer.scale_averaged`), and the segmenter averages the
same two views of every image, with no second pass. This script takes the segmenters of
``--work`` runs, tunes each class's thresholds again on the run's selection images with
``map_scales=infer.MAP_SCALES`` (``_results.retuned``, as ``train_multistream`` tunes them),
and scores both on the real-mini VAL split and the run's held-out synthetic set, with each
image's segmentation time; and, between them, the averaged maps with the run's own thresholds
(tuned at the own scale), which tells the maps' part from the tuning's. Same networks and router
in every row.

    .venv/bin/python benchmarks/bench_map_scales.py --work runs/hover_s13 --seed 13  # ~12 min
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import (  # noqa: E402
    MODALITIES,
    add_run_options,
    held_out_synthetic,
    machine,
    now,
    quality_run,
    real_mini,
    real_val_images,
    retuned,
    run_seeds,
    selection_images,
    set_scores,
    work_option,
    write_section,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = REPO / "runs" / "bench_quality"


class Recorder:
    """``segment`` that keeps each image's labels and seconds, in the order it was called."""

    def __init__(self, segment):
        self.segment, self.labels, self.seconds = segment, [], []

    def __call__(self, image):
        started = time.perf_counter()
        labels = self.segment(image)
        self.seconds.append(time.perf_counter() - started)
        self.labels.append(labels)
        return labels


def merged_share(images, predictions) -> float:
    """The share of true cells merged with a neighbour (:func:`cellseg_lite.metrics.error_kinds`)
    over ``images`` ``(stem, image, labels)``."""
    from cellseg_lite import metrics

    kinds = [
        metrics.error_kinds(labels, predicted)
        for (_, _, labels), predicted in zip(images, predictions, strict=True)
    ]
    return sum(k.merged for k in kinds) / max(sum(k.tp + k.fn for k in kinds), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser, DEFAULT_WORK, "model.pt and its synthetic data")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = run_seeds(parser, args)

    from cellseg_lite import infer

    scales = infer.MAP_SCALES
    averaged_name = f"own and x{scales[1]:g} averaged"
    real = real_mini(required=True)
    real_images, modalities = real_val_images(real)
    real_lines = [
        "| run | maps | all 40 | " + " | ".join(MODALITIES) + " | merged | s per image |",
        "|" + "---|" * (5 + len(MODALITIES)),
    ]
    syn_lines = [
        "| run | maps | all | class 0 | class 1 | class 2 | class 3 |",
        "|---|---|---|---|---|---|---|",
    ]
    differences = {"real": [], "fluorescence": [], "synthetic": []}
    time_ratios, tuning = [], []
    for work, seed in zip(args.work, seeds, strict=True):
        shown, _ = work_option(work, DEFAULT_WORK)
        segmenter = quality_run(work, "synthetic_train", "synthetic_test")
        synthetic, classes = held_out_synthetic(work)
        print(f"{shown}: tuning on maps at scales {scales}", flush=True)
        loaded, by_class = selection_images(work, real, seed)
        started = time.perf_counter()
        averaged, _ = retuned(segmenter, loaded, by_class, map_scales=scales)
        tuning.append(f"{time.perf_counter() - started:.0f} s ({len(loaded)} selection images)")
        untuned = copy.copy(segmenter)
        untuned.map_scales = scales
        rows = {
            "own scale, second pass for small cells (as trained)": segmenter,
            f"{averaged_name}, the run's thresholds": untuned,
            f"{averaged_name}, thresholds tuned on them": averaged,
        }
        totals, seconds = {}, {}
        for name, which in rows.items():
            recorder = Recorder(which.segment)
            scores = set_scores(recorder, real_images, modalities, synthetic, classes)
            on_real = slice(0, len(real_images))
            merged = merged_share(real_images, recorder.labels[on_real])
            seconds[name] = recorder.seconds[on_real]
            totals[name] = (scores.real, scores.modalities[0], scores.synthetic)
            real_lines.append(
                scores.real_row(f"`{shown}`", name)
                + f" {merged:.1%} | {statistics.median(seconds[name]):.2f} |"
            )
            syn_lines.append(scores.synthetic_row(f"`{shown}`", name))
            print(
                f"{shown} {name}: VAL {scores.real:.3f}, fluorescence {scores.modalities[0]:.3f}, "
                f"synthetic {scores.synthetic:.3f}, merged {merged:.1%}",
                flush=True,
            )
        before, _, after = rows
        for key, a, b in zip(differences, totals[after], totals[before], strict=True):
            differences[key].append(a - b)
        time_ratios.append(
            statistics.median(
                np.array(seconds[after]) / np.maximum(np.array(seconds[before]), 1e-9)
            )
        )

    def signed(values) -> str:
        return ", ".join(f"{v:+.3f}" for v in values) + f" (mean {np.mean(values):+.3f})"

    works = " ".join(str(work_option(w, DEFAULT_WORK)[0]) for w in args.work)
    seed_flag = " --seed " + " ".join(map(str, seeds))
    ratios = ", ".join(f"{r:.2f}" for r in time_ratios)
    section = f"""## Inference: maps averaged over two scales, through the segmenter (`map_scales`)

Each segmenter as its run trained it (maps at the image's own scale; an image of small nuclei
segmented again {infer.UPSCALE:g} times larger where its first pass finds cells narrower than
`infer.MIN_DIAMETER`), and the same networks with every class's thresholds tuned again on the
run's selection images on maps averaged over the image's own scale and x{scales[1]:g}
(`TrainConfig(map_scales=infer.MAP_SCALES)`, `infer.scale_averaged`), which the segmenter then
averages on every image, without the second pass. Between them, the same average with the
thresholds the run tuned on maps at the own scale (`segmenter.map_scales`), to tell what the
maps change from what the tuning changes. All through `MultiStreamSegmenter.segment`: same
router, window, flips and mirrored context.

**Real-mini VAL**, challenge F1 (mean of per-image F1), the share of true cells merged with a
neighbour (`metrics.error_kinds`) and the median seconds per image:

{chr(10).join(real_lines)}

**Held-out synthetic**, per low-level class (from the true labels):

{chr(10).join(syn_lines)}

Averaged scales with thresholds tuned on them minus the segmenter as trained, run by run: real-mini VAL
{signed(differences["real"])}; fluorescence {signed(differences["fluorescence"])}; held-out
synthetic {signed(differences["synthetic"])}. Time per VAL image, median of the per-image
ratios: {ratios} times the segmenter as trained (which already pays a second pass on some
images). Tuning every class's thresholds on the averaged maps took {", ".join(tuning)}.

- Command: `.venv/bin/python benchmarks/bench_map_scales.py --work {works}{seed_flag}`, each folder from
  `.venv/bin/python benchmarks/bench_quality.py --minutes 27 --routing hover --seed N --work FOLDER`
- Machine: {machine("torch", "timm", "stardist")}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        write_section("bench_map_scales", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
