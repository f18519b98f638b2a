"""What HoVer's tuned size floor adds: one trained segmenter, its thresholds tuned two ways.

Loads the multi-stream segmenter that ``benchmarks/bench_quality.py`` wrote (``--work``, by
default ``runs/bench_quality``; several folders give one pair of rows each), rebuilds that run's selection split (the same images, seed and
fraction as :func:`cellseg_lite.train.train_multistream`), predicts every HoVer model's maps once
per image, and tunes the post-processing of each class on its selection images twice:

- without the size floor: probability and marker threshold only, with the ``"scaled"``
  watershed preset's floors (markers 2 %, foreground components 1 % of the typical cell area),
  the grid before the floor was tuned;
- with it: the whole of ``train._threshold_grid("hover")`` (floors of 2/1 %, 5/5 % and 10/10 %).

Both settings then score the real-mini VAL split and the held-out synthetic set. The weights are
the same in both rows, so the difference is the post-processing alone. Classes routed to
StarDist keep their stored thresholds.

    .venv/bin/python benchmarks/bench_quality.py --routing validated   # trains the segmenter
    .venv/bin/python benchmarks/bench_postprocess.py                    # about a minute each
    .venv/bin/python benchmarks/bench_postprocess.py --work runs/a runs/b   # several runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, now, real_mini, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODALITIES = ("fluorescence", "stained", "brightfield", "phase-contrast")


def without_floor(grid: list[dict]) -> list[dict]:
    """The candidates of ``grid`` that use the ``"scaled"`` preset's size floor."""
    from cellseg_lite.streams import hover

    scaled = hover.PRESETS["scaled"]
    return [
        t
        for t in grid
        if t["marker_min_fraction"] == scaled.marker_min_fraction
        and t["foreground_min_fraction"] == scaled.foreground_min_fraction
    ]


