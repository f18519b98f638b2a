"""Notebook plumbing for the book and the Colab workshop: one status block, cached artefacts.

The first code cell of every chapter installs the package on Colab (only there) and calls
:func:`setup`, which reads the two switches (``CELLSEG_FAST``, ``CELLSEG_FULL``), finds the
device and the optional real-mini sample, and prints where the chapter is running. Printing is
this module's job; nothing here runs at import time, and torch is imported only by :func:`setup`.

Run ``python -m cellseg_lite.workshop --set-repository URL`` in a fork to point the notebooks'
install cells, the book's configuration and its launch buttons at another repository.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cellseg_lite._errors import CellSegError
from cellseg_lite.config import fast_mode

__all__ = [
    "BookSegmenter",
    "Settings",
    "book_segmenter",
    "cached",
    "data_root",
    "find_real_mini",
    "first_cell",
    "full_mode",
    "held_out_images",
    "main",
    "real_data",
    "real_mini_split",
    "repository_url",
    "set_repository",
    "setup",
]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

#: The Colab launch page of the book's notebooks reads ``repository.url`` from this file.
CONFIG_FILE = "_config.yml"

#: Files that name the repository URL, relative to the repository root (``--set-repository``).
REPOSITORY_FILES = (
    CONFIG_FILE,
    "notebooks/*.ipynb",
    "book/*.md",
    "README.md",
    "pyproject.toml",
)

_FIRST_CELL = """\
# Colab workshop mode: installs cellseg-lite on Colab only (a no-op elsewhere), then checks the GPU.
import importlib.util
import subprocess
import sys

if "google.colab" in sys.modules and importlib.util.find_spec("cellseg_lite") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "cellseg-lite @ git+{url}"], check=True)
from cellseg_lite import workshop

settings = workshop.setup()"""


def _flag(name: str) -> bool | None:
    """The boolean environment variable ``name``: True, False, or None when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise CellSegError(f"{name}: expected 1/0, true/false, yes/no or on/off, got {value!r}")


def full_mode() -> bool:
    """True when ``CELLSEG_FULL`` is 1/true/yes/on: real data, pretrained backbones, paper presets."""
    return bool(_flag("CELLSEG_FULL"))


def find_real_mini(cwd: str | os.PathLike | None = None) -> Path | None:
    """The real-mini sample folder, or None: ``$CELLSEG_REAL_MINI``, then
    ``../shared/data/real-mini`` and ``../../shared/data/real-mini`` relative to ``cwd``
    (the working directory by default: the repository root or its ``notebooks/`` folder)."""
    base = Path.cwd() if cwd is None else Path(cwd)
    candidates = []
    if os.environ.get("CELLSEG_REAL_MINI"):
        candidates.append(Path(os.environ["CELLSEG_REAL_MINI"]).expanduser())
    candidates += [base / ".." / "shared" / "data" / "real-mini"]
    candidates += [base / ".." / ".." / "shared" / "data" / "real-mini"]
    for candidate in candidates:
        if (candidate / "manifest.csv").is_file():
            return candidate.resolve()
    return None


def _checkout_root() -> Path | None:
    """The repository root when the package runs from a source checkout (``pip install -e``)."""
    root = Path(__file__).resolve().parents[1]
    if (root / CONFIG_FILE).is_file() and (root / "pyproject.toml").is_file():
        return root
    return None


def data_root() -> Path:
    """Where chapters cache what they build: ``$CELLSEG_DATA_ROOT``, else ``data/generated/`` in
    a source checkout (git ignores it), else ``~/.cache/cellseg-lite`` (``$XDG_CACHE_HOME``)."""
    if os.environ.get("CELLSEG_DATA_ROOT"):
        return Path(os.environ["CELLSEG_DATA_ROOT"]).expanduser()
    checkout = _checkout_root()
    if checkout is not None:
        return checkout / "data" / "generated"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "cellseg-lite"


