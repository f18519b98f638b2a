"""Tests for cellseg_lite.categorize: the HSV cues, the max-area cue and the 4-way rule."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2hsv

from cellseg_lite import CellSegError, categorize
from cellseg_lite.categorize import (
    CATEGORY_NAMES,
    PRESETS,
    Categorization,
    explain,
    hsv_cues,
    low_level_category,
    max_cell_area,
)

PINK = (240, 150, 200)  # clearly coloured: S = 0.375, V = 0.94


def uniform(pixel, shape=(16, 16), dtype=np.uint8) -> np.ndarray:
    """An (H, W, C) image whose every pixel is ``pixel``."""
    return np.broadcast_to(np.asarray(pixel, dtype=dtype), (*shape, len(pixel))).copy()


def one_cell(shape, area: int) -> np.ndarray:
    """Labels with a single cell of exactly ``area`` pixels (filled row by row)."""
    labels = np.zeros(shape, np.int32)
    labels.ravel()[:area] = 1
    return labels


def no_cells(shape=(16, 16)) -> np.ndarray:
    return np.zeros(shape, np.int32)


# ----------------------------------------------------------------------------- hsv_cues


@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(0).integers(0, 256, (40, 30, 3)).astype(np.uint8),
        np.random.default_rng(1).integers(0, 65536, (40, 30, 3)).astype(np.uint16),
        np.random.default_rng(2).random((40, 30, 3)),
        np.random.default_rng(3).random((40, 30, 3)).astype(np.float32),
    ],
    ids=["uint8", "uint16", "float64", "float32"],
)
def test_hsv_cues_equal_skimage_rgb2hsv_means(image):
    hsv = rgb2hsv(image)
    s, v = hsv_cues(image)
    assert s == pytest.approx(hsv[..., 1].mean(), rel=1e-6)
    assert v == pytest.approx(hsv[..., 2].mean(), rel=1e-6)


def test_hsv_cues_blocks_give_the_same_means(monkeypatch):
    image = np.random.default_rng(4).integers(0, 256, (37, 23, 3)).astype(np.uint8)
    whole = hsv_cues(image)
    gray_whole = hsv_cues(image[..., 0])
    monkeypatch.setattr(categorize, "_BLOCK_PIXELS", 50)  # 2 rows per block
    assert hsv_cues(image) == pytest.approx(whole, rel=1e-12)
    assert hsv_cues(image[..., 0]) == pytest.approx(gray_whole, rel=1e-12)
    assert gray_whole[1] == pytest.approx(image[..., 0].mean() / 255)


def test_hsv_cues_scale_uint8_uint16_and_float():
    assert hsv_cues(uniform((51, 51, 51)))[1] == pytest.approx(0.2)
    assert hsv_cues(uniform((13107, 13107, 13107), dtype=np.uint16))[1] == pytest.approx(0.2)
    assert hsv_cues(uniform((0.2, 0.2, 0.2), dtype=float))[1] == pytest.approx(0.2)
    # Floats beyond [0, 1] are divided by their maximum: V of the brightest pixel is 1.
    image = uniform((2.0, 2.0, 2.0), dtype=float)
    image[0, 0] = (8.0, 4.0, 4.0)
    s, v = hsv_cues(image)
    assert v == pytest.approx((2.0 * 255 + 8.0) / 256 / 8.0)
    assert s == pytest.approx(0.5 / 256)
    # Integers other than uint8/uint16 follow the same rule.
    assert hsv_cues(uniform((3, 3, 3), dtype=np.int32))[1] == pytest.approx(1.0)


def test_hsv_cues_are_exact_on_uniform_images_of_any_size():
    assert hsv_cues(uniform((100, 90, 90), (50, 33))) == (0.1, 100 / 255)
    assert hsv_cues(uniform((153, 153, 153), (70, 70)))[1] == 0.6
    assert hsv_cues(uniform((0.1, 0.1, 0.1), (64, 48), dtype=float))[1] == 0.1
    assert hsv_cues(np.full((50, 70), 153, np.uint8)) == (0.0, 0.6)


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 1)])
def test_hsv_cues_one_channel_has_no_saturation(shape):
    image = np.full(shape, 51, np.uint8)
    assert hsv_cues(image) == (0.0, pytest.approx(0.2))
    assert hsv_cues(image.astype(np.uint16) * 257) == (0.0, pytest.approx(0.2))


def test_hsv_cues_two_channels_read_as_red_green_with_empty_blue():
    s, v = hsv_cues(uniform((100, 50), (8, 8)))
    assert (s, v) == (1.0, pytest.approx(100 / 255))


def test_hsv_cues_more_channels_use_the_first_three():
    rgba = uniform((100, 90, 90, 255), (8, 8))
    assert hsv_cues(rgba) == hsv_cues(rgba[..., :3])


def test_hsv_cues_black_image():
    assert hsv_cues(uniform((0, 0, 0))) == (0.0, 0.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_hsv_cues_refuse_nan_and_infinity(bad):
    image = uniform((0.5, 0.5, 0.5), dtype=float)
    image[3, 4, 1] = bad
    with pytest.raises(CellSegError, match="NaN or infinite"):
        hsv_cues(image)


def test_hsv_cues_refuse_negative_intensities():
    with pytest.raises(CellSegError, match="non-negative intensities.*-5"):
        hsv_cues(uniform((-5, 10, 10), dtype=np.int16))


def test_hsv_cues_refuse_a_non_image():
    with pytest.raises(CellSegError, match="image: expected a 2-D image"):
        hsv_cues(np.zeros((2, 8, 8, 3), np.uint8))


# ----------------------------------------------------------------------------- max_cell_area


@pytest.mark.parametrize(
    "labels, expected",
    [
        ([[0, 0], [0, 0]], 0),
        ([[1, 1, 0], [2, 0, 0]], 2),
        ([[3, 3, 3], [3, 7, 7]], 4),
        ([[0, 5], [5, 5]], 3),
    ],
)
def test_max_cell_area_table(labels, expected):
    assert max_cell_area(np.array(labels)) == expected


def test_max_cell_area_sparse_huge_ids_do_not_allocate_per_id():
    labels = np.zeros((4, 4), np.int64)
    labels[0, :3] = 2**31 - 1
    labels[3, 3] = 5
    assert max_cell_area(labels) == 3


def test_max_cell_area_refuses_negative_ids():
    with pytest.raises(CellSegError, match="labels must be >= 0"):
        max_cell_area(np.array([[0, -1], [1, 1]]))


# ----------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("shape", [(16, 16), (16, 16, 1)])
def test_one_channel_is_class_0_whatever_the_cells(shape):
    image = np.full(shape, 200, np.uint8)
    assert low_level_category(image, one_cell((16, 16), 200)) == 0
    assert low_level_category(image.astype(np.uint16), no_cells()) == 0


def test_gray_rgb_is_class_1():
    result = explain(uniform((100, 100, 100)), no_cells())
    assert result.category == 1
    assert result.branch.endswith("-> class 1 (gray)")


def test_saturation_boundary_is_inclusive():
    assert hsv_cues(uniform((100, 90, 90)))[0] == 0.1  # exactly on the threshold
    assert low_level_category(uniform((100, 90, 90)), no_cells()) == 1
    assert hsv_cues(uniform((100, 89, 89)))[0] > 0.1
    assert low_level_category(uniform((100, 89, 89)), no_cells()) == 3


def test_value_boundaries_are_inclusive():
    labels = no_cells()
    assert hsv_cues(uniform((153, 153, 153)))[1] == 0.6
    assert low_level_category(uniform((153, 153, 153)), labels) == 1
    assert low_level_category(uniform((154, 154, 154)), labels) == 3
    assert hsv_cues(uniform((0.1, 0.1, 0.1), dtype=float))[1] == 0.1
    assert low_level_category(uniform((0.1, 0.1, 0.1), dtype=float), labels) == 1
    assert low_level_category(uniform((0.0999, 0.0999, 0.0999), dtype=float), labels) == 3


def test_area_boundary_is_strict_8000_is_small():
    image = uniform(PINK, (100, 100))
    assert low_level_category(image, one_cell((100, 100), 8000)) == 3
    assert low_level_category(image, one_cell((100, 100), 8001)) == 2


def test_colour_branches_explained():
    image = uniform(PINK, (100, 100))
    large = explain(image, one_cell((100, 100), 9120))
    assert large == Categorization(
        category=2,
        saturation=pytest.approx(90 / 240),
        value=pytest.approx(240 / 255),
        max_area=9120,
        branch=large.branch,
    )
    assert large.branch.startswith("colour (mean S 0.375 > 0.1")
    assert large.branch.endswith("largest cell 9120 px > 8000 -> class 2 (large cells)")
    small = explain(image, one_cell((100, 100), 120))
    assert small.category == 3
    assert small.branch.endswith("largest cell 120 px <= 8000 -> class 3 (small cells)")


def test_bright_gray_is_colour_not_gray():
    """A white-background brightfield image fails the value test (as the real ones do)."""
    result = explain(uniform((230, 230, 230)), no_cells())
    assert result.category == 3
    assert "outside [0.1, 0.6]" in result.branch


def test_no_cells_goes_to_small_cells_without_crashing():
    result = explain(uniform(PINK), no_cells())
    assert (result.category, result.max_area) == (3, 0)


@pytest.mark.parametrize("channels", [2, 4, 5])
def test_not_three_channels_skip_the_gray_test(channels):
    image = uniform((100,) * channels)  # would be gray if it had three channels
    result = explain(image, no_cells())
    assert result.category == 3
    assert f"{channels} channels: no gray test" in result.branch
    assert low_level_category(image, one_cell((16, 16), 200), max_area=100) == 2


def test_sixteen_bit_rgb():
    gray = uniform((20000, 20000, 20000), dtype=np.uint16)  # V = 0.305: /65535, not /max
    assert low_level_category(gray, no_cells()) == 1
    bright = uniform((40000, 40000, 40000), dtype=np.uint16)  # V = 0.61
    assert low_level_category(bright, no_cells()) == 3
    colour = uniform((60000, 30000, 45000), dtype=np.uint16)
    assert low_level_category(colour, one_cell((16, 16), 200), max_area=199) == 2


def test_one_channel_explained():
    result = explain(np.full((8, 8), 51, np.uint8), no_cells((8, 8)))
    assert result == (
        0,
        0.0,
        pytest.approx(0.2),
        0,
        "one channel -> class 0 (one-channel)",
        "labels",
    )


def test_low_level_category_is_explain_category():
    image = uniform(PINK, (100, 100))
    labels = one_cell((100, 100), 9000)
    for preset in PRESETS.values():
        assert low_level_category(image, labels, **preset) == explain(image, labels, **preset)[0]


def test_presets_paper_and_code():
    assert PRESETS["paper"] == {"saturation": 0.1, "value_range": (0.1, 0.6), "max_area": 8000}
    assert PRESETS["code"] == {**PRESETS["paper"], "max_area": 30000}
    image = uniform(PINK, (200, 200))
    labels = one_cell((200, 200), 12000)
    assert low_level_category(image, labels) == low_level_category(
        image, labels, **PRESETS["paper"]
    )
    assert low_level_category(image, labels, **PRESETS["paper"]) == 2
    assert low_level_category(image, labels, **PRESETS["code"]) == 3
    assert low_level_category(image, one_cell((200, 200), 30001), **PRESETS["code"]) == 2


def test_custom_thresholds():
    image = uniform((100, 80, 80))  # S = 0.2, V = 0.39
    assert low_level_category(image, no_cells()) == 3
    assert low_level_category(image, no_cells(), saturation=0.2) == 1
    assert low_level_category(image, no_cells(), saturation=0.2, value_range=(0.5, 0.9)) == 3


def test_category_names():
    assert sorted(CATEGORY_NAMES) == [0, 1, 2, 3]
    assert CATEGORY_NAMES[1] == "gray (phase/DIC)"


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "thresholds, message",
    [
        ({"saturation": "low"}, "saturation: expected a number"),
        ({"saturation": 1.5}, r"saturation: must lie in \[0, 1\]"),
        ({"value_range": 0.5}, "value_range: expected two numbers"),
        ({"value_range": (0.1, 0.2, 0.3)}, "value_range: expected two numbers"),
        ({"value_range": ("a", 0.5)}, "value_range: expected two numbers"),
        ({"value_range": (0.6, 0.1)}, "value_range: need 0 <= low <= high <= 1"),
        ({"max_area": None}, "max_area: expected a number of pixels"),
        ({"max_area": -1}, "max_area: must be a finite number"),
        ({"max_area": float("nan")}, "max_area: must be a finite number"),
    ],
)
def test_bad_thresholds(thresholds, message):
    with pytest.raises(CellSegError, match=message):
        low_level_category(uniform(PINK), no_cells(), **thresholds)


def test_image_and_labels_must_match():
    with pytest.raises(
        CellSegError, match=r"image size \(16, 16\) and label size \(8, 16\) differ"
    ):
        explain(uniform(PINK), no_cells((8, 16)))


def test_bad_labels():
    with pytest.raises(CellSegError, match="labels: labels must be integers"):
        explain(uniform(PINK), np.full((16, 16), 0.5))


def test_bad_image():
    with pytest.raises(CellSegError, match="image: unsupported pixel type"):
        explain(np.full((16, 16), "a"), no_cells())


# ----------------------------------------------------------------------------- real images


@pytest.mark.realdata
def test_real_images_follow_the_documented_rule(real_mini, real_manifest):
    """Fluorescence and phase contrast are one-channel (0); stained and brightfield are colour with small cells (3)."""
    from cellseg_lite import io

    expected = {"fluorescence": 0, "phase-contrast": 0, "stained": 3, "brightfield": 3}
    wrong = []
    for row in real_manifest:
        image = io.read_image(real_mini / "images" / row["file"])
        labels = io.read_labels(real_mini / "labels" / f"{row['stem']}_label.tiff")
        result = explain(image, labels)
        if result.category != expected[row["modality"]]:
            wrong.append((row["stem"], row["modality"], result.branch))
    assert not wrong
    assert {row["modality"] for row in real_manifest} == set(expected)


# ----------------------------------------------------------------------------- pseudo labels


class FakeSegmenter:
    """A segmenter that returns fixed labels and records the images it was called on."""

    def __init__(self, labels):
        self.labels = labels
        self.calls: list[np.ndarray] = []

    def __call__(self, image):
        self.calls.append(image)
        return self.labels


@pytest.mark.parametrize("area, category", [(9000, 2), (120, 3)])
def test_pseudo_labels_feed_the_area_test(area, category):
    image = uniform(PINK, (100, 100))
    segmenter = FakeSegmenter(one_cell((100, 100), area))
    result = categorize.categorize_image(image, segmenter=segmenter)
    assert len(segmenter.calls) == 1
    assert segmenter.calls[0] is image  # the raw image, as given
    assert (result.category, result.max_area, result.area_source) == (category, area, "pseudo")
    assert f"largest pseudo-label cell {area} px" in result.branch
    assert result.branch.startswith("colour (mean S 0.375 > 0.1")
    labelled = explain(image, one_cell((100, 100), area))
    assert result[:4] == labelled[:4]
    assert labelled.area_source == "labels"


@pytest.mark.parametrize(
    "image, category",
    [
        (np.full((16, 16), 200, np.uint8), 0),
        (np.full((16, 16, 1), 200, np.uint16), 0),
        (uniform((100, 100, 100)), 1),
    ],
    ids=["one-channel", "one-channel-HW1", "gray"],
)
def test_pseudo_path_does_not_call_the_segmenter_when_the_area_is_not_needed(image, category):
    segmenter = FakeSegmenter(one_cell((16, 16), 200))
    result = categorize.categorize_image(image, segmenter=segmenter)
    assert segmenter.calls == []
    assert (result.category, result.max_area, result.area_source) == (category, None, "none")
    assert result.branch == explain(image, no_cells()).branch
    # ... and no segmenter is needed at all.
    assert categorize.categorize_image(image) == result


@pytest.mark.parametrize("channels", [2, 4])
def test_pseudo_path_calls_the_segmenter_for_two_and_four_channels(channels):
    segmenter = FakeSegmenter(one_cell((16, 16), 200))
    result = categorize.categorize_image(uniform((100,) * channels), segmenter=segmenter)
    assert len(segmenter.calls) == 1
    assert (result.category, result.area_source) == (3, "pseudo")
    assert f"{channels} channels: no gray test" in result.branch


def test_given_labels_win_over_the_segmenter():
    image, labels = uniform(PINK, (100, 100)), one_cell((100, 100), 9000)
    segmenter = FakeSegmenter(no_cells((100, 100)))
    result = categorize.categorize_image(image, labels, segmenter=segmenter)
    assert segmenter.calls == []
    assert result == explain(image, labels)


def test_pseudo_path_uses_the_thresholds():
    image = uniform(PINK, (200, 200))
    segmenter = FakeSegmenter(one_cell((200, 200), 12000))
    assert categorize.categorize_image(image, segmenter=segmenter).category == 2
    assert categorize.categorize_image(image, segmenter=segmenter, **PRESETS["code"]).category == 3
    gray = uniform((100, 80, 80))  # S = 0.2: gray only with a looser saturation threshold
    assert categorize.categorize_image(gray, saturation=0.2).category == 1


def test_pseudo_path_colour_image_without_segmenter_says_one_is_needed():
    with pytest.raises(CellSegError, match="colour image without labels needs a segmenter"):
        categorize.categorize_image(uniform(PINK))


@pytest.mark.parametrize(
    "output, message",
    [
        (no_cells((8, 16)), r"image and segmenter output: image size \(16, 16\) and label size"),
        (np.full((16, 16), 0.5), "segmenter output: labels must be integers"),
        (np.zeros((16, 16, 3), np.int32), "segmenter output: labels must be a 2-D"),
        (None, "segmenter output: labels must be a 2-D"),
    ],
)
def test_pseudo_path_checks_the_segmenter_output(output, message):
    with pytest.raises(CellSegError, match=message):
        categorize.categorize_image(uniform(PINK), segmenter=FakeSegmenter(output))


def test_pseudo_path_refuses_a_segmenter_that_is_not_callable():
    with pytest.raises(CellSegError, match="segmenter: expected a callable.*got str"):
        categorize.categorize_image(uniform(PINK), segmenter="stardist")


def test_pseudo_path_checks_thresholds_and_image_before_segmenting():
    segmenter = FakeSegmenter(no_cells())
    with pytest.raises(CellSegError, match="max_area: must be a finite number"):
        categorize.categorize_image(uniform(PINK), segmenter=segmenter, max_area=-5)
    with pytest.raises(CellSegError, match="image: expected a 2-D image"):
        categorize.categorize_image(np.zeros((2, 2, 2, 2)), segmenter=segmenter)
    assert segmenter.calls == []


# ----------------------------------------------------------------------------- folders

CSV_FIELDS = [
    "stem",
    "category",
    "category_name",
    "mean_s",
    "mean_v",
    "channels",
    "max_area",
    "area_source",
    "branch",
]


@pytest.fixture
def folder(tmp_path):
    """One synthetic image per class (160 px); classes 0 and 3 have lost their label files."""
    from cellseg_lite import synthetic

    root = tmp_path / "data"
    entries = synthetic.make_dataset(root, 1, size=(160, 160), seed=3)
    for entry in entries:
        if entry.category in (0, 3):
            entry.labels.unlink()
    return root, {e.stem: e for e in entries}


def read_csv(path):
    import csv

    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_folder_labelled_images_use_labels_unlabelled_colour_uses_the_segmenter(folder, tmp_path):
    from cellseg_lite import io

    root, entries = folder
    c3 = entries["synth_c3_0000"]
    image3 = io.read_image(c3.image)
    segmenter = FakeSegmenter(one_cell(image3.shape[:2], 8001))
    out = tmp_path / "out" / "categories.csv"
    result = categorize.categorize_folder(root, out, segmenter=segmenter, progress=False)

    assert len(segmenter.calls) == 1  # only the unlabelled colour image
    np.testing.assert_array_equal(segmenter.calls[0], image3)
    assert result.errors == () and result.csv_path == out
    by_stem = {row.stem: row for row in result.rows}
    assert list(by_stem) == sorted(entries)
    assert by_stem["synth_c0_0000"][1:] == (
        0,
        "one-channel",
        0.0,
        pytest.approx(hsv_cues(io.read_image(entries["synth_c0_0000"].image))[1]),
        1,
        None,
        "none",
        "one channel -> class 0 (one-channel)",
    )
    for stem in ("synth_c1_0000", "synth_c2_0000"):
        entry = entries[stem]
        expected = explain(io.read_image(entry.image), io.read_labels(entry.labels))
        row = by_stem[stem]
        assert (row.category, row.max_area, row.area_source, row.branch) == (
            entry.category,
            expected.max_area,
            "labels",
            expected.branch,
        )
        assert (row.mean_s, row.mean_v) == (expected.saturation, expected.value)
    assert by_stem["synth_c3_0000"].category == 2  # the fake segmenter's cell is large
    assert by_stem["synth_c3_0000"].area_source == "pseudo"
    assert by_stem["synth_c3_0000"].max_area == 8001
    assert result.counts() == {0: 1, 1: 1, 2: 2, 3: 0}

    fields, rows = read_csv(out)
    assert fields == CSV_FIELDS
    assert [r["stem"] for r in rows] == sorted(entries)
    for row, written in zip(result.rows, rows, strict=True):
        assert written["category"] == str(row.category)
        assert written["category_name"] == CATEGORY_NAMES[row.category]
        assert float(written["mean_s"]) == pytest.approx(row.mean_s, abs=1e-6)
        assert float(written["mean_v"]) == pytest.approx(row.mean_v, abs=1e-6)
        assert written["channels"] == str(row.channels)
        assert written["max_area"] == ("" if row.max_area is None else str(row.max_area))
        assert (written["area_source"], written["branch"]) == (row.area_source, row.branch)
    assert [p.name for p in out.parent.iterdir()] == ["categories.csv"]  # no temporary left


def test_folder_default_segmenter_is_the_classical_one(folder):
    root, entries = folder
    result = categorize.categorize_folder(root, progress=False)
    row = next(r for r in result.rows if r.stem == "synth_c3_0000")
    assert (row.category, row.area_source) == (3, "pseudo")
    assert 0 < row.max_area <= 8000
    assert [r.category for r in result.rows] == [0, 1, 2, 3]
    assert result.csv_path is None


def test_folder_presets_and_thresholds(folder):
    root, _ = folder
    segmenter = FakeSegmenter(no_cells((160, 160)))
    code = categorize.categorize_folder(root, preset="code", segmenter=segmenter, progress=False)
    assert [r.category for r in code.rows] == [0, 1, 3, 3]  # class 2's largest cell < 30000 px
    mixed = categorize.categorize_folder(
        root, preset="code", max_area=8000, segmenter=segmenter, progress=False
    )
    assert [r.category for r in mixed.rows] == [0, 1, 2, 3]
    loose = categorize.categorize_folder(
        root, value_range=(0.0, 1.0), saturation=0.5, segmenter=segmenter, progress=False
    )
    # S of the class 2 image is 0.17 (pale stains), of the class 3 image 0.53 (H&E)
    assert [r.category for r in loose.rows] == [0, 1, 1, 3]


def test_folder_skips_bad_files_and_reports_them(folder, tmp_path):
    root, entries = folder
    broken = root / "images" / "broken.png"
    broken.write_bytes(entries["synth_c1_0000"].image.read_bytes()[:100])
    out = tmp_path / "categories.csv"
    with pytest.warns(UserWarning, match="1 of 5 images could not be categorised.*broken.png"):
        result = categorize.categorize_folder(
            root, out, segmenter=FakeSegmenter(no_cells((160, 160))), progress=False
        )
    assert [stem for stem, _ in result.errors] == ["broken"]
    assert str(broken) in result.errors[0][1] and "cannot be read" in result.errors[0][1]
    assert len(result.rows) == 4
    assert [r["stem"] for r in read_csv(out)[1]] == sorted(entries)

    with pytest.raises(CellSegError, match=r"broken\.png.*cannot be read as a PNG"):
        categorize.categorize_folder(root, out, strict=True, progress=False)


def test_folder_warning_lists_five_stems_then_dots(folder):
    root, _ = folder
    for name in "abcdef":
        (root / "images" / f"{name}.png").write_bytes(b"not a png")
    with pytest.warns(
        UserWarning, match=r"6 of 10 images .*: a, b, c, d, e, \.\.\.; the first: '.*a\.png'"
    ):
        result = categorize.categorize_folder(root, progress=False)
    assert [stem for stem, _ in result.errors] == list("abcdef")


def test_folder_names_the_image_when_the_segmenter_output_is_bad(folder):
    root, entries = folder
    bad = FakeSegmenter(no_cells((10, 10)))
    with pytest.warns(UserWarning, match="1 of 4 images"):
        result = categorize.categorize_folder(root, segmenter=bad, progress=False)
    ((stem, message),) = result.errors
    assert stem == "synth_c3_0000"
    assert message.startswith(f"'{entries[stem].image}': image and segmenter output: image size")
    with pytest.raises(CellSegError, match="synth_c3_0000.png': image and segmenter output"):
        categorize.categorize_folder(root, segmenter=bad, strict=True, progress=False)


def test_folder_labels_of_another_size_name_the_label_file(folder):
    from cellseg_lite import io

    root, entries = folder
    label_path = entries["synth_c1_0000"].labels
    io.write_labels(label_path, no_cells((20, 20)))
    with pytest.raises(CellSegError, match=r"synth_c1_0000_label\.tiff': image size \(160, 160\)"):
        categorize.categorize_folder(root, strict=True, progress=False)


def test_folder_progress_bar(folder, capsys):
    root, _ = folder
    categorize.categorize_folder(root, segmenter=FakeSegmenter(no_cells((160, 160))))
    assert "categorising" in capsys.readouterr().err


@pytest.mark.parametrize(
    "keywords, message",
    [
        ({"preset": "fast"}, "preset: expected one of paper, code, got 'fast'"),
        ({"max_area": -1}, "max_area: must be a finite number"),
        ({"value_range": (0.9, 0.1)}, "value_range: need 0 <= low <= high <= 1"),
        ({"saturation": 2}, r"saturation: must lie in \[0, 1\]"),
        ({"segmenter": 42}, "segmenter: expected a callable"),
    ],
)
def test_folder_bad_settings(folder, keywords, message):
    root, _ = folder
    with pytest.raises(CellSegError, match=message):
        categorize.categorize_folder(root, progress=False, **keywords)


def test_folder_bad_paths(folder, tmp_path):
    root, _ = folder
    with pytest.raises(CellSegError, match="is a folder; csv_path must name a file"):
        categorize.categorize_folder(root, tmp_path, progress=False)
    with pytest.raises(CellSegError, match="data folder not found"):
        categorize.categorize_folder(tmp_path / "missing", progress=False)
    with pytest.raises(CellSegError, match="no images/ folder"):
        categorize.categorize_folder(tmp_path, progress=False)
