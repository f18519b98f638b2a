"""Benchmark: how long the book takes to execute in FAST mode, notebook by notebook.

Every notebook of ``notebooks/`` runs once, one at a time, in a fresh ``python3`` kernel (nbclient)
with ``CELLSEG_FAST=1``. The kernel works in the notebooks folder, as in ``make book`` and nbval,
so that relative paths resolve the same; the executed copy is written to a temporary folder and the
committed notebooks are never touched. A notebook's wall time includes its kernel's start. The
issue's target: the whole book in under 20 minutes on the project's 2-core CPU. Writes the
``bench_book`` section of ``benchmarks/RESULTS.md`` when it ran the whole book.

Run from the repository root::

    .venv/bin/python benchmarks/bench_book.py [--note "..."] [NOTEBOOK ...]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import RESULTS, machine, now, write_section

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
TARGET_MINUTES = 20


def execute(path: Path, out: Path, timeout: int) -> tuple[float, str]:
    """Execute the notebook ``path`` into ``out``/name; (wall seconds, "ok" or the error's first
    line)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    try:
        client.execute()
        status = "ok"
    except (CellExecutionError, CellTimeoutError) as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        status = f"error: {lines[-1][:200] if lines else type(error).__name__}"
    seconds = time.perf_counter() - start
    nbformat.write(nb, out / path.name)
    return seconds, status


def _git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "notebooks", nargs="*", type=Path, help="notebooks to run (default: all of notebooks/)"
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    parser.add_argument(
        "--note", default="", help="a line for RESULTS.md (e.g. the machine's load)"
    )
    parser.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.name}")
    args = parser.parse_args(argv)

    every = sorted(NOTEBOOKS.glob("*.ipynb"))
    chosen = [p.resolve() for p in args.notebooks] or every
    missing = [str(p) for p in chosen if not p.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    os.environ["CELLSEG_FAST"] = "1"  # the kernels inherit it

    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cellseg-bench-book-") as out:
        for path in chosen:
            seconds, status = execute(path, Path(out), args.timeout)
            rows.append((path.name, seconds, status))
            print(f"{path.name}: {seconds:.1f} s, {status}", flush=True)
    load_after = os.getloadavg()
    total = sum(seconds for _, seconds, _ in rows)
    failed = [name for name, _, status in rows if status != "ok"]

    extra = sys.argv[1:] if argv is None else argv
    command = shlex.join([".venv/bin/python", "benchmarks/bench_book.py", *extra])
    commit = _git("log", "-1", "--format=%h", "--", "notebooks")
    dirty = _git("status", "--porcelain", "--", "notebooks")
    verdict = "met" if total < TARGET_MINUTES * 60 and not failed else "**missed**"
    lines = [
        "## The book in FAST mode: every notebook executed",
        "",
        f"Each notebook of `notebooks/` executed once, one at a time, in a fresh `python3` kernel "
        f"(nbclient), with `CELLSEG_FAST=1`, from the notebooks folder; a notebook's wall time "
        f"includes its kernel's start. `OMP_NUM_THREADS` "
        f"{'= ' + os.environ['OMP_NUM_THREADS'] if 'OMP_NUM_THREADS' in os.environ else 'unset'} "
        f"(as in `make book`). Target (issue 6): the whole book in under {TARGET_MINUTES} minutes "
        f"on this 2-core CPU.",
        "",
        "| notebook | wall time (s) | status |",
        "|---|---|---|",
    ]
    lines += [f"| `{name}` | {seconds:.1f} | {status} |" for name, seconds, status in rows]
    lines += [
        f"| **all {len(rows)}** | **{total:.1f}** ({total / 60:.1f} min) "
        f"| target {TARGET_MINUTES} min: {verdict} |",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine('torch', 'nbclient')}",
        f"- Notebooks: commit {commit}{' with uncommitted changes' if dirty else ''}",
        "- Load average (1, 5, 15 min) before: "
        + ", ".join(f"{x:.2f}" for x in load_before)
        + "; after: "
        + ", ".join(f"{x:.2f}" for x in load_after),
        f"- Date: {now()}",
    ]
    if args.note:
        lines.append(f"- Note: {args.note}")
    section = "\n".join(lines)
    print(section)
    if args.no_write or chosen != every:
        print(f"\n(not written to {RESULTS.name}: {'--no-write' if args.no_write else 'a subset'})")
    else:
        write_section("bench_book", section)
        print(f"\nwritten to {RESULTS}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
