"""Tests for cellseg_lite.synthetic: exact labels, the look of each class, determinism, the dataset layout."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from skimage import measure

from cellseg_lite import CellSegError, io, synthetic
from cellseg_lite.categorize import PRESETS, low_level_category
from cellseg_lite.synthetic import MIN_SIZE, SyntheticEntry, make_dataset, make_image

SEEDS = range(50)
CATEGORIES = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def gallery() -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """Every class at 256 x 256 for seeds 0..49, made once for the whole module."""
    return {(c, s): make_image(c, (256, 256), s) for c in CATEGORIES for s in SEEDS}


def check_instances(labels: np.ndarray) -> None:
    """Sequential int32 ids 1..N, each exactly one 4-connected component."""
    assert labels.dtype == np.int32
    n = int(labels.max())
    np.testing.assert_array_equal(np.unique(labels[labels > 0]), np.arange(1, n + 1))
    pieces, n_pieces = measure.label(labels, background=0, connectivity=1, return_num=True)
    assert n_pieces == n  # no id split in two, and (ids being distinct) no two ids merged


# ----------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_seed_is_its_own_class_at_256(gallery, category):
    found = [low_level_category(*gallery[category, s]) for s in SEEDS]
    assert found == [category] * len(SEEDS)


@pytest.mark.parametrize(
    "size, category",
    [
        (size, category)
        for size in [(128, 192), (384, 384), (512, 512), (64, 64), (64, 300)]
        for category in CATEGORIES
        if category != 2 or min(size) >= 128  # class 2 needs 128 px per side (tested below)
    ],
)
def test_every_size_is_its_own_class(size, category):
    for seed in range(4):
        image, labels = make_image(category, size, seed)
        assert image.shape[:2] == labels.shape == size
        assert low_level_category(image, labels) == category


def test_code_preset_turns_large_cells_into_small_cells(gallery):
    """The code's 30000 px threshold: synthetic class 2 cells (< 16000 px) are all 'small'."""
    expected = {0: 0, 1: 1, 2: 3, 3: 3}
    for (category, _), (image, labels) in gallery.items():
        assert low_level_category(image, labels, **PRESETS["code"]) == expected[category]


# ----------------------------------------------------------------------------- arrays


def test_dtypes_and_shapes(gallery):
    class0_dtypes = set()
    for (category, _), (image, labels) in gallery.items():
        assert labels.shape == (256, 256)
        if category == 0:
            assert image.shape == (256, 256)
            class0_dtypes.add(image.dtype)
        else:
            assert image.shape == (256, 256, 3)
            assert image.dtype == np.uint8
    assert class0_dtypes == {np.dtype(np.uint8), np.dtype(np.uint16)}  # both bit depths occur


def test_non_square_size_is_rows_then_columns():
    image, labels = make_image(3, (80, 200), 0)
    assert image.shape == (80, 200, 3)
    assert labels.shape == (80, 200)


def test_labels_are_exact_instances(gallery):
    for _, labels in gallery.values():
        check_instances(labels)
        assert np.bincount(labels.ravel())[1:].min() >= 12  # no slivers


def test_labels_at_other_sizes_are_exact_instances():
    for category in CATEGORIES:
        check_instances(make_image(category, (384, 384), 7)[1])
    check_instances(make_image(1, (64, 64), 7)[1])


@pytest.mark.parametrize(
    "category, low, high", [(0, 10, 160), (1, 3, 25), (2, 2, 12), (3, 50, 320)]
)
def test_cell_counts(gallery, category, low, high):
    counts = [int(gallery[category, s][1].max()) for s in SEEDS]
    assert low <= min(counts) and max(counts) <= high
    assert len(set(counts)) > 5  # the count varies with the seed


def test_cell_counts_grow_with_the_field_of_view():
    small = np.mean([make_image(3, (128, 128), s)[1].max() for s in range(4)])
    large = np.mean([make_image(3, (512, 512), s)[1].max() for s in range(4)])
    assert 8 < large / small < 24  # 16 times the area


