"""The book's configuration builds: Sphinx with warnings as errors, notebooks not executed here
(the notebooks run under nbval in `make test`, and executed in full by `make book`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_book_builds_with_warnings_as_errors(tmp_path):
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    if not jupyter_book.exists():
        pytest.skip("jupyter-book is not installed (install the [book] extra)")
    config = (REPO / "_config.yml").read_text()
    assert "execute_notebooks: force" in config
    (tmp_path / "_config.yml").write_text(
        config.replace("execute_notebooks: force", "execute_notebooks: 'off'")
    )
    result = subprocess.run(
        [
            str(jupyter_book),
            "build",
            str(REPO),
            "--config",
            str(tmp_path / "_config.yml"),
            "--path-output",
            str(tmp_path),
            "-W",
            "-n",
            "--keep-going",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    html = tmp_path / "_build" / "html"
    pages = {p.relative_to(html).as_posix() for p in html.rglob("*.html")}
    for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
        page = f"notebooks/{notebook.stem}.html"
        assert page in pages, f"{page} was not built"
        assert "colab.research.google.com" in (html / page).read_text(), (
            f"no Colab button on {page}"
        )
    assert (
        "multi-stream cell segmentation with low-level cues"
        in (html / "book" / "references.html").read_text().lower()
    )
    shutil.rmtree(tmp_path / "_build", ignore_errors=True)
