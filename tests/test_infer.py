"""infer: sliding windows that reassemble their input exactly and blend without seams, the model
helpers, the block-wise StarDist post-processing against the whole map, and every input error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellseg_lite import CellSegError, infer, metrics, synthetic
from cellseg_lite.streams import hover
from cellseg_lite.streams import stardist as sd

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _image(shape, channels=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((*shape, channels), dtype=np.float32)


# --------------------------------------------------------------------------- tiles


@pytest.mark.parametrize(
    ("length", "tile", "stride", "expected"),
    [
        (1000, 512, 384, [0, 384, 488]),
        (512, 512, 384, [0]),
        (1100, 512, 384, [0, 384, 588]),
        (896, 512, 384, [0, 384]),
        (10, 4, 4, [0, 4, 6]),
        (5, 3, 1, [0, 1, 2]),
    ],
)
def test_tile_starts(length, tile, stride, expected):
    assert infer.tile_starts(length, tile, stride) == expected


def test_tile_starts_needs_a_whole_tile():
    with pytest.raises(CellSegError, match="length: 100 is shorter than the tile"):
        infer.tile_starts(100, 512, 384)


def test_blend_window():
    gauss = infer.blend_window(64, "gaussian")
    assert gauss.shape == (64, 64) and gauss.dtype == np.float32
    assert gauss.min() > 0  # every pixel of a tile has weight
    assert gauss[31, 31] == gauss.max() and np.allclose(gauss, gauss.T)
    assert np.allclose(gauss, gauss[::-1, ::-1])
    assert np.array_equal(infer.blend_window(5, "mean"), np.ones((5, 5), np.float32))
    assert infer.blend_window(1).shape == (1, 1)


# --------------------------------------------------------------------------- sliding_window


@pytest.mark.parametrize("blend", infer.BLENDS)
@pytest.mark.parametrize(
    ("shape", "tile", "stride"),
    [
        ((100, 70), 512, 384),
        ((512, 512), 512, 384),
        ((513, 1100), 512, 384),
        ((1300, 900), 512, 384),
        ((100, 70), 64, 48),
        ((130, 97), 32, 32),
        ((41, 29), 16, 5),
        ((7, 200), 16, 1),
    ],
)
def test_identity_reassembles_the_image(shape, tile, stride, blend):
    image = _image(shape)
    maps = infer.sliding_window(identity, image, tile, stride, blend=blend)
    assert maps.shape == (3, *shape) and maps.dtype == np.float32
    np.testing.assert_allclose(maps, image.transpose(2, 0, 1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (40, 70), (100, 33)])
def test_no_tile_predicts_the_whole_image_in_one_call(shape):
    image = _image(shape, channels=2)
    seen = []

    def predict(x):
        seen.append(tuple(x.shape))
        return x * 2

    maps = infer.sliding_window(predict, image, tile=None)
    np.testing.assert_allclose(maps, 2 * image.transpose(2, 0, 1), atol=1e-6)
    assert seen == [(1, 2, *shape)]
    gray = infer.sliding_window(identity, image[..., 0], None, None)
    np.testing.assert_array_equal(gray, image[None, ..., 0])
    with pytest.raises(CellSegError, match=f"a batch of 1 tiles of {shape[0]} x {shape[1]} gave"):
        infer.sliding_window(lambda x: x[..., :0], image, tile=None)


def test_gray_and_integer_images_keep_their_values():
    image = np.random.default_rng(1).integers(0, 65535, (90, 130), dtype=np.uint16)
    maps = infer.sliding_window(identity, image, 64, 48, blend="mean")
    assert maps.shape == (1, 90, 130)
    np.testing.assert_allclose(maps[0], image, rtol=1e-6)


@pytest.mark.parametrize("pad_mode", infer.PAD_MODES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 40), (40, 2), (20, 20)])
def test_images_smaller_than_a_tile(shape, pad_mode):
    image = _image(shape, channels=2)
    seen = []

    def predict(x):
        seen.append(x.shape)
        return x

    maps = infer.sliding_window(predict, image, 32, 24, pad_mode=pad_mode)
    np.testing.assert_allclose(maps, image.transpose(2, 0, 1), atol=1e-5)
    assert seen[0][2:] == (32, 32)


def test_padding_mirrors_where_it_can():
    image = _image((20, 20), channels=1)
    tiles = []
    infer.sliding_window(lambda x: tiles.append(x.clone()) or x, image, 32, 32)
    expected = np.pad(image[..., 0], ((0, 12), (0, 12)), mode="reflect")
    np.testing.assert_array_equal(tiles[0][0, 0].numpy(), expected)
    tiles.clear()
    infer.sliding_window(lambda x: tiles.append(x.clone()) or x, image[:3], 32, 32)
    rows = np.pad(image[:3, :, 0], ((0, 29), (0, 0)), mode="edge")  # too short to mirror
    expected = np.pad(rows, ((0, 0), (0, 12)), mode="reflect")
    np.testing.assert_array_equal(tiles[0][0, 0].numpy(), expected)


def test_tiles_reach_predict_in_batches_under_inference_mode():
    calls = []

    def predict(x):
        calls.append((x.shape, x.dtype, torch.is_inference_mode_enabled()))
        return x[:, :1].numpy() * 2  # numpy output is fine too

    image = np.random.default_rng(2).integers(0, 255, (100, 200, 3), dtype=np.uint8)
    maps = infer.sliding_window(predict, image, 64, 48, batch_size=3)
    # 2 x 4 tiles: batches of 3, 3, 2
    assert [c[0][0] for c in calls] == [3, 3, 2]
    assert all(c[0][1:] == (3, 64, 64) and c[1] == torch.float32 and c[2] for c in calls)
    np.testing.assert_allclose(maps[0], 2.0 * image[..., 0], rtol=1e-6)


def _in_tile_ramp(x: torch.Tensor) -> torch.Tensor:
    """A "network" whose output depends on where a pixel sits in its tile (a ramp 0..1 down the
    rows and across the columns), plus the input: what padding artefacts at tile edges look like."""
    tile = x.shape[-1]
    ramp = torch.arange(tile, dtype=torch.float32) / (tile - 1)
    return x[:, :1] + ramp[:, None] + ramp[None, :]


def _largest_step(maps: np.ndarray) -> float:
    return max(np.abs(np.diff(maps, axis=-1)).max(), np.abs(np.diff(maps, axis=-2)).max())


def test_gaussian_blending_is_seamless():
    image = np.zeros((300, 400, 1), np.float32)
    smooth = _largest_step(infer.sliding_window(_in_tile_ramp, image, 128, 64))
    seams = _largest_step(infer.sliding_window(_in_tile_ramp, image, 128, 64, blend="mean"))
    # neighbouring tiles disagree by up to 1 here; the Gaussian weights hand over from one to
    # the other gradually (0.025 at most from one pixel to the next), a flat mean jumps by about
    # half the disagreement where a tile ends
    assert smooth < 0.05
    assert seams > 0.3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile": 0}, "tile: expected an integer >= 1, got 0"),
        ({"tile": 32.0}, "tile: expected an integer"),
        ({"stride": 0}, "stride: expected an integer >= 1, got 0"),
        ({"stride": 33}, r"stride: a step of 33 is larger than the tile \(32\)"),
        ({"batch_size": 0}, "batch_size: expected an integer >= 1"),
        ({"blend": "max"}, "blend: expected one of 'gaussian', 'mean', got 'max'"),
        ({"pad_mode": "wrap"}, "pad_mode: expected one of 'reflect', 'edge', 'constant'"),
    ],
)
def test_bad_settings(kwargs, match):
    settings = {"tile": 32, "stride": 24, **kwargs}
    with pytest.raises(CellSegError, match=match):
        infer.sliding_window(identity, _image((40, 40)), **settings)
    if not {"tile", "stride"} & set(kwargs):  # checked in one pass too, though unused there
        with pytest.raises(CellSegError, match=match):
            infer.sliding_window(identity, _image((40, 40)), **{**settings, "tile": None})


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((2, 8, 8, 3)), "expected a 2-D image"),
        (np.zeros((0, 8)), "no pixels"),
        (np.array([["a", "b"]]), "unsupported pixel type"),
        ([[1, 2], [3]], "cannot be read as an array"),
    ],
)
def test_bad_images(image, match):
    with pytest.raises(CellSegError, match=match):
        infer.sliding_window(identity, image, 8, 8)


def test_predict_must_be_callable():
    with pytest.raises(CellSegError, match="predict: expected a function"):
        infer.sliding_window("model.pt", _image((8, 8)), 8, 8)


@pytest.mark.parametrize(
    ("predict", "match"),
    [
        (lambda x: (x, x), "predict: returned a tuple of 2 outputs"),
        (lambda x: x[:, 0], r"predict: expected a \(B, K, tile, tile\)"),
        (lambda x: x[:1], "predict: a batch of 2 tiles of 16 x 16 gave shape"),
        (lambda x: x[..., :8], "predict: a batch of 2 tiles of 16 x 16 gave shape"),
        (lambda x: x[:, :0], "predict: returned no channels"),
        (lambda x: object(), "predict: returned something that is not an array"),
    ],
)
def test_predict_returning_wrong_shapes(predict, match):
    with pytest.raises(CellSegError, match=match):
        infer.sliding_window(predict, _image((40, 40)), 16, 16, batch_size=2)


def test_predict_changing_its_channels():
    calls = []

    def predict(x):
        calls.append(1)
        return x if len(calls) == 1 else x[:, :2]

    with pytest.raises(CellSegError, match="predict: returned 2 channels, but 3 on its first"):
        infer.sliding_window(predict, _image((40, 40)), 16, 16, batch_size=2)


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def star_net() -> sd.ConvNeXtStarDist:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return sd.ConvNeXtStarDist("convnext_atto", n_rays=8)


@pytest.fixture(scope="module")
def hover_net() -> hover.ConvNeXtHover:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return hover.ConvNeXtHover("convnext_atto")


def test_model_predictor_joins_stardist_outputs(star_net):
    star_net.train()
    predict = infer.model_predictor(star_net)
    assert not star_net.training
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = predict(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (2, 9, 64, 64)
    with torch.no_grad():
        prob, dist = star_net(x)
    np.testing.assert_allclose(out, torch.cat([prob, dist], 1).numpy(), atol=1e-5)
    plain = infer.model_predictor(star_net, channels_last=False, outputs="concat")(x)
    np.testing.assert_allclose(plain, out, atol=1e-5)


def test_model_predictor_hover_and_custom_outputs(hover_net):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = infer.model_predictor(hover_net)(x)
    assert out.shape == (1, 3, 64, 64)
    with torch.no_grad():
        cp, hv = hover_net(x)
    np.testing.assert_allclose(out[:, 0], hover.foreground_probability(cp).numpy(), atol=1e-5)
    np.testing.assert_allclose(out[:, 1:], hv.numpy(), atol=1e-5)
    hv_only = infer.model_predictor(hover_net, outputs=lambda o: o.hv)(x)
    np.testing.assert_allclose(hv_only, hv.numpy(), atol=1e-5)


def test_model_predictor_autocast_on_cpu(star_net):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    exact = infer.model_predictor(star_net)(x)
    fast = infer.model_predictor(star_net, amp=True)(x)  # bfloat16 on a CPU
    assert fast.dtype == np.float32
    np.testing.assert_allclose(fast[:, 0], exact[:, 0], atol=0.05)


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        ("net.pt", {}, "model: expected a torch.nn.Module, got str"),
        (None, {"outputs": "both"}, "outputs: expected one of 'auto', 'concat', 'hover'"),
        (None, {"device": "abacus"}, "device: cannot use 'abacus'"),
    ],
)
def test_model_predictor_errors(star_net, model, kwargs, match):
    with pytest.raises(CellSegError, match=match):
        infer.model_predictor(star_net if model is None else model, **kwargs)


def test_model_predictor_outputs_must_give_a_tensor(star_net):
    predict = infer.model_predictor(star_net, outputs=lambda out: out[0].numpy())
    with pytest.raises(CellSegError, match="outputs: the model's output became a ndarray"):
        predict(torch.zeros(1, 3, 32, 32))


def test_stream_maps(star_net, hover_net):
    image = _image((70, 90))
    prob, dist = infer.stardist_maps(star_net, image, tile=64, stride=48)
    assert prob.shape == (70, 90) and dist.shape == (8, 70, 90)
    assert 0 <= prob.min() and prob.max() <= 1 and dist.min() >= 0
    fg, hv = infer.hover_maps(hover_net, image, tile=64, stride=32)
    assert fg.shape == (70, 90) and hv.shape == (2, 70, 90)
    assert 0 <= fg.min() and fg.max() <= 1


def test_maps_of_a_hover_network_with_cores():
    from cellseg_lite.streams.hover import ConvNeXtHover

    torch.manual_seed(0)
    net = ConvNeXtHover("convnext_atto", cores=True).eval()
    image = _image((70, 90))
    for tta in (False, True):
        maps = infer.hover_maps(net, image, tile=64, stride=32, tta=tta)
        assert isinstance(maps, infer.HoverCoreMaps)
        assert maps.hv.shape == (2, 70, 90) and maps.core_prob.shape == (70, 90)
        assert 0 <= maps.core_prob.min() and maps.core_prob.max() <= maps.foreground_prob.max() <= 1
    # the core probability seeds the watershed; without it the HV slopes do
    thresholds = {"prob_thresh": 0.5, "core_threshold": 0.3}
    labels = infer.hover_steps(maps, thresholds).labels
    assert np.array_equal(
        labels,
        hover.instances(maps.foreground_prob, maps.hv, 0.5, core_prob=maps.core_prob,
                        core_threshold=0.3),
    )  # fmt: skip
    plain = infer.HoverMaps(maps.foreground_prob, maps.hv)
    assert np.array_equal(
        infer.hover_steps(plain, thresholds).labels,
        hover.instances(*plain, 0.5, core_threshold=0.3),
    )


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((32, 32), np.float32), r"expected the network input \(H, W, 3\)"),
        (np.zeros((32, 32, 3), np.uint8), "expected floats in"),
        (np.full((32, 32, 3), 255.0, np.float32), r"found \[255, 255\].*normalize_image"),
        (np.full((32, 32, 3), np.nan, np.float32), r"expected values in \[0, 1\]"),
    ],
)
def test_stream_maps_want_the_network_input(star_net, image, match):
    with pytest.raises(CellSegError, match=match):
        infer.stardist_maps(star_net, image, tile=32, stride=32)


# --------------------------------------------------------------------------- test-time flips


def _exact_maps(kind: str):
    """A "network" that reads instance labels from channel 0 of its tiles and returns the exact
    targets of the stream: flip-equivariant in the stream's own way, as a perfect model is."""

    def predict(x: torch.Tensor) -> np.ndarray:
        out = []
        for labels in x[:, 0].numpy().round().astype(np.int32):
            if kind == "stardist":
                t = sd.targets(labels, n_rays=8)
                out.append(np.concatenate([t.prob[None], t.dist]))
            else:
                t = hover.targets(labels)
                out.append(np.concatenate([t.foreground[None], t.hv]))
        return np.stack(out)

    return predict


