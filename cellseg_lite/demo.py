"""``cellseg-lite demo``: the whole method on the embedded synthetic data, with a report.

Generate a labelled training set and a held-out test set of the four low-level classes
(:mod:`cellseg_lite.synthetic`), train the router and both streams within a few CPU minutes
(:func:`cellseg_lite.train.train_multistream`, the ``lite`` preset; ``fast`` under
``CELLSEG_FAST=1``), segment the held-out images, and write ``report.md`` and ``report.html``
with overlays, a per-class F1 table in the shape of the paper's Table 4 (single streams against
the multi-stream method), a reading of that table drawn from its own numbers (:func:`reading`)
and a timing table in the shape of its Table 5.
"""

from __future__ import annotations

import html
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cellseg_lite._checks import positive_int
from cellseg_lite._errors import CellSegError

__all__ = ["DemoResult", "ablation_segmenters", "reading", "run_demo"]


class DemoResult(NamedTuple):
    """What :func:`run_demo` made: the report files, the segmenter file and the scores."""

    report_md: Path
    report_html: Path
    model: Path
    scores: dict
    train_seconds: float


def ablation_segmenters(segmenter, pretrained: dict) -> dict:
    """The methods of the paper's ablation: each pre-trained stream alone on every class, and the
    multi-stream segmenter. ``pretrained``: ``{stream: train.Checkpoint}``. The single streams
    share the segmenter's window and its rules for small cells, normalisation and context."""
    from cellseg_lite import infer

    methods = {}
    for stream, checkpoint in pretrained.items():
        single = infer.MultiStreamSegmenter(
            segmenter.router,
            dict.fromkeys(range(4), checkpoint),
            routing=dict.fromkeys(range(4), stream),
            min_diameter=segmenter.min_diameter,
            upscale=segmenter.upscale,
            upscale_classes=segmenter.upscale_classes,
            sparse_cells=segmenter.sparse_cells,
            mirror_context=segmenter.mirror_context,
            tile=segmenter.tile,
            stride=segmenter.stride,
            whole_image_side=segmenter.whole_image_side,
        )
        name = "ConvNeXt-StarDist" if stream == "stardist" else "ConvNeXt-HoVer"
        methods[f"{name}, pre-trained, one model"] = single
    methods["multi-stream (routed, fine-tuned)"] = segmenter
    return methods


def reading(methods: dict, means: dict[str, float]) -> str:
    """A paragraph that reads a Table 4 of :func:`ablation_segmenters` from its own numbers.

    ``methods``: the single-stream segmenters and, last, the multi-stream one (whose
    ``routing`` and ``routing_name`` it reads); ``means``: the mean challenge F1 of each. A few
    CPU minutes from random weights are not the paper's hours on GPUs from ImageNet weights, and
    the two streams do not learn at the same pace: when the routing sends classes to the stream
    that learned less, the multi-stream segmenter scores below the better single stream, and a
    student should be told so rather than left to read the table as the method failing.
    """
    *singles, multi = methods
    routing, routing_name = dict(methods[multi].routing), methods[multi].routing_name
    streams = {name: next(iter(set(methods[name].routing.values()))) for name in singles}
    if not singles:
        return ""
    best = max(singles, key=means.get)
    if means[multi] >= means[best]:
        return (
            f"The multi-stream segmenter ({means[multi]:.3f}) scores at least as well as the "
            f"better single stream, {best.split(',')[0]} ({means[best]:.3f}), as in the paper's "
            "Table 4."
        )
    others = sorted(c for c, s in routing.items() if s != streams[best])
    if not others:  # every class goes to the best stream: the fine-tuned models lost to it
        return (
            f"The multi-stream segmenter ({means[multi]:.3f}) scores below "
            f"{best.split(',')[0]} alone ({means[best]:.3f}), which serves every class as well: "
            "its fine-tuned models and per-class thresholds, chosen on the few selection images "
            "of each class, did worse on the held-out images than the pre-trained model."
        )
    weak = {s for c, s in routing.items() if c in others}
    weak_scores = ", ".join(
        f"{name.split(',')[0]} alone {means[name]:.3f}" for name in singles if streams[name] in weak
    )
    classes = ", ".join(map(str, others))
    return (
        f"In this run the multi-stream segmenter ({means[multi]:.3f}) scores below "
        f"{best.split(',')[0]} alone ({means[best]:.3f}): the routing sends class"
        f"{'es' if len(others) > 1 else ''} {classes} to the other stream"
        + (f" ({weak_scores})" if weak_scores else "")
        + ". A few CPU minutes from random weights are far from the paper's training (hours on "
        "GPUs, from ImageNet weights), and the two streams do not learn at the same pace"
        + (
            ": from scratch, StarDist's ray distances need more steps than HoVer's maps (the "
            "quality benchmark in the repository's `benchmarks/RESULTS.md`)"
            if weak == {"stardist"}
            else ""
        )
        + (
            ". The `validated` routing (`--routing validated`) lets the selection images choose "
            "each class's stream, and a longer budget (`--minutes`) gives the streams more time."
            if routing_name != "validated"
            else ". A longer budget (`--minutes`) gives the streams more time."
        )
    )


