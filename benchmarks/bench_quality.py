"""Quality of the `lite` multi-stream pipeline trained for at most 30 minutes of this CPU.

Trains :func:`cellseg_lite.train.train_multistream` (router, StarDist and HoVer pre-training,
per-class fine-tuning kept only where it helps, thresholds tuned on a selection split held out
of the training data) on synthetic images of the four classes plus the TRAIN split of
real-mini, within a total budget, then scores with the challenge F1 (mean of per-image F1):

- the real-mini VAL split (40 images never used for training or selection), per modality;
- a held-out synthetic set (other seeds), per low-level class;

for the multi-stream segmenter, each pre-trained stream alone on every image (the ablation of
the paper's Table 4), and the classical floor (Otsu + watershed), all measured in the same run.

    .venv/bin/python benchmarks/bench_quality.py      # 27.6 minutes of training, ~40 in all
    .venv/bin/python benchmarks/bench_quality.py --minutes 5 --no-write   # a quick look

A run whose training takes longer than the issue's 30 minutes is a scaling measurement, not the
quality claim: its section says so and goes to its own key (``..._long``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import MODALITIES, machine, mean, now, read_pairs, real_mini, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# synthetic training images per class: with 12, classes 1 and 2 had one selection image each
SYNTHETIC = 24
# the budget: at most 30 minutes of this CPU for the whole training
BUDGET_MINUTES = 30


def main(argv: list[str] | None = None) -> int:
    from cellseg_lite import train, unet

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--minutes",
        type=float,
        default=27.0,
        help="budget of the training loops; threshold tuning and the fine-tuning comparisons "
        "come on top (about half a minute at 27): the whole training is measured and reported",
    )
    parser.add_argument(
        "--pretrained",
        action="store_true",
        help="ImageNet encoder weights (needs the internet; off: from scratch)",
    )
    parser.add_argument(
        "--synthetic",
        type=int,
        default=SYNTHETIC,
        help=f"synthetic training images per class (another number than {SYNTHETIC} writes its "
        "own RESULTS section)",
    )
    parser.add_argument("--test-synthetic", type=int, default=10, help="held-out per class")
    parser.add_argument(
        "--routing",
        default="paper",
        choices=("paper", "code", "validated", "hover"),
        help="'hover': every class to the HoVer stream (no StarDist training)",
    )
    parser.add_argument(
        "--decoder",
        default=unet.DEFAULT_DECODER,
        choices=unet.DECODERS,
        help="U-Net decoder of both streams (another than the default writes its own section)",
    )
    parser.add_argument(
        "--patch-sampling",
        default=train.preset("lite").patch_sampling,
        choices=train.PATCH_SAMPLINGS,
        help="patches per image per epoch: one each, or in proportion to the image's side "
        "(another than the preset's writes its own section)",
    )
    parser.add_argument(
        "--contact-weight",
        type=float,
        default=train.preset("lite").contact_weight,
        help="HoVer loss weighted up where cells touch (TrainConfig.contact_weight; another "
        "than the preset's writes its own section)",
    )
    parser.add_argument(
        "--hover-cores",
        action="store_true",
        help="give the HoVer network a third CP class for each cell's core, whose probability "
        "seeds the watershed (TrainConfig.hover_cores; writes its own section)",
    )
    parser.add_argument(
        "--topup-selection",
        action="store_true",
        help="give every class at least train.MIN_SELECTION_IMAGES selection images, topping the "
        "selection split up with fresh synthetic images (not trained on), so that classes 1 and "
        "2 are fine-tuned too (writes its own section)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_quality")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from cellseg_lite import classical, datasets, demo, metrics, synthetic
    from cellseg_lite.categorize import low_level_category

    real = real_mini(required=True)
    real_train, real_val, modality = real.train, real.val, real.modality
    args.work.mkdir(parents=True, exist_ok=True)
    syn_train, syn_test = args.work / "synthetic_train", args.work / "synthetic_test"
    synthetic.make_dataset(syn_train, args.synthetic, size=(256, 256), seed=args.seed)
    synthetic.make_dataset(syn_test, args.test_synthetic, size=(256, 256), seed=args.seed + 1000)

    training = [*real_train, *datasets.find_pairs(syn_train)]
    selection, topped_up = None, {}
    if args.topup_selection:
        # train_multistream's own split (same fraction and seed), then fresh synthetic images for
        # the classes it leaves short of MIN_SELECTION_IMAGES
        (training, _), (selection, kinds) = train._split_for_selection(
            training, train._sample_categories(training), train.VAL_FRACTION, args.seed
        )
        short = {c: train.MIN_SELECTION_IMAGES - kinds.count(c) for c in range(4)}
        topped_up = {c: n for c, n in short.items() if n > 0}
        if topped_up:
            extra = args.work / "synthetic_selection"
            made = synthetic.make_dataset(
                extra,
                max(topped_up.values()),
                (256, 256),
                args.seed + 2000,
                categories=sorted(topped_up),
            )
            # each class takes only what it is short of (make_dataset draws as many for all)
            keep = {
                e.stem
                for c, n in topped_up.items()
                for e in [m for m in made if m.category == c][:n]
            }
            selection += [p for p in datasets.find_pairs(extra) if p.stem in keep]
    started = time.perf_counter()
    segmenter, stages = train.train_multistream(
        training,
        args.work / "model.pt",
        preset_name="lite",
        minutes=args.minutes,
        routing=args.routing,
        work_dir=args.work / "stages",
        seed=args.seed,
        val=selection,
        pretrained=args.pretrained,
        changes={
            "decoder": args.decoder,
            "patch_sampling": args.patch_sampling,
            "contact_weight": args.contact_weight,
            "hover_cores": args.hover_cores,
        },
        progress=False,
        log=lambda message: print(message, flush=True),
    )
    train_minutes = (time.perf_counter() - started) / 60
    print(f"training took {train_minutes:.1f} minutes", flush=True)
    pretrained = {
        s: train.load_checkpoint(args.work / "stages" / f"{s}_all.pt")
        for s in ("stardist", "hover")
        if (args.work / "stages" / f"{s}_all.pt").is_file()
    }
    methods = demo.ablation_segmenters(segmenter, pretrained)
    multi = list(methods)[-1]
    one_scale = copy.copy(segmenter)
    one_scale.min_diameter = None  # the ablation of the second, larger pass for small cells
    methods = {
        **{name: m for name, m in methods.items() if name != multi},
        "multi-stream, one pass (small cells not enlarged)": one_scale,
        multi: segmenter,
        "classical floor (Otsu + watershed)": None,
    }

    sets = {
        "real-mini val": read_pairs(real_val),
        "synthetic held-out": read_pairs(datasets.find_pairs(syn_test)),
    }
    categories = {
        name: [low_level_category(image, labels) for _, image, labels in images]
        for name, images in sets.items()
    }
    routing_lines = []
    for set_name, images in sets.items():
        routed = [segmenter.route(image) for _, image, _ in images]
        wrong = [
            f"{stem} {c} -> {r}"
            for (stem, _, _), c, r in zip(images, categories[set_name], routed, strict=True)
            if c != r
        ]
        routing_lines.append(
            f"- {set_name}: {len(images) - len(wrong)} of {len(images)} images"
            + (f" (not: {', '.join(wrong)})" if wrong else "")
        )
        print(routing_lines[-1], flush=True)
    scores = {}
    for name, method in methods.items():
        segment = (
            (lambda image: classical.threshold_watershed(image))
            if method is None
            else method.segment
        )
        for set_name, images in sets.items():
            scores[name, set_name] = metrics.evaluate_segmenter(
                segment, images, categories=categories[set_name]
            )
            print(
                f"{name} on {set_name}: {mean(r.f1 for r in scores[name, set_name]):.3f}",
                flush=True,
            )

    real_header = "| method | all 40 | " + " | ".join(MODALITIES) + " |"
    real_lines = [real_header, "|" + "---|" * (2 + len(MODALITIES))]
    for name in methods:
        rows_ = scores[name, "real-mini val"]
        per = [mean(r.f1 for r in rows_ if modality[r.stem] == m) for m in MODALITIES]
        real_lines.append(
            f"| {name} | {mean(r.f1 for r in rows_):.3f} | "
            + " | ".join(f"{v:.3f}" for v in per)
            + " |"
        )
    counts = {m: sum(modality[s.stem] == m for s in real_val) for m in MODALITIES}
    syn_table = metrics.class_table({name: scores[name, "synthetic held-out"] for name in methods})
    stage_lines = "\n".join(
        f"| {s.name} | {s.seconds / 60:.1f} | {s.val_f1:.3f} | {'yes' if s.kept else 'no'} | {s.detail} |"
        for s in stages
    )
    routing_note = ""
    if args.routing == "validated":
        routing_note = (
            "\n\nValidated routing is a race: both streams pre-train for a probe "
            f"({train.VALIDATION_PROBE:.0%} of the pre-training budget each), the selection images "
            "of each class choose between them, and only the winners continue their runs. A stream "
            "that won no class appears in the single-stream rows below with its probe's weights."
        )
    if args.routing == "hover":
        routing_note = (
            "\n\nHoVer routing sends every class to the HoVer stream: no StarDist network is trained, "
            "and the whole pre-training budget goes to one HoVer run. The router and the per-class "
            "fine-tuning stay: each class whose fine-tuned model beats the pre-trained one on its "
            "selection images gets a model of its own. In every recorded run of the validated "
            "routing (section `bench_quality_validated`) HoVer won all four classes, so its "
            "StarDist probe cost a fifth of the pre-training budget and served no image."
        )
    ema = train.preset("lite").ema_decay
    average = "" if ema is None else f", moving average of the weights with decay {ema}"
    timing = metrics.timing_table(scores[multi, "real-mini val"], largest=3)
    default_data = args.synthetic == SYNTHETIC
    more = "" if default_data else f", {args.synthetic} synthetic images per class"
    options = (
        (" --pretrained" if args.pretrained else "")
        + ("" if default_data else f" --synthetic {args.synthetic}")
        + ("" if args.seed == 0 else f" --seed {args.seed}")
        + ("" if args.decoder == unet.DEFAULT_DECODER else f" --decoder {args.decoder}")
    )
    if args.decoder != unet.DEFAULT_DECODER:
        more += f", the authors' decoder (`decoder={args.decoder!r}`: output stride 2)"
    default_sampling = args.patch_sampling == train.preset("lite").patch_sampling
    if not default_sampling:
        options += f" --patch-sampling {args.patch_sampling}"
        more += f", patches per image in proportion to its side (`patch_sampling={args.patch_sampling!r}`)"
    default_contact = args.contact_weight == train.preset("lite").contact_weight
    if not default_contact:
        options += f" --contact-weight {args.contact_weight:g}"
        more += f", the HoVer loss weighted up where cells touch (`contact_weight={args.contact_weight:g}`)"
    if args.hover_cores:
        options += " --hover-cores"
        more += ", a HoVer network with a core class that seeds the watershed (`hover_cores=True`)"
    if args.topup_selection:
        options += " --topup-selection"
        more += f", every class with {train.MIN_SELECTION_IMAGES} or more selection images"
    over_budget = train_minutes > BUDGET_MINUTES
    if over_budget:
        more += f", beyond the {BUDGET_MINUTES}-minute budget (a scaling measurement)"
    topup_text = (
        " The selection split of class "
        + " and ".join(f"{c} (+{n})" for c, n in topped_up.items())
        + f" is topped up with fresh synthetic images (seed {args.seed + 2000}, not trained on) "
        f"to {train.MIN_SELECTION_IMAGES} images (`--topup-selection`)."
        if topped_up
        else ""
    )
    section = f"""## Quality: the `lite` multi-stream pipeline after {train_minutes:.0f} CPU minutes of training{more}

