"""Which weights a training run should keep: its best epoch on the selection images, or its last.

:func:`cellseg_lite.train.train_stream` validates every ``val_every`` epochs on the selection
images and keeps the weights of the best epoch; the `lite` preset's learning rate decays linearly
to zero, so the last weights are the settled ones, and 30 selection images are few to choose an
epoch on. Every stage checkpoint holds both: its best weights, and the last ones in its resume
state. This script rebuilds, from the stage checkpoints of ``benchmarks/bench_quality.py`` runs
(``--work``), the segmenter each run would have written had every training run kept its last
weights:

- the pre-trained stream's last weights, thresholds tuned on all selection images;
- each fine-tuned class's last weights, thresholds tuned on that class's selection images, kept
  only if they beat the pre-trained last weights there (the rule of
  :func:`~cellseg_lite.train.train_multistream`); the fine-tuning started from the pre-trained
  best weights, as it did in the run;

and scores it beside the segmenter the run wrote (best epochs), on the real-mini VAL split and
the held-out synthetic set, with the same router, post-processing tuning
(:func:`~cellseg_lite.train.best_thresholds`, which the runs' own tuning used from a83a25e on;
earlier runs were tuned over the grid alone) and second pass for small cells. Same training runs in both rows: the difference is the choice of weights alone.

    .venv/bin/python benchmarks/bench_quality.py --routing hover --seed 7 --work runs/hover_s7
    .venv/bin/python benchmarks/bench_keep.py --work runs/hover_s7 --seed 7   # ~3 min a run
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import (  # noqa: E402
    MODALITIES,
    add_run_options,
    held_out_synthetic,
    machine,
    now,
    quality_run,
    real_mini,
    real_val_images,
    run_seeds,
    selection_images,
    set_scores,
    work_option,
    write_section,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = REPO / "runs" / "bench_quality"
#: The two ways compared, in the order of the tables.
KEEPS = ("best epoch", "last epoch")


def last_weights(checkpoint):
    """A copy of a stage :class:`~cellseg_lite.train.Checkpoint` with the last weights of its run
    (those of its resume state) in place of the best ones."""
    from cellseg_lite import train

    state = (checkpoint.resume or {}).get("model")
    if state is None:
        raise SystemExit(f"{checkpoint.path}: holds no resume state, so no last weights")
    model = train.build_model(checkpoint.config, pretrained=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise SystemExit(f"{checkpoint.path}: last weights do not fit ({err})") from err
    return checkpoint._replace(model=model.eval())


def stage_history(checkpoint) -> str:
    """``best epoch B of E (plain-map selection F1 b; last validation f at epoch L)``: the
    validation curve of a stage, scored during training on plain maps at its thresholds then."""
    history = checkpoint.history
    curve = history.get("val_f1") or []
    last = f"{curve[-1][1]:.3f} at epoch {curve[-1][0]}" if curve else "none"
    best = max((f for _, f in curve), default=float("nan"))
    return (
        f"best epoch {history.get('best_epoch', '?')} of {history.get('epochs', '?')} "
        f"(plain-map selection F1 {best:.3f}; last validation {last})"
    )


def keep_last(work: Path, seed: int, real):
    """``(segmenter as written, segmenter of last weights, notes)`` of one bench_quality run."""
    from cellseg_lite import infer, train

    segmenter = quality_run(work, "synthetic_train", "synthetic_test")
    stages = work / "stages"
    loaded, by_class = selection_images(work, real, seed)
    notes = []
    pretrained = {}
    for stream in sorted({m.stream for m in segmenter.models.values()}):
        path = stages / f"{stream}_all.pt"
        if not path.is_file():
            raise SystemExit(f"{path}: missing; the run's stage checkpoints are needed")
        best = train.load_checkpoint(path)
        last = last_weights(best)
        tta = train.uses_tta(last.config)
        f1, thresholds = train.best_thresholds(last.model, stream, loaded, tta=tta)
        pretrained[stream] = last._replace(thresholds=thresholds)
        notes.append(
            f"`{stream}_all.pt`: {stage_history(best)}; last weights on the selection images "
            f"{f1:.3f}, best weights {float(best.history.get('best_f1', float('nan'))):.3f}"
        )
    models = {}
    for c in range(4):
        stream = segmenter.models[c].stream
        models[c] = pretrained[stream]
        path = stages / f"{stream}_class{c}.pt"
        if not path.is_file():  # not fine-tuned: the pre-trained model with the shared thresholds
            continue
        tta = train.uses_tta(pretrained[stream].config)
        before, before_thresholds = train.best_thresholds(
            pretrained[stream].model, stream, by_class[c], tta=tta
        )
        tuned = train.load_checkpoint(path)
        tuned_last = last_weights(tuned)
        after, after_thresholds = train.best_thresholds(
            tuned_last.model, stream, by_class[c], tta=tta
        )
        kept = after > before
        if kept:
            models[c] = tuned_last._replace(thresholds=after_thresholds)
        else:
            models[c] = pretrained[stream]._replace(thresholds=before_thresholds)
        notes.append(
            f"`{path.name}`: {stage_history(tuned)}; last weights {after:.3f} on the class's "
            f"selection images against the pre-trained last weights' {before:.3f}: "
            + ("kept" if kept else "not kept")
            + f" (the run {'kept' if segmenter.models[c].config == tuned.config else 'did not keep'}"
            " its fine-tuned best weights)"
        )
    last_segmenter = copy.copy(segmenter)
    last_segmenter.models = {c: infer.StreamModel.from_checkpoint(m) for c, m in models.items()}
    return segmenter, last_segmenter, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser, DEFAULT_WORK, "model.pt, stages/ and its synthetic data")
    parser.add_argument("--routing", default="hover", help="the runs' --routing (for the text)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = run_seeds(parser, args)

    real = real_mini(required=True)
    # the same VAL images for every run: read once
    real_images, modalities = real_val_images(real)
    real_lines = [
        "| run | weights kept | all 40 | " + " | ".join(MODALITIES) + " |",
        "|" + "---|" * (3 + len(MODALITIES)),
    ]
    syn_lines = [
        "| run | weights kept | all | class 0 | class 1 | class 2 | class 3 |",
        "|---|---|---|---|---|---|---|",
    ]
    note_lines, differences = [], {"real": [], "fluorescence": [], "synthetic": []}
    for work, seed in zip(args.work, seeds, strict=True):
        shown, _ = work_option(work, DEFAULT_WORK)
        print(f"{shown}: rebuilding the last-weights segmenter", flush=True)
        best, last, notes = keep_last(work, seed, real)
        note_lines += [f"- `{shown}`, {note}" for note in notes]
        synthetic, classes = held_out_synthetic(work)
        totals = {}
        for keep, segmenter in zip(KEEPS, (best, last), strict=True):
            scores = set_scores(segmenter.segment, real_images, modalities, synthetic, classes)
            totals[keep, "real"], totals[keep, "synthetic"] = scores.real, scores.synthetic
            totals[keep, "fluorescence"] = scores.modalities[0]
            real_lines.append(scores.real_row(f"`{shown}`", keep))
            syn_lines.append(scores.synthetic_row(f"`{shown}`", keep))
            print(
                f"{shown} {keep}: VAL {scores.real:.3f}, fluorescence {scores.modalities[0]:.3f}, "
                f"synthetic {scores.synthetic:.3f}",
                flush=True,
            )
        for name in differences:
            differences[name].append(totals["last epoch", name] - totals["best epoch", name])

    def signed(values) -> str:
        return ", ".join(f"{v:+.3f}" for v in values) + f" (mean {np.mean(values):+.3f})"

    works = " ".join(str(work_option(w, DEFAULT_WORK)[0]) for w in args.work)
    seed_flag = " --seed " + " ".join(map(str, seeds))
    section = f"""## Which weights to keep: the best epoch on the selection images, or the last

