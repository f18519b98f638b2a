"""Variants of the `lite` training recipe: which spends a few CPU minutes best, and how noisy is it?

Trains the HoVer stream (``train.train_stream``, `lite` preset, from scratch) for the same
wall-time budget on the real-mini TRAIN split plus 48 synthetic images, once per variant and seed,
and scores the weights it exports on the real-mini VAL split (challenge F1, mean of per-image F1)
at the post-processing settings best there (the grid of ``train.evaluate_stream``: probability
and marker thresholds), and on 40 held-out synthetic images at the same settings. There is no
validation inside the budget, so a run exports its last weights, or their moving average.

Variants (``--variants``): ``last`` (the lite preset: the last raw weights), ``ema`` (a moving
average of the weights, ``ema_decay=0.99`` per step), ``code-decoder`` (the authors' decoder,
output stride 2 instead of 4: its own RESULTS section), ``femto`` and ``pico`` (wider encoders
than the lite preset's convnext_atto: their own section); and the precision of the training step: ``float32``, ``bf16``
(autocast forward pass, the loss in float32, as ``train`` does) and ``bf16-loss`` (the loss
computed in bf16 as well, as ``train`` did before the fix: what that cost). Precision variants go
to their own RESULTS section; so do the learning-rate schedules ``steps``, ``linear`` and ``cosine``
(``TrainConfig.lr_schedule``: the halvings at 50 % and 80 % of the budget that the preset had
before, and decays to zero over the budget; ``linear`` is what the preset now does); and
``contact``, the HV terms of the loss weighted up where cells touch (``TrainConfig.contact_weight``,
:func:`cellseg_lite.streams.hover.contact_weights`), with the share of true cells merged with a
neighbour (:func:`cellseg_lite.metrics.error_kinds`) beside each score.

    .venv/bin/python benchmarks/bench_lite_recipe.py                 # 5 minutes per run, ~27 in all
    .venv/bin/python benchmarks/bench_lite_recipe.py --minutes 2 --seeds 0 --no-write
    .venv/bin/python benchmarks/bench_lite_recipe.py --minutes 3 --variants bf16-loss bf16 float32
    .venv/bin/python benchmarks/bench_lite_recipe.py --minutes 4 --variants last code-decoder
    .venv/bin/python benchmarks/bench_lite_recipe.py --minutes 12 --variants last pico --seeds 0
    .venv/bin/python benchmarks/bench_lite_recipe.py --minutes 4 --variants steps linear cosine
    .venv/bin/python benchmarks/bench_lite_recipe.py --minutes 5 --variants last contact --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import MODALITIES, machine, now, real_mini, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EMA_DECAY = 0.99
CONTACT_WEIGHT = 4.0
VARIANTS = {
    "last": {},
    "ema": {"ema_decay": EMA_DECAY},
    "code-decoder": {"decoder": "code"},
    "femto": {"backbone": "convnext_femto"},
    "pico": {"backbone": "convnext_pico"},
    "float32": {"amp": False},
    "bf16": {"amp": True},
    "bf16-loss": {"amp": True},
    "steps": {"lr_schedule": "step", "lr_milestones": (0.5, 0.8)},
    "linear": {"lr_schedule": "linear"},
    "cosine": {"lr_schedule": "cosine"},
    "contact": {"contact_weight": CONTACT_WEIGHT},
}
# RESULTS section of a run: the first group that one of its variants belongs to
SECTIONS = (
    (("float32", "bf16", "bf16-loss"), "precision of the training step", "bench_lite_precision"),
    (("code-decoder",), "decoder", "bench_lite_decoder"),
    (("femto", "pico"), "encoder", "bench_lite_backbone"),
    (("steps", "linear", "cosine"), "learning-rate schedule", "bench_lite_schedule"),
    (("contact",), "HoVer loss at the contacts between cells", "bench_lite_contact"),
)
DESCRIPTIONS = {
    "last": "`last` (the `lite` preset) exports the last raw weights",
    "ema": f"`ema` their moving average (`ema_decay={EMA_DECAY}` per step, "
    "`torch.optim.swa_utils.AveragedModel` with BatchNorm statistics)",
    "code-decoder": "`code-decoder` uses the authors' decoder (output stride 2)",
    "femto": "`femto` a wider encoder, convnext_femto (dims 48-384, 6.4 M parameters in all against the lite network's 4.7 M)",
    "pico": "`pico` a wider and deeper encoder, convnext_pico (dims 64-512, 10.5 M parameters in all against the lite network's 4.7 M)",
    "steps": "`steps` halves the learning rate at 50 % and 80 % of the budget "
    '(`lr_schedule="step"`, `lr_milestones=(0.5, 0.8)`: the `lite` preset before)',
    "linear": "`linear` lowers it from 1e-3 to zero over the budget "
    '(`lr_schedule="linear"`, the `lite` preset now)',
    "cosine": '`cosine` lowers it to zero along a half cosine (`lr_schedule="cosine"`)',
    "contact": f"`contact` weights the MSE and MSGE terms up to {1 + CONTACT_WEIGHT:g}x where cells "
    f"touch (`contact_weight={CONTACT_WEIGHT:g}`, a Gaussian band of sigma "
    "`hover.CONTACT_SIGMA` = 2 pixels around each contact)",
    "float32": "`float32` trains without autocast",
    "bf16": "`bf16` runs the forward pass under bf16 autocast and the loss in float32 "
    "(what `train` does)",
    "bf16-loss": "`bf16-loss` computes the loss in bf16 too, on the bf16 outputs (what `train` did "
    "before the fix; this script reproduces it by wrapping `train._loss`)",
}


@contextlib.contextmanager
def loss_in_bf16(enabled: bool):
    """Train as before the fix: the loss from the bf16 outputs, without casting them to float32."""
    from cellseg_lite import train

    if not enabled:
        yield
        return
    float32_loss = train._loss

    def bf16_loss(config, outputs, batch):  # train._loss without its cast to float32
        from cellseg_lite.streams import hover

        assert config.stream == "hover", "this script trains the HoVer stream"
        return hover.loss(*outputs, batch["foreground"], batch["hv"])

    train._loss = bf16_loss
    try:
        yield
    finally:
        train._loss = float32_loss


def scored(model, images, thresholds) -> tuple[dict[str, float], float]:
    """Per-image challenge F1 of the HoVer ``model`` at ``thresholds`` on ``(stem, image, labels)``,
    and the share of all true cells merged with a neighbour; one matching per image."""
    from cellseg_lite import metrics, train

    f1, merged, true_cells = {}, 0, 0
    for stem, image, labels in images:
        predicted = train.segment_maps("hover", train.predict_maps(model, image), thresholds)
        kinds = metrics.error_kinds(labels, predicted)
        f1[stem] = kinds.f1  # the challenge F1 from the same matching
        merged += kinds.merged
        true_cells += kinds.tp + kinds.fn
    return f1, merged / max(true_cells, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget of each run")
    parser.add_argument("--variants", nargs="+", default=["last", "ema"], choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_lite_recipe")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from cellseg_lite import datasets, synthetic, train

    real = real_mini(required=True)
    syn_train, syn_test = args.work / "synthetic_train", args.work / "synthetic_test"
    synthetic.make_dataset(syn_train, 12, size=(256, 256), seed=0)
    synthetic.make_dataset(syn_test, 10, size=(256, 256), seed=1000)
    samples = [*real.train, *datasets.find_pairs(syn_train)]
    val = train._load_val(real.val)
    held_out = train._load_val(datasets.find_pairs(syn_test))

    lines, by_variant = [], {}
    for variant in args.variants:
        for seed in args.seeds:
            config = train.preset(
                "lite", stream="hover", pretrained=False, minutes=args.minutes, seed=seed,
                val_every=10**6, **VARIANTS[variant],  # no validation inside the budget
            )  # fmt: skip
            started = time.perf_counter()
            with loss_in_bf16(variant == "bf16-loss"):
                model, history = train.train_stream(samples, config, progress=False)
            seconds = time.perf_counter() - started
            f1, thresholds = train.evaluate_stream(
                model, "hover", val, train._threshold_grid("hover")
            )
            per_image, merged = scored(model, val, thresholds)
            synthetic_per_image, synthetic_merged = scored(model, held_out, thresholds)
            synthetic_f1 = float(np.mean(list(synthetic_per_image.values())))
            per = [
                np.mean([v for s, v in per_image.items() if real.modality[s] == m])
                for m in MODALITIES
            ]
            by_variant.setdefault(variant, []).append((f1, synthetic_f1, merged, synthetic_merged))
            line = (
                f"| {variant} | {seed} | {history.steps} | {seconds / max(history.steps, 1):.2f} | "
                f"**{f1:.3f}** | "
                + " | ".join(f"{v:.3f}" for v in per)
                + f" | {synthetic_f1:.3f} | {merged:.1%} | {synthetic_merged:.1%} | "
                f"{thresholds['prob_thresh']}, {thresholds['marker_threshold']} |"
            )
            print(line, flush=True)
            lines.append(line)

    summary = [
        f"| {variant} | {np.mean([r[0] for r in runs]):.3f} "
        f"({', '.join(f'{r[0]:.3f}' for r in runs)}) | {np.mean([r[1] for r in runs]):.3f} | "
        f"{np.mean([r[2] for r in runs]):.1%} | {np.mean([r[3] for r in runs]):.1%} |"
        for variant, runs in by_variant.items()
    ]
    title, key = next(
        ((title, key) for group, title, key in SECTIONS if set(group) & set(args.variants)),
        ("recipe", "bench_lite_recipe"),
    )
    section = f"""## The `lite` {title}: {args.minutes:g} CPU minutes of HoVer per run

