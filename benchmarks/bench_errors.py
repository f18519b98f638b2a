"""What a trained segmenter's errors are made of: cells missed, split, merged or badly outlined.

The challenge's F1 counts false negatives and false positives; :func:`cellseg_lite.metrics.
error_kinds` sorts them by kind (definitions in :class:`~cellseg_lite.metrics.ErrorKinds`). This
script segments the real-mini VAL images and the held-out synthetic images with the segmenter
of each ``benchmarks/bench_quality.py`` run (``--work``) and adds up the kinds per modality (VAL)
and per low-level class (synthetic, from the true labels). The share of each kind says which
part of the method to work on next: touching cells read as one point at the separation of
instances (HoVer's gradient maps and markers), pieces at the foreground map, background hits at
the probability threshold or the size floor.

    .venv/bin/python benchmarks/bench_quality.py --routing hover --seed 9 --work runs/hover_s9
    .venv/bin/python benchmarks/bench_errors.py --work runs/hover_s9     # ~2 min a run
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import (  # noqa: E402
    MODALITIES,
    add_work_option,
    held_out_synthetic,
    machine,
    now,
    quality_run,
    real_mini,
    real_val_images,
    work_option,
    write_section,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = REPO / "runs" / "bench_quality"
#: The kinds of :class:`~cellseg_lite.metrics.ErrorKinds`: of true cells, of predicted cells.
MISSES = ("missed", "split", "merged", "outline")
EXTRAS = ("merger", "on_cell", "background")


def count_kinds(segment, images, groups) -> dict[str, Counter]:
    """Per group: the summed :class:`ErrorKinds` fields and the cell counts of ``images``
    (``(stem, image, labels)``), each image in the group ``groups[i]``."""
    from cellseg_lite import metrics

    totals: dict[str, Counter] = {}
    for (_, image, labels), group in zip(images, groups, strict=True):
        kinds = metrics.error_kinds(labels, segment(image))
        counts = Counter({k: getattr(kinds, k) for k in ("tp", *MISSES, *EXTRAS)})
        counts["images"] = 1
        counts["true"] = kinds.tp + kinds.fn
        counts["predicted"] = kinds.tp + kinds.fp
        totals.setdefault(group, Counter()).update(counts)
        totals.setdefault("all", Counter()).update(counts)
    return totals


def share(part: int, whole: int) -> str:
    return f"{part} ({100 * part / whole:.0f}%)" if whole else f"{part}"


def table(rows: list[tuple[str, str, Counter]]) -> str:
    """``(run, group, counts)`` rows: misses as shares of the true cells, extras of the
    predicted ones."""
    lines = [
        "| run | images | true cells | "
        + " | ".join(MISSES)
        + " | predicted cells | "
        + " | ".join(EXTRAS)
        + " |",
        "|" + "---|" * (4 + len(MISSES) + len(EXTRAS)),
    ]
    for run, group, c in rows:
        lines.append(
            f"| `{run}` | {group}: {c['images']} | {c['true']} | "
            + " | ".join(share(c[k], c["true"]) for k in MISSES)
            + f" | {c['predicted']} | "
            + " | ".join(share(c[k], c["predicted"]) for k in EXTRAS)
            + " |"
        )
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
    real_rows, synthetic_rows, merged_share = [], [], []
    for work in args.work:
        shown, _ = work_option(work, DEFAULT_WORK)
        segmenter = quality_run(work, "synthetic_test")
        print(f"{shown}: segmenting", flush=True)
        synthetic, classes = held_out_synthetic(work)
        classes = [f"class {c}" for c in classes]
        totals = count_kinds(segmenter.segment, real_images, real_groups)
        real_rows += [(shown, g, totals[g]) for g in (*MODALITIES, "all") if g in totals]
        c = totals["all"]
        merged_share.append((shown, c["merged"], c["true"] - c["tp"]))
        totals = count_kinds(segmenter.segment, synthetic, classes)
        synthetic_rows += [
            (shown, g, totals[g]) for g in (*(f"class {k}" for k in range(4)), "all") if g in totals
        ]
    minutes = (time.perf_counter() - start) / 60
    runs = " ".join(str(work_option(w, DEFAULT_WORK)[0]) for w in args.work)
    merged_text = "; ".join(
        f"`{run}` {merged} of {missing} ({100 * merged / max(missing, 1):.0f}%)"
        for run, merged, missing in merged_share
    )
    section = f"""## Kinds of error: what the segmenter's false negatives and false positives are

The segmenter of each `bench_quality.py` run, on the real-mini VAL images (per modality) and the
run's held-out synthetic images (per low-level class, from the true labels); errors sorted by
`metrics.error_kinds` after the challenge's matching (boundary rule, IoU 0.5). Of the true cells
left unmatched: `missed` (predictions cover less than half of it), `split` (they cover half, no
single one does), `merged` (one prediction covers half of it and half of another true cell),
`outline` (one prediction covers half of it alone, IoU still under 0.5); shares of all true cells.
Of the predicted cells left unmatched: `merger` (covers half of two or more true cells), `on_cell`
(covers half of one true cell, or lies half on true cells), `background` (neither); shares of all
predicted cells.

**Real-mini VAL**:

{table(real_rows)}

**Held-out synthetic**:

{table(synthetic_rows)}

Cells read as one among the real-mini VAL cells left unmatched: {merged_text}. Took
{minutes:.1f} minutes.

- Command: `.venv/bin/python benchmarks/bench_errors.py --work {runs}`, each folder from
  `.venv/bin/python benchmarks/bench_quality.py --minutes 27 --routing hover --seed N --work FOLDER`
- Machine: {machine("torch", "timm", "stardist")}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        write_section("bench_errors", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
