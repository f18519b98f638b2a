"""Procedural microscopy images with exact instance labels, one look per low-level class.

The project's embedded data: every test, docstring and notebook can draw as
many labelled images as it needs, on any machine, without a download. Each
generator first draws the cells on the label grid and then builds the image
from the final labels, so the labels are exact by construction.

=====  ===============================================  =======================
class  look                                             image
=====  ===============================================  =======================
0      fluorescence nuclei (one channel)                ``(H, W)`` uint8 or uint16
1      phase contrast or DIC, irregular whole cells     ``(H, W, 3)`` uint8, gray
2      colour brightfield, large stained cells          ``(H, W, 3)`` uint8
3      H&E-like tissue, many small nuclei               ``(H, W, 3)`` uint8
=====  ===============================================  =======================

Cells have a fixed size in pixels whatever the image size (a larger image is
a larger field of view, as with a real camera): the categorisation rule
thresholds an absolute area, and class 2 images therefore need at least 128
pixels on each side to hold a cell above the paper's 8000 pixels.

Under the paper's thresholds every image is categorised as its own class.
Under the authors' code thresholds (``categorize.PRESETS["code"]``: a cell must
exceed 30000 px to be "large") class 2 images become class 3: no cell has an
equivalent radius above 75 px (17,700 px), and the largest covers 10,700-16,100 px
whatever the image size (measured: class 3 for 50 of 50 seeds at 256 x 256 and
10 of 10 at 512 x 512). The two thresholds disagree on what a "large" cell is,
and the synthetic data shows it.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from io import StringIO
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage import color, draw, measure, segmentation

from cellseg_lite._errors import CellSegError
from cellseg_lite.io import atomic_write, write_image, write_labels

__all__ = ["MIN_SIZE", "SyntheticEntry", "make_dataset", "make_image", "voronoi_labels"]

#: Smallest image side accepted by :func:`make_image`, and the smallest side of
#: a class 2 image (a cell larger than 8000 px must fit inside it).
MIN_SIZE = 64
_MIN_SIZE_LARGE_CELLS = 128

# Instance fragments smaller than this many pixels (slivers left by occlusion
# or by the image border) become background.
_MIN_FRAGMENT = 12


# --------------------------------------------------------------------------
# shared building blocks
# --------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma) -> np.ndarray:
    """Gaussian-filtered white noise, zero mean and unit standard deviation, ``(H, W)`` float32.

    The white noise is drawn directly as its Fourier coefficients (complex
    Gaussian) and filtered there with ``scipy.ndimage.fourier_gaussian``, so the
    cost does not grow with ``sigma``; the field wraps around the borders.
    """
    half = (shape[0], shape[1] // 2 + 1)
    spectrum = np.empty(half, np.complex64)
    spectrum.real = rng.standard_normal(half, dtype=np.float32)
    spectrum.imag = rng.standard_normal(half, dtype=np.float32)
    spectrum = ndimage.fourier_gaussian(spectrum, sigma, n=shape[1])
    field = np.fft.irfft2(spectrum, s=shape).astype(np.float32, copy=False)
    field -= field.mean()
    return field / (field.std() + 1e-12)


def _outline(
    rng: np.random.Generator,
    theta: np.ndarray,
    r: np.ndarray,
    centres: np.ndarray,
    radii: np.ndarray,
    elongation: np.ndarray,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stretch ``(N, V)`` polar outlines along a random axis, scale each to area ``pi * radius**2``, centre them."""
    stretch = np.sqrt(np.asarray(elongation, dtype=float))[:, None]
    x = r * np.cos(theta) * stretch
    y = r * np.sin(theta) / stretch
    tilt = rng.uniform(0.0, np.pi, size=(len(r), 1))
    x, y = x * np.cos(tilt) - y * np.sin(tilt), x * np.sin(tilt) + y * np.cos(tilt)
    area = 0.5 * np.abs(np.sum(x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y, axis=1))
    scale = (np.asarray(radii, dtype=float) * np.sqrt(np.pi / area))[:, None]
    rows = centres[:, :1] + y * scale
    cols = centres[:, 1:] + x * scale
    return list(zip(rows, cols, strict=True))