@pytest.fixture(scope="module")
def label_tiles() -> torch.Tensor:
    _, labels = synthetic.make_image(0, size=(96, 112), seed=3)
    labels = torch.from_numpy(labels.astype(np.float32))
    return torch.stack([labels, labels * 0, labels * 0])[None]


@pytest.mark.parametrize("kind", ["stardist", "hover"])
def test_flips_averaged_leave_exact_maps_unchanged(label_tiles, kind):
    plain = _exact_maps(kind)(label_tiles)
    averaged = infer.flip_averaged(_exact_maps(kind), kind)(label_tiles)
    assert averaged.shape == plain.shape and averaged.dtype == np.float32
    np.testing.assert_allclose(averaged, plain, atol=1e-4)


def test_flips_must_be_undone_the_streams_way(label_tiles):
    """Flipping the maps back like a probability is wrong for offsets and rays: a mirrored cell's
    horizontal offsets change sign, so plain flips average them towards 0."""
    plain = _exact_maps("hover")(label_tiles)
    naive = infer.flip_averaged(_exact_maps("hover"), "scalar")(label_tiles)
    np.testing.assert_allclose(naive[:, 0], plain[:, 0], atol=1e-6)
    assert np.abs(naive[:, 1:]).max() < 1e-5 < np.abs(plain[:, 1:]).max()
    plain = _exact_maps("stardist")(label_tiles)
    naive = infer.flip_averaged(_exact_maps("stardist"), "scalar")(label_tiles)
    assert np.abs(naive[:, 1:] - plain[:, 1:]).max() > 5  # pixels, on rays that were not swapped