The HoVer stream trained from scratch (`lite`: convnext_atto, 128-pixel patches, batch 8, AdamW
1e-3, the paper's augmentations) for {args.minutes:g} minutes of wall time on the 156 real-mini
TRAIN images and 48 synthetic ones, no validation inside the budget; the weights it exports
scored on the 40 real-mini VAL images (challenge F1, mean of per-image F1) at the probability and
marker thresholds best there (`train._threshold_grid("hover")`), and on 40 held-out synthetic
images (seed 1000) at the same thresholds. Variants: {"; ".join(DESCRIPTIONS[v] for v in args.variants)}.
Seconds per step include the data pipeline. *Merged*: the share of all true cells left unmatched
because one predicted cell covers half of it and half of a neighbour (`metrics.error_kinds`).

| variant | seed | steps | s / step | val F1 | {" | ".join(MODALITIES)} | synthetic F1 | merged (val) | merged (synthetic) | thresholds (prob, marker) |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}

Mean over seeds (val F1 of each run in brackets):

| variant | val F1 | synthetic F1 | merged (val) | merged (synthetic) |
|---|---|---|---|---|
{chr(10).join(summary)}

- Command: `.venv/bin/python benchmarks/bench_lite_recipe.py --minutes {args.minutes:g} --variants {" ".join(args.variants)} --seeds {" ".join(map(str, args.seeds))}`
- Machine: {machine("torch", "timm", "stardist")}; bf16 on CPU: {train.cpu_has_bf16()}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        write_section(key, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
