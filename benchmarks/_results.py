"""Shared plumbing for the benchmark scripts: timing, the machine's description, RESULTS.md sections."""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "Each benchmark script in this folder rewrites its own section below, between its\n"
    "HTML comment markers; run a script again to refresh its figures.\n"
)


def mean(values) -> float:
    """Mean of ``values``; ``nan`` for none (an empty modality or bin)."""
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def median_seconds(function, repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls after one warm-up call (numba and caches warm up there)."""
    result = function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(*packages: str) -> str:
    """One line: cores, CPU model, Python and the versions of ``packages``."""
    from importlib.metadata import version

    versions = ", ".join(f"{name} {version(name)}" for name in packages)
    text = f"{os.cpu_count()} cores, {cpu_model()}; Python {platform.python_version()}"
    return f"{text}, {versions}" if versions else text


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def write_section(name: str, section: str, path: Path = RESULTS) -> None:
    """Put ``section`` between the ``<!-- name:start -->`` / ``<!-- name:end -->`` markers of ``path``,
    leaving other sections alone; the file is replaced atomically."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else HEADER
    block = f"{start}\n{section.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


class RealMini(NamedTuple):
    """The real-mini set's fixed splits: train and val samples, and each stem's modality."""

    root: Path
    train: list
    val: list
    modality: dict[str, str]


#: real-mini's modalities (its manifest's ``modality`` column), in the order of the tables.
MODALITIES = ("fluorescence", "stained", "brightfield", "phase-contrast")


def work_option(work: Path, default: Path) -> tuple[Path, str]:
    """A ``--work`` folder as a section names it: relative to the repository where it lies inside,
    and the command-line option to repeat it (empty for the script's ``default``)."""
    work, repo = work.resolve(), Path(__file__).resolve().parents[1]
    shown = work.relative_to(repo) if work.is_relative_to(repo) else work
    return shown, "" if work == default.resolve() else f" --work {shown}"


def add_work_option(parser, default_work: Path, contents: str) -> None:
    """``--work``: one or more ``bench_quality.py`` folders, each holding ``contents``."""
    parser.add_argument(
        "--work",
        type=Path,
        nargs="+",
        default=[default_work],
        help=f"bench_quality work folders (each with {contents})",
    )


def add_run_options(parser, default_work: Path, contents: str) -> None:
    """``--work`` (:func:`add_work_option`) and ``--seed`` (the seed of each run), for the scripts
    that study trained runs again."""
    add_work_option(parser, default_work, contents)
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        help="the seed each bench_quality run had (one for all, or one per --work folder)",
    )


def run_seeds(parser, args) -> list[int]:
    """The seed of each ``--work`` folder: one given for all, or one each (else a usage error)."""
    if len(args.seed) not in (1, len(args.work)):
        parser.error(f"--seed: give one seed or one per --work folder ({len(args.work)})")
    return args.seed * len(args.work) if len(args.seed) == 1 else list(args.seed)


def quality_run(work: Path, *folders: str):
    """The segmenter that ``bench_quality.py`` wrote to ``work``; exits with a message where it, or
    one of the run's data ``folders`` (``"synthetic_test"``, ...), is missing or unreadable."""
    from cellseg_lite import infer
    from cellseg_lite._errors import CellSegError

    model_path = work / "model.pt"
    if not (model_path.is_file() and all((work / f).is_dir() for f in folders)):
        raise SystemExit(
            f"{work}: no trained segmenter with its synthetic data; run "
            "benchmarks/bench_quality.py first (or pass --work)"
        )
    try:
        return infer.MultiStreamSegmenter.load(model_path)
    except CellSegError as err:
        raise SystemExit(str(err)) from err


def read_pairs(samples) -> list:
    """``(stem, image, labels)`` of each image/label pair ``samples`` (``datasets.Sample``)."""
    from cellseg_lite import io

    return [(s.stem, io.read_image(s.image_path), io.read_labels(s.label_path)) for s in samples]


def real_val_images(real: RealMini) -> tuple[list, list[str]]:
    """real-mini's VAL images ``(stem, image, labels)`` and the modality of each."""
    images = read_pairs(real.val)
    return images, [real.modality[stem] for stem, _, _ in images]


def held_out_synthetic(work: Path) -> tuple[list, list[int]]:
    """A ``bench_quality.py`` run's held-out synthetic images ``(stem, image, labels)`` and the
    low-level class of each, from its true labels (:func:`cellseg_lite.categorize.
    low_level_category`)."""
    from cellseg_lite import datasets
    from cellseg_lite.categorize import low_level_category

    images = read_pairs(datasets.find_pairs(work / "synthetic_test"))
    return images, [low_level_category(image, labels) for _, image, labels in images]


