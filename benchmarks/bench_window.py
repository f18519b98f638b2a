"""The window at inference: overlapping tiles or one forward pass, challenge F1 and time.

Loads the multi-stream segmenters that ``benchmarks/bench_quality.py`` wrote (``--work``, one
or more folders) and segments the 40 real-mini VAL images with the same weights and thresholds
in each window: tiles of 512 pixels every ``--strides`` pixels for every image larger than a
tile (``MultiStreamSegmenter(stride=..., whole_image_side=None)``; 384 is the paper's step, 256
the authors' HoVer code), and the default, one forward pass for images up to
``infer.WHOLE_IMAGE_SIDE`` pixels a side. F1 comes from one pass over all images; the time of
the largest images is the median of ``--repeats`` runs of the first segmenter, against the
challenge's tolerance.

    .venv/bin/python benchmarks/bench_quality.py --routing hover --work runs/hover_s12
    .venv/bin/python benchmarks/bench_window.py --work runs/hover_s12   # about 5 minutes
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
TILE = 512


def computed_share(side: int, stride: int | None) -> float:
    """Pixels a window feeds the network for a ``side``-pixel square (with the segmenter's
    mirrored context), over the square's own pixels."""
    from cellseg_lite import infer, unet

    padded = side + 2 * infer.MIRROR_CONTEXT
    if stride is None:
        rounded = -(-padded // unet.MULTIPLE) * unet.MULTIPLE  # as the network pads its input
        return rounded**2 / side**2
    return len(infer.tile_starts(padded, TILE, stride)) ** 2 * TILE**2 / side**2


def main(argv: list[str] | None = None) -> int:
    from cellseg_lite import infer, io, metrics

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, nargs="+", default=[REPO / "runs" / "bench_quality"])
    parser.add_argument("--strides", type=int, nargs="+", default=[384])
    parser.add_argument("--largest", type=int, default=2, help="images timed repeatedly")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if any(not 0 < s <= TILE for s in args.strides):
        parser.error(f"--strides: each must be in 1-{TILE} (the tile is {TILE})")
    for work in args.work:
        if not (work / "model.pt").is_file():
            raise SystemExit(f"{work}: no trained segmenter; run benchmarks/bench_quality.py first")
    real = real_mini(required=True)
    images = [
        (io.image_stem(p.image_path), io.read_image(p.image_path), io.read_labels(p.label_path))
        for p in real.val
    ]
    largest = sorted(images, key=lambda item: item[1].shape[0] * item[1].shape[1])[-args.largest :]
    counts = {m: sum(real.modality[stem] == m for stem, _, _ in images) for m in MODALITIES}
    windows = {f"tiles of {TILE} every {s}": (s, None) for s in args.strides}
    # the paper's step, or the first given, is what one pass is compared with
    paper = f"tiles of {TILE} every {infer.default_stride(TILE)}"
    reference = paper if paper in windows else next(iter(windows))
    windows[f"one pass up to {infer.WHOLE_IMAGE_SIDE} px (default)"] = (
        None,
        infer.WHOLE_IMAGE_SIDE,
    )

    second = round(1024 * infer.UPSCALE)  # a 1024-pixel image's second pass
    score_lines = [
        f"| segmenter | window | pixels computed, 1024 / {second} px square | all {len(images)} | "
        + " | ".join(MODALITIES) + " | seconds, all images |",
        "|---|---|---|---|" + "---|" * len(MODALITIES) + "---|",
    ]  # fmt: skip
    time_lines = [
        "| image | size (H x W) | tolerance (s) | "
        + " | ".join(f"{name}: seconds" for name in windows) + " |",
        "|---|---|---|" + "---|" * len(windows),
    ]  # fmt: skip
    seconds: dict[str, list[float]] = {stem: [] for stem, _, _ in largest}
    shown = {work: work_option(work, REPO)[0] for work in args.work}  # as the section names it
    gains = []
    started_all = time.perf_counter()
    for run, work in enumerate(args.work):
        segmenter = infer.MultiStreamSegmenter.load(work / "model.pt")
        scores = {}
        for name, (stride, side) in windows.items():
            segmenter.stride, segmenter.whole_image_side = stride, side
            f1, started = {}, time.perf_counter()
            for stem, image, truth in images:
                f1[stem] = metrics.f1_score(truth, segmenter.segment(image))
            total = time.perf_counter() - started
            scores[name] = mean(f1.values())
            per = [mean(v for s, v in f1.items() if real.modality[s] == m) for m in MODALITIES]
            share = " / ".join(f"{computed_share(n, stride):.2f}x" for n in (1024, second))
            score_lines.append(
                f"| `{shown[work]}` | {name} | {share} | {scores[name]:.3f} | "
                + " | ".join(f"{v:.3f}" for v in per) + f" | {total:.1f} |"
            )  # fmt: skip
            print(score_lines[-1], flush=True)
            if run == 0:
                for stem, image, _ in largest:
                    seconds[stem].append(
                        median_seconds(lambda im=image, s=segmenter: s.segment(im), args.repeats)[0]
                    )
        gains.append(scores[name] - scores[reference])  # the last window: one pass
    for stem, image, _ in largest:
        h, w = image.shape[:2]
        time_lines.append(
            f"| {stem} | {h} x {w} | {metrics.time_tolerance(h, w):.1f} | "
            + " | ".join(f"{s:.2f}" for s in seconds[stem]) + " |"
        )  # fmt: skip
    minutes = (time.perf_counter() - started_all) / 60
    option = " --work " + " ".join(map(str, shown.values()))
    if args.strides != [384]:
        option += " --strides " + " ".join(map(str, args.strides))
    section = f"""## Inference: the window, overlapping tiles or one forward pass

Trained segmenters (from `benchmarks/bench_quality.py`), the 40 real-mini VAL images (images per
modality: {", ".join(f"{m} {counts[m]}" for m in MODALITIES)}), segmented with the same weights and
thresholds in each window (second pass for small cells included): tiles of {TILE} pixels for every
image larger than a tile (`whole_image_side=None`, the paper's window), or one forward pass for
images up to `infer.WHOLE_IMAGE_SIDE` pixels a side (the default). The pixels column counts what
the network is fed for a square image with its {infer.MIRROR_CONTEXT} pixels of mirrored context,
over the image's pixels. Challenge F1, mean of per-image F1, and the wall time of the whole set:

{chr(10).join(score_lines)}

One pass against {reference}, VAL F1 change per segmenter:
{", ".join(f"{g:+.4f}" for g in gains)} (mean {mean(gains):+.4f}).

The largest images, median of {args.repeats} runs each (`{shown[args.work[0]]}`):

{chr(10).join(time_lines)}

Took {minutes:.1f} minutes.

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