**Training data**: the 156 real-mini TRAIN images and {4 * args.synthetic} synthetic images
({args.synthetic} per class, 256 x 256, seed {args.seed}); {args.routing} routing. A selection split
(12% of each class) is held out of these for validation F1, best-epoch and threshold selection
and the keep-or-drop decision of each fine-tuned model; only a class with at least
{train.MIN_SELECTION_IMAGES} selection images is fine-tuned and given thresholds of its own (the
others keep the pre-trained model, their share of the fine-tuning budget goes to pre-training).{topup_text}
The real-mini VAL split is used for nothing but the scores below. Training took **{train_minutes:.1f} minutes** of wall time in all
(loop budget {args.minutes:g} minutes, the rest is threshold tuning and the fine-tuning
comparisons; {args.threads} torch threads; encoders {"ImageNet-pretrained" if args.pretrained else "from scratch: this machine is offline"}; `lite` preset: {train.preset("lite").patch_size}-pixel patches, batch {train.preset("lite").batch_size}{average}).{routing_note}

| stage | minutes | selection score | kept | note |
|---|---|---|---|---|
{stage_lines}

**Routing**: the test images that the router sent to the class the 4-way rule gives them from
their true labels (`categorize.low_level_category`), and those it sent elsewhere (rule -> router):

