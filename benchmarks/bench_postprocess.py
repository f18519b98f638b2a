"""What HoVer's post-processing choices add: one trained segmenter, its thresholds tuned two ways.

Loads the multi-stream segmenter that ``benchmarks/bench_quality.py`` wrote (``--work``, by
default ``runs/bench_quality``; several folders give one pair of rows each), rebuilds that run's
selection split (the same images, seed and fraction as
:func:`cellseg_lite.train.train_multistream`), predicts every HoVer model's maps of each image,
and tunes the post-processing of each class on its selection images twice (a class with fewer
than ``train.MIN_SELECTION_IMAGES`` of them on all selection images, with its pre-trained model's
maps, as :func:`cellseg_lite.train.train_multistream` tunes it). ``--compare floor``
(on plain maps):

- without the size floor: probability and marker threshold only, with the ``"scaled"``
  watershed preset's floors (markers 2 %, foreground components 1 % of the typical cell area),
  the grid before the floor was tuned;
- with it: the whole of ``train._threshold_grid("hover")`` (floors of 2/1 %, 5/5 % and 10/10 %).

``--compare tta``: the whole grid on plain maps, and on maps averaged over four flips of every
tile (:func:`cellseg_lite.infer.flip_averaged`, what ``TrainConfig.tta`` turns on).

``--compare marker`` (on flip-averaged maps): the whole grid, and the grid with marker thresholds
below its lowest (:data:`LOW_MARKER_THRESHOLDS`, tried wherever the grid tries 0.25).

``--compare confident`` (on flip-averaged maps): the whole grid, and what
:func:`cellseg_lite.train.best_thresholds` does: the grid's best candidate, then that candidate with
markers only where the cell probability is at least one of ``train.HOVER_MARKER_PROBS``
(``WatershedParams.marker_min_prob``), kept where it scores higher.

``--compare dihedral``: the whole grid on the four flips' maps, and on maps averaged over all
eight symmetries of the square (the four flips of the tile and of its transpose,
:func:`dihedral_averaged`): twice the forward passes.

``--compare scales``: the whole grid on the four flips' maps at the image's own scale, and on
those maps averaged with the maps of the image enlarged :data:`SCALE` times (four flips too),
resized back (:func:`cellseg_lite.infer.scale_averaged`; HoVer's offsets are normalised to each
cell's extent, so the two scales' maps mean the same): 3.25 times the forward passes. The
segmenter's second pass for small cells (``infer.UPSCALE``) picks one scale or the other by a
rule; this averages both on every image.

Both settings then score the real-mini VAL split and the held-out synthetic set. The weights are
the same in both rows, so the difference is the post-processing alone. Classes routed to
StarDist keep their stored thresholds and maps. Beside each real-mini score: the share of the
true cells merged with a neighbour (:func:`cellseg_lite.metrics.error_kinds`).

    .venv/bin/python benchmarks/bench_quality.py --routing validated   # trains the segmenter
    .venv/bin/python benchmarks/bench_postprocess.py                    # about a minute each
    .venv/bin/python benchmarks/bench_postprocess.py --compare tta      # a minute and a half
    .venv/bin/python benchmarks/bench_postprocess.py --compare marker --routing hover \
        --work runs/a runs/b --seed 0 1
    .venv/bin/python benchmarks/bench_postprocess.py --compare confident --routing hover \
        --work runs/a runs/b --seed 0 1
    .venv/bin/python benchmarks/bench_postprocess.py --compare dihedral --routing hover \
        --work runs/a runs/b --seed 0 1
    .venv/bin/python benchmarks/bench_postprocess.py --compare scales --routing hover \
        --work runs/a runs/b --seed 0 1
    .venv/bin/python benchmarks/bench_postprocess.py --work runs/a runs/b   # several runs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import (  # noqa: E402
    MODALITIES,
    add_run_options,
    machine,
    now,
    quality_run,
    real_mini,
    run_seeds,
    write_section,
)

REPO = Path(__file__).resolve().parents[1]
#: Marker thresholds ``--compare marker`` adds below the grid's lowest (0.25): trained segmenters
#: chose 0.25 for every class, the edge of the grid.
LOW_MARKER_THRESHOLDS = (0.1, 0.15)


#: The maps each comparison predicts: plain, averaged over four flips, over eight symmetries, or
#: over four flips at two scales.
MAPS = ("plain", "flip-averaged", "dihedral-averaged", "scale-averaged")
#: The second scale of ``--compare scales``: the segmenter's own factor for small cells.
SCALE = 1.5


def dihedral_averaged(predict):
    """A HoVer ``predict`` averaged over the eight symmetries of the square: the four flips of
    each tile (:func:`cellseg_lite.infer.flip_averaged`) and the four of its transpose, whose
    maps are transposed back with the horizontal and vertical offsets swapped."""
    from cellseg_lite import infer

    flips = infer.flip_averaged(predict, "hover")

    def averaged(x: torch.Tensor) -> np.ndarray:
        turned = flips(x.transpose(2, 3)).transpose(0, 1, 3, 2)[:, [0, 2, 1]]
        return (flips(x) + turned) / 2

    return averaged


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


def variants(compare: str) -> dict[str, tuple[list[dict], str, list[dict]]]:
    """The two ways of tuning compared: ``{name: (candidate thresholds, maps, refinements)}``,
    maps one of :data:`MAPS`; each refinement is tried on top of the best candidate
    (``train.evaluate_stream``'s ``refine``)."""
    from cellseg_lite import train

    grid = train._threshold_grid("hover")
    if compare == "confident":
        return {"markers anywhere": (grid, "flip-averaged", []),
                "markers where confident": (grid, "flip-averaged",
                                            train._threshold_refinements("hover"))}  # fmt: skip
    ways = _two_grids(compare, grid)
    return {name: (candidates, maps, []) for name, (candidates, maps) in ways.items()}


def _two_grids(compare: str, grid: list[dict]) -> dict[str, tuple[list[dict], str]]:
    if compare == "tta":
        return {"plain maps": (grid, "plain"), "flip-averaged maps": (grid, "flip-averaged")}
    if compare == "dihedral":
        return {
            "four flips": (grid, "flip-averaged"),
            "eight symmetries": (grid, "dihedral-averaged"),
        }
    if compare == "scales":
        return {
            "own scale": (grid, "flip-averaged"),
            f"own scale and x{SCALE:g}, averaged": (grid, "scale-averaged"),
        }
    if compare == "marker":
        lowest = min(t["marker_threshold"] for t in grid)
        lower = [
            {**t, "marker_threshold": m}
            for t in grid
            if t["marker_threshold"] == lowest
            for m in LOW_MARKER_THRESHOLDS
        ]
        return {"markers from 0.25": (grid, "flip-averaged"),
                "markers from 0.1": (grid + lower, "flip-averaged")}  # fmt: skip
    return {"without the size floor": (without_floor(grid), "plain"),
            "with the tuned size floor": (grid, "plain")}  # fmt: skip


def retune(work: Path, seed: int, real, compare: str):
    """Scores of ``work``'s segmenter tuned both ways: ``(scores, chosen, selection counts)``."""
    from cellseg_lite import datasets, infer, io, metrics, train

    segmenter = quality_run(work, "synthetic_train", "synthetic_test")
    syn_train, syn_test = work / "synthetic_train", work / "synthetic_test"

    samples = [*real.train, *datasets.find_pairs(syn_train)]
    categories = train._sample_categories(samples)
    _, (selection, selection_classes) = train._split_for_selection(
        samples, categories, train.VAL_FRACTION, seed
    )

    ways = variants(compare)
    kinds = [kind for kind in MAPS if kind in {maps for _, maps, _ in ways.values()}]
    seconds = dict.fromkeys(kinds, 0.0)  # predicting HoVer maps of each kind

    def window_maps(model, x, tta: bool):
        """``model``'s HoVer maps of network input ``x``, tiled as the segmenter tiles it."""
        tile, stride = segmenter._tiling(x)
        return infer.hover_maps(
            model.model, x, tile=tile, stride=stride, batch_size=segmenter.batch_size, tta=tta
        )

    def hover_maps(image, model, kind, own=None):
        """``model``'s maps of ``image`` of one of :data:`MAPS`; ``own``: its flip-averaged maps,
        where already predicted (the scale-averaged maps start from them)."""
        x = io.normalize_image(image, sparse_cells=segmenter.sparse_cells)
        x = x.astype(np.float32) / 255.0
        tile, stride = segmenter._tiling(x)  # as MultiStreamSegmenter.segment tiles
        started = time.perf_counter()
        if kind == "scale-averaged":
            own = window_maps(model, x, tta=True) if own is None else own

            def maps_of(image):  # the own scale's maps are those already predicted
                if image.shape == x.shape:
                    return infer._stacked(own)
                return infer._stacked(window_maps(model, image, tta=True))

            maps = infer.split_hover_maps(infer.scale_averaged(maps_of, x, (1.0, SCALE), "hover"))
        elif kind == "dihedral-averaged":
            predict = dihedral_averaged(infer.model_predictor(model.model, outputs="hover"))
            maps = infer.sliding_window(
                predict, infer._network_input(x), tile, stride, batch_size=segmenter.batch_size
            )
            maps = infer.HoverMaps(maps[0], maps[1:])
        else:
            maps = window_maps(model, x, tta=kind == "flip-averaged")
        seconds[kind] += time.perf_counter() - started
        return maps

    def all_maps(image, model) -> dict:
        """``{kind: maps}`` of every kind compared (:data:`MAPS` order: the flip-averaged maps
        come before the scale-averaged ones, which reuse them)."""
        out: dict = {}
        for kind in kinds:
            out[kind] = hover_maps(image, model, kind, own=out.get("flip-averaged"))
        return out

    def prepared(pairs, routed: bool):
        """``(stem, class, labels, {kind: maps} or None, image)``; maps where the class goes to
        HoVer."""
        out = []
        for sample, category in pairs:
            image, labels = io.read_image(sample.image_path), io.read_labels(sample.label_path)
            category = segmenter.route(image) if routed else category
            hover = segmenter.models[category].stream == "hover"
            model = segmenter.models[category]
            maps = all_maps(image, model) if hover else None
            out.append((sample.stem, category, labels, maps, image))
        return out

    def tuning_items(c: int):
        """The selection images that choose class ``c``'s thresholds, as ``train_multistream``
        does: a class with enough of them is tuned on its own; a smaller one keeps the
        pre-trained model, tuned on every selection image (maps predicted by that model)."""
        model = segmenter.models[c]
        if model.stream != "hover":
            return []
        if counts[c] >= train.MIN_SELECTION_IMAGES:
            return [t for t in tuning if t[1] == c]
        items = []
        for stem, k, labels, maps, image in tuning:
            if segmenter.models[k].model is not model.model:  # another model's maps: predict once
                if (stem, id(model.model)) not in other_maps:
                    predicted = all_maps(image, model)
                    other_maps[stem, id(model.model)] = predicted
                maps = other_maps[stem, id(model.model)]
            items.append((stem, k, labels, maps, image))
        return items

    def segmented(maps, thresholds) -> np.ndarray:
        fg, hv = maps
        return train.segment_maps("hover", np.concatenate([fg[None], hv]), thresholds)

    def f1(labels, maps, thresholds) -> float:
        return metrics.f1_score(labels, segmented(maps, thresholds))

    print(f"{work}: predicting maps", flush=True)
    tuning = prepared(zip(selection, selection_classes, strict=True), routed=False)
    counts = np.bincount(selection_classes, minlength=4).tolist()
    other_maps: dict[tuple[str, int], dict] = {}  # a small class's model on other classes' images
    sets = {
        "real-mini val": prepared(((s, None) for s in real.val), routed=True),
        "synthetic held-out": prepared(((s, None) for s in datasets.find_pairs(syn_test)), True),
    }
    chosen: dict[str, dict[int, dict]] = {}
    scores: dict[tuple[str, str], list[tuple[str, int, float]]] = {}
    for name, (candidates, kind, refine) in ways.items():
        chosen[name] = {}
        for c in range(4):
            items = tuning_items(c)
            if not items:  # StarDist, or no selection images: the stored thresholds
                chosen[name][c] = segmenter.models[c].thresholds
                continue
            means = [np.mean([f1(t[2], t[3][kind], cand) for t in items]) for cand in candidates]
            best = dict(candidates[int(np.argmax(means))])
            chosen[name][c], best_mean = best, max(means)
            for change in refine:  # as train.evaluate_stream: kept only where it scores higher
                refined = {**best, **change}
                score = np.mean([f1(t[2], t[3][kind], refined) for t in items])
                if score > best_mean:
                    chosen[name][c], best_mean = refined, score
        for set_name, items in sets.items():
            rows = []
            for stem, c, labels, maps, image in items:
                if maps is None:
                    predicted = segmenter.segment(image, category=c)
                else:
                    predicted = segmented(maps[kind], chosen[name][c])
                errors = metrics.error_kinds(labels, predicted)  # and the F1 from the same matching
                rows.append((stem, c, errors.f1, errors.merged, errors.tp + errors.fn))
            scores[name, set_name] = rows
            print(f"{name} on {set_name}: {np.mean([r[2] for r in rows]):.3f}", flush=True)
    return scores, chosen, counts, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser, REPO / "runs" / "bench_quality", "model.pt and its synthetic data")
    parser.add_argument(
        "--compare",
        choices=("floor", "tta", "marker", "confident", "dihedral", "scales"),
        default="floor",
        help="floor: the grid without and with the tuned size floor; tta: plain against "
        "flip-averaged maps; marker: the grid without and with marker thresholds below 0.25; "
        "confident: the grid without and with a least cell probability for markers; dihedral: maps averaged over four flips against eight symmetries; scales: maps at the image's own scale against those averaged with the maps of the image enlarged 1.5 times",
    )
    parser.add_argument(
        "--routing",
        default="validated",
        help="the --routing the bench_quality runs had (for the section's text)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--note", default="", help="a sentence on where the segmenters came from")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    real = real_mini(required=True)
    seeds = run_seeds(parser, args)
    runs = {
        work: retune(work, seed, real, args.compare)
        for work, seed in zip(args.work, seeds, strict=True)
    }
    names = list(variants(args.compare))

    def mean(values) -> str:
        values = list(values)
        return f"{np.mean(values):.3f}" if values else "-"

    def shown(work: Path) -> str:
        return str(work.relative_to(REPO) if work.is_relative_to(REPO) else work)

    real_lines = [
        "| segmenter | post-processing tuned | all 40 | " + " | ".join(MODALITIES) + " | merged |",
        "|" + "---|" * (4 + len(MODALITIES)),
    ]
    syn_lines = [
        "| segmenter | post-processing tuned | all | class 0 | class 1 | class 2 | class 3 |",
        "|---|---|---|---|---|---|---|",
    ]
    choice_lines = []
    time_lines = []
    for work, (scores, chosen, counts, seconds) in runs.items():
        time_lines.append(
            f"`{shown(work)}`: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        )
        for name in names:
            rows = scores[name, "real-mini val"]
            per = [mean(r[2] for r in rows if real.modality[r[0]] == m) for m in MODALITIES]
            merged = sum(r[3] for r in rows) / max(sum(r[4] for r in rows), 1)
            real_lines.append(
                f"| `{shown(work)}` | {name} | {mean(r[2] for r in rows)} | "
                + " | ".join(per)
                + f" | {merged:.1%} |"
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
                    for name in names
                )
                + " |"
            )
    commands = " ".join(shown(w) for w in args.work)
    if seeds != [0] * len(seeds):
        commands += " --seed " + " ".join(map(str, seeds))
    if args.compare == "marker":
        title = "HoVer's marker threshold below 0.25"
        how = f"""over the whole `train._threshold_grid("hover")` (marker thresholds 0.25 and 0.5),
and over the same grid with marker thresholds {", ".join(map(str, LOW_MARKER_THRESHOLDS))} added
wherever it tries 0.25, both on maps averaged over four flips (what the segmenters use)"""
    elif args.compare == "confident":
        from cellseg_lite import train

        title = "HoVer's markers only where the cell probability is high"
        how = f"""over the whole `train._threshold_grid("hover")`, and as `train.best_thresholds`
does: the grid's best candidate, then that candidate with markers only where the cell
probability is at least {", ".join(map(str, train.HOVER_MARKER_PROBS))} (`WatershedParams.marker_min_prob`),
kept where it scores higher; both on maps averaged over four flips (what the segmenters use)"""
    elif args.compare == "dihedral":
        title = "HoVer's maps averaged over eight symmetries instead of four flips"
        how = """on maps averaged over the four flips of every tile (`infer.flip_averaged`, what
the segmenters use) and over all eight symmetries of the square (those four flips of the tile
and of its transpose, whose maps are transposed back with the two offsets swapped:
`dihedral_averaged` in the script), both over the whole `train._threshold_grid("hover")`"""
    elif args.compare == "scales":
        title = f"HoVer's maps averaged over two scales, the image's own and x{SCALE:g}"
        how = f"""on maps averaged over four flips at the image's own scale (what the segmenters
use in their first pass), and on those maps averaged with the maps (four flips too) of the image
enlarged {SCALE:g} times, resized back (`infer.scale_averaged`), both over the whole
`train._threshold_grid("hover")`; one pass each, without the segmenters' second pass for small
cells or their mirrored context"""
    elif args.compare == "tta":
        title = "HoVer's maps averaged over four flips (test-time augmentation)"
        how = """on plain maps and on maps averaged over the four flips of every tile
(`infer.flip_averaged`: horizontal offsets negated under a left-right flip, vertical ones under
an up-down flip), both over the whole `train._threshold_grid("hover")`"""
    else:
        title = "HoVer's tuned size floor"
        how = """over probability and marker threshold only (the `"scaled"` preset's floors:
markers 2 %, foreground components 1 % of the typical cell area), and over the whole
`train._threshold_grid("hover")`, which also tries floors of 5/5 % and 10/10 %"""
    reused = (
        "\n(The scale-averaged time is the enlarged pass and the average alone: its own-scale maps "
        "are the\nflip-averaged ones, predicted once and reused, so the method's whole cost is the "
        "sum of the two.)"
        if args.compare == "scales"
        else ""
    )
    flag = "" if args.compare == "floor" else f" --compare {args.compare}"
    if args.routing != "validated":
        flag += f" --routing {args.routing}"
    from cellseg_lite.train import MIN_SELECTION_IMAGES as MIN_SELECTION

    section = f"""## Post-processing: {title}, on trained segmenters

Segmenters written by `bench_quality.py --routing {args.routing}` runs, each one's HoVer thresholds
tuned per class on that run's selection split twice (a class with fewer than
{MIN_SELECTION} selection images on all of them, with the pre-trained model's maps, as the segmenter
was): {how}. Same weights in both rows of a
segmenter: the difference is the post-processing. The class of each scored image comes from the
router, as in the segmenter. {args.note}

**Real-mini VAL**, challenge F1 (mean of per-image F1), and the share of the true cells merged with
a neighbour (`metrics.error_kinds`):

{chr(10).join(real_lines)}

**Held-out synthetic**, per routed class:

{chr(10).join(syn_lines)}

Thresholds chosen per class:

| segmenter | class | selection images | {" | ".join(names)} |
|---|---|---|---|---|
{chr(10).join(choice_lines)}

Time to predict the HoVer maps of the selection and scored images (2 torch threads):
{"; ".join(time_lines)}.{reused}

- Command: `.venv/bin/python benchmarks/bench_postprocess.py{flag} --work {commands}`, each folder
  from `.venv/bin/python benchmarks/bench_quality.py --minutes 27 --routing {args.routing} --work FOLDER`
  (with `--seed` where one is given)
- Machine: {machine("torch", "timm", "stardist")}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        suffix = "" if args.compare == "floor" else f"_{args.compare}"
        write_section("bench_postprocess" + suffix, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
