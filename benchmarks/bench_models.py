"""Benchmark: ConvNeXt-UNet speed on this CPU, and which decoder learns better in equal time.

1. Timing: forward + backward (training step without the optimiser) and forward only (inference)
   of ``cellseg_lite.unet.ConvNeXtUNet`` for convnext_atto and convnext_small with both decoder
   variants (``"code"``, ``"paper"``) on batches of 256 x 256 patches; medians of repeated runs,
   quoted per patch.
2. Decoder choice: convnext_atto with each decoder, trained from the same initial encoder on the
   same stream of synthetic patches (``cellseg_lite.synthetic``) with a foreground BCE + soft Dice
   loss, for the same wall-clock budget. The two models take turns (always stepping the one that
   has used less time), so a load spike from other processes hits both alike. Foreground Dice on
   held-out synthetic images is measured at three points of the budget, and at 16, 32, 64, ...
   steps for an equal-steps comparison.

Writes its section of ``benchmarks/RESULTS.md``. Run from the repository root::

    .venv/bin/python benchmarks/bench_models.py
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from _results import RESULTS, machine, median_seconds, now, write_section

from cellseg_lite import datasets, io, synthetic
from cellseg_lite.unet import DEFAULT_DECODER, ConvNeXtUNet

DECODERS = ("code", "paper")
CHECKPOINTS = 6  # validation at every sixth of the training budget


# --------------------------------------------------------------------------- 1. timing


def time_model(backbone: str, decoder: str, *, batch: int, size: int, repeats: int) -> dict:
    """Median seconds of one training step (forward + backward) and one inference pass."""
    torch.manual_seed(0)
    net = ConvNeXtUNet(backbone, decoder=decoder, out_channels=33)  # StarDist's 1 + 32 rays
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))

    def train_step():
        net.zero_grad(set_to_none=True)
        net(x).square().mean().backward()

    def infer():
        with torch.no_grad():
            net(x)

    net.train()
    train_s, _ = median_seconds(train_step, repeats)
    net.eval()
    infer_s, _ = median_seconds(infer, repeats)
    return {
        "backbone": backbone,
        "decoder": decoder,
        "params": net.parameter_counts()["total"],
        "train_s": train_s,
        "infer_s": infer_s,
    }


# --------------------------------------------------------------------------- 2. decoder choice


def synthetic_set(n_per_category: int, size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(image (H, W, 3) uint8 normalised, foreground (H, W) bool)`` pairs, all four categories."""
    pairs = []
    for category in range(4):
        for i in range(n_per_category):
            image, labels = synthetic.make_image(
                category, (size, size), seed=seed + 1000 * category + i
            )
            pairs.append((io.normalize_image(image), labels > 0))
    return pairs


def batch_from(pairs, rng: np.random.Generator, *, batch: int, patch: int):
    """A random batch of ``patch``-sized crops: images (B, 3, P, P) in [0, 1], masks (B, 1, P, P)."""
    images, masks = [], []
    for index in rng.integers(0, len(pairs), batch):
        image, mask = datasets.sample_patch(*pairs[index], patch, rng)
        images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
        masks.append(torch.from_numpy(mask)[None].float())
    return torch.stack(images), torch.stack(masks)