@dataclass(frozen=True)
class Settings:
    """Where a chapter runs and how fast: what :func:`setup` found.

    ``fast``: ``CELLSEG_FAST`` (small models, short schedules, CPU minutes); ``full``:
    ``CELLSEG_FULL`` (real NeurIPS-CellSeg/BBBC038 data, pretrained backbones; never together
    with ``fast``); ``preset``: the training preset that fits (``"fast"``, ``"lite"`` or
    ``"paper"``, the last only in FULL mode on a GPU); ``device``: ``"cuda"`` or ``"cpu"``;
    ``real_mini``: the real-mini sample folder or None; ``progress``: whether loops should
    draw progress bars (off in FAST mode, so book pages and CI logs stay clean; on on Colab);
    ``data_root``: the cache folder of :func:`cached`.
    """

    fast: bool
    full: bool
    on_colab: bool
    device: str
    gpu_name: str | None
    real_mini: Path | None
    progress: bool
    data_root: Path
    preset: str
    torch_threads: int | None = None

    @property
    def mode(self) -> str:
        """``"FAST"``, ``"FULL"`` or ``"standard"`` (the paper's sizes on the embedded data)."""
        return "FAST" if self.fast else "FULL" if self.full else "standard"

    def __str__(self) -> str:
        from cellseg_lite import __version__

        what = {
            "FAST": "small models, short schedules, synthetic data: CPU minutes",
            "FULL": "real challenge data, pretrained backbones, the paper's settings",
            "standard": "the paper's model sizes on the embedded data",
        }[self.mode]
        device = f"cuda ({self.gpu_name})" if self.device == "cuda" else "cpu (no GPU)"
        if self.torch_threads is not None:
            device += f", {self.torch_threads} torch thread{'s' * (self.torch_threads != 1)}"
        lines = [
            f"cellseg-lite {__version__} | {self.mode} mode: {what}",
            f"  running on : {'Google Colab' if self.on_colab else 'this machine'}, {device}",
            f"  preset     : {self.preset}",
            f"  real-mini  : {self.real_mini or 'not found (synthetic data only)'}",
            f"  cache      : {self.data_root}",
            f"  progress   : {'bars' if self.progress else 'off'}",
        ]
        return "\n".join(lines)


def setup(*, full: bool | None = None) -> Settings:
    """Read the switches, find the device and the data, print a status block; return it all.

    ``full`` overrides ``CELLSEG_FULL``. FAST and FULL exclude each other: with both set,
    FAST wins and a warning says so. In FAST mode torch runs one thread (several notebooks share
    the cores of a CI machine; one thread each avoids them waiting on each other). On Colab
    without a GPU the block says how to get one; FULL mode without a GPU warns.
    ``CELLSEG_PROGRESS=0/1`` overrides the progress bar choice.
    """
    import torch

    fast = fast_mode()
    full = full_mode() if full is None else bool(full)
    if fast and full:
        warnings.warn(
            "CELLSEG_FAST and FULL mode are both set: FAST wins (unset CELLSEG_FAST for FULL)",
            UserWarning,
            stacklevel=2,
        )
        full = False
    on_colab = "google.colab" in sys.modules
    cuda = torch.cuda.is_available()
    threads = None
    if fast:
        torch.set_num_threads(1)
        threads = torch.get_num_threads()
    progress = _flag("CELLSEG_PROGRESS")
    if progress is None:
        progress = on_colab or not fast
    settings = Settings(
        fast=fast,
        full=full,
        on_colab=on_colab,
        device="cuda" if cuda else "cpu",
        gpu_name=torch.cuda.get_device_name(0) if cuda else None,
        real_mini=find_real_mini(),
        progress=progress,
        data_root=data_root(),
        preset="fast" if fast else "paper" if (full and cuda) else "lite",
        torch_threads=threads,
    )
    print(settings)
    if on_colab and not cuda:
        print(
            "  No GPU on this runtime: Runtime > Change runtime type > GPU (T4), then Runtime > "
            "Run all. FAST mode (os.environ['CELLSEG_FAST'] = '1') runs on a CPU."
        )
    if full and not cuda:
        warnings.warn(
            "FULL mode without a GPU: the paper preset needs one (training would take days on a "
            "CPU); the 'lite' preset is used instead",
            UserWarning,
            stacklevel=2,
        )
    return settings


# --------------------------------------------------------------------------- data and caches


