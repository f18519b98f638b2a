"""Pictures of images and instance labels: overlays, contours, galleries, the pipeline diagram,
and explorers that redraw a post-processing step as sliders move.

matplotlib, ipywidgets and the streams are imported inside the functions so that importing this
module stays cheap. Every explorer draws a static figure at its default settings first (what a
reader of the book without a kernel sees) and returns its widget only when ipywidgets imports.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from cellseg_lite._checks import as_image, as_labels, check_same_size
from cellseg_lite._errors import CellSegError

__all__ = [
    "ROUTES",
    "ExplorerResult",
    "display_image",
    "explore_stardist",
    "explore_watershed",
    "label_colors",
    "overlay",
    "plot_contours",
    "plot_gallery",
    "plot_instances",
    "plot_pipeline",
    "stardist_view",
    "watershed_view",
]


def display_image(image: np.ndarray) -> np.ndarray:
    """Any supported image as ``(H, W, 3)`` uint8 for display, normalised as the networks see it
    (the challenge's rule with ``sparse_cells=True``: a few cells on a dark slide stay visible)."""
    from cellseg_lite.io import normalize_image

    return normalize_image(as_image(image), sparse_cells=True)


def label_colors(n: int, *, seed: int = 0) -> np.ndarray:
    """``(n, 3)`` float colours in [0, 1], bright and well separated, fixed by ``seed``.

    Random hues at high saturation, so touching cells rarely share a colour.
    """
    from matplotlib.colors import hsv_to_rgb

    rng = np.random.default_rng(seed)
    hsv = np.stack([rng.random(n), rng.uniform(0.6, 1.0, n), rng.uniform(0.75, 1.0, n)], axis=1)
    return hsv_to_rgb(hsv)


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    alpha: float = 0.4,
    contours: bool = True,
    contour_color: Sequence[float] = (1.0, 1.0, 0.0),
    seed: int = 0,
) -> np.ndarray:
    """Colour each instance over the image: ``(H, W, 3)`` uint8.

    ``alpha`` is the opacity of the fill (0 keeps only the contours); ``contours`` draws each
    instance's inner boundary in ``contour_color``.
    """
    from skimage.segmentation import find_boundaries

    base = display_image(image).astype(np.float32) / 255.0
    labels = as_labels(labels)
    check_same_size(base, labels, "overlay")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    colors = np.vstack([np.zeros((1, 3)), label_colors(int(labels.max()), seed=seed)])
    fill = colors[labels].astype(np.float32)
    inside = labels > 0
    out = base.copy()
    out[inside] = (1 - alpha) * base[inside] + alpha * fill[inside]
    if contours:
        edges = find_boundaries(labels, mode="inner")
        out[edges] = np.asarray(contour_color, dtype=np.float32)
    return np.round(out * 255).astype(np.uint8)