def test_stream_maps_with_flips(star_net, hover_net):
    image = _image((70, 90), seed=4)
    plain = infer.hover_maps(hover_net, image, tile=64, stride=32)
    flipped = infer.hover_maps(hover_net, image, tile=64, stride=32, tta=True)
    assert flipped.hv.shape == plain.hv.shape and not np.allclose(flipped.hv, plain.hv)
    x = torch.from_numpy(image[:64, :64].transpose(2, 0, 1).copy())[None]
    predict = infer.model_predictor(hover_net)
    by_hand = np.mean(
        [predict(x), *(_undo(predict(torch.flip(x, d)), d) for d in ([3], [2], [2, 3]))], 0
    )
    np.testing.assert_allclose(infer.flip_averaged(predict, "hover")(x), by_hand, atol=1e-5)
    prob, dist = infer.stardist_maps(star_net, image, tile=64, stride=48, tta=True)
    assert prob.shape == (70, 90) and dist.shape == (8, 70, 90) and dist.min() >= 0


def _undo(maps: np.ndarray, dims: list[int]) -> np.ndarray:
    """HoVer maps of a flipped tile, flipped back by hand: negate the offset across each mirror."""
    maps = np.flip(maps, dims).copy()
    maps[:, 1] *= -1 if 3 in dims else 1
    maps[:, 2] *= -1 if 2 in dims else 1
    return maps


