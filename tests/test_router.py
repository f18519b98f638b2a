"""Tests for cellseg_lite.router: the ResNet18, its preprocessing, training, prediction and checkpoints.

Networks run on tiny inputs (``Preprocessing(resize=40, crop=32)``) and training runs for one or
two steps, so the whole file takes seconds on a 2-core CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import cellseg_lite
from cellseg_lite import CellSegError, io, router, synthetic
from cellseg_lite._weights import PretrainedWeightsWarning
from cellseg_lite.categorize import CATEGORY_NAMES
from cellseg_lite.router import (
    Preprocessing,
    Router,
    RouterPrediction,
    balanced_sample_weights,
    build_router,
    class_weights,
    load_router,
    predict,
    predict_batch,
    save_router,
    train_router,
)

TINY = Preprocessing(resize=40, crop=32)


def seeded_router(seed: int = 0, preprocessing: Preprocessing = TINY) -> Router:
    """A randomly initialised router, the same for the same seed (global RNG left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Router(build_router(), preprocessing=preprocessing)


@pytest.fixture(scope="module")
def tiny_router() -> Router:
    return seeded_router()


@pytest.fixture(scope="module")
def tiny_set() -> tuple[list[np.ndarray], list[int]]:
    """Two synthetic images per class (128 x 128: class 2 needs room for a large cell)."""
    images, categories = [], []
    for category in range(4):
        for seed in range(2):
            image, _ = synthetic.make_image(category, size=(128, 128), seed=seed)
            images.append(image)
            categories.append(category)
    return images, categories


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quick(images, categories, **settings):
    """train_router with tiny inputs, one epoch of two steps and no progress bar."""
    options = dict(epochs=1, batch_size=4, preprocessing=TINY, progress=False, device="cpu")
    options.update(settings)
    return train_router(images, categories, **options)


@pytest.fixture(scope="module")
def trained(tiny_set) -> tuple[Router, router.TrainingHistory]:
    """One quick training run (seed 3, paper's router: no channel rule), shared by several tests."""
    return quick(*tiny_set, seed=3, channel_rule=False)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


# ----------------------------------------------------------------------------- the network


def test_forward_shape_and_size():
    model = build_router().eval()
    with torch.inference_mode():
        logits = model(torch.zeros(2, 3, 224, 224))
    assert logits.shape == (2, 4)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.fc.in_features == 512 and model.fc.out_features == 4
    # ResNet18's 11.69 M parameters, minus the 1000-way head, plus a 4-way one
    assert sum(p.numel() for p in model.parameters()) == 11_178_564


def test_num_classes_is_checked():
    assert build_router(num_classes=3).fc.out_features == 3
    with pytest.raises(CellSegError, match="num_classes: expected an integer >= 2"):
        build_router(num_classes=1)


def test_pretrained_loads_the_imagenet_weights(monkeypatch):
    asked = []

    def fake_download(self, *args, **kwargs):
        asked.append(self)
        state = torchvision.models.resnet18().state_dict()
        state["conv1.weight"] = torch.full_like(state["conv1.weight"], 0.25)
        return state

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake_download)
    model = build_router(pretrained=True)
    assert asked == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1]
    assert torch.all(model.conv1.weight == 0.25)
    assert model.fc.out_features == 4


def test_pretrained_offline_falls_back_with_a_warning(monkeypatch):
    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.warns(PretrainedWeightsWarning, match="router.*could not fetch.*random"):
        model = build_router(pretrained=True)
    assert model.fc.out_features == 4


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize(
    ("shape", "cached"),
    [
        ((32, 48), (40, 60)),
        ((300, 100), (120, 40)),
        ((64, 64, 3), (40, 40)),
        ((1000, 50, 4), (800, 40)),
    ],
)
def test_cache_resizes_the_short_side_and_keeps_the_aspect_ratio(shape, cached):
    image = np.random.default_rng(0).integers(1, 255, shape).astype(np.uint8)
    tensor = TINY.cache(image)
    assert tensor.dtype == torch.uint8
    assert tuple(tensor.shape) == (3, *cached)


