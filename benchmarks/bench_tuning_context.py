"""Thresholds tuned with the segmenter's mirrored context, or without it.

:class:`cellseg_lite.infer.MultiStreamSegmenter` puts ``MIRROR_CONTEXT`` (16) pixels of mirrored
context around every image, post-processes the maps of the padded image and crops the labels.
Training tunes the post-processing thresholds on maps of the bare image
(:func:`cellseg_lite.train.evaluate_stream`'s default ``context``). This script takes the
segmenters that ``benchmarks/bench_quality.py`` runs wrote (``--work``), tunes the thresholds of
each class's model again on the run's selection images both ways (``context=0``: as the run did;
``context=MIRROR_CONTEXT``: as the segmenter predicts), on the images the run tuned them on (a class with
``train.MIN_SELECTION_IMAGES`` or more selection images: its own; the others: all of them), and
scores both segmenters on the real-mini VAL split and the run's held-out synthetic set. Same
networks, router and second pass for small cells in both rows: the tuning alone differs.

    .venv/bin/python benchmarks/bench_tuning_context.py --work runs/hover_s13 --seed 13  # ~8 min
"""

from __future__ import annotations

import argparse
import sys
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
    tuning_images,
    work_option,
    write_section,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = REPO / "runs" / "bench_quality"


def shown_thresholds(thresholds: dict) -> str:
    short = {
        "prob_thresh": "p",
        "marker_threshold": "m",
        "core_threshold": "core",
        "marker_min_fraction": "mf",
        "foreground_min_fraction": "ff",
        "marker_min_prob": "mp",
    }
    return ", ".join(f"{short[k]} {v:g}" for k, v in thresholds.items() if k in short)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser, DEFAULT_WORK, "model.pt and its synthetic data")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = run_seeds(parser, args)

    from cellseg_lite import infer

    contexts = {"bare image": 0, "mirrored context": infer.MIRROR_CONTEXT}
    real = real_mini(required=True)
    real_images, modalities = real_val_images(real)
    real_lines = [
        "| run | thresholds tuned on | all 40 | " + " | ".join(MODALITIES) + " |",
        "|" + "---|" * (3 + len(MODALITIES)),
    ]
    syn_lines = [
        "| run | thresholds tuned on | all | class 0 | class 1 | class 2 | class 3 |",
        "|---|---|---|---|---|---|---|",
    ]
    threshold_lines = [
        "| run | class | tuned on | bare image: thresholds, selection F1 | "
        "mirrored context: thresholds, selection F1 | stored in the run |",
        "|---|---|---|---|---|---|",
    ]
    differences = {"real": [], "fluorescence": [], "synthetic": []}
    reproduced = []
    for work, seed in zip(args.work, seeds, strict=True):
        shown, _ = work_option(work, DEFAULT_WORK)
        segmenter = quality_run(work, "synthetic_train", "synthetic_test")
        loaded, by_class = selection_images(work, real, seed)
        synthetic, classes = held_out_synthetic(work)
        totals, chosen = {}, {}
        for name, context in contexts.items():
            print(f"{shown}: tuning on the {name}", flush=True)
            tuned, chosen[name] = retuned(segmenter, loaded, by_class, context=context)
            scores = set_scores(tuned.segment, real_images, modalities, synthetic, classes)
            totals[name, "real"], totals[name, "synthetic"] = scores.real, scores.synthetic
            totals[name, "fluorescence"] = scores.modalities[0]
            real_lines.append(scores.real_row(f"`{shown}`", name))
            syn_lines.append(scores.synthetic_row(f"`{shown}`", name))
            print(
                f"{shown} {name}: VAL {scores.real:.3f}, fluorescence {scores.modalities[0]:.3f}, "
                f"synthetic {scores.synthetic:.3f}",
                flush=True,
            )
        bare, mirrored = contexts
        for c in range(4):
            which, images = tuning_images(c, loaded, by_class)
            stored = segmenter.models[c].thresholds
            (t0, f0), (t1, f1) = chosen[bare][c], chosen[mirrored][c]
            reproduced.append(shown_thresholds(t0) == shown_thresholds(stored))
            threshold_lines.append(
                f"| `{shown}` | {c} | {which} ({len(images)}) | "
                f"{shown_thresholds(t0)}; {f0:.3f} | {shown_thresholds(t1)}; {f1:.3f} | "
                f"{shown_thresholds(stored)} |"
            )
        for key in differences:
            differences[key].append(totals[mirrored, key] - totals[bare, key])

    def signed(values) -> str:
        return ", ".join(f"{v:+.3f}" for v in values) + f" (mean {np.mean(values):+.3f})"

    works = " ".join(str(work_option(w, DEFAULT_WORK)[0]) for w in args.work)
    seed_flag = " --seed " + " ".join(map(str, seeds))
    section = f"""## Post-processing: thresholds tuned with the segmenter's mirrored context, on trained segmenters

The segmenter puts {infer.MIRROR_CONTEXT} pixels of mirrored context around every image, post-processes
the maps of the padded image and crops the labels (`infer.MIRROR_CONTEXT`). The runs below tuned
their thresholds on the bare images (`train.evaluate_stream`'s default `context=0`). Here each
class's model is tuned again on the same selection images both ways (`train.best_thresholds`:
the grid, then markers on confident pixels where that scores higher), and each segmenter is
scored with both sets of thresholds. Same networks, router and second pass for small cells.

**Real-mini VAL**, challenge F1 (mean of per-image F1):

{chr(10).join(real_lines)}

**Held-out synthetic**, per low-level class (from the true labels):

{chr(10).join(syn_lines)}

Mirrored context minus bare image, run by run: real-mini VAL {signed(differences["real"])};
fluorescence {signed(differences["fluorescence"])}; held-out synthetic
{signed(differences["synthetic"])}.

The thresholds (`p` probability, `m` marker, `core` core probability, `mf`/`ff` size floors of
markers and foreground, `mp` least cell probability of a marker pixel) and their selection F1;
tuning on the bare image reproduces the run's stored thresholds for {sum(reproduced)} of
{len(reproduced)} classes:

{chr(10).join(threshold_lines)}

- Command: `.venv/bin/python benchmarks/bench_tuning_context.py --work {works}{seed_flag}`, each folder from
  `.venv/bin/python benchmarks/bench_quality.py --minutes 27 --routing hover --seed N [--decoder code] --work FOLDER`
- Machine: {machine("torch", "timm", "stardist")}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        write_section("bench_tuning_context", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
