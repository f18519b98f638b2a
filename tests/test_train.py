"""The training loop: presets, checkpoints, resume equivalence, fine-tuning, DDP on two CPU processes."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cellseg_lite import CellSegError, datasets, synthetic, train
from cellseg_lite.io import write_image, write_labels

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    synthetic.make_dataset(root, 2, size=(96, 96), seed=3, categories=(0, 1, 3))
    return root


def fast(**changes):
    return train.preset("fast", augment=False, patch_size=64, **changes)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- presets


def test_presets_follow_the_paper_and_the_cpu_budget():
    paper = train.preset("paper")
    assert (paper.backbone, paper.patch_size, paper.batch_size) == ("convnext_small", 512, 16)
    assert (paper.lr, paper.epochs, paper.lr_milestones, paper.lr_gamma) == (
        1e-4,
        800,
        (0.25,),
        0.5,
    )
    assert paper.pretrained and paper.minutes is None
    assert paper.lr_schedule == "step"
    lite = train.preset("lite")
    assert lite.backbone == "convnext_atto" and lite.minutes is not None
    assert lite.lr_schedule == "linear"  # a short run should end with settled weights
    assert train.preset("lite", stream="hover").stream == "hover"
    assert train.preset("fast").pretrained is False


def test_default_preset_follows_fast_mode(monkeypatch):
    monkeypatch.setenv("CELLSEG_FAST", "1")
    assert train.default_preset() == "fast"
    monkeypatch.setenv("CELLSEG_FAST", "0")
    assert train.default_preset() == ("paper" if torch.cuda.is_available() else "lite")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"stream": "unet"}, "stream: expected one of"),
        ({"batch_size": 0}, "batch_size: expected an integer >= 1"),
        ({"patch_size": 16}, "patch_size: expected at least 32"),
        ({"lr": -1.0}, "lr: expected a positive number"),
        ({"minutes": 0}, "minutes: expected a positive number"),
        ({"lr_milestones": (1.5,)}, "lr_milestones: expected fractions"),
        ({"loss": "focal"}, "loss: expected 'paper' or 'code'"),
        ({"lr_schedule": "onecycle"}, "lr_schedule: expected one of step, linear, cosine"),
        ({"ema_decay": 1.0}, r"ema_decay: expected a number in \(0, 1\)"),
        ({"tta": "yes"}, "tta: expected True, False or None"),
        ({"map_scales": (1.0, 1.0)}, "map_scales: expected distinct numbers > 0"),
        ({"map_scales": ()}, "map_scales: expected distinct numbers > 0"),
        ({"freeze_batchnorm": "yes"}, "freeze_batchnorm: expected True or False"),
        ({"patch_sampling": "area"}, "patch_sampling: expected one of image, size"),
        ({"stream": "hover", "contact_weight": -1.0}, "contact_weight: expected a non-negative"),
        ({"stream": "hover", "hover_cores": 1}, "hover_cores: expected True or False"),
        ({"learning_rate": 1.0}, "unknown setting"),
    ],
)
def test_bad_settings_are_refused(changes, match):
    with pytest.raises(CellSegError, match=match):
        train.preset("fast", **changes)


def test_unknown_preset_is_refused():
    with pytest.raises(CellSegError, match="preset: expected one of"):
        train.preset("huge")


def test_bf16_needs_the_cpu_instructions_not_only_onednn(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n")
    assert train.cpu_has_bf16(cpuinfo) is False  # oneDNN says yes here, and runs 2x slower
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert train.cpu_has_bf16(cpuinfo) is True
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16\n")  # ARM
    assert train.cpu_has_bf16(cpuinfo) is True
    assert isinstance(train.cpu_has_bf16(tmp_path / "missing"), bool)  # falls back to oneDNN


@pytest.mark.parametrize("stream", train.STREAMS)
def test_loss_of_a_bf16_forward_pass_is_computed_in_float32(stream):
    # bf16 keeps 8 bits of an HV value, coarse for the MSGE term's finite differences: 3-minute
    # lite HoVer runs with the loss in bf16 scored 0.633 val F1, not 0.655 (benchmarks/RESULTS.md)
    from cellseg_lite.streams import hover, stardist

    g = torch.Generator().manual_seed(0)
    if stream == "hover":
        outputs = (torch.randn(2, 2, 32, 32, generator=g), torch.rand(2, 2, 32, 32, generator=g))
        batch = {
            "foreground": (torch.rand(2, 32, 32, generator=g) > 0.5).float(),
            "hv": torch.rand(2, 2, 32, 32, generator=g) * 2 - 1,
        }
    else:
        outputs = (
            torch.rand(2, 1, 32, 32, generator=g),
            10 * torch.rand(2, 8, 32, 32, generator=g),
        )
        batch = {
            "prob": torch.rand(2, 1, 32, 32, generator=g),
            "dist": 10 * torch.rand(2, 8, 32, 32, generator=g),
        }
    low = tuple(o.bfloat16() for o in outputs)
    got = train._loss(fast(stream=stream, n_rays=8), low, batch)
    upcast = tuple(o.float() for o in low)
    if stream == "hover":
        want = hover.loss(*upcast, batch["foreground"], batch["hv"])
    else:
        want = stardist.loss(*upcast, batch["prob"], batch["dist"])
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_learning_rate_schedule_warms_up_and_halves():
    config = fast(
        lr=1e-3, warmup_steps=10, lr_schedule="step", lr_milestones=(0.25, 0.5), lr_gamma=0.5
    )
    assert train._learning_rate(config, 0, 0.0) == pytest.approx(1e-4)
    assert train._learning_rate(config, 20, 0.1) == pytest.approx(1e-3)
    assert train._learning_rate(config, 20, 0.3) == pytest.approx(5e-4)
    assert train._learning_rate(config, 20, 0.9) == pytest.approx(2.5e-4)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decaying_schedules_fall_from_the_peak_to_zero_over_the_run(schedule):
    config = fast(lr=1e-3, warmup_steps=10, lr_schedule=schedule)
    assert train._learning_rate(config, 0, 0.0) == pytest.approx(1e-4)  # warm-up first
    assert train._learning_rate(config, 20, 0.0) == pytest.approx(1e-3)
    assert train._learning_rate(config, 20, 0.5) == pytest.approx(5e-4)  # both halve mid-run
    rates = [train._learning_rate(config, 20, p) for p in np.linspace(0, 1, 11)]
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[-1] == 0.0
    # a step past a time budget reads progress above 1: never a negative rate
    assert train._learning_rate(config, 20, 1.2) == 0.0
    if schedule == "linear":
        assert train._learning_rate(config, 20, 0.8) == pytest.approx(2e-4)
    else:  # slower at first, faster later
        assert train._learning_rate(config, 20, 0.25) > 7.5e-4
        assert train._learning_rate(config, 20, 0.8) < 2e-4


def test_schedule_is_stored_in_the_checkpoint_and_old_ones_read_as_steps():
    config = fast(lr_schedule="cosine")
    assert train.TrainConfig.from_dict(config.to_dict()).lr_schedule == "cosine"
    older = {k: v for k, v in config.to_dict().items() if k != "lr_schedule"}
    assert train.TrainConfig.from_dict(older).lr_schedule == "step"


def test_adamw_is_fused_where_torch_has_the_kernel_and_plain_where_not(monkeypatch):
    config = fast(lr=2e-3, weight_decay=0.05)
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        nets.append(torch.nn.Linear(4, 2))
    fused = train._adamw(nets[0], config)
    assert fused.defaults["fused"] is True  # CPU kernels since PyTorch 2.4
    assert (fused.defaults["lr"], fused.defaults["weight_decay"]) == (2e-3, 0.05)

    plain_adamw = torch.optim.AdamW

    def no_fused_kernel(*args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be on a supported device")
        return plain_adamw(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused_kernel)
    plain = train._adamw(nets[1], config)
    assert not plain.defaults.get("fused")
    assert len(plain.param_groups[0]["params"]) == 2  # the parameters were not used up

    for net, optimizer in zip(nets, (fused, plain), strict=True):  # the same update
        net(torch.ones(3, 4)).square().sum().backward()
        optimizer.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- targets in the data set


@pytest.mark.parametrize("stream", train.STREAMS)
def test_stream_dataset_computes_targets_of_the_augmented_patch(tiny_data, stream):
    from cellseg_lite import datasets
    from cellseg_lite.streams import hover, stardist

    patches = datasets.PatchDataset(datasets.find_pairs(tiny_data), 64, seed=1)
    item = train.StreamDataset(patches, stream, n_rays=8)[2]
    labels = item["labels"].numpy()
    if stream == "stardist":
        prob, dist = stardist.targets(labels, n_rays=8)
        assert torch.equal(item["prob"][0], torch.from_numpy(prob))
        assert torch.equal(item["dist"], torch.from_numpy(dist))
    else:
        foreground, hv = hover.targets(labels)
        assert torch.equal(item["foreground"], torch.from_numpy(foreground))
        assert torch.equal(item["hv"], torch.from_numpy(hv))
        assert "hv_weight" not in item  # the paper's loss weights every pixel alike
        weighted = train.StreamDataset(patches, stream, contact_weight=4.0)
        touching = 0
        for index in range(len(weighted)):
            expected = hover.contact_weights(patches[index]["labels"].numpy(), 4.0)
            assert torch.equal(weighted[index]["hv_weight"], torch.from_numpy(expected))
            touching += expected.max() == pytest.approx(5.0)
        assert touching  # some patch has touching cells, so the weights are not all 1


def test_contact_weight_changes_the_run_and_travels_in_the_checkpoint(tiny_data, tmp_path):
    plain, _ = train.train_stream(tiny_data, fast(stream="hover", epochs=1), progress=False)
    config = fast(stream="hover", epochs=1, contact_weight=4.0)
    out = tmp_path / "contact.pt"
    weighted, history = train.train_stream(tiny_data, config, out=out, progress=False)
    assert all(np.isfinite(history.epoch_loss))
    assert not same_weights(plain.state_dict(), weighted.state_dict())
    assert train.load_checkpoint(out).config.contact_weight == 4.0


# --------------------------------------------------------------------------- the loop and checkpoints


def test_size_sampling_draws_a_large_image_more_often(tmp_path):
    root = tmp_path / "mixed"
    synthetic.make_dataset(root, 3, size=(96, 96), seed=3, categories=(0,))
    image, labels = synthetic.make_image(0, size=(540, 540), seed=9)  # round(540 / 256) = 2
    write_image(root / "images" / "large.tif", image)
    write_labels(root / "labels" / "large_label.tiff", labels)
    steps = {}
    for sampling in train.PATCH_SAMPLINGS:
        config = fast(epochs=1, patches_per_image=2, patch_sampling=sampling)
        _, history = train.train_stream(root, config, progress=False)
        steps[sampling] = history.steps
    assert steps == {"image": 2, "size": 3}  # batches of 4 from 8 and 10 patches


@pytest.mark.parametrize("stream", train.STREAMS)
def test_training_lowers_the_loss_and_writes_a_checkpoint(tiny_data, tmp_path, stream):
    out = tmp_path / "model.pt"
    config = fast(stream=stream, epochs=6, patches_per_image=2, lr=2e-3)
    model, history = train.train_stream(tiny_data, config, out=out, categories=[1], progress=False)
    assert history.steps == 6 * 3 and len(history.epoch_loss) == 6
    assert history.epoch_loss[-1] < history.epoch_loss[0]
    assert not model.training
    loaded = train.load_checkpoint(out)
    assert loaded.stream == stream and loaded.config == config and loaded.categories == (1,)
    assert loaded.version and loaded.resume["epoch"] == 6
    assert same_weights(loaded.model.state_dict(), model.state_dict())


def test_resume_continues_the_same_run(tiny_data, tmp_path):
    config = fast(epochs=3)
    straight, _ = train.train_stream(tiny_data, config, progress=False)
    out = tmp_path / "run.pt"
    _, first = train.train_stream(tiny_data, config, out=out, steps=4, progress=False)
    assert first.stopped_early and first.steps == 4
    resumed, history = train.train_stream(tiny_data, config, out=out, resume=out, progress=False)
    assert history.steps == 3 * 2 and history.epochs == 3
    assert same_weights(straight.state_dict(), resumed.state_dict())


def test_moving_average_is_exported_and_resumed_with_its_step_count(tiny_data, tmp_path):
    config = fast(epochs=3, ema_decay=0.5)
    straight, _ = train.train_stream(tiny_data, config, out=tmp_path / "a.pt", progress=False)
    saved = train.load_checkpoint(tmp_path / "a.pt")
    raw, average = saved.resume["model"], saved.resume["ema"]
    assert int(average["n_averaged"]) == 3 * 2
    # the exported (and returned) weights are the average, the resume state the raw weights
    exported = straight.state_dict()
    assert same_weights(
        exported, {k[len("module.") :]: v for k, v in average.items() if k != "n_averaged"}
    )
    assert not same_weights(exported, raw)
    no_average, _ = train.train_stream(tiny_data, fast(epochs=3), progress=False)
    assert same_weights(no_average.state_dict(), raw)  # averaging does not change the run
    out = tmp_path / "b.pt"
    train.train_stream(tiny_data, config, out=out, steps=4, progress=False)
    resumed, _ = train.train_stream(tiny_data, config, out=out, resume=out, progress=False)
    assert same_weights(exported, resumed.state_dict())


def test_time_budget_stops_and_can_be_resumed(tiny_data, tmp_path):
    out = tmp_path / "budget.pt"
    config = fast(epochs=1000, minutes=0.05)
    _, history = train.train_stream(tiny_data, config, out=out, progress=False)
    assert history.stopped_early and 0 < history.epochs < 1000
    assert train.load_checkpoint(out).resume["elapsed"] >= 3.0


def test_session_minutes_stop_a_probe_that_resume_continues_under_a_new_budget(tiny_data, tmp_path):
    out = tmp_path / "probe.pt"
    config = fast(epochs=1000, minutes=10.0, lr_schedule="step")
    _, probe = train.train_stream(tiny_data, config, out=out, session_minutes=1e-4, progress=False)
    assert probe.stopped_early and probe.steps == 1  # the first step is past the session's time
    assert probe.lr[0] == config.lr  # far from the schedule's first milestone
    _, resumed = train.train_stream(
        tiny_data, config.replace(epochs=3), out=out, resume=out, progress=False
    )
    assert (
        resumed.steps == 3 * 2
        and resumed.epochs == 3
        and resumed.step_loss[0] == probe.step_loss[0]
    )
    with pytest.raises(CellSegError, match="session_minutes: expected a positive number"):
        train.train_stream(tiny_data, config, session_minutes=0, progress=False)


def test_validation_keeps_the_best_epoch_and_tunes_the_threshold(tiny_data, tmp_path):
    from cellseg_lite import datasets

    samples = datasets.find_pairs(tiny_data)
    out = tmp_path / "val.pt"
    model, history = train.train_stream(
        samples[:4], fast(epochs=2), val=samples[4:], out=out, progress=False
    )
    assert [e for e, _ in history.val_f1][:2] == [1, 2]
    assert history.best_epoch in (1, 2)
    assert "prob_thresh" in history.thresholds
    saved = train.load_checkpoint(out)
    assert saved.thresholds == history.thresholds
    # the model returned holds the best epoch's weights, as the checkpoint does, not the last ones
    assert same_weights(model.state_dict(), saved.model.state_dict())


def test_hover_thresholds_are_tuned_on_flip_averaged_maps(tiny_data, tmp_path, monkeypatch):
    from cellseg_lite import datasets, infer

    assert train.uses_tta(fast(stream="hover")) and not train.uses_tta(fast())
    assert train.uses_tta(fast(tta=True)) and not train.uses_tta(fast(stream="hover", tta=False))
    flips = []
    original = infer.flip_averaged
    monkeypatch.setattr(
        infer, "flip_averaged", lambda predict, maps: flips.append(maps) or original(predict, maps)
    )
    samples = datasets.find_pairs(tiny_data)
    train_part, val = samples[:4], samples[4:]
    model, history = train.train_stream(
        train_part, fast(stream="hover", epochs=2), val=val, out=tmp_path / "h.pt", progress=False
    )
    assert history.thresholds["tta"] is True
    # the final tuning, once per image; the two epochs' validations pick weights on plain maps
    assert flips == ["hover"] * len(val)
    assert train.load_checkpoint(tmp_path / "h.pt").thresholds == history.thresholds
    loaded = train._load_val(val)
    f1, _ = train.evaluate_stream(model, "hover", loaded, history.thresholds)  # follows "tta"
    assert f1 == pytest.approx(history.best_f1) and len(flips) == 2 * len(val)
    _, plain = train.evaluate_stream(model, "hover", loaded, [history.thresholds], tta=False)
    assert "tta" not in plain and len(flips) == 2 * len(val)
    _, history = train.train_stream(
        train_part, fast(stream="hover", epochs=1, tta=False), val=val, progress=False
    )
    assert "tta" not in history.thresholds and len(flips) == 2 * len(val)


def test_thresholds_can_be_tuned_on_maps_averaged_over_scales(tiny_data, tmp_path, scale_averaging):
    from cellseg_lite import datasets

    config = fast(stream="hover", epochs=2, tta=False, map_scales=[1, 1.5])
    assert config.map_scales == (1.0, 1.5) and fast().map_scales == (1.0,)
    assert train.TrainConfig.from_dict(config.to_dict()).map_scales == (1.0, 1.5)
    older = {k: v for k, v in config.to_dict().items() if k != "map_scales"}
    assert train.TrainConfig.from_dict(older).map_scales == (1.0,)  # older checkpoints: one scale
    assert train.map_options(config) == {"tta": False, "map_scales": (1.0, 1.5)}
    calls = scale_averaging
    samples = datasets.find_pairs(tiny_data)
    train_part, val = samples[:4], samples[4:]
    model, history = train.train_stream(
        train_part, config, val=val, out=tmp_path / "h.pt", progress=False
    )
    assert history.thresholds["map_scales"] == [1.0, 1.5] and "tta" not in history.thresholds
    # the final tuning, once per image; the two epochs' validations pick weights at one scale
    assert [call[1:] for call in calls] == [((1.0, 1.5), "hover")] * len(val)
    assert train.load_checkpoint(tmp_path / "h.pt").thresholds == history.thresholds
    loaded = train._load_val(val)
    f1, again = train.evaluate_stream(model, "hover", loaded, history.thresholds)  # follows them
    assert f1 == pytest.approx(history.best_f1) and again == history.thresholds
    assert len(calls) == 2 * len(val)
    _, plain = train.evaluate_stream(model, "hover", loaded, [history.thresholds], map_scales=[1])
    assert "map_scales" not in plain and len(calls) == 2 * len(val)


def test_fine_tuning_starts_from_the_pretrained_weights(tiny_data, tmp_path):
    pre = tmp_path / "pre.pt"
    pretrained, _ = train.train_stream(tiny_data, fast(epochs=1), out=pre, progress=False)
    config = fast(epochs=1, lr=1e-12, weight_decay=0.0)  # a step that barely moves the weights
    tuned, _ = train.train_stream(tiny_data, config, init=pre, categories=[0], progress=False)
    for (name, a), b in zip(
        pretrained.state_dict().items(), tuned.state_dict().values(), strict=True
    ):
        if a.is_floating_point() and "running" not in name:
            assert torch.allclose(a, b, atol=1e-6), name


def test_fine_tuning_can_freeze_the_batchnorm_statistics(tiny_data, tmp_path):
    pre = tmp_path / "pre.pt"
    pretrained, _ = train.train_stream(tiny_data, fast(epochs=1), out=pre, progress=False)
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    statistics = [k for k in before if k.endswith(("running_mean", "running_var"))]
    scales = [k[: -len("running_mean")] + "weight" for k in statistics if "mean" in k]
    assert statistics  # the decoder has BatchNorm layers
    for frozen in (True, False):
        config = fast(epochs=1, freeze_batchnorm=frozen)
        tuned, _ = train.train_stream(tiny_data, config, init=pre, progress=False)
        after = tuned.state_dict()
        kept = [torch.equal(before[k], after[k]) for k in statistics]
        assert all(kept) if frozen else not any(kept)
        # the layers' scales learn either way
        assert not all(torch.equal(before[k], after[k]) for k in scales)
    # the pipeline's per-class fine-tuning freezes them
    lite = train.preset("lite")
    config = train.fine_tune_config(lite, "hover", 0, n_images=111, minutes=1.8, seed=1)
    assert config.freeze_batchnorm and config.stream == "hover" and config.minutes == 1.8
    assert (config.lr, config.warmup_steps, config.patches_per_image, config.seed) == (
        lite.lr / 3,
        0,
        1,
        2,
    )
    assert train.fine_tune_config(lite, "hover", 3, 8, None, 0).patches_per_image == 4
    assert not lite.freeze_batchnorm and not train.preset("paper").freeze_batchnorm


def test_checkpoint_of_another_backbone_is_refused(tiny_data, tmp_path):
    pre = tmp_path / "atto.pt"
    train.train_stream(tiny_data, fast(epochs=1), out=pre, progress=False)
    other = fast(epochs=1, backbone="convnext_femto")
    with pytest.raises(CellSegError, match="trained with backbone='convnext_atto'.*convnext_femto"):
        train.train_stream(tiny_data, other, init=pre, progress=False)
    with pytest.raises(CellSegError, match="trained with backbone='convnext_atto'"):
        train.load_checkpoint(pre, expect=other)
    with pytest.raises(CellSegError, match="trained with stream='stardist'"):
        train.load_checkpoint(pre, expect=fast(stream="hover"))


def test_a_hover_network_with_cores_trains_tunes_and_segments(tiny_data, tmp_path):
    from cellseg_lite import infer, io, router
    from cellseg_lite.streams import hover

    config = fast(stream="hover", hover_cores=True, epochs=1)
    data = train.StreamDataset(
        datasets.PatchDataset(datasets.find_pairs(tiny_data), 64, seed=0), "hover",
        hover_cores=True,
    )  # fmt: skip
    item = data[0]
    assert set(torch.unique(item["foreground"]).tolist()) <= {0.0, 1.0, 2.0}
    expected = hover.core_targets(item["labels"].numpy())
    assert torch.equal(item["foreground"], torch.from_numpy(expected))
    out = tmp_path / "cores.pt"
    model, history = train.train_stream(tiny_data, config, val=tiny_data, out=out, progress=False)
    assert model.cores and "core_threshold" in history.thresholds
    assert history.thresholds["core_threshold"] in train.HOVER_CORE_THRESHOLDS
    loaded = train.load_checkpoint(out)
    assert loaded.config.hover_cores and loaded.model.cores
    with pytest.raises(CellSegError, match="trained with hover_cores=True.*hover_cores=False"):
        train.load_checkpoint(out, expect=fast(stream="hover"))
    stream = infer.StreamModel.from_checkpoint(loaded)
    segmenter = infer.MultiStreamSegmenter(
        router.Router(router.build_router().eval()), dict.fromkeys(range(4), stream),
        routing="hover",
    )  # fmt: skip
    image = io.read_image(datasets.find_pairs(tiny_data)[0].image_path)
    assert isinstance(segmenter.maps(image), infer.HoverCoreMaps)
    segmenter.save(tmp_path / "segmenter.pt")
    again = infer.MultiStreamSegmenter.load(tmp_path / "segmenter.pt")
    assert np.array_equal(again.segment(image), segmenter.segment(image))


def test_damaged_and_foreign_checkpoints_are_refused(tmp_path):
    with pytest.raises(CellSegError, match="model checkpoint not found"):
        train.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CellSegError, match="truncated or corrupt"):
        train.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(CellSegError, match="not a cellseg-lite stream checkpoint"):
        train.load_checkpoint(tmp_path / "other.pt")


def test_bad_arguments_are_refused(tiny_data, tmp_path):
    with pytest.raises(CellSegError, match="config: expected a TrainConfig"):
        train.train_stream(tiny_data, {"epochs": 1}, progress=False)
    with pytest.raises(CellSegError, match="steps: expected a positive integer"):
        train.train_stream(tiny_data, fast(), steps=0, progress=False)
    with pytest.raises(CellSegError, match="give one of them"):
        train.train_stream(tiny_data, fast(), init="a.pt", resume="b.pt", progress=False)
    with pytest.raises(CellSegError, match="no process group"):
        train.train_stream(tiny_data, fast(), distributed=True, progress=False)
    with pytest.raises(CellSegError, match="data folder not found"):
        train.train_stream(tmp_path / "nowhere", fast(), progress=False)


def test_hover_tuning_keeps_markers_off_doubtful_pixels_where_that_scores_higher(monkeypatch):
    from cellseg_lite.streams import hover

    # two touching squares whose HV maps were drawn as one cell, the cell probability 0.85 on
    # their shared edge (above every probability threshold of the grid): no grid candidate
    # separates them, markers on confident pixels do
    labels = np.zeros((64, 64), np.int32)
    labels[12:44, 8:32], labels[12:44, 32:56] = 1, 2
    prob = (labels > 0).astype(np.float32)
    prob[12:44, 31:33] = 0.85
    merged_maps = np.concatenate([prob[None], hover.targets((labels > 0).astype(np.int32)).hv])
    split_maps = np.concatenate([prob[None], hover.targets(labels).hv])  # the jump is drawn
    grid = train._threshold_grid("hover")
    assert max(t["prob_thresh"] for t in grid) < 0.85 < min(train.HOVER_MARKER_PROBS)
    predicted = []

    def predict(model, image, **kwargs):
        predicted.append(image)
        return split_maps if image.mean() > 0.5 else merged_maps

    monkeypatch.setattr(train, "predict_maps", predict)
    model = torch.nn.Linear(1, 1)
    merged = [("a", np.zeros((64, 64, 3), np.float32), labels)]
    f1, chosen = train.best_thresholds(model, "hover", merged)
    # the first that scores higher; the others only tie
    assert f1 == 1.0 and chosen["marker_min_prob"] == min(train.HOVER_MARKER_PROBS)
    assert {k: v for k, v in chosen.items() if k != "marker_min_prob"} in grid
    grid_f1, _ = train.evaluate_stream(model, "hover", merged, grid)
    assert grid_f1 <= 2 / 3  # one object for two cells: one of them matched at best
    assert len(predicted) == 2  # one prediction per image, refinements included
    # where keeping the maps would take too much memory, the refinements predict them again
    monkeypatch.setattr(train, "_KEPT_MAPS_BYTES", 0)
    assert train.best_thresholds(model, "hover", merged) == (f1, chosen)
    assert len(predicted) == 2 + 2
    # where the grid already scores best, its candidate stays as it is
    split = [("b", np.ones((64, 64, 3), np.float32), labels)]
    f1, chosen = train.best_thresholds(model, "hover", split)
    assert f1 == 1.0 and "marker_min_prob" not in chosen
    # StarDist has no markers: its grid alone
    assert train._threshold_refinements("stardist") == []


# --------------------------------------------------------------------------- DistributedDataParallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_end_with_identical_weights(tiny_data, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, torch
            torch.set_num_threads(1)
            from cellseg_lite import train
            config = train.preset("fast", augment=False, patch_size=64, epochs=2)
            model, history = train.train_stream({str(tiny_data)!r}, config, progress=False)
            rank = int(os.environ["RANK"])
            torch.save({{"state": model.state_dict(), "steps": history.steps}},
                       {str(tmp_path)!r} + f"/rank{{rank}}.pt")
            """
        )
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert (
        ranks[0]["steps"] == ranks[1]["steps"] == 2
    )  # 6 patches, 3 per rank: one batch of 3 each epoch
    assert same_weights(ranks[0]["state"], ranks[1]["state"])
    single, _ = train.train_stream(tiny_data, fast(epochs=2), progress=False)
    assert not same_weights(single.state_dict(), ranks[0]["state"])  # the ranks did share the work