def plot_instances(image, labels, *, ax=None, title: str | None = None, alpha: float = 0.4):
    """Show :func:`overlay` on a matplotlib axis (made when not given); returns the axis."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(overlay(image, labels, alpha=alpha))
    _finish(ax, title if title is not None else f"{int(np.max(labels))} instances")
    return ax


def plot_contours(
    image,
    labels,
    *,
    ax=None,
    title: str | None = None,
    color: str = "yellow",
    linewidth: float = 0.8,
    other=None,
    other_color: str = "cyan",
):
    """Draw the outline of every instance over the image; ``other`` adds a second label image
    (for example a prediction over the ground truth) in ``other_color``. Returns the axis."""
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    base = display_image(image)
    ax.imshow(base)
    for lab, col in ((labels, color), (other, other_color)):
        if lab is None:
            continue
        lab = as_labels(lab)
        check_same_size(base, lab, "plot_contours")
        edges = find_boundaries(lab, mode="inner").astype(float)
        ax.contour(edges, levels=[0.5], colors=col, linewidths=linewidth)
    _finish(ax, title)
    return ax


def plot_gallery(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray] | None = None,
    *,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    size: float = 3.0,
):
    """A grid of images, with instance overlays when ``labels`` is given. Returns the figure."""
    import matplotlib.pyplot as plt

    n = len(images)
    if n == 0:
        raise ValueError("plot_gallery needs at least one image")
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        title = titles[i] if titles is not None else None
        if labels is None:
            ax.imshow(display_image(images[i]))
            _finish(ax, title)
        else:
            plot_instances(images[i], labels[i], ax=ax, title=title)
    fig.tight_layout()
    return fig


def _finish(ax, title: str | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


# --------------------------------------------------------------------------- the pipeline

#: Which stream segments each low-level class: the paper's text, the authors' released code, and
#: HoVer for every class (the names of :data:`cellseg_lite.infer.ROUTINGS`, which this module does
#: not import: it would pull in torch).
ROUTES: dict[str, dict[int, str]] = {
    "paper": {0: "StarDist", 1: "HoVer", 2: "StarDist", 3: "StarDist"},
    "code": {0: "StarDist", 1: "StarDist", 2: "StarDist", 3: "HoVer"},
    "hover": {0: "HoVer", 1: "HoVer", 2: "HoVer", 3: "HoVer"},
}


def plot_pipeline(*, routing: str = "paper", examples: bool = True, seed: int = 1):
    """The multi-stream method as a diagram: image -> router -> class -> stream -> labels.

    ``routing`` picks the class-to-stream map of :data:`ROUTES` (``"paper"``: HoVer for class 1;
    ``"code"``: HoVer for class 3; ``"hover"``: HoVer for all). With ``examples``, one synthetic image per class
    (:func:`cellseg_lite.synthetic.make_image`, ``seed``) stands in each class box and the
    labels box shows its instances. Returns the figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    from cellseg_lite.categorize import CATEGORY_NAMES

    if routing not in ROUTES:
        raise CellSegError(
            f"routing: expected one of {', '.join(map(repr, ROUTES))}, got {routing!r}"
        )
    route = ROUTES[routing]
    height = 4.9
    fig = plt.figure(figsize=(12, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, height)
    ax.axis("off")
    colours = {"StarDist": "#d9ead3", "HoVer": "#fce5cd", "router": "#cfe2f3", "io": "#eeeeee"}

    def box(x, y, w, h, text, colour, size=9, weight="normal"):
        ax.add_patch(
            FancyBboxPatch(
                (x, y),
                w,
                h,
                boxstyle="round,pad=0.04,rounding_size=0.12",
                facecolor=colour,
                edgecolor="0.3",
                linewidth=1,
            )
        )
        ax.text(
            x + w / 2,
            y + h / 2,
            text,
            ha="center",
            va="center",
            fontsize=size,
            weight=weight,
            wrap=True,
        )

    def arrow(x0, y0, x1, y1, colour="0.25"):
        ax.add_patch(
            FancyArrowPatch(
                (x0, y0),
                (x1, y1),
                arrowstyle="-|>",
                mutation_scale=12,
                color=colour,
                linewidth=1.2,
                shrinkA=2,
                shrinkB=2,
            )
        )

    pictures = {}
    if examples:
        from cellseg_lite import synthetic

        pictures = {c: synthetic.make_image(c, size=(128, 128), seed=seed) for c in range(4)}

    box(0.15, 1.55, 1.7, 1.5, "any image\n1-3+ channels\n8/16 bit, any size", colours["io"])
    box(
        2.35,
        1.55,
        2.0,
        1.5,
        "router\nResNet18, 4 outputs\n\ntrained on the\n4-way rule's labels",
        colours["router"],
    )
    arrow(1.9, 2.3, 2.3, 2.3)
    rows = [3.55, 2.45, 1.35, 0.25]
    for c, y in enumerate(rows):
        x = 5.0
        if examples:
            image, _ = pictures[c]
            inset = fig.add_axes((x / 12, y / height, 0.8 / 12, 0.8 / height))
            inset.imshow(display_image(image))
            inset.set_xticks([])
            inset.set_yticks([])
            x += 0.85
        box(x, y, 1.75, 0.8, f"class {c}\n{CATEGORY_NAMES[c]}", "white", size=8)
        arrow(4.4, 2.3, 4.95, y + 0.4)
    streams = {"StarDist": 2.85, "HoVer": 0.65}
    used = [name for name in streams if name in route.values()]
    if len(used) == 1:  # one stream serves every class: one box, level with the router
        streams = {used[0]: 1.7}
    how = {"StarDist": "star polygons, NMS", "HoVer": "HV maps, watershed"}
    for name, y in streams.items():
        classes = ", ".join(str(c) for c in range(4) if route[c] == name)
        box(
            8.3,
            y,
            2.0,
            1.2,
            f"ConvNeXt-{name}\nfine-tuned on class {classes}\n\n{how[name]}",
            colours[name],
            size=8.5,
        )
    for c, y in enumerate(rows):
        target = streams[route[c]] + 0.6
        arrow(5.85 + 1.75 if examples else 6.75, y + 0.4, 8.25, target)
    if examples:
        image, labels = pictures[3]
        inset = fig.add_axes((10.75 / 12, 1.75 / height, 1.1 / 12, 1.1 / height))
        inset.imshow(overlay(image, labels))
        inset.set_xticks([])
        inset.set_yticks([])
    ax.text(11.3, 1.45, "instance labels\n(0 = background)", ha="center", va="top", fontsize=8.5)
    for y in streams.values():
        arrow(10.35, y + 0.6, 10.7, 2.3)
    ax.text(
        6,
        4.5,
        f"route, then segment ({routing} routing)",
        ha="center",
        va="top",
        fontsize=11,
        weight="bold",
    )
    return fig


# --------------------------------------------------------------------------- explorers


class ExplorerResult(NamedTuple):
    """What an explorer shows for one setting: the instance ``labels (H, W)``, their count and,
    with ground truth, the challenge's F1 (None without)."""

    labels: np.ndarray
    n_cells: int
    f1: float | None

    def summary(self) -> str:
        score = "" if self.f1 is None else f", F1 {self.f1:.3f}"
        return f"{self.n_cells} cells{score}"


def _score(labels: np.ndarray, y_true, drop_boundary: bool) -> ExplorerResult:
    from cellseg_lite import metrics

    f1 = None
    if y_true is not None:
        f1 = metrics.f1_score(y_true, labels, drop_boundary=drop_boundary)
    return ExplorerResult(labels, int(labels.max()), f1)


def _check_explorer_inputs(image, maps: np.ndarray, y_true, name: str):
    base = display_image(image)
    check_same_size(base, maps, name)
    if y_true is not None:
        y_true = as_labels(y_true, "y_true")
        check_same_size(base, y_true, "y_true")
    return base, y_true


def stardist_view(
    prob,
    dist,
    prob_thresh: float = 0.5,
    nms_thresh: float = 0.4,
    *,
    y_true=None,
    drop_boundary: bool = True,
) -> ExplorerResult:
    """StarDist instances (:func:`cellseg_lite.streams.stardist.instances`) at one setting,
    scored against ``y_true (H, W)`` when given: what :func:`explore_stardist` draws."""
    from cellseg_lite.streams import stardist

    labels = stardist.instances(prob, dist, prob_thresh, nms_thresh)
    return _score(labels, y_true, drop_boundary)


def watershed_view(
    foreground_prob,
    hv,
    prob_thresh: float = 0.6,
    marker_threshold: float | None = None,
    *,
    marker_min_prob: float | None = None,
    preset="scaled",
    y_true=None,
    drop_boundary: bool = True,
):
    """HoVer's watershed (:func:`cellseg_lite.streams.hover.watershed_steps`) at one setting:
    ``(steps, result)``, the intermediate maps and the scored instances. ``marker_threshold``
    and ``marker_min_prob`` override the preset's when given."""
    from cellseg_lite.streams import hover

    overrides = {} if marker_threshold is None else {"marker_threshold": marker_threshold}
    if marker_min_prob is not None:
        overrides["marker_min_prob"] = marker_min_prob
    steps = hover.watershed_steps(foreground_prob, hv, prob_thresh, preset=preset, **overrides)
    return steps, _score(steps.labels, y_true, drop_boundary)


def _in_kernel() -> bool:
    """True inside a Jupyter kernel, where figures are shown with ``display``."""
    shell = sys.modules.get("IPython")
    shell = shell.get_ipython() if shell is not None else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def _show(fig) -> None:
    """Show ``fig`` now, in order with the widget after it, and close it (no second copy at the
    end of the cell); outside a kernel the figure stays open for the caller."""
    if _in_kernel():
        import matplotlib.pyplot as plt
        from IPython.display import display

        display(fig)
        plt.close(fig)


def _sliders(specs, on_change):
    """FloatSliders from ``(name, value, low, high, step)`` specs, observed by ``on_change``."""
    import ipywidgets as widgets

    sliders = []
    for name, value, low, high, step in specs:
        slider = widgets.FloatSlider(
            value=value,
            min=low,
            max=high,
            step=step,
            description=name,
            continuous_update=False,
            readout_format=".2f",
            style={"description_width": "initial"},
        )
        slider.observe(on_change, names="value")
        sliders.append(slider)
    return sliders


def _explorer(specs, redraw, first_summary: str):
    """A VBox of sliders, a one-line summary and an output area that ``redraw(**values)`` fills
    with a new figure whenever a slider moves; None when ipywidgets is not installed."""
    try:
        import ipywidgets as widgets
    except ImportError:
        return None
    import matplotlib.pyplot as plt

    summary = widgets.HTML(value=first_summary)
    out = widgets.Output()
    sliders: list = []

    def on_change(_change):
        values = {s.description: s.value for s in sliders}
        fig, result = redraw(**values)
        summary.value = result.summary()
        if _in_kernel():
            from IPython.display import display

            with out:
                out.clear_output(wait=True)
                display(fig)
        plt.close(fig)

    sliders.extend(_sliders(specs, on_change))
    return widgets.VBox([widgets.HBox(sliders), summary, out])


def explore_stardist(
    image,
    prob,
    dist,
    *,
    y_true=None,
    prob_thresh: float = 0.5,
    nms_thresh: float = 0.4,
    drop_boundary: bool = True,
):
    """Explore StarDist's post-processing: probability and NMS threshold sliders redraw the
    instances of ``prob (H, W)`` and ``dist (R, H, W)`` over ``image``, with the challenge F1
    against ``y_true (H, W)`` when given.

    The static figure at ``prob_thresh`` / ``nms_thresh`` is always drawn first; returns an
    ipywidgets VBox to display, or None when ipywidgets is not installed.
    """
    import matplotlib.pyplot as plt

    prob_map = np.asarray(prob)
    base, y_true = _check_explorer_inputs(image, prob_map, y_true, "prob")

    def draw(prob_thresh, nms_thresh):
        result = stardist_view(
            prob, dist, prob_thresh, nms_thresh, y_true=y_true, drop_boundary=drop_boundary
        )
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
        shown = axes[0].imshow(prob_map, cmap="magma", vmin=0, vmax=1)
        if (prob_map > prob_thresh).any() and (prob_map <= prob_thresh).any():
            axes[0].contour(prob_map, levels=[prob_thresh], colors="cyan", linewidths=0.8)
        fig.colorbar(shown, ax=axes[0], fraction=0.046)
        _finish(axes[0], f"prob; candidates: prob > {prob_thresh:.2f} (cyan)")
        if y_true is None:
            plot_instances(base, result.labels, ax=axes[1], title=None)
        else:
            plot_contours(base, y_true, other=result.labels, ax=axes[1])
        detail = "truth yellow, prediction cyan: " if y_true is not None else ""
        _finish(axes[1], f"NMS {nms_thresh:.2f}: {detail}{result.summary()}")
        fig.tight_layout()
        return fig, result

    fig, result = draw(prob_thresh, nms_thresh)
    _show(fig)
    specs = [
        ("prob_thresh", prob_thresh, 0.05, 0.95, 0.05),
        ("nms_thresh", nms_thresh, 0.05, 0.95, 0.05),
    ]
    return _explorer(specs, draw, result.summary())


def explore_watershed(
    image,
    foreground_prob,
    hv,
    *,
    y_true=None,
    prob_thresh: float = 0.6,
    marker_threshold: float | None = None,
    marker_min_prob: float | None = None,
    preset="scaled",
    drop_boundary: bool = True,
):
    """Explore HoVer's marker-controlled watershed: sliders for the foreground threshold, the
    energy threshold below which pixels become markers and the cell probability that markers
    need (``marker_min_prob``, 0: none) redraw the energy, the markers and the cells of
    ``foreground_prob (H, W)`` and ``hv (2, H, W)``, with the F1 against ``y_true``.

    ``preset`` (a name of :data:`cellseg_lite.streams.hover.PRESETS` or a ``WatershedParams``)
    sets everything else; ``marker_threshold`` and ``marker_min_prob`` default to the preset's.
    The static figure at the defaults is always drawn first; returns an ipywidgets VBox, or
    None without ipywidgets.
    """
    import matplotlib.pyplot as plt

    from cellseg_lite.streams import hover

    prob_map = np.asarray(foreground_prob)
    base, y_true = _check_explorer_inputs(image, prob_map, y_true, "foreground_prob")
    params = (
        hover.PRESETS[preset] if isinstance(preset, str) and preset in hover.PRESETS else preset
    )
    if marker_threshold is None:
        marker_threshold = getattr(params, "marker_threshold", 0.5)
    if marker_min_prob is None:
        marker_min_prob = getattr(params, "marker_min_prob", 0.0)

    def draw(prob_thresh, marker_threshold, marker_min_prob):
        steps, result = watershed_view(
            foreground_prob,
            hv,
            prob_thresh,
            marker_threshold,
            marker_min_prob=marker_min_prob,
            preset=preset,
            y_true=y_true,
            drop_boundary=drop_boundary,
        )
        fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
        axes[0].imshow(steps.foreground, cmap="gray", interpolation="nearest")
        _finish(axes[0], f"foreground: prob >= {prob_thresh:.2f}")
        shown = axes[1].imshow(steps.energy, cmap="magma")
        fig.colorbar(shown, ax=axes[1], fraction=0.046)
        _finish(axes[1], "energy (high on boundaries)")
        markers = np.ma.masked_equal(steps.markers % 20 + (steps.markers > 0), 0)
        axes[2].set_facecolor("black")
        axes[2].imshow(markers, cmap="tab20", interpolation="nearest", vmin=1, vmax=20)
        where = f", prob >= {marker_min_prob:.2f}" if marker_min_prob > 0 else ""
        _finish(axes[2], f"markers: energy < {marker_threshold:.2f}{where} ({steps.markers.max()})")
        if y_true is None:
            plot_instances(base, result.labels, ax=axes[3], title=None)
        else:
            plot_contours(base, y_true, other=result.labels, ax=axes[3])
        _finish(axes[3], f"watershed: {result.summary()}")
        fig.tight_layout()
        return fig, result

    fig, result = draw(prob_thresh, marker_threshold, marker_min_prob)
    _show(fig)
    high = 0.95 if getattr(params, "energy", "slope") == "minmax" else 2.0
    specs = [
        ("prob_thresh", prob_thresh, 0.05, 0.95, 0.05),
        ("marker_threshold", float(marker_threshold), 0.05, high, 0.05),
        ("marker_min_prob", float(marker_min_prob), 0.0, 0.99, 0.01),  # 0.9-0.99 are tuned
    ]
    return _explorer(specs, draw, result.summary())
