"""The pretrained-weights fallback: asked-for weights that cannot be fetched give a warning, never a crash."""

from __future__ import annotations

import pytest

from cellseg_lite._weights import PretrainedWeightsWarning, build_with_pretrained


def _builder(fail_with=None):
    calls = []

    def build(pretrained: bool):
        calls.append(pretrained)
        if pretrained and fail_with is not None:
            raise fail_with
        return "pretrained" if pretrained else "random"

    return build, calls


def test_not_asked_builds_random_without_trying():
    build, calls = _builder()
    assert build_with_pretrained(build, "model", pretrained=False) == "random"
    assert calls == [False]


def test_fetched_weights_are_used():
    build, calls = _builder()
    assert build_with_pretrained(build, "model", pretrained=True) == "pretrained"
    assert calls == [True]


@pytest.mark.parametrize("error", [OSError("Network is unreachable"), RuntimeError("hub failed")])
def test_offline_falls_back_with_a_warning(error):
    build, calls = _builder(fail_with=error)
    with pytest.warns(PretrainedWeightsWarning, match="resnet18: could not fetch.*random"):
        assert build_with_pretrained(build, "resnet18", pretrained=True) == "random"
    assert calls == [True, False]


def test_programming_errors_are_not_swallowed():
    build, _ = _builder(fail_with=TypeError("bad argument"))
    with pytest.raises(TypeError):
        build_with_pretrained(build, "model", pretrained=True)


def test_a_failed_fetch_is_not_retried_in_the_same_process():
    build, calls = _builder(fail_with=OSError("Name or service not known"))
    with pytest.warns(PretrainedWeightsWarning, match="Name or service not known"):
        build_with_pretrained(build, "convnext_atto", pretrained=True)
    with pytest.warns(PretrainedWeightsWarning, match="Name or service not known"):
        assert build_with_pretrained(build, "convnext_atto", pretrained=True) == "random"
    assert calls == [True, False, False]
    other, other_calls = _builder()
    assert build_with_pretrained(other, "resnet18", pretrained=True) == "pretrained"
    assert other_calls == [True]
