"""The reading of a Table 4 (`demo.reading`), drawn from the table's own numbers."""

from __future__ import annotations

from types import SimpleNamespace

from cellseg_lite import demo, infer

STAR = "ConvNeXt-StarDist, pre-trained, one model"
HOVER = "ConvNeXt-HoVer, pre-trained, one model"
MULTI = "multi-stream (routed, fine-tuned)"


def _segmenter(routing: str | dict) -> SimpleNamespace:
    """What `reading` reads of a segmenter: its routing table and the table's name."""
    table = infer.ROUTINGS[routing] if isinstance(routing, str) else routing
    return SimpleNamespace(routing=dict(table), routing_name=routing)


def _methods(routing="paper", singles=("stardist", "hover")) -> dict:
    names = {"stardist": STAR, "hover": HOVER}
    methods = {names[s]: _segmenter(dict.fromkeys(range(4), s)) for s in singles}
    return methods | {MULTI: _segmenter(routing)}


def test_a_multi_stream_run_at_least_as_good_as_either_stream_is_read_as_the_paper_reads_it():
    text = demo.reading(_methods(), {STAR: 0.60, HOVER: 0.70, MULTI: 0.72})
    assert "0.720" in text and "ConvNeXt-HoVer (0.700)" in text and "Table 4" in text
    assert "below" not in text


def test_a_multi_stream_run_below_the_better_stream_names_the_classes_sent_elsewhere():
    text = demo.reading(_methods(), {STAR: 0.02, HOVER: 0.66, MULTI: 0.13})
    assert "(0.130) scores below ConvNeXt-HoVer alone (0.660)" in text
    assert "classes 0, 2, 3 to the other stream (ConvNeXt-StarDist alone 0.020)" in text
    assert "StarDist's ray distances need more steps" in text
    assert "--routing validated" in text and "--minutes" in text


def test_a_run_that_already_chose_its_streams_on_validation_is_not_told_to_do_so():
    validated = _methods()
    validated[MULTI].routing_name = "validated"
    text = demo.reading(validated, {STAR: 0.02, HOVER: 0.66, MULTI: 0.13})
    assert "--routing validated" not in text and "A longer budget (`--minutes`)" in text


def test_when_stardist_is_the_better_stream_the_reading_does_not_blame_stardist():
    text = demo.reading(_methods(), {STAR: 0.70, HOVER: 0.30, MULTI: 0.60})
    assert "scores below ConvNeXt-StarDist alone (0.700)" in text
    assert "sends class 1 to the other stream (ConvNeXt-HoVer alone 0.300)" in text
    assert "ray distances" not in text


def test_a_run_that_routes_every_class_to_the_better_stream_blames_the_fine_tuning():
    text = demo.reading(_methods("hover", singles=("hover",)), {HOVER: 0.66, MULTI: 0.60})
    assert "serves every class as well" in text and "fine-tuned" in text


def test_no_single_stream_no_reading():
    assert demo.reading({MULTI: _segmenter("paper")}, {MULTI: 0.5}) == ""
