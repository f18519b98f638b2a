"""Data on disk: the NeurIPS-CellSeg folder layout, random training patches, and downloads.

The challenge layout is one folder with two sub-folders::

    root/images/<stem>.<ext>          tif, tiff, png, jpg, jpeg or bmp
    root/labels/<stem>_label.tiff     instance ids, 0 = background

:func:`find_pairs` lists it, :class:`PatchDataset` serves random crops of it to a
PyTorch ``DataLoader``, and :func:`fetch` downloads the public data sets
(NeurIPS-CellSeg from Zenodo, BBBC038 / DSB2018 from the Broad Bioimage Benchmark
Collection) with checksums and brings them into this layout. Nothing here touches
the network unless :func:`download` or :func:`fetch` is called.
"""

from __future__ import annotations

import hashlib
import http.client
import inspect
import math
import os
import posixpath
import re
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from skimage.segmentation import relabel_sequential
from tqdm.auto import tqdm

from cellseg_lite import io as cio
from cellseg_lite._checks import as_labels, check_same_size
from cellseg_lite._errors import CellSegError, where

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "DownloadError",
    "PatchDataset",
    "RemoteDataset",
    "RemoteFile",
    "SIZE_UNIT",
    "Sample",
    "convert_dsb",
    "download",
    "extract",
    "fetch",
    "file_hash",
    "find_pairs",
    "load_sample",
    "masks_to_labels",
    "sample_patch",
    "size_repeats",
]

# --------------------------------------------------------------------------------------
# The folder layout
# --------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = cio.SUPPORTED_EXTENSIONS
"""Image file types of the challenge (compared case-insensitively), as :mod:`cellseg_lite.io` reads them."""

# Label file names tried for an image ``<stem>``, in this order. The challenge writes
# ``<stem>_label.tiff``; the others are what people produce by hand or with other tools
# (same-stem names are how, e.g., StarDist's DSB2018 subset pairs images/ with masks/).
_LABEL_SUFFIXES = ("_label", "")
_LABEL_EXTENSIONS = (".tiff", ".tif", ".png")


class Sample(NamedTuple):
    """One image of a data set folder and its label file (``None`` for an unlabelled image)."""

    stem: str
    image_path: Path
    label_path: Path | None


def _files_by_lower_name(folder: Path) -> dict[str, Path]:
    """Visible regular files of ``folder``, keyed by their lower-cased file name."""
    return {
        p.name.lower(): p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
    }


def find_pairs(
    root: str | os.PathLike,
    *,
    require_labels: bool = True,
    stems: Iterable[str] | None = None,
) -> list[Sample]:
    """List the images of a challenge-layout folder with their label files, sorted by stem.

    ``root/images/<stem>.<ext>`` (ext one of :data:`IMAGE_EXTENSIONS`, any case) is paired
    with ``root/labels/<stem>_label.tiff``; ``<stem>_label.tif``, ``<stem>_label.png`` and
    the same-stem names ``<stem>.tiff``, ``<stem>.tif``, ``<stem>.png`` are accepted too.
    With ``require_labels=False`` an image without a label file gets ``label_path=None``
    (and the ``labels/`` folder may be missing). ``stems`` keeps only the named images, for
    a split read from a manifest. Label files that belong to no image raise a warning,
    not an error: the pairs that do exist are still usable.

    Raises:
        CellSegError: ``root`` or ``root/images`` missing, no images, two images with the
            same stem, an image without labels while they are required, two label files
            for one image, or a requested stem that is not there.
    """
    root = Path(root)
    if not root.exists():
        raise CellSegError(f"{where(root)}: data folder not found")
    if not root.is_dir():
        raise CellSegError(f"{where(root)}: expected a folder with images/ and labels/, got a file")
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise CellSegError(
            f"{where(root)}: no images/ folder; the challenge layout is "
            "root/images/<stem>.<ext> and root/labels/<stem>_label.tiff"
        )

    images: dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.stem in images:
            raise CellSegError(
                f"{where(image_dir)}: two images share the stem '{path.stem}' "
                f"({images[path.stem].name} and {path.name}); keep one of them"
            )
        images[path.stem] = path
    if not images:
        raise CellSegError(
            f"{where(image_dir)}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder"
        )

    if stems is not None:
        wanted = [str(s) for s in stems]
        missing = sorted(set(wanted) - set(images))
        if missing:
            raise CellSegError(
                f"{where(image_dir)}: {len(missing)} requested stem(s) have no image: "
                + ", ".join(missing[:5])
                + (" ..." if len(missing) > 5 else "")
            )
        images = {s: images[s] for s in set(wanted)}

    label_dir = root / "labels"
    if not label_dir.is_dir():
        if require_labels:
            raise CellSegError(
                f"{where(root)}: no labels/ folder (pass require_labels=False for unlabelled images)"
            )
        return [Sample(stem, images[stem], None) for stem in sorted(images)]

    label_files = _files_by_lower_name(label_dir)
    claimed: set[str] = set()
    samples = []
    for stem in sorted(images):
        found = [
            label_files[name]
            for suffix in _LABEL_SUFFIXES
            for ext in _LABEL_EXTENSIONS
            if (name := f"{stem}{suffix}{ext}".lower()) in label_files
        ]
        if len(found) > 1:
            raise CellSegError(
                f"{where(label_dir)}: several label files for image '{stem}' "
                f"({', '.join(p.name for p in found)}); keep one of them"
            )
        if not found and require_labels:
            raise CellSegError(
                f"{where(images[stem])}: no label file; expected {where(label_dir / f'{stem}_label.tiff')}"
                " (pass require_labels=False for unlabelled images)"
            )
        label = found[0] if found else None
        if label is not None:
            claimed.add(label.name.lower())
        samples.append(Sample(stem, images[stem], label))

    if stems is None:
        orphans = sorted(
            p.name
            for name, p in label_files.items()
            if name not in claimed and p.suffix.lower() in _LABEL_EXTENSIONS
        )
        if orphans:
            warnings.warn(
                f"{where(label_dir)}: {len(orphans)} label file(s) match no image and are ignored: "
                + ", ".join(orphans[:5])
                + (" ..." if len(orphans) > 5 else ""),
                stacklevel=2,
            )
    return samples


