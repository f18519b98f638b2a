"""Benchmark: train the router on CPU within a time budget, then measure its accuracy.

Trains ``cellseg_lite.router`` from scratch on synthetic images of the four
low-level classes (``synthetic.make_image``) plus the TRAIN split of real-mini
(``/work/shared/data/real-mini``, or ``$CELLSEG_REAL_MINI``), every image
labelled by ``categorize.low_level_category`` on its true instance labels.
Then scores it on held-out synthetic images (other seeds) and on the real-mini
VAL split, per class, with and without the one-channel rule, and writes the
figures and confusion matrices to ``benchmarks/RESULTS.md`` between this
script's own markers. The trained router is saved to
``data/generated/router.pt`` for the router chapter to reuse.

Run from the repository root::

    .venv/bin/python benchmarks/bench_router.py            # at most 10 minutes of training
    .venv/bin/python benchmarks/bench_router.py --minutes 3 --no-write
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _results import RESULTS, machine, now, write_section

from cellseg_lite import categorize, io, router, synthetic

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "data" / "generated" / "router.pt"


def real_mini_root() -> Path:
    env = os.environ.get("CELLSEG_REAL_MINI")
    return Path(env) if env else REPO.parent / "shared" / "data" / "real-mini"


def synthetic_set(per_class: int, size: int, first_seed: int) -> tuple[list, list[int]]:
    """``per_class`` images of each class, seeds ``first_seed ...``, labelled by the 4-way rule."""
    images, categories = [], []
    for category in range(4):
        for seed in range(first_seed, first_seed + per_class):
            image, labels = synthetic.make_image(category, size=(size, size), seed=seed)
            images.append(image)
            categories.append(categorize.low_level_category(image, labels))
    return images, categories


def real_split(root: Path, split: str) -> tuple[list, list[int], list[dict]]:
    """The real-mini images of one ``split``, their rule classes and manifest rows."""
    with open(root / "manifest.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["split"] == split]
    images, categories = [], []
    for row in rows:
        image = io.read_image(root / "images" / row["file"])
        labels = io.read_labels(root / "labels" / f"{row['stem']}_label.tiff")
        images.append(image)
        categories.append(categorize.low_level_category(image, labels))
    return images, categories, rows


def confusion(y_true, y_pred) -> np.ndarray:
    """``(4, 4)`` counts: row = rule class, column = routed class."""
    matrix = np.zeros((4, 4), int)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def accuracy_table(sets: dict[str, tuple[list[int], dict[bool, list[int]]]]) -> str:
    """Markdown: overall and per-class accuracy of each evaluation set, rule on and off."""
    lines = [
        "| set | channel_rule | overall | class 0 | class 1 | class 2 | class 3 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (y_true, predictions) in sets.items():
        y_true = np.asarray(y_true)
        for rule in (True, False):
            y_pred = np.asarray(predictions[rule])
            cells = [f"{np.mean(y_pred == y_true):.1%} ({np.sum(y_pred == y_true)}/{len(y_true)})"]
            for c in range(4):
                mask = y_true == c
                cells.append(
                    f"{np.mean(y_pred[mask] == c):.1%} ({mask.sum()})" if mask.any() else "-"
                )
            lines.append(f"| {name} | {'on' if rule else 'off'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matrix_text(matrix: np.ndarray) -> str:
    lines = ["| rule \\ routed | 0 | 1 | 2 | 3 |", "|---|---|---|---|---|"]
    for c in range(4):
        lines.append(f"| {c} | " + " | ".join(str(v) for v in matrix[c]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    parser.add_argument("--per-class", type=int, default=200, help="synthetic training images")
    parser.add_argument("--test-per-class", type=int, default=100, help="held-out synthetic")
    parser.add_argument("--size", type=int, default=256, help="synthetic image side")
    parser.add_argument("--resize", type=int, default=80, help="short side after resizing")
    parser.add_argument("--crop", type=int, default=64, help="side of the network's input")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--step-size", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (results are reproducible for a given seed and thread count; on a "
        "shared 2-core machine one thread was several times faster than two)",
    )
    parser.add_argument("--out", type=Path, default=CHECKPOINT, help="where to save the router")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.name}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    root = real_mini_root()
    if not (root / "manifest.csv").is_file():
        print(f"real-mini not found at {root}", file=sys.stderr)
        return 1

    t0 = time.perf_counter()
    syn_images, syn_categories = synthetic_set(args.per_class, args.size, first_seed=0)
    test_images, test_categories = synthetic_set(args.test_per_class, args.size, 100_000)
    real_images, real_categories, _ = real_split(root, "train")
    val_images, val_categories, val_rows = real_split(root, "val")
    data_seconds = time.perf_counter() - t0
    for name, images, categories in [
        ("synthetic train", syn_images, syn_categories),
        ("synthetic test", test_images, test_categories),
        ("real-mini train", real_images, real_categories),
        ("real-mini val", val_images, val_categories),
    ]:
        print(f"{name}: {len(images)} images, classes {np.bincount(categories, minlength=4)}")

    preprocessing = router.Preprocessing(resize=args.resize, crop=args.crop)
    trained, history = router.train_router(
        syn_images + real_images,
        syn_categories + real_categories,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        step_size=args.step_size,
        seed=args.seed,
        device="cpu",
        minutes=args.minutes,
        preprocessing=preprocessing,
        progress=False,
        on_epoch=lambda epoch, h: print(
            f"epoch {epoch + 1}: loss {h.loss[-1]:.4f}, train accuracy {h.accuracy[-1]:.3f}, "
            f"lr {h.lr[-1]:g}, {h.steps} steps, {time.perf_counter() - t0:.0f} s",
            flush=True,
        ),
    )
    trained.save(args.out)

    t1 = time.perf_counter()
    results = {}
    for name, images, categories in [
        ("synthetic held-out", test_images, test_categories),
        ("real-mini val", val_images, val_categories),
    ]:
        routed = {rule: trained.predict_batch(images, channel_rule=rule) for rule in (True, False)}
        predictions = {rule: [p.category for p in routed[rule]] for rule in routed}
        results[name] = (categories, predictions)
        if name == "real-mini val":
            val_routed = routed
    predict_seconds = time.perf_counter() - t1
    table = accuracy_table(results)
    print(table)

    misrouted = []
    for rule in (True, False):
        for row, truth, result in zip(val_rows, val_categories, val_routed[rule], strict=True):
            if result.category != truth:
                shade = io.normalize_image(val_images[val_rows.index(row)]).mean()
                misrouted.append(
                    f"- channel_rule {'on' if rule else 'off'}: `{row['stem']}` ({row['modality']}, "
                    f"{row['channels']} channel{'s' if row['channels'] != '1' else ''}, "
                    f"{row['dtype']}, {row['height']} x {row['width']}), "
                    f"rule class {truth}, routed to {result.category} "
                    f"(p = {np.round(result.probabilities, 3).tolist()}; mean intensity after "
                    f"normalisation {shade:.0f} of 255)"
                )
    note = (
        "\nOne-channel images misrouted this way are worth a look: a nearly empty fluorescence\n"
        "field (a few nuclei on a dark background) has a mid-gray mean after normalisation,\n"
        "because the percentile rule stretches its camera noise over 0-255, and then looks like\n"
        "a gray class 1 image. The channel rule routes such images correctly.\n"
        if any(" 1 channel," in line for line in misrouted)
        else ""
    )
    phase = [i for i, row in enumerate(val_rows) if row["modality"] == "phase-contrast"]
    phase_text = ", ".join(str(val_routed[False][i].category) for i in phase)
    matrices = "\n\n".join(
        f"**{name}, channel_rule {'on' if rule else 'off'}**\n\n"
        + matrix_text(confusion(results[name][0], results[name][1][rule]))
        for name in results
        for rule in (True, False)
    )
    counts = np.bincount(syn_categories + real_categories, minlength=4).tolist()
    agreed = sum(c == i // args.per_class for i, c in enumerate(syn_categories))
    val_counts = np.bincount(val_categories, minlength=4).tolist()
    command = " ".join(
        ["benchmarks/bench_router.py", *(argv if argv is not None else sys.argv[1:])]
    )
    saved = args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out
    stop = "stopped by the time budget" if history.stopped_early else "all epochs ran"
    text = f"""## Router: ResNet18 trained from scratch on CPU