@pytest.mark.parametrize(
    "category, low, high",
    [(0, 5.0, 15.0), (1, 10.0, 42.0), (3, 3.0, 10.0)],
)
def test_cell_sizes(gallery, category, low, high):
    """Median equivalent radius (sqrt(area / pi)) of whole cells per image, as in the design."""
    for seed in SEEDS[:10]:
        labels = gallery[category, seed][1]
        areas = np.bincount(labels.ravel())[1:]
        assert low <= np.median(np.sqrt(areas / np.pi)) <= high


def test_large_cells_are_large(gallery):
    for seed in SEEDS:
        areas = np.bincount(gallery[2, seed][1].ravel())[1:]
        assert 8000 < areas.max() < 30000


def test_gray_cells_are_not_convex(gallery):
    solidity = np.array(
        [region.solidity for seed in SEEDS for region in measure.regionprops(gallery[1, seed][1])]
    )
    assert np.mean(solidity < 0.9) > 0.6
    assert np.median(solidity) < 0.9


def test_each_class_has_its_look(gallery):
    """Fluorescence: dark background, bright nuclei; gray: cells darker inside than around;
    brightfield: bright background, coloured cells; H&E: purple nuclei on pink."""
    for seed in SEEDS[:10]:
        image, labels = gallery[0, seed]
        assert image[labels > 0].mean() > 2 * image[labels == 0].mean()
        image, labels = gallery[1, seed]
        assert np.ptp(image.astype(int), axis=2).max() <= 20  # gray: channels nearly equal
        image, labels = gallery[2, seed]
        background = image[labels == 0].astype(float)
        if len(background):
            assert background.mean() > 200
        image, labels = gallery[3, seed]
        nuclei, stroma = image[labels > 0].astype(float), image[labels == 0].astype(float)
        assert nuclei.mean() < stroma.mean()  # hematoxylin is darker
        assert stroma[:, 0].mean() > stroma[:, 1].mean()  # eosin: red above green (pink)
        assert nuclei[:, 2].mean() > nuclei[:, 1].mean()  # hematoxylin: blue above green


# ----------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("category", CATEGORIES)
def test_same_seed_same_arrays_different_seed_different(category):
    image, labels = make_image(category, (128, 128), 11)
    again_image, again_labels = make_image(category, (128, 128), 11)
    np.testing.assert_array_equal(image, again_image)
    np.testing.assert_array_equal(labels, again_labels)
    other_image, other_labels = make_image(category, (128, 128), 12)
    assert not np.array_equal(labels, other_labels)
    assert image.shape != other_image.shape or not np.array_equal(image, other_image)


def test_generator_seed_is_drawn_from():
    first = make_image(3, (96, 96), np.random.default_rng(5))
    np.testing.assert_array_equal(first[1], make_image(3, (96, 96), np.random.default_rng(5))[1])
    rng = np.random.default_rng(5)
    make_image(3, (96, 96), rng)
    assert not np.array_equal(first[1], make_image(3, (96, 96), rng)[1])


def test_global_random_state_is_untouched():
    """The generator draws from its own Generator only, never from numpy's legacy global state."""
    before = np.random.get_state()[1].copy()  # noqa: NPY002 (reading it is the test)
    make_image(0, (64, 64), 1)
    after = np.random.get_state()[1]  # noqa: NPY002
    np.testing.assert_array_equal(after, before)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("category", [4, -1, 1.5, True, "0", None])
def test_bad_category(category):
    with pytest.raises(CellSegError, match="category: expected 0, 1, 2 or 3"):
        make_image(category)


@pytest.mark.parametrize(
    "size, message",
    [
        ((63, 64), "at least 64 pixels"),
        ((64, 10), "at least 64 pixels"),
        (256, r"size: expected \(height, width\)"),
        ((64, 64, 3), r"size: expected \(height, width\)"),
        ((64.0, 64), "expected two integers"),
        ((True, 64), "expected two integers"),
    ],
)
def test_bad_size(size, message):
    with pytest.raises(CellSegError, match=message):
        make_image(0, size)


def test_large_cells_need_128_pixels():
    assert MIN_SIZE == 64
    with pytest.raises(CellSegError, match="class 2 .* at least 128 pixels"):
        make_image(2, (127, 256))
    image, labels = make_image(2, (128, 128), 0)
    assert low_level_category(image, labels) == 2


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_bad_seed(seed):
    with pytest.raises(CellSegError, match="seed: expected an integer >= 0"):
        make_image(0, (64, 64), seed)


