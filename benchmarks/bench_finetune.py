"""Per-class fine-tuning with the decoder's BatchNorm statistics updated or frozen.

``train.train_multistream`` fine-tunes the pre-trained model of a class's stream on that class's
images and keeps the result only if it beats the pre-trained model on the class's selection
images. In ``benchmarks/bench_quality.py`` runs the class-0 fine-tune was never kept, once with a
selection F1 of 0.219 against 0.833. The cause: the U-Net decoder has BatchNorm layers, and in
train mode they replace their running statistics (those of all classes' batches) with those of
the class's few batches; in eval mode the network then normalises with statistics it no longer
matches. This script replays the fine-tuning stage of finished ``bench_quality`` runs (their
pre-trained checkpoints, the same selection split, budget and settings:
``train.fine_tune_config``) twice per class, with the statistics updated (as before) and frozen
(``freeze_batchnorm=True``, the package's choice), and scores each model on the class's
selection images (thresholds tuned there, as the pipeline does) and on the real-mini VAL images
of that class (4-way rule on the ground truth) at those thresholds.

    .venv/bin/python benchmarks/bench_quality.py --routing validated --work runs/q0   # a run
    .venv/bin/python benchmarks/bench_finetune.py --work runs/q0 --seeds 0            # ~10 min per run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, now, real_mini, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"statistics updated": False, "statistics frozen": True}


def real_val_by_class(real) -> dict[int, list]:
    """The real-mini VAL images, loaded once as network inputs, by their 4-way class."""
    from cellseg_lite import categorize, io, train

    by_class = {c: [] for c in range(4)}
    for sample in real.val:
        image, labels = io.read_image(sample.image_path), io.read_labels(sample.label_path)
        by_class[categorize.low_level_category(image, labels)].append(sample)
    return {c: train._load_val(samples) for c, samples in by_class.items()}


def score(model, stream: str, selection: list, val: list, tta: bool) -> tuple[float, float]:
    """Challenge F1 on the selection images at the thresholds best there, and on ``val`` at those."""
    from cellseg_lite import train

    f1, thresholds = train.best_thresholds(model, stream, selection, tta=tta)  # as train does
    return f1, train.evaluate_stream(model, stream, val, [thresholds], tta=tta)[0]


def replay(work: Path, seed: int, minutes: float | None, real, real_val: dict, log) -> list[dict]:
    """Fine-tune every tunable class of one ``bench_quality`` run both ways; one row per class."""
    from cellseg_lite import datasets, train

    stages = work / "stages"
    samples = [*real.train, *datasets.find_pairs(work / "synthetic_train")]
    categories = train._sample_categories(samples)
    (samples, categories), (val_samples, val_categories) = train._split_for_selection(
        samples, categories, train.VAL_FRACTION, seed
    )
    rows = []
    for c in range(4):
        selection = [s for s, k in zip(val_samples, val_categories, strict=True) if k == c]
        class_samples = [s for s, k in zip(samples, categories, strict=True) if k == c]
        tuned_before = sorted(stages.glob(f"*_class{c}.pt"))  # {stream}_class{c}.pt
        if len(selection) < train.MIN_SELECTION_IMAGES or not tuned_before:
            continue  # the run did not fine-tune this class
        stream = tuned_before[0].name.split("_")[0]
        budget = (
            train.load_checkpoint(tuned_before[0]).config.minutes if minutes is None else minutes
        )
        pretrained = train.load_checkpoint(stages / f"{stream}_all.pt")
        sel, tta = train._load_val(selection), train.uses_tta(pretrained.config)
        row = {
            "run": work.name,
            "class": c,
            "images": (len(class_samples), len(selection), len(real_val[c])),
            "pre-trained": score(pretrained.model, stream, sel, real_val[c], tta),
        }
        for name, frozen in VARIANTS.items():
            config = train.fine_tune_config(
                pretrained.config, stream, c, len(class_samples), budget, seed
            ).replace(freeze_batchnorm=frozen)
            out = work / f"bench_finetune_class{c}_{'frozen' if frozen else 'updated'}.pt"
            started = time.perf_counter()
            train.train_stream(
                class_samples,
                config,
                val=selection,
                out=out,
                init=pretrained.path,
                categories=[c],
                progress=False,
            )
            row[name] = score(train.load_checkpoint(out).model, stream, sel, real_val[c], tta)
            log(
                f"{work.name} class {c} {name}: selection {row[name][0]:.3f}, VAL {row[name][1]:.3f} "
                f"(pre-trained {row['pre-trained'][0]:.3f}, {row['pre-trained'][1]:.3f}); "
                f"{time.perf_counter() - started:.0f} s"
            )
        rows.append(row)
    return rows


def kept(row: dict, variant: str) -> tuple[float, float]:
    """The model the pipeline keeps for the class (the fine-tuned one only if it beats the
    pre-trained one on the selection images): its selection and VAL F1."""
    return row[variant] if row[variant][0] > row["pre-trained"][0] else row["pre-trained"]


def kept_lines(rows: list[dict]) -> list[str]:
    """Per run, the real-mini VAL F1 of the kept models, mean over the fine-tuned classes' images."""
    lines = [
        "| run | VAL images | " + " | ".join(f"kept, {name}: VAL" for name in VARIANTS) + " |",
        "|---|---|" + "---|" * len(VARIANTS),
    ]
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == run]
        n = [r["images"][2] for r in mine]
        means = [
            sum(k * kept(r, name)[1] for k, r in zip(n, mine, strict=True)) / max(sum(n), 1)
            for name in VARIANTS
        ]
        lines.append(f"| {run} | {sum(n)} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return lines


def table(rows: list[dict]) -> str:
    lines = [
        "| run | class | images: train, selection, VAL | pre-trained: selection, VAL | "
        + " | ".join(f"fine-tuned, {name}: selection, VAL" for name in VARIANTS)
        + " |",
        "|---|---|---|---|" + "---|" * len(VARIANTS),
    ]
    for r in rows:
        cells = [f"{r[k][0]:.3f}, {r[k][1]:.3f}" for k in ("pre-trained", *VARIANTS)]
        lines.append(
            f"| {r['run']} | {r['class']} | {', '.join(map(str, r['images']))} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, nargs="+", required=True, help="bench_quality runs")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="their --seed")
    parser.add_argument("--minutes", type=float, help="fine-tuning budget (default: the run's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    if len(args.seeds) != len(args.work):
        parser.error("give one --seeds value per --work folder")
    for work in args.work:
        if not (work / "stages" / "hover_all.pt").is_file():
            parser.error(f"{work}: no bench_quality stages (run benchmarks/bench_quality.py)")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    real = real_mini(required=True)
    real_val = real_val_by_class(real)
    rows = []
    for work, seed in zip(args.work, args.seeds, strict=True):
        rows += replay(
            work, seed, args.minutes, real, real_val, lambda message: print(message, flush=True)
        )
    took = (time.perf_counter() - started) / 60
    command = "`.venv/bin/python benchmarks/bench_finetune.py " + " ".join(argv or sys.argv[1:])
    section = f"""## Fine-tuning one class: the decoder's BatchNorm statistics updated or frozen

The fine-tuning stage of finished `benchmarks/bench_quality.py` runs (`--routing validated`),
replayed from their pre-trained checkpoints with the same selection split, budget and settings
(`train.fine_tune_config`: a third of the `lite` learning rate, no warm-up, HoVer stream), once
with the decoder's BatchNorm layers in train mode (their running statistics follow the class's
batches: the package before this benchmark) and once frozen (`freeze_batchnorm=True`). Challenge
F1 on the class's selection images (thresholds tuned there, flip TTA as the pipeline does) and on
the real-mini VAL images of that class (4-way rule on the ground truth) at those thresholds.

{table(rows)}

The model the pipeline keeps for each class (fine-tuned only where it beats the pre-trained one on
the selection images), real-mini VAL F1 weighted by each class's VAL images:

{chr(10).join(kept_lines(rows))}

Took {took:.0f} minutes.

- Command: {command}`
- Machine: {machine("torch", "timm")}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        write_section("bench_finetune", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
