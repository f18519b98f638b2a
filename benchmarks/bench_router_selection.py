"""Which epoch of the router to keep when its validation set is small.

Inside :func:`cellseg_lite.train.train_multistream` the router trains on the pipeline's own
training images (real-mini TRAIN plus 24 synthetic images per class, as in
``benchmarks/bench_quality.py``) and keeps the epoch that does best on the selection split held
out of them: about 30 images, which a router gets all right after a few epochs. This script
trains that router (the ``lite`` settings, :func:`cellseg_lite.train.router_settings`) and
compares two ways to pick the epoch:

- the first epoch with the best selection accuracy (torchvision's recipe taken literally);
- the best accuracy with ties broken by the lower selection cross-entropy (what
  :func:`cellseg_lite.router.train_router` does).

The first is reproduced by training again for exactly that many epochs without a validation set
(the learning-rate schedule is per epoch and the run deterministic, so the weights are the same).
Both are scored on held-out synthetic images (other seeds) and on the real-mini VAL split.

With ``--swap OLD NEW`` (two ``--work`` folders of ``bench_quality.py``) it also scores OLD's
segmenter as it was and with NEW's router, on the real-mini VAL split and OLD's held-out synthetic
images: the same streams, so the difference is the routing alone.

    .venv/bin/python benchmarks/bench_router_selection.py       # about 1.5 minutes
    .venv/bin/python benchmarks/bench_router_selection.py --swap runs/bq11 runs/bq12  # +1 minute
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, now, real_mini, work_option, write_section  # noqa: E402
from bench_quality import SYNTHETIC  # noqa: E402


def accuracy(router, images, categories) -> tuple[float, list[float]]:
    """Overall accuracy and recall per class (NaN for a class without images)."""
    predicted = np.array([p.category for p in router.predict_batch(images)])
    truth = np.asarray(categories)
    per_class = [
        float(np.mean(predicted[truth == c] == c)) if np.any(truth == c) else float("nan")
        for c in range(4)
    ]
    return float(np.mean(predicted == truth)), per_class


def swap_lines(old: Path, new: Path) -> list[str]:
    """Challenge F1 of ``old``'s segmenter with its own router and with ``new``'s, per class."""
    import copy

    from bench_upscale import load_run

    from cellseg_lite import infer, io, metrics
    from cellseg_lite.categorize import low_level_category

    segmenter, sets = load_run(old)
    swapped = copy.copy(segmenter)
    swapped.router = infer.MultiStreamSegmenter.load(new / "model.pt").router
    lines = [
        "| set | router | routed to the rule's class | mean F1 | class 0 | class 1 | class 2 "
        "| class 3 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for set_name in ("real-mini VAL", "synthetic held-out"):
        images = [
            (s.stem, io.read_image(s.image_path), io.read_labels(s.label_path))
            for s in sets[set_name]
        ]
        classes = np.array([low_level_category(image, labels) for _, image, labels in images])
        for name, chosen in ((f"{old.name}'s own", segmenter), (f"{new.name}'s", swapped)):
            routed = np.array([chosen.route(image) for _, image, _ in images])
            rows = metrics.evaluate_segmenter(chosen.segment, images, categories=classes)
            f1 = np.array([r.f1 for r in rows])
            per_class = [
                f"{f1[classes == c].mean():.3f}" if np.any(classes == c) else "-" for c in range(4)
            ]
            lines.append(
                f"| {set_name} | {name} | {int(np.sum(routed == classes))} of {len(images)} "
                f"| {f1.mean():.3f} | " + " | ".join(per_class) + " |"
            )
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-per-class", type=int, default=50, help="held-out synthetic")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--swap",
        nargs=2,
        type=Path,
        metavar=("OLD", "NEW"),
        help="also score OLD's segmenter with NEW's router (bench_quality.py --work folders)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from cellseg_lite import categorize, datasets, infer, io, router, synthetic, train

    started = time.perf_counter()
    real = real_mini(required=True)
    test_images, test_categories = [], []
    for category in range(4):
        for seed in range(5000, 5000 + args.test_per_class):
            image, labels = synthetic.make_image(category, size=(256, 256), seed=seed)
            test_images.append(image)
            test_categories.append(categorize.low_level_category(image, labels))
    val_images = [io.read_image(s.image_path) for s in real.val]
    val_categories = train._sample_categories(real.val)

    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as scratch:
            synthetic.make_dataset(scratch, SYNTHETIC, size=(256, 256), seed=seed)
            samples = [*real.train, *datasets.find_pairs(scratch)]
            categories = train._sample_categories(samples)
            (fit, fit_categories), (selection, selection_categories) = train._split_for_selection(
                samples, categories, train.VAL_FRACTION, seed
            )
            fit_paths = [s.image_path for s in fit]
            selection_pair = ([s.image_path for s in selection], selection_categories)
            settings = train.router_settings("lite")
            tie_break, history = router.train_router(
                fit_paths,
                fit_categories,
                val=selection_pair,
                seed=seed,
                progress=False,
                **settings,
            )
            first_best = int(np.argmax(history.val_accuracy))
            first, first_history = router.train_router(
                fit_paths,
                fit_categories,
                seed=seed,
                progress=False,
                **{**settings, "epochs": first_best + 1},
            )
        # the rerun repeats the first epochs of the run with validation step for step
        same_run = np.allclose(first_history.step_loss, history.step_loss[: first_history.steps])
        for rule, chosen, epoch in (
            ("first epoch with the best accuracy", first, first_best),
            ("best accuracy, ties to the lowest cross-entropy", tie_break, history.best_epoch),
        ):
            synthetic_all, synthetic_per_class = accuracy(chosen, test_images, test_categories)
            val_all, _ = accuracy(chosen, val_images, val_categories)
            rows.append(
                dict(
                    seed=seed,
                    rule=rule,
                    epoch=epoch + 1,
                    selection=history.val_accuracy[epoch],
                    loss=history.val_loss[epoch],
                    synthetic=synthetic_all,
                    per_class=synthetic_per_class,
                    val=val_all,
                    same_run=same_run,
                )
            )
            print(rows[-1], flush=True)
    swap = ""
    if args.swap:
        old, new = args.swap
        shown = [work_option(folder, folder)[0] for folder in (old, new)]
        routers = [infer.MultiStreamSegmenter.load(f / "model.pt").router for f in (old, new)]
        how = [
            "with the tie-break"
            if "val_loss" in r.training.get("history", {})
            else "on accuracy alone, by code before the tie-break"
            for r in routers
        ]
        swap = f"""
