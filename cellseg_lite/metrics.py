"""The NeurIPS 2022 Cell Segmentation Challenge's evaluation rule, computed by counting.

Per image the challenge deletes every cell touching the outer 2-pixel frame (in
ground truth and prediction separately), builds the IoU table of all cell pairs,
matches cells one-to-one by linear assignment on the cost
``-(IoU >= t) - IoU / (2 n_min)`` and scores F1 from the matched pairs with
IoU >= t; images of 25,000,000 pixels or more are scored in 2000 x 2000 tiles.
Reference: the challenge's evaluation script, ``baseline/compute_metric.py`` in
github.com/JunMa11/NeurIPS-CellSeg (its matching comes from stardist/cellpose),
and Ma et al., "The multimodality cell segmentation challenge: toward universal
solutions", Nature Methods 2024.

This module gives the same numbers without the dense ``n_true x n_pred`` table:
one pass over the pixels finds the runs of equal (true, pred) ids in raster
order, and every count is taken over those runs. A cell can reach IoU > 0.5
with at most one other cell, so above 0.5 the pairs over the threshold are
already the matching; the assignment is solved (sparsely, per connected group
of overlapping cells) only where they are not one-to-one: exact ties at 0.5 and
lower thresholds.

>>> import numpy as np
>>> y_true = np.zeros((32, 32), np.int32); y_true[8:16, 8:16] = 1
>>> y_pred = np.roll(y_true, 2, axis=1)            # IoU 48 / 80 = 0.6
>>> f1_score(y_true, y_pred)
1.0
>>> f1_score(y_true, y_pred, iou_threshold=0.7)
0.0
"""

from __future__ import annotations

import contextlib
import csv
import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cellseg_lite._checks import as_labels
from cellseg_lite._errors import CellSegError, where

__all__ = [
    "BOUNDARY_WIDTH",
    "TILE_SIZE",
    "TILE_THRESHOLD_PIXELS",
    "ErrorKinds",
    "FolderReport",
    "ImageScore",
    "Matching",
    "SegmenterScore",
    "class_table",
    "error_kinds",
    "evaluate_folder",
    "evaluate_segmenter",
    "f1_score",
    "match",
    "remove_boundary_cells",
    "time_tolerance",
    "timing_table",
]

#: Width in pixels of the outer frame whose cells the challenge leaves out.
BOUNDARY_WIDTH = 2
#: Images with at least this many pixels are scored tile by tile.
TILE_THRESHOLD_PIXELS = 25_000_000
#: Side of the square tiles large images are cut into (after zero padding).
TILE_SIZE = 2000

#: File name endings of label images, as the challenge names them (``<stem>_label.tiff``).
LABEL_SUFFIXES = ("_label.tiff", "_label.tif", "_label.png")


class Matching(NamedTuple):
    """Counts and scores of one image (or the sum over its tiles), as the challenge defines them.

    ``precision = tp / n_pred``, ``recall = tp / n_true``, ``f1 = 2 tp / (n_true + n_pred)``
    (the challenge writes ``2 P R / (P + R)``: the same number, here rounded once);
    all three are 0 when ``tp == 0``, which includes an image with no cells at all
    (the challenge's convention). ``mean_matched_iou`` is the mean IoU of the
    true-positive pairs (0 when there are none).
    """

    iou_threshold: float
    n_true: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    mean_matched_iou: float

    def __repr__(self) -> str:
        return (
            f"Matching(iou_threshold={self.iou_threshold:g}, n_true={self.n_true}, "
            f"n_pred={self.n_pred}, tp={self.tp}, fp={self.fp}, fn={self.fn}, "
            f"precision={self.precision:.4f}, recall={self.recall:.4f}, f1={self.f1:.4f}, "
            f"mean_matched_iou={self.mean_matched_iou:.4f})"
        )


class ImageScore(NamedTuple):
    """One row of a folder evaluation: the image's stem and its challenge counts and scores."""

    stem: str
    n_true: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float


