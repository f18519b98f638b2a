"""Pictures of images and instance labels: overlays, contours and small galleries.

matplotlib is imported inside the plotting functions so that importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellseg_lite._checks import as_image, as_labels, check_same_size

__all__ = [
    "display_image",
    "label_colors",
    "overlay",
    "plot_contours",
    "plot_gallery",
    "plot_instances",
]


def display_image(image: np.ndarray) -> np.ndarray:
    """Any supported image as ``(H, W, 3)`` uint8 for display, with the challenge's normalisation."""
    from cellseg_lite.io import normalize_image

    return normalize_image(as_image(image))


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
