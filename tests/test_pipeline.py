"""The whole method from the command line: train, predict over a folder with a bad file, demo."""

from __future__ import annotations

import pytest
import torch

from cellseg_lite import CellSegError, cli, infer, io, synthetic, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One FAST demo: synthetic data, the fast preset, the report; its model serves the others."""
    out = tmp_path_factory.mktemp("demo")
    code = cli.main(
        ["demo", "--out", str(out), "--minutes", "1", "--n-train", "3", "--n-test", "1", "--quiet"]
    )
    assert code == cli.EXIT_OK
    return out


def test_demo_writes_the_report(demo_run):
    report = (demo_run / "report.md").read_text()
    for part in ("Table 4", "Table 5", "multi-stream", "ConvNeXt-HoVer", "class 3", "tolerance"):
        assert part in report
    html = (demo_run / "report.html").read_text()
    assert html.count("<img") == 4 and "<table>" in html
    assert len(list((demo_run / "figures").glob("*.png"))) == 4
    assert len(list((demo_run / "predictions").glob("*_label.tiff"))) == 4
    loaded = infer.MultiStreamSegmenter.load(demo_run / "model.pt")
    assert [loaded.stream_for(c) for c in range(4)] == ["stardist", "hover", "stardist", "stardist"]
    assert "routing `paper` (class 0: stardist, class 1: hover" in report
    # the table is read from its own numbers, whichever way they fall
    assert "multi-stream segmenter (" in report.split("Table 4")[1].split("## Running time")[0]


def test_demo_refuses_an_unknown_routing_before_writing_anything(tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        cli.main(["demo", "--out", str(tmp_path / "d"), "--routing", "stardist"])
    assert "invalid choice" in capsys.readouterr().err
    from cellseg_lite import demo

    with pytest.raises(CellSegError, match="routing"):
        demo.run_demo(tmp_path / "d", routing="stardist")
    assert not (tmp_path / "d").exists()


def test_the_routing_choices_are_the_tables_and_validated():
    assert set(cli.ROUTING_CHOICES) == set(infer.ROUTINGS) | {"validated"}


def test_predict_skips_a_corrupt_file_and_writes_the_others(demo_run, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for c in (0, 3):
        io.write_image(images / f"good{c}.png", synthetic.make_image(c, (64, 64), seed=c)[0])
    (images / "broken.tif").write_bytes(b"II*\x00 this is not a tiff")
    out = tmp_path / "pred"
    code = cli.main(
        ["predict", "--model", str(demo_run / "model.pt"), "--out", str(out), str(images)]
    )
    captured = capsys.readouterr()
    assert code == cli.EXIT_FAILED
    assert "broken.tif" in captured.err and "Traceback" not in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["good0_label.tiff", "good3_label.tiff"]
    assert "2 of 3 images" in captured.out


def test_predict_writes_no_file_over_another_input_s_labels(demo_run, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    image = synthetic.make_image(0, (64, 64), seed=0)[0]
    for name in ("cells.png", "cells.tif", "other.png"):
        io.write_image(images / name, image)
    out = tmp_path / "pred"
    code = cli.main(
        ["predict", "--model", str(demo_run / "model.pt"), "--out", str(out), str(images)]
    )
    captured = capsys.readouterr()
    assert code == cli.EXIT_FAILED
    assert "cells.png" in captured.err and "cells.tif" in captured.err
    assert "cells_label.tiff" in captured.err and "Traceback" not in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["other_label.tiff"]
    assert "1 of 3 images" in captured.out


@pytest.mark.parametrize("flag, tta", [("--tta", True), ("--no-tta", False)])
def test_predict_can_turn_the_flips_on_and_off(demo_run, tmp_path, flag, tta):
    image = synthetic.make_image(0, (64, 64), seed=7)[0]
    io.write_image(tmp_path / "cells.png", image)
    model = str(demo_run / "model.pt")
    args = ["predict", "--model", model, "--out", str(tmp_path), "--quiet", flag]
    assert cli.main([*args, str(tmp_path / "cells.png")]) == cli.EXIT_OK
    segmenter = infer.MultiStreamSegmenter.load(demo_run / "model.pt")
    segmenter.tta = tta
    expected = segmenter.segment(image)
    assert (io.read_labels(tmp_path / "cells_label.tiff") == expected).all()


@pytest.mark.parametrize(
    "option, attribute, category, pixels, expected",
    [
        ("--min-diameter", "min_diameter", 3, None, infer.MIN_DIAMETER),
        ("--min-diameter", "min_diameter", 3, "0", None),
        ("--min-diameter", "min_diameter", 3, "40", 40.0),
        ("--mirror-context", "mirror_context", 0, None, infer.MIRROR_CONTEXT),
        ("--mirror-context", "mirror_context", 0, "0", 0),
        ("--mirror-context", "mirror_context", 0, "8", 8),
        ("--whole-image-side", "whole_image_side", 0, None, infer.WHOLE_IMAGE_SIDE),
        ("--whole-image-side", "whole_image_side", 0, "0", None),
        ("--whole-image-side", "whole_image_side", 0, "64", 64),
        ("--map-scales", "map_scales", 0, None, None),
        ("--map-scales", "map_scales", 0, "1,1.5", (1.0, 1.5)),
    ],
)
def test_predict_sets_the_segmenters_pixel_options(
    demo_run, tmp_path, monkeypatch, option, attribute, category, pixels, expected
):
    seen = []
    original = infer.MultiStreamSegmenter.segment
    monkeypatch.setattr(
        infer.MultiStreamSegmenter,
        "segment",
        lambda self, *a, **k: seen.append(getattr(self, attribute)) or original(self, *a, **k),
    )
    io.write_image(tmp_path / "cells.png", synthetic.make_image(category, (64, 64), seed=7)[0])
    args = ["predict", "--model", str(demo_run / "model.pt"), "--out", str(tmp_path), "--quiet"]
    args += [] if pixels is None else [option, pixels]
    assert cli.main([*args, str(tmp_path / "cells.png")]) == cli.EXIT_OK
    assert seen == [expected] and (tmp_path / "cells_label.tiff").is_file()


@pytest.mark.parametrize("option", ["--min-diameter", "--mirror-context", "--whole-image-side"])
def test_predict_refuses_negative_pixels(demo_run, tmp_path, capsys, option):
    io.write_image(tmp_path / "a.png", synthetic.make_image(0, (64, 64), seed=0)[0])
    args = ["predict", "--model", str(demo_run / "model.pt"), "--out", str(tmp_path / "o")]
    assert cli.main([*args, option, "-1", str(tmp_path / "a.png")]) == 2
    assert f"{option}: expected pixels >= 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["predict", "train"])
def test_map_scales_must_be_distinct_positive_numbers(tmp_path, capsys, command):
    for bad in ("1,1", "1,x", "0", ""):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(
                [command, "--model", "m.pt", "--out", str(tmp_path / "o"), "--map-scales", bad]
            )
        assert exit_info.value.code == cli.EXIT_USAGE
        assert "expected distinct scales > 0 separated by commas" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_predict_reports_wrong_paths_and_models(demo_run, tmp_path, capsys):
    image = tmp_path / "a.png"
    io.write_image(image, synthetic.make_image(0, (64, 64), seed=0)[0])
    out = str(tmp_path / "o")
    assert (
        cli.main(["predict", "--model", str(tmp_path / "none.pt"), "--out", out, str(image)]) == 2
    )
    assert "segmenter file not found" in capsys.readouterr().err
    assert (
        cli.main(["predict", "--model", str(demo_run / "model.pt"), "--out", out, "nope.png"]) == 2
    )
    assert "no such file or folder" in capsys.readouterr().err
    stream = demo_run / "work" / "stardist_all.pt"
    assert cli.main(["predict", "--model", str(stream), "--out", out, str(image)]) == 2
    assert "single-stream checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("routing", ["code", "hover"])
def test_train_command_writes_a_segmenter(tmp_path, capsys, routing):
    data = tmp_path / "data"
    synthetic.make_dataset(data, 1, size=(128, 128), seed=5, categories=(0, 1, 3))
    out = tmp_path / "model.pt"
    code = cli.main(
        ["train", "--data", str(data), "--synthetic", "1", "--out", str(out), "--preset", "fast",
         "--routing", routing, "--quiet", "--work-dir", str(tmp_path / "work")]
        + (["--map-scales", "1,1.5"] if routing == "hover" else [])
    )  # fmt: skip
    assert code == cli.EXIT_OK, capsys.readouterr().err
    segmenter = infer.MultiStreamSegmenter.load(out)
    # --map-scales reaches the training settings (this run holds no selection images to tune on)
    hover_config = train.load_checkpoint(tmp_path / "work" / "hover_all.pt").config
    assert hover_config.map_scales == ((1.0, 1.5) if routing == "hover" else (1.0,))
    assert segmenter.routing_name == routing and segmenter.stream_for(3) == "hover"
    assert train.load_checkpoint(tmp_path / "work" / "hover_all.pt").categories == (0, 1, 2, 3)
    # the hover routing trains no StarDist network at all
    trained_stardist = (tmp_path / "work" / "stardist_all.pt").exists()
    assert trained_stardist == (routing == "code")
    assert {segmenter.stream_for(c) for c in range(4)} == set(infer.ROUTINGS[routing].values())


def test_train_command_errors(tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "m.pt")]) == cli.EXIT_USAGE
    assert "--data" in capsys.readouterr().err
    assert (
        cli.main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m.pt")]) == 2
    )
    assert "data folder not found" in capsys.readouterr().err
    assert cli.main(["train", "--synthetic", "1", "--out", str(tmp_path)]) == cli.EXIT_USAGE
    assert "is a folder" in capsys.readouterr().err
    few = ["train", "--synthetic", "1", "--out", str(tmp_path / "m.pt"), "--min-selection-images"]
    assert cli.main([*few, "0"]) == cli.EXIT_USAGE
    assert "min_selection_images: expected a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_a_stream_checkpoint_of_another_backbone_is_refused_by_fine_tuning(tmp_path):
    data = tmp_path / "d"
    synthetic.make_dataset(data, 1, size=(96, 96), seed=1, categories=(0, 1, 3))
    pre = tmp_path / "pre.pt"
    config = train.preset("fast", augment=False, epochs=1)
    train.train_stream(data, config, out=pre, progress=False)
    with pytest.raises(Exception, match="backbone='convnext_atto'"):
        train.train_stream(data, config.replace(backbone="convnext_pico"), init=pre, progress=False)
    assert torch.load(pre, weights_only=True)["config"]["backbone"] == "convnext_atto"


def test_validated_routing_sends_each_class_to_its_better_stream(tmp_path):
    import re

    data = tmp_path / "data"
    synthetic.make_dataset(data, 3, size=(128, 128), seed=9)
    segmenter, stages = train.train_multistream(
        data, tmp_path / "model.pt", preset_name="fast", routing="validated", fine_tune=False,
        progress=False, work_dir=tmp_path / "stages",
    )  # fmt: skip
    routing_stage = next(s for s in stages if s.name == "routing by validation")
    decided = re.findall(
        r"class (\d): (\w+) \(stardist ([\d.]+), hover ([\d.]+)\)", routing_stage.detail
    )
    assert len(decided) == 4  # one selection image per class
    overall = {
        s.name.split()[0]: s.val_f1 for s in stages if s.name.endswith(" probe")
    }  # ties go to the stream with the higher selection F1 overall
    for c, stream, f1_stardist, f1_hover in decided:
        scores = {"stardist": (float(f1_stardist), overall["stardist"]),
                  "hover": (float(f1_hover), overall["hover"])}  # fmt: skip
        assert stream == max(scores, key=scores.get) == segmenter.routing[int(c)]
    loaded = infer.MultiStreamSegmenter.load(tmp_path / "model.pt")
    assert loaded.routing_name == "validated" and loaded.routing == segmenter.routing
    # a race: both streams train a probe (a fifth of the epochs, at least one), the winners go on
    names = [s.name for s in stages]
    assert names[1:3] == ["stardist probe", "hover probe"]
    for stream in ("stardist", "hover"):
        epochs = train.load_checkpoint(tmp_path / "stages" / f"{stream}_all.pt").history["epochs"]
        won = stream in segmenter.routing.values()
        assert (f"{stream} on all (continued)" in names) == won
        assert epochs == (train.preset("fast").epochs if won else 1)


def test_only_classes_with_enough_selection_images_are_fine_tuned(tmp_path):
    data, rich, poor = tmp_path / "data", tmp_path / "val_rich", tmp_path / "val_poor"
    synthetic.make_dataset(data, 3, size=(96, 96), seed=4, categories=(0, 1, 3))
    synthetic.make_dataset(rich, 2, size=(96, 96), seed=5, categories=(0,))
    synthetic.make_dataset(poor, 1, size=(96, 96), seed=6, categories=(1, 3))
    minutes = 2.0  # the fast preset's two epochs end every stage before its share
    segmenter, stages = train.train_multistream(
        data, tmp_path / "model.pt", val=[rich, poor], preset_name="fast", minutes=minutes,
        min_selection_images=2, progress=False, work_dir=tmp_path / "stages",
    )  # fmt: skip
    assert [s.name for s in stages if "fine-tuned" in s.name] == ["stardist fine-tuned on class 0"]
    work = tmp_path / "stages"
    assert sorted(p.name for p in work.glob("*_class*.pt")) == ["stardist_class0.pt"]
    pre = {s: train.load_checkpoint(work / f"{s}_all.pt") for s in ("stardist", "hover")}
    for c in (1, 2, 3):  # too few selection images, or none: the pre-trained model as it is
        assert segmenter.models[c].thresholds == pre[segmenter.routing[c]].thresholds
    # a quarter of the fine-tuning share per fine-tuned class; the other three go to pre-training
    fine = train.BUDGET_SHARES["fine_tune"] / 4
    tuned = train.load_checkpoint(work / "stardist_class0.pt")
    assert tuned.config.minutes == pytest.approx(minutes * fine)
    pretraining = train.BUDGET_SHARES["stardist"] + train.BUDGET_SHARES["hover"] + 3 * fine
    # and the minutes that the router left of its share
    router_share = minutes * train.BUDGET_SHARES["router"]
    router_minutes = stages[0].seconds / 60
    assert stages[0].name == "router" and router_minutes < router_share
    assert sum(ckpt.config.minutes for ckpt in pre.values()) == pytest.approx(
        minutes * pretraining + router_share - router_minutes
    )


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "5"])
def test_min_selection_images_must_be_a_positive_integer(tmp_path, bad):
    with pytest.raises(CellSegError, match=f"min_selection_images: .*got {bad!r}"):
        train.train_multistream(tmp_path, tmp_path / "model.pt", min_selection_images=bad)


def test_the_whole_method_refuses_to_run_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CellSegError, match="runs in one process; under torchrun train each stream"):
        train.train_multistream(tmp_path, tmp_path / "model.pt", preset_name="fast")
