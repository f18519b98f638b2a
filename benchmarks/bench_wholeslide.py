"""Benchmark: the StarDist stream on a 10496 x 8415 whole-slide image in bounded memory.

The largest image of the challenge's tuning set is 10496 x 8415 pixels. The authors' code keeps
its whole 33-channel float map (1 + 32 rays): 10496 x 8415 x 33 x 4 bytes = 11.7 GB.
``infer.stardist_instances_tiled`` keeps one 2048 x 2048 block's map at a time, its NMS
candidates and the labels. This script runs the ``lite`` StarDist model
(``ConvNeXtStarDist("convnext_atto", n_rays=32, decoder="paper")``, or a trained checkpoint
given by ``--model``) over a synthetic slide of that size in a child process and records the
wall time and peak memory (the child's ``VmHWM``, its resident-set high-water mark) beside the
challenge's time tolerance (``metrics.time_tolerance``). For the reference approach it computes
what the full map would take and measures a full-map run (``infer.sliding_window`` then
``stardist`` post-processing) on a 4096 x 4096 slide, next to the tiled run (four blocks) on
the same slide, whose labels must be the same. Results go to the ``bench_wholeslide`` section of
``benchmarks/RESULTS.md``.

The slide is a mosaic of ``synthetic.make_image(0, size=(1024, 1024), seed=i)`` fluorescence
tiles, each normalised like a training image (``io.normalize_image``) and kept as uint8; the
network sees ``uint8 / 255`` floats in [0, 1], divided tile by tile (a float32 copy of the
slide would add 1.1 GB).

Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_wholeslide.py --progress
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_wholeslide.py --model MODEL --progress

The first uses a randomly initialised atto model (and says so); the second a trained StarDist
checkpoint (``train.load_checkpoint``), with its thresholds. It took 9 minutes on the busy
2-core CPU, 6 of them for the slide (``--device cuda`` for a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _results import machine, now, write_section

REPO = Path(__file__).resolve().parents[1]
SECTION = "bench_wholeslide"
TUNING_SHAPE = (10496, 8415)
N_RAYS = 32
MOSAIC_TILE = 1024
MEMORY_TARGET_GB = 6.0
GB = 1e9


# --------------------------------------------------------------------------- child process


def synthetic_slide(height: int, width: int) -> tuple[np.ndarray, int]:
    """``(height, width, 3)`` uint8 and its number of nuclei: fluorescence tiles
    ``make_image(0, (1024, 1024), seed=i)``, row by row, each normalised on its own
    (``io.normalize_image``), cropped at the far edges."""
    from cellseg_lite import io, synthetic

    slide = np.zeros((height, width, 3), np.uint8)
    index = cells = 0
    for r in range(0, height, MOSAIC_TILE):
        for c in range(0, width, MOSAIC_TILE):
            raw, labels = synthetic.make_image(0, size=(MOSAIC_TILE, MOSAIC_TILE), seed=index)
            h, w = min(MOSAIC_TILE, height - r), min(MOSAIC_TILE, width - c)
            slide[r : r + h, c : c + w] = io.normalize_image(raw)[:h, :w]
            cells += int(np.count_nonzero(np.unique(labels[:h, :w])))
            index += 1
    return slide, cells


def _memory(field: str) -> int:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _load_model(path: str | None):
    """``(model, thresholds, description)``: a checkpoint's StarDist model, or a random lite one."""
    import torch

    from cellseg_lite.streams import stardist

    if path:
        from cellseg_lite import train

        checkpoint = train.load_checkpoint(path)
        if not isinstance(checkpoint.model, stardist.ConvNeXtStarDist):
            sys.exit(f"--model {path}: a {type(checkpoint.model).__name__}, not a StarDist model")
        thresholds = {"prob_thresh": 0.5, "nms_thresh": 0.4, **checkpoint.thresholds}
        return checkpoint.model, thresholds, f"trained checkpoint `{path}`"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = stardist.ConvNeXtStarDist("convnext_atto", n_rays=N_RAYS, decoder="paper")
    return model, {"prob_thresh": 0.5, "nms_thresh": 0.4}, "UNTRAINED (random weights, seed 0)"


