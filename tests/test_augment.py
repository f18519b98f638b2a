"""cellseg_lite.augment: each step, the whole transform, its randomness, its checks, PatchDataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from cellseg_lite import CellSegError, datasets, synthetic
from cellseg_lite import augment as aug

ALWAYS = dict.fromkeys(aug.STEPS, 1.0)


def only(step: str, **settings) -> aug.Augment:
    """An Augment in which ``step`` always fires and nothing else does."""
    return aug.Augment(**{**dict.fromkeys(aug.STEPS, 0.0), step: 1.0, **settings})


@pytest.fixture(scope="module")
def patch() -> tuple[np.ndarray, np.ndarray]:
    image, labels = synthetic.make_image(3, size=(64, 64), seed=5)
    return image, labels


def _square(size=64, side=16, value=7):
    """A centred ``side`` square of id ``value`` (and a bright image of it) in a ``size`` patch."""
    labels = np.zeros((size, size), np.int32)
    start = (size - side) // 2
    labels[start : start + side, start : start + side] = value
    image = np.repeat((labels > 0)[..., None] * np.float32(0.8), 3, axis=2) + np.float32(0.1)
    return image.astype(np.float32), labels


def _side(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(mask)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def _centre(mask: np.ndarray) -> np.ndarray:
    return np.mean(np.nonzero(mask), axis=1)


# --------------------------------------------------------------------------------------
# The transform as a whole
# --------------------------------------------------------------------------------------


def test_same_seed_same_output_different_seeds_differ(patch):
    image, labels = patch
    for transform in (aug.PAPER, aug.Augment(**ALWAYS)):
        first = transform(image, labels, rng=np.random.default_rng(11))
        again = transform(image, labels, rng=np.random.default_rng(11))
        np.testing.assert_array_equal(first[0], again[0])
        np.testing.assert_array_equal(first[1], again[1])
    always = aug.Augment(**ALWAYS)
    one = always(image, labels, rng=np.random.default_rng(1))[0]
    two = always(image, labels, rng=np.random.default_rng(2))[0]
    assert not np.array_equal(one, two)


def test_explain_matches_call_and_records_every_step(patch):
    image, labels = patch
    result = aug.Augment(**ALWAYS).explain(image, labels, rng=np.random.default_rng(4))
    called = aug.Augment(**ALWAYS)(image, labels, rng=np.random.default_rng(4))
    np.testing.assert_array_equal(result.image, called[0])
    np.testing.assert_array_equal(result.labels, called[1])
    assert [s.name for s in result.steps] == list(aug.STEPS)
    assert result.fired == aug.STEPS
    params = {s.name: s.params for s in result.steps}
    assert params["flip"]["axis"] in (0, 1)
    assert params["rotate90"]["k"] in (1, 2, 3)
    assert params["noise"]["std"] == pytest.approx(0.1)
    assert 1 <= params["contrast"]["gamma"] <= 2
    assert all(1 <= s <= 2 for s in params["smooth"]["sigma"])
    assert params["histogram_shift"]["control_points"] == 3
    assert 0.5 <= params["zoom"]["factor"] <= 2
    nothing = aug.none().explain(image, labels, rng=np.random.default_rng(4))
    assert nothing.fired == () and all(s.params == {} for s in nothing.steps)


def test_output_types_range_and_size(patch):
    image, labels = patch
    for seed in range(5):
        out_image, out_labels = aug.Augment(**ALWAYS)(
            image, labels, rng=np.random.default_rng(seed)
        )
        assert out_image.dtype == np.float32 and out_image.shape == image.shape
        assert out_image.flags.c_contiguous and out_labels.flags.c_contiguous
        assert 0.0 <= out_image.min() and out_image.max() <= 1.0
        assert out_labels.dtype == np.int32 and out_labels.shape == labels.shape


def test_none_is_identity_apart_from_scaling(patch):
    image, labels = patch
    out_image, out_labels = aug.none()(image, labels, rng=np.random.default_rng(0))
    np.testing.assert_allclose(out_image, image / 255.0, atol=1e-7)
    np.testing.assert_array_equal(out_labels, labels)
    assert out_labels is not labels


def test_uint8_and_float_input_agree(patch):
    image, labels = patch
    from_uint8 = aug.Augment(**ALWAYS)(image, labels, rng=np.random.default_rng(3))
    from_float = aug.Augment(**ALWAYS)(
        image / np.float32(255), labels, rng=np.random.default_rng(3)
    )
    np.testing.assert_allclose(from_uint8[0], from_float[0], atol=1e-6)
    np.testing.assert_array_equal(from_uint8[1], from_float[1])


def test_paper_settings():
    assert aug.PAPER == aug.Augment()
    assert aug.PAPER.probabilities == {
        "flip": 0.5,
        "rotate90": 0.5,
        "noise": 0.25,
        "contrast": 0.25,
        "smooth": 0.25,
        "histogram_shift": 0.25,
        "zoom": 0.15,
    }
    assert (aug.PAPER.noise_std, aug.PAPER.gamma, aug.PAPER.sigma) == (0.1, (1, 2), (1, 2))
    assert (aug.PAPER.control_points, aug.PAPER.zoom_range) == (3, (0.5, 2.0))
    assert set(aug.none().probabilities.values()) == {0.0}


def test_firing_frequencies_follow_the_probabilities():
    image, labels = synthetic.make_image(1, size=(64, 64), seed=2)
    image, labels = image[:16, :16], labels[:16, :16]
    rng = np.random.default_rng(2024)
    draws = 400
    counts = dict.fromkeys(aug.STEPS, 0)
    axes, turns = set(), set()
    for _ in range(draws):
        result = aug.PAPER.explain(image, labels, rng=rng)
        for step in result.steps:
            counts[step.name] += step.fired
        params = {s.name: s.params for s in result.steps}
        axes.add(params["flip"].get("axis"))
        turns.add(params["rotate90"].get("k"))
    for name, probability in aug.PAPER.probabilities.items():
        # binomial std at p = 0.5 and 400 draws is 0.025; 0.08 is more than 3 of them
        assert abs(counts[name] / draws - probability) < 0.08, (name, counts[name])
    assert axes == {None, 0, 1} and turns == {None, 1, 2, 3}


def test_labels_keep_their_ids_through_every_step():
    base = synthetic.voronoi_labels((64, 64), 25, seed=3)
    # ids far above 65535 and above 2**24, where float32 stops holding every integer
    big = np.where(base > 0, base + 20_000_000, 0).astype(np.int32)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ids = set(np.unique(big))
    for seed in range(12):
        result = aug.Augment(**ALWAYS).explain(image, big, rng=np.random.default_rng(seed))
        assert result.labels.dtype == np.int32
        assert set(np.unique(result.labels)) <= ids, seed


def test_empty_and_constant_patches():
    labels = np.zeros((32, 32), np.int32)
    for image in (np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)):
        for seed in range(4):
            out_image, out_labels = aug.Augment(**ALWAYS)(
                image, labels, rng=np.random.default_rng(seed)
            )
            assert out_image.shape == (32, 32, 3) and out_image.dtype == np.float32
            assert 0 <= out_image.min() and out_image.max() <= 1
            assert not out_labels.any()


def test_inputs_are_not_modified_and_may_be_read_only_views(patch):
    image, labels = patch
    image_ro, labels_view = image.copy(), np.flip(labels)  # negative strides
    image_ro.flags.writeable = False
    before = image_ro.copy(), labels_view.copy()
    out = aug.Augment(**ALWAYS)(image_ro, labels_view, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(image_ro, before[0])
    np.testing.assert_array_equal(labels_view, before[1])
    assert out[0].flags.writeable and out[1].flags.writeable


# --------------------------------------------------------------------------------------
# Each step with explicit parameters
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1])
def test_flip_is_np_flip(patch, axis):
    image, labels = patch
    out_image, out_labels = aug.flip(image, labels, axis)
    np.testing.assert_allclose(out_image, np.flip(image, axis) / 255.0, atol=1e-7)
    np.testing.assert_array_equal(out_labels, np.flip(labels, axis))


@pytest.mark.parametrize("k", [-1, 0, 1, 2, 3, 5])
def test_rotate90_is_np_rot90(patch, k):
    image, labels = patch
    out_image, out_labels = aug.rotate90(image, labels, k)
    np.testing.assert_allclose(out_image, np.rot90(image, k) / 255.0, atol=1e-7)
    np.testing.assert_array_equal(out_labels, np.rot90(labels, k))


def test_rotate90_of_a_non_square_image():
    image, labels = np.zeros((4, 6, 3), np.uint8), np.arange(24, dtype=np.int32).reshape(4, 6)
    out_image, out_labels = aug.rotate90(image, labels, 1)
    assert out_image.shape == (6, 4, 3)
    np.testing.assert_array_equal(out_labels, np.rot90(labels))


def test_zoom_in_doubles_a_centred_square():
    image, labels = _square(64, 16)
    out_image, out_labels = aug.zoom(image, labels, 2.0)
    assert out_image.shape == image.shape and out_labels.shape == labels.shape
    rows, cols = _side(out_labels == 7)
    assert abs(rows - 32) <= 1 and abs(cols - 32) <= 1
    assert np.abs(_centre(out_labels == 7) - _centre(labels == 7)).max() <= 1
    rows, cols = _side(out_image[..., 0] > 0.5)
    assert abs(rows - 32) <= 1 and abs(cols - 32) <= 1
    # nearest neighbour, exactly: every source pixel becomes a 2 x 2 block
    np.testing.assert_array_equal(
        out_labels, np.kron(labels, np.ones((2, 2), np.int32))[32:96, 32:96]
    )


def test_zoom_out_halves_and_pads_with_zeros():
    image, labels = _square(64, 16)
    out_image, out_labels = aug.zoom(image, labels, 0.5)
    rows, cols = _side(out_labels == 7)
    assert abs(rows - 8) <= 1 and abs(cols - 8) <= 1
    assert np.abs(_centre(out_labels == 7) - _centre(labels == 7)).max() <= 1
    # the shrunken image covers the central 32 x 32; around it, zeros (image) and background
    assert not out_image[:16].any() and not out_image[48:].any()
    assert not out_image[:, :16].any() and not out_image[:, 48:].any()
    assert out_image[16:48, 16:48].min() > 0.05
    assert set(np.unique(out_labels)) == {0, 7}


def test_zoom_keeps_ids_of_cut_cells():
    # a C-shaped cell that the zoom-in crop cuts into two pieces keeps its one id
    labels = np.zeros((40, 40), np.int32)
    labels[12:28, 2:6] = 5  # the back of the C, outside the central 25 x 25 kept at zoom 1.6
    labels[12:16, 2:30] = 5
    labels[24:28, 2:30] = 5
    labels[18:22, 18:22] = 9
    image = np.zeros((40, 40, 3), np.float32)
    _, out_labels = aug.zoom(image, labels, 1.6)
    assert set(np.unique(out_labels)) == {0, 5, 9}
    assert ndimage.label(out_labels == 5)[1] == 2  # two pieces, one id


def test_zoom_by_one_changes_nothing(patch):
    image, labels = patch
    out_image, out_labels = aug.zoom(image, labels, 1.0)
    np.testing.assert_allclose(out_image, image / 255.0, atol=1e-7)
    np.testing.assert_array_equal(out_labels, labels)


def test_zoom_keeps_large_ids_exactly():
    labels = (np.arange(64, dtype=np.int64).reshape(8, 8) + 2**31 - 100).astype(np.int32)
    _, out_labels = aug.zoom(np.zeros((8, 8, 3), np.float32), labels, 2.0)
    np.testing.assert_array_equal(
        out_labels, np.kron(labels, np.ones((2, 2), np.int32))[4:12, 4:12]
    )


def test_gaussian_noise_has_the_given_std():
    image = np.full((128, 128, 3), 0.5, np.float32)
    noisy = aug.gaussian_noise(image, 0.1, np.random.default_rng(0))
    assert noisy.dtype == np.float32
    assert abs((noisy - image).std() - 0.1) < 0.005
    assert abs((noisy - image).mean()) < 0.005
    np.testing.assert_array_equal(aug.gaussian_noise(image, 0.0, np.random.default_rng(0)), image)


def test_adjust_contrast(patch):
    image = patch[0] / np.float32(255)
    np.testing.assert_allclose(aug.adjust_contrast(image, 1.0), image, atol=1e-6)
    darker = aug.adjust_contrast(image, 2.0)
    assert darker.dtype == np.float32
    assert darker.min() == pytest.approx(image.min()) and darker.max() == pytest.approx(image.max())
    assert darker.mean() < image.mean()
    low, high = image.min(), image.max()
    expected = ((image - low) / (high - low)) ** 2 * (high - low) + low  # MONAI's formula
    np.testing.assert_allclose(darker, expected, atol=1e-6)
    constant = np.full((8, 8, 3), 0.3, np.float32)
    np.testing.assert_array_equal(aug.adjust_contrast(constant, 2.0), constant)


def test_gaussian_smooth_lowers_variance():
    image = np.random.default_rng(0).random((64, 64, 3), dtype=np.float32)
    for sigma in (1.0, 2.0, (1.0, 2.0)):
        smooth = aug.gaussian_smooth(image, sigma)
        assert smooth.dtype == np.float32 and smooth.shape == image.shape
        assert smooth.var() < 0.5 * image.var()
        assert smooth.mean() == pytest.approx(image.mean(), abs=0.01)
    # channels are blurred separately: a one-channel impulse stays in its channel
    impulse = np.zeros((33, 33, 3), np.float32)
    impulse[16, 16, 1] = 1
    blurred = aug.gaussian_smooth(impulse, (1.0, 2.0))
    assert not blurred[..., 0].any() and not blurred[..., 2].any()
    assert blurred[..., 1].sum() == pytest.approx(1.0, abs=1e-4)
    assert blurred[16, 18, 1] > blurred[18, 16, 1]  # wider along the columns


def test_histogram_shift_is_monotone_and_keeps_the_range(patch):
    image = patch[0] / np.float32(255)
    for seed in range(5):
        shifted = aug.histogram_shift(image, 3, np.random.default_rng(seed))
        assert shifted.dtype == np.float32
        assert shifted.min() == pytest.approx(image.min()) and shifted.max() == pytest.approx(
            image.max()
        )
        for channel in range(3):
            order = np.argsort(image[..., channel], axis=None, kind="stable")
            assert np.all(np.diff(shifted[..., channel].ravel()[order]) >= -1e-6)
    assert not np.allclose(aug.histogram_shift(image, 3, np.random.default_rng(0)), image)
    curve = aug.histogram_shift(image, (3, 10), np.random.default_rng(1))
    assert curve.shape == image.shape
    constant = np.full((8, 8, 3), 0.3, np.float32)
    np.testing.assert_array_equal(
        aug.histogram_shift(constant, 3, np.random.default_rng(0)), constant
    )


def test_recorded_parameters_reproduce_the_step(patch):
    image, labels = patch
    for step, function in [
        ("flip", lambda i, lab, p: aug.flip(i, lab, p["axis"])),
        ("rotate90", lambda i, lab, p: aug.rotate90(i, lab, p["k"])),
        ("contrast", lambda i, lab, p: (aug.adjust_contrast(i, p["gamma"]), lab)),
        ("smooth", lambda i, lab, p: (aug.gaussian_smooth(i, p["sigma"]), lab)),
        ("zoom", lambda i, lab, p: aug.zoom(i, lab, p["factor"])),
    ]:
        result = only(step).explain(image, labels, rng=np.random.default_rng(8))
        params = {s.name: s.params for s in result.steps}[step]
        expected_image, expected_labels = function(image, labels, params)
        np.testing.assert_allclose(result.image, np.clip(expected_image, 0, 1), atol=1e-6)
        np.testing.assert_array_equal(result.labels, expected_labels)


def test_random_crop_is_the_dataset_crop(patch):
    image, labels = patch
    ours = aug.random_crop(image, labels, 32, np.random.default_rng(6))
    theirs = datasets.sample_patch(image, labels, 32, np.random.default_rng(6))
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_array_equal(ours[1], theirs[1])


# --------------------------------------------------------------------------------------
# Inside PatchDataset and a DataLoader
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment_data")
    synthetic.make_dataset(root, 1, size=(64, 64), seed=1, categories=(0, 1, 3))
    return datasets.find_pairs(root)


def _batches(dataset, num_workers):
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=3, num_workers=num_workers, shuffle=False
    )
    return list(loader)


def test_patch_dataset_with_augment(tiny_dataset):
    transform = aug.Augment(**dict.fromkeys(aug.STEPS, 0.6))
    data = datasets.PatchDataset(tiny_dataset, 48, patches_per_image=2, seed=3, transform=transform)
    plain = datasets.PatchDataset(tiny_dataset, 48, patches_per_image=2, seed=3)
    item = data[0]
    assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    for i in range(len(data)):
        labels = data[i]["labels"].numpy()
        ids = np.unique(labels[labels > 0])
        np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))  # relabelled 1..n
    assert any(not torch.equal(data[i]["image"], plain[i]["image"]) for i in range(len(data)))
    # the dataset passes its per-item generator: the same item twice is the same patch
    assert torch.equal(data[1]["image"], data[1]["image"])

    serial = _batches(data, num_workers=0)
    parallel = _batches(data, num_workers=1)
    assert len(serial) == len(parallel) == 2
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"])
        assert a["stem"] == b["stem"]


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"flip": 1.5}, r"flip: expected a probability in \[0, 1\]"),
        ({"zoom": -0.1}, r"zoom: expected a probability"),
        ({"noise": True}, r"noise: expected a probability"),
        ({"contrast": "0.5"}, r"contrast: expected a probability"),
        ({"noise_std": -0.1}, r"noise_std: expected a finite number >= 0"),
        ({"noise_std": float("nan")}, r"noise_std: expected a finite number"),
        ({"gamma": (2.0, 1.0)}, r"gamma: expected 0 < low <= high"),
        ({"sigma": (0.0, 1.0)}, r"sigma: expected 0 < low <= high"),
        ({"zoom_range": 2.0}, r"zoom_range: expected a range \(low, high\)"),
        ({"zoom_range": (1, 2, 3)}, r"zoom_range: expected a range"),
        ({"gamma": ("a", 2)}, r"gamma: expected two finite numbers"),
        ({"sigma": (1.0, float("inf"))}, r"sigma: expected two finite numbers"),
        ({"control_points": 2}, r"control_points: expected at least 3"),
        ({"control_points": (5, 4)}, r"control_points: expected at least 3 .* low <= high"),
        ({"control_points": (3, 4.5)}, r"control_points: expected integers"),
        ({"control_points": 3.5}, r"control_points: expected an integer >= 3 or a range"),
    ],
)
def test_bad_settings(settings, match):
    with pytest.raises(CellSegError, match=match):
        aug.Augment(**settings)


def test_control_points_range_is_kept():
    assert aug.Augment(control_points=(3, 10)).control_points == (3, 10)
    assert aug.Augment(control_points=(4, 4)).control_points == 4


@pytest.mark.parametrize(
    ("image", "labels", "match"),
    [
        ([[0]], np.zeros((8, 8), np.int32), r"image: expected a numpy array"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.int32), r"square RGB patch \(P, P, 3\)"),
        (np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8), np.int32), r"square RGB patch"),
        (np.zeros((8, 6, 3), np.uint8), np.zeros((8, 6), np.int32), r"square RGB patch"),
        (np.zeros((8, 8, 3), np.int16), np.zeros((8, 8), np.int32), r"expected uint8 or float"),
        (np.full((8, 8, 3), 1.5), np.zeros((8, 8), np.int32), r"must lie in \[0, 1\]"),
        (np.full((8, 8, 3), np.nan), np.zeros((8, 8), np.int32), r"NaN or infinite"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 7), np.int32), r"differ"),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 0.5), r"labels must be integers"),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 8), -1), r"labels must be >= 0"),
    ],
)
def test_bad_patches(image, labels, match):
    with pytest.raises(CellSegError, match=match):
        aug.PAPER(image, labels, rng=np.random.default_rng(0))


@pytest.mark.parametrize("rng", [0, None, np.random.RandomState(0)])
def test_rng_must_be_a_generator(patch, rng):
    with pytest.raises(CellSegError, match=r"rng: expected a np.random.Generator"):
        aug.PAPER(*patch, rng=rng)
    with pytest.raises(CellSegError, match=r"rng: expected a np.random.Generator"):
        aug.gaussian_noise(patch[0], 0.1, rng)
    with pytest.raises(CellSegError, match=r"rng: expected a np.random.Generator"):
        aug.histogram_shift(patch[0], 3, rng)
    with pytest.raises(CellSegError, match=r"rng: expected a np.random.Generator"):
        aug.random_crop(*patch, 32, rng)


def test_bad_step_parameters(patch):
    image, labels = patch
    rng = np.random.default_rng(0)
    cases = [
        (lambda: aug.flip(image, labels, 2), r"axis: expected 0 \(rows\) or 1"),
        (lambda: aug.flip(image, labels, True), r"axis: expected 0"),
        (lambda: aug.rotate90(image, labels, 1.5), r"k: expected an integer"),
        (lambda: aug.gaussian_noise(image, -1, rng), r"std: expected a finite number >= 0"),
        (lambda: aug.adjust_contrast(image, 0), r"gamma: expected a finite number > 0"),
        (lambda: aug.gaussian_smooth(image, -1.0), r"sigma: expected a finite number > 0"),
        (
            lambda: aug.gaussian_smooth(image, (1, 2, 3)),
            r"sigma: expected a number or \(sigma_rows",
        ),
        (lambda: aug.histogram_shift(image, 2, rng), r"control_points: expected at least 3"),
        (lambda: aug.zoom(image, labels, 0), r"factor: expected a finite number > 0"),
        (lambda: aug.zoom(image, labels[:10], 2), r"differ"),
        (lambda: aug.flip(image[..., 0], labels, 0), r"expected a channel-last image \(H, W, C\)"),
        (lambda: aug.adjust_contrast(image.tolist(), 2), r"image: expected a numpy array"),
        (lambda: aug.gaussian_smooth(image.astype(bool), 1.0), r"expected uint8 or float"),
        (lambda: aug.gaussian_noise(np.full((4, 4, 3), np.inf), 0.1, rng), r"NaN or infinite"),
    ]
    for call, match in cases:
        with pytest.raises(CellSegError, match=match):
            call()
