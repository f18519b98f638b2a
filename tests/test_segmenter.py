"""The multi-stream segmenter: routing, raw images of every kind, one-file save/load, bounded memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellseg_lite import CellSegError, infer, io, router, synthetic, train
from cellseg_lite.streams.hover import ConvNeXtHover
from cellseg_lite.streams.stardist import ConvNeXtStarDist

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def streams():
    torch.manual_seed(0)
    sd_config = train.preset("fast", n_rays=8)
    star = infer.StreamModel(
        ConvNeXtStarDist("convnext_atto", n_rays=8).eval(), "stardist",
        {"prob_thresh": 0.5, "nms_thresh": 0.4}, sd_config,
    )  # fmt: skip
    hv = infer.StreamModel(
        ConvNeXtHover("convnext_atto").eval(), "hover", {"prob_thresh": 0.6},
        train.preset("fast", stream="hover"),
    )  # fmt: skip
    return star, hv


@pytest.fixture(scope="module")
def segmenter(streams):
    star, hv = streams
    torch.manual_seed(0)
    return infer.MultiStreamSegmenter(
        router.Router(router.build_router().eval()), {0: star, 1: hv, 2: star, 3: star}
    )


def test_routings_follow_the_paper_the_code_and_the_cpu_choice():
    assert infer.ROUTINGS["paper"] == {0: "stardist", 1: "hover", 2: "stardist", 3: "stardist"}
    assert infer.ROUTINGS["code"] == {0: "stardist", 1: "stardist", 2: "stardist", 3: "hover"}
    assert infer.ROUTINGS["hover"] == dict.fromkeys(range(4), "hover")
    assert infer.CODE_TALL_IMAGE == 4000


def test_the_stream_of_each_class(segmenter):
    assert [segmenter.stream_for(c) for c in range(4)] == [
        "stardist",
        "hover",
        "stardist",
        "stardist",
    ]
    assert segmenter.route(np.zeros((40, 40), np.uint16)) == 0  # one channel: the channel rule
    assert "routing='paper'" in repr(segmenter)


def test_code_routing_sends_tall_images_to_stardist(streams):
    star, hv = streams
    code = infer.MultiStreamSegmenter(
        router.Router(), {0: star, 1: star, 2: star, 3: hv}, routing="code"
    )
    assert code.stream_for(3) == "hover"
    assert code.stream_for(np.zeros((4001, 8), np.uint8)) == "stardist"


@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(0).integers(0, 4000, (70, 90), dtype=np.uint16),
        np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8),
        np.random.default_rng(2).random((50, 60, 4), dtype=np.float32),
        np.random.default_rng(3).integers(0, 255, (48, 80, 1), dtype=np.uint8),
    ],
    ids=["gray-16bit", "rgb-8bit", "4-channel-float", "one-channel-axis"],
)
def test_segment_takes_raw_images_of_every_kind(segmenter, image):
    labels = segmenter.segment(image)
    assert labels.shape == image.shape[:2] and labels.dtype == np.int32


def test_segment_reads_a_path_and_takes_a_class(segmenter, tmp_path):
    from cellseg_lite import io

    image, _ = synthetic.make_image(1, size=(64, 64), seed=0)
    io.write_image(tmp_path / "x.png", image)
    by_path = segmenter.segment(tmp_path / "x.png", category=1)
    assert np.array_equal(by_path, segmenter.segment(image, category=1))
    with pytest.raises(CellSegError, match="category: expected a class 0-3"):
        segmenter.segment(image, category=7)
    with pytest.raises(CellSegError, match="expected a 2-D image"):
        segmenter.segment(np.zeros((2, 3, 4, 5)))


def test_segment_normalises_as_the_training_data(segmenter, monkeypatch):
    from cellseg_lite import io

    image = np.random.default_rng(0).integers(10, 16, (64, 64)).astype(np.uint16)
    image[30:33, 20:24] = 900  # sparse: the baseline's rule would stretch the noise
    seen = []
    monkeypatch.setattr(segmenter, "min_diameter", None)
    monkeypatch.setattr(segmenter, "_segment", lambda model, x, progress: seen.append(x) or 0)
    segmenter.segment(image, category=0)
    expected = io.normalize_image(image, sparse_cells=True).astype(np.float32) / 255.0
    np.testing.assert_array_equal(seen[0], expected)
    monkeypatch.setattr(segmenter, "sparse_cells", False)  # the challenge's rule, as it is
    segmenter.segment(image, category=0)
    np.testing.assert_array_equal(seen[1], io.normalize_image(image).astype(np.float32) / 255.0)
    assert not np.array_equal(seen[0], seen[1])


def test_whole_slide_images_take_the_bounded_memory_path(segmenter, monkeypatch):
    monkeypatch.setattr(segmenter, "min_diameter", None)  # one pass at the image's own scale
    monkeypatch.setattr(segmenter, "mirror_context", 0)  # whole slides go without it
    monkeypatch.setattr(segmenter, "whole_image_side", None)  # the same window both ways
    image, _ = synthetic.make_image(0, size=(160, 224), seed=1)
    whole = segmenter.segment(image)
    monkeypatch.setattr(infer, "TILED_PIXELS", 100 * 100)
    calls = []
    original = infer.stardist_instances_tiled
    monkeypatch.setattr(
        infer, "stardist_instances_tiled", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    tiled = segmenter.segment(image)
    assert calls and np.array_equal(whole, tiled)


def test_images_are_segmented_with_mirrored_context_around_them(segmenter, monkeypatch):
    assert segmenter.mirror_context == infer.MIRROR_CONTEXT == 16
    monkeypatch.setattr(segmenter, "min_diameter", None)
    seen = []

    def segment_once(model, x, progress):  # a cell in the context and one cut by the frame
        seen.append(x.copy())
        labels = np.zeros(x.shape[:2], np.int32)
        labels[:10, :10] = 7
        labels[10:30, 10:30] = 9
        return labels

    monkeypatch.setattr(segmenter, "_segment_once", segment_once)
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    labels = segmenter.segment(image, category=0)
    x = io.normalize_image(image, sparse_cells=True).astype(np.float32) / 255.0
    assert seen[0].shape == (72, 92, 3)
    np.testing.assert_array_equal(seen[0][16:-16, 16:-16], x)
    np.testing.assert_array_equal(seen[0][15, 16:-16], x[1])  # mirrored about the first row
    assert labels.shape == (40, 60) and np.unique(labels).tolist() == [0, 1]
    assert (labels == 1).sum() == 14 * 14  # the cell cut by the frame, the context's part gone
    monkeypatch.setattr(segmenter, "mirror_context", 0)
    segmenter.segment(image, category=0)
    assert seen[1].shape == (40, 60, 3)
    monkeypatch.setattr(segmenter, "mirror_context", 16)
    monkeypatch.setattr(infer, "TILED_PIXELS", 30 * 30)  # a whole slide goes without
    segmenter.segment(image, category=0)
    assert seen[2].shape == (40, 60, 3)


def test_maps_are_what_the_first_pass_post_processes(segmenter, monkeypatch):
    from cellseg_lite.streams import hover as hv_stream
    from cellseg_lite.streams import stardist as sd_stream

    monkeypatch.setattr(segmenter, "min_diameter", None)
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    hover = segmenter.maps(image, category=1)
    star = segmenter.maps(image, category=0)
    assert isinstance(hover, infer.HoverMaps) and isinstance(star, infer.StarDistMaps)
    assert hover.foreground_prob.shape == (40, 60) and hover.hv.shape == (2, 40, 60)
    assert star.prob.shape == (40, 60) and star.dist.shape == (8, 40, 60)
    monkeypatch.setattr(segmenter, "mirror_context", 0)  # then post-processing them is segment
    fg, hv = segmenter.maps(image, category=1)
    np.testing.assert_array_equal(
        hv_stream.instances(fg, hv, 0.6), segmenter.segment(image, category=1)
    )
    prob, dist = segmenter.maps(image, category=0)
    np.testing.assert_array_equal(
        sd_stream.instances(prob, dist, 0.5, 0.4), segmenter.segment(image, category=0)
    )
    monkeypatch.setattr(infer, "TILED_PIXELS", 30 * 30)
    with pytest.raises(CellSegError, match="maps: a 40 x 60 image is a whole slide"):
        segmenter.maps(image)


def test_save_and_load_as_one_file(segmenter, tmp_path):
    path = tmp_path / "model.pt"
    segmenter.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    loaded = infer.MultiStreamSegmenter.load(path)
    assert loaded.routing == segmenter.routing
    # one StarDist model serves classes 0, 2 and 3: stored once, loaded once
    assert loaded.models[0].model is loaded.models[2].model is loaded.models[3].model
    image = np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for category in range(4):
        assert np.array_equal(
            loaded.segment(image, category=category), segmenter.segment(image, category=category)
        )


def test_loading_refuses_other_files(segmenter, tmp_path):
    with pytest.raises(CellSegError, match="segmenter file not found"):
        infer.MultiStreamSegmenter.load(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(CellSegError, match="truncated or corrupt"):
        infer.MultiStreamSegmenter.load(tmp_path / "junk.pt")
    star = segmenter.models[0]
    train.save_checkpoint(tmp_path / "stream.pt", star.model, star.config)
    with pytest.raises(CellSegError, match="single-stream checkpoint"):
        infer.MultiStreamSegmenter.load(tmp_path / "stream.pt")
    segmenter.save(tmp_path / "good.pt")
    checkpoint = torch.load(tmp_path / "good.pt", weights_only=True)
    checkpoint["models"][0]["config"]["backbone"] = "convnext_femto"
    torch.save(checkpoint, tmp_path / "other_backbone.pt")
    with pytest.raises(CellSegError, match="weights do not fit"):
        infer.MultiStreamSegmenter.load(tmp_path / "other_backbone.pt")


def test_construction_checks(streams):
    star, hv = streams
    with pytest.raises(CellSegError, match="router: expected a router.Router"):
        infer.MultiStreamSegmenter(None, {0: star, 1: hv, 2: star, 3: star})
    with pytest.raises(CellSegError, match="one stream model for each class"):
        infer.MultiStreamSegmenter(router.Router(), {0: star})
    with pytest.raises(CellSegError, match="sends class 1 to 'hover'.*'stardist' model"):
        infer.MultiStreamSegmenter(router.Router(), dict.fromkeys(range(4), star))
    with pytest.raises(CellSegError, match="routing: expected one of"):
        infer.MultiStreamSegmenter(router.Router(), dict.fromkeys(range(4), star), routing="mine")
    with pytest.raises(CellSegError, match="unknown stream"):
        infer.MultiStreamSegmenter(
            router.Router(), dict.fromkeys(range(4), star), routing=dict.fromkeys(range(4), "unet")
        )
    with pytest.raises(CellSegError, match=r"models\[0\]: expected a StreamModel"):
        infer.MultiStreamSegmenter(router.Router(), dict.fromkeys(range(4), "model.pt"))


def test_hover_models_carry_their_tuned_watershed_settings(streams, monkeypatch):
    from cellseg_lite.streams import hover

    seen = []
    original = hover.watershed_steps
    tuned_names = infer.HOVER_TUNED
    monkeypatch.setattr(
        hover,
        "watershed_steps",
        lambda *a, **k: seen.append(tuple(k.get(n) for n in tuned_names)) or original(*a, **k),
    )
    star, hv = streams
    settings = {
        "marker_threshold": 0.25,
        "marker_min_fraction": 0.1,
        "foreground_min_fraction": 0.05,
        "marker_min_prob": 0.95,
    }
    tuned = hv._replace(thresholds={"prob_thresh": 0.6, **settings})
    segmenter = infer.MultiStreamSegmenter(
        router.Router(router.build_router().eval()), {0: star, 1: tuned, 2: star, 3: star}
    )
    image, _ = synthetic.make_image(1, size=(64, 64), seed=0)
    segmenter.segment(image, category=1)
    maps = train.predict_maps(hv.model, image.astype(np.float32) / 255.0)
    train.segment_maps("hover", maps, tuned.thresholds)
    train.segment_maps("hover", maps, {"prob_thresh": 0.6})
    assert seen == [(0.25, 0.1, 0.05, 0.95, None)] * 2 + [(None,) * 5]
    assert infer.hover_settings({"prob_thresh": 0.6, **settings, "x": 1}) == settings
    grid = train._threshold_grid("hover")
    markers = {"marker_min_prob", "marker_threshold", "core_threshold"}
    assert all(set(tuned_names) - markers <= set(candidate) for candidate in grid)
    assert all("marker_threshold" in candidate for candidate in grid)  # a core network: its own
    core_grid = train._threshold_grid("hover", cores=True)
    assert {t["core_threshold"] for t in core_grid} == set(train.HOVER_CORE_THRESHOLDS)
    assert len(core_grid) == len(grid) and not any("marker_threshold" in t for t in core_grid)
    floors = {(t["marker_min_fraction"], t["foreground_min_fraction"]) for t in grid}
    assert len(floors) == len(train.HOVER_SIZE_FLOORS) > 1


def test_tuning_can_add_the_segmenters_mirrored_context(streams, monkeypatch):
    """With ``context``, tuning adds the mirrored context that the segmenter adds around an
    image and crops it from the labels after post-processing, so both score the same labels;
    by default it tunes on the bare image."""
    from cellseg_lite import metrics

    star, hv = streams
    thresholds = {"prob_thresh": 0.5}
    segmenter = infer.MultiStreamSegmenter(
        router.Router(router.build_router().eval()),
        {0: star, 1: hv._replace(thresholds=thresholds), 2: star, 3: star},
    )
    image, truth = synthetic.make_image(1, size=(64, 80), seed=0)
    segmented = segmenter.segment(image, category=1)
    assert segmented.max() > 0 and segmenter.mirror_context == infer.MIRROR_CONTEXT > 0
    inputs, scored = [], []
    original_predict, original_f1 = train.predict_maps, metrics.f1_score
    monkeypatch.setattr(
        train,
        "predict_maps",
        lambda m, x, **k: inputs.append(x.shape) or original_predict(m, x, **k),
    )
    monkeypatch.setattr(
        metrics, "f1_score", lambda t, p, **k: scored.append(p) or original_f1(t, p, **k)
    )
    val = [("image", io.normalize_image(image).astype(np.float32) / 255.0, truth)]
    pad = infer.MIRROR_CONTEXT
    f1, _ = train.evaluate_stream(hv.model, "hover", val, thresholds, context=pad)
    assert inputs == [(64 + 2 * pad, 80 + 2 * pad, 3)] and scored[0].shape == (64, 80)
    assert np.array_equal(relabel(scored[0]), segmented)
    assert f1 == original_f1(truth, segmented)
    inputs.clear()
    train.evaluate_stream(hv.model, "hover", val, thresholds)
    train.best_thresholds(hv.model, "hover", val, context=0)
    assert inputs == [(64, 80, 3)] * 2
    x = np.arange(12).reshape(3, 4)
    assert np.array_equal(infer.crop_context(infer.mirror_pad(x, 2), 2), x)
    assert infer.mirror_pad(x, 0) is x and infer.crop_context(x, 0) is x
    for bad in (-1, 1.5, True):
        with pytest.raises(CellSegError, match="pad"):
            train.evaluate_stream(hv.model, "hover", val, thresholds, context=bad)


def relabel(labels: np.ndarray) -> np.ndarray:
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(labels)[0]


def test_flips_follow_what_the_thresholds_were_tuned_on(streams, monkeypatch, tmp_path):
    flips = []
    original = infer.flip_averaged
    monkeypatch.setattr(
        infer, "flip_averaged", lambda predict, maps: flips.append(maps) or original(predict, maps)
    )
    star, hv = streams
    tuned = hv._replace(thresholds={"prob_thresh": 0.6, "tta": True})
    segmenter = infer.MultiStreamSegmenter(
        router.Router(router.build_router().eval()), {0: star, 1: tuned, 2: star, 3: star}
    )
    assert segmenter.tta is None
    image, _ = synthetic.make_image(1, size=(64, 64), seed=0)
    with_flips = segmenter.segment(image, category=1)
    segmenter.segment(image, category=0)  # StarDist, tuned without
    assert flips == ["hover"]
    x = infer.mirror_pad(io.normalize_image(image).astype(np.float32) / 255.0)
    maps = train.predict_maps(hv.model, x, tta=True)
    labels = infer.crop_context(train.segment_maps("hover", maps, tuned.thresholds))
    assert np.array_equal(with_flips, labels)
    segmenter.tta = False  # the caller's choice wins: faster, on thresholds tuned for flips
    segmenter.segment(image, category=1)
    assert flips == ["hover", "hover"]
    segmenter.tta = True
    segmenter.save(tmp_path / "flips.pt")
    loaded = infer.MultiStreamSegmenter.load(tmp_path / "flips.pt")
    assert loaded.tta is True and loaded.models[1].thresholds["tta"] is True
    loaded.segment(image, category=0)
    assert flips[-1] == "stardist"
    with pytest.raises(CellSegError, match="tta: expected True, False or None"):
        infer.MultiStreamSegmenter(router.Router(), {0: star, 1: hv, 2: star, 3: star}, tta="on")


def test_map_scales_follow_what_the_thresholds_were_tuned_on(
    streams, monkeypatch, tmp_path, scale_averaging
):
    averaged = scale_averaging
    star, hv = streams
    tuned = hv._replace(thresholds={"prob_thresh": 0.6, "tta": True, "map_scales": [1.0, 1.5]})
    segmenter = infer.MultiStreamSegmenter(
        router.Router(router.build_router().eval()), {0: star, 1: tuned, 2: star, 3: star}
    )
    assert segmenter.map_scales is None and segmenter.map_scales_for(tuned) == (1.0, 1.5)
    assert segmenter.map_scales_for(star) == (1.0,)
    image, _ = synthetic.make_image(1, size=(64, 64), seed=0)
    labels = segmenter.segment(image, category=1)
    assert averaged == [((96, 96, 3), [1.0, 1.5], "hover")]  # the image with its context
    # the segmenter post-processes the maps that training tuned the thresholds on
    x = infer.mirror_pad(io.normalize_image(image).astype(np.float32) / 255.0)
    maps = train.predict_maps(hv.model, x, tta=True, map_scales=(1, 1.5))
    expected = infer.crop_context(train.segment_maps("hover", maps, tuned.thresholds))
    assert np.array_equal(labels, expected)
    averaged.clear()
    segmenter.segment(image, category=0)  # StarDist, tuned at its own scale
    assert averaged == []
    segmenter.map_scales = infer.map_scales_of((1, 2))  # the caller's choice wins
    segmenter.segment(image, category=0)
    assert averaged == [((96, 96, 3), [1.0, 2.0], "stardist")]
    monkeypatch.setattr(infer, "TILED_PIXELS", 100 * 100)  # 2x the image would be a whole slide
    segmenter.segment(image, category=0)
    assert len(averaged) == 1
    monkeypatch.setattr(infer, "TILED_PIXELS", 4096**2)
    segmenter.save(tmp_path / "scales.pt")
    loaded = infer.MultiStreamSegmenter.load(tmp_path / "scales.pt")
    assert loaded.map_scales == (1.0, 2.0) and loaded.models[1].thresholds["map_scales"] == [1, 1.5]
    with pytest.raises(CellSegError, match="map_scales: expected distinct numbers > 0"):
        infer.MultiStreamSegmenter(
            router.Router(), {0: star, 1: hv, 2: star, 3: star}, map_scales=[0]
        )


def test_maps_averaged_over_scales_need_no_second_pass_for_small_cells(streams, monkeypatch):
    _, hv = streams
    tuned = hv._replace(thresholds={"prob_thresh": 0.6, "map_scales": [1.0, 1.5]})
    segmenter = infer.MultiStreamSegmenter(
        router.Router(router.build_router().eval()), dict.fromkeys(range(4), tuned), routing="hover"
    )
    small = _discs((96, 96), 8, 16)
    assert not segmenter._wants_upscale(small, 0, tuned)  # the average holds the larger view
    assert segmenter._wants_upscale(small, 0, hv)
    segmenter.map_scales = (1.0,)
    assert segmenter._wants_upscale(small, 0, tuned)


def test_a_tuned_size_floor_drops_specks_that_the_default_floor_keeps():
    from cellseg_lite.streams import hover

    labels = np.zeros((96, 96), np.int32)
    yy, xx = np.mgrid[:96, :96]
    for i, (y, x) in enumerate([(24, 24), (24, 70), (70, 24), (70, 70)], start=1):
        labels[(yy - y) ** 2 + (xx - x) ** 2 <= 12**2] = i
    labels[46:49, 46:49] = 5  # a 9-pixel speck, 2 % of a cell's ~450 pixels
    fg, hv = hover.targets(labels)
    maps = np.concatenate([fg[None].astype(np.float32), hv])
    default = train.segment_maps("hover", maps, {"prob_thresh": 0.5})
    strict = train.segment_maps("hover", maps, {"prob_thresh": 0.5, **train.HOVER_SIZE_FLOORS[-1]})
    assert len(np.unique(default)) - 1 == 5
    assert len(np.unique(strict)) - 1 == 4
    assert not strict[46:49, 46:49].any()


def _discs(shape, diameter, spacing):
    """Label image of discs ``diameter`` pixels wide on a grid ``spacing`` apart."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    centres = [(y, x) for y in range(spacing // 2, shape[0], spacing)
               for x in range(spacing // 2, shape[1], spacing)]  # fmt: skip
    for i, (y, x) in enumerate(centres, start=1):
        labels[(yy - y) ** 2 + (xx - x) ** 2 < (diameter / 2) ** 2] = i
    return labels


def test_inscribed_diameter_measures_cells_not_clumps():
    separate = _discs((96, 96), 10, 16)
    assert infer.inscribed_diameter(separate) == pytest.approx(10, abs=1)
    touching = _discs((96, 96), 12, 10)  # overlapping discs: every cell touches its neighbours
    clump = (touching > 0).astype(np.int32)  # one merged object
    assert infer.inscribed_diameter(clump) < 16
    assert (clump > 0).sum() > 20 * np.pi * 6**2  # although its area is that of 20+ cells
    # touching cells with their own ids are measured one by one, not as their union
    assert infer.inscribed_diameter(touching) <= 12
    assert np.isnan(infer.inscribed_diameter(np.zeros((8, 8), np.int32)))
    with pytest.raises(CellSegError, match="integer label image"):
        infer.inscribed_diameter(np.zeros((8, 8), np.float32))


def test_images_of_small_cells_are_segmented_again_larger(segmenter, monkeypatch, tmp_path):
    seen = []

    def first_pass(diameter):
        def fake(model, x, progress):
            seen.append(x.shape)
            size = diameter if len(seen) == 1 else 2 * diameter  # the second pass sees 2x cells
            return _discs(x.shape[:2], size, 2 * size)

        return fake

    image = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    monkeypatch.setattr(segmenter, "min_diameter", 13.0)  # not the defaults: this test's numbers
    monkeypatch.setattr(segmenter, "upscale", 2.0)
    monkeypatch.setattr(segmenter, "_segment", first_pass(8))
    labels = segmenter.segment(image, category=0)
    assert seen == [(60, 90, 3), (120, 180, 3)]
    assert labels.shape == (60, 90) and labels.dtype == np.int32
    assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))  # renumbered 1..N
    assert infer.inscribed_diameter(labels) == pytest.approx(8, abs=1)

    assert infer.UPSCALE_CLASSES == (0, 3) == segmenter.upscale_classes
    for category in (1, 2):  # whole cells: narrow is not small, one pass whatever the diameter
        seen.clear()
        segmenter.segment(image, category=category)
        assert seen == [(60, 90, 3)]
    monkeypatch.setattr(segmenter, "upscale_classes", (1,))
    seen.clear()
    segmenter.segment(image, category=1)
    assert seen == [(60, 90, 3), (120, 180, 3)]

    seen.clear()
    monkeypatch.setattr(segmenter, "_segment", first_pass(20))  # large enough: one pass
    segmenter.segment(image, category=0)
    assert seen == [(60, 90, 3)]

    seen.clear()
    monkeypatch.setattr(segmenter, "_segment", first_pass(8))
    monkeypatch.setattr(infer, "TILED_PIXELS", 100 * 100)  # 2x would be a whole-slide image
    segmenter.segment(image, category=0)
    assert seen == [(60, 90, 3)]

    seen.clear()
    monkeypatch.setattr(segmenter, "min_diameter", None)
    monkeypatch.setattr(infer, "TILED_PIXELS", 4096**2)
    segmenter.segment(image, category=0)
    assert seen == [(60, 90, 3)]


