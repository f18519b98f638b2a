"""Read and write challenge images and instance labels, and the challenge's percentile normalisation.

The NeurIPS 2022 Cell Segmentation Challenge ships images as TIFF (often
zlib/LZW-compressed, 8 or 16 bit, sometimes channel-first), PNG, JPEG and BMP,
with one, three or more channels. :func:`read_image` turns all of them into one
convention, a channel-last numpy array in the stored dtype; :func:`normalize_image`
then applies the challenge baseline's preprocessing (per-channel 1-99 percentile
rescaling to ``uint8``), which the multi-stream method of Lou, Yu et al. (2022)
uses unchanged. Labels are written losslessly and wide enough for any number of
cells: the authors' code stored them as ``uint8`` and wrapped past 255 cells.

Libraries: tifffile (+ imagecodecs for compressed TIFF) reads TIFF, imagecodecs'
libpng binding reads and writes PNG (Pillow silently drops 16-bit colour PNGs to
8 bit), Pillow reads JPEG and BMP, and scikit-image's ``rescale_intensity`` (the
function the challenge baseline calls) does the rescaling.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import imagecodecs
import numpy as np
import tifffile
from PIL import Image
from skimage.exposure import rescale_intensity

from cellseg_lite._checks import as_image, as_labels
from cellseg_lite._errors import CellSegError, where

__all__ = [
    "LABEL_EXTENSIONS",
    "SPARSE_TAIL_PERCENTILE",
    "SPARSE_TAIL_RATIO",
    "SUPPORTED_EXTENSIONS",
    "atomic_write",
    "image_stem",
    "is_image_file",
    "normalize_image",
    "read_image",
    "read_labels",
    "write_image",
    "write_labels",
]

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
"""File types :func:`read_image` reads, lower case (matching ignores case)."""

LABEL_EXTENSIONS: tuple[str, ...] = (".tif", ".tiff", ".png", ".bmp")
"""Lossless file types :func:`read_labels` accepts (JPEG would corrupt the ids)."""

_TIFF = (".tif", ".tiff")
_PILLOW = (".jpg", ".jpeg", ".bmp")

#: A TIFF axis of unknown meaning (tifffile's ``Q`` or ``I``) in front of ``(Y, X)``
#: is read as channels up to this length, and as a 3-D stack above it.
MAX_LEADING_CHANNELS = 4
#: ... and behind ``(Y, X)`` as channels up to this length (if shorter than Y and X).
MAX_TRAILING_CHANNELS = 16

_CHANNEL_AXES = "SC"  # tifffile: S = samples of a pixel (RGB), C = channel
_UNKNOWN_AXES = "QI"  # tifffile: Q = unknown (shaped files), I = page sequence
_JPEG_QUALITY = 95
_CHUNK_PIXELS = 1 << 22  # rows of a float channel rescaled at once (about 4 M pixels)


# ----------------------------------------------------------------------------- file names


def is_image_file(path: str | os.PathLike) -> bool:
    """True when ``path`` ends in one of :data:`SUPPORTED_EXTENSIONS` (any case)."""
    return Path(path).suffix.lower() in SUPPORTED_EXTENSIONS


def image_stem(path: str | os.PathLike) -> str:
    """The file name without its image extension: ``'images/cell_00001.tiff'`` -> ``'cell_00001'``.

    The challenge pairs ``images/<stem>.<ext>`` with ``labels/<stem>_label.tiff``;
    only a supported extension is removed, so ``'a.b.png'`` gives ``'a.b'``.
    """
    name = Path(path).name
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix.lower() in SUPPORTED_EXTENSIONS else name


def _existing_file(path: str | os.PathLike, extensions: tuple[str, ...], what: str) -> Path:
    """Return ``path`` as a Path after checking it is a file with one of ``extensions``."""
    path = Path(path)
    if not path.exists():
        raise CellSegError(f"{where(path)}: file not found")
    if not path.is_file():
        raise CellSegError(f"{where(path)}: is not a file (a folder?)")
    if path.suffix.lower() not in extensions:
        raise CellSegError(
            f"{where(path)}: unsupported file type {path.suffix or '(no extension)'!r} for "
            f"{what}; supported: {', '.join(extensions)}"
        )
    return path


# ----------------------------------------------------------------------------- reading


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one 2-D image as stored: ``(H, W)`` or channel-last ``(H, W, C)``, native dtype.

    One channel is always returned as ``(H, W)`` (a stored ``(H, W, 1)`` is
    squeezed). Palette images are expanded to RGB(A) (a BMP with a gray palette
    reads as gray); 1-bit images become ``uint8`` 0/255; big-endian data comes
    back in native byte order.
    TIFF axes come from tifffile's metadata: a channel axis (``S``/``C``) in
    front is moved to the back, a depth or time axis (``Z``/``T``) is refused as
    a 3-D stack. Without metadata (axes ``Q``/``I``) a heuristic decides: a
    trailing axis of at most :data:`MAX_TRAILING_CHANNELS` that is shorter than
    both others holds channels; otherwise a leading axis of at most
    :data:`MAX_LEADING_CHANNELS` holds channels; any other shape is a 3-D stack.

    >>> read_image("images/cell_00001.tiff").shape  # doctest: +SKIP
    (1000, 1200, 3)
    """
    path = _existing_file(path, SUPPORTED_EXTENSIONS, "images")
    image = _decode(path)
    if image.size == 0:
        raise CellSegError(f"{where(path)}: the image has no pixels (shape {image.shape})")
    if not image.dtype.isnative:
        image = image.astype(image.dtype.newbyteorder("="))
    if image.dtype == bool:  # bilevel TIFF, as 1-bit PNG and BMP already are
        image = image.astype(np.uint8) * np.uint8(255)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    return as_image(image, path)


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read an instance label image as ``(H, W)`` int32 (0 = background, one id per cell).

    Accepts lossless files only (:data:`LABEL_EXTENSIONS`); the indices of a
    palette PNG are the ids. Refuses colour-coded (RGB) label images, negative
    and fractional values.
    """
    path = Path(path)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        raise CellSegError(
            f"{where(path)}: JPEG is lossy and corrupts instance ids; store labels as TIFF or PNG"
        )
    path = _existing_file(path, LABEL_EXTENSIONS, "labels")
    labels = _decode(path, palette_indices=True)
    if labels.size == 0:
        raise CellSegError(f"{where(path)}: the label image has no pixels (shape {labels.shape})")
    if labels.ndim == 3 and labels.shape[2] > 1:
        raise CellSegError(
            f"{where(path)}: labels have {labels.shape[2]} channels (shape {labels.shape}); a "
            "colour-coded (RGB) label image cannot be read as instance ids: store one channel "
            "of integer ids (0 = background)"
        )
    return as_labels(labels, path)


def _decode(path: Path, *, palette_indices: bool = False) -> np.ndarray:
    """Decode ``path`` with the right library; any library failure becomes a CellSegError."""
    ext = path.suffix.lower()
    try:
        if ext in _TIFF:
            return _read_tiff(path)
        if ext == ".png":
            return _read_png(path, palette_indices=palette_indices)
        return _read_pillow(path)
    except CellSegError:
        raise
    except Exception as err:  # every decoder failure is reported against the user's file
        kind = "TIFF" if ext in _TIFF else ext.lstrip(".").upper()
        raise CellSegError(
            f"{where(path)}: cannot be read as a {kind} image; is it truncated or corrupt? "
            f"({type(err).__name__}: {err})"
        ) from err


def _read_tiff(path: Path) -> np.ndarray:
    """First series of a TIFF as ``(H, W)`` or ``(H, W, C)``, using its axes metadata."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        data = series.asarray()
        axes = series.axes
    if data.size == 0:
        return data
    return _to_channel_last(data, axes, path)


