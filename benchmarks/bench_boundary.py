"""What the challenge's boundary rule costs trained segmenters: matches it breaks at the frame.

The challenge removes every cell within ``metrics.BOUNDARY_WIDTH`` (2) pixels of the image border,
from the truth and from the prediction separately, before matching. A true cell three pixels from
the border whose predicted outline reaches the border is then a false negative although the two
overlap well (IoU >= 0.5); a true cell on the border whose prediction stops short of it leaves a
false positive. This script counts both on the real-mini VAL split and the held-out synthetic set
of ``benchmarks/bench_quality.py`` runs (``--work``), with the lost pairs whose true cell lies
:data:`FAR` pixels or more inside (not a pixel of outline: a merge with something at the frame),
and scores each set three ways:

- as the challenge scores it;
- as it would score if every broken pair had agreed about the border (an upper bound of what
  fixing the frame could give, not a method);
- with no context, and with ``--pad`` pixels of mirrored context around the image before
  segmenting, cropped back afterwards (the segmenter's ``mirror_context``, 16 by default;
  ``--pad 0`` leaves this variant out): does context at the frame make the prediction stop
  where the truth does?

    .venv/bin/python benchmarks/bench_quality.py --routing hover --work runs/a   # trains
    .venv/bin/python benchmarks/bench_boundary.py --work runs/a runs/b         # 1-2 min each
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import MODALITIES, machine, now, quality_run, real_mini, work_option, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IOU = 0.5
#: A lost pair whose true cell stops this many pixels or more from the edge did not lose its
#: prediction to a pixel or two of outline: the prediction took in something that reaches the
#: frame, such as a neighbour that the frame cuts.
FAR = 5


def kept_ids(labels: np.ndarray) -> set[int]:
    """Ids of ``labels`` that the challenge's boundary rule keeps."""
    from cellseg_lite import metrics

    return set(np.unique(labels[metrics.remove_boundary_cells(labels) > 0]).tolist())


def overlapping_pairs(truth: np.ndarray, pred: np.ndarray) -> list[tuple[int, int]]:
    """``(true id, predicted id)`` pairs with IoU >= 0.5 on the whole image (one partner each)."""
    from cellseg_lite import metrics

    # metrics' own pair table, with no frame dropped; it numbers the cells in id order
    _, _, true_index, pred_index, iou = metrics._pair_table(truth, pred, 0, truth.shape)
    above = iou >= IOU
    true_ids, pred_ids = (ids[ids > 0] for ids in (np.unique(truth), np.unique(pred)))
    return list(
        zip(true_ids[true_index[above]].tolist(), pred_ids[pred_index[above]].tolist(), strict=True)
    )


def edge_distance(mask: np.ndarray) -> int:
    """Pixels between ``mask`` and the nearest image edge (0: it touches the edge)."""
    rows, cols = np.nonzero(mask)
    height, width = mask.shape
    return int(min(rows.min(), cols.min(), height - 1 - rows.max(), width - 1 - cols.max()))


def broken_pairs(truth: np.ndarray, pred: np.ndarray) -> tuple[int, int, int]:
    """``(lost, left, far)``: pairs whose true cell the rule keeps and whose prediction it drops
    (a false negative), pairs whose true cell it drops and whose prediction it keeps (a false
    positive), and the lost pairs whose true cell lies :data:`FAR` pixels or more from the edge."""
    true_kept, pred_kept = kept_ids(truth), kept_ids(pred)
    lost = left = far = 0
    for t, p in overlapping_pairs(truth, pred):
        if t in true_kept and p not in pred_kept:
            lost += 1
            far += edge_distance(truth == t) >= FAR
        left += t not in true_kept and p in pred_kept
    return lost, left, far


def scores(truth: np.ndarray, pred: np.ndarray) -> dict:
    """F1 as the challenge scores it, and with the broken pairs agreeing about the border."""
    from cellseg_lite import metrics

    m = metrics.match(truth, pred)
    lost, left, far = broken_pairs(truth, pred)
    # a lost pair becomes a match (its prediction kept); a left one goes (its prediction dropped)
    n_true, n_pred, tp = m.n_true, m.n_pred + lost - left, m.tp + lost
    agreed = 2 * tp / (n_true + n_pred) if tp else 0.0
    return {"f1": m.f1, "agreed": agreed, "tp": m.tp, "lost": lost, "far": far, "left": left}


def with_context(segmenter, pad: int):
    """``segmenter`` with ``pad`` pixels of mirrored context around each image (its
    ``mirror_context``; 0: none), the weights shared."""
    other = copy.copy(segmenter)
    other.mirror_context = pad
    return other