def test_the_small_cell_threshold_scales_with_the_output_stride(streams):
    _, hv = streams  # the paper's decoder: maps at stride 4
    torch.manual_seed(0)
    code = infer.StreamModel(
        ConvNeXtHover("convnext_atto", decoder="code").eval(), "hover", {"prob_thresh": 0.6},
        train.preset("fast", stream="hover", decoder="code"),
    )  # fmt: skip
    both = infer.MultiStreamSegmenter(
        router.Router(router.build_router().eval()), {0: hv, 1: hv, 2: hv, 3: code}, routing="hover"
    )
    assert infer.MIN_DIAMETER_STRIDE == hv.model.unet.output_stride == 4
    assert both.upscale_below(hv) == infer.MIN_DIAMETER
    assert both.upscale_below(code) == infer.MIN_DIAMETER / 2  # stride 2 resolves half as wide
    labels = _discs((96, 96), 18, 32)  # between the two thresholds
    assert 12.5 < infer.inscribed_diameter(labels) < 25
    assert both._wants_upscale(labels, 0, hv)
    assert not both._wants_upscale(labels, 3, code)
    assert both._wants_upscale(_discs((96, 96), 8, 16), 3, code)
    both.min_diameter = None
    assert both.upscale_below(hv) is None and not both._wants_upscale(labels, 0, hv)


