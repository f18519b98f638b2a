"""Shared fixtures: the real-mini data folder (skipped cleanly when absent) and seeded RNGs."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def real_mini_path() -> Path:
    """``$CELLSEG_REAL_MINI`` or ``../shared/data/real-mini`` beside the checkout."""
    env = os.environ.get("CELLSEG_REAL_MINI")
    return Path(env) if env else REPO.parent / "shared" / "data" / "real-mini"


@pytest.fixture(scope="session")
def real_mini() -> Path:
    root = real_mini_path()
    if not (root / "manifest.csv").is_file():
        pytest.skip(f"real-mini data not found at {root}")
    return root


@pytest.fixture(scope="session")
def real_manifest(real_mini) -> list[dict]:
    with open(real_mini / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny networks: on a busy 2-core machine two threads mostly wait."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def forget_weight_failures(monkeypatch):
    """Each test starts without the process's memory of failed weight downloads."""
    from cellseg_lite import _weights

    monkeypatch.setattr(_weights, "_FAILED", {})


@pytest.fixture
def scale_averaging(monkeypatch) -> list:
    """Each call of ``infer.scale_averaged`` from here on, as ``(image shape, scales, maps)``."""
    from cellseg_lite import infer

    calls = []
    original = infer.scale_averaged

    def spy(maps_of, x, scales, maps):
        calls.append((x.shape, scales, maps))
        return original(maps_of, x, scales, maps)

    monkeypatch.setattr(infer, "scale_averaged", spy)
    return calls