The segmenter of `{shown[0]}` (from `bench_quality.py`; its router's epoch chosen {how[0]})
scored as it was and with the router of `{shown[1]}` (chosen {how[1]}), challenge F1: the streams
are the same, so the difference is the routing alone.

{chr(10).join(swap_lines(old, new))}
"""
    minutes = (time.perf_counter() - started) / 60

    lines = [
        "| seed | rule | kept epoch | selection accuracy | selection cross-entropy "
        "| held-out synthetic | class 0 | class 1 | class 2 | class 3 | real-mini VAL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['rule']} | {r['epoch']} of {settings['epochs']} "
            f"| {r['selection']:.3f} | {r['loss']:.4f} | {r['synthetic']:.3f} | "
            + " | ".join(f"{v:.2f}" for v in r["per_class"])
            + f" | {r['val']:.3f} |"
        )
    means = {}
    for rule in dict.fromkeys(r["rule"] for r in rows):
        mine = [r for r in rows if r["rule"] == rule]
        means[rule] = float(np.mean([r["synthetic"] for r in mine]))
        lines.append(
            f"| mean | {rule} | | | | {means[rule]:.3f} | "
            + " | ".join(f"{np.mean([r['per_class'][c] for r in mine]):.2f}" for c in range(4))
            + f" | {np.mean([r['val'] for r in mine]):.3f} |"
        )
    first_mean, tie_mean = means.values()
    later = sum(b["epoch"] > a["epoch"] for a, b in zip(rows[::2], rows[1::2], strict=True))
    verdict = (
        f"The tie-break kept a later epoch than the first best in {later} of {len(args.seeds)} "
        f"runs; held-out synthetic accuracy {first_mean:.3f} with the first best epoch, "
        f"{tie_mean:.3f} with the tie-break "
        + (
            "(`router.train_router` breaks ties this way)."
            if tie_mean >= first_mean
            else "(worse: the tie-break of `router.train_router` should be revisited)."
        )
    )
    command = (
        ""
        if not args.swap
        else " --swap " + " ".join(str(work_option(folder, folder)[0]) for folder in args.swap)
    )
    reruns = "yes" if all(r["same_run"] for r in rows) else "NO: the comparison is not exact"
    n_selection = len(selection_pair[1])
    section = f"""## Router: which epoch to keep when the validation set is small

The router of `train.train_multistream`, trained as there (`lite` settings: 64-pixel crops,
SGD 0.01, {settings["epochs"]} epochs) on the real-mini TRAIN images and {SYNTHETIC} synthetic
images per class less the selection split ({n_selection} images, 12% of each class), which
chooses the epoch. Scored on {4 * args.test_per_class} held-out synthetic images (seeds 5000+;
recall per class) and the 40 real-mini VAL images (classes 0 and 3 only). The first rule is
reproduced by training again for its number of epochs without validation (same losses step for
step: {reruns}).

{chr(10).join(lines)}

{verdict}
{swap}
Took {minutes:.1f} minutes.

- Command: `.venv/bin/python benchmarks/bench_router_selection.py{command}`
- Machine: {machine("torch", "torchvision")}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        write_section("bench_router_selection", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
