"""workshop: the switches, the status block, cached artefacts that are never stale, the repository URL."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types

import pytest
from conftest import REPO

import cellseg_lite
from cellseg_lite import CellSegError, workshop


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("CELLSEG_FAST", "CELLSEG_FULL", "CELLSEG_PROGRESS", "CELLSEG_REAL_MINI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CELLSEG_DATA_ROOT", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # no real-mini beside a tmp folder
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    import torch

    threads = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(threads)


def no_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ----------------------------------------------------------------------------------- setup


def test_import_does_not_pull_torch():
    code = "import sys, cellseg_lite.workshop; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_fast_mode_settings_and_status_block(clean_env, capsys):
    clean_env.setenv("CELLSEG_FAST", "1")
    no_gpu(clean_env)
    import torch

    settings = workshop.setup()
    assert settings.fast and not settings.full and settings.mode == "FAST"
    assert settings.device == "cpu" and settings.gpu_name is None
    assert settings.progress is False and settings.preset == "fast"
    assert settings.torch_threads == 1 == torch.get_num_threads()
    assert settings.real_mini is None
    assert settings.data_root.name == "cache"  # CELLSEG_DATA_ROOT of the fixture
    out = capsys.readouterr().out
    assert "FAST mode" in out and "cpu (no GPU)" in out and "progress   : off" in out
    assert str(settings) in out


def test_data_root_and_real_mini_from_the_environment(clean_env, tmp_path):
    (tmp_path / "mini").mkdir()
    (tmp_path / "mini" / "manifest.csv").write_text("stem\n")
    clean_env.setenv("CELLSEG_REAL_MINI", str(tmp_path / "mini"))
    settings = workshop.setup()
    assert settings.real_mini == (tmp_path / "mini").resolve()
    assert settings.data_root == tmp_path / "cache"


def test_real_mini_is_found_beside_the_checkout(clean_env, tmp_path):
    mini = tmp_path / "shared" / "data" / "real-mini"
    mini.mkdir(parents=True)
    (mini / "manifest.csv").write_text("stem\n")
    (tmp_path / "repo" / "notebooks").mkdir(parents=True)
    assert workshop.find_real_mini(tmp_path / "repo") == mini.resolve()  # ../shared
    assert workshop.find_real_mini(tmp_path / "repo" / "notebooks") == mini.resolve()  # ../../
    assert workshop.find_real_mini(tmp_path / "elsewhere" / "deep" / "er") is None


def test_data_root_defaults_to_the_checkout(monkeypatch):
    monkeypatch.delenv("CELLSEG_DATA_ROOT", raising=False)
    assert workshop.data_root() == REPO / "data" / "generated"


def test_fast_wins_over_full_with_a_warning(clean_env):
    clean_env.setenv("CELLSEG_FAST", "1")
    clean_env.setenv("CELLSEG_FULL", "1")
    with pytest.warns(UserWarning, match="FAST wins"):
        settings = workshop.setup()
    assert settings.fast and not settings.full


def test_full_without_gpu_warns_and_uses_the_lite_preset(clean_env):
    no_gpu(clean_env)
    with pytest.warns(UserWarning, match="paper preset needs one"):
        settings = workshop.setup(full=True)
    assert settings.full and settings.mode == "FULL" and settings.preset == "lite"
    assert settings.progress is True and settings.torch_threads is None


def test_full_on_a_gpu_uses_the_paper_preset(clean_env, capsys):
    import torch

    clean_env.setenv("CELLSEG_FULL", "yes")
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "get_device_name", lambda index=0: "Tesla T4")
    settings = workshop.setup()
    assert settings.full and settings.device == "cuda" and settings.gpu_name == "Tesla T4"
    assert settings.preset == "paper"
    assert "cuda (Tesla T4)" in capsys.readouterr().out


def test_colab_without_gpu_says_how_to_get_one(clean_env, capsys):
    clean_env.setenv("CELLSEG_FAST", "1")
    clean_env.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    no_gpu(clean_env)
    settings = workshop.setup()
    assert settings.on_colab and settings.progress is True  # bars on Colab, even in FAST mode
    assert "Runtime > Change runtime type > GPU" in capsys.readouterr().out


def test_progress_can_be_forced(clean_env):
    clean_env.setenv("CELLSEG_PROGRESS", "0")
    assert workshop.setup().progress is False


def test_a_bad_switch_value_is_a_cellseg_error(clean_env):
    clean_env.setenv("CELLSEG_FULL", "maybe")
    with pytest.raises(CellSegError, match="CELLSEG_FULL.*'maybe'"):
        workshop.setup()


# ----------------------------------------------------------------------------------- cached


class Builder:
    """A build function that counts its calls and writes a folder with one file."""

    def __init__(self, text="v1"):
        self.calls, self.text = 0, text

    def __call__(self, path):
        self.calls += 1
        path.mkdir()
        (path / "data.txt").write_text(self.text)


def test_cached_builds_once_then_reuses(tmp_path, capsys):
    build = Builder()
    first = workshop.cached("set", build, key={"n": 2}, root=tmp_path)
    assert first == tmp_path / "set" and (first / "data.txt").read_text() == "v1"
    assert "not built yet" in capsys.readouterr().out
    again = workshop.cached("set", build, key={"n": 2}, root=tmp_path)
    assert again == first and build.calls == 1
    assert "reusing" in capsys.readouterr().out
    stored = json.loads((tmp_path / ".set.key.json").read_text())
    assert stored == {"key": {"n": 2}, "version": cellseg_lite.__version__}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".set.key.json", "set"]


def test_cached_rebuilds_when_the_key_changes_and_says_why(tmp_path, capsys):
    workshop.cached("set", Builder("v1"), key={"n": 2, "size": 64}, root=tmp_path)
    build = Builder("v2")
    path = workshop.cached("set", build, key={"n": 3, "size": 64}, root=tmp_path, quiet=False)
    assert build.calls == 1 and (path / "data.txt").read_text() == "v2"
    assert "n: 2 -> 3" in capsys.readouterr().out


def test_cached_rebuilds_for_another_package_version(tmp_path, monkeypatch, capsys):
    workshop.cached("model.pt", lambda p: p.write_bytes(b"old"), key=1, root=tmp_path)
    monkeypatch.setattr(cellseg_lite, "__version__", "99.0")
    path = workshop.cached("model.pt", lambda p: p.write_bytes(b"new"), key=1, root=tmp_path)
    assert path.read_bytes() == b"new"
    assert "package version" in capsys.readouterr().out


def test_cached_rebuilds_an_artefact_without_key(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"who made me?")
    path = workshop.cached("model.pt", lambda p: p.write_bytes(b"known"), key=1, root=tmp_path)
    assert path.read_bytes() == b"known"


def test_an_interrupted_build_leaves_no_half_artefact(tmp_path):
    workshop.cached("set", Builder("v1"), key=1, root=tmp_path, quiet=True)

    def interrupted(path):
        path.mkdir()
        (path / "data.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        workshop.cached("set", interrupted, key=2, root=tmp_path, quiet=True)
    # the old artefact and its key are untouched, no staging folder is left
    assert (tmp_path / "set" / "data.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".set.key.json", "set"]
    # and the next call with the new key still rebuilds (the failed build was not recorded)
    build = Builder("v2")
    workshop.cached("set", build, key=2, root=tmp_path, quiet=True)
    assert build.calls == 1


def test_leftovers_of_a_killed_build_are_removed(tmp_path):
    dead = tmp_path / ".set.staging-999999999-abcd"  # no such process
    (dead / "set").mkdir(parents=True)
    workshop.cached("set", Builder(), key=1, root=tmp_path, quiet=True)
    assert not dead.exists()


def test_a_build_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(CellSegError, match="did not write anything"):
        workshop.cached("set", lambda path: None, key=1, root=tmp_path, quiet=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["", "a/b", ".hidden", " padded", 3])
def test_cached_rejects_bad_names(tmp_path, name):
    with pytest.raises(CellSegError, match="name"):
        workshop.cached(name, Builder(), key=1, root=tmp_path)


def test_cached_rejects_a_key_that_is_not_json(tmp_path):
    with pytest.raises(CellSegError, match="key: expected JSON"):
        workshop.cached("set", Builder(), key={"f": object()}, root=tmp_path)


# ----------------------------------------------------------------------------------- real_data


@pytest.fixture
def fake_fetch(monkeypatch):
    from cellseg_lite import datasets

    calls = []

    def fetch(name, root, *, parts=None, progress=True):
        calls.append((name, root, list(parts)))
        folder = root / datasets.DATASETS[name].files[parts[0]].folder
        folder.mkdir(parents=True)
        return [folder]

    monkeypatch.setattr(datasets, "fetch", fetch)
    monkeypatch.delenv("CELLSEG_FULL", raising=False)
    monkeypatch.delenv("CELLSEG_FAST", raising=False)
    return calls


def test_real_data_never_downloads_unless_asked(tmp_path, fake_fetch):
    assert workshop.real_data("bbbc038", tmp_path) is None
    assert workshop.real_data("neurips-cellseg", tmp_path, part="tuning") is None
    assert fake_fetch == []


def test_real_data_downloads_in_full_mode(tmp_path, fake_fetch, monkeypatch):
    monkeypatch.setenv("CELLSEG_FULL", "1")
    folder = workshop.real_data("neurips-cellseg", tmp_path)
    assert folder == tmp_path / "Training-labeled" and folder.is_dir()
    assert fake_fetch == [("neurips-cellseg", tmp_path, ["train"])]
    # present now: returned without another fetch, even when downloads are off
    assert workshop.real_data("neurips-cellseg", tmp_path, download=False) == folder
    assert len(fake_fetch) == 1


def test_real_data_download_argument_wins(tmp_path, fake_fetch, monkeypatch):
    monkeypatch.setenv("CELLSEG_FULL", "1")
    assert workshop.real_data("bbbc038", tmp_path, download=False) is None
    monkeypatch.delenv("CELLSEG_FULL")
    assert workshop.real_data("bbbc038", tmp_path, download=True).is_dir()


def test_real_data_rejects_unknown_names_and_parts(tmp_path):
    with pytest.raises(CellSegError, match="unknown data set 'mnist'"):
        workshop.real_data("mnist", tmp_path)
    with pytest.raises(CellSegError, match="part: bbbc038 has the parts train; got 'tuning'"):
        workshop.real_data("bbbc038", tmp_path, part="tuning")


# ----------------------------------------------------------------------------------- repository


def test_repository_url_is_read_from_the_config():
    assert workshop.repository_url(REPO).startswith("https://")


def test_repository_url_errors(tmp_path):
    with pytest.raises(CellSegError, match="cannot read"):
        workshop.repository_url(tmp_path)
    (tmp_path / "_config.yml").write_text("title: x\n")
    with pytest.raises(CellSegError, match="no 'repository:' section"):
        workshop.repository_url(tmp_path)


def copy_of_the_book(tmp_path):
    root = tmp_path / "fork"
    root.mkdir()
    for name in ("_config.yml", "README.md", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns("_*"))
    shutil.copytree(REPO / "book", root / "book", ignore=shutil.ignore_patterns("_*"))
    return root


def test_set_repository_rewrites_every_place(tmp_path, capsys):
    root = copy_of_the_book(tmp_path)
    old = workshop.repository_url(root)
    new = "https://github.com/someone/cellseg-lite-fork"
    assert workshop.main(["--set-repository", new + ".git", "--root", str(root)]) == 0
    assert "file(s) changed" in capsys.readouterr().out
    assert workshop.repository_url(root) == new
    for notebook in sorted((root / "notebooks").glob("*.ipynb")):
        text = notebook.read_text()
        assert old not in text and f"git+{new}" in text, notebook.name
        json.loads(text)  # still a valid notebook
    assert old not in (root / "_config.yml").read_text()
    # running it again with the same address changes nothing
    assert workshop.set_repository(new, root) == []


def test_set_repository_leaves_longer_addresses_alone(tmp_path):
    (tmp_path / "_config.yml").write_text("repository:\n  url: https://x.org/a/b\n  branch: main\n")
    (tmp_path / "README.md").write_text("see https://x.org/a/b and https://x.org/a/b-data\n")
    workshop.set_repository("https://y.org/c/d", tmp_path)
    assert (
        tmp_path / "README.md"
    ).read_text() == "see https://y.org/c/d and https://x.org/a/b-data\n"


@pytest.mark.parametrize("url", ["github.com/x/y", "https://x.org/a b", 'https://x.org/"q'])
def test_set_repository_rejects_bad_addresses(tmp_path, url):
    with pytest.raises(CellSegError, match="url: expected an http"):
        workshop.set_repository(url, tmp_path)


def test_main_reports_errors_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        workshop.main(["--set-repository", "https://x.org/a", "--root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "cannot read the book configuration" in capsys.readouterr().err