class ErrorKinds(NamedTuple):
    """What the challenge's false negatives and false positives of one image are made of.

    Each true cell left unmatched (a false negative) is one of:

    - ``missed``: predicted cells cover less than half of it;
    - ``split``: together they cover at least half of it, but no single one does;
    - ``merged``: one predicted cell covers at least half of it *and* at least half of another
      true cell (two or more cells read as one);
    - ``outline``: one predicted cell covers at least half of it and of no other true cell, yet
      their IoU stays under the threshold (the outline spills over or falls short).

    Each predicted cell left unmatched (a false positive) is one of:

    - ``merger``: it covers at least half of two or more true cells (the other side of
      ``merged``);
    - ``on_cell``: it covers at least half of one true cell, or at least half of it lies on
      true cells (a piece of a split cell, or an outline too far off);
    - ``background``: neither (debris, noise, or a cell the frame rule took out of the truth).

    "Half" is fixed, whatever the IoU threshold of the matching. ``fn = missed + split +
    merged + outline`` and ``fp = merger + on_cell + background`` are the counts of
    :class:`Matching`, and ``f1`` its F1.
    """

    iou_threshold: float
    tp: int
    missed: int
    split: int
    merged: int
    outline: int
    merger: int
    on_cell: int
    background: int

    @property
    def fn(self) -> int:
        return self.missed + self.split + self.merged + self.outline

    @property
    def fp(self) -> int:
        return self.merger + self.on_cell + self.background

    @property
    def f1(self) -> float:
        """The challenge F1 of the same matching (:attr:`Matching.f1`), from these counts."""
        return _matching(self.iou_threshold, self.tp + self.fn, self.tp + self.fp, self.tp, 0.0).f1


class FolderReport(NamedTuple):
    """A folder evaluation: per-image rows, their means (the challenge score is ``mean_f1``),
    the stems whose prediction file was missing (scored as empty predictions), where asked
    for, the errors of all images sorted by kind (:class:`ErrorKinds`, summed), and the stems of
    prediction files with no ground truth (``unscored``: not part of the score; often a name
    that does not match its image's)."""

    rows: tuple[ImageScore, ...]
    n_images: int
    mean_f1: float
    mean_precision: float
    mean_recall: float
    missing: tuple[str, ...]
    iou_threshold: float = 0.5
    kinds: ErrorKinds | None = None
    unscored: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"FolderReport(n_images={self.n_images}, mean_f1={self.mean_f1:.4f}, "
            f"mean_precision={self.mean_precision:.4f}, mean_recall={self.mean_recall:.4f}, "
            f"missing={self.missing!r}, iou_threshold={self.iou_threshold:g})"
        )

    def report(self) -> str:
        """A few lines for a terminal: the mean scores and the missing predictions."""
        lines = [
            f"{self.n_images} images, IoU >= {self.iou_threshold:g}: mean F1 {self.mean_f1:.4f} "
            f"(mean precision {self.mean_precision:.4f}, mean recall {self.mean_recall:.4f})"
        ]
        if self.missing:
            lines.append(
                f"{len(self.missing)} missing predictions, scored 0: " + ", ".join(self.missing)
            )
        if self.unscored:
            lines.append(
                f"{len(self.unscored)} predictions with no ground truth, not scored: "
                + ", ".join(self.unscored)
            )
        if self.kinds is not None:
            k = self.kinds
            lines += [
                f"true cells not matched: {k.fn} of {k.tp + k.fn} (missed {k.missed}, split "
                f"{k.split}, merged {k.merged}, outline {k.outline})",
                f"predicted cells not matched: {k.fp} of {k.tp + k.fp} (merger {k.merger}, "
                f"on_cell {k.on_cell}, background {k.background})",
            ]
        return "\n".join(lines)


# --------------------------------------------------------------------------- checks


def _check_threshold(iou_threshold) -> float:
    """Return the IoU threshold as a float in (0, 1], or raise naming it."""
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, numbers.Real):
        raise CellSegError(f"iou_threshold: expected a number in (0, 1], got {iou_threshold!r}")
    value = float(iou_threshold)
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise CellSegError(f"iou_threshold: must be in (0, 1], got {iou_threshold!r}")
    return value


def _check_count(value, name: str, *, minimum: int) -> int:
    """Return ``value`` as an int >= ``minimum``, or raise naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise CellSegError(f"{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise CellSegError(f"{name}: must be >= {minimum}, got {value}")
    return int(value)


def _check_pair(y_true, y_pred, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Check two label images (called ``names`` in messages) and that they share one grid."""
    y_true = as_labels(y_true, names[0])
    y_pred = as_labels(y_pred, names[1])
    if y_true.shape != y_pred.shape:
        raise CellSegError(
            f"{names[1]}: shape {y_pred.shape} differs from {names[0]} shape {y_true.shape}"
        )
    return y_true, y_pred


