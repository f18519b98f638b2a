"""Where the HoVer stream loses F1: in the seeds of its watershed, or in its maps.

HoVer's post-processing floods an energy landscape from one marker (seed) per cell, inside the
foreground (:func:`cellseg_lite.streams.hover.watershed_steps`). Two cells that share a seed come
out as one; a seed missing drops a cell. This script takes the maps each trained segmenter
draws of the real-mini VAL images and of its run's held-out synthetic images
(:meth:`~cellseg_lite.infer.MultiStreamSegmenter.maps`: the routed model, its window and flips)
and floods the same landscape three ways:

- ``own seeds``: the markers the segmenter derives from its maps with its tuned thresholds (its
  first pass at the image's own scale);
- ``true seeds``: one seed per true cell instead (its core, :func:`~cellseg_lite.streams.hover.
  cell_cores`: the pixels at least half as deep inside it as its deepest pixel), flooded on the
  segmenter's own foreground and landscape (:func:`~cellseg_lite.streams.hover.flood`);
- ``true seeds and foreground``: the same, flooded inside the true foreground.

The gap from ``own seeds`` to ``true seeds`` is what better markers alone could win on these maps;
the gap from there to ``true seeds and foreground`` is the foreground's share. Neither ``true``
row is a method: both read the answer. ``segmenter`` is :meth:`segment` itself (with its second,
larger pass for small cells) for reference.

    .venv/bin/python benchmarks/bench_quality.py --routing hover --seed 13 --work runs/hover_s13
    .venv/bin/python benchmarks/bench_markers.py --work runs/hover_s13     # ~3 min a run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import (  # noqa: E402
    MODALITIES,
    add_work_option,
    held_out_synthetic,
    machine,
    mean,
    now,
    quality_run,
    real_mini,
    real_val_images,
    work_option,
    write_section,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = REPO / "runs" / "bench_quality"
#: Share of a true cell's greatest depth (distance to its outside) that its seed keeps.
CORE_DEPTH = 0.5
WAYS = ("segmenter", "own seeds", "true seeds", "true seeds and foreground")


def scores(segmenter, image, truth) -> dict[str, float] | None:
    """The challenge F1 of each of :data:`WAYS` on one image; ``None`` where the router sends it
    to a StarDist model (no watershed)."""
    from cellseg_lite import infer, metrics
    from cellseg_lite.streams import hover

    category = segmenter.route(image)
    model = segmenter.models[category]
    if model.stream != "hover":
        return None
    steps = infer.hover_steps(segmenter.maps(image, category=category), model.thresholds)
    seeds = hover.cell_cores(truth, CORE_DEPTH)
    labels = {
        "segmenter": segmenter.segment(image, category=category),
        "own seeds": steps.labels,
        "true seeds": hover.flood(steps.landscape, seeds, steps.foreground),
        "true seeds and foreground": hover.flood(steps.landscape, seeds, truth > 0),
    }
    return {way: metrics.f1_score(truth, labels[way]) for way in WAYS}


def group_scores(segmenter, images, groups) -> dict[str, dict[str, list[float]]]:
    """Per group (and ``"all"``): each way's per-image F1 over ``images`` routed to HoVer."""
    out: dict[str, dict[str, list[float]]] = {}
    for (_, image, truth), group in zip(images, groups, strict=True):
        row = scores(segmenter, image, truth)
        if row is None:
            continue
        for g in (group, "all"):
            for way, f1 in row.items():
                out.setdefault(g, {}).setdefault(way, []).append(f1)
    return out


def table(rows: list[tuple[str, str, dict[str, list[float]]]]) -> str:
    lines = [
        "| run | images | " + " | ".join(WAYS) + " |",
        "|" + "---|" * (2 + len(WAYS)),
    ]
    for run, group, by_way in rows:
        n = len(by_way[WAYS[0]])
        cells = " | ".join(f"{mean(by_way[w]):.3f}" for w in WAYS)
        lines.append(f"| `{run}` | {group}: {n} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_work_option(parser, DEFAULT_WORK, "model.pt and synthetic_test/")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    real_images, real_groups = real_val_images(real_mini(required=True))
    real_rows, synthetic_rows, shown_runs = [], [], []
    for work in args.work:
        shown, _ = work_option(work, DEFAULT_WORK)
        shown_runs.append(str(shown))
        segmenter = quality_run(work, "synthetic_test")
        print(f"{shown}: segmenting", flush=True)
        synthetic, classes = held_out_synthetic(work)
        classes = [f"class {c}" for c in classes]
        by_group = group_scores(segmenter, real_images, real_groups)
        real_rows += [(shown, g, by_group[g]) for g in (*MODALITIES, "all") if g in by_group]
        by_group = group_scores(segmenter, synthetic, classes)
        synthetic_rows += [
            (shown, g, by_group[g])
            for g in (*(f"class {k}" for k in range(4)), "all")
            if g in by_group
        ]
    minutes = (time.perf_counter() - start) / 60

    def average(rows, group) -> str:
        picked = [r for r in rows if r[1] == group]
        return ", ".join(f"{way} {mean(mean(r[2][way]) for r in picked):.3f}" for way in WAYS[1:])

    section = f"""## Where the HoVer stream loses F1: the seeds of its watershed, or its maps

The maps each trained segmenter draws (`MultiStreamSegmenter.maps`: the routed HoVer model, its
window and flips, the image at its own scale) of the real-mini VAL images (per modality) and of
its run's held-out synthetic images (per low-level class, from the true labels), flooded from
three kinds of seed (`benchmarks/bench_markers.py`): `own seeds`, the markers the segmenter
derives from its maps with its tuned thresholds (its first pass); `true seeds`, one per true cell
(`hover.cell_cores`: the pixels at least {CORE_DEPTH:g} times as deep inside it as its deepest
pixel), flooded on the same foreground and landscape (`hover.flood`); `true seeds and
foreground`, the same inside the true foreground.
`segmenter` is `segment` itself (with the second, larger pass for small cells). Challenge F1,
mean of per-image F1. The two `true` columns read the answer: they are bounds, not methods.

**Real-mini VAL**:

{table(real_rows)}

**Held-out synthetic**:

{table(synthetic_rows)}

Mean over the {len(args.work)} segmenters, all VAL images: {average(real_rows, "all")}; all
held-out synthetic images: {average(synthetic_rows, "all")}. Took {minutes:.1f} minutes.

- Command: `.venv/bin/python benchmarks/bench_markers.py --work {" ".join(shown_runs)}`, each
  folder from `.venv/bin/python benchmarks/bench_quality.py --minutes 27 --routing hover
  --seed N [--decoder code] --work FOLDER`
- Machine: {machine("torch", "timm", "stardist")}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        write_section("bench_markers", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
