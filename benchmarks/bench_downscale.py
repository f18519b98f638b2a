"""Large cells segmented a second time, smaller: the other half of the inference chapter's scale rule.

``benchmarks/bench_upscale.py`` asks whether images of small cells gain from a second pass at a
larger scale. This script asks the same about the other end: the `lite` networks learn from
128-pixel patches, so a cell 100 pixels wide never fits whole in what they see during training,
and their offset (HoVer) or ray (StarDist) maps of such cells are poor. Loads the segmenter that
``benchmarks/bench_quality.py`` wrote (``--work``), segments every image once at its own scale,
sorts the images by the typical cell diameter of that pass
(:func:`cellseg_lite.infer.inscribed_diameter`), and segments the images at or above
``--from`` pixels again at each ``--factors`` (below 1) times their size, labels grown back
(nearest), with the same weights and thresholds. Tables: the challenge F1 per diameter bin and
scale, every rule "a second pass at ``x`` times for images at or above ``d`` pixels" on the
sets with the rule best on real-mini TRAIN marked, and that rule per routed class. The router
offers a second trigger: class 2 holds large cells by the 4-way rule's definition, so every image
routed to one of ``--classes`` is also segmented at each factor, whatever its first-pass
diameter, and a last table asks whether "class c at x f" pays. Real-mini routes (almost) none of
its images to class 2, so fresh synthetic images (``--fresh-seed``, ``--fresh`` per class,
neither trained on nor held out) join real-mini TRAIN in the choice.

    .venv/bin/python benchmarks/bench_quality.py --routing hover --work runs/X   # the segmenter
    .venv/bin/python benchmarks/bench_downscale.py --work runs/X                # about 7 minutes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, mean, now, work_option, write_section  # noqa: E402
from bench_upscale import (  # noqa: E402
    bin_lines,
    class_lines,
    group_lines,
    load_run,
    measure,
    save_rows,
    with_fresh_synthetic,
)

REPO = Path(__file__).resolve().parents[1]
EDGES = (30.0, 40.0, 60.0, 90.0, float("inf"))


def scales_for(row: dict, start: float, factors, classes, segmenter) -> list[float]:
    """The scales an image is segmented at besides 1: ``factors`` for large cells and for every
    image routed to one of ``classes``, and ``segmenter``'s second pass for small cells
    (``infer.UPSCALE``, where it would make one), so that the rules combine."""
    from cellseg_lite import infer

    diameter, category = row["diameter"], row["category"]
    scales = list(factors) if diameter >= start or category in classes else []
    small_below = segmenter.upscale_below(segmenter.models[category]) or 0.0
    if diameter < small_below and category in segmenter.upscale_classes:
        scales.append(infer.UPSCALE)  # also where a low --from makes both rules apply
    return scales


def routed_class_lines(rows: dict, factors, classes) -> list[str]:
    """:func:`bench_upscale.group_lines` per routed class of ``classes`` (the rule "every image of
    class c at x f")."""
    groups = [(str(c), lambda r, c=c: r["category"] == c) for c in classes]
    return group_lines(rows, factors, "routed class", groups)


def main(argv: list[str] | None = None) -> int:
    from cellseg_lite import infer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_quality")
    parser.add_argument("--factors", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument(
        "--from", dest="start", type=float, default=EDGES[0], help="smallest diameter retried"
    )
    parser.add_argument(
        "--classes",
        type=int,
        nargs="*",
        default=[2],
        help="routed classes whose every image is also segmented at each factor",
    )
    parser.add_argument(
        "--fresh-seed", type=int, default=8000, help="seed of the fresh synthetic images"
    )
    parser.add_argument("--fresh", type=int, default=30, help="fresh synthetic images per class")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if any(not 0 < f < 1 for f in args.factors):
        parser.error("--factors: each must be between 0 and 1")
    factors = sorted(set(args.factors), reverse=True)
    if any(not 0 <= c <= 3 for c in args.classes):
        parser.error("--classes: each must be a class 0-3")
    segmenter, sets = load_run(args.work)
    # the small-cell threshold of this segmenter's maps (it halves for the stride-2 decoder)
    small_below = segmenter.upscale_below(segmenter.models[0]) or 0.0
    sets = with_fresh_synthetic(sets, args.work, args.fresh_seed, args.fresh)
    started = time.perf_counter()
    rows = {
        name: measure(
            segmenter,
            pairs,
            lambda r: scales_for(r, args.start, factors, args.classes, segmenter),
            print,
        )
        for name, pairs in sets.items()
    }
    minutes = (time.perf_counter() - started) / 60
    save_rows(args.work / "downscale_rows.json", rows)

    edges = [args.start] + [e for e in EDGES if e > args.start]
    lines = bin_lines(rows, factors, edges)

    def with_rule(name: str, above: float | None, factor: float, upscale: bool) -> float:
        def f1(r):
            if above is not None and r["diameter"] >= above and factor in r:
                return r[factor]
            if upscale and infer.UPSCALE in r:  # measured only where the segmenter retries
                return r[infer.UPSCALE]
            return r[1.0]

        return mean(f1(r) for r in rows[name])

    candidates = [(above, f) for above in edges[:-1] for f in factors]
    best = max(candidates, key=lambda c: with_rule("real-mini TRAIN", *c, upscale=True))
    rule_lines = [
        "| rule for large cells | " + " | ".join(f"{n}: alone, with the small-cell rule" for n in sets) + " |",
        "|---|" + "---|" * len(sets),
    ]  # fmt: skip
    for above, factor in [(None, 1.0), *candidates]:
        label = "none" if above is None else f"{above:g} px and more, x{factor:g}"
        label += " (best on TRAIN)" if (above, factor) == best else ""
        cells = [
            f"{with_rule(n, above, factor, False):.3f}, {with_rule(n, above, factor, True):.3f}"
            for n in sets
        ]
        rule_lines.append(f"| {label} | " + " | ".join(cells) + " |")
    gain = with_rule("real-mini TRAIN", *best, True) - with_rule("real-mini TRAIN", None, 1.0, True)
    verdict = f"The best rule on TRAIN ({best[0]:g} px and more, x{best[1]:g}) " + (
        f"raises TRAIN by {gain:.3f} over the small-cell rule alone."
        if round(gain, 3) > 0  # a gain the tables can show
        else "does no better on TRAIN than the small-cell rule alone: `infer` has no such "
        "second pass."
    )
    per_class = class_lines(rows, best[1], lambda r: r["diameter"] >= best[0])
    by_class = routed_class_lines(rows, factors, args.classes)
    choice = [n for n in rows if n in ("real-mini TRAIN", "synthetic fresh")]
    class_verdicts = []
    for category in args.classes:
        chosen = [r for n in choice for r in rows[n] if r["category"] == category]
        if not chosen:
            class_verdicts.append(f"class {category}: no image of the choice sets is routed there")
            continue
        pooled = {k: mean(r[k] for r in chosen) for k in (1.0, *factors)}
        top = max(pooled, key=pooled.get)
        class_verdicts.append(
            f"class {category}: x{top:g} ({len(chosen)} images, {pooled[1.0]:.3f} in one pass, "
            f"{pooled[top]:.3f} at x{top:g})"
        )
    shown, option = work_option(args.work, REPO / "runs" / "bench_quality")
    factor_option = (
        "" if factors == [0.7, 0.5] else " --factors " + " ".join(f"{f:g}" for f in factors)
    )
    section = f"""## Inference: large cells segmented again, smaller

One trained segmenter (`{shown}`, from `benchmarks/bench_quality.py`), every image segmented
once at its own scale, with the package's second pass for small cells turned off
(`scale=1`); the typical cell diameter of that pass (`infer.inscribed_diameter`) sorts the
images. Images at or above {args.start:g} pixels are segmented again at
{", ".join(f"{f:g}" for f in factors)} times their size (bilinear), their labels grown back
(nearest). Challenge F1, mean over each bin's images:

{chr(10).join(lines)}

Every rule "a second pass at x times for images at or above d pixels" that these measurements
allow, mean challenge F1 of each whole set: alone (every other image keeps its one-pass labels)
and with the package's rule for small cells (below {small_below:g} px for this segmenter's maps, x{infer.UPSCALE:g},
classes {", ".join(map(str, infer.UPSCALE_CLASSES))}: `infer.MIN_DIAMETER`, `infer.UPSCALE`,
`infer.UPSCALE_CLASSES`), which is what a segmenter would do with both; the rule
is chosen on TRAIN only, with both:

{chr(10).join(rule_lines)}

{verdict} Per class of the router, the images that rule segments a second
time, their mean F1 in one pass and with the second:

{chr(10).join(per_class)}

Every image the router sends to class {", ".join(map(str, args.classes))}, whatever its first-pass
diameter, segmented at each scale instead (the rule "class c at x f"; fresh synthetic images:
seed {args.fresh_seed}, {args.fresh} per class, neither trained on nor held out):

{chr(10).join(by_class)}

Best scale per class on the sets of the choice ({" and ".join(choice)}, images pooled):
{"; ".join(class_verdicts)}.

Took {minutes:.1f} minutes.

- Command: `.venv/bin/python benchmarks/bench_downscale.py{option}{factor_option}`
- Machine: {machine("torch", "timm", "stardist")}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        write_section("bench_downscale", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
