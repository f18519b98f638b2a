"""The repository's own promises: clean notebooks, a book that lists them, one test command everywhere."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

import pytest
from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_clean(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, cell in enumerate(nb["cells"]) if cell.get("outputs")]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs (run nbstripout)"
    counts = [c.get("execution_count") for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c is None for c in counts), f"{path.name}: execution counts are committed"
    assert "widgets" not in nb.get("metadata", {}), f"{path.name}: widget state in metadata"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_numbered_and_in_the_toc(path):
    assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name)
    toc = (REPO / "_toc.yml").read_text()
    assert f"notebooks/{path.stem}" in toc, f"{path.name} is missing from _toc.yml"


def test_toc_entries_exist():
    toc = (REPO / "_toc.yml").read_text()
    for entry in re.findall(r"(?:file|root):\s*(\S+)", toc):
        candidates = [REPO / f"{entry}{ext}" for ext in ("", ".md", ".ipynb")]
        assert any(p.is_file() for p in candidates), f"_toc.yml names a missing file: {entry}"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    commands = re.findall(r"^\s*(make \w+)\s*$", readme, flags=re.M)
    assert commands == ["make book", "make test"], commands
    assert re.search(r"^make test$", ci, flags=re.M)


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = (REPO / "environment.yml").read_text()
    conda_names = {"torch": "pytorch", "matplotlib": "matplotlib-base"}
    wanted = project["dependencies"] + project["optional-dependencies"]["test"]
    wanted += project["optional-dependencies"]["book"]
    for requirement in wanted:
        name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)
        assert conda_names.get(name, name) in env, f"environment.yml lacks {name}"


def test_import_is_light():
    # `import cellseg_lite` must not pull torch, matplotlib or anything that touches the network.
    code = (
        "import sys, cellseg_lite; "
        "heavy = [m for m in ('torch', 'matplotlib', 'timm', 'stardist', 'urllib.request') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------------------------------------
# The book as a product: one install cell everywhere, chapters with objectives and solutions.


def _code_cells(path):
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def _source(cell) -> str:
    return "".join(cell["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_cell_is_the_workshop_cell(path):
    from cellseg_lite import workshop

    expected = workshop.first_cell(workshop.repository_url(REPO))
    cells = _code_cells(path)
    assert cells, f"{path.name} has no code cell"
    assert _source(cells[0]) == expected, (
        f"{path.name}: the first code cell must be exactly workshop.first_cell(...):\n{expected}"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_install_cell_names_the_configured_repository(path):
    from cellseg_lite import workshop

    url = workshop.repository_url(REPO)
    installs = re.findall(r"git\+(\S+?)[\"']", _source(_code_cells(path)[0]))
    assert installs == [url], f"{path.name} installs from {installs}, _config.yml says {url}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_opens_with_objectives_and_closes_with_exercises_and_solutions(path):
    cells = json.loads(path.read_text())["cells"]
    opening = _source(cells[0])
    for part in ("Learning objectives", "Prerequisites", "Estimated time"):
        assert part in opening, f"{path.name}: the first cell lacks '{part}'"
    text = [_source(c) for c in cells]
    heading = lambda name: next(  # noqa: E731
        (i for i, t in enumerate(text) if re.search(rf"^## {name}\b", t, flags=re.M)), None
    )
    summary, exercises, solutions = heading("Summary"), heading("Exercises"), heading("Solutions")
    assert None not in (summary, exercises, solutions), f"{path.name}: Summary/Exercises/Solutions"
    assert summary <= exercises <= solutions
    folded = [
        c
        for c in cells[solutions:]
        if c["cell_type"] == "code" and "hide-input" in c.get("metadata", {}).get("tags", [])
    ]
    assert len(folded) >= 2, f"{path.name}: at least two solutions, tagged hide-input"
    assert all(_source(c).startswith("# Exercise") for c in folded), (
        f"{path.name}: each solution starts with '# Exercise N: ...'"
    )


def test_book_figures_are_drawn_by_the_package():
    # no hand-made pictures: the intro's figure comes from viz.plot_pipeline at build time
    pictures = [
        p.name
        for p in (REPO / "book").rglob("*")
        if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".svg", ".gif"}
    ]
    assert not pictures, f"image files in book/: {pictures}"
    assert "viz.plot_pipeline()" in (REPO / "book" / "intro.md").read_text()