def test_the_upscaling_normalisation_and_context_rules_are_saved_and_checked(streams, tmp_path):
    star, hv = streams
    models = {0: star, 1: hv, 2: star, 3: star}
    segmenter = infer.MultiStreamSegmenter(router.Router(), models)
    assert (segmenter.min_diameter, segmenter.upscale) == (infer.MIN_DIAMETER, infer.UPSCALE)
    custom = infer.MultiStreamSegmenter(router.Router(), models, min_diameter=None, upscale=1.5)
    custom.save(tmp_path / "custom.pt")
    loaded = infer.MultiStreamSegmenter.load(tmp_path / "custom.pt")
    assert (loaded.min_diameter, loaded.upscale) == (None, 1.5)
    every = infer.MultiStreamSegmenter(router.Router(), models, upscale_classes=[3, 1, 0, 2, 3])
    assert every.upscale_classes == (0, 1, 2, 3)
    every.save(tmp_path / "every.pt")
    assert infer.MultiStreamSegmenter.load(tmp_path / "every.pt").upscale_classes == (0, 1, 2, 3)
    for bad in (0, [4], [-1], [True], ["0"], None):
        with pytest.raises(CellSegError, match="upscale_classes: expected a collection of classes"):
            infer.MultiStreamSegmenter(router.Router(), models, upscale_classes=bad)
    for bad in (0, -3, True, "13"):
        with pytest.raises(CellSegError, match="min_diameter: expected a number > 0 or None"):
            infer.MultiStreamSegmenter(router.Router(), models, min_diameter=bad)
    for bad in (1, 0.5, False, None):
        with pytest.raises(CellSegError, match="upscale: expected a number > 1"):
            infer.MultiStreamSegmenter(router.Router(), models, upscale=bad)
    assert segmenter.sparse_cells is True
    baseline = infer.MultiStreamSegmenter(router.Router(), models, sparse_cells=False)
    baseline.save(tmp_path / "baseline.pt")
    assert infer.MultiStreamSegmenter.load(tmp_path / "baseline.pt").sparse_cells is False
    for bad in (1, "yes", None):
        with pytest.raises(CellSegError, match="sparse_cells: expected True or False"):
            infer.MultiStreamSegmenter(router.Router(), models, sparse_cells=bad)
    plain = infer.MultiStreamSegmenter(router.Router(), models, mirror_context=0)
    plain.save(tmp_path / "plain.pt")
    assert infer.MultiStreamSegmenter.load(tmp_path / "plain.pt").mirror_context == 0
    for bad in (-1, 2.5, True, None):
        with pytest.raises(CellSegError, match="mirror_context: expected an integer >= 0"):
            infer.MultiStreamSegmenter(router.Router(), models, mirror_context=bad)
    tiles = infer.MultiStreamSegmenter(router.Router(), models, whole_image_side=None)
    tiles.save(tmp_path / "tiles.pt")
    assert infer.MultiStreamSegmenter.load(tmp_path / "tiles.pt").whole_image_side is None
    assert infer.MultiStreamSegmenter.load(tmp_path / "plain.pt").whole_image_side == 2048
    for bad in (0, 2.5, True, "2048"):
        with pytest.raises(CellSegError, match="whole_image_side: expected an integer >= 1"):
            infer.MultiStreamSegmenter(router.Router(), models, whole_image_side=bad)


