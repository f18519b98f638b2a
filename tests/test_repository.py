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