**Data.** Training: {len(syn_images)} synthetic images ({args.per_class} per class,
{args.size} x {args.size}, seeds 0-{args.per_class - 1}) and the {len(real_images)} real-mini TRAIN
images, classes 0-3 = {counts}, every image labelled by `categorize.low_level_category` on its
true instance labels (it agreed with the generator's intended class on {agreed}/{len(syn_categories)}
synthetic images). Held out: {len(test_images)} synthetic images (seeds from 100000) and the
{len(val_images)} real-mini VAL images (classes 0-3 = {val_counts}: real-mini holds fluorescence and
phase-contrast images, one channel, and stained/brightfield RGB images that the rule puts in class 3;
it has no class 1 or 2 image).

**Recipe**, changed from the paper for a 2-core CPU: random initialisation (`pretrained=False`:
no weights offline; the authors' code also trains from scratch); input resized to {args.resize}
and centre-cropped to {args.crop} pixels (paper 256 / 224: {(224 / args.crop) ** 2:.0f}x fewer
operations per image); SGD lr {args.lr:g} (paper 1e-3, too slow from random weights in a few
epochs), momentum 0.9, x0.1 every {args.step_size} epochs (paper 7), at most {args.epochs} epochs
(paper 20), batch {args.batch_size} (paper 64), class-balanced sampling (paper: none stated); the
paper's augmentations (random resized crop of 80-100% of the area, rotation up to 15 degrees,
horizontal flip); a budget of {args.minutes:g} minutes.

**Training** took **{history.seconds / 60:.1f} minutes** of CPU ({len(history.loss)} epochs,
{history.steps} steps, {stop}), plus {history.prepare_seconds:.0f} s to cache the images;
generating and reading the data took {data_seconds:.0f} s and routing the
{len(test_images) + len(val_images)} evaluation images twice {predict_seconds:.0f} s. Last epoch:
loss {history.loss[-1]:.4f}, accuracy on the augmented training batches {history.accuracy[-1]:.1%}.

**Accuracy** (per class: recall, with the class's image count in brackets; targets: >= 99% on the
synthetic held-out set, >= 97% on real-mini VAL):

{table}

With `channel_rule` on, one-channel images are class 0 by definition and never reach the network.
Without it the network must recognise them by appearance; the two real-mini VAL phase-contrast
images (16-bit, one channel, rule class 0, looking much like synthetic class 1) were routed to
classes {phase_text}. Misrouted real-mini VAL images:

{chr(10).join(misrouted) if misrouted else "- none"}
{note}
**Confusion matrices** (rows: rule class, columns: routed class):

{matrices}

- Command: `.venv/bin/python {command}`
- Machine: {machine("torch", "torchvision")}, torch threads: {torch.get_num_threads()}; shared with
  other jobs while it ran, so the times are upper bounds
- Date: {now()}
- The trained router is saved to `{saved}`
"""
    if not args.no_write:
        write_section("bench_router", text)
        print(f"updated {RESULTS}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