def test_the_ablation_segmenters_share_the_segmenters_window_and_rules(streams):
    from cellseg_lite import demo

    star, hv = streams
    segmenter = infer.MultiStreamSegmenter(
        router.Router(),
        {0: star, 1: hv, 2: star, 3: star},
        min_diameter=9.0,
        upscale=1.5,
        upscale_classes=(0,),
        sparse_cells=False,
        mirror_context=5,
        tile=256,
        stride=128,
        whole_image_side=None,
    )
    methods = demo.ablation_segmenters(segmenter, {"stardist": star, "hover": hv})
    assert list(methods)[-1] == "multi-stream (routed, fine-tuned)"
    for method in methods.values():
        rules = (method.min_diameter, method.upscale, method.upscale_classes)
        assert rules == (9.0, 1.5, (0,))
        assert (method.sparse_cells, method.mirror_context) == (False, 5)
        assert (method.tile, method.stride, method.whole_image_side) == (256, 128, None)
        assert method.router is segmenter.router


def test_a_scale_gives_one_pass_at_that_scale(segmenter, monkeypatch):
    seen = []
    monkeypatch.setattr(
        segmenter,
        "_segment",
        lambda model, x, progress: seen.append(x.shape) or _discs(x.shape[:2], 8, 16),
    )
    image = np.zeros((40, 60, 3), np.uint8)
    assert segmenter.segment(image, category=0, scale=1.5).shape == (40, 60)
    assert segmenter.segment(image, category=0, scale=1.0).shape == (40, 60)
    assert seen == [(60, 90, 3), (40, 60, 3)]
    with pytest.raises(CellSegError, match="scale: expected a number > 0"):
        segmenter.segment(image, category=0, scale=0)


