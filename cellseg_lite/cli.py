"""The ``cellseg-lite`` command.

Each subcommand is a thin shell over one package function; errors in the user's input come back as a
one-line message and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cellseg_lite import __version__
from cellseg_lite._errors import CellSegError

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran but some inputs failed
EXIT_USAGE = 2  # bad paths, arguments or files
#: The --routing choices of train and demo: the tables of infer.ROUTINGS, and "validated".
ROUTING_CHOICES = ("paper", "code", "hover", "validated")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cellseg_lite import metrics

    summary = metrics.evaluate_folder(
        args.gt_dir,
        args.pred_dir,
        csv_path=args.csv,
        iou_threshold=args.iou,
        drop_boundary=not args.keep_boundary,
        kinds=args.kinds,
    )
    print(summary.report())
    if args.csv:
        print(f"per-image scores written to {args.csv}")
    return EXIT_OK


def _cmd_synthetic(args: argparse.Namespace) -> int:
    from cellseg_lite import synthetic

    written = synthetic.make_dataset(args.out, args.n, size=(args.size, args.size), seed=args.seed)
    print(f"wrote {len(written)} synthetic images with labels to {args.out}")
    return EXIT_OK


def _log(message: str) -> None:
    print(message, flush=True)


def _scales(text: str) -> tuple[float, ...]:
    """``--map-scales``: comma-separated scales (``1,1.5``), checked by
    :func:`cellseg_lite.infer.map_scales_of`."""
    from cellseg_lite import infer

    try:
        return infer.map_scales_of([float(part) for part in text.split(",")], "--map-scales")
    except (ValueError, CellSegError) as err:
        raise argparse.ArgumentTypeError(
            f"expected distinct scales > 0 separated by commas, such as 1,1.5 ({err})"
        ) from err


def _cmd_train(args: argparse.Namespace) -> int:
    import tempfile

    from cellseg_lite import synthetic, train

    data = list(args.data or [])
    if not data and not args.synthetic:
        raise CellSegError("give --data DIR (one or more) and/or --synthetic N")
    if args.out.is_dir():
        raise CellSegError(f"'{args.out}': is a folder; --out names the model file to write")
    changes = {}
    if args.map_scales is not None:
        changes["map_scales"] = args.map_scales
    scratch = None
    try:
        if args.synthetic:
            scratch = tempfile.TemporaryDirectory(prefix="cellseg-lite-synthetic-")
            synthetic.make_dataset(scratch.name, args.synthetic, size=(256, 256), seed=args.seed)
            data.append(Path(scratch.name))
        segmenter, stages = train.train_multistream(
            data,
            args.out,
            preset_name=args.preset,
            minutes=args.minutes,
            routing=args.routing,
            val=args.val,
            min_selection_images=train.MIN_SELECTION_IMAGES
            if args.min_selection_images is None
            else args.min_selection_images,
            changes=changes,
            work_dir=args.work_dir,
            device=args.device,
            seed=args.seed,
            progress=not args.quiet,
            log=_log,
        )
    finally:
        if scratch is not None:
            scratch.cleanup()
    print(f"wrote {args.out}: {segmenter!r}")
    return EXIT_OK


def _image_files(inputs: list[Path]) -> list[Path]:
    from cellseg_lite import io

    files = []
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and io.is_image_file(p))
            if not found:
                raise CellSegError(f"'{item}': no image files in this folder")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise CellSegError(f"'{item}': no such file or folder")
    # a file named twice (its folder and itself) is segmented once
    return list({p.resolve(): p for p in files}.values())


def _stem_clashes(files: list[Path]) -> dict[Path, list[Path]]:
    """The files whose labels would land in the same ``<stem>_label.tiff`` as another's
    (``a.png`` and ``a.tif``, or ``a.png`` in two folders): ``{file: the others}``."""
    from cellseg_lite import io

    by_stem: dict[str, list[Path]] = {}
    for path in files:
        by_stem.setdefault(io.image_stem(path), []).append(path)
    return {
        path: [other for other in group if other != path]
        for group in by_stem.values()
        if len(group) > 1
        for path in group
    }


def _cmd_predict(args: argparse.Namespace) -> int:
    from cellseg_lite import infer, io

    files = _image_files(args.inputs)
    segmenter = infer.MultiStreamSegmenter.load(args.model, device=args.device or "cpu")
    if args.tta is not None:
        segmenter.tta = args.tta
    if args.map_scales is not None:
        segmenter.map_scales = args.map_scales
    for flag, value in (("--min-diameter", args.min_diameter),
                        ("--mirror-context", args.mirror_context),
                        ("--whole-image-side", args.whole_image_side)):  # fmt: skip
        if value is not None and not value >= 0:
            raise CellSegError(f"{flag}: expected pixels >= 0, got {value}")
    if args.min_diameter is not None:
        segmenter.min_diameter = args.min_diameter or None
    if args.mirror_context is not None:
        segmenter.mirror_context = args.mirror_context
    if args.whole_image_side is not None:
        segmenter.whole_image_side = args.whole_image_side or None
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    clashes = _stem_clashes(files)
    for path in files:
        if path in clashes:  # which one the user wants is not ours to guess: neither overwrites
            failed.append(path)
            others = ", ".join(map(str, clashes[path]))
            print(
                f"cellseg-lite predict: skipped {path}: its labels would be written to the same "
                f"file as those of {others} ({io.image_stem(path)}_label.tiff); rename one or "
                "segment them into separate --out folders",
                file=sys.stderr,
            )
            continue
        try:
            labels = segmenter.segment(io.read_image(path))
            target = args.out / f"{io.image_stem(path)}_label.tiff"
            io.write_labels(target, labels)
        except CellSegError as err:
            failed.append(path)
            print(f"cellseg-lite predict: skipped {path}: {err}", file=sys.stderr)
            continue
        if not args.quiet:
            print(f"{path} -> {target} ({int(labels.max())} cells)")
    print(f"{len(files) - len(failed)} of {len(files)} images segmented into {args.out}")
    return EXIT_FAILED if failed else EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from cellseg_lite import demo

    result = demo.run_demo(
        args.out,
        minutes=args.minutes,
        n_train=args.n_train,
        n_test=args.n_test,
        seed=args.seed,
        routing=args.routing,
        progress=not args.quiet,
        log=_log,
    )
    print(f"report: {result.report_md} and {result.report_html}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellseg-lite",
        description="Multi-stream cell segmentation with low-level cues, rebuilt for teaching.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ev = sub.add_parser(
        "evaluate",
        help="score predicted label images against ground truth with the challenge's F1 rule",
        description="Mean per-image F1 at IoU >= 0.5 with boundary cells removed (the NeurIPS 2022 "
        "Cell Segmentation Challenge rule). Files are matched by name: GT_DIR/<stem>_label.tiff and "
        "PRED_DIR/<stem>_label.tiff; a missing prediction scores 0, and a prediction with no "
        "ground truth is listed and not scored.",
    )
    ev.add_argument("gt_dir", type=Path, metavar="GT_DIR")
    ev.add_argument("pred_dir", type=Path, metavar="PRED_DIR")
    ev.add_argument(
        "--csv", type=Path, default=None, help="write per-image scores to this CSV file"
    )
    ev.add_argument("--iou", type=float, default=0.5, help="IoU threshold (default 0.5)")
    ev.add_argument(
        "--keep-boundary",
        action="store_true",
        help="do not remove cells touching the 2-pixel image frame",
    )
    ev.add_argument(
        "--kinds",
        action="store_true",
        help="also sort the unmatched cells by kind (missed, split, merged, outline; merger, "
        "on_cell, background) and print the totals",
    )
    ev.set_defaults(func=_cmd_evaluate)

    syn = sub.add_parser(
        "synthetic",
        help="write the embedded synthetic data set in the challenge folder layout",
    )
    syn.add_argument("--out", type=Path, required=True, help="output folder (images/, labels/)")
    syn.add_argument("--n", type=int, default=8, help="images per category (default 8)")
    syn.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    syn.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    syn.set_defaults(func=_cmd_synthetic)

    tr = sub.add_parser(
        "train",
        help="train the router and both streams (pre-training, then fine-tuning per class)",
        description="Train the multi-stream method on labelled folders in the challenge layout "
        "(images/, labels/<stem>_label.tiff) and write one model file, in one process (for several "
        "GPUs, train each stream with train.train_stream under torchrun).",
    )
    tr.add_argument("--data", type=Path, action="append", help="a labelled folder (repeatable)")
    tr.add_argument(
        "--synthetic",
        type=int,
        default=0,
        metavar="N",
        help="add N synthetic images per low-level class to the training data",
    )
    tr.add_argument("--out", type=Path, required=True, help="the model file to write")
    tr.add_argument(
        "--preset",
        choices=("lite", "paper", "fast"),
        default=None,
        help="training settings (default: fast under CELLSEG_FAST=1, paper on a GPU, else lite)",
    )
    tr.add_argument("--minutes", type=float, default=None, help="total training time budget")
    tr.add_argument(
        "--routing",
        choices=ROUTING_CHOICES,
        default="paper",
        help="which stream serves each class: the paper's text, the authors' code, HoVer for "
        "every class (the better choice for short CPU runs), or the better stream on each "
        "class's validation images (both pre-train a probe, the winners go on)",
    )
    tr.add_argument("--val", type=Path, default=None, help="validation folder (default: held out)")
    tr.add_argument(
        "--min-selection-images",
        type=int,
        default=None,
        help="fine-tune only classes with at least this many validation images "
        "(default: train.MIN_SELECTION_IMAGES)",
    )
    tr.add_argument(
        "--map-scales",
        type=_scales,
        default=None,
        metavar="S[,S...]",
        help="tune the post-processing on maps averaged over these scales of each image, as the "
        "model will then segment, for example 1,1.5 (3.25x the forward passes); default: 1, the "
        "image's own scale",
    )
    tr.add_argument("--work-dir", type=Path, default=None, help="keep each stage's checkpoint here")
    tr.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: best)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    tr.set_defaults(func=_cmd_train)

    pr = sub.add_parser(
        "predict",
        help="segment images (files or folders) and write <stem>_label.tiff for each",
        description="Segment every image given (or found in a folder given) with a trained model. "
        "A file that cannot be read is reported and skipped; the exit code is 1 if any was.",
    )
    pr.add_argument("--model", type=Path, required=True, help="a model file from `train`")
    pr.add_argument("--out", type=Path, required=True, help="output folder")
    pr.add_argument("inputs", type=Path, nargs="+", metavar="IMAGE_OR_DIR")
    pr.add_argument("--device", default=None, help="cpu, cuda ... (default: cpu)")
    pr.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average the maps of four flips of every tile (4x the time); default: as each "
        "stream's thresholds were tuned (HoVer with, StarDist without)",
    )
    pr.add_argument(
        "--map-scales",
        type=_scales,
        default=None,
        metavar="S[,S...]",
        help="average the maps of each image at these scales, for example 1,1.5; default: the "
        "scales each stream's thresholds were tuned on (`train --map-scales`)",
    )
    pr.add_argument(
        "--min-diameter",
        type=float,
        default=None,
        metavar="PIXELS",
        help="segment an image whose cells a first pass finds narrower than this a second time, "
        "larger (by the model file's factor), for maps at stride 4 (half of it for the "
        "stride-2 decoder); 0: never; default: the model file's setting",
    )
    pr.add_argument(
        "--mirror-context",
        type=int,
        default=None,
        metavar="PIXELS",
        help="pixels of mirrored context around each image, cropped away after; 0: none; "
        "default: the model file's setting (16)",
    )
    pr.add_argument(
        "--whole-image-side",
        type=int,
        default=None,
        metavar="PIXELS",
        help="predict an image whose sides (with its context) are at most this long in one "
        "forward pass, larger ones in overlapping tiles of 512; 0: tiles for every image larger "
        "than a tile (the paper's window); default: the model file's setting (2048)",
    )
    pr.add_argument("--quiet", action="store_true", help="only the summary line")
    pr.set_defaults(func=_cmd_predict)

    de = sub.add_parser(
        "demo",
        help="the whole pipeline on generated data, with a Markdown/HTML report",
        description="Generate synthetic images of the four classes, train the lite router and "
        "streams, segment held-out images and write report.md and report.html into --out.",
    )
    de.add_argument("--out", type=Path, required=True, help="output folder")
    de.add_argument("--minutes", type=float, default=3.0, help="training budget (default 3)")
    de.add_argument("--n-train", type=int, default=8, help="training images per class")
    de.add_argument("--n-test", type=int, default=3, help="held-out images per class")
    de.add_argument("--seed", type=int, default=0)
    de.add_argument(
        "--routing",
        choices=ROUTING_CHOICES,
        default="paper",
        help="which stream serves each class, as for train (default: the paper's)",
    )
    de.add_argument("--quiet", action="store_true", help="no progress bars")
    de.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CellSegError as err:
        print(f"cellseg-lite {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"cellseg-lite {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
