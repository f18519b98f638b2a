"""The paper's eight training augmentations, applied to an image patch and its labels together.

Lou, Yu et al. (NeurIPS 2022 Cell Segmentation Challenge, team sribd-med) train with
MONAI's dictionary transforms, in this order:

1. ``RandSpatialCrop``: a random square patch, :func:`random_crop`
   (:class:`cellseg_lite.datasets.PatchDataset` already cuts it before the transform runs);
2. ``RandAxisFlip`` (p 0.5): one random axis, :func:`flip`;
3. ``RandRotate90`` (p 0.5): ``k`` quarter turns, ``k`` in 1..3, :func:`rotate90`;
4. ``RandGaussianNoise`` (p 0.25, std 0.1): :func:`gaussian_noise`;
5. ``RandAdjustContrast`` (p 0.25, gamma 1-2): :func:`adjust_contrast`;
6. ``RandGaussianSmooth`` (p 0.25, sigma 1-2): :func:`gaussian_smooth`;
7. ``RandHistogramShift`` (p 0.25, 3 control points): :func:`histogram_shift`;
8. ``RandZoom`` (p 0.15, zoom 0.5-2, size kept): :func:`zoom`.

:class:`Augment` runs steps 2-8 as one ``PatchDataset`` transform, drawing every
random choice from the ``np.random.Generator`` it is given (never from global numpy
or torch state), so a given generator state gives the same patch in any process.
Each step is also a small public function with explicit parameters, and
:meth:`Augment.explain` says which steps fired with which parameters.

Where this rebuild and the authors' code (their ``train_convnext_stardist.py``) part:

- histogram shift: the paper gives no number of control points; the code passes
  ``num_control_points=3`` (MONAI's default is 10). ``control_points=3`` here.
- smoothing: the code sets only ``sigma_x=(1, 2)``, so the other axis keeps MONAI's
  default range (0.25, 1.5); here both axes draw from ``sigma`` (the paper's 1-2).
- intensities: the code's images reach these transforms as 0..255 floats (its
  ``ScaleIntensityd`` is commented out), which makes a noise std of 0.1 nearly
  invisible; here they are in [0, 1], as the paper's numbers read. Contrast,
  smoothing and histogram shift do not depend on the scale.
- zoom: MONAI's ``RandZoom`` pads a zoomed-out image by repeating its edge pixels
  (``padding_mode="edge"``), which also stretches the cells on the border of the
  labels; here zoom-out pads with zeros (image) and background (labels). The
  image is resampled bilinearly with antialiasing (the code: ``"area"``).
- noise: recent MONAI versions draw the std of each noise image uniformly from
  ``[0, std]`` (``sample_std=True``); versions before that option used the std as given, as here.

Trap (paper notes, section 11): StarDist targets must be computed *after* these
geometric augmentations, because a flip or a quarter turn permutes the ray channels
of the star distances; the training loop computes them in the ``DataLoader``
workers, from the augmented labels (or see
:func:`cellseg_lite.streams.stardist.rotate_targets` and ``flip_targets``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from cellseg_lite import datasets
from cellseg_lite._checks import as_labels, check_same_size
from cellseg_lite._errors import CellSegError

__all__ = [
    "PAPER",
    "STEPS",
    "Augment",
    "Augmented",
    "Step",
    "adjust_contrast",
    "flip",
    "gaussian_noise",
    "gaussian_smooth",
    "histogram_shift",
    "none",
    "random_crop",
    "rotate90",
    "zoom",
]

STEPS = ("flip", "rotate90", "noise", "contrast", "smooth", "histogram_shift", "zoom")
"""The steps :class:`Augment` runs after the crop, in the authors' order; each is also
the name of its probability argument."""

# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_probability(value, name: str) -> float:
    if not _is_real(value) or not 0.0 <= float(value) <= 1.0:
        raise CellSegError(f"{name}: expected a probability in [0, 1], got {value!r}")
    return float(value)


def _check_positive(value, name: str, *, zero: bool = False) -> float:
    ok = _is_real(value) and math.isfinite(value) and (value >= 0 if zero else value > 0)
    if not ok:
        bound = ">= 0" if zero else "> 0"
        raise CellSegError(f"{name}: expected a finite number {bound}, got {value!r}")
    return float(value)


def _check_range(value, name: str) -> tuple[float, float]:
    """``(low, high)`` with ``0 < low <= high``, both finite."""
    try:
        low, high = value
    except (TypeError, ValueError):
        raise CellSegError(
            f"{name}: expected a range (low, high) with 0 < low <= high, got {value!r}"
        ) from None
    if not (_is_real(low) and _is_real(high) and math.isfinite(low) and math.isfinite(high)):
        raise CellSegError(f"{name}: expected two finite numbers (low, high), got {value!r}")
    if not 0 < low <= high:
        raise CellSegError(f"{name}: expected 0 < low <= high, got {value!r}")
    return float(low), float(high)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_control_points(value, name: str = "control_points") -> tuple[int, int]:
    """An integer >= 3, or a range ``(low, high)`` of integers with ``3 <= low <= high``."""
    if _is_int(value):
        low = high = int(value)
    else:
        try:
            low, high = value
        except (TypeError, ValueError):
            raise CellSegError(
                f"{name}: expected an integer >= 3 or a range (low, high) of integers, "
                f"got {value!r}"
            ) from None
        if not (_is_int(low) and _is_int(high)):
            raise CellSegError(f"{name}: expected integers, got {value!r}")
        low, high = int(low), int(high)
    if not 3 <= low <= high:
        raise CellSegError(
            f"{name}: expected at least 3 control points (the two ends and one that moves), "
            f"with low <= high, got {value!r}"
        )
    return low, high


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise CellSegError(
            f"rng: expected a np.random.Generator (e.g. np.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )
    return rng


def _check_image(image, name: str = "image") -> np.ndarray:
    """A ``(H, W, C)`` image as float32: uint8 divided by 255, floats kept (finite)."""
    if not isinstance(image, np.ndarray):
        raise CellSegError(f"{name}: expected a numpy array (H, W, C), got {type(image).__name__}")
    if image.ndim != 3 or min(image.shape) == 0:
        raise CellSegError(
            f"{name}: expected a channel-last image (H, W, C) with pixels, got shape {image.shape}"
        )
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        raise CellSegError(f"{name}: expected uint8 or float pixels in [0, 1], got {image.dtype}")
    converted = np.array(
        image, dtype=np.float32, order="C"
    )  # always a copy: inputs stay as they are
    if image.dtype == np.uint8:
        converted /= np.float32(255)
    elif not np.all(np.isfinite(converted)):
        raise CellSegError(f"{name}: contains NaN or infinite values")
    return converted


def _check_labels(labels, name: str = "labels") -> np.ndarray:
    """``(H, W)`` int32 labels as a C-ordered writable copy (torch.from_numpy needs one)."""
    return np.array(as_labels(labels, name), dtype=np.int32, order="C")


def _check_pair(image, labels) -> tuple[np.ndarray, np.ndarray]:
    image = _check_image(image)
    labels = _check_labels(labels)
    check_same_size(image, labels, "image and labels")
    return image, labels


# --------------------------------------------------------------------------------------
# The steps, each with explicit parameters
# --------------------------------------------------------------------------------------


def _chw(image: np.ndarray) -> torch.Tensor:
    """``(H, W, C)`` numpy -> ``(C, H, W)`` tensor view, as torchvision wants it (no copy)."""
    return torch.from_numpy(image).permute(2, 0, 1)


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def random_crop(
    image: np.ndarray, labels: np.ndarray, patch_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """RandSpatialCrop: a random ``(P, P[, C])`` patch of ``image`` and its ``(P, P)`` labels.

    The same function :class:`~cellseg_lite.datasets.PatchDataset` cuts its patches with
    (:func:`cellseg_lite.datasets.sample_patch`): every position equally likely, a side
    shorter than ``P`` zero-padded at the bottom or right (the authors' code pads both
    sides, MONAI's ``SpatialPad``, before cropping).
    """
    _check_rng(rng)
    return datasets.sample_patch(image, labels, patch_size, rng)


def _flip(image, labels, axis):
    flipper = tvf.vertical_flip if axis == 0 else tvf.horizontal_flip
    return _hwc(flipper(_chw(image))), flipper(torch.from_numpy(labels)).numpy()


def flip(image: np.ndarray, labels: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Mirror ``image`` (H, W, C) and ``labels`` (H, W) along ``axis`` (0: rows, up-down; 1: columns).

    Returns ``(image float32 (H, W, C), labels int32 (H, W))``, as ``np.flip`` of both.
    """
    image, labels = _check_pair(image, labels)
    if not _is_int(axis) or axis not in (0, 1):
        raise CellSegError(f"axis: expected 0 (rows) or 1 (columns), got {axis!r}")
    return _flip(image, labels, int(axis))


def _rotate90(image, labels, k):
    return (
        _hwc(torch.rot90(_chw(image), k, dims=(1, 2))),
        torch.rot90(torch.from_numpy(labels), k, dims=(0, 1)).numpy(),
    )


def rotate90(image: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Turn ``image`` (H, W, C) and ``labels`` (H, W) by ``k`` quarter turns, as ``np.rot90`` does.

    Positive ``k`` turns counter-clockwise (from the first axis towards the second);
    a non-square image comes back as ``(W, H, C)`` for odd ``k``.
    """
    image, labels = _check_pair(image, labels)
    if not _is_int(k):
        raise CellSegError(f"k: expected an integer number of quarter turns, got {k!r}")
    return _rotate90(image, labels, int(k) % 4)


def _gaussian_noise(image, std, rng):
    return image + std * rng.standard_normal(image.shape, dtype=np.float32)


def gaussian_noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Add zero-mean Gaussian noise of standard deviation ``std`` to every pixel of ``image`` (H, W, C).

    Returns float32 ``(H, W, C)``, not clipped (MONAI leaves the range open too;
    :class:`Augment` clips once, at the end).
    """
    image = _check_image(image)
    std = _check_positive(std, "std", zero=True)
    return _gaussian_noise(image, np.float32(std), _check_rng(rng))


def _adjust_contrast(image, gamma):
    low, high = float(image.min()), float(image.max())
    if high <= low:  # a constant image has no contrast to change
        return image.copy()
    unit = torch.from_numpy((image - low) / (high - low)).clamp_(0, 1)
    return tvf.adjust_gamma(unit, gamma).numpy() * np.float32(high - low) + np.float32(low)


def adjust_contrast(image: np.ndarray, gamma: float) -> np.ndarray:
    """Gamma curve between the image's own minimum and maximum, MONAI's ``AdjustContrast``.

    ``((x - min) / (max - min)) ** gamma * (max - min) + min`` over all pixels and
    channels of ``image`` (H, W, C): ``gamma > 1`` darkens the mid-tones, the
    extremes stay where they are, ``gamma = 1`` changes nothing. Returns float32.
    """
    image = _check_image(image)
    return _adjust_contrast(image, _check_positive(gamma, "gamma"))


def _gaussian_smooth(image, sigma):
    # scipy's separable filter: torchvision's gaussian_blur convolves with the full
    # 2-D kernel, three to five times slower at these sigmas. Kernel radius 4 sigma,
    # as MONAI's GaussianSmooth (truncated=4.0); borders mirrored.
    return ndimage.gaussian_filter(image, (*sigma, 0.0), truncate=4.0, mode="reflect")


def gaussian_smooth(image: np.ndarray, sigma: float | tuple[float, float]) -> np.ndarray:
    """Blur each channel of ``image`` (H, W, C) with a Gaussian of ``sigma`` pixels.

    ``sigma`` is one number or ``(sigma_rows, sigma_columns)``. Returns float32 (H, W, C).
    """
    image = _check_image(image)
    pair = (sigma, sigma) if _is_real(sigma) else sigma
    try:
        sigma_rows, sigma_cols = pair
    except (TypeError, ValueError):
        raise CellSegError(
            f"sigma: expected a number or (sigma_rows, sigma_columns), got {sigma!r}"
        ) from None
    sigma = (_check_positive(sigma_rows, "sigma"), _check_positive(sigma_cols, "sigma"))
    return _gaussian_smooth(image, sigma)


def _shift_curve(control_points, rng):
    """MONAI's random monotone curve: ``n`` evenly spaced points, the inner ones moved in turn."""
    reference = np.linspace(0.0, 1.0, control_points)
    moved = reference.copy()
    for i in range(1, control_points - 1):
        moved[i] = rng.uniform(moved[i - 1], moved[i + 1])
    return reference, moved


def _apply_curve(image, reference, moved):
    low, high = float(image.min()), float(image.max())
    if high <= low:  # MONAI warns and returns a constant image unchanged
        return image.copy()
    span = high - low
    return np.interp(image, reference * span + low, moved * span + low).astype(np.float32)


def histogram_shift(
    image: np.ndarray, control_points: int | tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """MONAI's ``RandHistogramShift``: map intensities through a random increasing curve.

    ``control_points`` (at least 3; or a range ``(low, high)`` to draw the count from)
    evenly spaced points between the image's minimum and maximum keep their ends,
    the inner ones move, each uniformly between its neighbours, and the pixels of all
    channels of ``image`` (H, W, C) are interpolated linearly through them. Fewer
    points, larger shifts. Returns float32 (H, W, C).
    """
    image = _check_image(image)
    low, high = _check_control_points(control_points)
    rng = _check_rng(rng)
    count = int(rng.integers(low, high + 1))
    return _apply_curve(image, *_shift_curve(count, rng))


def _zoom(image, labels, factor):
    height, width = labels.shape
    size = [max(1, round(height * factor)), max(1, round(width * factor))]
    if size == [height, width]:
        return image.copy(), labels.copy()
    image_t = tvf.resize(
        _chw(np.ascontiguousarray(image)), size, InterpolationMode.BILINEAR, antialias=True
    )
    # float64 holds every int32 id exactly; torchvision's integer path goes through
    # float32 and changes ids above 2**24
    labels_t = tvf.resize(
        torch.from_numpy(labels.astype(np.float64))[None], size, InterpolationMode.NEAREST_EXACT
    )
    # centre crop back to (H, W); a smaller (zoomed-out) result is padded with zeros
    image_t = tvf.center_crop(image_t, [height, width])
    labels_t = tvf.center_crop(labels_t, [height, width])
    return _hwc(image_t), labels_t[0].numpy().astype(np.int32)


def zoom(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale ``image`` (H, W, C) and ``labels`` (H, W) by ``factor`` about the centre, keeping (H, W).

    ``factor > 1`` magnifies and crops the centre back to (H, W); ``factor < 1``
    shrinks and pads with zeros (background). The image is resampled bilinearly with
    antialiasing, the labels by nearest neighbour only, so every output id is an
    input id: a cell keeps its id even when the crop or the shrinking cuts it into
    pieces, two cells never share one, and a small cell may vanish.
    """
    image, labels = _check_pair(image, labels)
    return _zoom(image, labels, _check_positive(factor, "factor"))


# --------------------------------------------------------------------------------------
# All of them, as one transform
# --------------------------------------------------------------------------------------


class Step(NamedTuple):
    """One step of :meth:`Augment.explain`: its name, whether it fired, the parameters it drew."""

    name: str
    fired: bool
    params: dict


class Augmented(NamedTuple):
    """What :meth:`Augment.explain` returns: the outputs of :meth:`Augment.__call__` and the steps."""

    image: np.ndarray
    labels: np.ndarray
    steps: tuple[Step, ...]

    @property
    def fired(self) -> tuple[str, ...]:
        """Names of the steps that fired, in the order they ran."""
        return tuple(step.name for step in self.steps if step.fired)


@dataclass(frozen=True, kw_only=True)
class Augment:
    """The paper's augmentations as a transform for :class:`~cellseg_lite.datasets.PatchDataset`.

    Call it as ``augment(image, labels, rng=rng)`` with a ``(P, P, 3)`` uint8 patch (or
    float in [0, 1]) and its ``(P, P)`` instance labels; it returns the image as float32
    ``(P, P, 3)`` clipped to [0, 1] and the labels as int32 ``(P, P)``, a subset of the
    input ids (``PatchDataset`` relabels them 1..n afterwards). Each step fires with its
    probability, in :data:`STEPS` order; the crop (RandSpatialCrop) happens before, in
    ``PatchDataset``. Compute StarDist or HoVer targets from the returned labels, never
    before: a flip or quarter turn permutes StarDist's ray channels.

    Args:
        flip: probability of mirroring along one random axis (RandAxisFlip).
        rotate90: probability of 1, 2 or 3 quarter turns (RandRotate90).
        noise, noise_std: probability and standard deviation of Gaussian noise.
        contrast, gamma: probability and range of the contrast gamma (RandAdjustContrast).
        smooth, sigma: probability and range of the blur's sigma, drawn per axis.
        histogram_shift, control_points: probability and number (or range) of control
            points of the random intensity curve (RandHistogramShift; MONAI's default is 10,
            the authors' code passes 3).
        zoom, zoom_range: probability and range of the zoom factor (RandZoom, size kept).
    """

    flip: float = 0.5
    rotate90: float = 0.5
    noise: float = 0.25
    noise_std: float = 0.1
    contrast: float = 0.25
    gamma: tuple[float, float] = (1.0, 2.0)
    smooth: float = 0.25
    sigma: tuple[float, float] = (1.0, 2.0)
    histogram_shift: float = 0.25
    control_points: int | tuple[int, int] = 3
    zoom: float = 0.15
    zoom_range: tuple[float, float] = (0.5, 2.0)

    def __post_init__(self) -> None:
        checked = {name: _check_probability(getattr(self, name), name) for name in STEPS}
        checked["noise_std"] = _check_positive(self.noise_std, "noise_std", zero=True)
        for name in ("gamma", "sigma", "zoom_range"):
            checked[name] = _check_range(getattr(self, name), name)
        low, high = _check_control_points(self.control_points)
        checked["control_points"] = low if low == high else (low, high)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def probabilities(self) -> dict[str, float]:
        """``{step: probability}`` in :data:`STEPS` order."""
        return {name: getattr(self, name) for name in STEPS}

    def __call__(
        self, image: np.ndarray, labels: np.ndarray, *, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augment one patch: ``(image float32 (P, P, 3) in [0, 1], labels int32 (P, P))``."""
        result = self.explain(image, labels, rng=rng)
        return result.image, result.labels

    def explain(
        self, image: np.ndarray, labels: np.ndarray, *, rng: np.random.Generator
    ) -> Augmented:
        """As :meth:`__call__`, and also which steps fired with which drawn parameters.

        The same ``rng`` state gives the same result as :meth:`__call__`.
        """
        image, labels = self._check_input(image, labels)
        rng = _check_rng(rng)
        steps = []

        def fires(name: str) -> bool:
            return bool(rng.random() < getattr(self, name))

        if fired := fires("flip"):
            axis = int(rng.integers(0, 2))
            image, labels = _flip(image, labels, axis)
        steps.append(Step("flip", fired, {"axis": axis} if fired else {}))

        if fired := fires("rotate90"):
            k = int(rng.integers(1, 4))
            image, labels = _rotate90(image, labels, k)
        steps.append(Step("rotate90", fired, {"k": k} if fired else {}))

        if fired := fires("noise"):
            image = _gaussian_noise(image, np.float32(self.noise_std), rng)
        steps.append(Step("noise", fired, {"std": self.noise_std} if fired else {}))

        if fired := fires("contrast"):
            gamma = float(rng.uniform(*self.gamma))
            image = _adjust_contrast(image, gamma)
        steps.append(Step("contrast", fired, {"gamma": gamma} if fired else {}))

        if fired := fires("smooth"):
            sigma = (float(rng.uniform(*self.sigma)), float(rng.uniform(*self.sigma)))
            image = _gaussian_smooth(image, sigma)
        steps.append(Step("smooth", fired, {"sigma": sigma} if fired else {}))

        if fired := fires("histogram_shift"):
            low, high = _check_control_points(self.control_points)
            reference, moved = _shift_curve(int(rng.integers(low, high + 1)), rng)
            image = _apply_curve(image, reference, moved)
            params = {"control_points": len(reference), "reference": reference, "moved": moved}
        steps.append(Step("histogram_shift", fired, params if fired else {}))

        if fired := fires("zoom"):
            factor = float(rng.uniform(*self.zoom_range))
            image, labels = _zoom(image, labels, factor)
        steps.append(Step("zoom", fired, {"factor": factor} if fired else {}))

        image = np.ascontiguousarray(np.clip(image, 0.0, 1.0), dtype=np.float32)
        labels = np.ascontiguousarray(labels, dtype=np.int32)  # already a copy of the input
        return Augmented(image, labels, tuple(steps))

    @staticmethod
    def _check_input(image, labels) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(image, np.ndarray):
            raise CellSegError(
                f"image: expected a numpy array (P, P, 3), got {type(image).__name__}"
            )
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
            raise CellSegError(
                f"image: expected a square RGB patch (P, P, 3), got shape {image.shape}"
            )
        was_float = image.dtype != np.uint8
        image = _check_image(image)
        if was_float and not (image.min() >= 0.0 and image.max() <= 1.0):
            raise CellSegError(
                f"image: float pixels must lie in [0, 1], found {image.min():g} to {image.max():g}"
            )
        labels = _check_labels(labels)
        check_same_size(image, labels, "image and labels")
        return image, labels


PAPER = Augment()
"""The paper's augmentations with the paper's probabilities (and 3 histogram control points)."""


def none() -> Augment:
    """An :class:`Augment` whose steps never fire: only uint8 -> float32 in [0, 1]."""
    return Augment(**dict.fromkeys(STEPS, 0.0))