def test_both_streams_segment_with_the_window_their_thresholds_were_tuned_on(
    segmenter, streams, monkeypatch
):
    class Tiled(Exception):
        pass

    windows = []

    def record(predict, image, tile=512, stride=384, **_):
        windows.append((tile, stride))
        raise Tiled  # the window is all this test needs, not the maps

    monkeypatch.setattr(infer, "sliding_window", record)
    image = np.random.default_rng(0).integers(0, 255, (1100, 1000, 3), dtype=np.uint8)

    def windows_of_both_streams():
        windows.clear()
        for category in (0, 1):  # StarDist, HoVer
            with pytest.raises(Tiled):
                segmenter.segment(image, category=category)
        for stream in streams:  # the validation maps that train tunes the thresholds on
            with pytest.raises(Tiled):
                train.predict_maps(stream.model, image.astype(np.float32) / 255.0)
        return windows

    assert segmenter.whole_image_side == infer.WHOLE_IMAGE_SIDE >= 1100 + 2 * 16
    assert windows_of_both_streams() == [(None, None)] * 4  # one pass
    monkeypatch.setattr(segmenter, "whole_image_side", 1000)
    monkeypatch.setattr(infer, "WHOLE_IMAGE_SIDE", 1000)
    assert windows_of_both_streams() == [(512, 384)] * 4
    tiled = infer.MultiStreamSegmenter(
        segmenter.router, segmenter.models, stride=256, whole_image_side=None
    )
    with pytest.raises(Tiled):  # the authors' HoVer window, by name of its stride
        tiled.segment(image, category=1)
    assert windows[-1] == (512, 256)


