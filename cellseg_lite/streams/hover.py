"""The HoVer stream: every pixel of a cell points away from the cell's centre.

Graham, Vu, Raza et al., "HoVer-Net: Simultaneous Segmentation and Classification of
Nuclei in Multi-Tissue Histology Images", Medical Image Analysis 2019: a network
predicts, at each pixel, whether it lies on a cell (the *CP map*, cell or
background) and its horizontal and vertical distance to the centre of its cell,
each scaled to [-1, 1] per cell (the *HV maps*). The HV maps jump from +1 to -1
wherever two cells touch, so their derivatives mark the boundaries that the
foreground alone cannot show, and a marker-controlled watershed cuts the
foreground there. Lou, Yu et al. (NeurIPS 2022 Cell Segmentation Challenge, team
sribd-med) put this head on a ConvNeXt-UNet. Everything the method needs is in
this file, in reading order:

1. the network, :class:`ConvNeXtHover`;
2. the training targets, :func:`targets`;
3. the derivatives of the HV maps, :func:`sobel_kernels` and :func:`hv_gradients`,
   and the loss, :func:`loss` (and :func:`loss_terms`, its parts);
4. the post-processing, :func:`instances`, with every intermediate map from
   :func:`watershed_steps` and its settings in :data:`PRESETS`;
5. :func:`noisy_maps`, imperfect maps that look like a network's, to check that the
   post-processing does not only work on exact targets.

Conventions: ``hv`` is ``(2, H, W)`` (``(B, 2, H, W)`` for tensors); channel 0 is
the *horizontal* map (``x - cx``: columns, negative left of the centre), channel 1
the *vertical* map (``y - cy``: rows, negative above the centre, rows growing
downwards). The gradient that matters is the horizontal map's along x and the
vertical map's along y; hover_net's PyTorch loss builds its kernel with a
row-major ``torch.meshgrid`` and so differentiates each map along the other axis
(paper-notes section 5). Here the kernels are built explicitly and the
orientation is tested.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from torch import nn

from cellseg_lite._checks import as_labels
from cellseg_lite._errors import CellSegError
from cellseg_lite.unet import DEFAULT_DECODER, ConvNeXtUNet

__all__ = [
    "CONTACT_SIGMA",
    "CORE_MAX_DEPTH",
    "DEFAULT_PRESET",
    "LOSS_SOBEL_SIZE",
    "PRESETS",
    "ConvNeXtHover",
    "HoverOutput",
    "HoverTargets",
    "LossTerms",
    "WatershedParams",
    "WatershedSteps",
    "cell_cores",
    "core_probability",
    "core_targets",
    "cell_diameter",
    "contact_weights",
    "flood",
    "foreground_probability",
    "hv_gradients",
    "instances",
    "loss",
    "loss_terms",
    "noisy_maps",
    "sobel_kernels",
    "targets",
    "watershed_steps",
]

#: The cores a network with a core class learns (:func:`core_targets`): at least half as deep as
#: the cell's deepest pixel, or this many pixels where that is less (a 128-pixel training patch
#: shows a cell 100 pixels wide only in part).
CORE_MAX_DEPTH = 8.0

#: Size of the Sobel kernels of the gradient loss (MSGE); hover_net's loss uses 5 x 5 kernels.
LOSS_SOBEL_SIZE = 5

# Smoothing term of the soft Dice loss (hover_net's value).
_DICE_SMOOTH = 1e-3


# --------------------------------------------------------------------------- 1. the network


class HoverOutput(NamedTuple):
    """What :class:`ConvNeXtHover` returns: ``cp (B, 2, H, W)`` logits (background, cell; softmax
    at use; ``(B, 3, H, W)`` with a third class for the cells' cores, ``cores=True``) and
    ``hv (B, 2, H, W)`` (channel 0 horizontal, channel 1 vertical; no activation)."""

    cp: torch.Tensor
    hv: torch.Tensor


class ConvNeXtHover(nn.Module):
    """ConvNeXt-UNet with a HoVer head: ``(B, 3, H, W)`` to ``cp (B, 2, H, W)`` logits and
    ``hv (B, 2, H, W)``.

    One :class:`~cellseg_lite.unet.ConvNeXtUNet` with 4 output channels: channels 0-1 are the
    CP logits (a softmax over them gives background and cell probabilities; the loss takes the
    logits), channels 2-3 the HV maps, horizontal then vertical, as they are (the paper's identity
    activation). ``pretrained=True`` fetches ImageNet weights for the encoder and falls back to
    random ones with a warning when offline; ``decoder`` is passed on to the U-Net.

    ``cores=True`` (this project's extension, not the paper's) splits the cell class in two: the
    CP map gets a third class for each cell's core (:func:`core_targets`), the rest of the cell
    staying class 1. Cores of touching cells lie apart, so their probability can seed the
    watershed (:func:`watershed_steps`, ``core_prob``) where the HV slopes at a contact are too
    blurred to separate the cells (``benchmarks/bench_markers.py``: one seed per cell is what
    the trained maps lack most).

    Example::

        >>> net = ConvNeXtHover("convnext_atto")
        >>> cp, hv = net(torch.zeros(1, 3, 64, 64))
        >>> cp.shape, hv.shape
        (torch.Size([1, 2, 64, 64]), torch.Size([1, 2, 64, 64]))
    """

    def __init__(
        self,
        backbone: str = "convnext_small",
        pretrained: bool = False,
        *,
        decoder: str = DEFAULT_DECODER,
        cores: bool = False,
    ):
        super().__init__()
        if not isinstance(cores, bool):
            raise CellSegError(f"cores: expected True or False, got {cores!r}")
        self.cores = cores
        self.cp_classes = 3 if cores else 2
        self.unet = ConvNeXtUNet(
            backbone, pretrained=pretrained, out_channels=self.cp_classes + 2, decoder=decoder
        )

    def forward(self, x: torch.Tensor) -> HoverOutput:
        """``(B, 3, H, W)`` float to ``(cp (B, C, H, W), hv (B, 2, H, W))``, any H and W
        (``C`` = 2, or 3 with ``cores``)."""
        out = self.unet(x)
        return HoverOutput(out[:, : self.cp_classes], out[:, self.cp_classes :])


def _check_cp(cp, classes: tuple[int, ...]) -> None:
    if not isinstance(cp, torch.Tensor) or cp.ndim != 4 or cp.shape[1] not in classes:
        shape = tuple(cp.shape) if hasattr(cp, "shape") else type(cp).__name__
        wanted = (
            "a (B, 2, H, W) tensor of logits (or (B, 3, H, W) with a core class)"
            if 2 in classes
            else "a (B, 3, H, W) tensor of logits with a core class"
        )
        raise CellSegError(f"cp: expected {wanted}, got {shape}")


def foreground_probability(cp: torch.Tensor) -> torch.Tensor:
    """Cell probability ``(B, H, W)`` in [0, 1] from CP logits ``(B, 2, H, W)``: softmax, channel
    1; with a core class (``(B, 3, H, W)``), one minus the background's probability."""
    _check_cp(cp, (2, 3))
    prob = torch.softmax(cp, dim=1)
    return prob[:, 1] if cp.shape[1] == 2 else 1.0 - prob[:, 0]


def core_probability(cp: torch.Tensor) -> torch.Tensor:
    """Probability ``(B, H, W)`` of a cell's core from the CP logits of a network with
    ``cores=True`` ``(B, 3, H, W)``: softmax, channel 2."""
    _check_cp(cp, (3,))
    return torch.softmax(cp, dim=1)[:, 2]


# --------------------------------------------------------------------------- 2. the targets


class HoverTargets(NamedTuple):
    """Training targets of one label image: ``foreground (H, W)`` float32 in {0, 1} and
    ``hv (2, H, W)`` float32 in [-1, 1] (0 on background)."""

    foreground: np.ndarray
    hv: np.ndarray


def _check_min_size(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise CellSegError(f"{name}: expected an integer >= 0 (pixels), got {value!r}")
    return int(value)


def targets(labels: np.ndarray, *, min_size: int = 0) -> HoverTargets:
    """The CP and HV targets of an ``(H, W)`` instance label image, as hover_net generates them.

    ``foreground`` is 1 on every cell. For each cell, with ``(cy, cx)`` its centre of mass rounded
    to a pixel with ``int(c + 0.5)``, the horizontal map holds ``x - cx`` and the vertical map
    ``y - cy`` on the cell's pixels, negative values divided by their largest magnitude and
    positive values by their maximum: -1 on the cell's leftmost (topmost) pixels, +1 on its
    rightmost (bottommost), 0 in the centre's column (row) and on the background.

    Cells smaller than ``min_size`` pixels keep their foreground but get HV 0, as in hover_net,
    whose targets skip cells under 30 px. The default 0 keeps every cell: small cells are exactly
    the ones a watershed has to separate, and the round trip ``instances(*targets(labels))``
    should give them back. (hover_net also measures ``x`` from 1 rather than 0 inside each
    cell's box, putting every zero one pixel left of and above the centre; this function uses the
    rounded centre itself.)

    Vectorised over cells (per-label sums, minima and maxima of the coordinates), so thousands of
    cells on a 2048 x 2048 image take a fraction of a second.

    >>> labels = np.zeros((5, 7), np.int32); labels[1:4, 1:6] = 1
    >>> targets(labels).hv[0, 2]
    array([ 0. , -1. , -0.5,  0. ,  0.5,  1. ,  0. ], dtype=float32)
    """
    labels = as_labels(labels, "labels")
    min_size = _check_min_size(min_size, "min_size")
    foreground = (labels > 0).astype(np.float32)
    hv = np.zeros((2, *labels.shape), np.float32)
    rows, cols = np.nonzero(labels)
    if rows.size == 0:
        return HoverTargets(foreground, hv)

    ids = labels[rows, cols]
    if int(ids.max()) > 2 * ids.size:  # sparse ids (e.g. 1 and 10**9): compact them first
        ids = np.unique(ids, return_inverse=True)[1].reshape(-1) + 1
    n = int(ids.max()) + 1
    counts = np.bincount(ids, minlength=n)
    area = np.maximum(counts, 1)
    keep = (counts >= max(min_size, 1))[ids]
    for channel, coord in enumerate((cols, rows)):  # channel 0: x (columns), 1: y (rows)
        centre = np.floor(np.bincount(ids, coord, minlength=n) / area + 0.5).astype(np.int64)
        low = np.full(n, np.iinfo(np.int64).max)
        high = np.full(n, -1)
        np.minimum.at(low, ids, coord)
        np.maximum.at(high, ids, coord)
        # min over a cell of (x - cx) is (x_min - cx): the scales need no per-pixel reduction
        offset = (coord - centre[ids]).astype(np.float32)
        negative = np.maximum(centre - low, 1).astype(np.float32)[ids]
        positive = np.maximum(high - centre, 1).astype(np.float32)[ids]
        value = np.where(offset < 0, offset / negative, offset / positive)
        hv[channel, rows, cols] = np.where(keep, value, 0.0)
    return HoverTargets(foreground, hv)


#: Width (pixels, the Gaussian's sigma) of the band around contacts that :func:`contact_weights`
#: weights up.
CONTACT_SIGMA = 2.0


def contact_weights(
    labels: np.ndarray, weight: float, *, sigma: float = CONTACT_SIGMA
) -> np.ndarray:
    """Per-pixel weights ``(H, W)`` float32 for the HV terms of the loss, high where cells touch.

    Where two cells touch, their HV maps must jump from +1 to -1 within a pixel or two; a network
    that draws the jump too soft gives the watershed no boundary, and the two cells come out as
    one (the largest kind of error of the trained segmenters, ``benchmarks/bench_errors.py``).
    These weights are ``1 + weight * exp(-d**2 / (2 sigma**2))``, with ``d`` the distance to the
    nearest *contact* pixel (a cell pixel with a 4-neighbour in another cell): the weighting of
    Ronneberger et al.'s U-Net (2015) for the gaps between cells, moved onto the contacts, since
    here the HV maps, not the foreground, separate touching cells. 1 everywhere when no two cells
    touch. The paper's loss is unweighted (``weight=0``).

    >>> labels = np.zeros((1, 6), np.int32); labels[0, 1:3], labels[0, 3:5] = 1, 2
    >>> contact_weights(labels, 4.0, sigma=1.0).round(2)
    array([[1.54, 3.43, 5.  , 5.  , 3.43, 1.54]], dtype=float32)
    """
    labels = as_labels(labels, "labels")
    if (
        isinstance(weight, bool)
        or not isinstance(weight, numbers.Real)
        or not (0.0 <= weight < math.inf)
    ):
        raise CellSegError(f"weight: expected a non-negative number, got {weight!r}")
    if (
        isinstance(sigma, bool)
        or not isinstance(sigma, numbers.Real)
        or not (0.0 < sigma < math.inf)
    ):
        raise CellSegError(f"sigma: expected a positive number, got {sigma!r}")
    contact = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        ahead = [slice(None), slice(None)]
        behind = list(ahead)
        ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
        a, b = labels[tuple(ahead)], labels[tuple(behind)]
        touching = (a > 0) & (b > 0) & (a != b)
        contact[tuple(ahead)] |= touching
        contact[tuple(behind)] |= touching
    if weight == 0 or not contact.any():
        return np.ones(labels.shape, np.float32)
    distance = ndi.distance_transform_edt(~contact)
    return (1.0 + weight * np.exp(-(distance**2) / (2.0 * sigma**2))).astype(np.float32)


# --------------------------------------------------------------------------- 3. gradients and loss


def _check_ksize(ksize, name: str = "ksize") -> int:
    if (
        isinstance(ksize, bool)
        or not isinstance(ksize, numbers.Integral)
        or ksize < 3
        or ksize % 2 == 0
        or ksize > 31
    ):
        raise CellSegError(f"{name}: expected an odd integer from 3 to 31, got {ksize!r}")
    return int(ksize)


def sobel_kernels(ksize: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The 1-D ``(smooth, derivative)`` pair of a ``ksize`` x ``ksize`` Sobel filter, float64.

    Built the way OpenCV's ``getDerivKernels`` builds them: ``smooth`` is the binomial row of
    length ``ksize`` (``[1, 2, 1]``, ``[1, 4, 6, 4, 1]``, ...), ``derivative`` the binomial row of
    length ``ksize - 2`` convolved with a central difference (``[-1, 0, 1]``,
    ``[-1, -2, 0, 2, 1]``, ...). Here ``smooth`` is scaled to sum to 1 and ``derivative`` so that a
    unit ramp gives 1: filtered values are slopes (change per pixel) whatever the kernel size,
    and only differ from OpenCV's by a positive factor. Both are meant for correlation
    (``scipy.ndimage.correlate1d``, ``torch.nn.functional.conv2d``): the derivative kernel's
    negative side comes first, so an increasing ramp gives a positive slope.

    The x derivative of an image is ``derivative`` along columns and ``smooth`` along rows, i.e.
    the 2-D kernel ``np.outer(smooth, derivative)``; the y derivative is its transpose.

    >>> smooth, derivative = sobel_kernels(3)
    >>> smooth, derivative
    (array([0.25, 0.5 , 0.25]), array([-0.5,  0. ,  0.5]))
    """
    ksize = _check_ksize(ksize)
    binomial = np.array([1.0])
    for _ in range(ksize - 3):
        binomial = np.convolve(binomial, [1.0, 1.0])
    derivative = np.convolve(binomial, [1.0, 0.0, -1.0])[::-1]  # [-1, 0, 1] for correlation
    smooth = np.convolve(np.convolve(binomial, [1.0, 1.0]), [1.0, 1.0])
    offsets = np.arange(ksize) - ksize // 2
    return smooth / smooth.sum(), derivative / np.sum(derivative * offsets)


def hv_gradients(hv: torch.Tensor, ksize: int = LOSS_SOBEL_SIZE) -> torch.Tensor:
    """The gradients the HoVer method uses: ``(B, 2, H, W)`` to ``(B, 2, H, W)`` holding the
    horizontal map's derivative along x (columns) and the vertical map's along y (rows).

    A ``ksize`` Sobel filter (:func:`sobel_kernels`, values in slope units) applied as one
    grouped convolution with replicated borders. The orientation is the point: a horizontal
    ramp (values growing with the column) has x derivative 1 and y derivative 0.
    """
    if not isinstance(hv, torch.Tensor) or hv.ndim != 4 or hv.shape[1] != 2:
        shape = tuple(hv.shape) if hasattr(hv, "shape") else type(hv).__name__
        raise CellSegError(f"hv: expected a (B, 2, H, W) tensor, got {shape}")
    smooth, derivative = sobel_kernels(ksize)
    along_x = np.outer(smooth, derivative)  # rows: smoothing, columns: derivative
    weight = torch.as_tensor(np.stack([along_x, along_x.T])[:, None], dtype=hv.dtype)
    pad = ksize // 2
    padded = F.pad(hv, (pad, pad, pad, pad), mode="replicate")
    return F.conv2d(padded, weight.to(hv.device), groups=2)


class LossTerms(NamedTuple):
    """The four terms of the HoVer loss, each a scalar tensor; :func:`loss` is their sum
    (all weights 1, as in the paper and in hover_net)."""

    ce: torch.Tensor
    dice: torch.Tensor
    mse: torch.Tensor
    msge: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.ce + self.dice + self.mse + self.msge


def _as_target(value, like: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError) as err:
            raise CellSegError(f"{name}: cannot be read as a tensor ({err})") from err
    if value.dtype == torch.bool or not value.is_floating_point():
        value = value.to(torch.float32)
    return value.to(device=like.device, dtype=like.dtype)


def _check_loss_inputs(pred_cp, pred_hv, foreground, hv):
    for name, value, channels in (("pred_cp", pred_cp, (2, 3)), ("pred_hv", pred_hv, (2,))):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise CellSegError(f"{name}: expected a float tensor, got {type(value).__name__}")
        if value.ndim != 4 or value.shape[1] not in channels:
            extra = " (or (B, 3, H, W) with a core class)" if len(channels) > 1 else ""
            raise CellSegError(
                f"{name}: expected shape (B, 2, H, W){extra}, got {tuple(value.shape)}"
            )
    if pred_cp.shape[0:1] + pred_cp.shape[2:] != pred_hv.shape[0:1] + pred_hv.shape[2:]:
        raise CellSegError(
            f"pred_cp {tuple(pred_cp.shape)} and pred_hv {tuple(pred_hv.shape)} differ in shape"
        )
    b, _, h, w = pred_hv.shape
    foreground = _as_target(foreground, pred_hv, "foreground")
    if foreground.ndim == 4 and foreground.shape[1] == 1:
        foreground = foreground[:, 0]
    if tuple(foreground.shape) != (b, h, w):
        raise CellSegError(
            f"foreground: expected shape {(b, h, w)} to match the predictions, "
            f"got {tuple(foreground.shape)}"
        )
    if pred_cp.shape[1] == 2 and not torch.all((foreground == 0) | (foreground == 1)):
        raise CellSegError("foreground: expected values 0 (background) and 1 (cell) only")
    if pred_cp.shape[1] == 3 and not torch.all(
        (foreground == 0) | (foreground == 1) | (foreground == 2)
    ):
        raise CellSegError("foreground: expected values 0 (background), 1 (cell) and 2 (core) only")
    hv = _as_target(hv, pred_hv, "hv")
    if tuple(hv.shape) != (b, 2, h, w):
        raise CellSegError(
            f"hv: expected shape {(b, 2, h, w)} to match the predictions, got {tuple(hv.shape)}"
        )
    if not torch.isfinite(hv).all():
        raise CellSegError("hv: contains NaN or infinite values")
    return foreground, hv


def loss_terms(
    pred_cp: torch.Tensor, pred_hv: torch.Tensor, foreground, hv, *, weights=None
) -> LossTerms:
    """The HoVer loss, term by term: CE and Dice on the CP map, MSE and MSGE on the HV maps.

    ``pred_cp`` are ``(B, 2, H, W)`` logits, ``pred_hv`` ``(B, 2, H, W)``; ``foreground``
    ``(B, H, W)`` (or ``(B, 1, H, W)``) of 0/1 and ``hv`` ``(B, 2, H, W)`` are stacked
    :func:`targets` (arrays or tensors). With a core class (``pred_cp`` ``(B, 3, H, W)``,
    ``ConvNeXtHover(cores=True)``) ``foreground`` holds 0/1/2 (background, cell, core:
    stacked :func:`core_targets`). As in hover_net:

    - ``ce``: cross-entropy of the softmax over the CP channels, mean over pixels;
    - ``dice``: soft Dice loss ``1 - (2 sum(p t) + s) / (sum p + sum t + s)`` per class over the
      whole batch, summed over the classes (background and cell, and core), ``s = 1e-3``;
    - ``mse``: mean squared error of the HV maps over every pixel and both channels;
    - ``msge``: mean squared error of :func:`hv_gradients` (x derivative of the horizontal map,
      y derivative of the vertical one) over the cell pixels only; 0 on a patch with no cell.

    ``weights`` ``(B, H, W)`` (optional, e.g. stacked :func:`contact_weights`) turns ``mse`` and
    ``msge`` into means weighted per pixel, each divided by its sum of weights, so that a term
    keeps its scale and only the emphasis moves; ``None`` (the paper) weights every pixel alike.
    """
    foreground, hv = _check_loss_inputs(pred_cp, pred_hv, foreground, hv)
    classes = foreground.long()
    ce = F.cross_entropy(pred_cp, classes)
    prob = torch.softmax(pred_cp, dim=1)
    onehot = F.one_hot(classes, pred_cp.shape[1]).permute(0, 3, 1, 2).to(prob.dtype)
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    total = prob.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    dice = (1.0 - (2.0 * inter + _DICE_SMOOTH) / (total + _DICE_SMOOTH)).sum()
    error = (hv_gradients(pred_hv) - hv_gradients(hv)) ** 2
    foreground = (foreground > 0).to(pred_hv.dtype)  # cell pixels, core or not
    focus = foreground[:, None]
    if weights is None:
        mse = F.mse_loss(pred_hv, hv)
    else:
        weights = _check_weights(weights, foreground)
        mse = ((pred_hv - hv) ** 2 * weights).sum() / (2.0 * weights.sum())
        focus = focus * weights
    msge = (error * focus).sum() / (2.0 * focus.sum()).clamp_min(1.0)
    return LossTerms(ce, dice, mse, msge)


def _check_weights(weights, foreground: torch.Tensor) -> torch.Tensor:
    weights = _as_target(weights, foreground, "weights")
    if weights.ndim == 4 and weights.shape[1] == 1:
        weights = weights[:, 0]
    if weights.shape != foreground.shape:
        raise CellSegError(
            f"weights: expected shape {tuple(foreground.shape)} to match the predictions, "
            f"got {tuple(weights.shape)}"
        )
    if not (torch.isfinite(weights).all() and (weights > 0).all()):
        raise CellSegError("weights: expected finite positive values")
    return weights[:, None]


def loss(
    pred_cp: torch.Tensor, pred_hv: torch.Tensor, foreground, hv, *, weights=None
) -> torch.Tensor:
    """The HoVer training loss, CE + Dice + MSE + MSGE (weights 1), a scalar tensor.

    See :func:`loss_terms` for shapes, for each term and for the optional per-pixel ``weights``
    of the HV terms. Finite, with finite gradients, on a patch without cells.
    """
    return loss_terms(pred_cp, pred_hv, foreground, hv, weights=weights).total


# --------------------------------------------------------------------------- 4. post-processing


@dataclasses.dataclass(frozen=True)
class WatershedParams:
    """Settings of the marker-controlled watershed (:func:`watershed_steps`).

    ``energy`` chooses how boundaries are scored from the HV derivatives:

    ``"minmax"`` (hover_net)
        Each HV map min-max normalised to [0, 1], Sobel filtered (``sobel_size``, 2-D kernel),
        each result min-max normalised and subtracted from 1, the maximum of the two taken and
        the background subtracted: an energy in [0, 1], high where a map falls. (hover_net
        normalises the signed slopes, not their magnitude: a map falls at every boundary, so only
        falls should score.)
    ``"slope"`` (this project)
        The derivative along its own axis only (no smoothing across, so a cell's thin
        protrusions do not mix with the background), divided by the typical slope inside a cell
        (``2 / diameter``, :func:`cell_diameter`) and negated: an energy in units of that slope,
        <= 0 inside cells (the maps only grow along their axis there) and large where two cells
        meet (a jump from +1 to -1).

    ``sobel_size`` is the kernel size (odd, 3-31) or ``None`` for ``kernel_fraction`` of the
    typical diameter along each axis (scale-aware). Markers are the foreground pixels with
    energy below ``marker_threshold``, optionally with holes filled (``fill_holes``) and opened
    by OpenCV's ``opening_size`` ellipse (0: none), and only where the cell probability is at
    least ``marker_min_prob`` (0: anywhere on the foreground; a network is least sure of the
    pixels where two cells meet, so a high value keeps their markers apart); markers smaller
    than ``marker_min_size``
    pixels or ``marker_min_fraction`` of the typical cell area are dropped, and so are foreground
    components below ``foreground_min_size`` / ``foreground_min_fraction``. The watershed floods
    ``-(1 - energy) * foreground`` blurred by a ``blur_size`` x ``blur_size`` Gaussian with
    OpenCV's default sigma for that size (``GaussianBlur(..., (k, k), 0)``; 0: no blur). With
    ``keep_unmarked``, foreground components that received no marker become cells of their own
    (hover_net drops them). Given a core probability map (a network with ``cores=True``), the
    markers are the foreground pixels whose core probability is at least ``core_threshold``
    instead of those of low energy; the rest is the same.
    """

    energy: str
    sobel_size: int | None
    marker_threshold: float
    marker_min_size: int = 0
    marker_min_fraction: float = 0.0
    marker_min_prob: float = 0.0
    foreground_min_size: int = 0
    foreground_min_fraction: float = 0.0
    kernel_fraction: float = 0.25
    smooth_across: bool = False
    fill_holes: bool = False
    opening_size: int = 0
    blur_size: int = 0
    keep_unmarked: bool = True
    core_threshold: float = 0.5


_HOVER_NET = WatershedParams(
    energy="minmax",
    sobel_size=21,
    marker_threshold=0.4,
    marker_min_size=10,
    foreground_min_size=10,
    smooth_across=True,
    fill_holes=True,
    opening_size=5,
    blur_size=3,
    keep_unmarked=False,
)

#: Named settings of :func:`instances`. ``"hover_net"``: hover_net's published post-processing
#: (Sobel 21, marker minimum 10 px). ``"code"``: the same with the sribd-med code's values
#: (Sobel 15, marker minimum 100 px). ``"scaled"`` (the default): scale-aware kernels and sizes
#: and a slope-based energy, see :class:`WatershedParams` and the HoVer chapter. Its four numbers
#: were chosen on the real-mini train split, on exact targets and on :func:`noisy_maps` (blur 1.5,
#: noise 0.1) alike, so that they also suit a network's smooth, noisy maps: the optimum is flat
#: (moving one setting by x0.5-0.6 or x1.6-2 changes the mean round-trip F1 there by at most
#: 0.003 on exact targets and 0.011 on noisy maps), a larger kernel
#: than 3 px averages noise on large cells, and the 0.5 threshold leaves room for slopes that
#: wobble below 0 inside a cell.
PRESETS: dict[str, WatershedParams] = {
    "hover_net": _HOVER_NET,
    "code": dataclasses.replace(_HOVER_NET, sobel_size=15, marker_min_size=100),
    "scaled": WatershedParams(
        energy="slope",
        sobel_size=None,
        kernel_fraction=0.25,
        marker_threshold=0.5,
        marker_min_fraction=0.02,
        foreground_min_fraction=0.01,
    ),
}
#: The preset :func:`instances` uses unless told otherwise.
DEFAULT_PRESET = "scaled"

_ENERGIES = ("minmax", "slope")
# Fallback diameter (pixels) when a map has too few cell pixels to measure one.
_FALLBACK_DIAMETER = 16.0
_MIN_SLOPE_PIXELS = 10


def _params(preset, overrides: dict) -> WatershedParams:
    if isinstance(preset, WatershedParams):
        params = preset
    elif isinstance(preset, str) and preset in PRESETS:
        params = PRESETS[preset]
    else:
        raise CellSegError(
            f"preset: expected one of {', '.join(map(repr, PRESETS))} or a WatershedParams, "
            f"got {preset!r}"
        )
    fields = {f.name for f in dataclasses.fields(WatershedParams)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise CellSegError(
            f"unknown watershed setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}"
        )
    params = dataclasses.replace(params, **overrides)
    _check_params(params)
    return params


def _check_params(p: WatershedParams) -> None:
    def number(name, low, high=math.inf):
        value = getattr(p, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not (low <= value <= high)
        ):
            raise CellSegError(f"{name}: expected a number in [{low}, {high}], got {value!r}")

    if p.energy not in _ENERGIES:
        raise CellSegError(f"energy: expected one of {', '.join(_ENERGIES)}, got {p.energy!r}")
    if p.sobel_size is not None:
        _check_ksize(p.sobel_size, "sobel_size")
    number("kernel_fraction", 0.0)
    number("marker_threshold", -math.inf)
    number("marker_min_fraction", 0.0, 1.0)
    number("marker_min_prob", 0.0, 1.0)
    number("core_threshold", 0.0, 1.0)
    number("foreground_min_fraction", 0.0, 1.0)
    for name in ("marker_min_size", "foreground_min_size", "opening_size", "blur_size"):
        _check_min_size(getattr(p, name), name)
    if p.blur_size > 1 and p.blur_size % 2 == 0:
        raise CellSegError(f"blur_size: expected an odd integer (or 0), got {p.blur_size!r}")
    for name in ("smooth_across", "fill_holes", "keep_unmarked"):
        if not isinstance(getattr(p, name), bool):
            raise CellSegError(f"{name}: expected True or False, got {getattr(p, name)!r}")


def _check_maps(foreground_prob, hv, prob_thresh) -> tuple[np.ndarray, np.ndarray, float]:
    prob = np.asarray(foreground_prob)
    if prob.ndim != 2 or prob.size == 0:
        raise CellSegError(
            f"foreground_prob: expected a non-empty (H, W) probability map, got shape {prob.shape}"
        )
    if prob.dtype == bool:
        prob = prob.astype(np.float32)
    if not (np.issubdtype(prob.dtype, np.floating) or np.issubdtype(prob.dtype, np.integer)):
        raise CellSegError(f"foreground_prob: expected numbers, got dtype {prob.dtype}")
    hv = np.asarray(hv)
    if hv.shape != (2, *prob.shape):
        raise CellSegError(
            f"hv: expected shape (2, H, W) = {(2, *prob.shape)} to match foreground_prob, "
            f"got {hv.shape}"
        )
    if not np.issubdtype(hv.dtype, np.floating) and not np.issubdtype(hv.dtype, np.integer):
        raise CellSegError(f"hv: expected numbers, got dtype {hv.dtype}")
    if not (np.all(np.isfinite(prob)) and np.all(np.isfinite(hv))):
        raise CellSegError("foreground_prob and hv must not contain NaN or infinite values")
    if (
        isinstance(prob_thresh, bool)
        or not isinstance(prob_thresh, numbers.Real)
        or not (0.0 < prob_thresh <= 1.0)
    ):
        raise CellSegError(f"prob_thresh: expected a number in (0, 1], got {prob_thresh!r}")
    return prob, hv.astype(np.float32, copy=False), float(prob_thresh)


def _check_core(core_prob, shape: tuple[int, int]) -> np.ndarray | None:
    if core_prob is None:
        return None
    core = np.asarray(core_prob)
    if core.shape != shape or not (
        np.issubdtype(core.dtype, np.floating) or np.issubdtype(core.dtype, np.integer)
    ):
        raise CellSegError(
            f"core_prob: expected an (H, W) = {shape} map of numbers to match foreground_prob, "
            f"got {core.dtype} {core.shape}"
        )
    if not np.all(np.isfinite(core)):
        raise CellSegError("core_prob must not contain NaN or infinite values")
    return core


def _derivative(image: np.ndarray, axis: int, ksize: int, *, smooth_across: bool) -> np.ndarray:
    """Slope of ``image`` along ``axis`` (1: x, 0: y) with a ``ksize`` Sobel kernel."""
    smooth, derivative = sobel_kernels(ksize)
    out = ndi.correlate1d(image, derivative, axis=axis, mode="mirror")
    if smooth_across:
        out = ndi.correlate1d(out, smooth, axis=1 - axis, mode="mirror")
    return out


def _central_difference(image: np.ndarray, axis: int) -> np.ndarray:
    """``(f(i + 1) - f(i - 1)) / 2`` along ``axis`` of the map clipped to [-1, 1] (0 on the border)."""
    image = np.clip(image, -1.0, 1.0)
    out = np.zeros_like(image)
    if image.shape[axis] >= 3:
        ahead = [slice(None), slice(None)]
        behind, middle = list(ahead), list(ahead)
        ahead[axis], behind[axis], middle[axis] = slice(2, None), slice(None, -2), slice(1, -1)
        out[tuple(middle)] = 0.5 * (image[tuple(ahead)] - image[tuple(behind)])
    return out


def cell_diameter(foreground: np.ndarray, hv: np.ndarray) -> tuple[float, float]:
    """Typical cell diameter ``(along x, along y)`` in pixels, read from the HV maps themselves.

    Inside a cell the horizontal map climbs from -1 to +1 across the cell's width, so its x slope
    is about ``2 / width`` (likewise the vertical map along y). The median slope over the cell
    pixels where both slopes are positive (the cells' interiors; 3-pixel central differences)
    gives the width and height of a typical cell, weighted by area. This needs no labels, so it
    works on a network's output as on exact targets. Below 10 interior pixels the fallback is
    16 pixels.
    """
    foreground = np.asarray(foreground, bool)
    hv = np.asarray(hv, np.float32)
    slope_x = _central_difference(hv[0], 1)
    slope_y = _central_difference(hv[1], 0)
    inside = foreground & (slope_x > 0) & (slope_y > 0)
    if np.count_nonzero(inside) < _MIN_SLOPE_PIXELS:
        return (_FALLBACK_DIAMETER, _FALLBACK_DIAMETER)
    limit = float(max(foreground.shape))
    width = min(2.0 / float(np.median(slope_x[inside])), limit)
    height = min(2.0 / float(np.median(slope_y[inside])), limit)
    return (width, height)


def _odd(value: float) -> int:
    k = int(np.clip(round(value), 3, 31))
    return k if k % 2 else k + 1


def _minmax(image: np.ndarray) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.zeros_like(image)
    return (image - low) / (high - low)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """``labels`` renumbered 1..N in the order of their ids, as int32 (0 stays 0)."""
    present = np.bincount(labels.ravel()) > 0
    present[0] = False
    if present[1:].all():  # already 1..N
        return labels.astype(np.int32, copy=False)
    lookup = np.cumsum(present, dtype=np.int32) * present
    return lookup[labels]


def _remove_small(labels: np.ndarray, min_size: float) -> np.ndarray:
    """Zero the components of ``labels`` with fewer than ``min_size`` pixels (in place)."""
    if min_size <= 1 or labels.max() == 0:
        return labels
    small = np.bincount(labels.ravel()) < min_size
    small[0] = False
    labels[small[labels]] = 0
    return labels


def _cv2_ellipse(size: int) -> np.ndarray:
    """OpenCV's ``getStructuringElement(MORPH_ELLIPSE, (size, size))`` as a boolean array
    (5 x 5: full middle rows and single-pixel top and bottom rows, unlike skimage's disk)."""
    element = np.zeros((size, size), bool)
    radius = size // 2
    for row in range(size):
        dy = row - radius
        if abs(dy) <= radius:
            dx = int(round(radius * math.sqrt((radius * radius - dy * dy) / (radius * radius))))
            element[row, max(radius - dx, 0) : min(radius + dx + 1, size)] = True
    return element


class WatershedSteps(NamedTuple):
    """Every intermediate map of :func:`watershed_steps`, ``(H, W)`` unless said otherwise.

    ``foreground`` bool after thresholding and cleaning; ``gradients (2, H, W)``: the
    horizontal map's x derivative and the vertical map's y derivative (as filtered, before the
    energy); ``energy`` float32 (high on boundaries, 0 off the foreground); ``markers`` int32
    (the seeds, 1..M); ``landscape`` float32 (what is flooded); ``labels`` int32 (1..N);
    ``diameter`` the typical cell size ``(x, y)`` in pixels; ``kernel`` the Sobel sizes ``(x, y)``.
    """

    foreground: np.ndarray
    gradients: np.ndarray
    energy: np.ndarray
    markers: np.ndarray
    landscape: np.ndarray
    labels: np.ndarray
    diameter: tuple[float, float]
    kernel: tuple[int, int]


def watershed_steps(
    foreground_prob: np.ndarray,
    hv: np.ndarray,
    prob_thresh: float = 0.6,
    *,
    core_prob: np.ndarray | None = None,
    preset: str | WatershedParams = DEFAULT_PRESET,
    **settings,
) -> WatershedSteps:
    """:func:`instances`, returning every intermediate map (for the book and for debugging).

    Marker-controlled watershed after hover_net (Graham et al. 2019, ``proc_np_hv``):

    1. foreground = ``foreground_prob >= prob_thresh``, small components removed;
    2. derivatives of the HV maps (x of the horizontal map, y of the vertical one) and from
       them an energy that is high where a map falls, i.e. on boundaries between cells;
    3. markers = foreground minus (energy >= ``marker_threshold``), optionally only where
       ``foreground_prob >= marker_min_prob``, cleaned, small ones dropped; given ``core_prob``
       (``(H, W)``, a network with a core class, :func:`core_probability`), the foreground
       where ``core_prob >= core_threshold`` instead of the low energy;
    4. watershed of the energy landscape from the markers, inside the foreground.

    ``preset`` names an entry of :data:`PRESETS` (or is a :class:`WatershedParams`); keyword
    ``settings`` override single fields (``sobel_size=15``) and are checked.
    """

    prob, hv, prob_thresh = _check_maps(foreground_prob, hv, prob_thresh)
    core_prob = _check_core(core_prob, prob.shape)
    p = _params(preset, settings)
    foreground = prob >= prob_thresh

    diameter = cell_diameter(foreground, hv)
    area = math.pi / 4.0 * diameter[0] * diameter[1]
    if p.sobel_size is None:
        kernel = (_odd(p.kernel_fraction * diameter[0]), _odd(p.kernel_fraction * diameter[1]))
    else:
        kernel = (p.sobel_size, p.sobel_size)

    min_foreground = max(p.foreground_min_size, p.foreground_min_fraction * area)
    if min_foreground > 1:
        components = ndi.label(foreground)[0]
        foreground = _remove_small(components, min_foreground) > 0

    if p.energy == "minmax":
        maps = [_minmax(hv[0]), _minmax(hv[1])]
    else:
        maps = [np.clip(hv[0], -1.0, 1.0), np.clip(hv[1], -1.0, 1.0)]
    gradients = np.stack(
        [
            _derivative(maps[0], 1, kernel[0], smooth_across=p.smooth_across),
            _derivative(maps[1], 0, kernel[1], smooth_across=p.smooth_across),
        ]
    ).astype(np.float32)
    if p.energy == "minmax":
        energy = np.maximum(1.0 - _minmax(gradients[0]), 1.0 - _minmax(gradients[1]))
    else:  # in units of the typical slope inside a cell, 2 / diameter
        energy = np.maximum(
            -gradients[0] * (diameter[0] / 2.0), -gradients[1] * (diameter[1] / 2.0)
        )
    energy = np.where(foreground, np.maximum(energy, 0.0), 0.0).astype(np.float32)

    if core_prob is None:
        seeds = foreground & (energy < p.marker_threshold)
    else:
        seeds = foreground & (core_prob >= p.core_threshold)
    if p.marker_min_prob > 0:
        seeds &= prob >= p.marker_min_prob
    if p.fill_holes:
        seeds = ndi.binary_fill_holes(seeds)
    if p.opening_size > 1:
        seeds = ndi.binary_opening(seeds, _cv2_ellipse(p.opening_size))
    markers = ndi.label(seeds)[0]
    markers = _remove_small(markers, max(p.marker_min_size, p.marker_min_fraction * area))

    landscape = (1.0 - energy) * foreground
    if p.blur_size > 1:
        radius = p.blur_size // 2  # OpenCV's sigma for a k x k kernel: 0.3 ((k - 1) / 2 - 1) + 0.8
        sigma = 0.3 * (radius - 1) + 0.8
        landscape = ndi.gaussian_filter(landscape, sigma, radius=radius, mode="mirror")
    landscape = (-landscape).astype(np.float32)
    labels = flood(landscape, markers, foreground, keep_unmarked=p.keep_unmarked)
    return WatershedSteps(
        foreground=foreground,
        gradients=gradients,
        energy=energy,
        markers=_relabel(markers),
        landscape=landscape,
        labels=_relabel(labels),
        diameter=diameter,
        kernel=kernel,
    )


def flood(
    landscape: np.ndarray, markers: np.ndarray, mask: np.ndarray, *, keep_unmarked: bool = True
) -> np.ndarray:
    """Step 4 of :func:`watershed_steps`: the watershed of ``landscape`` from ``markers`` (int,
    0 none) inside ``mask``. With ``keep_unmarked``, parts of the mask that no marker reaches
    become cells of their own. Other seeds on the same landscape (``steps.landscape``) show what
    the markers cost, e.g. :func:`cell_cores` of the true cells."""
    from skimage.segmentation import watershed

    labels = watershed(landscape, markers, mask=mask)
    if keep_unmarked:
        unmarked, n_unmarked = ndi.label(mask & (labels == 0))
        if n_unmarked:
            labels = np.where(unmarked > 0, unmarked + labels.max(), labels)
    return labels


def cell_cores(
    labels: np.ndarray,
    depth: float = 0.5,
    *,
    max_depth: float | None = None,
    open_frame: bool = False,
) -> np.ndarray:
    """One seed per cell of ``labels`` (same ids): its pixels at least ``depth`` (0-1) times as far
    from the cell's outside as its deepest pixel, or ``max_depth`` pixels where that is less. The
    cores of touching cells stay apart, which makes them the seeds a perfect marker step would
    find.

    ``max_depth`` keeps the core of a large cell a matter of the few pixels around it (deeper than
    ``max_depth`` from its edge), which a network that sees a patch of the cell can decide; without
    it, where the core of a cell wider than the patch begins depends on the whole cell.
    ``open_frame``: a cell cut by the image's frame goes on beyond it (a training patch cut from a
    larger image), so the frame is not its outside.

    >>> labels = np.zeros((9, 14), np.int32)
    >>> labels[1:8, 1:7], labels[1:8, 7:13] = 1, 2      # two touching squares
    >>> cores = cell_cores(labels)
    >>> sorted(np.unique(cores).tolist()), bool((cores[:, 6:8] == 0).all())
    ([0, 1, 2], True)
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise CellSegError(
            f"labels: expected a 2-D integer label image, got {labels.dtype} {labels.shape}"
        )
    if isinstance(depth, bool) or not isinstance(depth, numbers.Real) or not 0 <= depth <= 1:
        raise CellSegError(f"depth: expected a number in [0, 1], got {depth!r}")
    if max_depth is not None and (
        isinstance(max_depth, bool) or not isinstance(max_depth, numbers.Real) or not max_depth > 0
    ):
        raise CellSegError(f"max_depth: expected a number > 0 (pixels) or None, got {max_depth!r}")
    if not isinstance(open_frame, bool):
        raise CellSegError(f"open_frame: expected True or False, got {open_frame!r}")
    margin = 0
    if open_frame:  # the cells go on beyond the frame: as deep again as they could be cored
        margin = int(math.ceil(max_depth)) + 1 if max_depth else max(labels.shape)
        labels = np.pad(labels, margin, mode="edge")
    cores = np.zeros_like(labels)
    for cell, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        inside = labels[box] == cell
        distance = ndi.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
        least = depth * distance.max()
        if max_depth is not None:
            least = min(least, max_depth)
        cores[box][inside & (distance >= least)] = cell
    return cores[margin : cores.shape[0] - margin, margin : cores.shape[1] - margin]


def core_targets(labels: np.ndarray) -> np.ndarray:
    """The CP classes of a network with a core class, ``(H, W)`` float32: 0 background, 1 cell, 2
    its core (:func:`cell_cores` at half depth, at most :data:`CORE_MAX_DEPTH` pixels, the frame
    open, as a training patch cut from a larger image needs)."""
    labels = np.asarray(labels)
    cores = cell_cores(labels, max_depth=CORE_MAX_DEPTH, open_frame=True)
    return (labels > 0).astype(np.float32) + (cores > 0)


def instances(
    foreground_prob: np.ndarray,
    hv: np.ndarray,
    prob_thresh: float = 0.6,
    *,
    core_prob: np.ndarray | None = None,
    preset: str | WatershedParams = DEFAULT_PRESET,
    **settings,
) -> np.ndarray:
    """Instance labels ``(H, W)`` int32 (1..N, 0 background) from a cell probability map
    ``(H, W)`` and HV maps ``(2, H, W)``, by a marker-controlled watershed.

    ``prob_thresh`` is the paper's 0.6 (hover_net: 0.5). ``preset`` picks the settings
    (:data:`PRESETS`): ``"scaled"`` (default) sizes its kernels and its minimum sizes from the
    typical cell diameter that the HV slopes reveal and scores boundaries by how fast a map falls
    relative to that slope; ``"hover_net"`` and ``"code"`` are the published recipes. Single
    settings can be overridden by keyword (see :class:`WatershedParams`). ``core_prob``: the core
    probability of a network with ``cores=True``, whose pixels above ``core_threshold`` are the
    markers then. The steps are in
    :func:`watershed_steps`.

    >>> labels = np.zeros((32, 32), np.int32)
    >>> labels[8:20, 4:16], labels[8:20, 16:28] = 1, 2    # two touching squares
    >>> int(instances(*targets(labels)).max())
    2
    """
    steps = watershed_steps(
        foreground_prob, hv, prob_thresh, core_prob=core_prob, preset=preset, **settings
    )
    return steps.labels


# --------------------------------------------------------------------------- 5. imperfect maps


def noisy_maps(
    foreground: np.ndarray,
    hv: np.ndarray,
    *,
    blur: float = 1.0,
    noise: float = 0.1,
    seed: int | np.random.Generator = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Degrade exact targets into maps that look like a network's output: ``(prob, hv)``.

    Each map (foreground ``(H, W)``, each HV channel of ``(2, H, W)``) is blurred by a Gaussian
    of ``blur`` pixels (a network's outputs are smooth: jumps become ramps, small cells fade)
    and gets spatially correlated Gaussian noise (white noise blurred by 2 pixels, scaled to a
    standard deviation of ``noise``); the probability is clipped to [0, 1]. A stand-in for real
    predictions when checking that a post-processing recipe is not tuned to exact targets only.
    """
    foreground = np.asarray(foreground, np.float32)
    hv = np.asarray(hv, np.float32)
    if foreground.ndim != 2 or hv.shape != (2, *foreground.shape):
        raise CellSegError(
            f"expected foreground (H, W) and hv (2, H, W), got {foreground.shape} and {hv.shape}"
        )
    for name, value in (("blur", blur), ("noise", noise)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
            raise CellSegError(f"{name}: expected a number >= 0, got {value!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def degrade(image: np.ndarray) -> np.ndarray:
        out = ndi.gaussian_filter(image, blur) if blur > 0 else image.copy()
        if noise > 0:
            field = ndi.gaussian_filter(rng.standard_normal(image.shape, dtype=np.float32), 2.0)
            out += noise * field / max(float(field.std()), 1e-12)
        return out

    prob = np.clip(degrade(foreground), 0.0, 1.0)
    return prob, np.stack([degrade(hv[0]), degrade(hv[1])])