# --------------------------------------------------------------------------------------
# Patches for training
# --------------------------------------------------------------------------------------


def sample_patch(
    image: np.ndarray, labels: np.ndarray, patch_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a random ``patch_size`` square from ``image`` (H, W) or (H, W, C) and ``labels`` (H, W).

    Each position where the square fits is equally likely. A side shorter than the patch
    is zero-padded at the bottom or right (image 0, labels 0 = background), so pixel
    (0, 0) of a small image stays the patch's corner, as in sliding-window inference.
    Returns ``(image (P, P[, C]), labels (P, P))``, copies in the input dtypes.
    """
    patch_size = _int_at_least(patch_size, "patch_size")
    check_same_size(image, labels, "sample_patch")
    height, width = labels.shape
    top = int(rng.integers(0, max(height - patch_size, 0) + 1))
    left = int(rng.integers(0, max(width - patch_size, 0) + 1))
    image = image[top : top + patch_size, left : left + patch_size]
    labels = labels[top : top + patch_size, left : left + patch_size]
    pad_rows, pad_cols = patch_size - labels.shape[0], patch_size - labels.shape[1]
    if pad_rows or pad_cols:
        image = np.pad(image, ((0, pad_rows), (0, pad_cols)) + ((0, 0),) * (image.ndim - 2))
        labels = np.pad(labels, ((0, pad_rows), (0, pad_cols)))
    return image.copy(), labels.copy()


def _int_at_least(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise CellSegError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def load_sample(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """A labelled sample's normalised image ``(H, W, 3)`` uint8 (:func:`cellseg_lite.io.normalize_image`
    with ``sparse_cells=True``, as the segmenter normalises) and its labels ``(H, W)`` int32; a
    label image of another size raises a CellSegError."""
    image = cio.normalize_image(
        cio.read_image(sample.image_path), source=sample.image_path, sparse_cells=True
    )
    labels = cio.read_labels(sample.label_path)
    if image.shape[:2] != labels.shape:
        raise CellSegError(
            f"{where(sample.label_path)}: label size {labels.shape} differs from the size "
            f"{image.shape[:2]} of its image {where(sample.image_path)}"
        )
    return image, labels


class PatchDataset(torch.utils.data.Dataset):
    """Random square training patches from labelled images, for a PyTorch ``DataLoader``.

    Each image is read with :func:`cellseg_lite.io.read_image` and brought to
    ``(H, W, 3)`` uint8 by :func:`cellseg_lite.io.normalize_image` (the challenge's
    percentile normalisation, ``sparse_cells=True``); labels come from :func:`cellseg_lite.io.read_labels`.
    Item ``i`` is a patch of image ``i % len(samples)`` (with ``repeats``, image ``k`` owns
    ``repeats[k]`` consecutive items of each round): a dict with

    - ``"image"``: float32 tensor ``(3, P, P)`` with values in [0, 1] (the uint8 image
      divided by 255; the authors' code feeds 0..255 to its networks instead),
    - ``"labels"``: int32 tensor ``(P, P)``, instance ids relabelled to 1..n in the patch,
    - ``"stem"``: the image's stem.

    The crop position (and the ``transform``'s randomness, see below) depends only on
    ``seed``, the epoch (:meth:`set_epoch`) and the item index, never on global random
    state, so the same patch comes back in any ``DataLoader`` worker. A cell that the
    crop cuts into two pieces keeps one id.

    Args:
        samples: labelled :class:`Sample` s, e.g. from :func:`find_pairs`.
        patch_size: side ``P`` of the square patches; smaller images are zero-padded.
        patches_per_image: patches drawn from each image per epoch.
        repeats: optional patches per image per round, one positive integer per sample
            (:func:`size_repeats` draws large images more often); ``patches_per_image``
            multiplies them. ``None``: one each.
        seed: base seed of the crop positions.
        transform: optional ``transform(image, labels) -> (image, labels)`` applied to the
            uint8 ``(P, P, 3)`` patch and its int32 ``(P, P)`` labels before conversion; it
            may return uint8 (divided by 255) or a float image already in [0, 1], at the
            same ``(P, P)`` size. If it accepts a keyword ``rng`` it receives the item's
            ``np.random.Generator``, which makes augmentation reproducible too.
        cache: keep decoded images in memory after their first use (one cache per
            ``DataLoader`` worker process).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        patch_size: int = 256,
        *,
        patches_per_image: int = 1,
        seed: int = 0,
        transform: Callable | None = None,
        cache: bool = True,
        repeats: Sequence[int] | None = None,
    ) -> None:
        samples = list(samples)
        if not samples:
            raise CellSegError("samples: the list of samples is empty")
        unlabelled = [s.stem for s in samples if s.label_path is None]
        if unlabelled:
            raise CellSegError(
                f"samples: {len(unlabelled)} image(s) have no label file "
                f"({', '.join(unlabelled[:5])}); training patches need labels"
            )
        self.samples = samples
        self.patch_size = _int_at_least(patch_size, "patch_size")
        self.patches_per_image = _int_at_least(patches_per_image, "patches_per_image")
        self.repeats = repeats
        self.seed = _int_at_least(seed, "seed", minimum=0)
        if transform is not None and not callable(transform):
            raise CellSegError(f"transform: expected a callable, got {type(transform).__name__}")
        self.transform = transform
        self._transform_takes_rng = transform is not None and _accepts_keyword(transform, "rng")
        self.cache = bool(cache)
        self.epoch = 0
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def repeats(self) -> np.ndarray:
        """Patches per image per round, ``(n_samples,)`` int64; settable (``None``: ones)."""
        return self._repeats

    @repeats.setter
    def repeats(self, value: Sequence[int] | None) -> None:
        self._repeats = _check_repeats(value, len(self.samples))
        # the sample of each item of one round: 0, 1, ..., n-1 without repeats
        self._owners = np.repeat(np.arange(len(self.samples)), self._repeats)

    def __len__(self) -> int:
        return len(self._owners) * self.patches_per_image

    def set_epoch(self, epoch: int) -> None:
        """Draw different patches in each epoch; call it before iterating the epoch's ``DataLoader``.

        Workers copy the dataset when an iteration starts, so this reaches them, except
        with ``persistent_workers=True``, where they keep the epoch they started with.
        """
        self.epoch = _int_at_least(epoch, "epoch", minimum=0)

    def load(self, sample_index: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole normalised image ``(H, W, 3)`` uint8 and its labels ``(H, W)`` int32."""
        if sample_index in self._cache:
            return self._cache[sample_index]
        image, labels = load_sample(self.samples[sample_index])
        if self.cache:
            self._cache[sample_index] = (image, labels)
        return image, labels

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} patches")
        index %= len(self)
        sample_index = int(self._owners[index % len(self._owners)])
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, labels = self.load(sample_index)
        image, labels = sample_patch(image, labels, self.patch_size, rng)
        if self.transform is not None:
            image, labels = self._apply_transform(image, labels, rng)
        labels = relabel_sequential(labels)[0].astype(np.int32, copy=False)
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255.0
        else:
            image = image.astype(np.float32, copy=False)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
            "stem": self.samples[sample_index].stem,
        }

    def _apply_transform(self, image, labels, rng):
        if self._transform_takes_rng:
            out = self.transform(image, labels, rng=rng)
        else:
            out = self.transform(image, labels)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise CellSegError("transform: must return a tuple (image, labels)")
        image, labels = np.asarray(out[0]), as_labels(out[1], "transform labels")
        size = (self.patch_size, self.patch_size)
        if image.shape != (*size, 3):
            raise CellSegError(
                f"transform: returned an image of shape {image.shape}, expected {(*size, 3)}"
            )
        check_same_size(image, labels, "transform")
        if not (image.dtype == np.uint8 or np.issubdtype(image.dtype, np.floating)):
            raise CellSegError(
                f"transform: returned a {image.dtype} image, expected uint8 or float in [0, 1]"
            )
        return image, labels


def _check_repeats(repeats, n_samples: int) -> np.ndarray:
    if repeats is None:
        return np.ones(n_samples, np.int64)
    try:
        values = None if isinstance(repeats, str | bytes) else list(repeats)
    except TypeError:
        values = None
    if values is None or len(values) != n_samples:
        raise CellSegError(
            f"repeats: expected one integer per sample ({n_samples}), got {repeats!r}"
        )
    return np.array([_int_at_least(v, "repeats") for v in values], np.int64)


#: Side of the image that :func:`size_repeats` draws one patch from per round: the 256 x 256
#: synthetic images and most real-mini fluorescence and stained images.
SIZE_UNIT = 256


def size_repeats(shapes: Sequence[tuple[int, ...]], unit: int = SIZE_UNIT) -> list[int]:
    """Patches per round for images of the given shapes: in proportion to their side.

    ``round(sqrt(H * W) / unit)``, at least 1: a 1024 x 1024 image gives 4 patches where a
    256 x 256 image gives 1. With one patch per image (the paper's sampler, and the authors'),
    each pixel of a 1024 x 1024 image is drawn 16 times less often than a pixel of a 256 x 256
    one; in proportion to the area, a few large images would make most of the training data.
    The side lies between the two: 4 times less often.

    >>> size_repeats([(256, 256), (256, 320), (512, 512), (1024, 1024)])
    [1, 1, 2, 4]
    """
    unit = _int_at_least(unit, "unit")
    return [max(1, round(math.sqrt(shape[0] * shape[1]) / unit)) for shape in shapes]


def _accepts_keyword(function: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return name in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


# --------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------


class DownloadError(CellSegError):
    """A download failed: offline, unknown host, HTTP error, interrupted transfer or wrong checksum."""


_CHUNK = 1 << 20
_HEX = {"sha256": 64, "md5": 32}


def file_hash(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file (``"sha256"`` or ``"md5"``), read in 1 MiB chunks."""
    if algorithm not in _HEX:
        raise CellSegError(f"algorithm: expected 'sha256' or 'md5', got {algorithm!r}")
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_digests(sha256: str | None, md5: str | None) -> dict[str, str]:
    expected = {}
    for algorithm, value in (("sha256", sha256), ("md5", md5)):
        if value is None:
            continue
        value = str(value).strip().lower()
        if not re.fullmatch(f"[0-9a-f]{{{_HEX[algorithm]}}}", value):
            raise CellSegError(
                f"{algorithm}: expected {_HEX[algorithm]} hexadecimal digits, got {value!r}"
            )
        expected[algorithm] = value
    return expected


def _by_hand(url: str, dest: Path) -> str:
    return (
        f"To get it by hand, download {url} in a browser and save it as '{dest}', then run again."
    )


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``'bytes 100-199/200'`` -> (100, 200); ``'bytes */200'`` -> (None, 200)."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if match is None:
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _open(url: str, offset: int, timeout: float, dest: Path):
    """Open ``url`` (from byte ``offset`` when > 0); turn network failures into DownloadError."""
    from cellseg_lite import __version__

    headers = {"User-Agent": f"cellseg-lite/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:
            return err  # the caller decides whether the partial file is already complete
        raise DownloadError(
            f"{url}: the server answered HTTP {err.code} ({err.reason}). "
            "The address may have moved; check the data set's home page. " + _by_hand(url, dest)
        ) from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"{url}: cannot connect ({reason}). Are you offline, or behind a proxy? "
            + _by_hand(url, dest)
        ) from err


def _stream(url: str, part: Path, *, timeout: float, progress: bool, dest: Path) -> None:
    """Write ``url`` into ``part``, continuing an existing partial file with an HTTP Range request."""
    for _ in range(2):
        offset = part.stat().st_size if part.exists() else 0
        response = _open(url, offset, timeout, dest)
        if isinstance(response, urllib.error.HTTPError):  # 416: nothing to send from `offset`
            if _parse_content_range(response.headers.get("Content-Range"))[1] == offset:
                return  # the partial file is already complete
        else:
            with response:
                if response.status != 206:  # a server that ignores Range sends the whole file
                    _copy(response, part, 0, url=url, progress=progress, desc=dest.name)
                    return
                start = _parse_content_range(response.headers.get("Content-Range"))[0]
                if start == offset:
                    _copy(response, part, offset, url=url, progress=progress, desc=dest.name)
                    return
        part.unlink(missing_ok=True)  # the server cannot continue it: start again from byte 0
    raise DownloadError(f"{url}: the server sends unexpected byte ranges. " + _by_hand(url, dest))


def _copy(response, part: Path, offset: int, *, url: str, progress: bool, desc: str) -> None:
    """Append the body of ``response`` to ``part`` from byte ``offset`` on (0: overwrite)."""
    length = response.headers.get("Content-Length")
    total = offset + int(length) if length and length.isdigit() else None
    with (
        open(part, "ab" if offset else "wb") as f,
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=not progress,
        ) as bar,
    ):
        try:
            # read1: whatever has arrived, so a stalled transfer loses nothing already received
            while chunk := response.read1(_CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            raise DownloadError(
                f"{url}: the transfer broke off after {f.tell()} bytes ({err!r}); the partial "
                f"file '{part}' is kept and the next call resumes it"
            ) from err
    received = part.stat().st_size
    if total is not None and received < total:
        raise DownloadError(
            f"{url}: the transfer stopped at {received} of {total} bytes; the partial file "
            f"'{part}' is kept and the next call resumes it"
        )


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    resume: bool = True,
    timeout: float = 60,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, verify it, then rename it into place.

    An existing ``dest`` is verified and returned without touching the network. With
    ``resume=True`` an existing ``dest.part`` (an interrupted earlier call) is continued
    with an HTTP Range request; a server that ignores Range sends the whole file, which
    then replaces the partial one. When the checksum (``sha256`` and/or ``md5``, hex)
    does not match, the downloaded file is deleted, so the next call starts afresh.

    Raises:
        DownloadError: offline, unknown host, HTTP error, interrupted transfer (the
            ``.part`` file is kept for resuming), or checksum mismatch; the message names
            the URL and how to fetch the file by hand.
        CellSegError: a malformed checksum or URL, or a ``dest`` with the wrong checksum.
    """
    dest = Path(dest)
    expected = _expected_digests(sha256, md5)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise CellSegError(f"url: expected an http(s) address, got {url!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise CellSegError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    if dest.is_dir():
        raise CellSegError(f"{where(dest)}: is a folder; give the file name to save to")
    if dest.exists():
        for algorithm, value in expected.items():
            actual = file_hash(dest, algorithm)
            if actual != value:
                raise CellSegError(
                    f"{where(dest)}: the file exists but its {algorithm} is {actual}, expected "
                    f"{value}; delete it to download it again from {url}"
                )
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if part.exists() and not resume:
        part.unlink()
    _stream(url, part, timeout=timeout, progress=progress, dest=dest)
    for algorithm, value in expected.items():
        actual = file_hash(part, algorithm)
        if actual != value:
            part.unlink()
            raise DownloadError(
                f"{url}: the downloaded file's {algorithm} is {actual}, expected {value}; it was "
                "deleted. Run again to retry; if it happens again the file on the server has "
                "changed or the connection corrupts it. " + _by_hand(url, dest)
            )
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------


def _refuse_member(archive: Path, name: str, why: str) -> CellSegError:
    return CellSegError(
        f"{where(archive)}: refusing to extract member '{name}': {why}. "
        "The archive is damaged or malicious"
    )


def _check_member_name(archive: Path, name: str) -> None:
    """Refuse a member that would be written outside the destination folder (zip-slip)."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"[A-Za-z]:", posix):
        raise _refuse_member(archive, name, "it has an absolute path")
    if ".." in posix.split("/"):
        raise _refuse_member(archive, name, "its path climbs out of the folder with '..'")


def extract(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Unpack a zip or tar (optionally gz/bz2/xz-compressed) archive into the folder ``dest``.

    Every member is checked first; nothing is written when one has an absolute path,
    a ``..`` component, or (tar) is a link pointing outside ``dest`` or a device file.
    Returns ``dest``.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise CellSegError(f"{where(archive)}: archive not found")
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_member_name(archive, info.filename)
            dest.mkdir(parents=True, exist_ok=True)
            zf.extractall(dest)
        return dest
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for member in members:
                _check_member_name(archive, member.name)
                if member.issym() or member.islnk():
                    base = posixpath.dirname(member.name) if member.issym() else ""
                    target = posixpath.normpath(posixpath.join(base, member.linkname))
                    if (
                        member.linkname.startswith("/")
                        or target == ".."
                        or target.startswith("../")
                    ):
                        raise _refuse_member(archive, member.name, "it links outside the folder")
                elif not (member.isfile() or member.isdir()):
                    raise _refuse_member(archive, member.name, "it is a device or special file")
            dest.mkdir(parents=True, exist_ok=True)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12: the library's own guard too
                tf.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - old Python; the checks above already ran
                tf.extractall(dest, members=members)
        return dest
    raise CellSegError(f"{where(archive)}: not a zip or tar archive (or a damaged one)")


# --------------------------------------------------------------------------------------
# DSB2018 / BBBC038: one binary mask per nucleus -> one instance label image
# --------------------------------------------------------------------------------------


def masks_to_labels(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Merge binary masks ``(H, W)`` (one per object) into an instance label image ``(H, W)`` int32.

    Object ``i`` of the list gets id ``i + 1`` before a final sequential relabel. Where
    masks overlap, the smaller object keeps the pixel (a small nucleus lying on a large
    one stays whole); an object covered entirely by smaller ones, or an empty mask,
    disappears. The DSB2018 masks should not overlap, but a few do.
    """
    masks = [np.asarray(m) for m in masks]
    if not masks:
        raise CellSegError("masks: the list of masks is empty; the image size is unknown")
    shape = masks[0].shape[:2]
    binary = []
    for i, mask in enumerate(masks):
        if mask.ndim == 3:
            mask = mask.any(axis=-1)
        if mask.ndim != 2 or mask.shape != shape:
            raise CellSegError(
                f"masks[{i}]: shape {mask.shape} differs from the first mask's {shape}"
            )
        binary.append(mask > 0)
    areas = [int(m.sum()) for m in binary]
    labels = np.zeros(shape, dtype=np.int32)
    for i in sorted(range(len(binary)), key=lambda i: (-areas[i], i)):  # largest first
        labels[binary[i]] = i + 1
    return relabel_sequential(labels)[0].astype(np.int32, copy=False)


def _dsb_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / "images").is_dir())


def convert_dsb(
    source: str | os.PathLike, dest: str | os.PathLike, *, progress: bool = True
) -> Path:
    """Convert DSB2018 ``stage1_train`` folders into the challenge layout under ``dest``.

    ``source/<id>/images/<id>.png`` is copied unchanged to ``dest/images/<id>.png``, and
    the binary masks ``source/<id>/masks/*.png`` are merged by :func:`masks_to_labels`
    into ``dest/labels/<id>_label.tiff``. A folder without masks gives an all-zero label
    image. Returns ``dest``.
    """
    source, dest = Path(source), Path(dest)
    if not source.is_dir():
        raise CellSegError(f"{where(source)}: DSB folder not found")
    folders = _dsb_folders(source)
    subfolders = [p for p in source.iterdir() if p.is_dir()]
    if not folders and len(subfolders) == 1:  # an archive with one top folder around the ids
        folders = _dsb_folders(subfolders[0])
    if not folders:
        raise CellSegError(
            f"{where(source)}: no DSB sample folders (<id>/images/<id>.png and <id>/masks/*.png)"
        )
    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "labels").mkdir(parents=True, exist_ok=True)
    for folder in tqdm(folders, desc="DSB2018 masks -> labels", disable=not progress):
        image_path = folder / "images" / f"{folder.name}.png"
        if not image_path.is_file():
            raise CellSegError(
                f"{where(image_path)}: image of DSB sample '{folder.name}' not found"
            )
        image = cio.read_image(image_path)
        mask_paths = sorted((folder / "masks").glob("*.png")) if (folder / "masks").is_dir() else []
        masks = []
        for path in mask_paths:
            mask = cio.read_image(path)
            if mask.shape[:2] != image.shape[:2]:
                raise CellSegError(
                    f"{where(path)}: mask size {mask.shape[:2]} differs from the image size {image.shape[:2]}"
                )
            masks.append(mask)
        labels = masks_to_labels(masks) if masks else np.zeros(image.shape[:2], np.int32)
        shutil.copyfile(image_path, dest / "images" / image_path.name)
        cio.write_labels(dest / "labels" / f"{folder.name}_label.tiff", labels)
    return dest


# --------------------------------------------------------------------------------------
# The registry of public data sets
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable archive of a data set.

    ``checksum`` is ``"sha256:<hex>"`` or ``"md5:<hex>"``, or ``None`` where no checksum
    is published (then :func:`fetch` trusts the first download and records its SHA-256).
    ``folder`` is where the challenge layout lies after :func:`fetch`, relative to its root.
    """

    url: str
    filename: str
    folder: str
    checksum: str | None = None
    checksum_source: str = ""
    size_hint: str = ""


@dataclass(frozen=True)
class RemoteDataset:
    """A public data set: where it lives, its licence, and its archives by part name."""

    name: str
    description: str
    homepage: str
    licence: str
    citation: str
    files: Mapping[str, RemoteFile]
    default_parts: tuple[str, ...]
    layout: str = "challenge"  # "challenge": the archive holds images/ + labels/; "dsb": convert
    notes: tuple[str, ...] = field(default_factory=tuple)


_ZENODO = "https://zenodo.org/records/10719375/files"
_TORCH_EM = (
    "SHA-256 as listed by torch-em (github.com/constantinpape/torch-em, "
    "torch_em/data/datasets/light_microscopy/neurips_cell_seg.py), which verifies its own "
    "downloads of these files against it; the Zenodo record lists an md5 for each file"
)

DATASETS: dict[str, RemoteDataset] = {
    "neurips-cellseg": RemoteDataset(
        name="neurips-cellseg",
        description=(
            "NeurIPS 2022 Cell Segmentation Challenge: multi-modality microscopy images "
            "with instance labels (1000 training, 101 tuning images)"
        ),
        homepage="https://zenodo.org/records/10719375",
        licence="CC BY-NC-ND 4.0",
        citation=(
            "Ma, Xie, Ayyadhury et al., The multimodality cell segmentation challenge: "
            "toward universal solutions, Nature Methods 21, 2024 (doi:10.1038/s41592-024-02233-6); "
            "data: doi:10.5281/zenodo.10719375"
        ),
        files={
            "train": RemoteFile(
                url=f"{_ZENODO}/Training-labeled.zip?download=1",
                filename="Training-labeled.zip",
                folder="Training-labeled",
                checksum="sha256:b2383929eb8e99b2716fa0d4e2f6e03983e626a57cf00fe85175869c54aa3592",
                checksum_source=_TORCH_EM,
                size_hint="about 2 GB",
            ),
            "tuning": RemoteFile(
                url=f"{_ZENODO}/Tuning.zip?download=1",
                filename="Tuning.zip",
                folder="Tuning",
                checksum="sha256:849423d36bb8fcc2d91a5b189a3b6d93c3d4071c9701eaaa44ba393a510459c4",
                checksum_source=_TORCH_EM,
                size_hint="about 0.6 GB",
            ),
            "test": RemoteFile(
                url=f"{_ZENODO}/Testing.zip?download=1",
                filename="Testing.zip",
                folder="Testing/Public",
                checksum="sha256:3379730221f43830d30fddf131750e967c9c9bdf04f98811e852a050eb659ccc",
                checksum_source=_TORCH_EM,
                size_hint="about 3 GB",
            ),
        },
        default_parts=("train", "tuning"),
        notes=(
            "Testing.zip also holds a 'Hidden' folder without labels; only 'Testing/Public' "
            "is in the challenge layout.",
        ),
    ),
    "bbbc038": RemoteDataset(
        name="bbbc038",
        description=(
            "BBBC038v1 / 2018 Data Science Bowl stage 1 training set: 670 images of nuclei "
            "(fluorescence, brightfield, histology), one binary mask per nucleus"
        ),
        homepage="https://bbbc.broadinstitute.org/BBBC038",
        licence="CC0 1.0",
        citation=(
            "Caicedo et al., Nucleus segmentation across imaging experiments: the 2018 Data "
            "Science Bowl, Nature Methods 16, 2019 (doi:10.1038/s41592-019-0612-7); "
            "Ljosa et al., Nature Methods 9, 2012 (BBBC)"
        ),
        files={
            "train": RemoteFile(
                url="https://data.broadinstitute.org/bbbc/BBBC038/stage1_train.zip",
                filename="stage1_train.zip",
                folder="bbbc038-stage1_train",
                checksum=None,
                checksum_source="none published by the BBBC; trust on first use",
                size_hint="about 80 MB",
            ),
        },
        default_parts=("train",),
        layout="dsb",
    ),
}
"""Public data sets that :func:`fetch` knows, by name."""


def _checksum_keywords(checksum: str, where_from: str) -> dict[str, str]:
    algorithm, _, value = checksum.partition(":")
    if algorithm not in _HEX or not value:
        raise CellSegError(
            f"{where_from}: checksum {checksum!r} is not 'sha256:<hex>' or 'md5:<hex>'"
        )
    return {algorithm: value}


def _move_into_place(source: Path, target: Path) -> None:
    if target.exists():
        raise CellSegError(f"{where(target)}: already exists; move it away and run again")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)


def fetch(
    name: str,
    root: str | os.PathLike,
    *,
    parts: Iterable[str] | None = None,
    keep_archives: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Download, verify and unpack a data set of :data:`DATASETS` into ``root``.

    Returns one challenge-layout folder per part (usable with :func:`find_pairs`), e.g.
    ``root/Training-labeled``. A part whose folder already exists is not downloaded again.
    ``parts`` defaults to the data set's ``default_parts``. BBBC038 is converted from its
    one-mask-per-nucleus folders by :func:`convert_dsb`. Where no checksum is published,
    the SHA-256 of the first download is recorded in ``root/<archive>.sha256`` (with a
    warning) and later downloads must match it: trust on first use.
    """
    if name not in DATASETS:
        raise CellSegError(f"name: unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    spec = DATASETS[name]
    parts = list(
        spec.default_parts if parts is None else ([parts] if isinstance(parts, str) else parts)
    )
    unknown = [p for p in parts if p not in spec.files]
    if unknown or not parts:
        raise CellSegError(f"parts: {name} has the parts {', '.join(spec.files)}; got {parts!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    folders = []
    for part in parts:
        remote = spec.files[part]
        target = root / remote.folder
        if target.is_dir():
            folders.append(target)
            continue
        archive = root / remote.filename
        sidecar = root / f"{remote.filename}.sha256"
        if remote.checksum is not None:
            keywords = _checksum_keywords(remote.checksum, f"DATASETS[{name!r}].files[{part!r}]")
        elif sidecar.is_file():
            keywords = {"sha256": sidecar.read_text().split()[0]}
        else:
            keywords = {}
        download(remote.url, archive, progress=progress, **keywords)
        if not keywords:
            digest = file_hash(archive)
            sidecar.write_text(f"{digest}  {remote.filename}\n")
            warnings.warn(
                f"{remote.url}: no checksum is published for this file, so its integrity could "
                f"not be checked. Its SHA-256 {digest} was recorded in '{sidecar}', and later "
                "downloads are checked against it (trust on first use).",
                stacklevel=2,
            )
        scratch = root / f".{remote.filename}.extracting"
        if scratch.exists():  # left over by an interrupted run
            shutil.rmtree(scratch)
        try:
            extract(archive, scratch)
            if spec.layout == "dsb":
                converted = root / f".{remote.folder}.converting"
                if converted.exists():
                    shutil.rmtree(converted)
                convert_dsb(scratch, converted, progress=progress)
                _move_into_place(converted, target)
            else:
                if not (scratch / remote.folder).is_dir():
                    raise CellSegError(
                        f"{where(archive)}: the archive has no folder '{remote.folder}'; "
                        "delete the archive and run again"
                    )
                top = Path(remote.folder).parts[0]
                _move_into_place(scratch / top, root / top)
        finally:
            if scratch.exists():
                shutil.rmtree(scratch)
        if not keep_archives:
            archive.unlink()
        folders.append(target)
    return folders