def test_one_pass_covers_images_up_to_its_side_but_never_whole_slides(segmenter, monkeypatch):
    seen = []

    def sliding_window(predict, image, tile=512, stride=384, **_):
        seen.append(tile)
        return np.zeros((3, *image.shape[:2]), np.float32)

    monkeypatch.setattr(infer, "sliding_window", sliding_window)
    monkeypatch.setattr(segmenter, "min_diameter", None)
    for side in (40, 100):
        segmenter.segment(np.zeros((side, side + 20, 3), np.uint8), category=1)
    monkeypatch.setattr(segmenter, "whole_image_side", 100)  # 100 + 20 + 2 * 16 > 100
    segmenter.segment(np.zeros((100, 120, 3), np.uint8), category=1)
    monkeypatch.setattr(segmenter, "whole_image_side", None)  # the paper's tiles
    segmenter.segment(np.zeros((40, 60, 3), np.uint8), category=1)  # smaller than a tile
    assert seen == [None, None, 160, 96]
    monkeypatch.setattr(segmenter, "whole_image_side", 10**6)
    monkeypatch.setattr(infer, "TILED_PIXELS", 50 * 50)  # a whole slide: tiles, whatever the side
    assert segmenter._tiling(np.zeros((60, 60, 3))) == (64, 64)
    assert segmenter._tiling(np.zeros((40, 60, 3))) == (None, None)