def bce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice loss (1 - Dice) on the foreground, weights 1 and 1."""
    prob = torch.sigmoid(logits)
    dice = (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + 1 - dice


@torch.no_grad()
def foreground_dice(net: ConvNeXtUNet, pairs) -> float:
    """Mean over images of the hard foreground Dice (probability >= 0.5); 1 when both are empty."""
    net.eval()
    scores = []
    for image, mask in pairs:
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        pred = (net(x)[0, 0] >= 0).numpy()  # logit >= 0 <=> probability >= 0.5
        total = pred.sum() + mask.sum()
        scores.append(1.0 if total == 0 else 2 * np.logical_and(pred, mask).sum() / total)
    net.train()
    return float(np.mean(scores))


def compare_decoders(args, seed: int, train, val) -> dict:
    """Train one convnext_atto per decoder for ``args.minutes`` of wall time each, taking turns.

    Returns, per decoder, its steps, seconds, Dice at every sixth of the budget (``checkpoints``,
    ``(step, dice)`` pairs) and at 16, 32, 64, ... steps (``at_step``).
    """
    runs = {}
    for decoder in DECODERS:
        torch.manual_seed(seed)  # the encoder is built first: same initial encoder weights
        net = ConvNeXtUNet("convnext_atto", decoder=decoder).train()
        runs[decoder] = {
            "net": net,
            "optimizer": torch.optim.AdamW(net.parameters(), lr=args.lr),
            "rng": np.random.default_rng(seed),  # same batches, in the same order, for both
            "seconds": 0.0,
            "steps": 0,
            "checkpoints": [],
            "at_step": {},
        }
    budget = 60.0 * args.minutes
    marks = [budget * k / CHECKPOINTS for k in range(1, CHECKPOINTS + 1)]
    milestones = {2**k for k in range(4, 16)}  # 16, 32, 64, ... steps: equal-steps comparison
    while any(run["seconds"] < budget for run in runs.values()):
        run = min(runs.values(), key=lambda r: r["seconds"])
        x, y = batch_from(train, run["rng"], batch=args.train_batch, patch=args.patch)
        start = time.perf_counter()
        loss = bce_dice(run["net"](x), y)
        run["optimizer"].zero_grad(set_to_none=True)
        loss.backward()
        run["optimizer"].step()
        run["seconds"] += time.perf_counter() - start
        run["steps"] += 1
        if run["steps"] in milestones:
            run["at_step"][run["steps"]] = foreground_dice(run["net"], val)
        while (
            len(run["checkpoints"]) < len(marks)
            and run["seconds"] >= marks[len(run["checkpoints"])]
        ):
            run["checkpoints"].append((run["steps"], foreground_dice(run["net"], val)))
    return runs


# --------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="timing: patches per batch")
    parser.add_argument("--size", type=int, default=256, help="timing: patch side")
    parser.add_argument("--repeats", type=int, default=5, help="timing: timed runs per figure")
    parser.add_argument(
        "--minutes", type=float, default=4.0, help="decoders: training wall time per decoder"
    )
    parser.add_argument("--patch", type=int, default=96, help="decoders: training patch side")
    parser.add_argument("--train-batch", dest="train_batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="decoders: AdamW learning rate")
    parser.add_argument(
        "--train-images", type=int, default=16, help="decoders: training images per category"
    )
    parser.add_argument(
        "--val-images", type=int, default=4, help="decoders: held-out images per category"
    )
    parser.add_argument("--seed", type=int, default=0, help="data seed, and the first model seed")
    parser.add_argument("--seeds", type=int, default=2, help="decoders: training runs per decoder")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (on a busy 2-core machine, 2 threads ran 4-5x slower than 1)",
    )
    parser.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.name}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    timings = [
        time_model(backbone, decoder, batch=args.batch, size=args.size, repeats=args.repeats)
        for backbone in ("convnext_atto", "convnext_small")
        for decoder in DECODERS
    ]
    train = synthetic_set(args.train_images, 256, seed=args.seed)
    val = synthetic_set(args.val_images, 256, seed=args.seed + 500)
    seeds = [args.seed + k for k in range(args.seeds)]
    runs = {seed: compare_decoders(args, seed, train, val) for seed in seeds}

    extra = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python benchmarks/bench_models.py", *extra])
    lines = [
        "## ConvNeXt-UNet: speed per patch, and the decoder choice",
        "",
        f"Timing: `ConvNeXtUNet(backbone, decoder=..., out_channels=33)` on a batch of {args.batch} "
        f"random {args.size} x {args.size} patches, {threads} torch thread{'s' if threads > 1 else ''}; a training step is "
        "forward + backward (no optimiser), inference is a forward pass under `no_grad` in eval mode; "
        f"median of {args.repeats} runs after one warm-up run, divided by the batch size.",
        "",
        "| backbone | decoder | parameters | train step per patch (s) | inference per patch (s) |",
        "|---|---|---|---|---|",
    ]
    for t in timings:
        lines.append(
            f"| {t['backbone']} | {t['decoder']} | {t['params']:,} | "
            f"{t['train_s'] / args.batch:.3f} | {t['infer_s'] / args.batch:.3f} |"
        )
    lines += [
        "",
        f"Decoder choice: convnext_atto from random weights (per seed, the same initial encoder for "
        f"both decoders), {args.minutes:g} min of training time each, the two models taking turns "
        f"(always the one that has used less time); AdamW lr {args.lr:g}, batches of "
        f"{args.train_batch} random {args.patch} x {args.patch} crops of {4 * args.train_images} "
        "synthetic images (per seed, the same batches in the same order for both), loss BCE + soft "
        "Dice on the foreground; validation: hard foreground Dice (p >= 0.5), mean over "
        f"{4 * args.val_images} held-out 256 x 256 synthetic images, at every sixth of the budget.",
        "",
        "| decoder | output stride | seed | steps | s per step | Dice at each sixth of the budget "
        "| mean of the last three |",
        "|---|---|---|---|---|---|---|",
    ]
    last_three = {decoder: [] for decoder in DECODERS}
    for seed, by_decoder in runs.items():
        for decoder, run in by_decoder.items():
            dice = [d for _, d in run["checkpoints"]]
            last_three[decoder].append(np.mean(dice[-3:]))
            lines.append(
                f"| {decoder} | {run['net'].output_stride} | {seed} | {run['steps']} | "
                f"{run['seconds'] / run['steps']:.2f} | {' / '.join(f'{d:.3f}' for d in dice)} | "
                f"{last_three[decoder][-1]:.3f} |"
            )
    lines += [
        "",
        "Mean over seeds of the last-three mean, equal training time: "
        + ", ".join(f"{decoder} {np.mean(values):.3f}" for decoder, values in last_three.items())
        + ".",
    ]
    every = [run for by_decoder in runs.values() for run in by_decoder.values()]
    common = sorted(set.intersection(*(set(run["at_step"]) for run in every)))
    if common:
        lines += [
            "",
            "The same runs at equal numbers of steps (mean Dice over seeds):",
            "",
            "| decoder | " + " | ".join(f"step {n}" for n in common) + " |",
            "|---|" + "---|" * len(common),
        ]
        for decoder in DECODERS:
            values = [
                np.mean([runs[seed][decoder]["at_step"][n] for seed in seeds]) for n in common
            ]
            lines.append(f"| {decoder} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    lines += [
        "",
        f"The package's default decoder (`cellseg_lite.unet.DEFAULT_DECODER`) is "
        f"`{DEFAULT_DECODER!r}`; chapter 4 says why.",
        "",
        f"{args.seeds} seed(s), a few minutes each, synthetic data, no augmentation: a check of the "
        "default on a CPU, not a result about the paper's models.",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine('torch', 'timm')} (shared with other jobs while it ran)",
        f"- Date: {now()}",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section("bench_models", section)
        print(f"\nwritten to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