Every training run of `bench_quality.py --routing {args.routing}` kept the weights of its best
epoch on the selection images (validation every `val_every` = 10 epochs). Its stage checkpoints
also hold the last weights, so the segmenter of last weights is rebuilt from the same runs: the
pre-trained last weights with thresholds tuned on all selection images, and each fine-tuned
class's last weights with thresholds of its own, kept where they beat the pre-trained last
weights on that class's selection images (the fine-tuning had started from the pre-trained best
weights). Router, post-processing tuning (`train.best_thresholds`: the grid, then markers on
confident pixels where that scores higher; the runs' own tuning from a83a25e on, the grid alone
before) and the second pass for small cells are the same in both rows.

**Real-mini VAL**, challenge F1 (mean of per-image F1):

{chr(10).join(real_lines)}

**Held-out synthetic**, per low-level class (from the true labels):

{chr(10).join(syn_lines)}

Last epoch minus best epoch, run by run: real-mini VAL {signed(differences["real"])};
fluorescence {signed(differences["fluorescence"])}; held-out synthetic
{signed(differences["synthetic"])}.

The training runs:

{chr(10).join(note_lines)}

- Command: `.venv/bin/python benchmarks/bench_keep.py --work {works}{seed_flag}`, each folder from
  `.venv/bin/python benchmarks/bench_quality.py --minutes 27 --routing {args.routing} --seed N --work FOLDER`
- Machine: {machine("torch", "timm", "stardist")}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        write_section("bench_keep", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