def real_data(
    name: str = "bbbc038",
    root: str | os.PathLike | None = None,
    *,
    part: str | None = None,
    download: bool | None = None,
) -> Path | None:
    """The challenge-layout folder of one part of a public data set, or None when absent.

    ``name`` is ``"bbbc038"`` or ``"neurips-cellseg"`` (:data:`cellseg_lite.datasets.DATASETS`),
    ``part`` one of its parts (its first default part when None, e.g. ``"train"``). A folder
    already under ``root`` (default ``data_root() / "datasets"``) is returned without any
    network access. Otherwise it is downloaded and checked with :func:`datasets.fetch` only
    when asked: ``download=True``, or ``download=None`` in FULL mode (``CELLSEG_FULL=1``).
    """
    from cellseg_lite import datasets

    if name not in datasets.DATASETS:
        known = ", ".join(sorted(datasets.DATASETS))
        raise CellSegError(f"name: unknown data set {name!r}; known: {known}")
    spec = datasets.DATASETS[name]
    part = spec.default_parts[0] if part is None else part
    if part not in spec.files:
        raise CellSegError(f"part: {name} has the parts {', '.join(spec.files)}; got {part!r}")
    root = data_root() / "datasets" if root is None else Path(root)
    folder = root / spec.files[part].folder
    if folder.is_dir():
        return folder
    if download is None:
        download = full_mode() and not fast_mode()
    if not download:
        return None
    return datasets.fetch(name, root, parts=[part], progress=True)[0]


def _check_name(name) -> str:
    if (
        not isinstance(name, str)
        or not name
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or name != name.strip()
    ):
        raise CellSegError(
            f"name: expected a plain file or folder name (no '/', not starting with '.'), "
            f"got {name!r}"
        )
    return name