def evaluate(work: Path, real, pad: int) -> dict:
    """``{(set, group): [per-image score dicts]}`` for one run, plain and (with ``pad``) padded."""
    from cellseg_lite import datasets, io
    from cellseg_lite.categorize import low_level_category

    segmenter = quality_run(work, "synthetic_test")
    plain, padded = with_context(segmenter, 0), with_context(segmenter, pad)
    syn_test = work / "synthetic_test"
    sets = {
        "real-mini val": [(s, real.modality[s.stem]) for s in real.val],
        "synthetic held-out": [(s, None) for s in datasets.find_pairs(syn_test)],
    }
    out: dict = {}
    started = time.perf_counter()
    for set_name, items in sets.items():
        for sample, group in items:
            image, truth = io.read_image(sample.image_path), io.read_labels(sample.label_path)
            if group is None:  # synthetic: the 4-way rule on the truth, as bench_quality groups
                group = low_level_category(image, truth)
            out.setdefault(("plain", set_name, group), []).append(
                scores(truth, plain.segment(image))
            )
            if pad:
                out.setdefault(("padded", set_name, group), []).append(
                    scores(truth, padded.segment(image))
                )
    print(f"{work}: {time.perf_counter() - started:.0f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work",
        type=Path,
        nargs="+",
        default=[REPO / "runs" / "bench_quality"],
        help="bench_quality work folders (each with model.pt and its synthetic data)",
    )
    parser.add_argument(
        "--pad", type=int, default=16, help="pixels of mirrored context (0: no padded variant)"
    )
    parser.add_argument("--routing", default="hover", help="the runs' --routing (for the text)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    if args.pad < 0:
        parser.error("--pad: expected 0 or more pixels")
    torch.set_num_threads(args.threads)
    from cellseg_lite.metrics import BOUNDARY_WIDTH

    real = real_mini(required=True)
    runs = {work: evaluate(work, real, args.pad) for work in args.work}

    def shown(work: Path) -> str:
        return str(work_option(work, REPO / "runs" / "bench_quality")[0])

    groups = {"real-mini val": list(MODALITIES), "synthetic held-out": [0, 1, 2, 3]}
    variants = ["plain", "padded"] if args.pad else ["plain"]
    tables = []
    for set_name, names in groups.items():
        heads = [f"class {g}" if isinstance(g, int) else g for g in names]
        lines = [
            f"| run | input | matches | lost at the frame | of which the truth {FAR}+ px inside | "
            "left at the frame | F1 | F1, pairs agreeing | " + " | ".join(heads) + " |",
            "|" + "---|" * (8 + len(names)),
        ]
        for work, out in runs.items():
            for variant in variants:
                rows = [r for g in names for r in out.get((variant, set_name, g), [])]
                per = [
                    np.mean([r["f1"] for r in out[(variant, set_name, g)]])
                    if out.get((variant, set_name, g))
                    else float("nan")
                    for g in names
                ]
                label = "no context" if variant == "plain" else f"{args.pad} px mirrored context"
                lines.append(
                    f"| `{shown(work)}` | {label} | {sum(r['tp'] for r in rows)} | "
                    f"{sum(r['lost'] for r in rows)} | {sum(r['far'] for r in rows)} | "
                    f"{sum(r['left'] for r in rows)} | "
                    f"{np.mean([r['f1'] for r in rows]):.3f} | "
                    f"{np.mean([r['agreed'] for r in rows]):.3f} | "
                    + " | ".join(f"{v:.3f}" for v in per)
                    + " |"
                )
        what = "modality" if set_name == "real-mini val" else "low-level class (4-way rule)"
        tables.append(
            f"**{set_name}** (challenge F1 per {what} in the last columns)\n\n" + "\n".join(lines)
        )
    commands = " ".join(shown(w) for w in args.work)
    pad_flag = "" if args.pad == 16 else f" --pad {args.pad}"
    section = f"""## The boundary rule at the frame: matches it breaks

Segmenters written by `bench_quality.py --routing {args.routing}` runs, scored with the challenge's
rule (cells within {BOUNDARY_WIDTH} pixels of the border removed from truth and prediction separately). A
pair of a true and a predicted cell with IoU >= 0.5 on the whole image is *lost at the frame*
when the rule keeps the true cell and drops the prediction (a false negative), and *left at the
frame* when it drops the true cell and keeps the prediction (a false positive). "F1, pairs
agreeing" scores each image as if every broken pair had agreed about the border: an upper bound
of what the frame costs, not a method. "Matches" counts the true positives as scored. "Of which
the truth {FAR}+ px inside" counts the lost pairs whose true cell stops {FAR} pixels or more from the
edge: their prediction did not overshoot by a pixel or two of outline, it took in something that
reaches the frame, such as a neighbour that the frame cuts.

{chr(10).join(t + chr(10) for t in tables)}
- Command: `.venv/bin/python benchmarks/bench_boundary.py{pad_flag} --work {commands}`, each folder
  from `.venv/bin/python benchmarks/bench_quality.py --minutes 27 --routing {args.routing} --work FOLDER`
- Machine: {machine("torch", "timm", "stardist")}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        write_section("bench_boundary", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