# --------------------------------------------------------------------------- boundary rule


def _frame_ids(labels: np.ndarray, width: int, frame_shape: tuple[int, int]) -> np.ndarray:
    """Nonzero ids found in the outer ``width``-pixel frame of a ``frame_shape`` canvas.

    ``labels`` is the top-left ``(h, w)`` corner of that canvas, the rest being
    zero padding (the challenge's padded tiles); without padding the two shapes agree.
    """
    if width <= 0:
        return np.zeros(0, labels.dtype)
    canvas_h, canvas_w = frame_shape
    h, w = labels.shape
    strips = [labels[:width].ravel(), labels[:, :width].ravel()]
    bottom, right = max(canvas_h - width, 0), max(canvas_w - width, 0)
    if bottom < h:  # else the bottom frame lies in the padding
        strips.append(labels[bottom:].ravel())
    if right < w:
        strips.append(labels[:, right:].ravel())
    ids = np.unique(np.concatenate(strips))
    return ids[ids > 0]


def remove_boundary_cells(labels, width: int = BOUNDARY_WIDTH) -> np.ndarray:
    """Delete every cell with a pixel in the outer ``width``-pixel frame, then relabel 1..n.

    ``labels`` is ``(H, W)``; returns a new ``(H, W)`` int32 array. All pixels of a
    touching id go, even disconnected ones, as in the challenge's script (which is
    why this is not ``skimage.segmentation.clear_border``: that one relabels
    connected components first).

    >>> import numpy as np
    >>> labels = np.zeros((8, 8), np.int32); labels[1, 3] = 5; labels[4, 4] = 9
    >>> remove_boundary_cells(labels)[[1, 4], [3, 4]].tolist()
    [0, 1]
    """
    from skimage.segmentation import relabel_sequential

    labels = as_labels(labels, "labels")
    width = _check_count(width, "width", minimum=0)
    out = labels.copy()
    ids = _frame_ids(labels, width, labels.shape)
    if ids.size:
        out[np.isin(labels, ids)] = 0
    return relabel_sequential(out)[0].astype(np.int32, copy=False)


# --------------------------------------------------------------------------- counting


