"""The sliding window's stride at inference: challenge F1 and time on the real-mini VAL images.

Loads the multi-stream segmenter that ``benchmarks/bench_quality.py`` wrote (``--work``, by
default ``runs/bench_quality``) and segments the 40 real-mini VAL images with tiles of 512
pixels every ``--strides`` pixels (``MultiStreamSegmenter(stride=...)``), the same weights and
thresholds. 384 is the paper's step (and the window that ``train`` tunes the thresholds on), 256
the authors' HoVer code. F1 comes from one pass over all images; the time of the largest images
is the median of ``--repeats`` runs, against the challenge's tolerance.

    .venv/bin/python benchmarks/bench_quality.py --routing validated   # trains the segmenter
    .venv/bin/python benchmarks/bench_window.py                         # about 4 minutes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import (  # noqa: E402
    MODALITIES,
    machine,
    mean,
    median_seconds,
    now,
    real_mini,
    work_option,
    write_section,
)

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from cellseg_lite import infer, io, metrics

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_quality")
    parser.add_argument("--strides", type=int, nargs="+", default=[256, 384])
    parser.add_argument("--largest", type=int, default=2, help="images timed repeatedly")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if any(not 0 < s <= 512 for s in args.strides):
        parser.error("--strides: each must be in 1-512 (the tile is 512)")
    model_path = args.work / "model.pt"
    if not model_path.is_file():
        raise SystemExit(
            f"{args.work}: no trained segmenter; run benchmarks/bench_quality.py first"
        )
    real = real_mini(required=True)
    segmenter = infer.MultiStreamSegmenter.load(model_path)
    images = [
        (io.image_stem(p.image_path), io.read_image(p.image_path), io.read_labels(p.label_path))
        for p in real.val
    ]
    largest = sorted(images, key=lambda item: item[1].shape[0] * item[1].shape[1])[-args.largest :]
    counts = {m: sum(real.modality[stem] == m for stem, _, _ in images) for m in MODALITIES}

    second = round(1024 * infer.UPSCALE)  # a 1024-pixel image's second pass
    score_lines = [
        f"| stride | tiles of a 1024 / {second} px square (a second pass at {infer.UPSCALE:g}x) | "
        f"all {len(images)} | "
        + " | ".join(MODALITIES) + " | seconds, all images |",
        "|---|---|---|" + "---|" * len(MODALITIES) + "---|",
    ]  # fmt: skip
    time_lines = [
        "| image | size (H x W) | tolerance (s) | "
        + " | ".join(f"stride {s}: seconds" for s in args.strides) + " |",
        "|---|---|---|" + "---|" * len(args.strides),
    ]  # fmt: skip
    seconds: dict[str, list[float]] = {stem: [] for stem, _, _ in largest}
    for stride in args.strides:
        segmenter.stride = stride
        f1, started = {}, time.perf_counter()
        for stem, image, truth in images:
            f1[stem] = metrics.f1_score(truth, segmenter.segment(image))
        total = time.perf_counter() - started
        per = [mean(v for s, v in f1.items() if real.modality[s] == m) for m in MODALITIES]
        tiles = " / ".join(str(len(infer.tile_starts(n, 512, stride)) ** 2) for n in (1024, second))
        score_lines.append(
            f"| {stride} | {tiles} | {mean(f1.values()):.3f} | "
            + " | ".join(f"{v:.3f}" for v in per) + f" | {total:.1f} |"
        )  # fmt: skip
        for stem, image, _ in largest:
            seconds[stem].append(
                median_seconds(lambda im=image: segmenter.segment(im), args.repeats)[0]
            )
        print(score_lines[-1])
    for stem, image, _ in largest:
        h, w = image.shape[:2]
        time_lines.append(
            f"| {stem} | {h} x {w} | {metrics.time_tolerance(h, w):.1f} | "
            + " | ".join(f"{s:.2f}" for s in seconds[stem]) + " |"
        )  # fmt: skip
    shown, option = work_option(args.work, REPO / "runs" / "bench_quality")
    section = f"""## Inference: the sliding window's stride

One trained segmenter (`{shown}`, from `benchmarks/bench_quality.py`), the 40 real-mini VAL images
(images per modality: {", ".join(f"{m} {counts[m]}" for m in MODALITIES)}) segmented with tiles of
512 pixels every `stride` pixels, the same weights and thresholds (second pass for small cells
included). Challenge F1, mean of per-image F1, and the wall time of the whole set (one pass):

{chr(10).join(score_lines)}

The largest images, median of {args.repeats} runs each:

{chr(10).join(time_lines)}

- Command: `.venv/bin/python benchmarks/bench_window.py{option}`
- Machine: {machine("torch", "timm", "stardist")}; {args.threads} torch threads
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        write_section("bench_window", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
