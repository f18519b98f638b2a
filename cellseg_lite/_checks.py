"""Input checks shared by every module: one place that turns bad input into a CellSegError."""

from __future__ import annotations

import os

import numpy as np

from cellseg_lite._errors import CellSegError, where


def positive_int(value, name: str) -> int:
    """``value`` as an int, or a CellSegError naming ``name`` (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise CellSegError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def as_image(image, source: str | os.PathLike | None = "image") -> np.ndarray:
    """Check a 2-D image array: ``(H, W)`` or channel-last ``(H, W, C)``, numeric, non-empty.

    Returns the array unchanged (no copy, native dtype).
    """
    if not isinstance(image, np.ndarray):
        try:
            image = np.asarray(image)
        except Exception as err:  # ragged lists and the like
            raise CellSegError(f"{where(source)}: cannot be read as an array ({err})") from err
    if image.dtype == bool:
        image = image.astype(np.uint8)
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise CellSegError(f"{where(source)}: unsupported pixel type {image.dtype}")
    if image.ndim not in (2, 3):
        raise CellSegError(
            f"{where(source)}: expected a 2-D image (H, W) or (H, W, C), got shape {image.shape}"
            + (" (a 3-D stack? pass one plane at a time)" if image.ndim == 4 else "")
        )
    if image.size == 0 or image.shape[0] == 0 or image.shape[1] == 0:
        raise CellSegError(f"{where(source)}: the image has no pixels (shape {image.shape})")
    # (C, H, W) with a few channels: a channel-first array, not an image with thousands of channels
    if image.ndim == 3 and image.shape[0] <= 4 and image.shape[2] > 16:
        raise CellSegError(
            f"{where(source)}: shape {image.shape} looks channel-first or like a 3-D stack; "
            "images must be channel-last (H, W, C)"
        )
    return image


def as_labels(labels, source: str | os.PathLike | None = "labels") -> np.ndarray:
    """Check an instance label image and return it as ``(H, W)`` int32 (0 = background).

    Accepts any integer dtype, integer-valued floats and a trailing singleton
    channel; refuses negative ids, fractional values, RGB label images and ids
    that do not fit in int32.
    """
    labels = np.asarray(labels)
    if labels.ndim == 3 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.ndim != 2:
        raise CellSegError(
            f"{where(source)}: labels must be a 2-D (H, W) image of instance ids, got shape {labels.shape}"
        )
    if labels.size == 0:
        raise CellSegError(f"{where(source)}: the label image has no pixels (shape {labels.shape})")
    if labels.dtype == bool:
        return labels.astype(np.int32)
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)):
            raise CellSegError(f"{where(source)}: labels contain NaN or infinite values")
        if np.any(labels != np.round(labels)):
            raise CellSegError(f"{where(source)}: labels must be integers, found fractional values")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise CellSegError(f"{where(source)}: labels must be integers, got dtype {labels.dtype}")
    if labels.dtype == np.int32:
        low, high = (int(labels.min()), int(labels.max()))
    else:
        low, high = (labels.min().item(), labels.max().item())
    if low < 0:
        raise CellSegError(f"{where(source)}: labels must be >= 0, found {low}")
    if high > np.iinfo(np.int32).max:
        raise CellSegError(f"{where(source)}: label id {high} does not fit in int32")
    return labels.astype(np.int32, copy=False)


def check_same_size(image: np.ndarray, labels: np.ndarray, source=None) -> None:
    """Raise when an image and its labels do not cover the same (H, W) grid."""
    if image.shape[:2] != labels.shape[:2]:
        raise CellSegError(
            f"{where(source)}: image size {image.shape[:2]} and label size {labels.shape[:2]} differ"
        )


def resolve_device(device):
    """``device`` as a ``torch.device``; ``None`` picks CUDA when available, else the CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise CellSegError(f"device: not a torch device: {device!r} ({err})") from err


def load_torch_file(path, what: str, *, device="cpu"):
    """``torch.load(path, weights_only=True)``; a missing or damaged file raises a CellSegError
    that names it and says it is a ``what`` (``"router checkpoint"``, ``"segmenter"``...)."""
    import torch

    if not os.path.isfile(path):
        raise CellSegError(f"{where(path)}: {what} not found")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise CellSegError(
            f"{where(path)}: cannot be read as a checkpoint ({what}); is it truncated or corrupt? "
            f"({type(err).__name__}: {first})"
        ) from err