@pytest.mark.parametrize(
    ("predict", "maps", "match"),
    [
        (None, "hover", "predict: expected a function"),
        (identity, "dihedral", "maps: expected one of 'stardist', 'hover', 'scalar'"),
        (lambda x: x[:, :2], "hover", "2 channels are not HoVer maps"),
        (lambda x: torch.cat([x, x], 1), "hover", "8 channels are not HoVer maps"),
        (lambda x: x[:, :1], "stardist", "1 channels are not StarDist maps"),
        (lambda x: torch.cat([x, x[:, :2]], 1), "stardist", "6 channels are not StarDist"),
        (lambda x: x[:, :, :8], "scalar", "test-time flips need maps"),
    ],
)
def test_flip_averaged_errors(predict, maps, match):
    with pytest.raises(CellSegError, match=match):
        infer.flip_averaged(predict, maps)(torch.zeros(1, 4, 16, 16))


# --------------------------------------------------------------------------- StarDist, tiled

SHAPE = (190, 250)
TILING = {"tile": 64, "stride": 48}


@pytest.fixture(scope="module")
def oracle():
    """An exact-target "network": the image's two channels are each pixel's row and column, and
    predict looks its tiles up in the StarDist targets of known labels (the whole image's maps)."""
    labels = synthetic.voronoi_labels(SHAPE, 60, seed=1)
    prob, dist = sd.targets(labels, n_rays=16)
    maps = torch.from_numpy(np.concatenate([prob[None], dist]))
    rows, cols = np.indices(SHAPE)
    image = np.stack([rows, cols], axis=-1).astype(np.float32)

    def predict(x):
        return maps[:, x[:, 0].long(), x[:, 1].long()].permute(1, 0, 2, 3)

    return image, predict, labels