def _compact(
    ids: np.ndarray, weights: np.ndarray, drop: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Number the ids of the runs 0..n-1 and sum the run lengths (``weights``) per id.

    Background (0) and the ids in ``drop`` (boundary cells) get index -1. Returns
    ``(index per run (int64), area per cell (float64 holding exact integers))``.
    """
    top = int(ids.max()) if ids.size else 0
    if top <= 4 * ids.size + 4096:  # small ids: a lookup table by id beats sorting
        area = np.bincount(ids, weights=weights, minlength=top + 1)
        keep = area > 0
        keep[0] = False
        keep[drop] = False
        index = ids
    else:  # large ids: number the distinct ones
        values, index = np.unique(ids, return_inverse=True)
        area = np.bincount(index, weights=weights)
        keep = (values != 0) & ~np.isin(values, drop)
    lookup = np.cumsum(keep) - 1
    lookup[~keep] = -1
    return lookup[index], area[keep]


def _pair_counts(
    y_true: np.ndarray, y_pred: np.ndarray, width: int, frame_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Areas of the cells and of every overlapping (true, pred) pair, after the boundary rule.

    Returns ``(true_area, pred_area, true_index, pred_index, intersection)``: cells numbered
    0..n-1 in increasing id order, one entry per pair sharing at least one pixel, sorted by
    ``(true_index, pred_index)``; areas are float64 holding exact integer counts.
    """
    g = y_true.ravel()
    p = y_pred.ravel()
    n = g.size
    # Runs of constant (true, pred) ids in raster order: every count below is a
    # sum of run lengths, so the pixels are visited only here.
    change = np.empty(n, dtype=bool)
    change[0] = True
    np.not_equal(g[1:], g[:-1], out=change[1:])
    change[1:] |= p[1:] != p[:-1]
    starts = np.flatnonzero(change)
    lengths = np.diff(starts, append=n)
    true_index, true_area = _compact(g[starts], lengths, _frame_ids(y_true, width, frame_shape))
    pred_index, pred_area = _compact(p[starts], lengths, _frame_ids(y_pred, width, frame_shape))
    n_true, n_pred = true_area.size, pred_area.size
    if n_true == 0 or n_pred == 0:
        empty = np.zeros(0, np.int64)
        return true_area, pred_area, empty, empty, np.zeros(0)
    both = (true_index >= 0) & (pred_index >= 0)
    code = true_index[both] * n_pred + pred_index[both]
    if n_true * n_pred <= 4 * code.size + 4096:
        counts = np.bincount(code, weights=lengths[both], minlength=n_true * n_pred)
        codes = np.flatnonzero(counts)
        intersection = counts[codes]
    else:
        codes, inverse = np.unique(code, return_inverse=True)
        intersection = np.bincount(inverse, weights=lengths[both])
    pair_true, pair_pred = np.divmod(codes, n_pred)
    return true_area, pred_area, pair_true, pair_pred, intersection


def _pair_table(
    y_true: np.ndarray, y_pred: np.ndarray, width: int, frame_shape: tuple[int, int]
) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every overlapping (true, pred) cell pair, after the boundary rule.

    Returns ``(n_true, n_pred, true_index, pred_index, iou)``, pairs as in
    :func:`_pair_counts`; IoU in float64 as ``I / (A + B - I)`` on exact integer
    counts, like the challenge's script.
    """
    true_area, pred_area, pair_true, pair_pred, intersection = _pair_counts(
        y_true, y_pred, width, frame_shape
    )
    iou = intersection / (true_area[pair_true] + pred_area[pair_pred] - intersection)
    return true_area.size, pred_area.size, pair_true, pair_pred, iou


def _matched_pairs(
    n_true: int,
    n_pred: int,
    pair_true: np.ndarray,
    pair_pred: np.ndarray,
    iou: np.ndarray,
    threshold: float,
) -> np.ndarray:
    """Which pairs the challenge's assignment matches with IoU >= t (a mask over the pairs).

    The cost ``-(IoU >= t) - IoU / (2 n_min)`` first maximises the number of pairs
    over the threshold, then the IoU. Cells that share no pixel cost nothing, so
    the assignment splits over the connected components of the overlap graph. In a
    component where no cell has two candidate partners (IoU >= t), the candidates
    are the only matching of that size and so the optimum: this is every component
    when t > 0.5, and all but exact ties (two halves at IoU 0.5) when t = 0.5. The
    remaining components are solved exactly.
    """
    candidate = iou >= threshold
    if not candidate.any():
        return candidate
    degree_true = np.bincount(pair_true[candidate], minlength=n_true)
    degree_pred = np.bincount(pair_pred[candidate], minlength=n_pred)
    if degree_true.max() == 1 and degree_pred.max() == 1:
        return candidate

    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import connected_components

    n_cells = n_true + n_pred
    overlap = coo_array(
        (np.ones(iou.size, np.int8), (pair_true, n_true + pair_pred)), shape=(n_cells, n_cells)
    )
    _, component = connected_components(overlap, directed=False)
    conflicted = np.zeros(component.max() + 1, dtype=bool)
    conflicted[component[:n_true][degree_true > 1]] = True
    conflicted[component[n_true:][degree_pred > 1]] = True
    hard = np.flatnonzero(conflicted[component[pair_true]])
    matched = candidate.copy()
    matched[hard] = False
    chosen = _assign(pair_true[hard], pair_pred[hard], iou[hard], threshold, min(n_true, n_pred))
    matched[hard[chosen]] = True
    return matched


def _assign(
    pair_true: np.ndarray, pair_pred: np.ndarray, iou: np.ndarray, threshold: float, n_min: int
) -> np.ndarray:
    """The challenge's linear assignment on a sparse IoU table: the positions (in the pair
    arrays) of the matched pairs with IoU >= ``threshold``.

    Pairs absent from the table cost 0, like being left unmatched, so each true
    cell gets a dummy partner of cost 0 and the sparse solver (LAPJVsp,
    ``scipy.sparse.csgraph.min_weight_full_bipartite_matching``) always finds a
    full matching. Pairs must be sorted by ``(pair_true, pair_pred)``.
    """
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    _, row = np.unique(pair_true, return_inverse=True)
    pred_ids, col = np.unique(pair_pred, return_inverse=True)
    n_rows, n_cols = int(row.max()) + 1, pred_ids.size
    shift = 2.0  # every weight positive: the solver would read explicit zeros as no edge
    cost = shift - (iou >= threshold) - iou / (2 * n_min)
    dummy = np.arange(n_rows)
    graph = csr_array(
        (
            np.concatenate([cost, np.full(n_rows, shift)]),
            (np.concatenate([row, dummy]), np.concatenate([col, n_cols + dummy])),
        ),
        shape=(n_rows, n_cols + n_rows),
    )
    rows, cols = min_weight_full_bipartite_matching(graph)
    real = cols < n_cols
    # (row, col) codes are sorted like the pairs: find each matched pair by its code
    position = np.searchsorted(row * n_cols + col, rows[real] * n_cols + cols[real])
    return position[iou[position] >= threshold]


def _score_tile(
    y_true: np.ndarray, y_pred: np.ndarray, threshold: float, width: int, frame_shape
) -> tuple[int, int, int, float]:
    """``(n_true, n_pred, tp, matched IoU sum)`` of one image or one tile."""
    n_true, n_pred, pair_true, pair_pred, iou = _pair_table(y_true, y_pred, width, frame_shape)
    matched = _matched_pairs(n_true, n_pred, pair_true, pair_pred, iou, threshold)
    return n_true, n_pred, int(np.count_nonzero(matched)), float(iou[matched].sum())


def _matching(threshold: float, n_true: int, n_pred: int, tp: int, iou_sum: float) -> Matching:
    """Scores from counts; 0 when ``tp == 0`` (the challenge's convention)."""
    if tp == 0:
        precision = recall = f1 = mean_iou = 0.0
    else:
        precision, recall = tp / n_pred, tp / n_true
        f1 = 2 * tp / (n_true + n_pred)  # = 2PR / (P + R), rounded once
        mean_iou = iou_sum / tp
    return Matching(
        threshold, n_true, n_pred, tp, n_pred - tp, n_true - tp, precision, recall, f1, mean_iou
    )


def match(y_true, y_pred, iou_threshold: float = 0.5, *, drop_boundary: bool = True) -> Matching:
    """Match the cells of two ``(H, W)`` label images by the challenge's rule and score them.

    With ``drop_boundary`` (the challenge's setting) cells touching the outer
    2-pixel frame are left out of ground truth and prediction separately; turn it
    off to compare with tools that count every cell (``stardist.matching.matching``
    gives the same TP and F1 then, except for a pair whose IoU equals the threshold
    exactly, e.g. 14/20 at 0.7: IoU is float64 here as in the challenge's script,
    float32 in stardist). Images of ``TILE_THRESHOLD_PIXELS`` or more are
    zero-padded to multiples of ``TILE_SIZE`` and scored tile by tile, with or
    without ``drop_boundary`` (the boundary rule then applies to each tile's
    frame), counts summed over tiles.

    >>> import numpy as np
    >>> y_true = np.zeros((20, 20), np.int32); y_true[5:15, 5:15] = 1
    >>> y_pred = y_true.copy(); y_pred[5:15, 10:15] = 2      # one cell split in two halves
    >>> match(y_true, y_pred)
    Matching(iou_threshold=0.5, n_true=1, n_pred=2, tp=1, fp=1, fn=0, precision=0.5000, recall=1.0000, f1=0.6667, mean_matched_iou=0.5000)
    """
    return _match(y_true, y_pred, iou_threshold, drop_boundary, ("y_true", "y_pred"))


def _match(y_true, y_pred, iou_threshold, drop_boundary: bool, names: tuple[str, str]) -> Matching:
    """:func:`match`, with the argument names its messages should use."""
    y_true, y_pred = _check_pair(y_true, y_pred, names)
    threshold = _check_threshold(iou_threshold)
    frame = BOUNDARY_WIDTH if drop_boundary else 0
    return _matching(threshold, *_tiled(_score_tile, y_true, y_pred, threshold, frame))


def _tiled(score, y_true: np.ndarray, y_pred: np.ndarray, threshold: float, frame: int) -> list:
    """``score(y_true, y_pred, threshold, frame, frame_shape)`` of the whole image, or summed
    over its ``TILE_SIZE`` tiles (the challenge's rule for images of ``TILE_THRESHOLD_PIXELS``
    or more: zero padding to whole tiles adds no cells, so the tiles are cut as they fall)."""
    n_rows, n_cols = y_true.shape
    if n_rows * n_cols < TILE_THRESHOLD_PIXELS:
        return list(score(y_true, y_pred, threshold, frame, y_true.shape))
    tile = TILE_SIZE
    total = None
    for top in range(0, n_rows, tile):
        for left in range(0, n_cols, tile):
            window = np.s_[top : top + tile, left : left + tile]
            counts = score(y_true[window], y_pred[window], threshold, frame, (tile, tile))
            total = (
                list(counts)
                if total is None
                else [a + b for a, b in zip(total, counts, strict=True)]
            )
    return total


def f1_score(gt, pred, iou_threshold: float = 0.5, drop_boundary: bool = True) -> float:
    """The challenge's F1 of one image: ``gt`` and ``pred`` are ``(H, W)`` label images.

    Same rule as :func:`match`; 0.0 when no pair matches, including an image with
    no cells in either.
    """
    return _match(gt, pred, iou_threshold, drop_boundary, ("gt", "pred")).f1


#: The share of a cell that counts as "covering" it in :class:`ErrorKinds`.
_HALF = 0.5


def _error_tile(
    y_true: np.ndarray, y_pred: np.ndarray, threshold: float, width: int, frame_shape
) -> tuple[int, ...]:
    """``(tp, missed, split, merged, outline, merger, on_cell, background)`` of one tile."""
    true_area, pred_area, pair_true, pair_pred, overlap = _pair_counts(
        y_true, y_pred, width, frame_shape
    )
    n_true, n_pred = true_area.size, pred_area.size
    iou = overlap / (true_area[pair_true] + pred_area[pair_pred] - overlap)
    matched = _matched_pairs(n_true, n_pred, pair_true, pair_pred, iou, threshold)
    unmatched_true = np.bincount(pair_true[matched], minlength=n_true) == 0
    unmatched_pred = np.bincount(pair_pred[matched], minlength=n_pred) == 0

    share_of_true = overlap / true_area[pair_true]  # how much of the true cell the pair covers
    covered = np.bincount(pair_true, weights=overlap, minlength=n_true) / np.maximum(true_area, 1)
    best_cover = np.zeros(n_true)
    np.maximum.at(best_cover, pair_true, share_of_true)
    covers_half = share_of_true >= _HALF
    halves_of_pred = np.bincount(pair_pred[covers_half], minlength=n_pred)  # true cells covered
    in_merger = np.zeros(n_true, bool)
    in_merger[pair_true[covers_half & (halves_of_pred[pair_pred] >= 2)]] = True
    on_cells = np.bincount(pair_pred, weights=overlap, minlength=n_pred) / np.maximum(pred_area, 1)

    missed = unmatched_true & (covered < _HALF)
    split = unmatched_true & ~missed & (best_cover < _HALF)
    found = unmatched_true & (best_cover >= _HALF)
    merger = unmatched_pred & (halves_of_pred >= 2)
    on_truth = unmatched_pred & ~merger & ((halves_of_pred == 1) | (on_cells >= _HALF))
    return tuple(
        int(np.count_nonzero(kind))
        for kind in (
            ~unmatched_true,
            missed,
            split,
            found & in_merger,
            found & ~in_merger,
            merger,
            on_truth,
            unmatched_pred & ~merger & ~on_truth,
        )
    )


def error_kinds(
    y_true, y_pred, iou_threshold: float = 0.5, *, drop_boundary: bool = True
) -> ErrorKinds:
    """Sort the challenge's errors of one image by kind: cells missed, split, merged or drawn
    with a poor outline, and predictions that merge cells, sit on a cell or on background.

    The same matching as :func:`match` (boundary rule, the challenge's assignment, tiles for
    very large images); the kinds are defined in :class:`ErrorKinds`. F1 says how many cells
    went wrong, this says how, and so which part of a method to work on: cells read as one
    call for a better separation of touching cells, split ones for a smoother foreground,
    background hits for a stricter probability threshold or size floor.

    >>> import numpy as np
    >>> y_true = np.zeros((40, 40), np.int32)
    >>> y_true[5:15, 5:15], y_true[5:15, 15:25] = 1, 2   # two touching cells
    >>> y_true[25:35, 5:15] = 3                          # a third, apart
    >>> y_true[25:35, 25:35] = 4                         # a fourth
    >>> y_pred = np.zeros_like(y_true)
    >>> y_pred[5:15, 4:26] = 1                           # the first two read as one
    >>> y_pred[25:35, 5:8], y_pred[25:35, 8:11], y_pred[25:35, 11:15] = 2, 3, 4  # cut in three
    >>> y_pred[18:22, 32:36] = 5                         # debris; the fourth is not found
    >>> error_kinds(y_true, y_pred)
    ErrorKinds(iou_threshold=0.5, tp=0, missed=1, split=1, merged=2, outline=0, merger=1, on_cell=3, background=1)
    """
    y_true, y_pred = _check_pair(y_true, y_pred, ("y_true", "y_pred"))
    threshold = _check_threshold(iou_threshold)
    frame = BOUNDARY_WIDTH if drop_boundary else 0
    return ErrorKinds(threshold, *_tiled(_error_tile, y_true, y_pred, threshold, frame))


def time_tolerance(height: int, width: int) -> float:
    """Seconds the challenge allowed for segmenting one ``height x width`` image.

    10 s up to 1,000,000 pixels, 10 s per million pixels above.

    >>> time_tolerance(1000, 1000), time_tolerance(2000, 3000)
    (10.0, 60.0)
    """
    pixels = _check_count(height, "height", minimum=1) * _check_count(width, "width", minimum=1)
    return 10.0 if pixels <= 1_000_000 else 10.0 * pixels / 1e6


# --------------------------------------------------------------------------- folders


def _label_files(folder: Path) -> dict[str, Path]:
    """``{stem: path}`` of the ``<stem>_label.(tiff|tif|png)`` files in ``folder``."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        lower = path.name.lower()
        suffix = next((s for s in LABEL_SUFFIXES if lower.endswith(s)), None)
        if suffix is None or not path.is_file():
            continue
        stem = path.name[: -len(suffix)]
        if stem in files:
            raise CellSegError(
                f"{where(path)}: a second label file for image '{stem}' "
                f"(also {files[stem].name}); keep one"
            )
        files[stem] = path
    return files


def _write_csv(path: Path, rows: tuple[ImageScore, ...]) -> None:
    """Write the per-image rows to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(ImageScore._fields)
            writer.writerows(rows)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def evaluate_folder(
    gt_dir: str | os.PathLike,
    pred_dir: str | os.PathLike,
    csv_path: str | os.PathLike | None = None,
    *,
    iou_threshold: float = 0.5,
    drop_boundary: bool = True,
    kinds: bool = False,
) -> FolderReport:
    """Score every ``<stem>_label.tiff`` of ``gt_dir`` against the same name in ``pred_dir``.

    This is the challenge's evaluation of a submission: per-image F1 by
    :func:`match`, averaged over images. A missing prediction is scored as an
    empty one (F1 0) and listed in ``missing``; a prediction with no ground truth is
    left out of the score and listed in ``unscored``. With ``csv_path`` the per-image
    rows are written there as CSV (atomically). With ``kinds`` the errors of every
    image are also sorted by :func:`error_kinds` and summed in ``FolderReport.kinds``.
    """
    from cellseg_lite.io import read_labels

    threshold = _check_threshold(iou_threshold)
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    for folder in (gt_dir, pred_dir):
        if not folder.is_dir():
            raise CellSegError(f"{where(folder)}: not a folder")
    if csv_path is not None:
        csv_path = Path(csv_path)
        if csv_path.is_dir():
            raise CellSegError(f"{where(csv_path)}: is a folder; csv_path must name a file")
    truths = _label_files(gt_dir)
    if not truths:
        raise CellSegError(
            f"{where(gt_dir)}: no ground-truth label files (<stem>_label.tiff, .tif or .png)"
        )
    predictions = _label_files(pred_dir)
    rows, missing = [], []
    kind_sums = [0] * (len(ErrorKinds._fields) - 1)
    for stem, gt_path in truths.items():
        y_true = read_labels(gt_path)
        pred_path = predictions.get(stem)
        if pred_path is None:
            missing.append(stem)
            y_pred = np.zeros_like(y_true)
        else:
            y_pred = read_labels(pred_path)
            if y_pred.shape != y_true.shape:
                raise CellSegError(
                    f"{where(pred_path)}: prediction size {y_pred.shape} differs from "
                    f"ground truth size {y_true.shape} ({gt_path.name})"
                )
        if kinds:  # one matching serves both: the row's counts follow from the kinds
            found = error_kinds(y_true, y_pred, threshold, drop_boundary=drop_boundary)
            kind_sums = [a + b for a, b in zip(kind_sums, found[1:], strict=True)]
            result = _matching(threshold, found.tp + found.fn, found.tp + found.fp, found.tp, 0.0)
        else:
            result = match(y_true, y_pred, threshold, drop_boundary=drop_boundary)
        rows.append(ImageScore(stem, *result[1:9]))
    rows = tuple(rows)
    report = FolderReport(
        rows=rows,
        n_images=len(rows),
        mean_f1=math.fsum(r.f1 for r in rows) / len(rows),
        mean_precision=math.fsum(r.precision for r in rows) / len(rows),
        mean_recall=math.fsum(r.recall for r in rows) / len(rows),
        missing=tuple(missing),
        iou_threshold=threshold,
        kinds=ErrorKinds(threshold, *kind_sums) if kinds else None,
        unscored=tuple(stem for stem in predictions if stem not in truths),
    )
    if csv_path is not None:
        _write_csv(csv_path, rows)
    return report


# --------------------------------------------------------------------------- a segmenter on images


class SegmenterScore(NamedTuple):
    """One image segmented and scored: its class, size, counts, challenge F1, the seconds the
    segmenter took and the challenge's time tolerance for that size."""

    stem: str
    category: int
    height: int
    width: int
    n_true: int
    n_pred: int
    f1: float
    seconds: float
    tolerance: float

    @property
    def over_time(self) -> float:
        """Seconds above the tolerance (0 when in time), the challenge's running-time penalty."""
        return max(0.0, self.seconds - self.tolerance)


def evaluate_segmenter(
    segment,
    images,
    *,
    categories=None,
    iou_threshold: float = 0.5,
) -> tuple[SegmenterScore, ...]:
    """Run ``segment(image) -> labels`` on each ``(stem, image, y_true)`` of ``images``, timing it,
    and score it with the challenge's F1. ``categories``: one class per image (``-1`` unknown)."""
    import time

    threshold = _check_threshold(iou_threshold)
    if not callable(segment):
        raise CellSegError(
            f"segment: expected a callable image -> labels, got {type(segment).__name__}"
        )
    images = list(images)
    categories = [-1] * len(images) if categories is None else [int(c) for c in categories]
    if len(categories) != len(images):
        raise CellSegError(f"categories: {len(categories)} classes for {len(images)} images")
    rows = []
    for (stem, image, y_true), category in zip(images, categories, strict=True):
        start = time.perf_counter()
        y_pred = segment(image)
        seconds = time.perf_counter() - start
        result = _match(
            y_true, y_pred, threshold, True, (f"{stem} ground truth", f"{stem} prediction")
        )
        height, width = np.shape(y_true)[:2]
        rows.append(
            SegmenterScore(
                str(stem),
                category,
                int(height),
                int(width),
                result.n_true,
                result.n_pred,
                result.f1,
                seconds,
                time_tolerance(height, width),
            )
        )
    return tuple(rows)


def _mean(values) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else float("nan")


def _cell(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def class_table(results: dict, *, class_names=None) -> str:
    """Mean F1 per low-level class and overall, one row per method: a Markdown table in the shape
    of the paper's Table 4. ``results``: ``{method: [SegmenterScore, ...]}``."""
    from cellseg_lite.categorize import CATEGORY_NAMES

    names = class_names or CATEGORY_NAMES
    classes = sorted({r.category for rows in results.values() for r in rows if r.category >= 0})
    header = ["method"] + [f"class {c} ({names[c]})" for c in classes] + ["all images"]
    counts = {
        c: max(sum(r.category == c for r in rows) for rows in results.values()) for c in classes
    }
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        "| images | "
        + " | ".join(str(counts[c]) for c in classes)
        + f" | {max(len(rows) for rows in results.values())} |",
    ]
    for method, rows in results.items():
        cells = [_cell(_mean(r.f1 for r in rows if r.category == c)) for c in classes]
        cells.append(_cell(_mean(r.f1 for r in rows)))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing_table(rows, *, largest: int = 5) -> str:
    """Running time against the challenge's tolerance for the ``largest`` images and in total: a
    Markdown table in the shape of the paper's Table 5."""
    rows = sorted(rows, key=lambda r: r.height * r.width, reverse=True)
    lines = [
        "| image | size (H x W) | seconds | tolerance (s) | over tolerance (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows[:largest]:
        lines.append(
            f"| {r.stem} | {r.height} x {r.width} | {r.seconds:.2f} | {r.tolerance:.0f} | "
            f"{r.over_time:.2f} |"
        )
    total = math.fsum(r.seconds for r in rows)
    over = math.fsum(r.over_time for r in rows)
    lines.append(f"| all {len(rows)} images | | {total:.2f} | | {over:.2f} |")
    return "\n".join(lines)
