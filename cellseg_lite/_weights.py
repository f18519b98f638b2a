"""Pretrained weights: try to fetch them, and fall back to random initialisation with a warning."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class PretrainedWeightsWarning(UserWarning):
    """Pretrained weights were asked for but could not be fetched; the model starts from random."""


# What libraries raise when a download fails: urllib/socket errors are OSError, and so are
# huggingface_hub's and requests' connection and HTTP errors; torch.hub raises RuntimeError on
# some failures, and a missing optional package raises ImportError.
_FETCH_ERRORS = (OSError, RuntimeError, ImportError, ValueError)


def build_with_pretrained(build: Callable[[bool], T], what: str, pretrained: bool) -> T:
    """``build(True)`` when ``pretrained`` and the weights can be fetched, else ``build(False)``.

    Offline (a laptop on a train, this project's CI) the model still builds, from random weights,
    and a :class:`PretrainedWeightsWarning` says so and why: never a silent fallback.
    """
    if not pretrained:
        return build(False)
    try:
        return build(True)
    except _FETCH_ERRORS as err:
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        warnings.warn(
            f"{what}: could not fetch pretrained weights ({reason}); "
            "starting from random initialisation instead",
            PretrainedWeightsWarning,
            stacklevel=3,
        )
        return build(False)