def _full_map_labels(predict, image, **kwargs):
    maps = infer.sliding_window(predict, image, **TILING)
    return sd.instances(maps[0], maps[1:], **kwargs), maps


@pytest.mark.parametrize("candidate_stride", [4, 1])
@pytest.mark.parametrize("block", [16, 64, 100, 1000])
def test_tiled_equals_the_full_map(oracle, block, candidate_stride):
    image, predict, labels = oracle
    expected, maps = _full_map_labels(predict, image, stride=candidate_stride)
    found = infer.stardist_candidates_tiled(
        predict, image, block=block, candidate_stride=candidate_stride, **TILING
    )
    candidates = sd.select_candidates(maps[0], maps[1:], stride=candidate_stride)
    assert len(candidates.points) < sd.CODE_MAX_CANDIDATES  # the whole-map cap stays off
    for a, b in zip(found, candidates, strict=True):
        np.testing.assert_array_equal(a, b)
    tiled = infer.stardist_instances_tiled(
        predict, image, block=block, candidate_stride=candidate_stride, **TILING
    )
    assert tiled.dtype == np.int32 and tiled.shape == SHAPE
    np.testing.assert_array_equal(tiled, expected)
    assert metrics.f1_score(labels, tiled, drop_boundary=False) == 1.0


def test_tiled_is_exact_for_position_dependent_networks(oracle):
    image, lookup, _ = oracle

    def predict(x):  # the probability dimmed towards each tile's bottom-right corner
        out = lookup(x).clone()
        ramp = torch.linspace(1.0, 0.8, x.shape[-1])
        out[:, 0] *= ramp[:, None] * ramp[None, :]
        return out

    expected, _ = _full_map_labels(predict, image, border=0, method="stardist")
    tiled = infer.stardist_instances_tiled(
        predict, image, block=48, border=0, method="stardist", **TILING
    )
    np.testing.assert_array_equal(tiled, expected)