def _star_polygons(
    rng: np.random.Generator,
    centres: np.ndarray,
    radii: np.ndarray,
    *,
    elongation: np.ndarray | float = 1.0,
    roughness: float = 0.1,
    harmonics: int = 4,
    protrusions: np.ndarray | int = 0,
    n_vertices: int = 64,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Vertices (rows, cols) of random star-shaped cells, each of area ``pi * radius**2``.

    The outline is ``r(theta) = 1 + sum_k a_k cos(k theta + phi_k)`` plus Gaussian
    bumps (``protrusions`` per cell: pseudopods), stretched by ``elongation``
    along a random axis. All ``N`` cells are drawn at once (arrays ``(N, V)``).
    """
    n = len(radii)
    theta = np.linspace(0.0, 2.0 * np.pi, n_vertices, endpoint=False)
    k = np.arange(2, harmonics + 2)
    amplitude = rng.normal(0.0, roughness, size=(n, k.size)) / k**0.7
    phase = rng.uniform(0.0, 2.0 * np.pi, size=(n, k.size, 1))
    r = 1.0 + np.sum(amplitude[..., None] * np.cos(k[:, None] * theta + phase), axis=1)
    counts = np.broadcast_to(np.asarray(protrusions), (n,))
    most = int(counts.max()) if n else 0
    if most:
        angle = rng.uniform(0.0, 2.0 * np.pi, size=(n, most, 1))
        height = (
            rng.uniform(0.5, 1.4, size=(n, most, 1))
            * (np.arange(most) < counts[:, None])[..., None]
        )
        width = rng.uniform(0.10, 0.28, size=(n, most, 1))
        gap = np.angle(np.exp(1j * (theta - angle)))
        r = r + np.sum(height * np.exp(-0.5 * (gap / width) ** 2), axis=1)
    r = np.clip(r, 0.35, None)
    elongation = np.broadcast_to(np.asarray(elongation, dtype=float), (n,))
    return _outline(
        rng, theta, r, np.asarray(centres, dtype=float).reshape(n, 2), radii, elongation
    )


def _corner_polygon(
    rng: np.random.Generator,
    centre: tuple[float, float],
    radius: float,
    *,
    corners: int,
    elongation: float = 1.0,
    roughness: float = 0.06,
) -> tuple[np.ndarray, np.ndarray]:
    """A flat polygonal cell (squamous epithelium): ``corners`` jittered corners, slightly wavy straight edges."""
    step = 2.0 * np.pi / corners
    theta = np.arange(corners) * step + rng.uniform(-0.3, 0.3, size=corners) * step
    r = 1.0 + rng.normal(0.0, roughness, size=corners)
    t = np.linspace(0.0, corners, 8 * corners, endpoint=False)
    x = np.interp(t, np.arange(corners + 1), np.r_[r * np.cos(theta), r[0] * np.cos(theta[0])])
    y = np.interp(t, np.arange(corners + 1), np.r_[r * np.sin(theta), r[0] * np.sin(theta[0])])
    wobble = 1.0 + ndimage.gaussian_filter1d(rng.normal(0.0, 0.03, t.size), 1.5, mode="wrap")
    polar_theta, polar_r = np.arctan2(y, x), np.hypot(x, y) * wobble
    return _outline(
        rng, polar_theta[None], polar_r[None], np.array([centre], float), [radius], [elongation]
    )[0]


def _place(
    rng: np.random.Generator,
    shape: tuple[int, int],
    radii: np.ndarray,
    *,
    spacing: float,
    density: np.ndarray | None = None,
    avoid: tuple[float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Centres for cells of the given radii, greedily accepted in order (random sequential adsorption).

    Two cells keep their centres at least ``spacing * (r_i + r_j)`` apart
    (``spacing < 1`` lets them touch and overlap a little). ``density`` (an
    ``(H, W)`` map in [0, 1]) thins candidates where it is low; ``avoid``
    ``(row, col, radius)`` is a cell already placed. Returns the accepted
    centres ``(N, 2)`` and their radii ``(N,)``; some cells may not fit.
    """
    n = len(radii)
    factor = 4 if density is not None else 2
    centres = rng.uniform((0.0, 0.0), shape, size=(factor * n, 2))
    cand_radii = rng.choice(radii, size=factor * n) if n else np.empty(0)
    if density is not None and n:
        at = density[centres[:, 0].astype(int), centres[:, 1].astype(int)]
        keep = rng.random(len(centres)) < at
        centres, cand_radii = centres[keep], cand_radii[keep]
    if avoid is not None and len(centres):
        gap = np.hypot(centres[:, 0] - avoid[0], centres[:, 1] - avoid[1])
        keep = gap >= spacing * (cand_radii + avoid[2])
        centres, cand_radii = centres[keep], cand_radii[keep]
    if len(centres) == 0:
        return np.empty((0, 2)), np.empty(0)
    pairs = cKDTree(centres).query_pairs(2.0 * spacing * cand_radii.max(), output_type="ndarray")
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        close = np.hypot(*(centres[i] - centres[j]).T) < spacing * (cand_radii[i] + cand_radii[j])
        pairs = np.sort(pairs[close], axis=1)
    neighbours: list[list[int]] = [[] for _ in range(len(centres))]
    for a, b in pairs:  # b > a: b conflicts with the earlier candidate a
        neighbours[b].append(a)
    accepted = np.zeros(len(centres), dtype=bool)
    count = 0
    for index in range(len(centres)):
        if count == n:
            break
        if not any(accepted[other] for other in neighbours[index]):
            accepted[index] = True
            count += 1
    return centres[accepted], cand_radii[accepted]


def _paint(shape: tuple[int, int], polygons: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Rasterise polygons (rows, cols) into an ``(H, W)`` int32 label image with ids 1, 2, ... in order.

    Later cells occlude earlier ones. Pillow's scan-line fill (``ImageDraw.polygon``
    on a 32-bit integer image) is about 50 times faster than testing every
    pixel of a large cell's bounding box.
    """
    canvas = Image.new("I", (shape[1], shape[0]), 0)
    pen = ImageDraw.Draw(canvas)
    for index, (rows, cols) in enumerate(polygons, start=1):
        pen.polygon(list(zip(cols.tolist(), rows.tolist(), strict=True)), fill=index)
    return np.asarray(canvas, dtype=np.int32).copy()


def _clean(labels: np.ndarray, min_size: int = _MIN_FRAGMENT) -> np.ndarray:
    """Keep the largest 4-connected piece of every instance, drop pieces under ``min_size``, relabel 1..N.

    Occlusion or a thin protrusion can cut a cell in two; each id must stay one
    connected component for the labels to be valid instance labels.
    """
    pieces, n_pieces = measure.label(labels, background=0, connectivity=1, return_num=True)
    if n_pieces == 0:
        return np.zeros(labels.shape, np.int32)
    sizes = np.bincount(pieces.ravel(), minlength=n_pieces + 1)
    owner = np.zeros(n_pieces + 1, dtype=np.int64)
    owner[pieces.ravel()] = labels.ravel()
    order = np.lexsort((sizes[1:], owner[1:])) + 1  # by owner, then by size
    largest = np.r_[owner[order][1:] != owner[order][:-1], True]
    keep = np.zeros(n_pieces + 1, dtype=bool)
    keep[order[largest]] = True
    keep &= sizes >= min_size
    keep[0] = False
    cleaned = np.where(keep[pieces], labels, 0)
    cleaned, _, _ = segmentation.relabel_sequential(cleaned)
    return cleaned.astype(np.int32, copy=False)


def _depth(labels: np.ndarray) -> np.ndarray:
    """Distance in pixels from each cell pixel to the edge of its own cell (0 on background)."""
    edge = segmentation.find_boundaries(labels, mode="inner")
    depth = ndimage.distance_transform_edt(~edge)
    depth[labels == 0] = 0.0
    return depth


def _all_but(shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    """A boolean ``(H, W)`` image, False at the integer (row, col) points: the input of a distance map to them."""
    mask = np.ones(shape, bool)
    mask[points[:, 0], points[:, 1]] = False
    return mask


def _count(rng: np.random.Generator, shape, coverage: tuple[float, float], radius: float) -> int:
    """How many cells of mean radius ``radius`` cover the drawn fraction of the image."""
    area = shape[0] * shape[1] * rng.uniform(*coverage)
    return max(1, round(area / (np.pi * radius**2)))


def _transmission(density: np.ndarray) -> np.ndarray:
    """Beer-Lambert law: the fraction of light that passes a stain of optical density ``density`` (base 10)."""
    return np.exp(-np.log(10.0) * density)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# class 0: fluorescence nuclei, one channel
# --------------------------------------------------------------------------


def _fluorescence(rng: np.random.Generator, shape: tuple[int, int]):
    """Bright textured nuclei on a dark, unevenly lit background; uint8 or uint16 (H, W)."""
    mean_radius = rng.uniform(7.0, 11.0)
    n = _count(rng, shape, (0.08, 0.30), mean_radius)
    radii = np.clip(rng.normal(mean_radius, 0.18 * mean_radius, size=n), 6.0, 14.0)
    clusters = 0.35 + 0.65 * (_smooth_noise(rng, shape, 0.12 * min(shape)) > -0.3)
    centres, radii = _place(rng, shape, radii, spacing=0.78, density=clusters)
    polygons = _star_polygons(
        rng,
        centres,
        radii,
        elongation=rng.uniform(1.0, 1.7, size=len(radii)),
        roughness=0.07,
        harmonics=3,
        n_vertices=40,
    )
    labels = _paint(shape, polygons)
    labels = _clean(labels)

    n_cells = int(labels.max())
    brightness = np.r_[0.0, rng.lognormal(0.0, 0.3, size=n_cells)]
    brightness /= max(brightness.max(), 1e-6)
    depth = _depth(labels)
    profile = 0.55 + 0.45 * np.tanh(depth / 2.5)  # dimmer rim, flat interior
    chromatin = 1.0 + 0.16 * _smooth_noise(rng, shape, 1.2) + 0.10 * _smooth_noise(rng, shape, 3.0)
    signal = brightness[labels] * profile * chromatin
    signal = ndimage.gaussian_filter(signal, rng.uniform(0.9, 1.6))  # the microscope's PSF
    illumination = 1.0 + 0.15 * _smooth_noise(rng, shape, 0.35 * min(shape))
    haze = rng.uniform(0.02, 0.06) * (1.0 + 0.5 * _smooth_noise(rng, shape, 0.1 * min(shape)))
    clean = np.clip((signal + np.clip(haze, 0.0, None)) * illumination, 0.0, None)
    photons = rng.uniform(40.0, 400.0)  # photons at full brightness: Poisson (shot) noise
    noisy = rng.poisson(clean * photons) / photons + rng.normal(0.0, 0.006, size=shape)

    if rng.random() < 0.5:
        peak = rng.uniform(60.0, 250.0)  # 8-bit: often dim, as in the DSB 2018 images
        return np.clip(np.rint(noisy * peak), 0, 255).astype(np.uint8), labels
    offset, peak = rng.uniform(90.0, 120.0), rng.uniform(1500.0, 30000.0)  # 16-bit camera
    return np.clip(np.rint(offset + noisy * peak), 0, 65535).astype(np.uint16), labels


# --------------------------------------------------------------------------
# class 1: phase contrast / DIC, irregular whole cells, gray stored as RGB
# --------------------------------------------------------------------------


def _gray_cells(rng: np.random.Generator, shape: tuple[int, int]):
    """Irregular spreading cells with phase-contrast halos or DIC relief on a mid-gray background."""
    mean_radius = rng.uniform(20.0, 30.0)
    n = _count(rng, shape, (0.15, 0.35), mean_radius)
    radii = np.clip(rng.normal(mean_radius, 0.25 * mean_radius, size=n), 15.0, 40.0)
    centres, radii = _place(rng, shape, radii, spacing=0.85)
    rounded = rng.random(len(radii)) < 0.1  # cells rounded up to divide: small, convex
    radii = np.where(rounded, rng.uniform(7.0, 10.0, size=len(radii)), radii)
    polygons = _star_polygons(
        rng,
        centres,
        radii,
        elongation=np.where(rounded, 1.0, rng.uniform(1.2, 3.0, size=len(radii))),
        roughness=0.15,
        harmonics=5,
        protrusions=np.where(rounded, 0, rng.integers(2, 6, size=len(radii))),
        n_vertices=96,
    )
    for index in np.flatnonzero(rounded):  # a smooth disc, without the random harmonics
        polygons[index] = _star_polygons(
            rng, centres[index : index + 1], radii[index : index + 1], roughness=0.02
        )[0]
    labels = _paint(shape, polygons)
    round_pixels = np.isin(labels, np.flatnonzero(rounded) + 1)
    labels = _clean(labels, min_size=30)

    # Optical thickness: a thin lamella, a thicker body around the point
    # deepest inside each cell, and dark granules gathered around the nucleus.
    n_cells = int(labels.max())
    depth = _depth(labels)
    ids = np.arange(1, n_cells + 1)
    body = np.zeros(shape)
    if n_cells:
        deepest = np.array(ndimage.maximum_position(depth, labels, ids))
        reach = np.r_[1.0, np.maximum(depth[deepest[:, 0], deepest[:, 1]], 1.0)]  # cell depth
        near = ndimage.distance_transform_edt(_all_but(shape, deepest))
        body = np.exp(-0.5 * (near / (0.6 * reach[labels])) ** 2) * (labels > 0)
    is_round = np.bincount(labels[round_pixels], minlength=n_cells + 1) > 0.5 * np.bincount(
        labels.ravel(), minlength=n_cells + 1
    )
    is_round[0] = False
    round_mask = is_round[labels]
    granules = rng.random(shape) < 0.06 * body**2
    granules = ndimage.gaussian_filter(granules.astype(float), 0.8) * 1.6
    texture = _smooth_noise(rng, shape, 1.5)
    lamella = 0.35 * (1.0 - np.exp(-depth / 1.5)) * (1.0 + 0.2 * texture)
    phase = (lamella + 0.25 * body + granules * (labels > 0)) * ~round_mask

    background = rng.uniform(0.35, 0.47)
    if rng.random() < 0.6:
        # Phase contrast acts as a high-pass filter of the optical thickness:
        # dark where the cell is thicker than its surroundings, a bright halo
        # just outside its edge (Zernike; the halo artefact of real images).
        halo = phase - ndimage.gaussian_filter(phase, rng.uniform(1.5, 2.5))
        gray = background - rng.uniform(0.6, 0.9) * halo - 0.08 * phase
        # A rounded cell is so thick that the contrast turns over: a bright
        # ball with a bright halo and a dark core.
        gray += 0.5 * ndimage.gaussian_filter(round_mask.astype(float), 2.0)
        if n_cells:
            gray -= 0.5 * round_mask * np.exp(-0.5 * (near / (0.35 * reach[labels])) ** 2)
    else:
        # DIC: the derivative of the optical path along the shear direction.
        height = ndimage.gaussian_filter(
            phase + 1.2 * round_mask * (1.0 - np.exp(-depth / 3.0)), 1.0
        )
        angle = rng.uniform(0.0, 2.0 * np.pi)
        d_row, d_col = np.gradient(height)
        gray = background + rng.uniform(0.8, 1.2) * (np.cos(angle) * d_col + np.sin(angle) * d_row)
    gray = gray * (1.0 + 0.06 * _smooth_noise(rng, shape, 0.4 * min(shape)))
    gray = ndimage.gaussian_filter(gray, 0.6) + rng.normal(0.0, 0.012, size=shape)
    tint = 1.0 + rng.uniform(-0.02, 0.02, size=3)  # a camera white balance off by a hair
    rgb = gray[..., None] * tint + rng.normal(0.0, 0.003, size=(*shape, 3))
    return _to_uint8(rgb), labels


# --------------------------------------------------------------------------
# class 2: colour brightfield, large stained cells
# --------------------------------------------------------------------------

# Optical densities (per unit concentration, base 10) of R, G, B: the first row
# is hematoxylin (Ruifrok & Johnston 2001, as in skimage.color.rgb_from_hed),
# the others are cytoplasm stains of a Papanicolaou smear.
_HEMATOXYLIN = color.rgb_from_hed[0]
_CYTOPLASM_STAINS = np.array(
    [
        [0.62, 0.25, 0.22],  # cyanophilic (light green): blue-green cytoplasm
        [0.10, 0.62, 0.38],  # eosinophilic: pink cytoplasm
        [0.08, 0.40, 0.70],  # orange G: orange-yellow cytoplasm
    ]
)


def _big_cell(rng: np.random.Generator, shape: tuple[int, int]):
    """One cell fully inside the image with area well above 8000 px (the class 2 guarantee)."""
    side = min(shape)
    radius = min(rng.uniform(58.0, 70.0), (side - 8) / 2.0)
    for _ in range(8):
        rows, cols = _corner_polygon(
            rng,
            (0.0, 0.0),
            radius,
            corners=int(rng.integers(7, 12)),
            elongation=rng.uniform(1.0, 1.3),
        )
        extent = np.array([np.ptp(rows), np.ptp(cols)])
        if np.all(extent <= np.asarray(shape) - 6):
            break
    else:  # a disc of radius (side - 8) / 2 always fits: area >= pi * 60**2 > 8000
        rows, cols = _star_polygons(rng, np.zeros((1, 2)), [radius], roughness=0.0)[0]
    low_r, high_r = 3 - rows.min(), shape[0] - 3 - rows.max()
    low_c, high_c = 3 - cols.min(), shape[1] - 3 - cols.max()
    row, col = rng.uniform(low_r, high_r), rng.uniform(low_c, high_c)
    return (rows + row, cols + col), (row, col, radius)


def _brightfield(rng: np.random.Generator, shape: tuple[int, int]):
    """Large flat stained cells (a smear) with dark nuclei, on a bright background (Beer-Lambert)."""
    if min(shape) < _MIN_SIZE_LARGE_CELLS:
        raise CellSegError(
            f"size: class 2 (large cells) needs at least {_MIN_SIZE_LARGE_CELLS} pixels on each "
            f"side so that a cell above 8000 px fits, got {shape}"
        )
    big, (row, col, big_radius) = _big_cell(rng, shape)
    mean_radius = rng.uniform(40.0, 55.0)
    n = max(0, _count(rng, shape, (0.35, 0.7), mean_radius) - 1)
    radii = np.clip(rng.normal(mean_radius, 0.2 * mean_radius, size=n), 30.0, 75.0)
    centres, radii = _place(rng, shape, radii, spacing=0.72, avoid=(row, col, big_radius))
    polygons = [
        _corner_polygon(
            rng, c, r, corners=int(rng.integers(6, 11)), elongation=rng.uniform(1.0, 1.6)
        )
        for c, r in zip(centres, radii, strict=True)
    ]
    labels = _paint(shape, [*polygons, big])  # the guaranteed large cell last: nothing occludes it
    labels = _clean(labels, min_size=30)

    n_cells = int(labels.max())
    depth = _depth(labels)
    stain = np.zeros((n_cells + 1, 3), np.float32)
    choice = rng.choice(len(_CYTOPLASM_STAINS), size=n_cells, p=(0.5, 0.3, 0.2))
    stain[1:] = _CYTOPLASM_STAINS[choice] * rng.uniform(0.18, 0.35, size=(n_cells, 1))
    folds = 1.0 + 0.8 * np.exp(-depth / 2.0)  # thicker, folded cell edges
    texture = 1.0 + 0.10 * _smooth_noise(rng, shape, 1.0) + 0.15 * _smooth_noise(rng, shape, 5.0)
    density = stain[labels] * (folds * texture)[..., None]

    # One nucleus per cell, at the point deepest inside the visible cell.
    ids = np.arange(1, n_cells + 1)
    nucleus = np.zeros(shape, bool)
    if n_cells:
        deepest = ndimage.maximum_position(depth, labels, ids)
        for index, (r, c) in zip(ids, deepest, strict=True):
            nr = rng.uniform(4.0, 7.5)
            rr, cc = draw.ellipse(
                r, c, nr, nr * rng.uniform(0.7, 1.0), shape=shape, rotation=rng.uniform(0, np.pi)
            )
            inside = labels[rr, cc] == index
            nucleus[rr[inside], cc[inside]] = True
    chromatin = 1.0 + 0.25 * _smooth_noise(rng, shape, 1.0)
    density += (nucleus * chromatin * rng.uniform(0.6, 0.9))[..., None] * _HEMATOXYLIN

    paper = np.array([0.95, 0.94, 0.92]) * (1.0 + rng.uniform(-0.02, 0.02, size=3))
    light = 1.0 - 0.05 * np.clip(_smooth_noise(rng, shape, 0.4 * min(shape)), -2.0, 2.0)
    rgb = paper * light[..., None] * _transmission(ndimage.gaussian_filter(density, (0.8, 0.8, 0)))
    rgb += rng.normal(0.0, 0.01, size=rgb.shape)
    return _to_uint8(rgb), labels


# --------------------------------------------------------------------------
# class 3: H&E-like tissue, many small nuclei
# --------------------------------------------------------------------------

# Eosin as it looks in most H&E scans (pinker than the pure-dye vector of
# skimage.color.rgb_from_hed[1]); hematoxylin is the rgb_from_hed vector.
_EOSIN = np.array([0.10, 0.85, 0.45])


def _tissue(rng: np.random.Generator, shape: tuple[int, int]):
    """Purple hematoxylin nuclei packed in pink eosin stroma with fibres and white gaps."""
    cellularity = _smooth_noise(rng, shape, 0.08 * max(shape))
    lumen = cellularity < rng.uniform(-2.2, -1.3)  # empty spaces in the tissue
    density = np.clip(0.25 + 0.6 * (cellularity + 0.5), 0.05, 1.0) * ~lumen
    mean_radius = rng.uniform(5.0, 7.0)
    n = _count(rng, shape, (0.15, 0.32), mean_radius)
    radii = np.clip(rng.normal(mean_radius, 0.2 * mean_radius, size=n), 4.0, 9.0)
    centres, radii = _place(rng, shape, radii, spacing=0.85, density=density)
    spindle = rng.random(len(radii)) < 0.2  # elongated fibroblast and smooth-muscle nuclei
    polygons = _star_polygons(
        rng,
        centres,
        radii,
        elongation=np.where(
            spindle, rng.uniform(1.8, 3.0, size=len(radii)), rng.uniform(1.0, 1.5, size=len(radii))
        ),
        roughness=0.08,
        harmonics=3,
        n_vertices=28,
    )
    labels = _paint(shape, polygons)
    labels = _clean(labels)

    n_cells = int(labels.max())
    stains = np.stack([color.rgb_from_hed[0], _EOSIN]) * (1.0 + rng.uniform(-0.15, 0.15, (2, 3)))
    stains = (stains / np.linalg.norm(stains, axis=1, keepdims=True)).astype(np.float32)
    rows, cols = np.arange(shape[0])[:, None], np.arange(shape[1])[None, :]
    angle = rng.uniform(0.0, np.pi)
    warp = 3.0 * _smooth_noise(rng, shape, 20.0)
    fibres = np.sin((rows * np.sin(angle) + cols * np.cos(angle)) / rng.uniform(2.5, 4.0) + warp)
    fibres *= np.clip(_smooth_noise(rng, shape, 6.0), 0.0, None)  # fibre bundles fade in and out
    tissue = ndimage.gaussian_filter(~lumen * 1.0, 2.0)
    eosin = rng.uniform(0.2, 0.4) * (1.0 + 0.2 * fibres + 0.12 * _smooth_noise(rng, shape, 1.5))
    eosin = np.clip(eosin * tissue + 0.02, 0.0, None)
    depth = _depth(labels)
    strength = np.r_[0.0, rng.uniform(0.45, 1.15, size=n_cells)]
    membrane = 1.0 + 0.6 * np.exp(-depth / 1.2)  # chromatin gathers at the nuclear envelope
    chromatin = 1.0 + 0.3 * _smooth_noise(rng, shape, 0.9)
    hematoxylin = strength[labels] * membrane * chromatin * (labels > 0)
    hematoxylin += rng.uniform(0.02, 0.1) * (1.0 + 0.5 * _smooth_noise(rng, shape, 3.0)) * tissue
    density = hematoxylin[..., None] * stains[0] + eosin[..., None] * stains[1]
    density = ndimage.gaussian_filter(density, (0.7, 0.7, 0))
    rgb = np.array([0.96, 0.95, 0.96], np.float32) * _transmission(density)
    rgb += rng.normal(0.0, 0.01, size=rgb.shape)
    return _to_uint8(rgb), labels


# --------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------

_GENERATORS = {0: _fluorescence, 1: _gray_cells, 2: _brightfield, 3: _tissue}


def _check_size(size) -> tuple[int, int]:
    try:
        height, width = size
    except (TypeError, ValueError) as err:
        raise CellSegError(f"size: expected (height, width), got {size!r}") from err
    for value in (height, width):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise CellSegError(f"size: expected two integers (height, width), got {size!r}")
    if min(height, width) < MIN_SIZE:
        raise CellSegError(f"size: both sides must be at least {MIN_SIZE} pixels, got {size!r}")
    return int(height), int(width)


def _check_seed(seed, name: str = "seed") -> int | np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise CellSegError(
            f"{name}: expected an integer >= 0 or a np.random.Generator, got {seed!r}"
        )
    return int(seed)


def _check_category(category) -> int:
    if isinstance(category, bool) or not isinstance(category, int | np.integer):
        raise CellSegError(f"category: expected 0, 1, 2 or 3, got {category!r}")
    if int(category) not in _GENERATORS:
        raise CellSegError(f"category: expected 0, 1, 2 or 3, got {category!r}")
    return int(category)


def make_image(
    category: int,
    size: tuple[int, int] = (256, 256),
    seed: int | np.random.Generator = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic microscopy image of the given low-level class and its exact instance labels.

    Returns ``(image, labels)``: ``image`` is ``(H, W)`` uint8 or uint16 for
    class 0 (fluorescence nuclei; the bit depth is drawn from the seed) and
    ``(H, W, 3)`` uint8 for class 1 (gray phase contrast or DIC), 2 (colour
    brightfield, large cells) and 3 (H&E-like tissue, small nuclei);
    ``labels`` is ``(H, W)`` int32 with ids 1..N, each one 4-connected cell.
    ``categorize.low_level_category(image, labels) == category`` with the
    paper's thresholds. The same ``seed`` gives the same arrays; a
    ``np.random.Generator`` may be passed instead and is drawn from. ``size``
    is ``(H, W)``, both at least 64, and at least 128 for class 2.

    >>> image, labels = make_image(3, size=(128, 128), seed=1)
    >>> image.shape, labels.dtype.name
    ((128, 128, 3), 'int32')
    """
    category = _check_category(category)
    shape = _check_size(size)
    rng = np.random.default_rng(_check_seed(seed))
    return _GENERATORS[category](rng, shape)


def voronoi_labels(
    shape: tuple[int, int], n_cells: int, seed: int | np.random.Generator = 0
) -> np.ndarray:
    """``(H, W)`` int32 labels only, no image: Voronoi cells around ``n_cells`` random seeds, each
    clipped to a random radius, giving dense clusters of touching cells with isolated ones between.

    Cheap at any size (one distance transform), for benchmarks and tests of label-only code:
    metrics, targets, post-processing.
    """
    shape = tuple(int(v) for v in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise CellSegError(f"shape: expected (H, W) with positive sides, got {shape!r}")
    if isinstance(n_cells, bool) or not isinstance(n_cells, int | np.integer):
        raise CellSegError(f"n_cells: expected an integer, got {n_cells!r}")
    if not 1 <= n_cells <= shape[0] * shape[1]:
        raise CellSegError(f"n_cells: expected 1 to {shape[0] * shape[1]}, got {n_cells}")
    rng = np.random.default_rng(_check_seed(seed))
    seeds = np.zeros(shape, np.int32)
    seeds.flat[rng.choice(seeds.size, n_cells, replace=False)] = np.arange(1, n_cells + 1)
    dist, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    nearest = seeds[iy, ix]
    radius = rng.uniform(0.35, 0.75, n_cells + 1) * np.sqrt(seeds.size / n_cells)
    return np.where(dist <= radius[nearest], nearest, 0).astype(np.int32)


class SyntheticEntry(NamedTuple):
    """One image written by :func:`make_dataset`; ``make_image(category, size, seed)`` rebuilds it."""

    stem: str
    category: int
    image: Path
    labels: Path
    seed: int
    cells: int


_MANIFEST_FIELDS = [
    "stem",
    "file",
    "category",
    "height",
    "width",
    "channels",
    "dtype",
    "cells",
    "seed",
]


def _image_seed(seed: int, category: int, index: int) -> int:
    """A well-mixed per-image seed: datasets with different seeds share no image."""
    return int(np.random.SeedSequence([seed, category, index]).generate_state(1)[0])


def make_dataset(
    root: str | os.PathLike,
    n_per_category: int,
    size: tuple[int, int] = (256, 256),
    seed: int = 0,
    *,
    categories: Sequence[int] = (0, 1, 2, 3),
) -> list[SyntheticEntry]:
    """Write ``n_per_category`` synthetic images per class in the NeurIPS-CellSeg layout.

    Files: ``root/images/<stem>.png`` (uint8) or ``.tif`` (16-bit),
    ``root/labels/<stem>_label.tiff`` and ``root/manifest.csv`` (stem, file,
    category, height, width, channels, dtype, cells, seed), with stems such as
    ``synth_c0_0003``. Each image's seed is derived from ``(seed, category,
    index)`` and recorded, so ``make_image(category, size, seed)`` rebuilds it.
    """
    if isinstance(n_per_category, bool) or not isinstance(n_per_category, int | np.integer):
        raise CellSegError(f"n_per_category: expected a positive integer, got {n_per_category!r}")
    if n_per_category < 1:
        raise CellSegError(f"n_per_category: must be at least 1, got {n_per_category}")
    if isinstance(seed, np.random.Generator):
        raise CellSegError(
            "seed: make_dataset derives one seed per image from an integer >= 0, got a Generator"
        )
    seed = _check_seed(seed)
    categories = [_check_category(c) for c in categories]
    if not categories:
        raise CellSegError("categories: expected at least one of 0, 1, 2, 3, got none")
    shape = _check_size(size)
    if 2 in categories and min(shape) < _MIN_SIZE_LARGE_CELLS:
        raise CellSegError(
            f"size: class 2 (large cells) needs at least {_MIN_SIZE_LARGE_CELLS} pixels on each "
            f"side, got {size!r}; leave it out with categories=(0, 1, 3)"
        )

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    entries, rows = [], []
    for category in categories:
        for index in range(int(n_per_category)):
            image_seed = _image_seed(seed, category, index)
            image, labels = make_image(category, shape, image_seed)
            stem = f"synth_c{category}_{index:04d}"
            image_path = root / "images" / f"{stem}.{'png' if image.dtype == np.uint8 else 'tif'}"
            labels_path = root / "labels" / f"{stem}_label.tiff"
            write_image(image_path, image)
            write_labels(labels_path, labels)
            cells = int(labels.max())
            entries.append(
                SyntheticEntry(stem, category, image_path, labels_path, image_seed, cells)
            )
            rows.append(
                {
                    "stem": stem,
                    "file": image_path.name,
                    "category": category,
                    "height": shape[0],
                    "width": shape[1],
                    "channels": 1 if image.ndim == 2 else image.shape[2],
                    "dtype": image.dtype.name,
                    "cells": cells,
                    "seed": image_seed,
                }
            )
    _write_manifest(root / "manifest.csv", rows)
    return entries


def _write_manifest(path: Path, rows: list[dict]) -> None:
    """Write the manifest CSV atomically (``io.atomic_write``)."""
    text = StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=_MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path) as fh:
        fh.write(text.getvalue().encode("utf-8"))
