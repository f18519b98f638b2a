"""The FAST switch: CPU-minutes (``CELLSEG_FAST=1``) or the paper's GPU settings.

The flag changes sizes and schedules, never which code runs.
"""

from __future__ import annotations

import os

_TRUE = {"1", "true", "yes", "on"}


def fast_mode() -> bool:
    """True when the environment variable ``CELLSEG_FAST`` is set to 1/true/yes/on."""
    return os.environ.get("CELLSEG_FAST", "").strip().lower() in _TRUE