def test_tiled_with_its_own_context(oracle):
    image, predict, labels = oracle
    for context in (0, 40):
        tiled = infer.stardist_instances_tiled(predict, image, block=64, context=context, **TILING)
        assert metrics.f1_score(labels, tiled, drop_boundary=False) == 1.0


def test_tiled_cap_applies_per_block(oracle):
    image, predict, _ = oracle
    every = infer.stardist_candidates_tiled(predict, image, block=96, **TILING)
    capped = infer.stardist_candidates_tiled(
        predict, image, block=96, max_candidates=10, keep_fraction=0.5, **TILING
    )
    assert len(capped.points) < len(every.points)
    assert len(capped.points) >= len(every.points) // 2  # at least half of each block stays


def test_tiled_small_images_and_nothing_found():
    tiled = infer.stardist_instances_tiled(
        lambda x: torch.zeros(x.shape[0], 5, *x.shape[2:]), _image((20, 30)), tile=32, stride=32
    )
    assert tiled.shape == (20, 30) and tiled.dtype == np.int32 and not tiled.any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block": 0}, "block: expected an integer >= 1"),
        ({"context": -1}, "context: expected an integer >= 0"),
        ({"candidate_stride": 0}, "candidate_stride: expected an integer >= 1"),
        ({"prob_thresh": 1.5}, r"prob_thresh: expected a value in \[0, 1\]"),
        ({"nms_thresh": -0.1}, r"nms_thresh: expected a number in \[0, 1\]"),
        ({"max_candidates": 0}, "max_candidates: expected an integer >= 1"),
        ({"border": -2}, "border: expected an integer >= 0"),
        ({"method": "fill"}, "method: expected one of 'star', 'stardist'"),
        ({"stride_": 4}, "stride_: not a setting of the tiled StarDist post-processing"),
        ({"tile": 32, "stride": 40}, "stride: a step of 40 is larger than the tile"),
    ],
)
def test_tiled_settings_are_checked_before_predicting(kwargs, match):
    calls = []
    settings = {"tile": 32, "stride": 32, **kwargs}
    with pytest.raises(CellSegError, match=match):
        infer.stardist_instances_tiled(calls.append, _image((40, 40)), **settings)
    assert not calls


