"""The cellseg-lite command: exit codes, messages, files written."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from cellseg_lite import cli, io, metrics, synthetic


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert "cellseg-lite" in capsys.readouterr().out


def test_synthetic_then_evaluate_against_itself(tmp_path, capsys):
    assert cli.main(["synthetic", "--out", str(tmp_path / "d"), "--n", "1", "--size", "128"]) == 0
    labels = sorted((tmp_path / "d" / "labels").glob("*_label.tiff"))
    assert len(labels) == 4
    out_csv = tmp_path / "scores.csv"
    gt = tmp_path / "d" / "labels"
    assert cli.main(["evaluate", str(gt), str(gt), "--csv", str(out_csv)]) == 0
    with out_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    # every image with cells away from the frame scores 1; an image whose cells all touch the
    # frame has none left, and the challenge rule scores it 0
    assert all(float(r["f1"]) == (1.0 if int(r["n_true"]) > 0 else 0.0) for r in rows)


def test_evaluate_missing_folder_is_a_clean_error(tmp_path, capsys):
    code = cli.main(["evaluate", str(tmp_path / "nope"), str(tmp_path)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert "nope" in err and "Traceback" not in err


def test_evaluate_scores_a_prediction(tmp_path, capsys):
    image, labels = synthetic.make_image(0, size=(128, 128), seed=3)
    io.write_labels(tmp_path / "gt" / "cells_label.tiff", labels)
    pred = labels.copy()
    pred[pred == pred.max()] = 0  # drop one cell
    io.write_labels(tmp_path / "pred" / "cells_label.tiff", pred)
    assert cli.main(["evaluate", str(tmp_path / "gt"), str(tmp_path / "pred")]) == 0
    assert "F1" in capsys.readouterr().out
    assert "not matched" not in capsys.readouterr().out  # kinds only when asked for
    assert cli.main(["evaluate", str(tmp_path / "gt"), str(tmp_path / "pred"), "--kinds"]) == 0
    out = capsys.readouterr().out
    k = metrics.error_kinds(labels, pred)
    assert k.missed == 1 and k.fn == 1 and k.fp == 0  # the dropped cell, and nothing else
    assert (
        f"true cells not matched: 1 of {k.tp + 1} (missed 1, split 0, merged 0, outline 0)" in out
    )
    assert f"predicted cells not matched: 0 of {k.tp} (merger 0, on_cell 0, background 0)" in out


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "cellseg_lite.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "evaluate" in out.stdout


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2


def test_predict_inputs_name_each_file_once_and_find_the_stems_that_clash(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    image = synthetic.make_image(0, (64, 64), seed=0)[0]
    for name in ("a/x.png", "a/x.tif", "a/y.png", "b/y.png", "b/z.png"):
        io.write_image(tmp_path / name, image)
    # b/z.png named twice, by its folder and by itself: once
    files = cli._image_files([tmp_path / "a", tmp_path / "b", tmp_path / "b" / "z.png"])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in files) == [
        "a/x.png", "a/x.tif", "a/y.png", "b/y.png", "b/z.png"
    ]  # fmt: skip
    clashes = cli._stem_clashes(files)
    assert {p.name: [o.relative_to(tmp_path).as_posix() for o in others]
            for p, others in clashes.items() if p.parent.name == "a"} == {
        "x.png": ["a/x.tif"], "x.tif": ["a/x.png"], "y.png": ["b/y.png"]
    }  # fmt: skip
    assert tmp_path / "b" / "z.png" not in clashes
