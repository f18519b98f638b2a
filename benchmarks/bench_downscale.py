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
scale, every rule "a second pass at ``x`` times for images at or above ``d`` pixels" on the three
sets with the rule best on real-mini TRAIN marked, and that rule per routed class.

    .venv/bin/python benchmarks/bench_quality.py --routing validated   # trains the segmenter
    .venv/bin/python benchmarks/bench_downscale.py                      # about 3 minutes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, mean, now, work_option, write_section  # noqa: E402
from bench_upscale import bin_lines, class_lines, load_run, measure, save_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EDGES = (30.0, 40.0, 60.0, 90.0, float("inf"))


def scales_for(diameter: float, start: float, factors) -> list[float]:
    """The scales an image is segmented at besides 1: ``factors`` for large cells, and the
    package's second pass (``infer.UPSCALE``) for small ones, so that the rules combine."""
    from cellseg_lite import infer

    scales = list(factors) if diameter >= start else []
    if diameter < infer.MIN_DIAMETER:  # also where a low --from makes both rules apply
        scales.append(infer.UPSCALE)
    return scales


def main(argv: list[str] | None = None) -> int:
    from cellseg_lite import infer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_quality")
    parser.add_argument("--factors", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument(
        "--from", dest="start", type=float, default=EDGES[0], help="smallest diameter retried"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if any(not 0 < f < 1 for f in args.factors):
        parser.error("--factors: each must be between 0 and 1")
    factors = sorted(set(args.factors), reverse=True)
    segmenter, sets = load_run(args.work)
    started = time.perf_counter()
    rows = {
        name: measure(segmenter, pairs, lambda d: scales_for(d, args.start, factors), print)
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
            small = r["diameter"] < infer.MIN_DIAMETER and r["category"] in infer.UPSCALE_CLASSES
            if upscale and small and infer.UPSCALE in r:
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
    shown, option = work_option(args.work, REPO / "runs" / "bench_quality")
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
and with the package's rule for small cells (below {infer.MIN_DIAMETER:g} px, x{infer.UPSCALE:g},
classes {", ".join(map(str, infer.UPSCALE_CLASSES))}: `infer.MIN_DIAMETER`, `infer.UPSCALE`,
`infer.UPSCALE_CLASSES`), which is what a segmenter would do with both; the rule
is chosen on TRAIN only, with both:

{chr(10).join(rule_lines)}

{verdict} Per class of the router, the images that rule segments a second
time, their mean F1 in one pass and with the second:

{chr(10).join(per_class)}

Took {minutes:.1f} minutes.

- Command: `.venv/bin/python benchmarks/bench_downscale.py{option}`
- Machine: {machine("torch", "timm", "stardist")}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        write_section("bench_downscale", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
