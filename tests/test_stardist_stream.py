"""streams.stardist: the network's shapes, targets against stardist's own functions, the loss,
the post-processing round trip, the rotation/flip trap and every input error."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from stardist import edt_prob, star_dist
from stardist.geometry import polygons_to_label

from cellseg_lite import CellSegError, metrics, synthetic
from cellseg_lite.streams import stardist as sd

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cells() -> np.ndarray:
    """A small fluorescence-like label image (about a dozen nuclei, some touching the border)."""
    return synthetic.make_image(0, size=(96, 112), seed=5)[1]


@pytest.fixture(scope="module")
def cell_targets(cells) -> sd.StarDistTargets:
    return sd.targets(cells)


@pytest.fixture(scope="module")
def atto() -> sd.ConvNeXtStarDist:
    torch.manual_seed(0)
    return sd.ConvNeXtStarDist("convnext_atto", n_rays=8)


def _disc(shape, centre, radius, value=1, labels=None) -> np.ndarray:
    labels = np.zeros(shape, np.int32) if labels is None else labels
    yy, xx = np.indices(shape)
    labels[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2] = value
    return labels


# --------------------------------------------------------------------------- the network


@pytest.mark.parametrize("size", [(64, 64), (45, 67)])
def test_model_shapes_and_ranges(atto, size):
    atto.eval()
    with torch.no_grad():
        prob, dist = atto(torch.randn(2, 3, *size))
    assert prob.shape == (2, 1, *size) and dist.shape == (2, 8, *size)
    assert prob.min() >= 0 and prob.max() <= 1
    assert dist.min() >= 0


def test_model_rejects_few_rays():
    with pytest.raises(CellSegError, match="n_rays"):
        sd.ConvNeXtStarDist("convnext_atto", n_rays=2)


def test_model_pretrained_offline_warns(monkeypatch):
    import huggingface_hub.constants

    from cellseg_lite._weights import PretrainedWeightsWarning

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable when imported, which an earlier test may have done
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.warns(PretrainedWeightsWarning):
        net = sd.ConvNeXtStarDist("convnext_atto", n_rays=4, pretrained=True)
    assert net.n_rays == 4


# --------------------------------------------------------------------------- targets


def test_targets_are_stardists_functions(cells, cell_targets):
    prob, dist = cell_targets
    assert prob.dtype == dist.dtype == np.float32
    assert prob.shape == cells.shape and dist.shape == (32, *cells.shape)
    np.testing.assert_array_equal(dist, np.moveaxis(star_dist(cells, 32, mode="cpp"), -1, 0))
    np.testing.assert_allclose(prob, edt_prob(cells), rtol=1e-6)
    # python mode agrees with the C++ mode the package uses
    np.testing.assert_allclose(
        dist[:, 20:40, 30:60],
        np.moveaxis(star_dist(cells, 32, mode="python"), -1, 0)[:, 20:40, 30:60],
        atol=1e-3,
    )
    assert prob[cells == 0].max() == 0 and dist[:, cells == 0].max() == 0
    assert prob[cells > 0].min() > 0


def test_targets_of_an_empty_patch():
    prob, dist = sd.targets(np.zeros((20, 30), np.uint16), n_rays=16)
    assert prob.shape == (20, 30) and dist.shape == (16, 20, 30)
    assert not prob.any() and not dist.any()
    assert prob.dtype == dist.dtype == np.float32


def test_targets_of_one_cell_filling_the_patch_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prob, dist = sd.targets(np.full((9, 9), 3))
    assert prob[4, 4] == 1 and 0 < prob[0, 0] < 1
    assert dist[0, 4, 4] == pytest.approx(star_dist(np.full((9, 9), 3), 32)[4, 4, 0])


def test_targets_leave_warnings_formatting_alone(cells):
    before = warnings.formatwarning
    sd.targets(cells, n_rays=8)
    assert warnings.formatwarning is before


def test_star_distances_beyond_uint16_ids():
    """Rows 0 and 1 hold ids that are equal modulo 65536: a plain uint16 cast would merge them."""
    width = 300
    labels = np.zeros((221, width), np.int64)
    labels[0] = np.arange(1, width + 1)
    labels[1] = np.arange(65537, 65537 + width)
    rest = 219 * width - (65536 - width)  # the other rows: ids 301..65536, then 65837..
    fill = np.concatenate(
        [np.arange(width + 1, 65537), np.arange(65537 + width, 65537 + width + rest)]
    )
    labels[2:] = fill.reshape(219, width)
    assert len(np.unique(labels)) == labels.size and labels.max() > 65535
    dist = sd._star_distances(labels, 8)
    single = np.zeros((5, 5), np.int32)
    single[2, 2] = 1
    expected = star_dist(single, 8)[2, 2]  # every pixel is its own cell
    np.testing.assert_allclose(dist[:, 0, 5], expected)
    np.testing.assert_allclose(dist[:, 1, 5], expected)
    np.testing.assert_allclose(dist.reshape(8, -1).T, np.broadcast_to(expected, (labels.size, 8)))


@pytest.mark.parametrize(
    ("labels", "n_rays", "match"),
    [
        (np.zeros((4, 4, 3), np.int32), 32, "labels"),
        (np.full((4, 4), -1), 32, "labels"),
        (np.zeros((4, 4), np.int32), 2, "n_rays"),
        (np.zeros((4, 4), np.int32), 8.0, "n_rays"),
    ],
)
def test_targets_input_errors(labels, n_rays, match):
    with pytest.raises(CellSegError, match=match):
        sd.targets(labels, n_rays=n_rays)


# --------------------------------------------------------------------------- rotation/flip trap


@pytest.mark.parametrize("k", [1, 2, 3, -1])
def test_rot90_rolls_the_rays(cells, cell_targets, k):
    rotated = np.ascontiguousarray(np.rot90(cells, k))
    truth = sd.targets(rotated).dist
    np.testing.assert_allclose(sd.rotate_targets(cell_targets.dist, k), truth, atol=1e-4)
    # the channels are rolled by -8k for R = 32: rotating the maps alone is wrong
    np.testing.assert_allclose(
        np.roll(np.rot90(cell_targets.dist, k, axes=(1, 2)), -8 * k, axis=0), truth, atol=1e-4
    )
    assert np.abs(np.rot90(cell_targets.dist, k, axes=(1, 2)) - truth).max() > 5


@pytest.mark.parametrize("axis", [0, 1])
def test_flip_reverses_the_rays(cells, cell_targets, axis):
    truth = sd.targets(np.ascontiguousarray(np.flip(cells, axis))).dist
    np.testing.assert_allclose(sd.flip_targets(cell_targets.dist, axis), truth, atol=1e-4)
    assert np.abs(np.flip(cell_targets.dist, axis + 1) - truth).max() > 5


def test_rotation_and_flip_on_batched_tensors(cell_targets):
    batch = torch.from_numpy(np.stack([cell_targets.dist, cell_targets.dist]))
    for k in (1, 3):
        expected = sd.rotate_targets(cell_targets.dist, k)
        got = sd.rotate_targets(batch, k)
        assert isinstance(got, torch.Tensor)
        np.testing.assert_array_equal(got[1].numpy(), expected)
    for axis in (0, 1):
        np.testing.assert_array_equal(
            sd.flip_targets(batch, axis)[0].numpy(), sd.flip_targets(cell_targets.dist, axis)
        )


def test_rotation_and_flip_errors():
    with pytest.raises(CellSegError, match="multiple of 4"):
        sd.rotate_targets(np.zeros((6, 4, 4)), 1)
    with pytest.raises(CellSegError, match="quarter turns"):
        sd.rotate_targets(np.zeros((8, 4, 4)), 0.5)
    with pytest.raises(CellSegError, match="dist"):
        sd.rotate_targets(np.zeros((4, 4)), 1)
    with pytest.raises(CellSegError, match="axis"):
        sd.flip_targets(np.zeros((8, 4, 4)), 2)
    with pytest.raises(CellSegError, match="even n_rays"):
        sd.flip_targets(np.zeros((7, 4, 4)), 1)


# --------------------------------------------------------------------------- the loss


def _batch(targets_list):
    prob = torch.from_numpy(np.stack([t.prob for t in targets_list]))
    dist = torch.from_numpy(np.stack([t.dist for t in targets_list]))
    return prob, dist


def test_loss_literal_values():
    prob = torch.zeros(1, 1, 4, 4)
    prob[0, 0, 1, 1] = 1.0
    dist = torch.zeros(1, 4, 4, 4)
    dist[0, :, 1, 1] = 3.0
    pred_dist = dist.clone()
    pred_dist[0, :, 1, 1] = 5.0  # 2 px too long on every ray of the one cell pixel
    terms = sd.loss_terms(prob.clone(), pred_dist, prob, dist)
    assert terms.bce.item() == pytest.approx(0.0, abs=1e-6)  # binary prob predicted exactly
    assert terms.overlap.item() == pytest.approx(0.0, abs=1e-6)  # Dice of equal maps
    assert terms.dist.item() == pytest.approx(2.0, rel=1e-5)  # MAE over the cell pixel
    assert terms.total.item() == pytest.approx(0.3 * 2.0, rel=1e-5)
    code = sd.loss_terms(prob.clone(), pred_dist, prob, dist, variant="code")
    assert code.dist.item() == pytest.approx(2.0 * 4 / (4 * 16), rel=1e-5)  # L1 over all pixels
    # Jaccard of 5 against 3 per ray: 15 / (25 + 9 - 15)
    assert code.overlap.item() == pytest.approx(1 - 15 / 19, rel=1e-4)
    exact = sd.loss_terms(prob.clone(), dist.clone(), prob, dist, variant="code")
    assert exact.total.item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("variant", sd.LOSS_VARIANTS)
@pytest.mark.parametrize("fill", [0.0, 0.5, 1.0])
def test_loss_on_an_empty_patch_is_finite(variant, fill):
    pred_prob = torch.full((2, 1, 16, 16), fill, requires_grad=True)
    pred_dist = torch.zeros(2, 8, 16, 16, requires_grad=True)
    value = sd.loss(
        pred_prob, pred_dist, torch.zeros(2, 16, 16), torch.zeros(2, 8, 16, 16), variant=variant
    )
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(pred_prob.grad).all() and torch.isfinite(pred_dist.grad).all()
    assert not pred_dist.grad.any()  # no cell, nothing to learn about distances
    if fill == 0.0:
        assert value.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("variant", sd.LOSS_VARIANTS)
def test_network_on_an_empty_patch_has_finite_gradients(atto, variant):
    atto.train()
    atto.zero_grad()
    # a batch of two: one 32 x 32 image leaves training-mode BatchNorm one value per channel
    prob, dist = atto(torch.randn(2, 3, 32, 32))
    sd.loss(
        prob, dist, torch.zeros(2, 32, 32), torch.zeros(2, 8, 32, 32), variant=variant
    ).backward()
    grads = [p.grad for p in atto.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("variant", sd.LOSS_VARIANTS)
def test_loss_decreases_when_overfitting_one_patch(variant):
    image, labels = synthetic.make_image(0, size=(64, 64), seed=2)
    prob, dist = _batch([sd.targets(labels, n_rays=8)])
    x = torch.from_numpy(np.repeat(image[None, None].astype(np.float32) / 255, 3, axis=1))
    torch.manual_seed(0)
    net = sd.ConvNeXtStarDist("convnext_atto", n_rays=8)
    optimiser = torch.optim.Adam(net.parameters(), lr=5e-3)
    values = []
    for _ in range(15):
        optimiser.zero_grad()
        value = sd.loss(*net(x), prob, dist, variant=variant)
        value.backward()
        optimiser.step()
        values.append(value.item())
    assert all(math.isfinite(v) for v in values)
    assert values[-1] < 0.75 * values[0]
    assert sum(b < a for a, b in zip(values[:-1], values[1:], strict=True)) >= 12  # steadily


@pytest.mark.parametrize("variant", sd.LOSS_VARIANTS)
def test_loss_under_autocast_is_float32(variant):
    """Mixed precision: the loss leaves autocast and computes in float32 (torch refuses BCE there)."""
    prob, dist = torch.rand(1, 1, 8, 8), torch.rand(1, 8, 8, 8) * 5
    reference = sd.loss(prob, dist, prob, dist * 0.5, variant=variant)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = sd.loss(prob.bfloat16(), dist.bfloat16(), prob, dist * 0.5, variant=variant)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference.item(), rel=2e-2)


def test_loss_input_errors():
    p, d = torch.rand(1, 1, 8, 8), torch.rand(1, 8, 8, 8)
    with pytest.raises(CellSegError, match="pred_prob: expected shape"):
        sd.loss(torch.rand(1, 2, 8, 8), d, p, d)
    with pytest.raises(CellSegError, match="n_rays mismatch"):
        sd.loss(p, d, p, torch.rand(1, 16, 8, 8))
    with pytest.raises(CellSegError, match="pred_dist"):
        sd.loss(p, torch.rand(1, 8, 9, 8), p, d)
    with pytest.raises(CellSegError, match="prob: expected the shape"):
        sd.loss(p, d, torch.rand(1, 1, 4, 8), d)
    with pytest.raises(CellSegError, match="dist: expected the shape"):
        sd.loss(p, d, p, torch.rand(8, 8, 8))
    with pytest.raises(CellSegError, match=r"pred_prob: values must be probabilities"):
        sd.loss(p * 3 - 1, d, p, d)
    with pytest.raises(CellSegError, match=r"prob: target values"):
        sd.loss(p, d, p + 1.5, d)
    with pytest.raises(CellSegError, match="dist: target distances"):
        sd.loss(p, d, p, -d)
    with pytest.raises(CellSegError, match="pred_dist: expected a torch.Tensor"):
        sd.loss(p, d.numpy(), p, d)
    with pytest.raises(CellSegError, match="float tensor"):
        sd.loss(p, d, (p > 0.5).long(), d)
    with pytest.raises(CellSegError, match="variant"):
        sd.loss(p, d, p, d, variant="mine")
    with pytest.raises(CellSegError, match="dist_weight"):
        sd.loss(p, d, p, d, dist_weight=-1)


# --------------------------------------------------------------------------- post-processing


def test_round_trip_of_exact_targets(cells, cell_targets):
    labels = sd.instances(*cell_targets)
    assert labels.dtype == np.int32 and labels.shape == cells.shape
    assert metrics.f1_score(cells, labels, drop_boundary=False) >= 0.95
    assert metrics.match(cells, labels, drop_boundary=False).mean_matched_iou > 0.9
    assert set(np.unique(labels)) == set(range(int(labels.max()) + 1))  # ids 1..n


def test_round_trip_of_every_synthetic_class():
    for category in range(4):
        labels = synthetic.make_image(category, size=(128, 128), seed=1)[1]
        got = sd.instances(*sd.targets(labels), stride=2)
        assert metrics.f1_score(labels, got, drop_boundary=False) >= 0.95, category


def test_instances_accept_tensors_and_a_channel_axis(cell_targets):
    expected = sd.instances(*cell_targets)
    prob = torch.from_numpy(cell_targets.prob)[None]
    got = sd.instances(prob, torch.from_numpy(cell_targets.dist))
    np.testing.assert_array_equal(got, expected)


def test_empty_maps_give_empty_labels():
    labels = sd.instances(np.zeros((20, 24), np.float32), np.zeros((32, 20, 24), np.float32))
    assert labels.shape == (20, 24) and not labels.any()
    found = sd.select_candidates(np.zeros((8, 8)), np.zeros((4, 8, 8)))
    assert found.points.shape == (0, 2) and found.dist.shape == (0, 4)
    assert len(sd.suppress(found).points) == 0
    assert sd.polygon_vertices(found).shape == (0, 2, 4)


def test_star_renderer_matches_stardists(cell_targets):
    polygons = sd.suppress(sd.select_candidates(*cell_targets, stride=1))
    ours = sd.render(polygons, cell_targets.prob.shape)
    theirs = sd.render(polygons, cell_targets.prob.shape, method="stardist")
    np.testing.assert_array_equal(ours, theirs)
    # and both follow stardist's polygons_to_label up to the renumbering
    raw = polygons_to_label(
        polygons.dist, polygons.points, cell_targets.prob.shape, prob=polygons.prob
    )
    np.testing.assert_array_equal(ours > 0, raw > 0)


def test_star_renderer_on_random_overlapping_polygons(rng):
    n = 40
    polygons = sd.Polygons(
        rng.integers(-5, 70, (n, 2)),
        rng.random(n).astype(np.float32),
        rng.uniform(0.5, 15, (n, 16)).astype(np.float32),
    )
    np.testing.assert_array_equal(
        sd.render(polygons, (64, 50)), sd.render(polygons, (64, 50), method="stardist")
    )


def test_suppression_keeps_the_more_probable_of_two_overlapping_polygons():
    dist = np.full((3, 8), 5.0, np.float32)
    points = np.array([[10, 10], [11, 11], [30, 30]])
    kept = sd.suppress(sd.Polygons(points, np.array([0.6, 0.9, 0.7], np.float32), dist))
    np.testing.assert_array_equal(kept.points, [[11, 11], [30, 30]])  # most probable first
    np.testing.assert_allclose(kept.prob, [0.9, 0.7])
    everything = sd.suppress(sd.Polygons(points, np.array([0.6, 0.9, 0.7], np.float32), dist), 1.0)
    assert len(everything.points) == 3
    vertices = sd.polygon_vertices(kept)
    assert vertices.shape == (2, 2, 8)
    np.testing.assert_allclose(vertices[0, :, 0], [11, 16])  # ray 0 points right (+columns)
    np.testing.assert_allclose(vertices[0, :, 2], [16, 11], atol=1e-5)  # ray R/4 points down


def test_candidates_threshold_border_stride_and_cap():
    prob = np.zeros((12, 12), np.float32)
    prob[5, 6], prob[5, 5], prob[0, 7], prob[9, 9] = 0.9, 0.8, 0.95, 0.4
    dist = np.zeros((4, 12, 12), np.float32)
    dense = sd.select_candidates(prob, dist, 0.5, stride=1, border=0)
    assert sorted(map(tuple, dense.points)) == [(0, 7), (5, 5), (5, 6)]
    assert dense.dist.min() == pytest.approx(sd.MIN_DIST)  # clamped like the authors' code
    framed = sd.select_candidates(prob, dist, 0.5, stride=1)  # border 2 drops row 0
    assert sorted(map(tuple, framed.points)) == [(5, 5), (5, 6)]
    pooled = sd.select_candidates(prob, dist, 0.5, stride=4)  # one per 4 x 4 block: its peak
    assert sorted(map(tuple, pooled.points)) == [(5, 6)]
    capped = sd.select_candidates(
        prob, dist, 0.5, stride=1, border=0, max_candidates=2, keep_fraction=0.5
    )
    assert sorted(map(tuple, capped.points)) == [(0, 7), (5, 6)]  # ceil(0.5 * 3) most probable


def test_threshold_presets():
    assert sd.thresholds() == sd.Thresholds(0.5, 0.4) == sd.PAPER_THRESHOLDS
    assert sd.thresholds("code", (1024, 1024)) == (0.55, 0.4)
    assert sd.thresholds("code", (1500, 1500)) == (0.5, 0.4)
    with pytest.raises(CellSegError, match="preset"):
        sd.thresholds("fast")
    with pytest.raises(CellSegError, match="shape"):
        sd.thresholds("code")
    with pytest.raises(CellSegError, match="shape"):
        sd.thresholds("code", (0, 10))


@pytest.mark.parametrize(
    ("prob", "dist", "kwargs", "match"),
    [
        (np.full((8, 8), 1.5), np.zeros((8, 8, 8)), {}, r"prob: values must be probabilities"),
        (np.full((8, 8), -0.1), np.zeros((8, 8, 8)), {}, r"prob: values must be probabilities"),
        (np.full((8, 8), np.nan), np.zeros((8, 8, 8)), {}, "prob: contains NaN"),
        (np.zeros(8), np.zeros((8, 8, 8)), {}, r"prob: expected a non-empty \(H, W\)"),
        (np.zeros((8, 8)), np.zeros((8, 8, 4)), {}, "channel-last"),
        (np.zeros((8, 8)), np.zeros((4, 8, 9)), {}, "dist: expected shape"),
        (np.zeros((8, 8)), np.zeros((2, 8, 8)), {}, "number of rays"),
        (np.zeros((8, 8)), np.full((4, 8, 8), np.inf), {}, "dist: contains NaN"),
        (np.zeros((8, 8)), np.zeros((4, 8, 8)), {"prob_thresh": 1.2}, "prob_thresh"),
        (np.zeros((8, 8)), np.zeros((4, 8, 8)), {"nms_thresh": -0.1}, "nms_thresh"),
        (np.zeros((8, 8)), np.zeros((4, 8, 8)), {"stride": 0}, "stride"),
        (np.zeros((8, 8)), np.zeros((4, 8, 8)), {"border": -1}, "border"),
        (np.zeros((8, 8)), np.zeros((4, 8, 8)), {"max_candidates": 0}, "max_candidates"),
        (np.zeros((8, 8)), np.zeros((4, 8, 8)), {"keep_fraction": 0}, "keep_fraction"),
        (np.zeros((8, 8)), np.zeros((4, 8, 8)), {"min_dist": -1}, "min_dist"),
        (np.zeros((8, 8)), np.zeros((4, 8, 8)), {"method": "pil"}, "method"),
        (np.array([["a"]]), np.zeros((4, 1, 1)), {}, "prob: expected numbers"),
    ],
)
def test_instances_input_errors(prob, dist, kwargs, match):
    with pytest.raises(CellSegError, match=match):
        sd.instances(prob, dist, **kwargs)


def test_polygon_and_render_input_errors():
    good = sd.Polygons(np.zeros((1, 2), int), np.ones(1, np.float32), np.ones((1, 8), np.float32))
    with pytest.raises(CellSegError, match="polygons"):
        sd.render(sd.Polygons(np.zeros((2, 2)), np.ones(1), np.ones((1, 8))), (4, 4))
    with pytest.raises(CellSegError, match="polygons"):
        sd.suppress("not polygons")
    with pytest.raises(CellSegError, match="shape"):
        sd.render(good, (4,))
    with pytest.raises(CellSegError, match="shape"):
        sd.render(good, None)
    with pytest.raises(CellSegError, match="method"):
        sd.render(good, (4, 4), method="pil")
    with pytest.raises(CellSegError, match="n_rays"):
        sd.ray_angles(2)
    np.testing.assert_allclose(sd.ray_angles(4), [0, np.pi / 2, np.pi, 3 * np.pi / 2])


@pytest.mark.realdata
def test_round_trip_on_real_labels(real_mini, real_manifest):
    """A few real label images per modality go back to themselves (the benchmark does all 196)."""
    from cellseg_lite import io

    seen: dict[str, int] = {}
    for row in real_manifest:
        if seen.get(row["modality"], 0) >= 1 or int(row["height"]) * int(row["width"]) > 400_000:
            continue
        seen[row["modality"]] = seen.get(row["modality"], 0) + 1
        labels = io.read_labels(real_mini / "labels" / f"{row['stem']}_label.tiff")
        got = sd.instances(*sd.targets(labels))
        assert metrics.f1_score(labels, got, drop_boundary=False) >= 0.85, row["stem"]
    assert len(seen) >= 3