def test_eval_transform_scales_to_unit_range_then_applies_imagenet_statistics():
    cached = torch.full((3, 40, 50), 51, dtype=torch.uint8)  # 51 / 255 = 0.2
    x = TINY.eval_transform()(cached)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = (0.2 - torch.tensor(router.IMAGENET_MEAN)) / torch.tensor(router.IMAGENET_STD)
    torch.testing.assert_close(x[:, 0, 0], expected)


def test_train_transform_gives_the_network_input_size():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x = TINY.train_transform()(torch.zeros((3, 40, 90), dtype=torch.uint8))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_paper_preprocessing_is_the_default():
    p = Preprocessing()
    assert (p.resize, p.crop, p.scale, p.rotation, p.flip) == (256, 224, (0.8, 1.0), 15.0, 0.5)
    assert p.mean == router.IMAGENET_MEAN and p.std == router.IMAGENET_STD


def test_preprocessing_round_trips_through_a_plain_dict():
    p = Preprocessing(resize=128, crop=112, rotation=0)
    settings = p.to_dict()
    assert all(isinstance(v, int | float | str | list) for v in settings.values())
    assert Preprocessing.from_dict(settings) == p


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"resize": 0}, "resize: expected a positive integer"),
        ({"resize": 2.5}, "resize: expected a positive integer"),
        ({"crop": 300}, r"crop: must not exceed resize \(256\)"),
        ({"resize": 24, "crop": 16}, "crop: ResNet18 needs at least 32 pixels"),
        ({"mean": (0.5, 0.5)}, "mean: expected three finite numbers"),
        ({"mean": "abc"}, r"mean: expected three numbers \(R, G, B\)"),
        ({"std": (0.2, 0.0, 0.2)}, "std: must be positive"),
        ({"scale": (0.0, 1.0)}, "scale: need 0 < low <= high <= 1"),
        ({"scale": 0.5}, "scale: expected two numbers"),
        ({"rotation": -5}, r"rotation: expected degrees in \[0, 180\]"),
        ({"flip": 1.5}, r"flip: expected a probability in \[0, 1\]"),
    ],
)
def test_bad_preprocessing_settings(settings, message):
    with pytest.raises(CellSegError, match=message):
        Preprocessing(**settings)


def test_incomplete_or_unknown_preprocessing_settings():
    with pytest.raises(CellSegError, match="preprocessing settings are missing or incomplete"):
        Preprocessing.from_dict({"resize": 256})
    settings = Preprocessing().to_dict()
    settings["normalisation"] = "z-score"
    with pytest.raises(CellSegError, match="unknown image normalisation 'z-score'"):
        Preprocessing.from_dict(settings)


# ----------------------------------------------------------------------------- prediction

RNG = np.random.default_rng(7)
RAW_IMAGES = {
    "gray (H, W) uint8": RNG.integers(0, 256, (60, 70)).astype(np.uint8),
    "gray (H, W, 1) uint16": RNG.integers(0, 65536, (60, 70, 1)).astype(np.uint16),
    "RGB uint8": RNG.integers(0, 256, (60, 70, 3)).astype(np.uint8),
    "RGBA uint8": RNG.integers(0, 256, (60, 70, 4)).astype(np.uint8),
    "RGB uint16": RNG.integers(0, 65536, (60, 70, 3)).astype(np.uint16),
    "RGB float32": RNG.random((60, 70, 3)).astype(np.float32),
    "tiny 32 x 48": RNG.integers(0, 256, (32, 48, 3)).astype(np.uint8),
    "non-square 40 x 400": RNG.integers(0, 256, (40, 400, 3)).astype(np.uint8),
    "five channels": RNG.integers(0, 256, (50, 50, 5)).astype(np.uint8),
}


@pytest.mark.parametrize("name", list(RAW_IMAGES))
def test_predict_any_raw_image_through_the_network(tiny_router, name):
    result = predict(tiny_router, RAW_IMAGES[name], channel_rule=False)
    assert isinstance(result, RouterPrediction)
    assert result.probabilities.shape == (4,)
    assert result.probabilities.sum() == pytest.approx(1.0)
    assert np.all(result.probabilities > 0)  # a softmax, not the rule's one-hot
    assert result.category == int(np.argmax(result.probabilities))