def _to_channel_last(data: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """Drop length-1 axes, move a channel axis last, refuse 3-D stacks (see :func:`read_image`)."""
    keep = [
        i for i, (n, ax) in enumerate(zip(data.shape, axes, strict=True)) if n > 1 or ax in "YX"
    ]
    data = data.reshape([data.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if data.ndim == 2:
        return data
    stack_error = CellSegError(
        f"{where(path)}: is a 3-D stack (axes {axes}, shape {data.shape}), not a 2-D image; "
        "pass one plane at a time (e.g. tifffile.imread(path, key=0))"
    )
    if data.ndim > 3 or "Y" not in axes or "X" not in axes:
        raise stack_error
    (extra,) = (i for i, ax in enumerate(axes) if ax not in "YX")
    if axes[extra] in _CHANNEL_AXES:
        return np.ascontiguousarray(np.moveaxis(data, extra, -1))
    if axes[extra] not in _UNKNOWN_AXES:  # Z, T and the rest: a real stack
        raise stack_error
    # No metadata says what the third axis is: decide from the shape alone.
    # (tifffile.imwrite of an (H, W, 5) array without `photometric` stores H pages of
    # (W, 5), read back as axes 'QYX', so the numpy shape is the better witness.)
    first, second, last = data.shape
    if last <= MAX_TRAILING_CHANNELS and last < min(first, second):
        return data
    if first <= MAX_LEADING_CHANNELS:
        return np.ascontiguousarray(np.moveaxis(data, 0, -1))
    raise stack_error


def _read_png(path: Path, *, palette_indices: bool) -> np.ndarray:
    """PNG via libpng (imagecodecs): 8 and 16 bit, gray, gray+alpha, RGB, RGBA, palette."""
    if palette_indices:
        with Image.open(path) as im:
            if im.mode == "P":
                return np.asarray(im)
    return imagecodecs.png_decode(path.read_bytes())


def _read_pillow(path: Path) -> np.ndarray:
    """JPEG and BMP via Pillow, in a mode numpy can hold without losing information."""
    with warnings.catch_warnings():
        # The challenge's largest image (10496 x 8415) is near Pillow's bomb limit;
        # a user's own local file is not a decompression bomb.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im.load()
            if im.mode == "1":
                im = im.convert("L")
            elif im.mode in ("P", "PA"):
                im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
            elif im.mode not in ("L", "LA", "RGB", "RGBA", "I", "F") and not im.mode.startswith(
                "I;16"
            ):
                im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV
            return np.array(im)


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for binary writing; move it onto ``path`` on success.

    An interrupted or failed write leaves the old ``path`` (if any) untouched and
    no temporary file behind. Parent folders are created. Usable for any writer
    that takes a file object, e.g. ``with atomic_write(p) as f: torch.save(obj, f)``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(tmp, "xb")  # exclusive create; mode 0o666 minus the umask
    except OSError as err:
        raise CellSegError(f"{where(path)}: cannot write here ({err})") from err
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise CellSegError(f"{where(path)}: writing failed ({err})") from err
        raise


def _label_dtype(max_id: int) -> type[np.unsignedinteger]:
    """``uint16`` (the challenge's label type) up to 65535 ids, else ``uint32``; never 8 bit."""
    return np.uint16 if max_id <= np.iinfo(np.uint16).max else np.uint32


def write_labels(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write ``(H, W)`` instance labels to a zlib-compressed TIFF, losslessly and atomically.

    Stored as ``uint16`` when the largest id fits (as the challenge's own
    ``<stem>_label.tiff`` files are), else ``uint32``: 70,000 cells survive.
    """
    path = Path(path)
    if path.suffix.lower() not in _TIFF:
        raise CellSegError(
            f"{where(path)}: labels are written as TIFF (.tif or .tiff) only, got "
            f"{path.suffix or 'no extension'!r}; other formats cannot hold more than 65535 ids"
        )
    labels = as_labels(labels, "labels")
    stored = labels.astype(_label_dtype(int(labels.max())))
    with atomic_write(path) as fh:
        tifffile.imwrite(fh, stored, photometric="minisblack", compression="zlib")


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an ``(H, W)`` or ``(H, W, C)`` image atomically; the format follows the extension.

    TIFF: any numeric dtype and channel count, zlib-compressed (RGB(A) tagged as
    such). PNG: ``uint8``/``uint16`` with 1-4 channels (gray, gray+alpha, RGB,
    RGBA), through libpng so 16-bit colour survives. JPEG (quality 95, lossy)
    and BMP: ``uint8`` gray or RGB.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise CellSegError(
            f"{where(path)}: unsupported file type {path.suffix or '(no extension)'!r}; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    image = as_image(image, "image")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if ext == ".png" and (image.dtype not in (np.uint8, np.uint16) or channels > 4):
        raise CellSegError(
            f"{where(path)}: PNG holds uint8 or uint16 images with 1 to 4 channels, got "
            f"{image.dtype} with {channels} channels; write a .tif instead"
        )
    if ext in _PILLOW and (image.dtype != np.uint8 or channels not in (1, 3)):
        raise CellSegError(
            f"{where(path)}: {ext} holds uint8 gray or RGB images, got {image.dtype} with "
            f"{channels} channels; write a .png or .tif instead"
        )
    if image.ndim == 3 and channels == 1:
        image = image[..., 0]
    with atomic_write(path) as fh:
        if ext in _TIFF:
            tifffile.imwrite(fh, image, **_tiff_layout(image))
        elif ext == ".png":
            fh.write(imagecodecs.png_encode(np.ascontiguousarray(image)))
        elif ext == ".bmp":
            Image.fromarray(image).save(fh, format="BMP")
        else:
            Image.fromarray(image).save(fh, format="JPEG", quality=_JPEG_QUALITY)


def _tiff_layout(image: np.ndarray) -> dict:
    """tifffile options that store ``image`` zlib-compressed with an explicit, unambiguous layout."""
    options: dict = {"compression": "zlib", "photometric": "minisblack"}
    if image.ndim == 3:
        options["planarconfig"] = "contig"
        if image.shape[2] in (3, 4) and image.dtype in (np.uint8, np.uint16):
            options["photometric"] = "rgb"
            if image.shape[2] == 4:
                options["extrasamples"] = ["unassalpha"]
    return options


# ----------------------------------------------------------------------------- normalisation

#: ``normalize_image(sparse_cells=True)``: the percentile that stands for the cells when the 99th
#: is background, and how many times farther from the 1st percentile than the 99th it must lie
#: before the rule departs from the baseline's. In the real-mini images whose cells cover over 1%
#: of the pixels the 99.9th percentile lies at most 2.8 times as far as the 99th; in five of the
#: six whose cells cover under 1%, 4.2-50 times (``benchmarks/bench_normalization.py``).
SPARSE_TAIL_PERCENTILE = 99.9
SPARSE_TAIL_RATIO = 3.0


def normalize_image(
    image: np.ndarray,
    *,
    source: str | os.PathLike | None = None,
    sparse_cells: bool = False,
) -> np.ndarray:
    """The challenge baseline's preprocessing: any image to ``(H, W, 3)`` uint8.

    One channel (``(H, W)`` or ``(H, W, 1)``) is repeated three times; more
    than three channels keep the first three; two channels get a zero third.
    Each channel is rescaled from its 1st-99th percentile (taken over its
    non-zero pixels) to 0..255 with clipping, exactly as the NeurIPS-CellSeg
    baseline does with ``skimage.exposure.rescale_intensity`` (values are
    truncated, not rounded). An all-zero channel stays zero. A channel whose
    percentiles are within 1e-3 of each other (constant) is kept as is and
    cast to uint8 -- saturating at 0 and 255 here, where the baseline's
    ``astype`` wraps around (a constant 300 became 44). 8/16-bit images go
    through a per-value lookup table (no float copy of the image), other dtypes
    through row blocks, so a 10496 x 8415 image needs little extra memory.
    ``source`` names the image in error messages.

    ``sparse_cells=True`` mends the rule for images whose cells cover under about 1% of the
    pixels, where the 99th percentile is background: the baseline stretches the background
    noise over 0..255 and the cells vanish in it. There the upper bound is raised to a third of
    the way from the 1st to the :data:`SPARSE_TAIL_PERCENTILE`-th percentile (the upper bound
    becomes ``max(p99, p1 + (p99.9 - p1) / SPARSE_TAIL_RATIO)``); an image whose 99.9th
    percentile is less than :data:`SPARSE_TAIL_RATIO` times as far from the 1st as the 99th is
    normalised exactly as the baseline does. The package's networks are trained and run on
    this rule (``datasets.load_sample``, ``infer.MultiStreamSegmenter.segment``).
    """
    name = source if source is not None else "image"
    image = as_image(image, name)
    channels = 1 if image.ndim == 2 else min(image.shape[2], 3)
    out = np.zeros((*image.shape[:2], 3), dtype=np.uint8)
    for c in range(channels):
        out[..., c] = _normalize_channel(
            image if image.ndim == 2 else image[..., c], name, bool(sparse_cells)
        )
    if channels == 1:
        out[..., 1] = out[..., 0]
        out[..., 2] = out[..., 0]
    return out


def _normalize_channel(channel: np.ndarray, name, sparse_cells: bool = False) -> np.ndarray:
    """One ``(H, W)`` channel to uint8 by the baseline's non-zero 1-99 percentile rule (with
    ``sparse_cells``, its upper bound raised where the 99th percentile is background)."""
    if channel.dtype.kind == "f" and not np.isfinite(channel).all():
        raise CellSegError(f"{where(name)}: the image contains NaN or infinite values")
    values = channel[channel != 0]
    if values.size == 0:
        return np.zeros(channel.shape, dtype=np.uint8)
    if sparse_cells:
        low, high, tail = np.percentile(values, [1, 99, SPARSE_TAIL_PERCENTILE])
        high = max(high, low + (tail - low) / SPARSE_TAIL_RATIO)
    else:
        low, high = np.percentile(values, [1, 99])
    del values
    if not high - low > 1e-3:
        return np.clip(channel, 0, 255).astype(np.uint8)
    scale = {"in_range": (float(low), float(high)), "out_range": "uint8"}
    if channel.dtype.kind in "ui" and channel.dtype.itemsize <= 2:
        # Every value the dtype can hold, indexed by its unsigned bit pattern.
        unsigned = np.dtype(f"u{channel.dtype.itemsize}")
        levels = np.arange(np.iinfo(unsigned).max + 1, dtype=unsigned).view(channel.dtype)
        return rescale_intensity(levels, **scale)[channel.view(unsigned)]
    out = np.empty(channel.shape, dtype=np.uint8)
    rows = max(1, _CHUNK_PIXELS // channel.shape[1])
    for start in range(0, channel.shape[0], rows):
        out[start : start + rows] = rescale_intensity(channel[start : start + rows], **scale)
    return out
