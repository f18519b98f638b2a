"""Low-level categorisation: the HSV and maximum-cell-area cues and the paper's 4-way rule.

Lou, Yu et al. (NeurIPS 2022 Cell Segmentation Challenge, team sribd-med) sort
every training image into one of four classes before training one model per
class, using cues a student can compute by hand:

* class 0, **one-channel**: the image has a single channel, ``(H, W)`` or ``(H, W, 1)``;
* class 1, **gray**: a colour-stored image whose mean HSV saturation is low and
  whose mean HSV value is moderate (phase contrast, DIC);
* class 2, **colour, large cells**: the largest labelled cell is larger than
  ``max_area`` pixels;
* class 3, **colour, small cells**: everything else.

The paper uses ``max_area=8000``; the authors' released code uses 30000. Both are
in :data:`PRESETS`. The paper's text words the saturation test as "larger
than" the threshold, but the code tests ``s.mean() <= 0.1 and 0.1 <= v.mean()
<= 0.6``: low saturation is what "gray" means, and this module follows the code. The pseudo labels that feed the area cue for unlabelled
images belong to a later chapter; here the labels are given.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from cellseg_lite._checks import as_image, as_labels, check_same_size
from cellseg_lite._errors import CellSegError

__all__ = [
    "CATEGORY_NAMES",
    "PRESETS",
    "Categorization",
    "explain",
    "hsv_cues",
    "low_level_category",
    "max_cell_area",
]

#: Human names of the four classes, indexed by class number.
CATEGORY_NAMES: dict[int, str] = {
    0: "one-channel",
    1: "gray (phase/DIC)",
    2: "colour, large cells",
    3: "colour, small cells",
}

#: The thresholds of the paper text and of the authors' released code; they
#: differ only in the area that separates large from small cells. Use as
#: ``low_level_category(image, labels, **PRESETS["code"])``.
PRESETS: dict[str, dict] = {
    "paper": {"saturation": 0.1, "value_range": (0.1, 0.6), "max_area": 8000},
    "code": {"saturation": 0.1, "value_range": (0.1, 0.6), "max_area": 30000},
}

# Pixels per block when computing the cues: bounds the float64 temporaries.
_BLOCK_PIXELS = 1 << 20


class Categorization(NamedTuple):
    """One decision of the 4-way rule, with the cues it was taken on.

    ``saturation`` and ``value`` are the mean HSV saturation and value (in
    [0, 1]), ``max_area`` the largest cell in pixels and ``branch`` a sentence
    saying which test decided.
    """

    category: int
    saturation: float
    value: float
    max_area: int
    branch: str


def _unit_scale(image: np.ndarray) -> float:
    """The number that maps ``image`` to [0, 1], after checking the intensities can be read as light.

    255 for uint8 and 65535 for uint16 (scikit-image's ``img_as_float``); any
    other dtype: 1 when its values lie in [0, 1], else its maximum.
    """
    if image.dtype == np.uint8:
        return 255.0
    if image.dtype == np.uint16:
        return 65535.0
    low, high = float(image.min()), float(image.max())  # NaN propagates through both
    if not (np.isfinite(low) and np.isfinite(high)):
        raise CellSegError(
            "image: contains NaN or infinite values; HSV cues need finite intensities"
        )
    if low < 0:
        raise CellSegError(f"image: HSV cues need non-negative intensities, found minimum {low:g}")
    return high if high > 1.0 else 1.0


def hsv_cues(image: np.ndarray) -> tuple[float, float]:
    """Mean HSV saturation and mean HSV value of an image, both in [0, 1].

    The cues are the S and V channels of ``skimage.color.rgb2hsv`` averaged over
    all pixels, as in the paper: ``V = max(R, G, B)`` and
    ``S = (max - min) / max`` (0 where ``max`` is 0). Intensities are first
    brought to [0, 1] the way scikit-image does for its own dtypes: uint8 is
    divided by 255 and uint16 by 65535. Any other dtype (float, int32, ...) is
    used as is when its values already lie in [0, 1], and is otherwise divided
    by its own maximum (the cue then describes relative brightness).

    ``image`` is ``(H, W)``, ``(H, W, 1)`` or ``(H, W, C)``. A one-channel image
    has no colour: it returns ``(0.0, mean intensity)``. With more than three
    channels the first three are read as RGB; a two-channel image is read as
    red and green with an empty blue channel. Saturation does not depend on the intensity
    scale, so it is computed on the raw values. Rows are processed in blocks,
    so a challenge image of 10,000 x 8,000 pixels needs tens of MB, not GB.
    """
    image = as_image(image, "image")
    scale = _unit_scale(image)
    planes = image if image.ndim == 3 else image[..., None]
    channels = planes.shape[2]
    n_pixels = planes.shape[0] * planes.shape[1]
    rows = max(1, _BLOCK_PIXELS // planes.shape[1])
    # Sums are taken around the first pixel's values (shifted data), so that a
    # uniform image has exactly that pixel's S and V, whatever its size: an
    # image sitting on a threshold lands on the documented side of it.
    s_shift = v_shift = None
    s_sum = v_sum = 0.0
    for start in range(0, planes.shape[0], rows):
        block = planes[start : start + rows, :, :3]
        v = block.max(axis=-1).astype(np.float64)
        # One channel: min = max, so S = 0. Two channels: the missing blue is 0.
        low = block.min(axis=-1).astype(np.float64) if channels != 2 else np.zeros_like(v)
        delta = v - low
        s = np.divide(delta, v, out=np.zeros_like(v), where=delta > 0)
        if s_shift is None:
            s_shift, v_shift = float(s.flat[0]), float(v.flat[0])
        s_sum += float(np.sum(s - s_shift))
        v_sum += float(np.sum(v - v_shift))
    return s_shift + s_sum / n_pixels, (v_shift + v_sum / n_pixels) / scale


def max_cell_area(labels: np.ndarray) -> int:
    """Area in pixels of the largest instance of an ``(H, W)`` label image; 0 when there are no cells.

    The authors' code takes the maximum of an empty list on an image without
    cells and crashes; here such an image simply has no large cell.
    """
    labels = as_labels(labels, "labels")
    flat = labels.ravel()
    high = int(flat.max())
    if high == 0:
        return 0
    if high <= 4 * flat.size:
        counts = np.bincount(flat)[1:]
    else:  # a few very large ids: bincount would allocate one slot per id
        ids, counts = np.unique(flat, return_counts=True)
        counts = counts[ids > 0]
    return int(counts.max())


def _check_thresholds(saturation, value_range, max_area) -> tuple[float, float, float, float]:
    """Validate the rule's three settings and return them as plain numbers."""
    try:
        saturation = float(saturation)
    except (TypeError, ValueError) as err:
        raise CellSegError(f"saturation: expected a number, got {saturation!r}") from err
    if not 0.0 <= saturation <= 1.0:
        raise CellSegError(f"saturation: must lie in [0, 1], got {saturation}")
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError) as err:
        raise CellSegError(
            f"value_range: expected two numbers (low, high), got {value_range!r}"
        ) from err
    if not 0.0 <= low <= high <= 1.0:
        raise CellSegError(f"value_range: need 0 <= low <= high <= 1, got ({low}, {high})")
    try:
        max_area = float(max_area)
    except (TypeError, ValueError) as err:
        raise CellSegError(f"max_area: expected a number of pixels, got {max_area!r}") from err
    if not math.isfinite(max_area) or max_area < 0:
        raise CellSegError(f"max_area: must be a finite number of pixels >= 0, got {max_area}")
    return saturation, low, high, max_area


