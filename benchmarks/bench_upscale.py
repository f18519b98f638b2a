"""Small cells segmented a second time, larger: where the rule of ``infer.MIN_DIAMETER`` comes from.

Loads the multi-stream segmenter that ``benchmarks/bench_quality.py`` wrote (``--work``, by
default ``runs/bench_quality``) and segments every image of three sets once at its own scale
(``min_diameter=None``). The typical cell diameter of that first pass
(:func:`cellseg_lite.infer.inscribed_diameter`) sorts the images into bins; the images of the
bins below ``--up-to`` pixels are segmented again at each ``--factors`` times their size, their
labels shrunk back, with the same weights and thresholds. The first table gives the challenge F1
of each bin at each scale; the second what each rule "a second pass at ``x`` times below ``d``
pixels" makes of each whole set, with the rule that scores best on TRAIN marked (the package's
``infer.MIN_DIAMETER`` and ``infer.UPSCALE`` are that choice); the last, per routed class,
what the package's rule does to the images it retries (``infer.UPSCALE_CLASSES``: the classes where
it does not lose on the two sets of the choice).

- real-mini TRAIN: where the rule's numbers were chosen (the segmenter has seen these images,
  but the question is about the network's scale, not about fitting them);
- fresh synthetic images (``--fresh-seed``, neither trained on nor held out): with TRAIN, where
  the classes were chosen (real-mini routes no image to the gray class 1, nor to class 2);
- real-mini VAL and the held-out synthetic images of the run: never used for the choice.

    .venv/bin/python benchmarks/bench_quality.py --routing validated   # trains the segmenter
    .venv/bin/python benchmarks/bench_upscale.py                        # about 15 minutes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, mean, now, quality_run, real_mini, work_option, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BINS = (0.0, 11.0, 12.0, 13.0, 14.0, 16.0, 20.0, 25.0, 30.0)
AREA_CAPS = (30.0, 40.0, 50.0, float("inf"))


def bin_name(low: float, high: float) -> str:
    if high == float("inf"):
        return f"{low:g} and more"
    return f"below {high:g}" if low == 0 else f"{low:g}-{high:g}"


def area_diameter(labels) -> float:
    """Diameter of the circle of the median object area (``nan`` without objects)."""
    import numpy as np

    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    return float(2 * np.sqrt(np.median(areas) / np.pi)) if areas.size else float("nan")


def measure(segmenter, pairs, factors_for, log) -> list[dict]:
    """Per image: first-pass diameter and F1 at scale 1 and at each of ``factors_for(row)``
    (``benchmarks/bench_downscale.py`` asks the same about large cells)."""
    from cellseg_lite import infer, io, metrics

    rows = []
    for pair in pairs:
        image, truth = io.read_image(pair.image_path), io.read_labels(pair.label_path)
        category = segmenter.route(image)
        labels = segmenter.segment(image, category=category, scale=1.0)
        diameter = infer.inscribed_diameter(labels)
        row = {"stem": io.image_stem(pair.image_path), "category": category,
               "diameter": diameter, "area_diameter": area_diameter(labels),
               1.0: metrics.f1_score(truth, labels)}  # fmt: skip
        factors = list(factors_for(row))  # the row so far: diameter, routed class
        fits = image.shape[0] * image.shape[1] * max(factors, default=1) ** 2 <= infer.TILED_PIXELS
        for factor in factors if fits else []:
            rescaled = segmenter.segment(image, category=category, scale=factor)
            row[factor] = metrics.f1_score(truth, rescaled)
        rows.append(row)
        log(f"{row['stem'][:24]:24s} d={diameter:5.1f} "
            + " ".join(f"x{k:g} {v:.3f}" for k, v in row.items() if isinstance(k, float)))  # fmt: skip
    return rows


def load_run(work: Path):
    """The segmenter that ``bench_quality.py`` wrote to ``work`` and the three sets it is scored
    on: real-mini TRAIN and VAL, and the run's held-out synthetic images."""
    from cellseg_lite import datasets

    segmenter = quality_run(work, "synthetic_test")
    syn_test = work / "synthetic_test"
    real = real_mini(required=True)
    sets = {
        "real-mini TRAIN": real.train,
        "real-mini VAL": real.val,
        "synthetic held-out": datasets.find_pairs(syn_test),
    }
    return segmenter, sets


