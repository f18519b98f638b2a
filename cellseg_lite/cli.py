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


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cellseg_lite import metrics

    summary = metrics.evaluate_folder(
        args.gt_dir,
        args.pred_dir,
        csv_path=args.csv,
        iou_threshold=args.iou,
        drop_boundary=not args.keep_boundary,
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
        "PRED_DIR/<stem>_label.tiff; a missing prediction scores 0.",
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