def selection_images(work: Path, real: RealMini, seed: int) -> tuple[list, dict[int, list]]:
    """The selection split that a ``bench_quality.py`` run of ``seed`` held out of its training
    images (real-mini TRAIN and its ``synthetic_train``), rebuilt as
    :func:`cellseg_lite.train.train_multistream` drew it: all of it as
    :func:`cellseg_lite.train.best_thresholds` reads images, and the same per low-level class."""
    from cellseg_lite import datasets, train

    samples = [*real.train, *datasets.find_pairs(work / "synthetic_train")]
    categories = train._sample_categories(samples)
    _, (selection, selection_classes) = train._split_for_selection(
        samples, categories, train.VAL_FRACTION, seed
    )
    loaded = train._load_val(selection)
    by_class = {
        c: [item for item, k in zip(loaded, selection_classes, strict=True) if k == c]
        for c in range(4)
    }
    return loaded, by_class


def tuning_images(c: int, loaded: list, by_class: dict) -> tuple[str, list]:
    """The selection images a ``bench_quality.py`` run tuned class ``c``'s thresholds on, and
    what they are: the class's own where it has ``train.MIN_SELECTION_IMAGES`` or more, else all
    of them (:func:`selection_images` gives ``loaded`` and ``by_class``)."""
    from cellseg_lite import train

    if len(by_class[c]) >= train.MIN_SELECTION_IMAGES:
        return "its own", by_class[c]
    return "all", loaded


def retuned(segmenter, loaded: list, by_class: dict, **options):
    """A copy of ``segmenter`` whose models' thresholds are tuned again, each on the selection
    images the run tuned it on (:func:`tuning_images`), with :func:`cellseg_lite.train.
    best_thresholds`'s keyword ``options`` over the model's own (``train.map_options``); and, per
    class, ``(thresholds, selection F1)``."""
    import copy

    from cellseg_lite import train

    cache: dict = {}
    models, chosen = {}, {}
    for c, model in segmenter.models.items():
        which, images = tuning_images(c, loaded, by_class)
        key = (id(model.model), c if which == "its own" else which)
        if key not in cache:
            settings = {**train.map_options(model.config), **options}
            cache[key] = train.best_thresholds(model.model, model.stream, images, **settings)
        f1, thresholds = cache[key]
        models[c] = model._replace(thresholds=thresholds)
        chosen[c] = (thresholds, f1)
    out = copy.copy(segmenter)
    out.models = models
    return out, chosen


class SetScores(NamedTuple):
    """Mean challenge F1 of one segmenter on real-mini VAL (all, and per :data:`MODALITIES`) and
    on a held-out synthetic set (all, and per low-level class 0-3)."""

    real: float
    modalities: list[float]
    synthetic: float
    classes: list[float]

    def real_row(self, *cells: str) -> str:
        """A Markdown row: ``cells``, then the VAL mean and its modalities."""
        return _row(cells, [self.real, *self.modalities])

    def synthetic_row(self, *cells: str) -> str:
        """A Markdown row: ``cells``, then the synthetic mean and its classes."""
        return _row(cells, [self.synthetic, *self.classes])


def _row(cells, values) -> str:
    return "| " + " | ".join([*cells, *(f"{v:.3f}" for v in values)]) + " |"


def set_scores(segment, real_images, modalities, synthetic, synthetic_classes) -> SetScores:
    """:class:`SetScores` of ``segment`` (image -> labels) on real-mini VAL images
    ``(stem, image, labels)`` of ``modalities`` (:func:`real_val_images`) and held-out synthetic
    images of ``synthetic_classes`` (:func:`held_out_synthetic`)."""
    from cellseg_lite import metrics

    rows = metrics.evaluate_segmenter(segment, real_images)
    per_modality = [
        mean(r.f1 for r, m in zip(rows, modalities, strict=True) if m == modality)
        for modality in MODALITIES
    ]
    synthetic_rows = metrics.evaluate_segmenter(segment, synthetic, categories=synthetic_classes)
    per_class = [mean(r.f1 for r in synthetic_rows if r.category == c) for c in range(4)]
    return SetScores(
        mean(r.f1 for r in rows), per_modality, mean(r.f1 for r in synthetic_rows), per_class
    )


def real_mini(*, required: bool = False) -> RealMini | None:
    """real-mini from ``$CELLSEG_REAL_MINI`` or ``../shared/data/real-mini``; ``None`` if absent,
    or, with ``required``, exit with a message saying where it was looked for."""
    import csv

    from cellseg_lite import datasets

    env = os.environ.get("CELLSEG_REAL_MINI")
    root = (
        Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "real-mini"
    )
    if not (root / "manifest.csv").is_file():
        if required:
            sys.exit(f"real-mini not found ({root}; set $CELLSEG_REAL_MINI to its folder)")
        return None
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))

    def split(name: str) -> list:
        return datasets.find_pairs(root, stems=[r["stem"] for r in rows if r["split"] == name])

    return RealMini(root, split("train"), split("val"), {r["stem"]: r["modality"] for r in rows})
