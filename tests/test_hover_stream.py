"""HoVer stream: targets, Sobel orientation, loss, network shapes, watershed presets, round trips."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from cellseg_lite import CellSegError, io, metrics, synthetic
from cellseg_lite._weights import PretrainedWeightsWarning
from cellseg_lite.streams import hover

# --------------------------------------------------------------------------- helpers


def _reference_targets(labels: np.ndarray, min_size: int = 0) -> np.ndarray:
    """hover_net's per-cell loop (without its 1-based offset), written plainly for comparison."""
    hv = np.zeros((2, *labels.shape), np.float32)
    for cell in np.unique(labels[labels > 0]):
        mask = labels == cell
        if mask.sum() < max(min_size, 1):
            continue
        cy, cx = ndi.center_of_mass(mask)
        cy, cx = int(cy + 0.5), int(cx + 0.5)
        rows, cols = np.nonzero(mask)
        for channel, offset in enumerate((cols - cx, rows - cy)):
            value = offset.astype(np.float32)
            if (value < 0).any():
                value[value < 0] /= -value[value < 0].min()
            if (value > 0).any():
                value[value > 0] /= value[value > 0].max()
            hv[channel, rows, cols] = value
    return hv


def _touching_small_nuclei(
    shape=(96, 96), radius: float = 3.2, spacing: int = 6, seed: int = 0
) -> np.ndarray:
    """A dense field of small touching nuclei: Voronoi cells of a jittered grid, clipped to discs."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[spacing // 2 : shape[0] : spacing, spacing // 2 : shape[1] : spacing]
    seeds = np.zeros(shape, np.int32)
    jitter = rng.integers(-1, 2, size=(2, ys.size))
    yy = np.clip(ys.ravel() + jitter[0], 0, shape[0] - 1)
    xx = np.clip(xs.ravel() + jitter[1], 0, shape[1] - 1)
    seeds[yy, xx] = np.arange(1, ys.size + 1)
    dist, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    labels = np.where(dist <= radius, seeds[iy, ix], 0).astype(np.int32)
    return labels


def _f1(labels, pred) -> float:
    return metrics.f1_score(labels, pred, drop_boundary=False)


@functools.cache
def _net() -> hover.ConvNeXtHover:
    torch.manual_seed(0)
    return hover.ConvNeXtHover("convnext_atto").eval()


# --------------------------------------------------------------------------- targets


def test_targets_literal_example():
    labels = np.zeros((6, 8), np.int32)
    labels[1:5, 1:5] = 1  # columns 1..4: centre 2.5 rounds to 3 (int(x + 0.5))
    fg, hv = hover.targets(labels)
    assert fg.dtype == np.float32 and hv.dtype == np.float32
    np.testing.assert_array_equal(fg, labels > 0)
    np.testing.assert_allclose(hv[0, 2], [0, -1, -0.5, 0, 1, 0, 0, 0])
    np.testing.assert_allclose(hv[1, :, 2], [0, -1, -0.5, 0, 1, 0])


def test_targets_sign_convention_and_range(rng):
    _, labels = synthetic.make_image(3, size=(128, 128), seed=2)
    fg, hv = hover.targets(labels)
    assert hv.shape == (2, 128, 128)
    assert hv.min() >= -1 and hv.max() <= 1
    assert np.all(hv[:, labels == 0] == 0)
    np.testing.assert_array_equal(fg, (labels > 0).astype(np.float32))
    rows, cols = np.nonzero(labels)
    ids = labels[rows, cols]
    counts = np.bincount(ids)
    cx = np.floor(np.bincount(ids, cols) / np.maximum(counts, 1) + 0.5)[ids]
    cy = np.floor(np.bincount(ids, rows) / np.maximum(counts, 1) + 0.5)[ids]
    # left of the centre negative on channel 0, above it negative on channel 1 (rows grow down)
    assert np.all(hv[0, rows, cols][cols < cx] < 0) and np.all(hv[0, rows, cols][cols > cx] > 0)
    assert np.all(hv[1, rows, cols][rows < cy] < 0) and np.all(hv[1, rows, cols][rows > cy] > 0)
    assert np.all(hv[0, rows, cols][cols == cx] == 0)
    # every cell that spans more than one column reaches -1 and +1
    for cell in range(1, labels.max() + 1):
        values = hv[0][labels == cell]
        if values.size and np.ptp(np.nonzero(labels == cell)[1]) > 1:
            assert values.min() == -1 and values.max() == 1


@pytest.mark.parametrize("category", [0, 1, 3])
def test_targets_match_a_per_cell_loop(category):
    _, labels = synthetic.make_image(category, size=(96, 96), seed=category)
    np.testing.assert_array_equal(hover.targets(labels).hv, _reference_targets(labels))


def test_targets_centre_rounding():
    # a 2 x 2 cell has its centre of mass at (1.5, 1.5) and rounds to pixel (2, 2): 0 there,
    # -1 on the pixel before; an L-shaped cell rounds 1.33 down to 1
    labels = np.zeros((5, 5), np.int32)
    labels[1:3, 1:3] = 1
    hv = hover.targets(labels).hv
    np.testing.assert_array_equal(hv[0, 1:3, 1:3], [[-1, 0], [-1, 0]])
    np.testing.assert_array_equal(hv[1, 1:3, 1:3], [[-1, -1], [0, 0]])
    labels = np.zeros((5, 5), np.int32)
    labels[1, 1:3] = labels[2, 1] = 1  # columns 1, 2, 1: mean 1.33 -> 1
    hv = hover.targets(labels).hv
    assert hv[0, 1, 1] == 0 and hv[0, 1, 2] == 1


def test_targets_min_size_zeroes_small_cells_but_keeps_their_foreground():
    labels = np.zeros((20, 20), np.int32)
    labels[2:4, 2:4] = 1  # 4 px
    labels[8:16, 8:16] = 2  # 64 px
    fg, hv = hover.targets(labels, min_size=30)
    assert np.all(fg[labels > 0] == 1)
    assert np.all(hv[:, labels == 1] == 0)
    assert np.abs(hv[:, labels == 2]).max() == 1
    np.testing.assert_array_equal(hv, _reference_targets(labels, min_size=30))
    assert np.abs(hover.targets(labels).hv[:, labels == 1]).max() == 1  # default keeps all


def test_targets_of_empty_labels_and_sparse_ids():
    fg, hv = hover.targets(np.zeros((16, 24), np.uint16))
    assert fg.shape == (16, 24) and hv.shape == (2, 16, 24)
    assert not fg.any() and not hv.any()
    labels = np.zeros((16, 16), np.int64)
    labels[2:6, 2:9], labels[9:14, 4:12] = 7, 2_000_000_000
    dense = np.where(labels == 7, 1, np.where(labels > 0, 2, 0))
    np.testing.assert_array_equal(hover.targets(labels).hv, hover.targets(dense).hv)


def test_targets_input_errors():
    with pytest.raises(CellSegError, match="labels must be a 2-D"):
        hover.targets(np.zeros((4, 4, 3), np.int32))
    with pytest.raises(CellSegError, match="labels must be >= 0"):
        hover.targets(-np.ones((4, 4), np.int32))
    with pytest.raises(CellSegError, match="min_size: expected an integer >= 0"):
        hover.targets(np.zeros((4, 4), np.int32), min_size=-1)
    with pytest.raises(CellSegError, match="min_size"):
        hover.targets(np.zeros((4, 4), np.int32), min_size=2.5)


# --------------------------------------------------------------------------- Sobel orientation


def test_sobel_kernels_are_opencvs_up_to_scale():
    smooth, derivative = hover.sobel_kernels(3)
    np.testing.assert_allclose(smooth, [0.25, 0.5, 0.25])
    np.testing.assert_allclose(derivative, [-0.5, 0, 0.5])
    smooth, derivative = hover.sobel_kernels(5)
    np.testing.assert_allclose(smooth * 16, [1, 4, 6, 4, 1])
    np.testing.assert_allclose(derivative * 8, [-1, -2, 0, 2, 1])  # cv2: [-1, -2, 0, 2, 1]
    for ksize in (3, 7, 21):
        smooth, derivative = hover.sobel_kernels(ksize)
        ramp = np.arange(ksize) - ksize // 2
        assert smooth.sum() == pytest.approx(1) and derivative @ ramp == pytest.approx(1)
    for bad in (4, 1, 33, 3.0, True):
        with pytest.raises(CellSegError, match="ksize: expected an odd integer"):
            hover.sobel_kernels(bad)


def _ramps(size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    axis = torch.arange(size, dtype=torch.float32)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y  # x grows along columns (horizontal ramp), y along rows (vertical ramp)


def test_hv_gradients_differentiate_each_map_along_its_own_axis():
    x, y = _ramps()
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    grad = hover.hv_gradients(torch.stack([x, y])[None])  # the ideal HV field: both slopes 1
    torch.testing.assert_close(grad[inner], torch.ones_like(grad[inner]))
    grad = hover.hv_gradients(torch.stack([y, x])[None])  # swapped: neither map changes along it
    torch.testing.assert_close(grad[inner], torch.zeros_like(grad[inner]))
    with pytest.raises(CellSegError, match=r"hv: expected a \(B, 2, H, W\) tensor"):
        hover.hv_gradients(torch.zeros(1, 3, 8, 8))


def test_msge_is_blind_to_changes_across_the_axis_and_the_swapped_orientation_is_not():
    # the prediction differs from the target by a function of y on the horizontal map and of x
    # on the vertical map: the right gradients (x of horizontal, y of vertical) cannot see it
    x, y = _ramps(32)
    true = torch.stack([x / 31, y / 31])[None]
    pred = true + torch.stack([torch.sin(y / 3), torch.cos(x / 4)])[None]
    fg = torch.ones(1, 32, 32)
    cp = torch.zeros(1, 2, 32, 32)
    terms = hover.loss_terms(cp, pred, fg, true)
    assert terms.mse > 0.1
    assert terms.msge == pytest.approx(0, abs=1e-10)
    # hover_net's PyTorch port differentiates along the other axis, which is the same as
    # transposing the images: that loss is far from zero on the same pair
    swapped = hover.loss_terms(cp, pred.transpose(-1, -2), fg, true.transpose(-1, -2))
    assert swapped.msge > 0.01


# --------------------------------------------------------------------------- loss


def test_loss_is_the_sum_of_its_terms_and_zero_for_perfect_hv():
    _, labels = synthetic.make_image(0, size=(64, 64), seed=1)
    fg, hv = hover.targets(labels)
    fg_t, hv_t = torch.as_tensor(fg)[None], torch.as_tensor(hv)[None]
    cp = torch.stack([1 - fg_t, fg_t], 1) * 40.0 - 20.0  # confident and right
    terms = hover.loss_terms(cp, hv_t.clone(), fg_t, hv_t)
    assert terms.mse == 0 and terms.msge == 0
    assert terms.ce < 1e-6 and terms.dice < 1e-6
    total = hover.loss(cp, hv_t + 0.1, fg[None], hv[None])  # numpy targets are accepted too
    parts = hover.loss_terms(cp, hv_t + 0.1, fg[None], hv[None])
    assert total == pytest.approx(float(sum(parts)))
    assert parts.mse == pytest.approx(0.01, rel=1e-4)


def test_loss_on_an_empty_patch_is_finite_with_finite_gradients():
    pred_cp = torch.randn(2, 2, 32, 32, requires_grad=True)
    pred_hv = torch.randn(2, 2, 32, 32, requires_grad=True)
    fg, hv = hover.targets(np.zeros((32, 32), np.int32))
    fg = np.stack([fg, fg])
    hv = np.stack([hv, hv])
    value = hover.loss(pred_cp, pred_hv, fg, hv)
    value.backward()
    assert torch.isfinite(value)
    assert hover.loss_terms(pred_cp, pred_hv, fg, hv).msge == 0
    assert torch.isfinite(pred_cp.grad).all() and torch.isfinite(pred_hv.grad).all()


@pytest.mark.slow
def test_loss_decreases_when_overfitting_one_patch():
    torch.manual_seed(0)
    image, labels = synthetic.make_image(0, size=(64, 64), seed=3)
    fg, hv = hover.targets(labels)
    x = torch.as_tensor(image.astype(np.float32) / image.max())[None, None].repeat(1, 3, 1, 1)
    net = hover.ConvNeXtHover("convnext_atto")
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-3)
    values = []
    for _ in range(6):
        cp, pred_hv = net(x)
        value = hover.loss(cp, pred_hv, fg[None], hv[None])
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
        values.append(value.item())
    assert all(np.isfinite(values))
    assert values[-1] < 0.8 * values[0]


def test_loss_input_errors():
    cp, pred_hv = torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8)
    fg, hv = np.zeros((1, 8, 8), np.float32), np.zeros((1, 2, 8, 8), np.float32)
    with pytest.raises(CellSegError, match=r"pred_cp: expected shape \(B, 2, H, W\)"):
        hover.loss(torch.zeros(1, 1, 8, 8), pred_hv, fg, hv)
    with pytest.raises(CellSegError, match="pred_hv: expected a float tensor"):
        hover.loss(cp, np.zeros((1, 2, 8, 8)), fg, hv)
    with pytest.raises(CellSegError, match="differ in shape"):
        hover.loss(cp, torch.zeros(1, 2, 8, 9), fg, hv)
    with pytest.raises(CellSegError, match="foreground: expected shape"):
        hover.loss(cp, pred_hv, np.zeros((8, 8)), hv)
    with pytest.raises(CellSegError, match="foreground: expected values 0"):
        hover.loss(cp, pred_hv, fg + 0.5, hv)
    with pytest.raises(CellSegError, match="hv: expected shape"):
        hover.loss(cp, pred_hv, fg, hv[:, :1])
    with pytest.raises(CellSegError, match="hv: contains NaN"):
        hover.loss(cp, pred_hv, fg, hv * np.nan)
    with pytest.raises(CellSegError, match="foreground: cannot be read as a tensor"):
        hover.loss(cp, pred_hv, [[1, 2], [3]], hv)
    # a (B, 1, H, W) or boolean foreground is fine
    assert torch.isfinite(hover.loss(cp, pred_hv, torch.zeros(1, 1, 8, 8, dtype=torch.bool), hv))


def test_markers_only_where_confident_split_cells_the_hv_maps_merge():
    # two touching squares whose HV maps were drawn as one cell (no jump between them), while
    # the cell probability dips to 0.7 on their shared edge: a network's usual doubt there
    labels = np.zeros((32, 48), np.int32)
    labels[6:26, 4:24], labels[6:26, 24:44] = 1, 2
    _, merged_hv = hover.targets((labels > 0).astype(np.int32))
    prob = (labels > 0).astype(np.float32)
    prob[6:26, 23:25] = 0.7
    anywhere = hover.watershed_steps(prob, merged_hv, 0.6)
    assert anywhere.labels.max() == 1 and anywhere.foreground[6:26, 23:25].all()
    confident = hover.watershed_steps(prob, merged_hv, 0.6, marker_min_prob=0.9)
    assert confident.markers.max() == 2 and confident.labels.max() == 2
    assert np.array_equal(confident.foreground, anywhere.foreground)  # only the markers change
    assert metrics.f1_score(labels, confident.labels, drop_boundary=False) == 1.0
    # 0 is the default: markers anywhere on the foreground
    assert np.array_equal(hover.instances(prob, merged_hv, marker_min_prob=0.0), anywhere.labels)


def test_core_markers_split_cells_that_the_hv_maps_merge():
    # the same two touching squares drawn as one cell by the HV maps, and a core map that
    # separates them: the markers come from the cores, the landscape and foreground as before
    labels = np.zeros((32, 48), np.int32)
    labels[6:26, 4:24], labels[6:26, 24:44] = 1, 2
    _, merged_hv = hover.targets((labels > 0).astype(np.int32))
    prob = (labels > 0).astype(np.float32)
    core = (hover.cell_cores(labels) > 0).astype(np.float32)
    plain = hover.watershed_steps(prob, merged_hv, 0.6)
    cored = hover.watershed_steps(prob, merged_hv, 0.6, core_prob=core)
    assert plain.labels.max() == 1 and cored.markers.max() == 2 and cored.labels.max() == 2
    assert np.array_equal(cored.foreground, plain.foreground)
    assert np.array_equal(cored.energy, plain.energy)
    assert metrics.f1_score(labels, cored.labels, drop_boundary=False) == 1.0
    assert np.array_equal(hover.instances(prob, merged_hv, core_prob=core), cored.labels)
    # a core probability below the threshold seeds nothing (the foreground stays one cell)
    assert hover.watershed_steps(prob, merged_hv, core_prob=core * 0.4).markers.max() == 0
    lower = hover.watershed_steps(prob, merged_hv, core_prob=core * 0.4, core_threshold=0.3)
    assert lower.markers.max() == 2
    with pytest.raises(CellSegError, match="core_prob: expected an"):
        hover.watershed_steps(prob, merged_hv, core_prob=core[:, :10])
    with pytest.raises(CellSegError, match="core_prob must not contain NaN"):
        hover.watershed_steps(prob, merged_hv, core_prob=core * np.nan)
    with pytest.raises(CellSegError, match=r"core_threshold: expected a number in \[0.0, 1.0\]"):
        hover.watershed_steps(prob, merged_hv, core_prob=core, core_threshold=2)


def test_a_network_with_cores_has_a_third_cp_class():
    torch.manual_seed(0)
    net = hover.ConvNeXtHover("convnext_atto", cores=True).eval()
    assert net.cores and not hover.ConvNeXtHover("convnext_atto").cores
    with torch.no_grad():
        cp, hv = net(torch.rand(1, 3, 64, 64))
    assert cp.shape == (1, 3, 64, 64) and hv.shape == (1, 2, 64, 64)
    prob = torch.softmax(cp, dim=1)
    torch.testing.assert_close(hover.foreground_probability(cp), prob[:, 1] + prob[:, 2])
    torch.testing.assert_close(hover.core_probability(cp), prob[:, 2])
    # a two-class map: the cell channel, as before
    two = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(hover.foreground_probability(two), torch.softmax(two, 1)[:, 1])


def test_the_loss_with_cores_takes_three_classes_and_keeps_the_hv_terms():
    labels = synthetic.make_image(3, size=(64, 64), seed=1)[1]
    fg, hv = hover.targets(labels)
    classes = hover.core_targets(labels)
    assert set(np.unique(classes)) == {0.0, 1.0, 2.0}
    torch.manual_seed(0)
    cp, pred_hv = torch.randn(1, 3, 64, 64), torch.randn(1, 2, 64, 64)
    terms = hover.loss_terms(cp, pred_hv, classes[None], hv[None])
    expected_ce = torch.nn.functional.cross_entropy(cp, torch.from_numpy(classes[None]).long())
    torch.testing.assert_close(terms.ce, expected_ce)
    # the HV terms see every cell pixel, core or not: the same as with a two-class target
    two = hover.loss_terms(cp[:, :2], pred_hv, fg[None], hv[None])
    torch.testing.assert_close(terms.mse, two.mse)
    torch.testing.assert_close(terms.msge, two.msge)
    assert torch.isfinite(terms.dice) and terms.dice > two.dice  # one class more to match
    with pytest.raises(CellSegError, match="foreground: expected values 0 .*1 .*and 2"):
        hover.loss(cp, pred_hv, classes[None] + 1, hv[None])
    with pytest.raises(CellSegError, match="foreground: expected values 0 .*and 1"):
        hover.loss(cp[:, :2], pred_hv, classes[None], hv[None])


# --------------------------------------------------------------------------- weights at the contacts


def test_contact_weights_peak_where_cells_touch_and_fall_off_with_distance():
    labels = np.zeros((24, 40), np.int32)
    labels[4:20, 4:16], labels[4:20, 16:28] = 1, 2  # touching along column 15 | 16
    labels[4:20, 31:38] = 3  # two pixels of background from cell 2: not a contact
    weights = hover.contact_weights(labels, 4.0, sigma=2.0)
    assert weights.shape == labels.shape and weights.dtype == np.float32
    np.testing.assert_allclose(weights[4:20, 15:17], 5.0)  # both sides of the contact
    # 1 + w exp(-d^2 / 2 sigma^2) along a row, d from the nearest contact column
    d = np.minimum(np.abs(np.arange(40) - 15), np.abs(np.arange(40) - 16))
    np.testing.assert_allclose(weights[10], 1 + 4.0 * np.exp(-(d**2) / 8.0), rtol=1e-6)
    assert weights[10, 34] == pytest.approx(1.0, abs=1e-6)  # the lone cell is far from it
    # the corner of the contact column: the distance is diagonal beyond its ends
    assert weights[1, 15] == pytest.approx(1 + 4.0 * np.exp(-9 / 8.0), rel=1e-6)


def test_contact_weights_are_one_without_contacts_or_weight():
    separate = np.zeros((16, 16), np.int32)
    separate[2:7, 2:7], separate[9:14, 9:14] = 1, 2
    assert np.array_equal(hover.contact_weights(separate, 4.0), np.ones((16, 16), np.float32))
    touching = np.zeros((16, 16), np.int32)
    touching[2:14, 2:8], touching[2:14, 8:14] = 1, 7
    assert np.array_equal(hover.contact_weights(touching, 0.0), np.ones((16, 16), np.float32))
    assert hover.contact_weights(touching, 4.0).max() == pytest.approx(5.0)
    # a vertical neighbour counts as well as a horizontal one
    assert hover.contact_weights(touching.T, 4.0).max() == pytest.approx(5.0)
    assert np.array_equal(
        hover.contact_weights(touching, 4.0).T, hover.contact_weights(touching.T, 4.0)
    )


def test_contact_weights_input_errors():
    labels = np.zeros((8, 8), np.int32)
    for weight in (-1.0, float("inf"), float("nan"), True, "4"):
        with pytest.raises(CellSegError, match="weight: expected a non-negative number"):
            hover.contact_weights(labels, weight)
    for sigma in (0.0, -1.0, float("inf"), None):
        with pytest.raises(CellSegError, match="sigma: expected a positive number"):
            hover.contact_weights(labels, 1.0, sigma=sigma)
    with pytest.raises(CellSegError, match="labels"):
        hover.contact_weights(np.zeros((2, 8, 8)), 1.0)


def test_weighted_loss_moves_the_emphasis_of_the_hv_terms_only():
    torch.manual_seed(0)
    cp = torch.randn(1, 2, 64, 64)
    _, labels = synthetic.make_image(3, size=(64, 64), seed=2)
    fg, hv = hover.targets(labels)
    fg_t, hv_t = torch.as_tensor(fg)[None], torch.as_tensor(hv)[None]
    pred = hv_t + 0.1 * torch.randn(1, 2, 64, 64)
    plain = hover.loss_terms(cp, pred, fg_t, hv_t)
    ones = hover.loss_terms(cp, pred, fg_t, hv_t, weights=torch.ones(1, 64, 64))
    for a, b in zip(plain, ones, strict=True):
        assert float(a) == pytest.approx(float(b), rel=1e-6)
    # an error on one pixel only: its weight sets how much of the weighted mean it takes
    wrong = hv_t.clone()
    row, col = map(int, np.argwhere(fg > 0)[0])
    wrong[0, 0, row, col] += 1.0
    weights = torch.ones(1, 64, 64)
    weights[0, row, col] = 9.0
    weighted = hover.loss_terms(cp, wrong, fg_t, hv_t, weights=weights[:, None])  # (B, 1, H, W)
    assert float(weighted.mse) == pytest.approx(9.0 / (2 * (64 * 64 + 8)), rel=1e-5)
    unweighted = hover.loss_terms(cp, wrong, fg_t, hv_t)
    assert float(unweighted.mse) == pytest.approx(1.0 / (2 * 64 * 64), rel=1e-5)
    assert weighted.msge > unweighted.msge
    assert weighted.ce == unweighted.ce and weighted.dice == unweighted.dice
    total = hover.loss(cp, wrong, fg_t, hv_t, weights=weights)
    assert float(total) == pytest.approx(float(sum(weighted)), rel=1e-6)


def test_weighted_loss_input_errors():
    cp, pred_hv = torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8)
    fg, hv = np.zeros((1, 8, 8), np.float32), np.zeros((1, 2, 8, 8), np.float32)
    with pytest.raises(CellSegError, match="weights: expected shape"):
        hover.loss(cp, pred_hv, fg, hv, weights=np.ones((8, 8)))
    with pytest.raises(CellSegError, match="weights: expected finite positive"):
        hover.loss(cp, pred_hv, fg, hv, weights=np.zeros((1, 8, 8)))
    with pytest.raises(CellSegError, match="weights: expected finite positive"):
        hover.loss(cp, pred_hv, fg, hv, weights=np.full((1, 8, 8), np.nan))


# --------------------------------------------------------------------------- network


@pytest.mark.parametrize("size", [(65, 97), (33, 31)])
def test_network_shapes_for_odd_sizes(size):
    with torch.no_grad():
        out = _net()(torch.rand(2, 3, *size))
    assert isinstance(out, hover.HoverOutput)
    cp, hv = out
    assert cp.shape == (2, 2, *size) and hv.shape == (2, 2, *size)
    prob = hover.foreground_probability(cp)
    assert prob.shape == (2, *size) and prob.min() >= 0 and prob.max() <= 1
    torch.testing.assert_close(prob, torch.softmax(cp, 1)[:, 1])


def test_network_errors_and_offline_pretrained_fallback(monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(CellSegError, match="backbone: unknown ConvNeXt"):
        hover.ConvNeXtHover("resnet18")
    with pytest.raises(CellSegError, match=r"x: expected a \(B, 3, H, W\) tensor"):
        _net()(torch.zeros(1, 1, 32, 32))
    with pytest.raises(CellSegError, match=r"cp: expected a \(B, 2, H, W\) tensor of logits"):
        hover.foreground_probability(torch.zeros(1, 4, 8, 8))
    with pytest.raises(CellSegError, match=r"cp: expected a \(B, 3, H, W\) tensor.*core class"):
        hover.core_probability(torch.zeros(1, 2, 8, 8))
    with pytest.raises(CellSegError, match="cores: expected True or False"):
        hover.ConvNeXtHover("convnext_atto", cores=1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable when imported, which an earlier test may have done
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.warns(PretrainedWeightsWarning, match="pretrained"):
        net = hover.ConvNeXtHover("convnext_atto", pretrained=True)
    assert net.unet.out_channels == 4


# --------------------------------------------------------------------------- post-processing


@pytest.mark.parametrize(("category", "seed"), [(1, 0), (1, 5), (0, 2)])
def test_round_trip_on_synthetic_images(category, seed):
    _, labels = synthetic.make_image(category, size=(256, 256), seed=seed)
    pred = hover.instances(*hover.targets(labels))
    assert pred.dtype == np.int32 and pred.shape == labels.shape
    np.testing.assert_array_equal(np.unique(pred), np.arange(pred.max() + 1))  # ids 1..N
    assert _f1(labels, pred) >= 0.95


def test_scaled_preset_separates_small_touching_nuclei_that_hover_net_merges():
    labels = _touching_small_nuclei()
    fg, hv = hover.targets(labels)
    assert _f1(labels, hover.instances(fg, hv)) >= 0.95
    assert _f1(labels, hover.instances(fg, hv, preset="hover_net")) < 0.5


def test_unmarked_cells_are_kept_by_default_and_dropped_by_hover_net():
    labels = np.zeros((40, 40), np.int32)
    labels[5:25, 5:25] = 1
    labels[30:32, 30:33] = 2  # 6 px: too small for any marker
    fg, hv = hover.targets(labels)
    assert _f1(labels, hover.instances(fg, hv)) == 1.0
    hover_net = hover.instances(fg, hv, preset="hover_net")
    assert hover_net.max() == 1 and not hover_net[labels == 2].any()


def test_instances_on_an_empty_map_and_thresholding():
    assert not hover.instances(np.zeros((32, 32)), np.zeros((2, 32, 32))).any()
    labels = np.zeros((32, 32), np.int32)
    labels[4:14, 4:14] = 1
    fg, hv = hover.targets(labels)
    assert hover.instances(fg * 0.55, hv, prob_thresh=0.5).max() == 1
    assert hover.instances(fg * 0.55, hv).max() == 0  # the paper's 0.6
    assert hover.instances(fg > 0, hv).max() == 1  # a boolean mask works as a probability map


def test_presets_and_overrides():
    assert set(hover.PRESETS) == {"hover_net", "code", "scaled"}
    assert hover.DEFAULT_PRESET == "scaled"
    assert (hover.PRESETS["hover_net"].sobel_size, hover.PRESETS["hover_net"].marker_min_size) == (
        21,
        10,
    )
    assert (hover.PRESETS["code"].sobel_size, hover.PRESETS["code"].marker_min_size) == (15, 100)
    assert hover.PRESETS["scaled"].sobel_size is None
    _, labels = synthetic.make_image(0, size=(128, 128), seed=4)
    fg, hv = hover.targets(labels)
    by_name = hover.instances(fg, hv, preset="code")
    by_params = hover.instances(
        fg, hv, preset=hover.PRESETS["hover_net"], sobel_size=15, marker_min_size=100
    )
    np.testing.assert_array_equal(by_name, by_params)
    custom = dataclasses.replace(hover.PRESETS["scaled"], sobel_size=3)
    steps = hover.watershed_steps(fg, hv, preset=custom)
    assert steps.kernel == (3, 3)


def test_watershed_steps_and_cell_diameter():
    labels = np.zeros((120, 120), np.int32)
    yy, xx = np.mgrid[:120, :120]
    for k, (cy, cx) in enumerate([(30, 30), (30, 52), (80, 40), (80, 90)], start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 12**2] = k  # discs of diameter 25, two touching
    fg, hv = hover.targets(labels)
    width, height = hover.cell_diameter(fg, hv)
    assert 20 <= width <= 30 and 20 <= height <= 30
    steps = hover.watershed_steps(fg, hv)
    assert steps.diameter == (width, height)
    assert steps.kernel == (7, 7)  # odd(0.25 * 25)
    assert steps.gradients.shape == (2, 120, 120) and steps.energy.shape == (120, 120)
    assert steps.energy.min() >= 0 and not steps.energy[labels == 0].any()
    assert steps.markers.max() == 4 and steps.labels.max() == 4
    assert np.all(steps.markers[steps.markers > 0] > 0) and not steps.markers[labels == 0].any()
    # the boundary between the touching discs is where the energy peaks
    assert steps.energy[30, 40:43].max() > 5 * steps.energy[30, 25:35].max()
    assert hover.cell_diameter(np.zeros((8, 8)), np.zeros((2, 8, 8))) == (16.0, 16.0)


def test_flood_is_the_last_step_and_true_cores_recover_touching_cells():
    labels = synthetic.make_image(3, size=(128, 128), seed=4)[1]  # packed small nuclei
    fg, hv = hover.noisy_maps(*hover.targets(labels), blur=3, noise=0.1, seed=0)  # blurred:
    steps = hover.watershed_steps(fg, hv)  # the markers merge touching nuclei (F1 0.73)
    np.testing.assert_array_equal(
        hover.flood(steps.landscape, steps.markers, steps.foreground), steps.labels
    )
    cores = hover.cell_cores(labels)
    assert set(np.unique(cores)) == set(np.unique(labels))  # every cell keeps a seed, same id
    assert np.all((cores == 0) | (cores == labels))
    # touching cores stay apart: no pixel of one core touches another core
    grown = ndi.grey_dilation(cores, size=3)
    assert not np.any((cores > 0) & (grown != cores) & (grown > 0))
    # one seed per true cell on the same landscape and foreground separates them all
    assert metrics.f1_score(labels, steps.labels) < 0.8
    assert metrics.f1_score(labels, hover.flood(steps.landscape, cores, steps.foreground)) > 0.95
    assert metrics.f1_score(labels, hover.flood(steps.landscape, cores, labels > 0)) > 0.95


def test_flood_keeps_or_drops_what_no_marker_reaches():
    mask = np.zeros((10, 20), bool)
    mask[2:8, 2:8] = mask[2:8, 12:18] = True
    markers = np.zeros((10, 20), np.int32)
    markers[4, 4] = 1
    kept = hover.flood(np.zeros((10, 20), np.float32), markers, mask)
    assert np.unique(kept).tolist() == [0, 1, 2] and (kept[mask] > 0).all()
    dropped = hover.flood(np.zeros((10, 20), np.float32), markers, mask, keep_unmarked=False)
    assert np.unique(dropped).tolist() == [0, 1] and not dropped[:, 10:].any()


def test_cores_of_large_cells_are_capped_and_the_frame_can_be_open():
    labels = np.zeros((100, 100), np.int32)
    labels[10:90, 10:90] = 1  # a square 80 pixels wide: deepest pixel 40 deep
    labels[40:60, 0:10] = 2  # a small cell cut by the left frame
    half = hover.cell_cores(labels)
    assert (half == 1).sum() == 42 * 42  # from 20 pixels deep on (the edge pixels are 1 deep)
    capped = hover.cell_cores(labels, max_depth=8)
    assert (capped == 1).sum() == 66 * 66  # from 8 pixels deep on
    # the cut cell: with the frame closed its core sits away from the frame, open it reaches it
    assert not hover.cell_cores(labels)[:, 0].any()
    assert (hover.cell_cores(labels, open_frame=True)[45:55, 0] == 2).all()
    assert (
        hover.cell_cores(labels, max_depth=8, open_frame=True)[:, 10:90] == capped[:, 10:90]
    ).all()
    targets = hover.core_targets(labels)
    assert targets.dtype == np.float32 and set(np.unique(targets)) == {0.0, 1.0, 2.0}
    np.testing.assert_array_equal(
        targets == 2, hover.cell_cores(labels, max_depth=hover.CORE_MAX_DEPTH, open_frame=True) > 0
    )
    with pytest.raises(CellSegError, match="max_depth: expected a number > 0"):
        hover.cell_cores(labels, max_depth=0)
    with pytest.raises(CellSegError, match="open_frame: expected True or False"):
        hover.cell_cores(labels, open_frame=1)


@pytest.mark.parametrize(
    ("labels", "depth", "message"),
    [
        (np.zeros((4, 4), np.float32), 0.5, "2-D integer label image"),
        (np.zeros((2, 4, 4), np.int32), 0.5, "2-D integer label image"),
        (np.zeros((4, 4), np.int32), 1.5, r"depth: expected a number in \[0, 1\]"),
        (np.zeros((4, 4), np.int32), True, "depth"),
    ],
)
def test_cell_cores_input_errors(labels, depth, message):
    with pytest.raises(CellSegError, match=message):
        hover.cell_cores(labels, depth)


def test_instances_input_errors():
    prob, hv = np.zeros((16, 16)), np.zeros((2, 16, 16))
    with pytest.raises(CellSegError, match=r"foreground_prob: expected a non-empty \(H, W\)"):
        hover.instances(np.zeros((16, 16, 2)), hv)
    with pytest.raises(CellSegError, match=r"hv: expected shape \(2, H, W\)"):
        hover.instances(prob, hv[:, :8])
    with pytest.raises(CellSegError, match="foreground_prob: expected numbers"):
        hover.instances(prob.astype(str), hv)
    with pytest.raises(CellSegError, match="hv: expected numbers"):
        hover.instances(prob, hv.astype(complex))
    with pytest.raises(CellSegError, match="NaN or infinite"):
        hover.instances(prob, np.where(prob > 0, 0, np.inf)[None].repeat(2, 0))
    for bad in (0, 1.5, "0.5", True):
        with pytest.raises(CellSegError, match="prob_thresh: expected a number in"):
            hover.instances(prob, hv, prob_thresh=bad)
    with pytest.raises(CellSegError, match="preset: expected one of"):
        hover.instances(prob, hv, preset="cellpose")
    with pytest.raises(CellSegError, match="unknown watershed setting"):
        hover.instances(prob, hv, ksize=5)
    with pytest.raises(CellSegError, match="sobel_size: expected an odd integer"):
        hover.instances(prob, hv, sobel_size=4)
    with pytest.raises(CellSegError, match="energy: expected one of"):
        hover.instances(prob, hv, energy="max")
    with pytest.raises(CellSegError, match="marker_min_fraction: expected a number"):
        hover.instances(prob, hv, marker_min_fraction=2)
    with pytest.raises(CellSegError, match="marker_min_prob: expected a number"):
        hover.instances(prob, hv, marker_min_prob=1.5)
    with pytest.raises(CellSegError, match="marker_threshold: expected a number"):
        hover.instances(prob, hv, marker_threshold=np.nan)
    with pytest.raises(CellSegError, match="opening_size: expected an integer"):
        hover.instances(prob, hv, opening_size=-1)
    with pytest.raises(CellSegError, match="blur_size: expected an odd integer"):
        hover.instances(prob, hv, blur_size=4)
    with pytest.raises(CellSegError, match="fill_holes: expected True or False"):
        hover.instances(prob, hv, fill_holes=1)


@pytest.mark.realdata
def test_round_trip_on_real_labels(real_mini, real_manifest):
    rows = real_manifest[::12]  # 17 images across every modality
    scores = []
    for row in rows:
        labels = io.read_labels(real_mini / "labels" / f"{row['stem']}_label.tiff")
        scores.append(_f1(labels, hover.instances(*hover.targets(labels))))
    assert np.mean(scores) >= 0.97
