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


# Models whose weights could not be fetched in this process, and why: not asked for again.
_FAILED: dict[str, str] = {}


def build_with_pretrained(build: Callable[[bool], T], what: str, pretrained: bool) -> T:
    """``build(True)`` when ``pretrained`` and the weights can be fetched, else ``build(False)``.

    Offline (a laptop on a train, this project's CI) the model still builds, from random weights,
    and a :class:`PretrainedWeightsWarning` says so and why: never a silent fallback. A failed
    fetch is remembered for the rest of the process, so the next model of the same kind warns at
    once instead of waiting for the hub's retries again.
    """
    if not pretrained:
        return build(False)
    if what in _FAILED:  # a hub retries for about a minute before it gives up: once is enough
        reason = _FAILED[what]
    else:
        try:
            return build(True)
        except _FETCH_ERRORS as err:
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            _FAILED[what] = reason
    warnings.warn(
        f"{what}: could not fetch pretrained weights ({reason}); "
        "starting from random initialisation instead",
        PretrainedWeightsWarning,
        stacklevel=3,
    )
    return build(False)