{chr(10).join(routing_lines)}

Every segmenter below except the one-pass row segments an image of class
{" or ".join(map(str, segmenter.upscale_classes))} whose cells a first pass finds narrower than
{segmenter.upscale_below(segmenter.models[0]):g} pixels a second time, {segmenter.upscale:g} times larger
(`infer.MIN_DIAMETER`, scaled by the maps' output stride, and `infer.UPSCALE_CLASSES`, chosen by
`benchmarks/bench_upscale.py`). Every pass
sees {segmenter.mirror_context} pixels of mirrored context around the image (`infer.MIRROR_CONTEXT`,
`benchmarks/bench_boundary.py`).

**Real-mini VAL** (images per modality: {", ".join(f"{m} {counts[m]}" for m in MODALITIES)}),
challenge F1, mean of per-image F1:

{chr(10).join(real_lines)}

**Held-out synthetic** ({4 * args.test_synthetic} images, seed {args.seed + 1000}), per low-level class:

{syn_table}

Running time of the multi-stream segmenter on the largest real-mini VAL images (CPU):

{timing}

Reference figures (shared/data/README.md): classical floor 0.628 on val, a naive atto StarDist
0.659 after 25 CPU minutes, stardist's StarDist2D 0.697 on unseen real images.

- Command: `.venv/bin/python benchmarks/bench_quality.py --minutes {args.minutes:g} --routing {args.routing}{options}`
- Machine: {machine("torch", "timm", "stardist")}; bf16 on CPU: {train.cpu_has_bf16()}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        key = f"bench_quality_{args.routing}"
        key = key if default_data else f"{key}_synthetic{args.synthetic}"
        if args.decoder != unet.DEFAULT_DECODER:
            key += f"_{args.decoder}_decoder"
        if not default_sampling:
            key += f"_{args.patch_sampling}_sampling"
        if not default_contact:
            key += f"_contact{args.contact_weight:g}"
        if args.hover_cores:
            key += "_cores"
        if args.topup_selection:
            key += "_topup"
        if over_budget:
            key += "_long"
        write_section(key, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