@pytest.mark.parametrize(
    ("predict", "match"),
    [
        (lambda x: x, "predict: returned 3 channels; StarDist needs 1 \\+ R"),
        (lambda x: torch.full((x.shape[0], 4, *x.shape[2:]), 2.0), "prob: values must be"),
    ],
)
def test_tiled_needs_stardist_maps(predict, match):
    with pytest.raises(CellSegError, match=match):
        infer.stardist_instances_tiled(predict, _image((40, 40)), tile=32, stride=32)


# --------------------------------------------------------------------------- test-time scales


def _exact_maps_of(labels: np.ndarray, kind: str):
    """A "network" of whole images that returns the exact targets of ``labels`` resized to the
    image it is given: what a perfect model sees at any scale."""
    from skimage.transform import resize

    def maps_of(x: np.ndarray) -> np.ndarray:
        sized = resize(labels, x.shape[:2], order=0, anti_aliasing=False, preserve_range=True)
        sized = sized.astype(np.int32)
        if kind == "stardist":
            t = sd.targets(sized, n_rays=8)
            return np.concatenate([t.prob[None], t.dist])
        t = hover.targets(sized)
        return np.concatenate([t.foreground[None], t.hv])

    return maps_of


def test_scale_averaged_maps_mean_the_same_as_the_own_scale_maps():
    image, labels = synthetic.make_image(0, size=(96, 112), seed=3)
    inside = labels > 0
    star = _exact_maps_of(labels, "stardist")
    own, averaged = star(image), infer.scale_averaged(star, image, (1, 1.5), "stardist")
    assert averaged.shape == own.shape and averaged.dtype == np.float32
    ratio = averaged[1:, inside].mean() / own[1:, inside].mean()
    assert abs(ratio - 1) < 0.05  # distances of the enlarged image are divided by its scale
    naive = infer.scale_averaged(star, image, (1, 1.5), "scalar")
    assert naive[1:, inside].mean() / own[1:, inside].mean() > 1.2  # 1.25 without the division
    hv = _exact_maps_of(labels, "hover")
    own, averaged = hv(image), infer.scale_averaged(hv, image, (1.0, 1.5), "hover")
    assert np.abs(averaged[1:, inside] - own[1:, inside]).mean() < 0.05  # offsets are scale-free
    assert metrics.f1_score(labels, hover.instances(averaged[0], averaged[1:])) > 0.95
    same = infer.scale_averaged(hv, image, (1,), "hover")
    np.testing.assert_array_equal(same, own)


def test_scale_averaged_checks_its_scales_and_the_maps_it_is_given():
    image = _image((40, 30))
    with pytest.raises(CellSegError, match="scales: expected distinct numbers > 0"):
        infer.scale_averaged(lambda x: x.transpose(2, 0, 1), image, (1, 1), "scalar")
    for bad in ((), (0,), (1, float("nan")), "1.5", (True,)):
        with pytest.raises(CellSegError, match="expected distinct numbers > 0"):
            infer.map_scales_of(bad)
    with pytest.raises(CellSegError, match=r"maps_of: an input of 60 x 45 gave maps of shape"):
        infer.scale_averaged(lambda x: np.zeros((1, 40, 30)), image, (1, 1.5), "scalar")
    with pytest.raises(CellSegError, match="maps: expected one of"):
        infer.scale_averaged(lambda x: x.transpose(2, 0, 1), image, (1, 1.5), "offsets")