def _key_record(key) -> dict:
    from cellseg_lite import __version__

    try:
        text = json.dumps(key, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise CellSegError(
            f"key: expected JSON data (numbers, strings, lists, dicts): {err}"
        ) from err
    return {"key": json.loads(text), "version": __version__}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _alive(pid: str) -> bool:
    """Whether the process ``pid`` (a staging folder's owner) still runs."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _differences(stored: dict, wanted: dict) -> str:
    if stored.get("version") != wanted["version"]:
        return f"package version {stored.get('version')} -> {wanted['version']}"
    old, new = stored.get("key"), wanted["key"]
    if isinstance(old, dict) and isinstance(new, dict):
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
    return f"{old!r} -> {new!r}"


def cached(
    name: str,
    build: Callable[[Path], object],
    *,
    key,
    root: str | os.PathLike | None = None,
    quiet: bool = False,
) -> Path:
    """``root / name``, built by ``build(path)`` unless a copy made with the same ``key`` exists.

    For what one chapter makes and a later one needs (a trained model, a generated data set):
    each notebook can run alone and rebuilds what is missing. ``key`` (JSON data: the settings
    that shape the artefact) and the package version are stored beside it in
    ``root / f".{name}.key.json"``; a different key or version rebuilds, and says why, so a cache
    is never silently stale. ``build`` writes a file or a folder at the path it is given; it
    runs in a staging folder that is moved into place only once ``build`` returns, so an
    interrupted build leaves no half artefact. ``root`` defaults to :func:`data_root`.
    """
    from cellseg_lite.io import atomic_write

    name = _check_name(name)
    wanted = _key_record(key)
    root = data_root() if root is None else Path(root)
    target = root / name
    key_file = root / f".{name}.key.json"
    for leftover in root.glob(f".{name}.staging-*"):  # builds that were interrupted
        if not _alive(leftover.name.split("-")[-2]):
            _remove(leftover)

    stored = None
    if key_file.is_file():
        try:
            stored = json.loads(key_file.read_text())
        except (OSError, ValueError):
            stored = None
    present = target.exists()
    if present and stored == wanted:
        if not quiet:
            print(f"{name}: reusing the cached copy in {root}")
        return target
    if not present:
        reason = "not built yet"
    elif stored is None:
        reason = "no key stored with it"
    else:
        reason = f"the cached copy was made with other settings: {_differences(stored, wanted)}"
    if not quiet:
        print(f"{name}: building ({reason})", flush=True)

    staging = root / f".{name}.staging-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    start = time.perf_counter()
    try:
        staged = staging / name
        build(staged)
        if not staged.exists():
            raise CellSegError(
                f"build: it did not write anything at the path it was given ({staged})"
            )
        key_file.unlink(missing_ok=True)  # from here on, an interruption means "rebuild"
        if target.exists() or target.is_symlink():
            _remove(target)
        os.replace(staged, target)
        with atomic_write(key_file) as f:
            f.write(json.dumps(wanted, sort_keys=True, indent=1).encode())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not quiet:
        print(f"{name}: built in {time.perf_counter() - start:.1f} s -> {target}")
    return target


# --------------------------------------------------------------------------- the book's segmenter


class BookSegmenter(NamedTuple):
    """The segmenter that chapters 8 and 9 share: its ``folder`` (``model.pt``, the pre-trained
    streams ``stardist_all.pt``/``hover_all.pt`` for the ablation, ``stages.json``), the training
    report ``stages`` and the synthetic ``sets`` it was trained on: ``(classes, images per class,
    training side, test side)``."""

    folder: Path
    stages: list
    sets: list


def real_mini_split(settings: Settings, split: str) -> list:
    """The real-mini samples of one split (``"train"`` or ``"val"``); ``[]`` without real-mini."""
    import csv

    from cellseg_lite import datasets

    if settings.real_mini is None:
        return []
    with open(settings.real_mini / "manifest.csv", newline="") as f:
        stems = [row["stem"] for row in csv.DictReader(f) if row["split"] == split]
    return datasets.find_pairs(settings.real_mini, stems=stems)


def _book_recipe(settings: Settings) -> tuple[list, float | None, dict]:
    if settings.fast:  # small training images (class 2's large cells need 128 px), larger test ones
        return [((0, 1, 3), 100, 64, 192), ((2,), 24, 128, 256)], None, {"epochs": 4, "lr": 2e-3}
    minutes = 20.0 if settings.preset == "lite" else 60.0
    return [((0, 1, 2, 3), 40, 512, 512)], minutes, {}


def book_segmenter(settings: Settings) -> BookSegmenter:
    """Train the multi-stream method once for the book (cached by :func:`cached`, keyed by the
    settings) and return where it is: chapter 8 trains it, chapter 9 reuses it or rebuilds it.

    FAST: a few hundred small synthetic images, the ``fast`` preset at four epochs per stage and
    lr 2e-3, validated on larger images (on 64-pixel ones the boundary rule leaves little to
    score). Otherwise synthetic and real-mini training images (every 8th one validates; in FULL
    mode also the challenge's labelled set) and a budget of 20 (``lite``) or 60 (``paper``)
    minutes.
    """
    import tempfile

    from cellseg_lite import synthetic, train

    sets, minutes, changes = _book_recipe(settings)
    real_train = [] if settings.fast else real_mini_split(settings, "train")
    real_val = real_train[::8]
    real = [s for s in real_train if s not in real_val]
    neurips = real_data("neurips-cellseg") if settings.full else None
    if neurips is not None:
        real.append(neurips)
    key = {
        "preset": settings.preset, "sets": sets, "minutes": minutes, "changes": changes,
        "seed": 0, "real": [str(getattr(r, "stem", r)) for r in real + real_val],
    }  # fmt: skip

    def build(path: Path) -> None:
        path.mkdir(parents=True)
        with tempfile.TemporaryDirectory(prefix="cellseg-book-") as tmp:
            data, val = [], []
            for i, (classes, n, size, val_size) in enumerate(sets):
                data.append(Path(tmp) / f"train{i}")
                synthetic.make_dataset(data[-1], n, size=(size, size), seed=i, categories=classes)
                val.append(Path(tmp) / f"val{i}")
                synthetic.make_dataset(
                    val[-1], 3, size=(val_size, val_size), seed=5000 + i, categories=classes
                )
            _, stages = train.train_multistream(
                data + real, path / "model.pt", val=val + real_val, preset_name=settings.preset,
                minutes=minutes, changes=changes, work_dir=Path(tmp) / "work", seed=0,
                min_selection_images=3,  # the 3 validation images per class made above
                progress=settings.progress, log=print,
            )  # fmt: skip
            for stream in ("stardist", "hover"):  # without their resume state: a third the size
                pre = train.load_checkpoint(Path(tmp) / "work" / f"{stream}_all.pt")
                train.save_checkpoint(
                    path / f"{stream}_all.pt", pre.model, pre.config, thresholds=pre.thresholds,
                    categories=pre.categories, history=pre.history,
                )  # fmt: skip
        (path / "stages.json").write_text(json.dumps([s._asdict() for s in stages], indent=1))

    folder = cached("book-segmenter", build, key=key)
    stages = json.loads((folder / "stages.json").read_text())
    return BookSegmenter(folder, stages, sets)


def held_out_images(sets, n_per_class: int, first_seed: int = 10_000) -> list:
    """``(stem, raw image, labels, class)`` of new synthetic images of each set's classes, at its
    test size (seeds from ``first_seed``, which training never used)."""
    from cellseg_lite import synthetic

    images = []
    for classes, _, _, size in sets:
        for c in classes:
            for seed in range(first_seed, first_seed + n_per_class):
                image, labels = synthetic.make_image(c, size=(size, size), seed=seed)
                images.append((f"synth_c{c}_{seed}", image, labels, c))
    return images


# --------------------------------------------------------------------------- the repository URL


def first_cell(url: str) -> str:
    """The first code cell of every notebook, installing from the repository ``url``."""
    return _FIRST_CELL.format(url=url)


_REPOSITORY_URL = re.compile(r"^repository:[ \t]*\n(?:[ \t]+.*\n)*?[ \t]+url:[ \t]*(\S+)", re.M)


def repository_url(root: str | os.PathLike = ".") -> str:
    """``repository.url`` of the book's ``_config.yml`` under ``root``: the one place it is set."""
    config = Path(root) / CONFIG_FILE
    try:
        text = config.read_text()
    except OSError as err:
        raise CellSegError(f"'{config}': cannot read the book configuration ({err})") from err
    found = _REPOSITORY_URL.search(text)
    if found is None:
        raise CellSegError(f"'{config}': no 'repository:' section with a 'url:'")
    return found.group(1).strip("'\"")


def _check_url(url) -> str:
    if not isinstance(url, str) or not re.fullmatch(r"https?://[^\s'\"\\<>]+", url):
        raise CellSegError(
            f"url: expected an http(s) address without spaces or quotes, got {url!r}"
        )
    return url.rstrip("/").removesuffix(".git")


def set_repository(url: str, root: str | os.PathLike = ".") -> list[Path]:
    """Point the book at another repository: replace the URL of ``_config.yml`` by ``url`` in
    every file of :data:`REPOSITORY_FILES` under ``root`` (atomically); returns the changed files."""
    from cellseg_lite.io import atomic_write

    url = _check_url(url)
    root = Path(root)
    old = repository_url(root)
    # the old address, not as the prefix of a longer one (".../cellseg-lite-data")
    pattern = re.compile(re.escape(old) + r"(?![\w.\-/])")
    changed = []
    for spec in REPOSITORY_FILES:
        for path in sorted(root.glob(spec)):
            text = path.read_text()
            new_text = pattern.sub(url, text)
            if new_text != text:
                with atomic_write(path) as f:
                    f.write(new_text.encode())
                changed.append(path)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cellseg_lite.workshop --set-repository URL [--root DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m cellseg_lite.workshop",
        description="Workshop helpers for the cellseg-lite book.",
    )
    parser.add_argument(
        "--set-repository",
        metavar="URL",
        required=True,
        help="point _config.yml, the notebooks' install cells and the docs at this repository",
    )
    parser.add_argument("--root", default=".", help="the repository root (default: here)")
    args = parser.parse_args(argv)
    try:
        old = repository_url(args.root)
        changed = set_repository(args.set_repository, args.root)
    except CellSegError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"{old} -> {_check_url(args.set_repository)}: {len(changed)} file(s) changed")
    for path in changed:
        print(f"  {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
