"""The one exception type users see, and the helper that raises it."""

from __future__ import annotations

import os


class CellSegError(ValueError):
    """Bad user input: a file or array that cellseg-lite cannot use.

    The message names the file (or argument) and says what is wrong, so a user
    with a folder of thousands of images knows which one to look at.
    """


def where(source: str | os.PathLike | None) -> str:
    """Render the thing a message is about: ``'path/to/x.tif'`` or ``'image'``."""
    if source is None:
        return "input"
    if isinstance(source, os.PathLike):
        return f"'{os.fspath(source)}'"
    return str(source)