def _area_text(max_area: float) -> str:
    return str(int(max_area)) if float(max_area).is_integer() else str(max_area)


def explain(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    saturation: float = 0.1,
    value_range: tuple[float, float] = (0.1, 0.6),
    max_area: float = 8000,
) -> Categorization:
    """Apply the 4-way rule to an image and its ``(H, W)`` instance labels, and say why.

    The tests, in order, as in the authors' code:

    1. one channel, ``(H, W)`` or ``(H, W, 1)`` -> class 0;
    2. exactly three channels and ``mean S <= saturation`` and
       ``value_range[0] <= mean V <= value_range[1]`` (all bounds inclusive)
       -> class 1; images with more than three channels skip this test and
       count as colour, as in the code, and so do two-channel images (this
       project's choice: two stains are colour, not gray);
    3. largest cell ``> max_area`` pixels (strictly: a cell of exactly
       ``max_area`` pixels is small) -> class 2, otherwise class 3. An image
       with no cells has a largest cell of 0 pixels, hence class 3.

    Defaults are the paper's (``PRESETS["paper"]``); the released code uses
    ``max_area=30000`` (``PRESETS["code"]``).
    """
    saturation, v_low, v_high, max_area = _check_thresholds(saturation, value_range, max_area)
    image = as_image(image, "image")
    labels = as_labels(labels, "labels")
    check_same_size(image, labels, "image and labels")

    s_mean, v_mean = hsv_cues(image)
    area = max_cell_area(labels)
    channels = 1 if image.ndim == 2 else image.shape[2]
    cues = dict(saturation=s_mean, value=v_mean, max_area=area)
    if channels == 1:
        return Categorization(0, branch="one channel -> class 0 (one-channel)", **cues)

    if channels == 3:
        is_gray = s_mean <= saturation and v_low <= v_mean <= v_high
        gray_text = (
            f"mean S {s_mean:.3f} {'<=' if s_mean <= saturation else '>'} {saturation:g}, "
            f"mean V {v_mean:.3f} {'in' if v_low <= v_mean <= v_high else 'outside'} "
            f"[{v_low:g}, {v_high:g}]"
        )
        if is_gray:
            return Categorization(1, branch=f"{gray_text} -> class 1 (gray)", **cues)
        colour_text = f"colour ({gray_text})"
    else:
        colour_text = f"colour ({channels} channels: no gray test)"

    limit = _area_text(max_area)
    if area > max_area:
        return Categorization(
            2,
            branch=f"{colour_text}, largest cell {area} px > {limit} -> class 2 (large cells)",
            **cues,
        )
    return Categorization(
        3,
        branch=f"{colour_text}, largest cell {area} px <= {limit} -> class 3 (small cells)",
        **cues,
    )


def low_level_category(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    saturation: float = 0.1,
    value_range: tuple[float, float] = (0.1, 0.6),
    max_area: float = 8000,
) -> int:
    """The paper's low-level class (0-3) of an image with its ``(H, W)`` instance labels.

    0 one-channel, 1 gray, 2 colour with large cells, 3 colour with small
    cells; :func:`explain` gives the cues and the deciding test. Defaults are
    the paper's thresholds; ``**PRESETS["code"]`` gives the released code's.

    >>> import numpy as np
    >>> low_level_category(np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.int32))
    0
    """
    return explain(
        image, labels, saturation=saturation, value_range=value_range, max_area=max_area
    ).category