def with_fresh_synthetic(sets: dict, work: Path, seed: int, per_class: int) -> dict:
    """``sets`` with synthetic images made fresh for the choice (neither trained on nor held
    out; ``bench_quality``'s size) second, after real-mini TRAIN."""
    from cellseg_lite import datasets, synthetic

    fresh = work / f"synthetic_fresh_{seed}_{per_class}"
    if not fresh.is_dir():
        synthetic.make_dataset(fresh, per_class, size=(256, 256), seed=seed)
    first, *rest = sets.items()
    return dict([first, ("synthetic fresh", datasets.find_pairs(fresh)), *rest])


def save_rows(path: Path, rows: dict) -> None:
    """Every measurement as JSON, for questions the tables do not answer."""
    path.write_text(
        json.dumps(
            {name: [{str(k): v for k, v in r.items()} for r in rs] for name, rs in rows.items()}
        )
    )


def group_lines(rows: dict, factors, title: str, groups) -> list[str]:
    """Markdown table: per group (``(label, belongs(row))``) and set, the images retried and their
    mean F1 at scale 1 and at each factor."""
    header = (
        f"| {title} | "
        + " | ".join(f"{name}: images, x1, " + ", ".join(f"x{f:g}" for f in factors) for name in rows)
        + " |"
    )  # fmt: skip
    lines = [header, "|---|" + "---|" * len(rows)]
    for label, belongs in groups:
        cells = []
        for name in rows:
            inside = [r for r in rows[name] if belongs(r) and factors[0] in r]
            scores = [mean(r[k] for r in inside) for k in (1.0, *factors)]
            cells.append(
                f"{len(inside)}: " + ", ".join(f"{s:.3f}" for s in scores) if inside else "0"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def bin_lines(rows: dict, factors, edges) -> list[str]:
    """:func:`group_lines` per first-pass diameter bin."""
    groups = [
        (bin_name(low, high), lambda r, low=low, high=high: low <= r["diameter"] < high)
        for low, high in zip(edges[:-1], edges[1:], strict=True)
    ]
    return group_lines(rows, factors, "first-pass diameter (px)", groups)


def class_lines(rows: dict, factor: float, retried) -> list[str]:
    """Markdown table: per routed class and set, the images a rule retries (``retried(row)``)
    at ``factor`` and their mean F1 in one pass and with the second."""
    lines = [
        "| routed class | " + " | ".join(f"{n}: images retried, x1, x{factor:g}" for n in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]  # fmt: skip
    for category in range(4):
        cells = []
        for name in rows:
            chosen = [
                r for r in rows[name] if r["category"] == category and retried(r) and factor in r
            ]
            cells.append(
                f"{len(chosen)}: {mean(r[1.0] for r in chosen):.3f}, "
                f"{mean(r[factor] for r in chosen):.3f}"
                if chosen
                else "0"
            )
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    from cellseg_lite import infer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_quality")
    parser.add_argument("--factors", type=float, nargs="+", default=[1.5, 2.0])
    parser.add_argument("--up-to", type=float, default=BINS[-1], help="largest diameter retried")
    parser.add_argument(
        "--fresh-seed", type=int, default=7000, help="seed of the fresh synthetic images"
    )
    parser.add_argument("--fresh", type=int, default=10, help="fresh synthetic images per class")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if any(f <= 1 for f in args.factors):
        parser.error("--factors: each must be > 1")
    factors = sorted(set(args.factors))
    segmenter, sets = load_run(args.work)
    sets = with_fresh_synthetic(sets, args.work, args.fresh_seed, args.fresh)
    started = time.perf_counter()
    rows = {
        name: measure(
            segmenter, pairs, lambda r: factors if r["diameter"] < args.up_to else [], print
        )
        for name, pairs in sets.items()
    }
    minutes = (time.perf_counter() - started) / 60
    save_rows(args.work / "upscale_rows.json", rows)

    edges = [e for e in BINS if e < args.up_to] + [args.up_to]
    lines = bin_lines(rows, factors, edges)

    def with_rule(
        name: str, below: float, factor: float, cap: float = float("inf"), classes=range(4)
    ) -> float:
        return mean(
            r[factor]
            if r["diameter"] < below and r["area_diameter"] < cap and factor in r
            and r["category"] in classes
            else r[1.0]
            for r in rows[name]
        )  # fmt: skip

    candidates = [(below, f) for below in edges[1:] for f in factors]
    best = max(candidates, key=lambda c: with_rule("real-mini TRAIN", *c))
    ours = (segmenter.upscale_below(segmenter.models[0]) or infer.MIN_DIAMETER, infer.UPSCALE)
    rule_lines = [
        "| rule | " + " | ".join(sets) + " |",
        "|---|" + "---|" * len(sets),
        "| one pass | " + " | ".join(f"{mean(r[1.0] for r in rows[n]):.3f}" for n in sets) + " |",
    ]
    for below, factor in candidates:
        notes = [
            text
            for text, c in (("best on TRAIN", best), ("`infer`'s, in every class", ours))
            if c == (below, factor)
        ]
        label = f"below {below:g} px, x{factor:g}" + (f" ({', '.join(notes)})" if notes else "")
        rule_lines.append(
            f"| {label} | " + " | ".join(f"{with_rule(n, below, factor):.3f}" for n in sets) + " |"
        )
    classes = infer.UPSCALE_CLASSES
    rule_lines.append(
        f"| below {ours[0]:g} px, x{ours[1]:g}, classes {', '.join(map(str, classes))} only "
        "(`infer`'s) | "
        + " | ".join(f"{with_rule(n, *ours, classes=classes):.3f}" for n in sets)
        + " |"
    )
    # Two questions about the chosen rule: would a cap on the area diameter spare long cells
    # (narrow but large), and does the second pass help every routed class alike?
    cap_lines = [
        "| second pass only where the median object's area diameter is also below | "
        + " | ".join(sets) + " |",
        "|---|" + "---|" * len(sets),
    ]  # fmt: skip
    for cap in AREA_CAPS:
        name = "no cap (the rule above)" if cap == float("inf") else f"{cap:g} px"
        cap_lines.append(
            f"| {name} | " + " | ".join(f"{with_rule(n, *best, cap):.3f}" for n in sets) + " |"
        )
    per_class = class_lines(rows, ours[1], lambda r: r["diameter"] < ours[0])
    shown, option = work_option(args.work, REPO / "runs" / "bench_quality")
    section = f"""## Inference: small cells segmented again, larger

One trained segmenter (`{shown}`, from `benchmarks/bench_quality.py`), every image segmented
once at its own scale; the typical cell diameter of that pass (`infer.inscribed_diameter`: the
median over objects of the widest circle inside each) sorts the images. Images below
{args.up_to:g} pixels are segmented again at {", ".join(f"{f:g}" for f in factors)} times their
size (bilinear), their labels shrunk back (nearest). Challenge F1, mean over each bin's images:

{chr(10).join(lines)}

Every rule "a second pass at x times for images below d pixels" that these measurements allow,
mean challenge F1 of each whole set; the rule is chosen on TRAIN only (`infer.MIN_DIAMETER` =
{infer.MIN_DIAMETER:g} for maps at stride {infer.MIN_DIAMETER_STRIDE}, {ours[0]:g} for this
segmenter's; `infer.UPSCALE` = {ours[1]:g}), and `infer` applies it to the classes
of `infer.UPSCALE_CLASSES` only ({", ".join(map(str, classes))}; the last table):

{chr(10).join(rule_lines)}

The rule best on TRAIN (below {best[0]:g} px, x{best[1]:g}) again, kept to the images whose
typical object is also small by area (`area diameter`: the circle of the median object area):
long cells are narrow but not small, and a clump of merged cells is large by area too.

{chr(10).join(cap_lines)}

`infer`'s rule in every class, per class of the router: images it segments a second time, their
mean F1 in one pass and with the second. `infer.UPSCALE_CLASSES` holds the classes where the
second pass does not lose on the two sets of the choice, real-mini TRAIN and the fresh synthetic
images:

{chr(10).join(per_class)}

Took {minutes:.1f} minutes.

- Command: `.venv/bin/python benchmarks/bench_upscale.py{option}`
- Machine: {machine("torch", "timm", "stardist")}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        write_section("bench_upscale", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