# ----------------------------------------------------------------------------- make_dataset


def test_make_dataset_writes_the_challenge_layout(tmp_path):
    entries = make_dataset(tmp_path / "synth", 2, size=(128, 160), seed=3)
    root = tmp_path / "synth"
    assert [e.stem for e in entries] == [f"synth_c{c}_{i:04d}" for c in CATEGORIES for i in (0, 1)]
    assert all(isinstance(e, SyntheticEntry) for e in entries)
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["stem"] for r in rows] == [e.stem for e in entries]
    for entry, row in zip(entries, rows, strict=True):
        image, labels = make_image(entry.category, (128, 160), entry.seed)
        suffix = ".png" if image.dtype == np.uint8 else ".tif"
        assert entry.image == root / "images" / f"{entry.stem}{suffix}"
        assert entry.labels == root / "labels" / f"{entry.stem}_label.tiff"
        np.testing.assert_array_equal(io.read_image(entry.image), image)
        np.testing.assert_array_equal(io.read_labels(entry.labels), labels)
        assert row == {
            "stem": entry.stem,
            "file": entry.image.name,
            "category": str(entry.category),
            "height": "128",
            "width": "160",
            "channels": "1" if image.ndim == 2 else "3",
            "dtype": image.dtype.name,
            "cells": str(int(labels.max())),
            "seed": str(entry.seed),
        }
        assert entry.cells == int(labels.max())
    assert sorted(p.name for p in root.iterdir()) == ["images", "labels", "manifest.csv"]


def test_make_dataset_seeds_are_stable_and_distinct(tmp_path):
    first = make_dataset(tmp_path / "a", 1, size=(64, 64), seed=0, categories=(0, 3))
    more = make_dataset(tmp_path / "b", 2, size=(64, 64), seed=0, categories=(0, 3))
    other = make_dataset(tmp_path / "c", 1, size=(64, 64), seed=1, categories=(0, 3))
    assert [e.seed for e in first] == [more[0].seed, more[2].seed]  # independent of n
    seeds = {e.seed for e in more} | {e.seed for e in other}
    assert len(seeds) == 6  # no image shared between datasets or classes


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_per_category": 0}, "n_per_category: must be at least 1"),
        ({"n_per_category": "2"}, "n_per_category: expected a positive integer"),
        ({"n_per_category": True}, "n_per_category: expected a positive integer"),
        ({"seed": -3}, "seed: expected an integer >= 0"),
        ({"seed": np.random.default_rng(0)}, "seed: make_dataset derives one seed per image"),
        ({"categories": ()}, "categories: expected at least one"),
        ({"categories": (0, 5)}, "category: expected 0, 1, 2 or 3"),
        ({"size": (100, 100)}, r"class 2 .* leave it out with categories=\(0, 1, 3\)"),
        ({"size": (32, 100), "categories": (0,)}, "at least 64 pixels"),
    ],
)
def test_make_dataset_bad_arguments(tmp_path, kwargs, message):
    arguments = {"n_per_category": 1, "size": (128, 128), **kwargs}
    with pytest.raises(CellSegError, match=message):
        make_dataset(tmp_path, **arguments)
    assert not (tmp_path / "manifest.csv").exists()


def test_voronoi_labels_are_seeded_sequential_cells():
    a = synthetic.voronoi_labels((120, 90), 40, seed=5)
    np.testing.assert_array_equal(a, synthetic.voronoi_labels((120, 90), 40, seed=5))
    assert a.dtype == np.int32 and a.shape == (120, 90)
    assert set(np.unique(a)) <= set(range(41)) and a.max() == 40


@pytest.mark.parametrize(
    ("shape", "n_cells", "match"),
    [
        ((0, 10), 3, "shape"),
        ((10, 10), 0, "n_cells"),
        ((10, 10), 101, "n_cells"),
        ((10, 10), 2.5, "n_cells"),
    ],
)
def test_voronoi_labels_bad_settings(shape, n_cells, match):
    with pytest.raises(CellSegError, match=match):
        synthetic.voronoi_labels(shape, n_cells)