def child(args) -> dict:
    """One measured run in this process: builds the slide and the model, segments, reports."""
    import torch

    from cellseg_lite import infer
    from cellseg_lite.streams import stardist

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    image, true_cells = synthetic_slide(args.height, args.width)
    image_seconds = time.perf_counter() - start
    model, thresholds, description = _load_model(args.model)
    base = infer.model_predictor(model, device=args.device)
    tiles = [0]

    def predict(x):  # uint8 values to the network's [0, 1] input, one batch at a time
        tiles[0] += len(x)
        return base(x / 255.0)

    result = {
        "mode": args.child,
        "shape": [args.height, args.width],
        "model": description,
        "thresholds": thresholds,
        "image_seconds": image_seconds,
        "rss_before": _memory("VmRSS"),
        "threads": torch.get_num_threads(),
    }
    settings = {"tile": args.tile, "stride": args.stride, "batch_size": args.batch_size}
    start = time.perf_counter()
    if args.child == "tiled":
        found = infer.stardist_candidates_tiled(
            predict,
            image,
            block=args.block,
            prob_thresh=thresholds["prob_thresh"],
            max_candidates=args.max_candidates,
            progress=args.progress,
            **settings,
        )
        predicted = time.perf_counter()
        kept = stardist.suppress(found, thresholds["nms_thresh"])
        suppressed = time.perf_counter()
        labels = stardist.render(kept, image.shape[:2])
        n_candidates = len(found.points)
        del found, kept
    else:  # the reference approach: the whole map, then the whole-image post-processing
        maps = infer.sliding_window(predict, image, progress=args.progress, **settings)
        predicted = time.perf_counter()
        result["map_bytes"] = maps.nbytes
        found = stardist.select_candidates(
            maps[0], maps[1:], thresholds["prob_thresh"], max_candidates=args.max_candidates
        )
        kept = stardist.suppress(found, thresholds["nms_thresh"])
        suppressed = time.perf_counter()
        labels = stardist.render(kept, image.shape[:2])
        n_candidates = len(found.points)
        del maps, found, kept
    done = time.perf_counter()
    ys = infer.tile_starts(max(args.height, args.tile), args.tile, args.stride)
    xs = infer.tile_starts(max(args.width, args.tile), args.tile, args.stride)
    result.update(
        seconds=done - start,
        predict_seconds=predicted - start,
        nms_seconds=suppressed - predicted,
        render_seconds=done - suppressed,
        peak=_memory("VmHWM"),
        tiles=tiles[0],
        unique_tiles=len(ys) * len(xs),
        candidates=n_candidates,
        cells=int(labels.max()),
        true_cells=true_cells,
    )
    if args.labels_out:
        np.save(args.labels_out, labels)
    return result


# --------------------------------------------------------------------------- parent