def test_predict_accepts_a_bare_model_with_the_paper_preprocessing():
    model = build_router()
    result = predict(model, RAW_IMAGES["tiny 32 x 48"])
    assert 0 <= result.category < 4
    assert model.training  # the caller's mode is restored


def test_predict_reads_files(tiny_router, tmp_path):
    io.write_image(tmp_path / "rgb.png", RAW_IMAGES["RGB uint8"])
    io.write_image(tmp_path / "gray.tif", RAW_IMAGES["gray (H, W, 1) uint16"])
    from_file = predict(tiny_router, tmp_path / "rgb.png")
    from_array = predict(tiny_router, RAW_IMAGES["RGB uint8"])
    np.testing.assert_allclose(from_file.probabilities, from_array.probabilities)
    assert predict(tiny_router, str(tmp_path / "gray.tif")).category == 0


def test_batched_prediction_equals_one_at_a_time(tiny_router):
    images = list(RAW_IMAGES.values())
    batched = predict_batch(tiny_router, images, batch_size=3)
    assert len(batched) == len(images)
    for image, result in zip(images, batched, strict=True):
        single = tiny_router.predict(image)
        assert result.category == single.category
        np.testing.assert_allclose(result.probabilities, single.probabilities, atol=1e-5)


class _Refuses(nn.Module):
    """A model that fails if it is ever run: proves the channel rule skips the network."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        raise AssertionError("the network was run")


@pytest.mark.parametrize("name", ["gray (H, W) uint8", "gray (H, W, 1) uint16"])
def test_channel_rule_routes_one_channel_images_without_the_network(name):
    rule = Router(_Refuses(), preprocessing=TINY)
    result = rule.predict(RAW_IMAGES[name])
    assert result.category == 0
    np.testing.assert_array_equal(result.probabilities, [1.0, 0.0, 0.0, 0.0])
    with pytest.raises(AssertionError, match="the network was run"):
        rule.predict(RAW_IMAGES[name], channel_rule=False)


def test_channel_rule_leaves_colour_images_to_the_network(tiny_router):
    with pytest.raises(AssertionError, match="the network was run"):
        Router(_Refuses(), preprocessing=TINY).predict(RAW_IMAGES["RGB uint8"])
    on = tiny_router.predict(RAW_IMAGES["RGB uint8"], channel_rule=True)
    off = tiny_router.predict(RAW_IMAGES["RGB uint8"], channel_rule=False)
    np.testing.assert_array_equal(on.probabilities, off.probabilities)


def test_the_routers_own_channel_rule_setting_is_the_default():
    paper = Router(_Refuses(), preprocessing=TINY, channel_rule=False)
    with pytest.raises(AssertionError, match="the network was run"):
        paper.predict(RAW_IMAGES["gray (H, W) uint8"])
    assert paper.predict(RAW_IMAGES["gray (H, W) uint8"], channel_rule=True).category == 0


def test_prediction_errors(tiny_router, tmp_path):
    with pytest.raises(CellSegError, match="router: expected a router.Router or a torch.nn.Module"):
        predict("resnet18", RAW_IMAGES["RGB uint8"])
    with pytest.raises(CellSegError, match="images: expected a sequence of images, got a single"):
        predict_batch(tiny_router, RAW_IMAGES["RGB uint8"])
    with pytest.raises(CellSegError, match=r"^image: expected a 2-D image"):
        tiny_router.predict(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(CellSegError, match=r"images\[1\]: the image contains NaN"):
        tiny_router.predict_batch([RAW_IMAGES["RGB uint8"], np.full((8, 8, 3), np.nan)])
    with pytest.raises(CellSegError, match="missing.png'?: file not found"):
        tiny_router.predict(tmp_path / "missing.png")
    with pytest.raises(CellSegError, match="batch_size: expected a positive integer"):
        tiny_router.predict_batch([RAW_IMAGES["RGB uint8"]], batch_size=0)


def test_router_constructor_checks_its_arguments():
    with pytest.raises(CellSegError, match="model: expected a torch.nn.Module"):
        Router("resnet18")
    with pytest.raises(CellSegError, match="preprocessing: expected a router.Preprocessing"):
        Router(preprocessing={"resize": 256})
    default = Router()
    assert default.class_names == [CATEGORY_NAMES[c] for c in range(4)]
    assert "resize=256, crop=224, channel_rule=True" in repr(default)


# ----------------------------------------------------------------------------- class balance


def test_balanced_sample_weights_give_every_class_the_same_mass():
    categories = [0, 0, 0, 1, 2, 2]
    weights = balanced_sample_weights(categories)
    np.testing.assert_allclose(weights, [1 / 3, 1 / 3, 1 / 3, 1, 1 / 2, 1 / 2])
    mass = np.bincount(categories, weights=weights)
    np.testing.assert_allclose(mass, [1.0, 1.0, 1.0])


def test_balanced_sampler_draws_a_rare_class_as_often_as_the_others():
    categories = np.array([0] * 90 + [1] * 3 + [2] * 30 + [3] * 60)
    sampler = torch.utils.data.WeightedRandomSampler(
        torch.from_numpy(balanced_sample_weights(categories)),
        4000,
        generator=torch.Generator().manual_seed(0),
    )
    share = np.bincount(categories[list(sampler)], minlength=4) / 4000
    np.testing.assert_allclose(share, 0.25, atol=0.03)


def test_class_weights():
    np.testing.assert_allclose(class_weights([0, 0, 0, 1, 2, 2]), [6 / 9, 2.0, 1.0, 0.0])
    np.testing.assert_allclose(class_weights([3, 3]), [0, 0, 0, 1.0])


@pytest.mark.parametrize(
    ("categories", "message"),
    [
        ([0, 4], r"categories: classes must lie in 0..3, found 4"),
        ([0, -1], r"categories: classes must lie in 0..3, found -1"),
        ([0.5, 1], "categories: classes must be integers 0..3"),
        ([[0, 1]], r"categories: expected one class per image, got shape \(1, 2\)"),
    ],
)
def test_bad_categories(categories, message):
    with pytest.raises(CellSegError, match=message):
        balanced_sample_weights(categories)


# ----------------------------------------------------------------------------- training


def test_a_few_optimisation_steps_lower_the_loss_on_a_fixed_batch(tiny_set):
    images, categories = tiny_set
    transform = TINY.eval_transform()
    x = torch.stack([transform(TINY.cache(image)) for image in images])
    y = torch.tensor(categories)
    model = seeded_router().model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    losses = [router._train_step(model, optimizer, loss_fn, x, y)[0] for _ in range(3)]
    with torch.no_grad():
        after = float(loss_fn(model(x), y))
    assert after < losses[0]


def test_training_is_deterministic_and_leaves_the_global_rng_alone(tiny_set, trained):
    first, history = trained
    before = torch.random.get_rng_state()
    second, _ = quick(*tiny_set, seed=3)
    other, _ = quick(*tiny_set, seed=4)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert same_weights(first.model, second.model)
    assert not same_weights(first.model, other.model)
    assert history.steps == 2 and len(history.loss) == 1 and len(history.step_loss) == 2
    assert not first.model.training
    assert first.training["class_counts"] == [2, 2, 2, 2]
    assert first.training["lr"] == 1e-3 and first.training["momentum"] == 0.9


def test_paper_defaults():
    import inspect

    defaults = {
        k: v.default for k, v in inspect.signature(train_router).parameters.items() if k != "images"
    }
    assert {k: defaults[k] for k in ("epochs", "batch_size", "lr", "momentum", "step_size")} == {
        "epochs": 20,
        "batch_size": 64,
        "lr": 1e-3,
        "momentum": 0.9,
        "step_size": 7,
    }
    assert defaults["gamma"] == 0.1 and defaults["balance"] is True
    assert defaults["pretrained"] is False and defaults["channel_rule"] is True


def test_the_time_budget_stops_training(tiny_set, capsys):
    trained, history = quick(*tiny_set, epochs=5, batch_size=2, minutes=1e-9, progress=True)
    assert "router:" in capsys.readouterr().err  # the tqdm bar, stopped after its first step
    assert history.stopped_early
    assert history.steps == 1 and len(history.loss) == 1
    assert trained.training["minutes"] == 1e-9


def test_validation_keeps_the_best_epoch_and_reports_each(tiny_set):
    images, categories = tiny_set
    seen = []
    trained, history = quick(
        images,
        categories,
        epochs=2,
        val=(images[:4], categories[:4]),
        balance="loss",
        on_epoch=lambda epoch, h: seen.append((epoch, h.loss[-1])),
    )
    assert [epoch for epoch, _ in seen] == [0, 1]
    assert len(history.val_accuracy) == 2
    assert all(a in (0.0, 0.25, 0.5, 0.75, 1.0) for a in history.val_accuracy)
    assert history.val_accuracy[history.best_epoch] == max(history.val_accuracy)
    assert trained.training["n_val"] == 4 and trained.training["balance"] == "loss"


def test_ties_on_validation_accuracy_go_to_the_lowest_cross_entropy(tiny_set, monkeypatch):
    scores = iter([(0.5, 1.0), (1.0, 0.5), (1.0, 0.1), (1.0, 0.3)])  # (accuracy, loss) per epoch
    monkeypatch.setattr(router, "_evaluate", lambda *args: next(scores))
    images, categories = tiny_set
    _, history = quick(images, categories, epochs=4, val=(images, categories))
    assert history.val_accuracy == [0.5, 1.0, 1.0, 1.0]
    assert history.val_loss == [1.0, 0.5, 0.1, 0.3]
    assert history.best_epoch == 2  # not 1, the first epoch that was right on every image


def test_the_kept_weights_reproduce_the_best_epochs_validation_scores(tiny_set):
    from cellseg_lite.router import _evaluate

    images, categories = tiny_set
    trained, history = quick(images, categories, epochs=3, val=(images, categories), seed=2)
    pre = trained.preprocessing
    tensors = [pre.cache(image) for image in images]
    accuracy, loss = _evaluate(
        trained.model, tensors, np.asarray(categories), pre.eval_transform(), "cpu", 8
    )
    assert accuracy == history.val_accuracy[history.best_epoch]
    assert loss == pytest.approx(history.val_loss[history.best_epoch], rel=1e-5)


def test_training_reads_files(tiny_set, trained, tmp_path):
    images, categories = tiny_set
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"image_{i}.tif")
        io.write_image(paths[-1], image)
    from_files, _ = quick(paths, categories, seed=3)
    assert same_weights(from_files.model, trained[0].model)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"categories": [0, 1]}, "categories: 2 classes for 8 images"),
        ({"images": []}, "images: no images"),
        ({"images": np.zeros((8, 32, 32), np.uint8)}, "images: expected a list of images"),
        ({"epochs": 0}, "epochs: expected a positive integer"),
        ({"lr": -1.0}, "lr: must be positive"),
        ({"lr": "fast"}, "lr: expected a number"),
        ({"momentum": 1.0}, r"momentum in \[0, 1\)"),
        ({"balance": "oversample"}, "balance: expected True, False, 'sampler' or 'loss'"),
        ({"minutes": 0}, "minutes: expected a positive number of minutes or None"),
        ({"seed": "zero"}, "seed: expected an integer"),
        ({"val": [[np.zeros((8, 8), np.uint8)]]}, r"val: expected a pair \(images, categories\)"),
        ({"val": ([np.zeros((8, 8), np.uint8)], [5])}, "val categories: classes must lie in"),
        ({"device": "warp-drive"}, "device: not a torch device"),
    ],
)
def test_bad_training_input(tiny_set, settings, message):
    images, categories = tiny_set
    settings = {"images": images, "categories": categories, **settings}
    with pytest.raises(CellSegError, match=message):
        quick(settings.pop("images"), settings.pop("categories"), **settings)


def test_an_unreadable_training_image_is_named(tiny_set):
    images, categories = tiny_set
    with pytest.raises(CellSegError, match=r"images\[1\]: expected a 2-D image"):
        quick([images[0], np.zeros((4, 4, 4, 4))], categories[:2])


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_gives_identical_predictions(trained, tmp_path):
    trained, _ = trained
    path = tmp_path / "models" / "router.pt"
    save_router(path, trained)
    assert sorted(p.name for p in path.parent.iterdir()) == ["router.pt"]  # no temporary file left
    loaded = load_router(path)
    assert loaded.preprocessing == trained.preprocessing
    assert loaded.channel_rule is False
    assert loaded.class_names == [CATEGORY_NAMES[c] for c in range(4)]
    assert loaded.training["history"]["steps"] == 2
    images = list(RAW_IMAGES.values())
    for before, after in zip(
        trained.predict_batch(images), loaded.predict_batch(images), strict=True
    ):
        assert before.category == after.category
        np.testing.assert_array_equal(before.probabilities, after.probabilities)
    assert Router.load(path).preprocessing == TINY


def test_checkpoint_holds_plain_data(tiny_router, tmp_path):
    path = tmp_path / "router.pt"
    tiny_router.save(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["format"] == router.CHECKPOINT_FORMAT
    assert checkpoint["version"] == cellseg_lite.__version__
    assert checkpoint["class_names"] == [CATEGORY_NAMES[c] for c in range(4)]
    assert checkpoint["preprocessing"]["resize"] == 40 and checkpoint["preprocessing"]["crop"] == 32
    assert checkpoint["preprocessing"]["normalisation"] == "challenge"
    assert checkpoint["channel_rule"] is True


def test_corrupt_and_foreign_checkpoints_are_refused(tiny_router, tmp_path):
    good = tmp_path / "router.pt"
    tiny_router.save(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CellSegError, match="truncated.pt'?: cannot be read as a checkpoint"):
        load_router(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CellSegError, match="garbage.pt'?: cannot be read as a checkpoint"):
        load_router(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": build_router().state_dict()}, foreign)
    with pytest.raises(CellSegError, match="foreign.pt'?: is not a cellseg-lite router checkpoint"):
        load_router(foreign)
    with pytest.raises(CellSegError, match="missing.pt'?: router checkpoint not found"):
        load_router(tmp_path / "missing.pt")


def test_checkpoints_with_wrong_contents_are_refused(tiny_router, tmp_path):
    path = tmp_path / "router.pt"
    tiny_router.save(path)
    checkpoint = torch.load(path, weights_only=True)

    newer = dict(checkpoint, layout=99)
    torch.save(newer, tmp_path / "newer.pt")
    with pytest.raises(CellSegError, match="layout 99 is not supported"):
        load_router(tmp_path / "newer.pt")

    wrong = dict(checkpoint, state_dict=build_router(num_classes=3).state_dict())
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CellSegError, match="wrong.pt'?: the weights do not fit a ResNet18 router"):
        load_router(tmp_path / "wrong.pt")

    broken = dict(checkpoint, preprocessing={"resize": 40})
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CellSegError, match="preprocessing settings are missing or incomplete"):
        load_router(tmp_path / "broken.pt")


def test_saving_checks_its_input(tmp_path):
    with pytest.raises(CellSegError, match="router: expected a router.Router, got ResNet"):
        save_router(tmp_path / "router.pt", build_router())


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_one_channel_real_images_are_routed_by_the_rule(real_mini, real_manifest, tiny_router):
    rows = [r for r in real_manifest if r["split"] == "val"][:6]
    paths = [real_mini / "images" / r["file"] for r in rows]
    results = tiny_router.predict_batch(paths)
    for row, result in zip(rows, results, strict=True):
        if row["channels"] == "1":
            assert result.category == 0 and result.probabilities[0] == 1.0
        else:
            assert result.probabilities[0] < 1.0
