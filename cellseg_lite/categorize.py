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
<= 0.6``: low saturation is what "gray" means, and this module follows the code.

Unlabelled images (the paper's Step 1) get *pseudo labels*: a segmenter, any
callable ``image -> (H, W) labels``, predicts the cells and its largest cell
feeds the area test (:func:`categorize_image`). The default segmenter is the
classical :func:`cellseg_lite.classical.threshold_watershed`, until a trained
StarDist stream takes its place. :func:`categorize_folder` sorts a whole
challenge-layout folder and writes the decisions to a CSV file.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Callable
from io import StringIO
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cellseg_lite._checks import as_image, as_labels, check_same_size
from cellseg_lite._errors import CellSegError, where

__all__ = [
    "AREA_SOURCES",
    "CATEGORY_NAMES",
    "PRESETS",
    "Categorization",
    "CategoryRow",
    "FolderCategories",
    "Segmenter",
    "categorize_folder",
    "categorize_image",
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


#: Where the largest-cell area of a decision came from: the image's own
#: labels, pseudo labels from a segmenter, or nowhere (an unlabelled image
#: decided before the area test: one-channel or gray).
AREA_SOURCES = ("labels", "pseudo", "none")


class Categorization(NamedTuple):
    """One decision of the 4-way rule, with the cues it was taken on.

    ``saturation`` and ``value`` are the mean HSV saturation and value (in
    [0, 1]), ``max_area`` the largest cell in pixels and ``branch`` a sentence
    saying which test decided. ``area_source`` (one of :data:`AREA_SOURCES`)
    says whether ``max_area`` was measured on the given labels (``"labels"``),
    on a segmenter's pseudo labels (``"pseudo"``), or not at all (``"none"``,
    with ``max_area`` ``None``: an unlabelled one-channel or gray image, whose
    class does not depend on cell size).
    """

    category: int
    saturation: float
    value: float
    max_area: int | None
    branch: str
    area_source: str = "labels"


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


def _rule_without_area(
    image: np.ndarray, s_mean: float, v_mean: float, saturation: float, v_low: float, v_high: float
) -> tuple[int | None, str]:
    """Tests 1 and 2 of the rule: ``(0 or 1, branch)`` when they decide, else ``(None, colour text)``."""
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels == 1:
        return 0, "one channel -> class 0 (one-channel)"
    if channels != 3:
        return None, f"colour ({channels} channels: no gray test)"
    gray_text = (
        f"mean S {s_mean:.3f} {'<=' if s_mean <= saturation else '>'} {saturation:g}, "
        f"mean V {v_mean:.3f} {'in' if v_low <= v_mean <= v_high else 'outside'} "
        f"[{v_low:g}, {v_high:g}]"
    )
    if s_mean <= saturation and v_low <= v_mean <= v_high:
        return 1, f"{gray_text} -> class 1 (gray)"
    return None, f"colour ({gray_text})"


def _area_rule(area: int, max_area: float, colour_text: str, cell: str) -> tuple[int, str]:
    """Test 3 of the rule: ``(2 or 3, branch)`` from the largest cell's area."""
    limit = _area_text(max_area)
    if area > max_area:
        return 2, f"{colour_text}, {cell} {area} px > {limit} -> class 2 (large cells)"
    return 3, f"{colour_text}, {cell} {area} px <= {limit} -> class 3 (small cells)"


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
    ``max_area=30000`` (``PRESETS["code"]``). For an image without labels, see
    :func:`categorize_image`.
    """
    saturation, v_low, v_high, max_area = _check_thresholds(saturation, value_range, max_area)
    image = as_image(image, "image")
    labels = as_labels(labels, "labels")
    check_same_size(image, labels, "image and labels")

    s_mean, v_mean = hsv_cues(image)
    area = max_cell_area(labels)
    category, branch = _rule_without_area(image, s_mean, v_mean, saturation, v_low, v_high)
    if category is None:
        category, branch = _area_rule(area, max_area, branch, "largest cell")
    return Categorization(category, s_mean, v_mean, area, branch, "labels")


#: A segmenter: any callable from an image (as given, ``(H, W)`` or ``(H, W, C)``,
#: native dtype) to its ``(H, W)`` integer instance labels.
Segmenter = Callable[[np.ndarray], np.ndarray]


def _check_segmenter(segmenter) -> None:
    if segmenter is not None and not callable(segmenter):
        raise CellSegError(
            f"segmenter: expected a callable image -> (H, W) labels, got {type(segmenter).__name__}"
        )


def categorize_image(
    image: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    segmenter: Segmenter | None = None,
    saturation: float = 0.1,
    value_range: tuple[float, float] = (0.1, 0.6),
    max_area: float = 8000,
) -> Categorization:
    """The 4-way rule for an image with or without labels: pseudo labels stand in for missing ones.

    With ``labels`` this is :func:`explain` (the segmenter is not called). Without,
    the paper's Step 1: the one-channel and gray tests need no cells, so a
    one-channel or gray image is decided at once, **without calling the
    segmenter** (its time would be wasted), and the result has
    ``max_area=None`` and ``area_source="none"``. A colour image is passed
    as is to ``segmenter(image) -> (H, W) labels`` (any callable: the classical
    :func:`cellseg_lite.classical.threshold_watershed`, or a trained model's
    segment function later in the book), and the largest of these pseudo-label
    cells decides between classes 2 and 3 (``area_source="pseudo"``).

    Raises:
        CellSegError: a colour image with neither labels nor a segmenter, a
            segmenter that is not callable or returns something that is not
            ``(H, W)`` labels of the image's size, and every error of :func:`explain`.
    """
    if labels is not None:
        return explain(
            image, labels, saturation=saturation, value_range=value_range, max_area=max_area
        )
    saturation, v_low, v_high, max_area = _check_thresholds(saturation, value_range, max_area)
    _check_segmenter(segmenter)
    image = as_image(image, "image")
    s_mean, v_mean = hsv_cues(image)
    category, branch = _rule_without_area(image, s_mean, v_mean, saturation, v_low, v_high)
    if category is not None:
        return Categorization(category, s_mean, v_mean, None, branch, "none")
    if segmenter is None:
        raise CellSegError(
            f"image: a colour image without labels needs a segmenter ({branch}); its class "
            "depends on its largest cell, so pass labels or segmenter=... (for example "
            "cellseg_lite.classical.threshold_watershed) to make pseudo labels"
        )
    pseudo = as_labels(segmenter(image), "segmenter output")
    check_same_size(image, pseudo, "image and segmenter output")
    area = max_cell_area(pseudo)
    category, branch = _area_rule(area, max_area, branch, "largest pseudo-label cell")
    return Categorization(category, s_mean, v_mean, area, branch, "pseudo")


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


# ----------------------------------------------------------------------------- folders


class CategoryRow(NamedTuple):
    """One image of :func:`categorize_folder`: its decision and cues, as written to the CSV."""

    stem: str
    category: int
    category_name: str
    mean_s: float
    mean_v: float
    channels: int
    max_area: int | None
    area_source: str
    branch: str


class FolderCategories(NamedTuple):
    """The result of :func:`categorize_folder`.

    ``rows`` holds one :class:`CategoryRow` per image that was categorised,
    ``errors`` one ``(stem, message)`` pair per image that was skipped, and
    ``csv_path`` the CSV written (``None`` when none was asked for).
    """

    rows: tuple[CategoryRow, ...]
    errors: tuple[tuple[str, str], ...]
    csv_path: Path | None = None

    def counts(self) -> dict[int, int]:
        """Images per class, ``{0: n0, 1: n1, 2: n2, 3: n3}``."""
        found = dict.fromkeys(CATEGORY_NAMES, 0)
        for row in self.rows:
            found[row.category] += 1
        return found


def _folder_thresholds(preset, saturation, value_range, max_area) -> dict:
    """The preset's thresholds with the explicitly given ones on top, checked."""
    if preset not in PRESETS:
        raise CellSegError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    chosen = dict(PRESETS[preset])
    given = {"saturation": saturation, "value_range": value_range, "max_area": max_area}
    chosen.update({name: value for name, value in given.items() if value is not None})
    _check_thresholds(**chosen)
    return chosen


def _naming(path: Path, err: CellSegError) -> str:
    """The error's message, prefixed with ``path`` unless it already names that file."""
    message = str(err)
    return message if os.fspath(path) in message else f"{where(path)}: {message}"


def _write_rows(path: Path, rows: list[CategoryRow]) -> None:
    """Write the rows as CSV through :func:`cellseg_lite.io.atomic_write` (cues to 6 decimals)."""
    text = StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CategoryRow._fields)
    for row in rows:
        writer.writerow(
            [
                *row[:3],
                f"{row.mean_s:.6f}",
                f"{row.mean_v:.6f}",
                row.channels,
                "" if row.max_area is None else row.max_area,
                row.area_source,
                row.branch,
            ]
        )
    from cellseg_lite.io import atomic_write

    with atomic_write(path) as fh:
        fh.write(text.getvalue().encode("utf-8"))


def categorize_folder(
    root: str | os.PathLike,
    csv_path: str | os.PathLike | None = None,
    *,
    segmenter: Segmenter | None = None,
    preset: str = "paper",
    saturation: float | None = None,
    value_range: tuple[float, float] | None = None,
    max_area: float | None = None,
    strict: bool = False,
    progress: bool = True,
) -> FolderCategories:
    """Categorise every image of a challenge-layout folder, with pseudo labels where labels are missing.

    Images and labels are paired by :func:`cellseg_lite.datasets.find_pairs`
    (``root/images/<stem>.<ext>``, ``root/labels/<stem>_label.tiff``; the labels
    may be missing). A labelled image is decided on its labels; an unlabelled
    colour image on the pseudo labels of ``segmenter`` (default: the classical
    :func:`cellseg_lite.classical.threshold_watershed`), exactly as
    :func:`categorize_image` does. Thresholds are those of ``preset``
    (:data:`PRESETS`), each replaced by ``saturation``, ``value_range`` or
    ``max_area`` when given. With ``csv_path`` the rows are written there as CSV
    (atomically): ``stem, category, category_name, mean_s, mean_v, channels,
    max_area, area_source, branch``, ``max_area`` empty when it was not needed.

    A file that cannot be used (unreadable, labels of another size, a segmenter
    output that is not labels: any :class:`CellSegError`) does not stop a run
    over thousands of images: it is skipped, listed in ``errors`` with a
    message naming it, and one warning sums the skipped files up. With
    ``strict=True`` the first such file raises instead. Other exceptions
    (a bug, a GPU out of memory) always propagate. ``progress`` shows a tqdm bar.
    """
    from tqdm.auto import tqdm

    from cellseg_lite import io
    from cellseg_lite.datasets import find_pairs

    thresholds = _folder_thresholds(preset, saturation, value_range, max_area)
    _check_segmenter(segmenter)
    if segmenter is None:
        from cellseg_lite.classical import threshold_watershed

        segmenter = threshold_watershed
    if csv_path is not None:
        csv_path = Path(csv_path)
        if csv_path.is_dir():
            raise CellSegError(f"{where(csv_path)}: is a folder; csv_path must name a file")
    root = Path(root)
    samples = find_pairs(root, require_labels=False)

    rows: list[CategoryRow] = []
    errors: list[tuple[str, str]] = []
    for sample in tqdm(samples, desc="categorising", unit="image", disable=not progress):
        try:
            image = io.read_image(sample.image_path)
            labels = None
            if sample.label_path is not None:
                labels = io.read_labels(sample.label_path)
                check_same_size(image, labels, sample.label_path)
            result = categorize_image(image, labels, segmenter=segmenter, **thresholds)
        except CellSegError as err:
            message = _naming(sample.image_path, err)
            if strict:
                raise CellSegError(message) from err
            errors.append((sample.stem, message))
            continue
        rows.append(
            CategoryRow(
                sample.stem,
                result.category,
                CATEGORY_NAMES[result.category],
                result.saturation,
                result.value,
                1 if image.ndim == 2 else image.shape[2],
                result.max_area,
                result.area_source,
                result.branch,
            )
        )
    if errors:
        stems = ", ".join(stem for stem, _ in errors[:5]) + (", ..." if len(errors) > 5 else "")
        warnings.warn(
            f"{where(root)}: {len(errors)} of {len(samples)} images could not be categorised "
            f"and were skipped (see .errors): {stems}; the first: {errors[0][1]}",
            stacklevel=2,
        )
    if csv_path is not None:
        _write_rows(csv_path, rows)
    return FolderCategories(tuple(rows), tuple(errors), csv_path)
