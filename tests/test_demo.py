"""The demo report's reading of its Table 4 (`demo.reading`), from the table's own numbers."""

from __future__ import annotations

from cellseg_lite import demo, infer

STAR = "ConvNeXt-StarDist, pre-trained, one model"
HOVER = "ConvNeXt-HoVer, pre-trained, one model"
MULTI = "multi-stream (routed, fine-tuned)"
STREAMS = {STAR: "stardist", HOVER: "hover"}
PAPER = infer.ROUTINGS["paper"]


def test_a_multi_stream_run_at_least_as_good_as_either_stream_is_read_as_the_paper_reads_it():
    text = demo.reading({STAR: 0.60, HOVER: 0.70, MULTI: 0.72}, PAPER, STREAMS)
    assert "0.720" in text and "ConvNeXt-HoVer (0.700)" in text and "Table 4" in text
    assert "below" not in text


def test_a_multi_stream_run_below_the_better_stream_names_the_classes_sent_elsewhere():
    text = demo.reading({STAR: 0.02, HOVER: 0.66, MULTI: 0.13}, PAPER, STREAMS)
    assert "(0.130) scores below ConvNeXt-HoVer alone (0.660)" in text
    assert "classes 0, 2, 3 to the other stream (ConvNeXt-StarDist alone 0.020)" in text
    assert "StarDist's ray distances need more steps" in text
    assert "--routing validated" in text and "--minutes" in text
    chosen = demo.reading({STAR: 0.02, HOVER: 0.66, MULTI: 0.13}, PAPER, STREAMS, "validated")
    assert "--routing validated" not in chosen and "`--minutes` gives" in chosen


def test_when_stardist_is_the_better_stream_the_reading_does_not_blame_stardist():
    text = demo.reading({STAR: 0.70, HOVER: 0.30, MULTI: 0.60}, PAPER, STREAMS)
    assert "scores below ConvNeXt-StarDist alone (0.700)" in text
    assert "sends class 1 to the other stream (ConvNeXt-HoVer alone 0.300)" in text
    assert "ray distances" not in text


def test_a_run_that_routes_every_class_to_the_better_stream_blames_the_fine_tuning():
    hover_only = infer.ROUTINGS["hover"]
    text = demo.reading({HOVER: 0.66, MULTI: 0.60}, hover_only, {HOVER: "hover"})
    assert "serves every class as well" in text and "fine-tuned" in text


def test_no_single_stream_no_reading():
    assert demo.reading({MULTI: 0.5}, PAPER, {}) == ""