def _figure(path: Path, image, y_true, predictions: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from cellseg_lite import viz

    panels = [("ground truth", y_true)] + list(predictions.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (name, labels) in zip(np.atleast_1d(axes), panels, strict=True):
        viz.plot_instances(image, labels, ax=ax, title=name)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def _markdown_table_to_html(table: str) -> str:
    rows = [line.strip().strip("|").split("|") for line in table.splitlines()]
    rows = [r for r in rows if not all(set(c.strip()) <= set("-") for c in r)]
    head, body = rows[0], rows[1:]
    out = [
        "<table>",
        "<tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>",
    ]
    for r in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _write_text(path: Path, text: str) -> None:
    from cellseg_lite.io import atomic_write

    with atomic_write(path) as fh:
        fh.write(text.encode("utf-8"))


def run_demo(
    out: str | os.PathLike,
    *,
    minutes: float = 3.0,
    n_train: int = 8,
    n_test: int = 3,
    size: int = 256,
    seed: int = 0,
    routing: str = "paper",
    preset_name: str | None = None,
    progress: bool = False,
    log=None,
) -> DemoResult:
    """Run the demo into folder ``out`` (created); see the module docstring.

    ``minutes``: the training budget (router and streams together); ``n_train``/``n_test``:
    synthetic images per class for training and for the held-out test; ``size``: their side;
    ``routing``: which stream serves each class (``"paper"``, ``"code"``, ``"hover"`` or
    ``"validated"``, as in :func:`cellseg_lite.train.train_multistream`).
    """
    from cellseg_lite import __version__, datasets, infer, io, metrics, synthetic, train

    if isinstance(minutes, bool) or not isinstance(minutes, int | float) or not minutes > 0:
        raise CellSegError(f"minutes: expected a positive number, got {minutes!r}")
    n_train, n_test = positive_int(n_train, "n_train"), positive_int(n_test, "n_test")
    if routing != "validated":
        infer._check_routing(routing)
    say = log or (lambda message: None)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CellSegError(f"'{out}': exists and is not a folder")
    preset_name = preset_name or ("fast" if train.default_preset() == "fast" else "lite")
    for folder in ("data", "work", "predictions", "figures"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    train_dir, test_dir = out / "data" / "train", out / "data" / "test"
    say(f"writing {4 * n_train} training and {4 * n_test} held-out synthetic images")
    synthetic.make_dataset(train_dir, n_train, size=(size, size), seed=seed)
    synthetic.make_dataset(test_dir, n_test, size=(size, size), seed=seed + 1000)

    started = time.perf_counter()
    model_path = out / "model.pt"
    segmenter, stages = train.train_multistream(
        train_dir,
        model_path,
        preset_name=preset_name,
        minutes=minutes,
        routing=routing,
        work_dir=out / "work",
        seed=seed,
        # one selection image per class is too few to judge a fine-tuned model by
        # (train.MIN_SELECTION_IMAGES), but the demo is there to show every stage of the method
        min_selection_images=1,
        progress=progress,
        log=say,
    )
    train_seconds = time.perf_counter() - started
    pretrained = {
        stream: train.load_checkpoint(out / "work" / f"{stream}_all.pt")
        for stream in ("stardist", "hover")
        if (out / "work" / f"{stream}_all.pt").is_file()
    }

    test = datasets.find_pairs(test_dir)
    images = [(s.stem, io.read_image(s.image_path), io.read_labels(s.label_path)) for s in test]
    categories = [int(s.stem.split("_c")[1][0]) for s in test]  # synth_c<k>_NNNN
    methods = ablation_segmenters(segmenter, pretrained)
    scores, predictions = {}, {}
    for name, method in methods.items():
        kept = {}

        def segment(image, method=method, kept=kept):
            labels = method.segment(image)
            kept[len(kept)] = labels
            return labels

        scores[name] = metrics.evaluate_segmenter(segment, images, categories=categories)
        predictions[name] = kept
        say(f"{name}: mean F1 {np.mean([r.f1 for r in scores[name]]):.3f}")
    multi = list(methods)[-1]
    for i, (stem, _, _) in enumerate(images):
        io.write_labels(out / "predictions" / f"{stem}_label.tiff", predictions[multi][i])

    figures = []
    for c in range(4):
        i = categories.index(c)
        stem, image, y_true = images[i]
        path = out / "figures" / f"class{c}_{stem}.png"
        shown = {name.split(",")[0]: predictions[name][i] for name in methods}
        _figure(path, image, y_true, shown, f"class {c}: {stem}")
        figures.append(path)

    routed = [segmenter.route(image) for _, image, _ in images]
    router_accuracy = float(np.mean(np.array(routed) == np.array(categories)))
    table4 = metrics.class_table(scores)
    means = {name: float(np.mean([r.f1 for r in rows])) for name, rows in scores.items()}
    table4_reading = reading(methods, means)
    routes = ", ".join(f"class {c}: {s}" for c, s in sorted(segmenter.routing.items()))
    table5 = metrics.timing_table(scores[multi])
    stage_lines = "\n".join(
        f"| {s.name} | {s.seconds:.0f} | {s.val_f1:.3f} | {'yes' if s.kept else 'no'} | {s.detail} |"
        for s in stages
    )
    stage_table = (
        "| stage | seconds | validation score | kept | note |\n|---|---|---|---|---|\n"
        + stage_lines
    )
    text = (
        f"""# cellseg-lite demo report

cellseg-lite {__version__}, preset `{preset_name}`, training budget {minutes:g} minutes
({train_seconds:.0f} s measured), {4 * n_train} synthetic training images and {4 * n_test}
held-out ones of {size} x {size} pixels (seed {seed}); routing `{routing}` ({routes}).

## Training

{stage_table}

Each class's fine-tuned model is kept or dropped on the training images held out for selection
(12% of each class: one image with the default 8 per class), far too few to trust the choice.
The demo makes it anyway, to show the stage; `train.train_multistream` on real data fine-tunes
only classes with at least {train.MIN_SELECTION_IMAGES} selection images.

Router accuracy on the held-out images: {router_accuracy:.3f}.

## Challenge F1 per low-level class (the shape of the paper's Table 4)

{table4}

{table4_reading}

## Running time against the challenge's tolerance (the shape of the paper's Table 5)

{table5}

## Overlays

"""
        + "\n".join(f"![{p.stem}](figures/{p.name})" for p in figures)
        + "\n"
    )
    report_md = out / "report.md"
    _write_text(report_md, text)
    html_parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>cellseg-lite demo report</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:"
        "collapse}td,th{border:1px solid #999;padding:2px 6px}img{max-width:100%}</style>",
        "</head><body><h1>cellseg-lite demo report</h1>",
        f"<p>cellseg-lite {__version__}, preset <code>{preset_name}</code>, training budget "
        f"{minutes:g} minutes ({train_seconds:.0f} s measured), {4 * n_train} training and "
        f"{4 * n_test} held-out synthetic images of {size} x {size} pixels; routing "
        f"<code>{html.escape(routing)}</code> ({html.escape(routes)}).</p>",
        "<h2>Training</h2>",
        _markdown_table_to_html(stage_table),
        f"<p>Router accuracy on the held-out images: {router_accuracy:.3f}.</p>",
        "<h2>Challenge F1 per low-level class (Table 4)</h2>",
        _markdown_table_to_html(table4),
        f"<p>{html.escape(table4_reading)}</p>" if table4_reading else "",
        "<h2>Running time against the tolerance (Table 5)</h2>",
        _markdown_table_to_html(table5),
        "<h2>Overlays</h2>",
        *(f"<p><img src='figures/{p.name}' alt='{p.stem}'></p>" for p in figures),
        "</body></html>",
    ]
    report_html = out / "report.html"
    _write_text(report_html, "\n".join(html_parts))
    return DemoResult(report_md, report_html, model_path, scores, train_seconds)
