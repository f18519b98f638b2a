"""The StarDist stream: every cell a star-convex polygon, predicted at every pixel.

Schmidt, Weigert, Broaddus, Myers, "Cell Detection with Star-convex Polygons",
MICCAI 2018: a network predicts, at each pixel, the probability that the pixel
lies inside a cell (the *object probability*, ``prob``) and the distances from
the pixel to the cell's boundary along ``n_rays`` fixed directions (``dist``).
Each pixel thus proposes one polygon; non-maximum suppression keeps the most
probable ones that do not overlap, and the kept polygons are drawn as labels.
Lou, Yu et al. (NeurIPS 2022 Cell Segmentation Challenge, team sribd-med) put
this head on a ConvNeXt-UNet and train it with their own loss. Everything the
method needs is in this file, in reading order:

1. the network, :class:`ConvNeXtStarDist`;
2. the training targets, :func:`targets`, and how they change when the image is
   rotated or flipped, :func:`rotate_targets` and :func:`flip_targets`;
3. the loss, :func:`loss` (and :func:`loss_terms`, its parts);
4. the post-processing, :func:`instances`, and its three steps
   :func:`select_candidates`, :func:`suppress` and :func:`render`.

Ray convention (stardist's): ray ``k`` of ``R`` points at the angle
``phi_k = 2 pi k / R`` measured from the +column axis towards the +row axis, so
a pixel ``(y, x)`` with distances ``d`` has the polygon vertices
``(y + d_k sin phi_k, x + d_k cos phi_k)``. Ray 0 points right, ray ``R/4``
down (rows grow downwards), ray ``R/2`` left.

Targets and NMS are stardist's own functions; the polygons are drawn by a
renderer that uses their star-convexity (one edge test per pixel) and gives
stardist's ``polygons_to_label`` pixels several times faster (``method="stardist"``
uses stardist's). stardist is imported on first use (it takes seconds to
import), not with this module.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cellseg_lite._checks import as_labels
from cellseg_lite._errors import CellSegError
from cellseg_lite.unet import DEFAULT_DECODER, ConvNeXtUNet

__all__ = [
    "CODE_KEEP_FRACTION",
    "CODE_MAX_CANDIDATES",
    "CODE_SMALL_IMAGE_PIXELS",
    "CODE_SMALL_IMAGE_PROB_THRESH",
    "DEFAULT_STRIDE",
    "DIST_WEIGHT",
    "LOSS_VARIANTS",
    "MIN_DIST",
    "N_RAYS",
    "NMS_BORDER",
    "PAPER_THRESHOLDS",
    "PRESETS",
    "RENDER_METHODS",
    "ConvNeXtStarDist",
    "LossTerms",
    "Polygons",
    "StarDistTargets",
    "Thresholds",
    "flip_targets",
    "instances",
    "loss",
    "loss_terms",
    "polygon_vertices",
    "ray_angles",
    "render",
    "rotate_targets",
    "select_candidates",
    "suppress",
    "targets",
    "thresholds",
]

#: Number of rays of the paper (and of stardist's 2-D models).
N_RAYS = 32
#: Weight of the distance term in both loss variants (paper and code: 0.3).
DIST_WEIGHT = 0.3
#: The two losses: the paper's text and the authors' released code (see :func:`loss`).
LOSS_VARIANTS = ("paper", "code")
#: Distances are clamped from below at this value before NMS (the authors' code, and stardist's).
MIN_DIST = 1e-3
#: Candidates closer than this many pixels to the image border are skipped (stardist's ``b=2``,
#: which the authors' code keeps).
NMS_BORDER = 2
#: Default candidate stride of :func:`instances`: only the most probable pixel of each 4 x 4
#: block is a candidate. A cell's most probable pixel stays one (unless a more probable pixel of
#: another cell shares its block: cells under ~4 px across), so each cell's best polygon is still
#: there; NMS runs ~10x faster than on every pixel (stride 1, the authors' code).
DEFAULT_STRIDE = 4
#: The authors' inference code: past this many candidates, keep only the most probable ...
CODE_MAX_CANDIDATES = 20_000
#: ... this fraction of them.
CODE_KEEP_FRACTION = 0.5
#: The authors' code raises the probability threshold to 0.55 for images under this many pixels.
CODE_SMALL_IMAGE_PIXELS = 1500 * 1500

# Soft-overlap smoothing terms: Dice on probabilities (paper variant), and MONAI's
# DiceLoss(jaccard=True) default smooth_nr = smooth_dr = 1e-5 (code variant).
_DICE_SMOOTH = 1.0
_JACCARD_SMOOTH = 1e-5
# The paper variant's MAE is normalised by the total target probability plus this.
_MAE_EPS = 1e-6
# star_dist works on uint16 labels; ids are processed in chunks of this many (65535 marks
# "another cell" inside a chunk).
_UINT16_CHUNK = 65534


def _import_stardist():
    """Import stardist's 2-D modules, undoing the global ``warnings.formatwarning`` change
    that ``import stardist`` makes (a library should not restyle the user's warnings)."""
    saved = warnings.formatwarning
    try:
        import stardist.geometry
        import stardist.nms
        import stardist.utils
    finally:
        warnings.formatwarning = saved
    return stardist


def _check_n_rays(n_rays, name: str = "n_rays") -> int:
    if isinstance(n_rays, bool) or not isinstance(n_rays, numbers.Integral) or n_rays < 3:
        raise CellSegError(f"{name}: expected an integer >= 3 (rays per pixel), got {n_rays!r}")
    return int(n_rays)


def ray_angles(n_rays: int = N_RAYS) -> np.ndarray:
    """The ``(R,)`` ray angles ``2 pi k / R`` in radians, measured from the +column axis
    towards the +row axis (stardist's ``ray_angles``)."""
    n_rays = _check_n_rays(n_rays)
    return np.linspace(0, 2 * np.pi, n_rays, endpoint=False)


# --------------------------------------------------------------------------- 1. the network


class ConvNeXtStarDist(nn.Module):
    """ConvNeXt-UNet with a StarDist head: ``(B, 3, H, W)`` to ``prob (B, 1, H, W)`` in [0, 1]
    and ``dist (B, R, H, W)`` >= 0.

    One :class:`~cellseg_lite.unet.ConvNeXtUNet` with ``1 + n_rays`` output channels: channel 0
    through a sigmoid is the object probability, channels 1..R through a ReLU the ray distances in
    pixels (the paper's heads). No floor is applied here; :func:`instances` clamps distances at
    :data:`MIN_DIST` before NMS, as the authors' code does. ``pretrained=True`` fetches ImageNet
    weights for the encoder and falls back to random ones with a warning when offline;
    ``decoder`` is passed on to the U-Net (``"code"`` or ``"paper"``).

    Example::

        >>> net = ConvNeXtStarDist("convnext_atto", n_rays=32)
        >>> prob, dist = net(torch.zeros(1, 3, 64, 64))
        >>> prob.shape, dist.shape
        (torch.Size([1, 1, 64, 64]), torch.Size([1, 32, 64, 64]))
    """

    def __init__(
        self,
        backbone: str = "convnext_small",
        n_rays: int = N_RAYS,
        pretrained: bool = False,
        *,
        decoder: str = DEFAULT_DECODER,
    ):
        super().__init__()
        self.n_rays = _check_n_rays(n_rays)
        self.unet = ConvNeXtUNet(
            backbone, pretrained=pretrained, out_channels=1 + self.n_rays, decoder=decoder
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, H, W)`` float to ``(prob (B, 1, H, W), dist (B, R, H, W))``, any H and W."""
        out = self.unet(x)
        return torch.sigmoid(out[:, :1]), F.relu(out[:, 1:])


# --------------------------------------------------------------------------- 2. the targets


class StarDistTargets(NamedTuple):
    """Training targets of one label image: ``prob (H, W)`` float32 in [0, 1] and
    ``dist (R, H, W)`` float32 >= 0 (both 0 on background)."""

    prob: np.ndarray
    dist: np.ndarray


def _star_distances(labels: np.ndarray, n_rays: int) -> np.ndarray:
    """stardist's ``star_dist`` (C++) as ``(R, H, W)`` float32, for any number of cells.

    ``star_dist`` casts labels to uint16, which would wrap ids above 65535 onto other ids; the
    labels are therefore relabelled 1..n first, and above 65534 cells processed in chunks of
    ids, the cells outside a chunk all coded 65535 (a ray only needs to see "another cell").
    """
    sd = _import_stardist()
    from skimage.segmentation import relabel_sequential

    labels = relabel_sequential(labels)[0]
    n_cells = int(labels.max())
    if n_cells <= _UINT16_CHUNK:
        dist = sd.geometry.star_dist(labels.astype(np.uint16), n_rays, mode="cpp")
    else:
        dist = np.zeros((*labels.shape, n_rays), np.float32)
        for start in range(0, n_cells, _UINT16_CHUNK):
            inside = (labels > start) & (labels <= start + _UINT16_CHUNK)
            coded = np.where(inside, labels - start, np.where(labels > 0, 65535, 0))
            chunk = sd.geometry.star_dist(coded.astype(np.uint16), n_rays, mode="cpp")
            dist[inside] = chunk[inside]
    return np.ascontiguousarray(np.moveaxis(dist, -1, 0), dtype=np.float32)


def _object_probability(labels: np.ndarray) -> np.ndarray:
    """stardist's ``edt_prob``: per cell, the distance to the nearest other pixel (background or
    another cell) divided by the cell's largest such distance; ``(H, W)`` float32, 0 on background.

    A label image that is one cell from border to border has no background; stardist then
    assumes background around the image (and warns): here it is padded explicitly, silently.
    """
    sd = _import_stardist()
    if labels.min() == labels.max() and labels.flat[0] > 0:
        return np.ascontiguousarray(sd.utils.edt_prob(np.pad(labels, 1))[1:-1, 1:-1], np.float32)
    return np.asarray(sd.utils.edt_prob(np.ascontiguousarray(labels)), np.float32)


def targets(labels, n_rays: int = N_RAYS) -> StarDistTargets:
    """StarDist training targets of an instance label image ``(H, W)``.

    ``prob (H, W)``: stardist's object probability (``edt_prob``: the Euclidean distance to the
    nearest pixel outside the cell, normalised to 1 at each cell's centre); ``dist (R, H, W)``:
    stardist's ``star_dist`` in its C++ mode, the distance from each cell pixel to the cell's
    boundary along each ray (the image border also ends a ray). An image without cells gives
    zeros. Compute them after any geometric augmentation, or transform them with
    :func:`rotate_targets` and :func:`flip_targets`.

    Example::

        >>> labels = np.zeros((32, 32), np.int32); labels[8:24, 8:24] = 1
        >>> prob, dist = targets(labels, n_rays=8)
        >>> prob.shape, dist.shape, float(prob.max())
        ((32, 32), (8, 32, 32), 1.0)
    """
    labels = as_labels(labels, "labels")
    n_rays = _check_n_rays(n_rays)
    if not labels.any():
        return StarDistTargets(
            np.zeros(labels.shape, np.float32), np.zeros((n_rays, *labels.shape), np.float32)
        )
    return StarDistTargets(_object_probability(labels), _star_distances(labels, n_rays))


def _check_dist_map(dist, name: str = "dist"):
    """``(..., R, H, W)`` numpy array or tensor, with R >= 3."""
    if not isinstance(dist, np.ndarray | torch.Tensor):
        dist = np.asarray(dist)
    if dist.ndim < 3:
        raise CellSegError(
            f"{name}: expected distances (R, H, W) or (B, R, H, W), got shape {tuple(dist.shape)}"
        )
    return dist


def rotate_targets(dist, k: int = 1):
    """Distances ``(..., R, H, W)`` of ``np.rot90(image, k)``, from those of ``image``.

    A quarter turn moves every pixel and also turns every ray onto the next quarter: with
    stardist's convention ``np.rot90`` (counter-clockwise on screen) maps old ray ``j + R/4``
    onto new ray ``j``, so the channels are rolled by ``-k R / 4`` (``-8 k`` for R = 32) as well as
    rotated. R must be a multiple of 4. Works on numpy arrays and torch tensors; rotate ``prob``
    with ``np.rot90(prob, k)`` itself.
    """
    dist = _check_dist_map(dist)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise CellSegError(f"k: expected an integer number of quarter turns, got {k!r}")
    n_rays = dist.shape[-3]
    if n_rays % 4:
        raise CellSegError(
            f"dist: a quarter turn permutes the rays only when n_rays is a multiple of 4, got {n_rays}"
        )
    shift = -int(k) * n_rays // 4
    if isinstance(dist, torch.Tensor):
        return torch.roll(torch.rot90(dist, int(k), dims=(-2, -1)), shift, dims=-3)
    return np.roll(np.rot90(dist, int(k), axes=(-2, -1)), shift, axis=-3)


def flip_targets(dist, axis: int):
    """Distances ``(..., R, H, W)`` of ``np.flip(image, axis)``, from those of ``image``.

    A mirror reverses the order of the rays: flipping the rows (``axis=0``) maps old ray ``-j``
    onto new ray ``j``; flipping the columns (``axis=1``) maps old ray ``R/2 - j`` onto ``j``
    (indices mod R; R must be even for ``axis=1``). ``axis`` is the image axis (0 = rows,
    1 = columns). Works on numpy arrays and torch tensors.
    """
    dist = _check_dist_map(dist)
    if axis not in (0, 1) or isinstance(axis, bool):
        raise CellSegError(f"axis: expected 0 (rows) or 1 (columns), got {axis!r}")
    n_rays = dist.shape[-3]
    if axis == 1 and n_rays % 2:
        raise CellSegError(
            f"dist: a left-right flip maps rays onto rays only for an even n_rays, got {n_rays}"
        )
    rays = np.arange(n_rays)
    order = (-rays) % n_rays if axis == 0 else (n_rays // 2 - rays) % n_rays
    if isinstance(dist, torch.Tensor):
        index = torch.as_tensor(order, device=dist.device)
        return torch.flip(dist, dims=(dist.ndim - 2 + axis,)).index_select(-3, index)
    return np.take(np.flip(dist, axis=dist.ndim - 2 + axis), order, axis=-3)


# --------------------------------------------------------------------------- 3. the loss


class LossTerms(NamedTuple):
    """The loss and its three parts (scalar tensors): ``total = bce + overlap + weight * dist``.

    ``overlap`` is the soft Dice of the probabilities (paper variant) or the soft Jaccard of the
    probability-weighted distances (code variant); ``dist`` the mean absolute distance error
    over cells weighted by the target probability (paper) or the L1 of the weighted maps (code).
    """

    total: torch.Tensor
    bce: torch.Tensor
    overlap: torch.Tensor
    dist: torch.Tensor


def _as_batch(tensor, name: str, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise CellSegError(f"{name}: expected a torch.Tensor {what}, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise CellSegError(f"{name}: expected a float tensor, got {tensor.dtype}")
    return tensor


def _check_loss_inputs(pred_prob, pred_dist, prob, dist):
    pred_prob = _as_batch(pred_prob, "pred_prob", "(B, 1, H, W)")
    pred_dist = _as_batch(pred_dist, "pred_dist", "(B, R, H, W)")
    prob = _as_batch(prob, "prob", "(B, 1, H, W) or (B, H, W)")
    dist = _as_batch(dist, "dist", "(B, R, H, W)")
    if pred_prob.ndim != 4 or pred_prob.shape[1] != 1:
        raise CellSegError(f"pred_prob: expected shape (B, 1, H, W), got {tuple(pred_prob.shape)}")
    if prob.ndim == 3:
        prob = prob.unsqueeze(1)
    if prob.shape != pred_prob.shape:
        raise CellSegError(
            f"prob: expected the shape of pred_prob {tuple(pred_prob.shape)} "
            f"(or without its channel axis), got {tuple(prob.shape)}"
        )
    if (
        pred_dist.ndim != 4
        or pred_dist.shape[0] != pred_prob.shape[0]
        or pred_dist.shape[2:] != pred_prob.shape[2:]
    ):
        raise CellSegError(
            f"pred_dist: expected shape (B, R, H, W) with B, H, W of pred_prob "
            f"{tuple(pred_prob.shape)}, got {tuple(pred_dist.shape)}"
        )
    if dist.shape != pred_dist.shape:
        if (
            dist.ndim == 4
            and dist.shape[0] == pred_dist.shape[0]
            and dist.shape[2:] == pred_dist.shape[2:]
        ):
            raise CellSegError(
                f"dist: n_rays mismatch, the targets have {dist.shape[1]} rays and pred_dist "
                f"{pred_dist.shape[1]}"
            )
        raise CellSegError(
            f"dist: expected the shape of pred_dist {tuple(pred_dist.shape)}, got {tuple(dist.shape)}"
        )
    with torch.no_grad():
        bad = torch.stack(
            [
                ((pred_prob < 0) | (pred_prob > 1) | pred_prob.isnan()).any(),
                ((prob < 0) | (prob > 1) | prob.isnan()).any(),
                (~torch.isfinite(dist)).any() | (dist < 0).any(),
            ]
        ).tolist()
    if bad[0]:
        raise CellSegError(
            "pred_prob: values must be probabilities in [0, 1] (apply the sigmoid first)"
        )
    if bad[1]:
        raise CellSegError("prob: target values must lie in [0, 1]")
    if bad[2]:
        raise CellSegError("dist: target distances must be finite and >= 0")
    return pred_prob, pred_dist, prob, dist


def loss_terms(
    pred_prob: torch.Tensor,
    pred_dist: torch.Tensor,
    prob: torch.Tensor,
    dist: torch.Tensor,
    *,
    variant: str = "paper",
    dist_weight: float = DIST_WEIGHT,
) -> LossTerms:
    """The StarDist loss and its parts; see :func:`loss` for the formulas.

    ``pred_prob (B, 1, H, W)`` in [0, 1] and ``pred_dist (B, R, H, W)`` are the network's outputs,
    ``prob (B, 1, H, W)`` or ``(B, H, W)`` and ``dist (B, R, H, W)`` the targets of
    :func:`targets`, stacked. Computed in float32 (outside autocast), whatever the inputs' dtype.
    """
    if variant not in LOSS_VARIANTS:
        raise CellSegError(
            f"variant: expected one of {', '.join(map(repr, LOSS_VARIANTS))}, got {variant!r}"
        )
    if (
        not isinstance(dist_weight, numbers.Real)
        or not math.isfinite(dist_weight)
        or dist_weight < 0
    ):
        raise CellSegError(f"dist_weight: expected a finite number >= 0, got {dist_weight!r}")
    pred_prob, pred_dist, prob, dist = _check_loss_inputs(pred_prob, pred_dist, prob, dist)
    device_type = pred_prob.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        p_hat, d_hat = pred_prob.float(), pred_dist.float()
        p, d = prob.float().to(p_hat.device), dist.float().to(p_hat.device)
        bce = F.binary_cross_entropy(p_hat, p)  # logs clamped at -100: finite
        if variant == "paper":
            # soft Dice of the probabilities over the whole batch
            overlap = 1 - (2 * (p_hat * p).sum() + _DICE_SMOOTH) / (
                p_hat.sum() + p.sum() + _DICE_SMOOTH
            )
            # mean absolute error over the rays, averaged over pixels weighted by the target prob
            error = (d_hat - d).abs().mean(dim=1, keepdim=True)
            dist_term = (p * error).sum() / (p.sum() + _MAE_EPS)
        else:
            # the authors' code: distances weighted by the target probability, then a soft
            # Jaccard per image and ray (MONAI DiceLoss(squared_pred=True, jaccard=True)) and L1
            a, g = d_hat * p, d * p
            dims = (2, 3)
            inter = (a * g).sum(dims)
            union = (a * a).sum(dims) + (g * g).sum(dims) - inter
            overlap = (1 - (inter + _JACCARD_SMOOTH / 2) / (union + _JACCARD_SMOOTH / 2)).mean()
            dist_term = (a - g).abs().mean()
        total = bce + overlap + dist_weight * dist_term
    return LossTerms(total, bce, overlap, dist_term)


def loss(
    pred_prob: torch.Tensor,
    pred_dist: torch.Tensor,
    prob: torch.Tensor,
    dist: torch.Tensor,
    *,
    variant: str = "paper",
    dist_weight: float = DIST_WEIGHT,
) -> torch.Tensor:
    r"""The StarDist training loss, a scalar tensor.

    With predictions :math:`\hat p, \hat d`, targets :math:`p, d`, pixels :math:`i` of the whole
    batch (:math:`N` of them), rays :math:`r = 1..R` and :math:`w` = ``dist_weight`` (0.3):

    ``variant="paper"`` (the paper's text: cross-entropy, Dice, 0.3 x MAE)::

        BCE  = -1/N sum_i [p_i log p^_i + (1 - p_i) log(1 - p^_i)]
        Dice = 1 - (2 sum_i p^_i p_i + 1) / (sum_i p^_i + sum_i p_i + 1)
        MAE  = sum_i p_i (1/R sum_r |d^_ri - d_ri|) / (sum_i p_i + 1e-6)
        loss = BCE + Dice + w MAE

    The MAE is taken over cell pixels only, each weighted by its target probability (stardist's
    own choice: a ray from a cell's centre is more reliable than one from its edge), and the
    Dice compares the probabilities with their soft target.

    ``variant="code"`` (the authors' released code), with :math:`a = p \hat d_r`,
    :math:`g = p\, d_r` per image :math:`b` and ray :math:`r`::

        Jaccard = mean_{b,r} [1 - (sum a g + s/2) / (sum a^2 + sum g^2 - sum a g + s/2)], s = 1e-5
        L1      = mean_{b,r,i} |a - g|
        loss    = BCE + Jaccard + w L1

    Both are finite with zero gradients on a patch without cells (all-zero targets and
    predictions). Bad shapes, a different number of rays in predictions and targets, or
    probabilities outside [0, 1] raise :class:`~cellseg_lite.CellSegError`.
    """
    return loss_terms(
        pred_prob, pred_dist, prob, dist, variant=variant, dist_weight=dist_weight
    ).total


# --------------------------------------------------------------------------- 4. post-processing


class Thresholds(NamedTuple):
    """Post-processing thresholds: candidates need ``prob > prob_thresh``; NMS suppresses a
    polygon overlapping a kept one by more than ``nms_thresh`` (of the smaller one's area)."""

    prob_thresh: float
    nms_thresh: float


#: Names of the threshold presets of :func:`thresholds`.
PRESETS = ("paper", "code")
#: The paper's thresholds (and the authors' code's for images of 1500 x 1500 pixels or more).
PAPER_THRESHOLDS = Thresholds(prob_thresh=0.5, nms_thresh=0.4)
#: The authors' code's probability threshold for images under 1500 x 1500 pixels.
CODE_SMALL_IMAGE_PROB_THRESH = 0.55


def thresholds(preset: str = "paper", shape: tuple[int, int] | None = None) -> Thresholds:
    """Post-processing thresholds of a preset for an image of ``shape (H, W)``.

    ``"paper"``: probability 0.5, NMS 0.4 for every image. ``"code"``: the authors' inference
    code raises the probability threshold to 0.55 for images under 1500 x 1500 pixels (read here
    as ``H * W < 1500**2``) and keeps 0.5 above; NMS 0.4. The code preset needs ``shape``.
    """
    if preset not in PRESETS:
        raise CellSegError(
            f"preset: expected one of {', '.join(map(repr, PRESETS))}, got {preset!r}"
        )
    if preset == "paper":
        return PAPER_THRESHOLDS
    try:
        height, width = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise CellSegError(
            f"shape: the 'code' preset needs the image's (H, W), got {shape!r}"
        ) from None
    if height < 1 or width < 1:
        raise CellSegError(f"shape: expected a positive (H, W), got {shape!r}")
    if height * width < CODE_SMALL_IMAGE_PIXELS:
        return Thresholds(CODE_SMALL_IMAGE_PROB_THRESH, PAPER_THRESHOLDS.nms_thresh)
    return PAPER_THRESHOLDS


class Polygons(NamedTuple):
    """Star-convex polygons: ``points (N, 2)`` int (row, col) centres, ``prob (N,)`` float32
    scores and ``dist (N, R)`` float32 ray lengths."""

    points: np.ndarray
    prob: np.ndarray
    dist: np.ndarray


def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        x = np.asarray(x)
    except Exception as err:
        raise CellSegError(f"{name}: cannot be read as an array ({err})") from err
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise CellSegError(f"{name}: expected numbers, got dtype {x.dtype}")
    return x


def _check_maps(prob, dist) -> tuple[np.ndarray, np.ndarray]:
    """``prob (H, W)`` (or ``(1, H, W)``) in [0, 1] and ``dist (R, H, W)``, both finite."""
    prob, dist = _to_numpy(prob, "prob"), _to_numpy(dist, "dist")
    if prob.ndim == 3 and prob.shape[0] == 1:
        prob = prob[0]
    if prob.ndim != 2 or prob.size == 0:
        raise CellSegError(f"prob: expected a non-empty (H, W) map, got shape {prob.shape}")
    if dist.ndim != 3 or dist.shape[1:] != prob.shape:
        hint = (
            " (channel-last? pass dist as (R, H, W))"
            if dist.ndim == 3 and dist.shape[:2] == prob.shape
            else ""
        )
        raise CellSegError(
            f"dist: expected shape (R, {prob.shape[0]}, {prob.shape[1]}) to match prob, "
            f"got {dist.shape}{hint}"
        )
    _check_n_rays(dist.shape[0], "dist: number of rays")
    if not np.isfinite(prob).all():
        raise CellSegError("prob: contains NaN or infinite values")
    if prob.min() < 0 or prob.max() > 1:
        raise CellSegError(
            f"prob: values must be probabilities in [0, 1], found [{prob.min():g}, {prob.max():g}]"
        )
    if not np.isfinite(dist).all():
        raise CellSegError("dist: contains NaN or infinite values")
    return prob.astype(np.float32, copy=False), dist.astype(np.float32, copy=False)


def _check_fraction(value, name: str, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise CellSegError(f"{name}: expected a number, got {value!r}")
    if not (0 < value <= 1 if low_open else 0 <= value <= 1):
        raise CellSegError(
            f"{name}: expected a value in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}"
        )
    return float(value)


def _check_count(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise CellSegError(f"{name}: expected an integer >= {low}, got {value!r}")
    return int(value)


def select_candidates(
    prob,
    dist,
    prob_thresh: float = 0.5,
    *,
    stride: int = DEFAULT_STRIDE,
    border: int = NMS_BORDER,
    max_candidates: int | None = CODE_MAX_CANDIDATES,
    keep_fraction: float = CODE_KEEP_FRACTION,
    min_dist: float = MIN_DIST,
) -> Polygons:
    """Step 1 of :func:`instances`: the pixels whose polygons enter NMS.

    Pixels with ``prob > prob_thresh``, at least ``border`` pixels from the image border;
    with ``stride > 1`` only the most probable pixel of each ``stride x stride`` block (a
    cheaper NMS; unlike plain subsampling it keeps each cell's most probable pixel, unless a
    more probable pixel of another cell shares its block); past
    ``max_candidates`` candidates only the most probable ``keep_fraction`` of them (the authors'
    code: 20,000 and 0.5; ``max_candidates=None`` keeps all). Distances are clamped at
    ``min_dist`` (the authors' 1e-3). ``prob (H, W)``, ``dist (R, H, W)``; returns the
    candidates unsorted.
    """
    prob, dist = _check_maps(prob, dist)
    return _select_candidates(
        prob, dist, prob_thresh, stride, border, max_candidates, keep_fraction, min_dist
    )


def _select_candidates(
    prob, dist, prob_thresh, stride, border, max_candidates, keep_fraction, min_dist
) -> Polygons:
    """:func:`select_candidates` on maps already checked by :func:`_check_maps`."""
    prob_thresh = _check_fraction(prob_thresh, "prob_thresh")
    stride = _check_count(stride, "stride", 1)
    border = _check_count(border, "border", 0)
    if max_candidates is not None:
        max_candidates = _check_count(max_candidates, "max_candidates", 1)
    keep_fraction = _check_fraction(keep_fraction, "keep_fraction", low_open=True)
    if isinstance(min_dist, bool) or not isinstance(min_dist, numbers.Real) or not min_dist >= 0:
        raise CellSegError(f"min_dist: expected a number >= 0, got {min_dist!r}")

    height, width = prob.shape
    score = prob
    if border:
        score = np.full_like(prob, -1.0)
        score[border : height - border, border : width - border] = prob[
            border : height - border, border : width - border
        ]
    if stride == 1:
        rows, cols = np.nonzero(score > prob_thresh)
    else:
        # the argmax of each stride x stride block (the image padded with -1 to whole blocks)
        nby, nbx = -(-height // stride), -(-width // stride)
        padded = np.full((nby * stride, nbx * stride), -1.0, np.float32)
        padded[:height, :width] = score
        blocks = (
            padded.reshape(nby, stride, nbx, stride).transpose(0, 2, 1, 3).reshape(nby, nbx, -1)
        )
        best = blocks.argmax(axis=-1)
        best_score = np.take_along_axis(blocks, best[..., None], axis=-1)[..., 0]
        by, bx = np.nonzero(best_score > prob_thresh)
        rows = by * stride + best[by, bx] // stride
        cols = bx * stride + best[by, bx] % stride
    scores = prob[rows, cols]
    if max_candidates is not None and len(scores) > max_candidates:
        keep = math.ceil(keep_fraction * len(scores))
        top = np.argpartition(-scores, keep - 1)[:keep]
        rows, cols, scores = rows[top], cols[top], scores[top]
    rays = np.maximum(dist[:, rows, cols].T, np.float32(min_dist))
    points = np.stack([rows, cols], axis=1).astype(np.int64)
    return Polygons(points, scores.astype(np.float32), np.ascontiguousarray(rays, np.float32))


def _check_polygons(polygons) -> Polygons:
    if not isinstance(polygons, Polygons):
        try:
            polygons = Polygons(*polygons)
        except TypeError:
            raise CellSegError(
                f"polygons: expected Polygons(points, prob, dist), got {type(polygons).__name__}"
            ) from None
    points, prob, dist = (np.asarray(a) for a in polygons)
    n = len(points)
    if points.shape != (n, 2) or prob.shape != (n,) or dist.ndim != 2 or len(dist) != n:
        raise CellSegError(
            f"polygons: expected points (N, 2), prob (N,), dist (N, R), got shapes "
            f"{points.shape}, {prob.shape}, {dist.shape}"
        )
    return Polygons(points, prob, dist)


def suppress(polygons: Polygons, nms_thresh: float = 0.4) -> Polygons:
    """Step 2 of :func:`instances`: greedy non-maximum suppression (stardist's C++ NMS).

    Polygons are visited from the most to the least probable; each one still standing
    suppresses every later polygon that it overlaps by more than ``nms_thresh`` of the smaller
    polygon's area (stardist's overlap, intersection / min area, not intersection over union).
    Returns the survivors, most probable first.
    stardist parallelises (OpenMP) the inner loop over one kept polygon's neighbours, a fork and
    join per kept polygon: on a machine whose cores are busy with other work it can run much
    slower than serially (``OMP_NUM_THREADS=1`` in the environment then helps).
    """
    polygons = _check_polygons(polygons)
    nms_thresh = _check_fraction(nms_thresh, "nms_thresh")
    if len(polygons.points) == 0:
        return polygons
    sd = _import_stardist()
    points, prob, dist, _ = sd.nms.non_maximum_suppression_sparse(
        polygons.dist, polygons.prob, polygons.points, nms_thresh=nms_thresh
    )
    return Polygons(points, prob, dist)


def polygon_vertices(polygons: Polygons) -> np.ndarray:
    """Vertex coordinates ``(N, 2, R)`` (rows, then columns) of the polygons, for drawing
    (stardist's ``dist_to_coord``)."""
    polygons = _check_polygons(polygons)
    sd = _import_stardist()
    if len(polygons.points) == 0:
        return np.zeros((0, 2, polygons.dist.shape[1]), np.float32)
    return sd.geometry.dist_to_coord(polygons.dist, polygons.points)


#: Polygon renderers of :func:`render`: the star-convex inside test, or stardist's own.
RENDER_METHODS = ("star", "stardist")


def _render_star(polygons: Polygons, shape: tuple[int, int]) -> np.ndarray:
    """Draw star-convex polygons with one edge test per pixel (ids = input position + 1).

    A polygon whose vertices surround its centre at increasing angles is star-convex from the
    centre: a pixel lies inside exactly when it lies on the centre's side of the one edge that
    spans its angle, the edge between rays ``k`` and ``k + 1`` with ``k = floor(angle / step)``.
    A general point-in-polygon test (skimage's, in stardist's ``polygons_to_label``) checks
    every edge instead; the pixels are the same.
    """
    points = polygons.points.astype(np.float64)
    dist = polygons.dist.astype(np.float64)
    n_rays = dist.shape[1]
    phi = 2 * np.pi * np.arange(n_rays) / n_rays
    vy, vx = dist * np.sin(phi), dist * np.cos(phi)  # (N, R) vertices around each centre
    vy1, vx1 = np.roll(vy, -1, axis=1), np.roll(vx, -1, axis=1)
    # edge k as the half-plane a y + b x <= c (relative to the centre), oriented so that the
    # centre (0, 0) is inside
    a, b = vx1 - vx, vy - vy1
    c = a * vy + b * vx
    sign = np.where(c >= 0, 1.0, -1.0)
    a, b, c = a * sign, b * sign, c * sign
    height, width = shape
    top = np.maximum(np.ceil(points[:, 0] + vy.min(axis=1)), 0).astype(np.int64)
    bottom = np.minimum(np.floor(points[:, 0] + vy.max(axis=1)), height - 1).astype(np.int64)
    left = np.maximum(np.ceil(points[:, 1] + vx.min(axis=1)), 0).astype(np.int64)
    right = np.minimum(np.floor(points[:, 1] + vx.max(axis=1)), width - 1).astype(np.int64)
    per_radian = n_rays / (2 * np.pi)
    labels = np.zeros(shape, np.int32)
    for i in np.argsort(polygons.prob, kind="stable"):  # least probable first
        if top[i] > bottom[i] or left[i] > right[i]:
            continue
        y = np.arange(top[i], bottom[i] + 1)[:, None] - points[i, 0]
        x = np.arange(left[i], right[i] + 1)[None, :] - points[i, 1]
        k = np.floor(np.arctan2(y, x) * per_radian).astype(np.int64) % n_rays
        inside = a[i][k] * y + b[i][k] * x <= c[i][k]
        labels[top[i] : bottom[i] + 1, left[i] : right[i] + 1][inside] = i + 1
    return labels


def render(polygons: Polygons, shape: tuple[int, int], *, method: str = "star") -> np.ndarray:
    """Step 3 of :func:`instances`: draw the polygons as ``(H, W)`` int32 labels 1..n.

    A pixel belongs to a polygon when its centre lies inside; polygons are drawn from the least
    to the most probable, so where two overlap the more probable one wins, and ids follow the
    polygons' order (1 = the first, the most probable after :func:`suppress`). A polygon hidden
    entirely under others leaves no pixels, and the ids are renumbered 1..n without gaps.
    ``method="stardist"`` draws with stardist's ``polygons_to_label`` (skimage's point-in-polygon
    test, ~1 ms a polygon); the default ``"star"`` uses star-convexity to test one edge per pixel
    instead, several times faster, with the same pixels (tested against stardist's).
    """
    polygons = _check_polygons(polygons)
    if method not in RENDER_METHODS:
        raise CellSegError(
            f"method: expected one of {', '.join(map(repr, RENDER_METHODS))}, got {method!r}"
        )
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise CellSegError(f"shape: expected (H, W), got {shape!r}") from None
    if len(shape) != 2 or min(shape) < 1:
        raise CellSegError(f"shape: expected a positive (H, W), got {shape!r}")
    if len(polygons.points) == 0:
        return np.zeros(shape, np.int32)
    from skimage.segmentation import relabel_sequential

    if method == "star":
        labels = _render_star(polygons, shape)
    else:
        sd = _import_stardist()
        labels = sd.geometry.polygons_to_label(
            polygons.dist, polygons.points, shape=shape, prob=polygons.prob
        ).astype(np.int32, copy=False)
    return relabel_sequential(labels)[0]


def instances(
    prob,
    dist,
    prob_thresh: float = 0.5,
    nms_thresh: float = 0.4,
    *,
    stride: int = DEFAULT_STRIDE,
    border: int = NMS_BORDER,
    max_candidates: int | None = CODE_MAX_CANDIDATES,
    keep_fraction: float = CODE_KEEP_FRACTION,
    min_dist: float = MIN_DIST,
    method: str = "star",
) -> np.ndarray:
    """Instance labels ``(H, W)`` int32 from a probability map ``prob (H, W)`` and distance maps
    ``dist (R, H, W)`` (numpy arrays or tensors).

    :func:`select_candidates` (``prob > prob_thresh``, ``stride``, ``border``, the authors' cap
    ``max_candidates``/``keep_fraction``, distances clamped at ``min_dist``), then
    :func:`suppress` (NMS at ``nms_thresh``), then :func:`render`
    (``method``). Defaults are the paper's thresholds; :func:`thresholds` gives the authors' code
    preset. The exact targets go back to their labels: ``instances(*targets(labels))``.

    Speed is set by the number of candidates (``stride``; ``stride=1`` gives the authors' dense
    candidates) and by stardist's OpenMP NMS, which on a CPU busy with other work runs far faster
    with ``OMP_NUM_THREADS=1`` in the environment (2048 x 2048, 2000 cells, 2 busy cores:
    1.3 s against 6.3 s; ``benchmarks/RESULTS.md``).
    """
    prob, dist = _check_maps(prob, dist)
    nms_thresh = _check_fraction(nms_thresh, "nms_thresh")
    if method not in RENDER_METHODS:
        raise CellSegError(
            f"method: expected one of {', '.join(map(repr, RENDER_METHODS))}, got {method!r}"
        )
    found = _select_candidates(
        prob, dist, prob_thresh, stride, border, max_candidates, keep_fraction, min_dist
    )
    return render(suppress(found, nms_thresh), prob.shape, method=method)