def retune(work: Path, seed: int, real):
    """Scores of ``work``'s segmenter with both grids: ``(scores, chosen, selection counts)``."""
    from cellseg_lite import datasets, infer, io, metrics, train
    from cellseg_lite._errors import CellSegError

    model_path = work / "model.pt"
    syn_train, syn_test = work / "synthetic_train", work / "synthetic_test"
    if not (model_path.is_file() and syn_train.is_dir() and syn_test.is_dir()):
        raise SystemExit(
            f"{work}: no trained segmenter with its synthetic data; run "
            "benchmarks/bench_quality.py first (or pass --work)"
        )
    try:
        segmenter = infer.MultiStreamSegmenter.load(model_path)
    except CellSegError as err:
        raise SystemExit(str(err)) from err

    samples = [*real.train, *datasets.find_pairs(syn_train)]
    categories = train._sample_categories(samples)
    _, (selection, selection_classes) = train._split_for_selection(samples, categories, 0.12, seed)

    def hover_maps(image, category):
        model = segmenter.models[category]
        x = io.normalize_image(image).astype(np.float32) / 255.0
        # the tiling MultiStreamSegmenter.segment uses for HoVer
        tile = min(segmenter.tile, -(-max(x.shape[:2]) // 32) * 32)
        stride = min(segmenter.stride or segmenter.tile // 2, tile)
        return infer.hover_maps(
            model.model, x, tile=tile, stride=stride, batch_size=segmenter.batch_size
        )

    def prepared(pairs, routed: bool):
        """``(stem, class, labels, maps or None, image)``; maps where the class goes to HoVer."""
        out = []
        for sample, category in pairs:
            image, labels = io.read_image(sample.image_path), io.read_labels(sample.label_path)
            category = segmenter.route(image) if routed else category
            hover = segmenter.models[category].stream == "hover"
            maps = hover_maps(image, category) if hover else None
            out.append((sample.stem, category, labels, maps, image))
        return out

    def f1(labels, maps, thresholds) -> float:
        fg, hv = maps
        return metrics.f1_score(
            labels, train.segment_maps("hover", np.concatenate([fg[None], hv]), thresholds)
        )

    print(f"{work}: predicting maps", flush=True)
    tuning = prepared(zip(selection, selection_classes, strict=True), routed=False)
    sets = {
        "real-mini val": prepared(((s, None) for s in real.val), routed=True),
        "synthetic held-out": prepared(((s, None) for s in datasets.find_pairs(syn_test)), True),
    }
    chosen: dict[str, dict[int, dict]] = {}
    scores: dict[tuple[str, str], list[tuple[str, int, float]]] = {}
    for name, candidates in grids().items():
        chosen[name] = {}
        for c in range(4):
            items = [t for t in tuning if t[1] == c and t[3] is not None]
            if not items:  # StarDist, or no selection images: the stored thresholds
                chosen[name][c] = segmenter.models[c].thresholds
                continue
            means = [np.mean([f1(t[2], t[3], cand) for t in items]) for cand in candidates]
            chosen[name][c] = dict(candidates[int(np.argmax(means))])
        for set_name, items in sets.items():
            rows = []
            for stem, c, labels, maps, image in items:
                if maps is None:
                    score = metrics.f1_score(labels, segmenter.segment(image, category=c))
                else:
                    score = f1(labels, maps, chosen[name][c])
                rows.append((stem, c, score))
            scores[name, set_name] = rows
            print(f"{name} on {set_name}: {np.mean([r[2] for r in rows]):.3f}", flush=True)
    return scores, chosen, np.bincount(selection_classes, minlength=4).tolist()


def grids() -> dict[str, list[dict]]:
    from cellseg_lite import train

    grid = train._threshold_grid("hover")
    return {"without the size floor": without_floor(grid), "with the tuned size floor": grid}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work",
        type=Path,
        nargs="+",
        default=[REPO / "runs" / "bench_quality"],
        help="bench_quality work folders (each with model.pt and its synthetic data)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the seed bench_quality ran with")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--note", default="", help="a sentence on where the segmenters came from")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    real = real_mini(required=True)
    runs = {work: retune(work, args.seed, real) for work in args.work}

    def mean(values) -> str:
        values = list(values)
        return f"{np.mean(values):.3f}" if values else "-"

    def shown(work: Path) -> str:
        return str(work.relative_to(REPO) if work.is_relative_to(REPO) else work)

    real_lines = [
        "| segmenter | post-processing tuned | all 40 | " + " | ".join(MODALITIES) + " |",
        "|" + "---|" * (3 + len(MODALITIES)),
    ]
    syn_lines = [
        "| segmenter | post-processing tuned | all | class 0 | class 1 | class 2 | class 3 |",
        "|---|---|---|---|---|---|---|",
    ]
    choice_lines = []
    for work, (scores, chosen, counts) in runs.items():
        for name in grids():
            rows = scores[name, "real-mini val"]
            per = [mean(r[2] for r in rows if real.modality[r[0]] == m) for m in MODALITIES]
            real_lines.append(
                f"| `{shown(work)}` | {name} | {mean(r[2] for r in rows)} | "
                + " | ".join(per)
                + " |"
            )
            rows = scores[name, "synthetic held-out"]
            per = [mean(r[2] for r in rows if r[1] == c) for c in range(4)]
            syn_lines.append(
                f"| `{shown(work)}` | {name} | {mean(r[2] for r in rows)} | "
                + " | ".join(per)
                + " |"
            )
        for c in range(4):
            choice_lines.append(
                f"| `{shown(work)}` | {c} | {counts[c]} | "
                + " | ".join(
                    ", ".join(f"{k} {v:g}" for k, v in chosen[name][c].items() if k != "nms_thresh")
                    for name in grids()
                )
                + " |"
            )
    commands = " ".join(shown(w) for w in args.work)
    section = f"""## Post-processing: HoVer's tuned size floor, on trained segmenters

Segmenters written by `bench_quality.py --routing validated` runs, each one's HoVer thresholds
tuned per class on that run's selection split twice: over probability and marker threshold only
(the `"scaled"` preset's floors: markers 2 %, foreground components 1 % of the typical cell
area), and over the whole `train._threshold_grid("hover")`, which also tries floors of 5/5 % and
10/10 %. Same weights in both rows of a segmenter: the difference is the post-processing. The
class of each scored image comes from the router, as in the segmenter. {args.note}

**Real-mini VAL**, challenge F1 (mean of per-image F1):

{chr(10).join(real_lines)}

**Held-out synthetic**, per routed class:

{chr(10).join(syn_lines)}

Thresholds chosen per class:

| segmenter | class | selection images | {" | ".join(grids())} |
|---|---|---|---|---|
{chr(10).join(choice_lines)}

- Command: `.venv/bin/python benchmarks/bench_postprocess.py --work {commands}`, each folder
  from `.venv/bin/python benchmarks/bench_quality.py --minutes 27 --routing validated --work FOLDER`
- Machine: {machine("torch", "timm", "stardist")}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        write_section("bench_postprocess", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