def run_child(args, mode: str, shape: tuple[int, int], labels_out: str | None = None) -> dict:
    """Run :func:`child` in a fresh Python process (its peak memory is its own) and read its JSON."""
    command = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--height",
        str(shape[0]),
        "--width",
        str(shape[1]),
        "--block",
        str(args.block),
        "--tile",
        str(args.tile),
        "--stride",
        str(args.stride),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
    ]
    if args.model:
        command += ["--model", args.model]
    if args.max_candidates is not None:
        command += ["--max-candidates", str(args.max_candidates)]
    if labels_out:
        command += ["--labels-out", labels_out]
    if args.progress:
        command.append("--progress")
    print(f"running {mode} on {shape[0]} x {shape[1]} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gb(n: float) -> str:
    return f"{n / GB:.2f}"


def _row(name: str, r: dict) -> str:
    h, w = r["shape"]
    return (
        f"| {name} | {h} x {w} | {r['seconds']:.1f} | {r['predict_seconds']:.1f} | "
        f"{r['nms_seconds']:.1f} | {r['render_seconds']:.1f} | {_gb(r['peak'])} | "
        f"{_gb(r['rss_before'])} | {r['tiles']} ({r['unique_tiles']}) | {r['candidates']} | "
        f"{r['cells']} |"
    )


def section(args, slide: dict, full: dict | None, tiled: dict | None, same, load) -> str:
    from cellseg_lite import metrics

    height, width = slide["shape"]
    channels = 1 + N_RAYS
    full_map = height * width * channels * 4
    tolerance = metrics.time_tolerance(height, width)
    untrained = slide["model"].startswith("UNTRAINED")
    lines = [
        f"## Whole-slide StarDist: {height} x {width} in bounded memory",
        "",
        f"Model: `ConvNeXtStarDist('convnext_atto', n_rays={N_RAYS}, decoder='paper')`, "
        f"{slide['model']}; thresholds {slide['thresholds']}. Image: a mosaic of "
        f"`synthetic.make_image(0, size=(1024, 1024), seed=i)` fluorescence tiles, each "
        "normalised by `io.normalize_image`, kept as uint8 and divided by 255 per batch of "
        f"tiles. `infer.stardist_instances_tiled`: tiles {args.tile}, step {args.stride}, blocks "
        f"{args.block}, batches of {args.batch_size}, candidate stride 4, "
        f"{'no candidate cap' if args.max_candidates is None else f'cap {args.max_candidates} per block'}; "
        f"{slide['threads']} torch thread(s), device {args.device}. "
        + (
            "The reference run skips the authors' candidate cap too, so that its labels can be "
            "compared. "
            if args.max_candidates is None
            else ""
        )
        + "Each run in a fresh process; "
        "peak memory is that process's resident-set high-water mark (`VmHWM`, everything: "
        "Python, torch, the model, the slide, the maps), in GB of 10^9 bytes.",
        "",
        "| run | image | inference (s) | predict + candidates (s) | NMS (s) | render (s) | "
        "peak RSS (GB) | RSS before inference (GB) | tiles predicted (unique) | candidates | cells |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        _row("tiled (`stardist_instances_tiled`)", slide),
    ]
    if full is not None:
        lines.append(_row("reference: full map, then `stardist` post-processing", full))
    if tiled is not None:
        lines.append(_row("tiled (`stardist_instances_tiled`)", tiled))
    lines += [
        "",
        f"**Time:** {slide['seconds']:.0f} s of inference for the {height} x {width} image "
        f"(plus {slide['image_seconds']:.0f} s to synthesise the slide, not counted); the "
        f"challenge's tolerance for this size (`metrics.time_tolerance({height}, {width})`) is "
        f"{tolerance:.0f} s: {'within' if slide['seconds'] <= tolerance else 'OVER'} it. "
        f"{slide['tiles']} tiles were predicted for {slide['unique_tiles']} positions of the "
        "tile grid: tiles across a block's edge are predicted for each block they touch.",
        "",
        f"**Memory:** peak {_gb(slide['peak'])} GB against a target of "
        f"{MEMORY_TARGET_GB:.0f} GB: {'met' if slide['peak'] < MEMORY_TARGET_GB * GB else 'MISSED'}. "
        f"The reference approach's full map alone would take {height} x {width} x {channels} x "
        f"4 bytes = {_gb(full_map)} GB (float32; the authors keep it on the GPU).",
    ]
    if full is not None and tiled is not None:
        fh, fw = full["shape"]
        added = full["peak"] - full["rss_before"]
        ratio = added / full["map_bytes"]
        blocks = -(-fh // args.block) * -(-fw // args.block)
        lines += [
            "",
            f"Measured on a {fh} x {fw} slide of the same kind: its full map is "
            f"{_gb(full['map_bytes'])} GB, and the full-map run peaked at {_gb(full['peak'])} GB, "
            f"{_gb(added)} GB above its RSS before inference ({ratio:.2f} x the map: the map, the "
            "blending buffers, the post-processing's copies and the network's working memory); "
            f"the tiled run ({blocks} blocks of {args.block}) peaked at {_gb(tiled['peak'])} GB, "
            f"{_gb(tiled['peak'] - tiled['rss_before'])} GB above. At that ratio the reference "
            f"approach would need about {_gb(slide['rss_before'] + ratio * full_map)} GB for the "
            f"{height} x {width} slide. Labels of the two runs identical: {same}.",
        ]
    if untrained:
        lines += [
            "",
            f"The model is UNTRAINED: the network's time and the memory are what this size "
            f"costs, but its {slide['candidates']} candidates and {slide['cells']} cells mean "
            f"nothing. The slide holds {slide['true_cells']} nuclei; a trained model would give "
            "about as many cells, from more candidates, so NMS and rendering would take longer "
            "than here. Re-run with `--model` and a trained checkpoint.",
        ]
    lines += [
        "",
        f"- Command: `{args.command}`",
        f"- Machine: {machine('numpy', 'torch', 'timm', 'stardist')}; "
        f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}`; shared with other jobs "
        f"(load average {load[0]:.2f} before, {load[1]:.2f} after), so times are upper bounds",
        f"- Date: {now()}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_wholeslide.py "
        "--model MODEL --progress",
    )
    parser.add_argument(
        "--model",
        help="a StarDist checkpoint (train.load_checkpoint); default: a randomly initialised "
        "lite model, reported as untrained",
    )
    parser.add_argument("--height", type=int, default=TUNING_SHAPE[0], help="slide height")
    parser.add_argument("--width", type=int, default=TUNING_SHAPE[1], help="slide width")
    parser.add_argument("--block", type=int, default=2048, help="block side of the tiled run")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--stride", type=int, default=384, help="step between tiles")
    parser.add_argument("--batch-size", type=int, default=4, help="tiles per network call")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on the shared 2-core machine one thread ran faster "
        "than two)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument(
        "--max-candidates", type=int, help="apply the authors' candidate cap (per block)"
    )
    parser.add_argument(
        "--reference-size",
        type=int,
        default=4096,
        help="side of the full-map comparison, which the tiled run repeats in blocks (0: skip)",
    )
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--child", choices=["tiled", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--labels-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    extra = sys.argv[1:] if argv is None else argv
    env = os.environ.get("OMP_NUM_THREADS")
    prefix = [f"OMP_NUM_THREADS={env}"] if env else []
    args.command = " ".join([*prefix, ".venv/bin/python benchmarks/bench_wholeslide.py", *extra])
    load_before = os.getloadavg()[0]
    slide = run_child(args, "tiled", (args.height, args.width))
    full = tiled = same = None
    if args.reference_size:
        side = (args.reference_size, args.reference_size)
        with tempfile.TemporaryDirectory() as tmp:
            full = run_child(args, "full", side, f"{tmp}/full.npy")
            tiled = run_child(args, "tiled", side, f"{tmp}/tiled.npy")
            a, b = np.load(f"{tmp}/full.npy"), np.load(f"{tmp}/tiled.npy")
            same = "yes" if np.array_equal(a, b) else "NO"
            if same == "NO":
                from cellseg_lite import metrics

                same += f" (F1 between them {metrics.f1_score(a, b, drop_boundary=False):.4f})"
    text = section(args, slide, full, tiled, same, (load_before, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
