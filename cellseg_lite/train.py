"""One training loop for both segmentation streams: presets, checkpoints, resume, fine-tuning, DDP.

Lou, Yu et al. (NeurIPS 2022 Cell Segmentation Challenge) train every model the same way: AdamW
(lr 1e-4), batch 16, 512 x 512 patches with the eight augmentations of :mod:`cellseg_lite.augment`,
800 epochs with the learning rate halved at epoch 200, first on all labelled images, then
fine-tuned on one low-level class at a time. :func:`train_stream` is that loop for either stream
(``"stardist"`` or ``"hover"``), with what a run on someone else's machine needs:

- the device chosen for you, mixed precision on CUDA (bf16 where the GPU supports it, else fp16
  with a gradient scaler), channels-last memory on CUDA;
- a tqdm progress bar with the loss and the throughput in patches per second;
- validation with the challenge's F1 on whole images, and the best epoch's weights kept;
- one checkpoint file, written atomically, that carries the model's configuration, the preset,
  the classes the model serves, the package version, the best weights and the state needed to
  resume the same run (:func:`load_checkpoint`);
- resume (``resume=path``): the run continues exactly where it stopped, patch for patch;
- fine-tuning (``init=path``): start from a pre-trained checkpoint on one class's images;
- several GPUs or machines through DistributedDataParallel under ``torchrun`` (gloo on CPU).

Training targets are computed in the data set's ``__getitem__``, i.e. in DataLoader workers, after
augmentation: star distances must be computed on the augmented labels (rotating an image permutes
its rays, paper-notes section 11), and computing them there keeps the training step itself pure
tensor work.

Presets (:data:`PRESETS`): ``"paper"`` (the paper's settings, for GPUs), ``"lite"`` (a small
ConvNeXt, small patches and a time budget: for a CPU or a Colab workshop) and ``"fast"`` (seconds,
for CI and the book's FAST mode).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from cellseg_lite._checks import load_torch_file, positive_int, resolve_device
from cellseg_lite._errors import CellSegError, where
from cellseg_lite.config import fast_mode

__all__ = [
    "CHECKPOINT_FORMAT",
    "LR_SCHEDULES",
    "PATCH_SAMPLINGS",
    "HOVER_SIZE_FLOORS",
    "PRESETS",
    "STREAMS",
    "Checkpoint",
    "History",
    "StreamDataset",
    "TrainConfig",
    "best_thresholds",
    "build_model",
    "cpu_has_bf16",
    "default_preset",
    "evaluate_stream",
    "fine_tune_config",
    "load_checkpoint",
    "map_options",
    "predict_maps",
    "preset",
    "save_checkpoint",
    "segment_maps",
    "train_stream",
    "uses_tta",
]

#: The two segmentation streams of the method.
STREAMS = ("stardist", "hover")
#: ``TrainConfig.lr_schedule`` values: the paper's steps, or a decay to zero over the run.
LR_SCHEDULES = ("step", "linear", "cosine")
#: ``TrainConfig.patch_sampling``: every image equally often, or in proportion to its side.
PATCH_SAMPLINGS = ("image", "size")
#: ``format`` field of a stream checkpoint (a router checkpoint has its own).
CHECKPOINT_FORMAT = "cellseg-lite-stream"
_CHECKPOINT_LAYOUT = 1


# --------------------------------------------------------------------------- 1. settings


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one training run; a preset is one of these (:func:`preset`).

    Model: ``stream``, ``backbone`` (a timm ConvNeXt), ``decoder`` (``"paper"`` or ``"code"``),
    ``n_rays`` (StarDist), ``pretrained`` (ImageNet encoder weights; falls back with a warning
    offline). Data: ``patch_size``, ``batch_size`` (per process), ``patches_per_image`` (patches
    drawn from each image per epoch), ``patch_sampling`` (``"image"``: every image equally
    often, as in the paper; ``"size"``: in proportion to its side,
    :func:`cellseg_lite.datasets.size_repeats`), ``augment`` (the paper's eight augmentations).
    Optimisation: AdamW with ``lr`` and ``weight_decay``; ``lr_schedule``: ``"step"`` (the
    paper's) multiplies the learning rate by ``lr_gamma`` at each fraction of the run in
    ``lr_milestones`` (the paper: x0.5 at epoch 200 of 800, i.e. at 0.25); ``"linear"`` and
    ``"cosine"`` lower it from ``lr`` to zero over the run (milestones and gamma unused); all
    after a linear warm-up of ``warmup_steps``. Length: ``epochs``, and
    optionally a budget of ``minutes`` (the run stops after the first step past it, validation
    included; the schedule then follows elapsed time). ``ema_decay``: keep an exponential moving
    average of the weights (``torch.optim.swa_utils``, BatchNorm statistics included) with this
    decay per step, and validate, keep and export the average instead of the raw weights (the
    paper has none: ``None``). ``freeze_batchnorm``: keep the BatchNorm layers of the decoder in
    eval mode while training (their running statistics stay those of the initial weights; their
    scale and shift still learn): :func:`train_multistream` sets it for fine-tuning, where the
    statistics of a few batches of one class broke the model (``benchmarks/bench_finetune.py``).
    ``val_every``: epochs between validations. ``amp``: mixed
    precision of the forward pass (bf16, or fp16 on GPUs without bf16; the loss is computed in
    float32 either way); ``None`` means on CUDA and on CPUs with native bf16
    (:func:`cpu_has_bf16`). ``channels_last``: ``None`` follows ``amp``. ``loss``: the StarDist
    loss variant (``"paper"`` or ``"code"``). ``contact_weight``: weight the HV terms of the
    HoVer loss up by this much where cells touch
    (:func:`cellseg_lite.streams.hover.contact_weights`); 0, the paper, weights every pixel
    alike, and StarDist ignores it as HoVer ignores ``loss``. ``hover_cores``: give the HoVer
    network a third CP class for each cell's core (``ConvNeXtHover(cores=True)``, this project's
    extension: its probability seeds the watershed instead of the HV slopes; False, the paper).
    ``num_workers``: DataLoader
    processes computing patches and targets. ``tta``: tune the post-processing on flip-averaged maps
    (:func:`cellseg_lite.infer.flip_averaged`), which the segmenter then predicts too (four
    forward passes per tile); ``None`` means for HoVer only (:func:`uses_tta`). ``map_scales``:
    tune it on maps averaged over these scales of each image
    (:func:`cellseg_lite.infer.scale_averaged`; ``infer.MAP_SCALES``, the image's own and 1.5
    times larger, costs 3.25 times the forward passes), which the segmenter then averages too;
    ``(1.0,)``, the paper and the default, one pass at the image's own scale (on two trained
    `lite` segmenters the average was level with the segmenter's second pass for small cells,
    ``benchmarks/bench_map_scales.py``). The periodic validation that picks
    the best epoch uses plain maps at the own scale either way.
    """

    stream: str = "stardist"
    backbone: str = "convnext_small"
    decoder: str = "paper"
    n_rays: int = 32
    pretrained: bool = True
    patch_size: int = 512
    batch_size: int = 16
    patches_per_image: int = 1
    patch_sampling: str = "image"
    augment: bool = True
    lr: float = 1e-4
    weight_decay: float = 0.01
    lr_schedule: str = "step"
    lr_milestones: tuple[float, ...] = (0.25,)
    lr_gamma: float = 0.5
    warmup_steps: int = 0
    epochs: int = 800
    minutes: float | None = None
    ema_decay: float | None = None
    freeze_batchnorm: bool = False
    val_every: int = 10
    amp: bool | None = None
    channels_last: bool | None = None
    loss: str = "paper"
    contact_weight: float = 0.0
    hover_cores: bool = False
    num_workers: int = 0
    tta: bool | None = None
    map_scales: tuple[float, ...] = (1.0,)
    seed: int = 0
    preset: str = "custom"

    def replace(self, **changes) -> TrainConfig:
        """A copy with some settings changed (checked again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise CellSegError(f"TrainConfig: unknown setting(s) {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def __post_init__(self):
        _check_config(self)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lr_milestones"] = list(self.lr_milestones)
        data["map_scales"] = list(self.map_scales)
        return data

    @classmethod
    def from_dict(cls, data: dict, source=None) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            values = {k: v for k, v in dict(data).items() if k in known}
            for name in ("lr_milestones", "map_scales"):
                if name in values:
                    values[name] = tuple(values[name])
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise CellSegError(f"{where(source)}: bad training settings ({err})") from err


def _check_config(c: TrainConfig) -> None:
    def positive_int(name, minimum=1):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
            raise CellSegError(f"{name}: expected an integer >= {minimum}, got {value!r}")

    def positive_number(name, allow_zero=False):
        value = getattr(c, name)
        ok = (
            not isinstance(value, bool)
            and isinstance(value, int | float)
            and math.isfinite(value)
            and (value >= 0 if allow_zero else value > 0)
        )
        if not ok:
            raise CellSegError(
                f"{name}: expected a {'non-negative' if allow_zero else 'positive'} number, got {value!r}"
            )

    if c.stream not in STREAMS:
        raise CellSegError(f"stream: expected one of {', '.join(STREAMS)}, got {c.stream!r}")
    if c.tta is not None and not isinstance(c.tta, bool):
        raise CellSegError(f"tta: expected True, False or None, got {c.tta!r}")
    from cellseg_lite.infer import map_scales_of

    object.__setattr__(c, "map_scales", map_scales_of(c.map_scales))  # a list becomes a tuple
    if c.patch_sampling not in PATCH_SAMPLINGS:
        raise CellSegError(
            f"patch_sampling: expected one of {', '.join(PATCH_SAMPLINGS)}, got {c.patch_sampling!r}"
        )
    if c.loss not in ("paper", "code"):
        raise CellSegError(f"loss: expected 'paper' or 'code', got {c.loss!r}")
    if c.lr_schedule not in LR_SCHEDULES:
        raise CellSegError(
            f"lr_schedule: expected one of {', '.join(LR_SCHEDULES)}, got {c.lr_schedule!r}"
        )
    for name in ("patch_size", "batch_size", "patches_per_image", "epochs", "val_every", "n_rays"):
        positive_int(name)
    for name in ("num_workers", "warmup_steps", "seed"):
        positive_int(name, minimum=0)
    if c.patch_size < 32:
        raise CellSegError(f"patch_size: expected at least 32 pixels, got {c.patch_size}")
    positive_number("lr")
    positive_number("weight_decay", allow_zero=True)
    positive_number("lr_gamma")
    positive_number("contact_weight", allow_zero=True)
    if c.minutes is not None:
        positive_number("minutes")
    if c.ema_decay is not None and not (
        isinstance(c.ema_decay, int | float)
        and not isinstance(c.ema_decay, bool)
        and 0 < c.ema_decay < 1
    ):
        raise CellSegError(f"ema_decay: expected a number in (0, 1) or None, got {c.ema_decay!r}")
    for name in ("freeze_batchnorm", "hover_cores"):
        if not isinstance(getattr(c, name), bool):
            raise CellSegError(f"{name}: expected True or False, got {getattr(c, name)!r}")
    if not all(isinstance(m, int | float) and 0 < m < 1 for m in c.lr_milestones):
        raise CellSegError(
            f"lr_milestones: expected fractions of the run in (0, 1), got {c.lr_milestones!r}"
        )


def _preset_table() -> dict[str, TrainConfig]:
    paper = TrainConfig(preset="paper")
    lite = TrainConfig(
        # atto, paper decoder: in 12 CPU minutes convnext_pico scored no better on real-mini val
        # (0.708 vs 0.711) and 4-minute runs of the code decoder neither (0.680 vs 0.688)
        backbone="convnext_atto",
        # 128, not 256: a step is ~3.5x cheaper and, in 5 CPU minutes, val F1 rose 0.284 -> 0.342
        # (StarDist) and 0.570 -> 0.596 (HoVer): more updates beat more context when minutes
        # are scarce (benchmarks/bench_patch_size.py, RESULTS.md)
        patch_size=128,
        batch_size=8,
        lr=1e-3,
        warmup_steps=50,
        # a decay to zero, not the paper's steps: a short run then ends with settled weights.
        # 4-minute HoVer runs: held-out synthetic F1 0.547 against 0.434 (two seeds), VAL level;
        # 27-minute multi-stream runs (seed 0): VAL 0.742 and 0.721, synthetic 0.707 and 0.713,
        # against 0.728 and 0.723 with halvings at 0.5 and 0.8 of the budget (RESULTS.md,
        # bench_quality; runs differ by about 0.03)
        lr_schedule="linear",
        epochs=10_000,
        minutes=10.0,
        val_every=10,
        preset="lite",
    )
    fast = lite.replace(
        pretrained=False,
        patch_size=64,
        batch_size=4,
        warmup_steps=0,
        epochs=2,
        minutes=None,
        val_every=1,
        preset="fast",
    )
    return {"paper": paper, "lite": lite, "fast": fast}


#: Preset names: ``"paper"`` (ConvNeXt-small, pretrained, 512 patches, batch 16, AdamW 1e-4, 800
#: epochs halved at 200: GPUs), ``"lite"`` (convnext_atto, 128 patches, batch 8, AdamW 1e-3 with
#: warm-up and a linear decay to zero, a 10-minute budget: a CPU or Colab), ``"fast"`` (64-pixel patches, two epochs, no
#: downloads: CI and FAST mode).
PRESETS = ("paper", "lite", "fast")


def preset(name: str = "paper", **changes) -> TrainConfig:
    """The settings of a preset, with optional changes: ``preset("lite", stream="hover", minutes=5)``."""
    table = _preset_table()
    if name not in table:
        raise CellSegError(f"preset: expected one of {', '.join(PRESETS)}, got {name!r}")
    return table[name].replace(**changes) if changes else table[name]


def default_preset() -> str:
    """``"fast"`` under ``CELLSEG_FAST=1``, else ``"paper"`` on a CUDA GPU and ``"lite"`` on a CPU."""
    if fast_mode():
        return "fast"
    return "paper" if torch.cuda.is_available() else "lite"


# --------------------------------------------------------------------------- 2. models and data


def uses_tta(config: TrainConfig) -> bool:
    """Whether a stream's thresholds are tuned, and its images segmented, on flip-averaged maps.

    ``config.tta``, where ``None`` means HoVer yes, StarDist no: on two trained segmenters the
    four flips raised real-mini val F1 by 0.014 and 0.010, same weights (RESULTS.md,
    ``bench_postprocess.py --compare tta``), while a StarDist whole-slide image already takes a
    quarter of the challenge's time tolerance without them (``bench_wholeslide.py``).
    """
    return (config.stream == "hover") if config.tta is None else bool(config.tta)


#: The periodic validation's maps: one pass, no flips, at the image's own scale, whatever the
#: thresholds were tuned on (a cheap ranking of epochs; the thresholds are tuned at the end).
_PLAIN_MAPS = {"tta": False, "map_scales": (1.0,)}


def map_options(config: TrainConfig) -> dict:
    """How a stream's thresholds are tuned, and its images' maps made, as keyword arguments of
    :func:`best_thresholds` and :func:`evaluate_stream`: ``tta`` (:func:`uses_tta`) and
    ``map_scales`` (``config.map_scales``)."""
    return {"tta": uses_tta(config), "map_scales": config.map_scales}


def build_model(config: TrainConfig, *, pretrained: bool | None = None) -> nn.Module:
    """The network of a config: ``ConvNeXtStarDist`` or ``ConvNeXtHover``."""
    pretrained = config.pretrained if pretrained is None else pretrained
    if config.stream == "stardist":
        from cellseg_lite.streams.stardist import ConvNeXtStarDist

        return ConvNeXtStarDist(
            config.backbone, n_rays=config.n_rays, pretrained=pretrained, decoder=config.decoder
        )
    from cellseg_lite.streams.hover import ConvNeXtHover

    return ConvNeXtHover(
        config.backbone, pretrained=pretrained, decoder=config.decoder, cores=config.hover_cores
    )


def _targets(
    stream: str,
    labels: np.ndarray,
    n_rays: int,
    contact_weight: float = 0.0,
    hover_cores: bool = False,
) -> dict[str, torch.Tensor]:
    if stream == "stardist":
        from cellseg_lite.streams import stardist

        prob, dist = stardist.targets(labels, n_rays=n_rays)
        return {"prob": torch.from_numpy(prob[None]), "dist": torch.from_numpy(dist)}
    from cellseg_lite.streams import hover

    foreground, hv = hover.targets(labels)
    if hover_cores:  # classes 0 background, 1 cell, 2 core
        foreground = hover.core_targets(labels)
    targets = {"foreground": torch.from_numpy(foreground), "hv": torch.from_numpy(hv)}
    if contact_weight:
        targets["hv_weight"] = torch.from_numpy(hover.contact_weights(labels, contact_weight))
    return targets


class StreamDataset(torch.utils.data.Dataset):
    """Augmented patches with their stream's targets: what the training loop iterates over.

    Wraps a :class:`cellseg_lite.datasets.PatchDataset` and adds, per item, the targets of the
    stream computed from the augmented labels: ``prob (1, P, P)`` and ``dist (R, P, P)`` for
    StarDist, ``foreground (P, P)`` and ``hv (2, P, P)`` for HoVer (``foreground`` 0/1/2 with
    ``hover_cores``: background, cell, core), and ``hv_weight (P, P)`` with a
    ``contact_weight``. Runs in DataLoader workers when ``num_workers > 0``.
    """

    def __init__(
        self,
        patches,
        stream: str,
        n_rays: int = 32,
        contact_weight: float = 0.0,
        hover_cores: bool = False,
    ):
        if stream not in STREAMS:
            raise CellSegError(f"stream: expected one of {', '.join(STREAMS)}, got {stream!r}")
        self.patches = patches
        self.stream = stream
        self.n_rays = int(n_rays)
        self.contact_weight = float(contact_weight)
        self.hover_cores = bool(hover_cores)

    def __len__(self) -> int:
        return len(self.patches)

    def set_epoch(self, epoch: int) -> None:
        self.patches.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        item = self.patches[index]
        labels = item["labels"].numpy()
        item.update(
            _targets(self.stream, labels, self.n_rays, self.contact_weight, self.hover_cores)
        )
        return item


_TARGET_KEYS = ("prob", "dist", "foreground", "hv", "hv_weight")


def _loss(config: TrainConfig, outputs, batch: dict) -> torch.Tensor:
    # in float32 even after a bf16 forward pass: bf16 keeps 8 bits of an HV value, too coarse
    # for the MSGE term's finite differences (benchmarks/RESULTS.md, bench_lite_precision)
    outputs = tuple(output.float() for output in outputs)
    if config.stream == "stardist":
        from cellseg_lite.streams import stardist

        prob, dist = outputs
        return stardist.loss(prob, dist, batch["prob"], batch["dist"], variant=config.loss)
    from cellseg_lite.streams import hover

    cp, hv = outputs
    return hover.loss(cp, hv, batch["foreground"], batch["hv"], weights=batch.get("hv_weight"))


# --------------------------------------------------------------------------- 3. prediction for validation


def predict_maps(
    model: nn.Module,
    image: np.ndarray,
    *,
    device=None,
    tile: int = 512,
    tta: bool = False,
    map_scales=(1.0,),
) -> np.ndarray:
    """The stream's output maps ``(K, H, W)`` float32 of one network input ``(H, W, 3)`` in [0, 1].

    StarDist: ``prob`` then ``dist`` (``1 + R`` channels); HoVer: foreground probability, then
    ``hv`` (3 channels). The window is the segmenter's default (:func:`cellseg_lite.infer.window`
    with tiles of ``tile``), so that thresholds are tuned on the maps it will make: one forward
    pass up to :data:`cellseg_lite.infer.WHOLE_IMAGE_SIDE` pixels a side, else
    :func:`cellseg_lite.infer.sliding_window`. ``tta``: the mean of the maps of the image's four
    flips (:func:`cellseg_lite.infer.flip_averaged`). ``map_scales``: the mean of the maps of the
    image at these scales, each with its own window (:func:`cellseg_lite.infer.scale_averaged`).
    The segmenter predicts an image with
    mirrored context around it (:func:`cellseg_lite.infer.mirror_pad`); :func:`evaluate_stream`
    adds it before calling this where asked to (its ``context``).
    """
    from cellseg_lite import infer
    from cellseg_lite.streams.hover import ConvNeXtHover

    device = next(model.parameters()).device if device is None else torch.device(device)
    predict = infer.model_predictor(model, device=device)
    kind = "hover" if isinstance(model, ConvNeXtHover) else "stardist"
    if tta:
        predict = infer.flip_averaged(predict, kind)

    def maps_of(x: np.ndarray) -> np.ndarray:
        tiling = infer.window(x.shape, tile, whole_image_side=infer.WHOLE_IMAGE_SIDE)
        return infer.sliding_window(predict, x, *tiling)

    if tuple(map_scales) == (1.0,):
        return maps_of(image)
    return infer.scale_averaged(maps_of, image, map_scales, kind)


def segment_maps(stream: str, maps: np.ndarray, thresholds: dict) -> np.ndarray:
    """Instance labels ``(H, W)`` from :func:`predict_maps` output and post-processing thresholds
    (HoVer: 3 maps, or 4 with the core probability of a network with cores)."""
    if stream == "stardist":
        from cellseg_lite.streams import stardist

        return stardist.instances(
            maps[0], maps[1:], thresholds.get("prob_thresh", 0.5), thresholds.get("nms_thresh", 0.4)
        )
    from cellseg_lite import infer

    return infer.hover_steps(infer.split_hover_maps(maps), thresholds).labels


def _default_thresholds(stream: str) -> dict:
    return {"prob_thresh": 0.5, "nms_thresh": 0.4} if stream == "stardist" else {"prob_thresh": 0.6}


#: The size floors that HoVer's threshold tuning tries: the ``"scaled"`` watershed preset's
#: (markers 2 % and foreground components 1 % of the typical cell area) and two stricter ones.
HOVER_SIZE_FLOORS = (
    {"marker_min_fraction": 0.02, "foreground_min_fraction": 0.01},
    {"marker_min_fraction": 0.05, "foreground_min_fraction": 0.05},
    {"marker_min_fraction": 0.1, "foreground_min_fraction": 0.1},
)


def _threshold_grid(stream: str, *, cores: bool = False) -> list[dict]:
    if stream == "stardist":
        return [{"prob_thresh": p, "nms_thresh": 0.4} for p in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)]
    # HoVer: the marker threshold too, since a network's HV slopes are shallower than the exact
    # targets' (0.5 is the default; 0.25 splits more touching cells), and a size floor for
    # markers and foreground components, in fractions of the typical cell area: a network's
    # maps carry specks and fragments that exact targets do not (tuned per class on the
    # selection split, it raised two trained segmenters' real-mini val F1 by 0.024 and 0.042,
    # benchmarks/bench_postprocess.py in RESULTS.md)
    # (a network with cores: the core probability threshold in place of the marker threshold)
    markers = (
        ("core_threshold", HOVER_CORE_THRESHOLDS) if cores else ("marker_threshold", (0.25, 0.5))
    )
    return [
        {"prob_thresh": p, markers[0]: m, **floor}
        for p in (0.4, 0.5, 0.6, 0.7, 0.8)
        for m in markers[1]
        for floor in HOVER_SIZE_FLOORS
    ]


#: Core probabilities above which a pixel seeds the watershed, tried by the threshold tuning of a
#: HoVer network with cores (``TrainConfig.hover_cores``).
HOVER_CORE_THRESHOLDS = (0.3, 0.5)


#: Least cell probabilities of a HoVer marker pixel (``WatershedParams.marker_min_prob``) that
#: tuning tries on top of the grid's best candidate: a network is least sure of the pixels where
#: two cells meet, and markers kept off them split cells that the HV maps draw as one. Tuned per
#: class on the selection split of three trained segmenters, they changed real-mini VAL F1 by
#: +0.014, +0.012 and 0.000 and never raised the share of merged cells
#: (benchmarks/bench_postprocess.py --compare confident, in RESULTS.md).
HOVER_MARKER_PROBS = (0.9, 0.95, 0.99)


def _threshold_refinements(stream: str) -> list[dict]:
    return [{"marker_min_prob": q} for q in HOVER_MARKER_PROBS] if stream == "hover" else []


def best_thresholds(
    model: nn.Module,
    stream: str,
    val,
    *,
    tta: bool = False,
    map_scales=(1.0,),
    context: int = 0,
) -> tuple[float, dict]:
    """The post-processing thresholds best on ``val`` ``(stem, image [0, 1], labels)``, and their
    mean challenge F1: the stream's grid (probability threshold; for HoVer also the marker
    threshold and the size floors), then for HoVer the best candidate with markers only on
    confident pixels (:data:`HOVER_MARKER_PROBS`), kept where it scores higher. One prediction
    per image (:func:`evaluate_stream`, which says what ``tta``, ``map_scales`` and ``context``
    do; :func:`map_options` gives a config's)."""
    cores = bool(getattr(model, "cores", False))
    grid = _threshold_grid(stream, cores=cores)
    refine = _threshold_refinements(stream)
    return evaluate_stream(
        model, stream, val, grid, tta=tta, map_scales=map_scales, refine=refine, context=context
    )


def _load_val(samples) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Whole validation images as ``(stem, network input (H, W, 3) in [0, 1], labels)``."""
    from cellseg_lite.datasets import load_sample

    loaded = []
    for sample in samples:
        image, labels = load_sample(sample)
        loaded.append((sample.stem, image.astype(np.float32) / 255.0, labels))
    return loaded


def evaluate_stream(
    model: nn.Module,
    stream: str,
    val: Sequence[tuple[str, np.ndarray, np.ndarray]],
    thresholds: dict | Sequence[dict] | None = None,
    *,
    tta: bool | None = None,
    map_scales=None,
    refine: Sequence[dict] = (),
    context: int = 0,
) -> tuple[float, dict]:
    """Mean challenge F1 of a stream on whole images ``(stem, image [0, 1], labels)``.

    With a list of thresholds, each is tried on the same predicted maps and the best one is
    returned with its F1 (the threshold optimisation stardist does on validation data). Each dict
    of ``refine`` is then tried on top of that best one (``{**best, **change}``, same maps), and
    the best of these replaces it only where it scores higher. ``tta``:
    predict flip-averaged maps (:func:`predict_maps`); the thresholds returned then carry
    ``"tta": True``, which the segmenter follows. ``None``: what a single thresholds dict says
    (its ``"tta"`` entry), else plain maps. ``map_scales``: predict maps averaged over these
    scales of each image (:func:`predict_maps`); the thresholds returned then carry them as
    ``"map_scales"`` (unless ``(1.0,)``), which the segmenter follows; ``None``: what a single
    thresholds dict says, else ``(1.0,)``. ``context``: pixels of mirrored context around each
    image, cropped from its labels after post-processing, as
    :class:`~cellseg_lite.infer.MultiStreamSegmenter` does
    (``infer.MIRROR_CONTEXT``: exactly what the segmenter post-processes). 0, the default, tunes
    on the bare image: on five trained segmenters, thresholds tuned with the
    segmenter's 16 pixels scored the same within the noise of choosing among thresholds on 9-30
    selection images (real-mini VAL -0.014 to +0.013, mean -0.003; held-out synthetic mean
    +0.003; ``benchmarks/bench_tuning_context.py`` in RESULTS.md).
    """
    from cellseg_lite import infer, metrics

    def predicted(image: np.ndarray) -> np.ndarray:
        padded = infer.mirror_pad(image, context)
        return predict_maps(model, padded, tta=tta, map_scales=map_scales)

    def f1_of(labels: np.ndarray, maps: np.ndarray, setting: dict) -> float:
        return metrics.f1_score(
            labels, infer.crop_context(segment_maps(stream, maps, setting), context)
        )

    candidates = (
        [thresholds or _default_thresholds(stream)]
        if isinstance(thresholds, dict | None)
        else list(thresholds)
    )
    if tta is None:
        tta = isinstance(thresholds, dict) and bool(thresholds.get("tta", False))
    if map_scales is None:
        given = thresholds.get("map_scales", (1.0,)) if isinstance(thresholds, dict) else (1.0,)
        map_scales = infer.map_scales_of(given, "thresholds' map_scales")
    else:
        map_scales = infer.map_scales_of(map_scales)
    if not len(val):
        return float("nan"), _chosen(candidates[0], tta, map_scales)
    was_training = model.training
    model.eval()
    kept_maps, kept_bytes = [], 0  # for the refinements, which need the best candidate first
    try:
        scores = np.zeros((len(candidates), len(val)))
        for j, (_, image, labels) in enumerate(val):
            maps = predicted(image)
            for i, setting in enumerate(candidates):
                scores[i, j] = f1_of(labels, maps, setting)
            kept_bytes += maps.nbytes
            if refine and kept_bytes <= _KEPT_MAPS_BYTES:
                kept_maps.append(maps)
        best = int(np.argmax(scores.mean(axis=1)))
        chosen, f1 = dict(candidates[best]), float(scores[best].mean())
        refined = [{**chosen, **change} for change in refine]
        refined_scores = np.zeros((len(refined), len(val)))
        for j, (_, image, labels) in enumerate(val if refined else ()):
            # predicted again only where keeping every image's maps would take too much memory
            maps = kept_maps[j] if j < len(kept_maps) else predicted(image)
            for i, setting in enumerate(refined):
                refined_scores[i, j] = f1_of(labels, maps, setting)
    finally:
        model.train(was_training)
    for setting, score in zip(refined, refined_scores.mean(axis=1), strict=True):
        if score > f1:  # a refinement replaces the grid's best only where it scores higher
            chosen, f1 = setting, float(score)
    return f1, _chosen(chosen, tta, map_scales)


#: Memory that :func:`evaluate_stream` may spend on keeping predicted maps for its refinements
#: (1 GiB: about 90 images of 1000 x 1000 with HoVer's three maps); beyond it they are
#: predicted again.
_KEPT_MAPS_BYTES = 2**30


def _chosen(thresholds: dict, tta: bool, map_scales: tuple[float, ...]) -> dict:
    chosen = {k: v for k, v in thresholds.items() if k not in ("tta", "map_scales")}
    if tta:
        chosen["tta"] = True
    if map_scales != (1.0,):
        chosen["map_scales"] = list(map_scales)
    return chosen


# --------------------------------------------------------------------------- 4. checkpoints


class Checkpoint(NamedTuple):
    """A loaded stream checkpoint: the model (eval mode, best weights), its settings and state."""

    model: nn.Module
    config: TrainConfig
    thresholds: dict
    categories: tuple[int, ...] | None
    history: dict
    version: str
    resume: dict | None
    path: Path | None

    @property
    def stream(self) -> str:
        return self.config.stream


@dataclass
class History:
    """What a run did: per-step losses, per-epoch means, validation F1, time."""

    step_loss: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    val_f1: list[tuple[int, float]] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    steps: int = 0
    epochs: int = 0
    seconds: float = 0.0
    patches_per_second: float = 0.0
    best_epoch: int = -1
    best_f1: float = float("nan")
    stopped_early: bool = False
    thresholds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["val_f1"] = [list(v) for v in self.val_f1]
        return data

    @classmethod
    def from_dict(cls, data: dict | None) -> History:
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        history = cls(**{k: v for k, v in data.items() if k in known})
        history.val_f1 = [tuple(v) for v in history.val_f1]
        return history


def _freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers to eval mode: they normalise with, and no longer update, their running
    statistics (their weights still train)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _model_state(model: nn.Module) -> dict:
    model = model.module if hasattr(model, "module") else model
    return _cpu_copy(model.state_dict())


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    config: TrainConfig,
    *,
    thresholds: dict | None = None,
    categories: Sequence[int] | None = None,
    history: History | dict | None = None,
    resume: dict | None = None,
    state_dict: dict | None = None,
) -> None:
    """Write a stream checkpoint in one file, atomically (a crash never leaves half a file).

    It holds the model's weights (``state_dict``, default the model's own), the full
    :class:`TrainConfig` (backbone, decoder, rays, preset...), the post-processing thresholds,
    the low-level classes the model serves (``categories``), the history, the package version
    and, for :func:`train_stream`'s ``resume=``, the optimiser state. Plain types only, so that
    ``torch.load(weights_only=True)`` reads it.
    """
    from cellseg_lite import __version__
    from cellseg_lite.io import atomic_write

    if isinstance(history, History):
        history = history.to_dict()
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "layout": _CHECKPOINT_LAYOUT,
        "version": __version__,
        "stream": config.stream,
        "config": config.to_dict(),
        "thresholds": dict(thresholds or _default_thresholds(config.stream)),
        "categories": None if categories is None else [int(c) for c in categories],
        "history": history or {},
        "state_dict": state_dict if state_dict is not None else _model_state(model),
        "resume": resume,
    }
    with atomic_write(path) as fh:
        torch.save(checkpoint, fh)


def _read_checkpoint(path: Path, device) -> dict:
    checkpoint = load_torch_file(path, "model checkpoint", device=device)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CellSegError(f"{where(path)}: is not a cellseg-lite stream checkpoint")
    if checkpoint.get("layout") != _CHECKPOINT_LAYOUT:
        raise CellSegError(
            f"{where(path)}: checkpoint layout {checkpoint.get('layout')!r} is not supported "
            f"(this version reads layout {_CHECKPOINT_LAYOUT})"
        )
    return checkpoint


def _check_compatible(saved: TrainConfig, wanted: TrainConfig, path) -> None:
    """Refuse weights of another architecture with a message naming the difference."""
    for name in ("stream", "backbone", "decoder", "n_rays", "hover_cores"):
        old, new = getattr(saved, name), getattr(wanted, name)
        if (name == "n_rays" and saved.stream != "stardist") or (
            name == "hover_cores" and saved.stream != "hover"
        ):
            continue
        if old != new:
            raise CellSegError(
                f"{where(path)}: the checkpoint was trained with {name}={old!r}, but this run "
                f"uses {name}={new!r}; use a checkpoint of the same architecture or change {name}"
            )


def _load_state(model: nn.Module, state: dict, path) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:
        raise CellSegError(
            f"{where(path)}: the weights do not fit this model "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from err


def load_checkpoint(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    expect: TrainConfig | None = None,
) -> Checkpoint:
    """Read a checkpoint of :func:`save_checkpoint`: the model in eval mode with its best weights.

    ``expect`` (a config) refuses a checkpoint of another stream, backbone, decoder or number of
    rays with a clear message. Damaged or foreign files raise :class:`~cellseg_lite.CellSegError`.
    """
    path = Path(path)
    checkpoint = _read_checkpoint(path, device)
    config = TrainConfig.from_dict(checkpoint.get("config") or {}, path)
    if expect is not None:
        _check_compatible(config, expect, path)
    model = build_model(config, pretrained=False)
    _load_state(model, checkpoint["state_dict"], path)
    model.to(device).eval()
    categories = checkpoint.get("categories")
    return Checkpoint(
        model=model,
        config=config,
        thresholds=dict(checkpoint.get("thresholds") or _default_thresholds(config.stream)),
        categories=None if categories is None else tuple(int(c) for c in categories),
        history=checkpoint.get("history") or {},
        version=str(checkpoint.get("version", "?")),
        resume=checkpoint.get("resume"),
        path=path,
    )


# --------------------------------------------------------------------------- 5. the loop


class _Distributed(NamedTuple):
    rank: int
    world_size: int
    initialised_here: bool

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _setup_distributed(distributed: bool | None, device: torch.device) -> _Distributed:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if distributed is None:
        distributed = world > 1
    if not distributed:
        return _Distributed(0, 1, False)
    if dist.is_initialized():
        return _Distributed(dist.get_rank(), dist.get_world_size(), False)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per process
    if "MASTER_ADDR" not in os.environ:
        raise CellSegError(
            "distributed: no process group; launch with torchrun (it sets RANK, WORLD_SIZE, "
            "MASTER_ADDR and MASTER_PORT)"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return _Distributed(dist.get_rank(), dist.get_world_size(), True)


#: CPU flags (Linux ``/proc/cpuinfo``) of native bfloat16 arithmetic: x86 AVX512-BF16 and AMX,
#: ARM's BF16 extension.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def _cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str] | None:
    """The instruction-set flags of the first CPU, or ``None`` where ``cpuinfo`` cannot be read."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as file:
            for line in file:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        return None
    return frozenset()


def cpu_has_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX).

    oneDNN also reports bf16 support on AVX512 CPUs without these instructions
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``), where it converts to float32 and back: on
    such a Xeon a lite HoVer training step under bf16 autocast took 2.4x longer than in float32
    (0.560 s against 0.230 s, ``benchmarks/bench_training.py``, RESULTS.md). So the CPU flags
    decide on Linux, oneDNN elsewhere.
    """
    flags = _cpu_flags(cpuinfo)
    if flags is not None:
        return bool(flags & BF16_CPU_FLAGS)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _auto_amp(device: torch.device) -> bool:
    """Mixed precision by default on CUDA, and on a CPU with native bfloat16: there bf16
    autocast ran 1.3x faster per lite step than float32 (benchmarks/bench_training.py)."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())


def _autocast(device: torch.device, amp: bool):
    if device.type == "cuda" and amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype
    if device.type == "cpu" and amp:
        return torch.autocast("cpu", dtype=torch.bfloat16), torch.bfloat16
    return torch.autocast(device.type, enabled=False), torch.float32


def _epoch_batches(n_items: int, batch_size: int, seed: int, epoch: int, ddp: _Distributed):
    """This process's batches of one epoch: a seeded permutation, sharded over the ranks."""
    order = np.random.default_rng([seed, epoch]).permutation(n_items)
    if ddp.active:  # equal shares, so every rank takes the same number of steps
        per_rank = n_items // ddp.world_size
        order = order[ddp.rank :: ddp.world_size][:per_rank]
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:  # never a batch of one: BatchNorm needs two
        batches.pop()
    return batches


def _adamw(model: nn.Module, config: TrainConfig, *, fused: bool = True) -> torch.optim.AdamW:
    """The paper's optimiser, AdamW, with the update of all parameters fused into one kernel where
    this PyTorch supports it on their device (CUDA; CPUs since PyTorch 2.4): the same update in
    one pass over memory instead of a dozen, 4-7 % off a `lite` HoVer step on a 2-core CPU
    (``benchmarks/bench_training.py``)."""
    parameters = list(model.parameters())
    if fused:
        try:
            return torch.optim.AdamW(
                parameters, lr=config.lr, weight_decay=config.weight_decay, fused=True
            )
        except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device here
            pass
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)


def _learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    if config.lr_schedule == "step":
        lr = config.lr * config.lr_gamma ** sum(progress >= m for m in config.lr_milestones)
    elif config.lr_schedule == "linear":
        lr = config.lr * (1.0 - progress)
    else:  # cosine
        lr = config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.warmup_steps and step < config.warmup_steps:
        lr *= (step + 1) / config.warmup_steps
    return lr


def _samples_of(data, name: str):
    from cellseg_lite import datasets

    if isinstance(data, str | os.PathLike):
        return datasets.find_pairs(data)
    samples = list(data)
    if not samples:
        raise CellSegError(f"{name}: no labelled images")
    return samples


def train_stream(
    samples,
    config: TrainConfig | None = None,
    *,
    val=None,
    out: str | os.PathLike | None = None,
    init: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    categories: Sequence[int] | None = None,
    steps: int | None = None,
    session_minutes: float | None = None,
    tune_thresholds: bool = True,
    device: str | torch.device | None = None,
    distributed: bool | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, History], None] | None = None,
) -> tuple[nn.Module, History]:
    """Train one stream on labelled images; return ``(model, history)`` and write ``out``.

    ``samples``: a challenge-layout folder or a list of :class:`cellseg_lite.datasets.Sample`;
    ``val``: the same for validation (whole images, challenge F1 every ``config.val_every``
    epochs; the best epoch's weights are kept and, with ``tune_thresholds``, the post-processing
    thresholds that maximise validation F1 are stored with them (:func:`best_thresholds`: the
    probability threshold, and HoVer's marker threshold, size floors and least marker probability). With ``config.ema_decay`` the moving average of the weights is
    what is validated, kept and returned; the resume state holds the raw weights and the average. ``config``: a
    :class:`TrainConfig` (default: :func:`default_preset`). ``out``: the checkpoint, rewritten
    atomically after every epoch, so a stopped run can continue with ``resume=out``.
    ``init``: start from a pre-trained checkpoint's weights (fine-tuning; another architecture is
    refused). ``categories``: the low-level classes this model is for, stored in the checkpoint.
    ``steps``: stop this session after so many optimisation steps (like ``config.minutes``, a
    budget: the checkpoint can be resumed); ``session_minutes`` the same in minutes of this session
    (a probe run, continued later with ``resume=out``; a resumed run may get a new
    ``config.minutes``, and its learning-rate schedule then follows the new budget). Under ``torchrun`` (or ``distributed=True``) each
    process trains on its share of every epoch with DistributedDataParallel; only rank 0
    validates and writes ``out``. The model returned is in eval mode, with the best weights.
    """
    from tqdm.auto import tqdm

    from cellseg_lite import datasets

    config = config or preset(default_preset())
    if not isinstance(config, TrainConfig):
        raise CellSegError(f"config: expected a TrainConfig, got {type(config).__name__}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise CellSegError(f"steps: expected a positive integer or None, got {steps!r}")
    if session_minutes is not None and (
        isinstance(session_minutes, bool)
        or not isinstance(session_minutes, int | float)
        or not session_minutes > 0
    ):
        raise CellSegError(
            f"session_minutes: expected a positive number or None, got {session_minutes!r}"
        )
    if init is not None and resume is not None:
        raise CellSegError("init and resume: give one of them (resume already holds the weights)")
    device = resolve_device(device)
    ddp = _setup_distributed(distributed, device)
    if ddp.active and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    train_samples = _samples_of(samples, "samples")
    val_images = _load_val(_samples_of(val, "val")) if val is not None else []

    augment = None
    if config.augment:
        from cellseg_lite import augment as augment_module

        augment = augment_module.Augment()
    patches = datasets.PatchDataset(
        train_samples,
        config.patch_size,
        patches_per_image=config.patches_per_image,
        seed=config.seed,
        transform=augment,
    )
    if config.patch_sampling == "size":  # decodes every image once; the cache keeps them
        shapes = [patches.load(index)[1].shape for index in range(len(train_samples))]
        patches.repeats = datasets.size_repeats(shapes)
    data = StreamDataset(
        patches, config.stream, config.n_rays, config.contact_weight, config.hover_cores
    )
    if config.num_workers:  # decode every image once here: forked workers inherit the cache
        for index in range(len(train_samples)):
            patches.load(index)
    if len(data) // ddp.world_size < 2:
        raise CellSegError(
            f"samples: {len(data)} patch(es) per epoch for {ddp.world_size} process(es); "
            "BatchNorm needs at least two per process (more images or patches_per_image)"
        )

    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        # weights from a checkpoint replace the ImageNet ones: no need to fetch them
        model = build_model(config, pretrained=False if (init or resume) else None)
    history = History()
    start_epoch, start_batch = 0, 0
    best_state, best_f1 = None, -1.0
    thresholds = _default_thresholds(config.stream)
    elapsed_before = 0.0
    resume_state = None
    if resume is not None:
        saved = _read_checkpoint(Path(resume), "cpu")
        _check_compatible(TrainConfig.from_dict(saved["config"], resume), config, resume)
        resume_state = saved.get("resume")
        if not resume_state:
            raise CellSegError(f"{where(Path(resume))}: holds no resume state (a finished export?)")
        _load_state(model, resume_state["model"], resume)
        history = History.from_dict(saved.get("history"))
        start_epoch, start_batch = resume_state["epoch"], resume_state["batch"]
        elapsed_before = float(resume_state.get("elapsed", 0.0))
        best_f1 = float(resume_state.get("best_f1", -1.0))
        best_state = saved["state_dict"] if best_f1 >= 0 else None
        thresholds = dict(saved.get("thresholds") or thresholds)
        categories = saved.get("categories") if categories is None else categories
    elif init is not None:
        pre = _read_checkpoint(Path(init), "cpu")
        _check_compatible(TrainConfig.from_dict(pre["config"], init), config, init)
        _load_state(model, pre["state_dict"], init)

    amp = _auto_amp(device) if config.amp is None else bool(config.amp)
    channels_last = amp if config.channels_last is None else config.channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    optimizer = _adamw(model, config)
    ema = None
    if config.ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True
        )
        if resume_state is not None and resume_state.get("ema"):
            _load_state(ema, resume_state["ema"], resume)
    autocast, amp_dtype = _autocast(device, amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        if resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
    net = model
    if ddp.active:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index or 0] if device.type == "cuda" else None
        )

    budget = None if config.minutes is None else 60.0 * config.minutes
    total_steps_hint = config.epochs * max(
        len(_epoch_batches(len(data), config.batch_size, 0, 0, ddp)), 1
    )
    started = time.perf_counter()
    session_steps, session_patches = 0, 0
    is_main = ddp.rank == 0
    bar = tqdm(
        total=None if budget else total_steps_hint,
        initial=history.steps,
        desc=f"{config.stream} ({config.preset})",
        unit="step",
        disable=not (progress and is_main),
    )

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    def deployed() -> nn.Module:
        """The weights that are validated and exported: the moving average, if there is one."""
        return model if ema is None else ema.module

    def run_progress(step: int) -> float:
        by_steps = step / total_steps_hint
        return max(by_steps, elapsed() / budget) if budget else by_steps

    def save(position: tuple[int, int]) -> None:
        if out is None or not is_main:
            return
        history.seconds = elapsed()
        resume_payload = {
            "model": _model_state(model),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "epoch": position[0],
            "batch": position[1],
            "elapsed": elapsed(),
            "best_f1": best_f1,
            # the average with its step count (AveragedModel.n_averaged), not only its weights
            "ema": None if ema is None else _cpu_copy(ema.state_dict()),
        }
        save_checkpoint(
            out,
            model,
            config,
            thresholds=thresholds,
            categories=categories,
            history=history,
            resume=resume_payload,
            state_dict=best_state,
        )

    position = (start_epoch, start_batch)
    try:
        for epoch in range(start_epoch, config.epochs):
            data.set_epoch(epoch)
            batches = _epoch_batches(len(data), config.batch_size, config.seed, epoch, ddp)
            skip = start_batch if epoch == start_epoch else 0
            loader = torch.utils.data.DataLoader(
                data,
                batch_sampler=batches[skip:],
                num_workers=config.num_workers,
                pin_memory=device.type == "cuda",
            )
            net.train()
            if config.freeze_batchnorm:
                _freeze_batchnorm(net)
            losses, batch_index, stop = [], skip, False
            for batch in loader:
                x = batch["image"].to(device, non_blocking=True)
                x = x.contiguous(memory_format=memory_format)
                targets = {
                    k: v.to(device, non_blocking=True)
                    for k, v in batch.items()
                    if k in _TARGET_KEYS
                }
                lr = _learning_rate(config, history.steps, run_progress(history.steps))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast:
                    outputs = net(x)
                loss = _loss(config, outputs, targets)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if ema is not None:
                    ema.update_parameters(model)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise CellSegError(
                        f"training diverged: loss {value} at step {history.steps} "
                        f"(lr {lr:g}); lower the learning rate or check the data"
                    )
                losses.append(value)
                history.step_loss.append(value)
                history.lr.append(lr)
                history.steps += 1
                batch_index += 1
                session_steps += 1
                session_patches += len(x) * ddp.world_size
                rate = session_patches / max(time.perf_counter() - started, 1e-9)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}", patches_s=f"{rate:.1f}")
                stop = (
                    (budget is not None and elapsed() > budget)
                    or (steps is not None and session_steps >= steps)
                    or (
                        session_minutes is not None
                        and time.perf_counter() - started > 60.0 * session_minutes
                    )
                )
                if ddp.active:  # every rank stops at the same step
                    flag = torch.tensor([float(stop)], device=device)
                    torch.distributed.all_reduce(flag)
                    stop = bool(flag.item() > 0)
                if stop:
                    break
            if losses:
                history.epoch_loss.append(float(np.mean(losses)))
            epoch_done = batch_index >= len(batches)
            position = (epoch + 1, 0) if epoch_done else (epoch, batch_index)
            if epoch_done:
                history.epochs = epoch + 1
                due = (epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs
                if val_images and is_main and due:
                    f1, _ = evaluate_stream(
                        deployed(), config.stream, val_images, thresholds, **_PLAIN_MAPS
                    )
                    history.val_f1.append((epoch + 1, f1))
                    if f1 > best_f1:
                        best_f1, history.best_epoch, history.best_f1 = f1, epoch + 1, f1
                        best_state = _model_state(deployed())
                if on_epoch is not None and is_main:
                    on_epoch(epoch, history)
            if stop:
                history.stopped_early = True
                break
            save(position)
    finally:
        bar.close()

    history.patches_per_second = session_patches / max(time.perf_counter() - started, 1e-9)
    if ddp.active:
        averaged = [] if ema is None else list(ema.module.buffers())
        for buffer in [*model.buffers(), *averaged]:  # BatchNorm statistics: rank 0's everywhere
            torch.distributed.broadcast(buffer.data, src=0)
    last_state, export = None, None  # export: the weights returned, if not the last raw ones
    if val_images and is_main:
        if best_state is None:  # no validation ran yet (a short budget): score the last weights
            f1, _ = evaluate_stream(
                deployed(), config.stream, val_images, thresholds, **_PLAIN_MAPS
            )
            history.val_f1.append((history.epochs, f1))
            best_f1, history.best_epoch, history.best_f1 = f1, history.epochs, f1
            best_state = _model_state(deployed())
        export = best_state
    elif ema is not None and not val_images:  # nothing to choose from: the last average
        export = best_state = _model_state(ema.module)
    if export is not None:
        last_state = _model_state(model)
        model.load_state_dict(export)
        if val_images and is_main and tune_thresholds:
            history.best_f1, thresholds = best_thresholds(
                model, config.stream, val_images, **map_options(config)
            )
    history.thresholds = dict(thresholds)
    if last_state is not None:  # the resume state continues from the last weights, not the best
        best_state = _model_state(model)  # a copy: load_state_dict writes into the same tensors
        model.load_state_dict(last_state)
        save(position)
        model.load_state_dict(best_state)
    else:
        save(position)
    if ddp.initialised_here:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    model.eval()
    return model, history


# --------------------------------------------------------------------------- 6. the whole method


#: Shares of a multi-stream time budget: the router, the pre-training of the two streams on every
#: image (0.67 together, split between the streams by the images their classes hold, at least a
#: fifth each) and the per-class fine-tuning (a quarter of it per class; a class that is not
#: fine-tuned, for want of images or with ``fine_tune=False``, hands its quarter to pre-training).
#: The router's 12 `lite` epochs take a fraction of its share; pre-training gets the rest.
BUDGET_SHARES = {"router": 0.08, "stardist": 0.52, "hover": 0.15, "fine_tune": 0.25}
#: The fewest selection images of a class on which :func:`train_multistream` fine-tunes that class
#: and tunes its own thresholds. On three images both decisions are coin tosses: in
#: ``benchmarks/bench_quality.py`` a class kept a fine-tuned model, or thresholds of its own, that
#: lost 0.10-0.15 F1 on that class's held-out synthetic images against the pre-trained model with
#: the thresholds of all selection images. A class below it keeps the pre-trained model as it is.
MIN_SELECTION_IMAGES = 5
#: The share of each class's labelled images that :func:`train_multistream` holds out for
#: selection (validation F1, thresholds, keep-or-drop) when no ``val`` is given.
VAL_FRACTION = 0.12
#: Under the validated routing, the share of the pre-training budget that each stream trains for
#: before the selection images choose between them (the winners share the rest).
VALIDATION_PROBE = 0.2


def router_settings(preset_name: str) -> dict:
    """Keyword arguments of :func:`cellseg_lite.router.train_router` for a preset: the paper's
    (224-pixel crops, SGD 1e-3, 20 epochs) or, for ``lite``/``fast``, 64-pixel crops with SGD 1e-2
    (the settings of ``benchmarks/bench_router.py``: 100% on real-mini val in 7 CPU minutes)."""
    from cellseg_lite.router import Preprocessing

    if preset_name == "paper":
        return {"pretrained": True}
    epochs = 2 if preset_name == "fast" else 12
    return {
        "preprocessing": Preprocessing(resize=80, crop=64),
        "epochs": epochs,
        "batch_size": 32,
        "lr": 0.01,
        "step_size": 5,
    }


class Stage(NamedTuple):
    """One training stage of :func:`train_multistream`, for its report."""

    name: str
    seconds: float
    val_f1: float
    kept: bool
    detail: str


def _split_for_selection(samples, categories, fraction: float, seed: int):
    """Hold out ``fraction`` of each class (at least one image where a class has three or more)."""
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in range(4):
        members = [i for i, k in enumerate(categories) if k == c]
        rng.shuffle(members)
        n_val = int(round(fraction * len(members)))
        if len(members) >= 3:
            n_val = max(n_val, 1)
        val_idx += members[:n_val]
        train_idx += members[n_val:]
    pick = lambda idx: ([samples[i] for i in sorted(idx)], [categories[i] for i in sorted(idx)])  # noqa: E731
    return pick(train_idx), pick(val_idx)


def _sample_categories(samples) -> list[int]:
    from cellseg_lite import io
    from cellseg_lite.categorize import low_level_category

    return [
        low_level_category(io.read_image(s.image_path), io.read_labels(s.label_path))
        for s in samples
    ]


def fine_tune_config(
    base: TrainConfig, stream: str, category: int, n_images: int, minutes: float | None, seed: int
) -> TrainConfig:
    """The settings :func:`train_multistream` fine-tunes ``stream`` with on the ``n_images``
    training images of class ``category``: a third of the learning rate, no warm-up, about 32
    patches per epoch, and BatchNorm statistics frozen (one class's batches would replace the
    running statistics of all classes' data; ``benchmarks/bench_finetune.py``)."""
    return base.replace(
        stream=stream,
        minutes=minutes,
        lr=base.lr / 3,
        warmup_steps=0,
        freeze_batchnorm=True,
        seed=seed + 1 + category,
        patches_per_image=max(1, 32 // n_images),
    )


def train_multistream(
    data,
    out: str | os.PathLike,
    *,
    preset_name: str | None = None,
    minutes: float | None = None,
    routing: str | dict = "paper",
    val=None,
    val_fraction: float = VAL_FRACTION,
    fine_tune: bool = True,
    min_selection_images: int = MIN_SELECTION_IMAGES,
    pretrained: bool | None = None,
    changes: dict | None = None,
    work_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
):
    """Train the whole method and write the segmenter to ``out``; return ``(segmenter, stages)``.

    The paper's recipe (paper-notes section 8): categorise every labelled image with the 4-way
    rule; train the router on those classes; pre-train the StarDist and HoVer streams on all
    images; fine-tune the pre-trained model of each class's stream on that class's images. Each
    fine-tuned model is kept only if it beats the pre-trained one on that class's validation
    images (the challenge F1), and each model's post-processing thresholds are tuned there.
    A class with fewer than ``min_selection_images`` validation images (or any class with
    ``fine_tune=False``) is not fine-tuned and keeps the pre-trained model with the thresholds
    tuned on all validation images; its share of the fine-tuning budget goes to pre-training.
    ``data``: a folder, a list of folders or a list of :class:`~cellseg_lite.datasets.Sample`.
    ``val``: validation images in the same forms; by default ``val_fraction`` of each class is
    held out of ``data``. ``minutes``: a total time budget shared as :data:`BUDGET_SHARES`,
    the router's unused minutes going to pre-training (``None``: each stage runs its preset's
    epochs). ``routing``: ``"paper"``, ``"code"`` or
    ``"hover"`` (:data:`cellseg_lite.infer.ROUTINGS`), ``"validated"`` or a table
    ``{class: stream}``. ``pretrained`` overrides the preset's ImageNet encoder weights;
    ``changes`` any other setting of the preset (``{"epochs": 6, "lr": 2e-3}``).
    ``work_dir`` keeps every stage's checkpoint.
    ``log(message)`` receives one line per stage.
    """
    import tempfile

    from cellseg_lite import datasets, infer
    from cellseg_lite import router as router_module

    preset_name = preset_name or default_preset()
    base = preset(preset_name, **(changes or {}))
    if pretrained is not None:
        base = base.replace(pretrained=bool(pretrained))
    validated = routing == "validated"
    # "validated": both streams are pre-trained; each class then goes to the better one
    routing_table = infer._check_routing("paper" if validated else routing)
    if minutes is not None and (
        isinstance(minutes, bool) or not isinstance(minutes, int | float) or not minutes > 0
    ):
        raise CellSegError(f"minutes: expected a positive number or None, got {minutes!r}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CellSegError(
            "train_multistream runs in one process; under torchrun train each stream with "
            "train.train_stream (DistributedDataParallel, see chapter 7) and build the segmenter "
            "from the checkpoints"
        )
    min_selection_images = positive_int(min_selection_images, "min_selection_images")
    say = log or (lambda message: None)
    folders = [data] if isinstance(data, str | os.PathLike) else list(data)
    samples = []
    for item in folders:
        samples += datasets.find_pairs(item) if isinstance(item, str | os.PathLike) else [item]
    if len(samples) < 4:
        raise CellSegError(f"data: {len(samples)} labelled image(s); the method needs at least 4")
    categories = _sample_categories(samples)
    if val is None:
        (samples, categories), (val_samples, val_categories) = _split_for_selection(
            samples, categories, val_fraction, seed
        )
    else:
        val_folders = [val] if isinstance(val, str | os.PathLike) else list(val)
        val_samples = []
        for item in val_folders:
            val_samples += (
                datasets.find_pairs(item) if isinstance(item, str | os.PathLike) else [item]
            )
        val_categories = _sample_categories(val_samples)
    say(
        f"{len(samples)} training and {len(val_samples)} validation images; classes "
        f"{np.bincount(categories, minlength=4).tolist()} / "
        f"{np.bincount(val_categories, minlength=4).tolist()}"
    )
    device = resolve_device(device)
    scratch = None
    if work_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="cellseg-lite-")
        work_dir = scratch.name
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    stages: list[Stage] = []

    val_by_class = {
        c: [s for s, k in zip(val_samples, val_categories, strict=True) if k == c] for c in range(4)
    }
    # fine-tuning needs training images of the class and enough selection images to judge it
    tunable = [
        c
        for c in range(4)
        if fine_tune
        and sum(k == c for k in categories) >= 2
        and len(val_by_class[c]) >= min_selection_images
    ]
    untuned = [c for c in range(4) if 0 < len(val_by_class[c]) < min_selection_images]
    if fine_tune and untuned:
        say(
            f"not fine-tuned: class(es) {untuned}, fewer than {min_selection_images} selection "
            f"images ({[len(val_by_class[c]) for c in untuned]})"
        )

    # The pre-training budget follows the data: each stream gets a share in proportion to the
    # images of the classes it serves (at least a fifth, so that a rare class still gets a model).
    served = {
        stream: sum(routing_table[c] == stream for c in categories) / len(categories)
        for stream in set(routing_table.values())
    }
    weight = {stream: max(fraction, 0.2) for stream, fraction in served.items()}
    fine_tune_per_class = BUDGET_SHARES["fine_tune"] / 4
    pretrain_share = (
        BUDGET_SHARES["stardist"]
        + BUDGET_SHARES["hover"]
        + fine_tune_per_class * (4 - len(tunable))
    )
    shares = dict(BUDGET_SHARES, fine_tune=fine_tune_per_class)
    for stream in ("stardist", "hover"):
        shares[stream] = pretrain_share * weight.get(stream, 0.0) / sum(weight.values())

    def share(name: str) -> float | None:
        return None if minutes is None else minutes * shares[name]

    # 1. the router
    started = time.perf_counter()
    val_pair = ([s.image_path for s in val_samples], val_categories) if val_samples else None
    the_router, router_history = router_module.train_router(
        [s.image_path for s in samples],
        categories,
        val=val_pair,
        minutes=share("router"),
        device=device,
        seed=seed,
        progress=progress,
        **router_settings(preset_name),
    )
    accuracy = max(router_history.val_accuracy) if val_pair else float("nan")
    stages.append(Stage("router", time.perf_counter() - started, accuracy, True, "val accuracy"))
    say(f"router: {stages[-1].seconds:.0f} s, validation accuracy {accuracy:.3f}")
    if minutes is not None:
        # the router usually converges in a fraction of its share, and pre-training is where
        # more minutes pay (its validation F1 still rises at the end of a CPU budget): the
        # streams get what the router left, in proportion to their shares
        unused = max(share("router") - stages[-1].seconds / 60, 0.0) / minutes
        for stream in ("stardist", "hover"):
            shares[stream] += unused * shares[stream] / pretrain_share
        pretrain_share += unused

    # 2. pre-training of each stream that the routing uses, on every image
    pretrained: dict[str, Checkpoint] = {}
    configs: dict[str, TrainConfig] = {}

    def pretrain(stream: str, config: TrainConfig, name: str, **session) -> None:
        started = time.perf_counter()
        path = work_dir / f"{stream}_all.pt"
        train_stream(
            samples,
            config,
            val=val_samples or None,
            out=path,
            categories=list(range(4)),
            device=device,
            progress=progress,
            **session,
        )
        pretrained[stream] = load_checkpoint(path, device=device)
        configs[stream] = config
        f1 = float(pretrained[stream].history.get("best_f1", float("nan")))
        thresholds = str(pretrained[stream].thresholds)
        stages.append(Stage(name, time.perf_counter() - started, f1, True, thresholds))
        say(f"{name}: {stages[-1].seconds:.0f} s, validation F1 {f1:.3f}")

    pretrain_minutes = None if minutes is None else minutes * pretrain_share
    if not validated:
        for stream in ("stardist", "hover"):
            if stream in routing_table.values():
                config = base.replace(stream=stream, minutes=share(stream), seed=seed)
                pretrain(stream, config, f"{stream} on all")
    else:
        # A race (successive halving with two runners): both streams train for a probe of the
        # budget, the selection images of each class choose between them, and only the streams
        # that won a class continue, each resuming its own run. Streams learn at very different
        # rates per CPU-minute, so an equal split would waste half the budget on the loser.
        probe = None if minutes is None else pretrain_minutes * VALIDATION_PROBE
        for stream in ("stardist", "hover"):
            # the budget the stream would reach if it won every class: the probe follows the
            # learning-rate schedule's first stage, so continuing it is seamless
            config = base.replace(
                stream=stream,
                seed=seed,
                minutes=None if minutes is None else pretrain_minutes - probe,
            )
            if minutes is None:  # no budget: the probe is a fifth of the preset's epochs
                config = config.replace(epochs=max(1, round(base.epochs * VALIDATION_PROBE)))
            pretrain(stream, config, f"{stream} probe", session_minutes=probe)

    # 2b. the validated routing: per class, the pre-trained stream with the higher F1 there
    class_scores: dict[int, dict[str, tuple[float, dict]]] = {}
    if validated:
        started = time.perf_counter()
        overall_f1 = {
            k: float(np.nan_to_num(ckpt.history.get("best_f1", 0.0)))
            for k, ckpt in pretrained.items()
        }
        class_images = {c: _load_val(val_by_class[c]) for c in range(4) if val_by_class[c]}
        for c, images in class_images.items():
            class_scores[c] = {
                stream: best_thresholds(ckpt.model, stream, images, **map_options(ckpt.config))
                for stream, ckpt in pretrained.items()
            }
            # a tie (say 0 against 0 after a short probe) goes to the better stream overall
            routing_table[c] = max(
                class_scores[c],
                key=lambda k: (class_scores[c][k][0], overall_f1[k]),
            )
        wins = [routing_table[c] for c in class_scores]
        overall = max(("stardist", "hover"), key=wins.count) if wins else None
        for c in range(4):
            if c not in class_scores and overall is not None:
                routing_table[c] = overall  # no images to decide on: the stream that won most
        detail = ", ".join(
            f"class {c}: {routing_table[c]} ("
            + ", ".join(f"{k} {v[0]:.3f}" for k, v in scores.items())
            + ")"
            for c, scores in class_scores.items()
        )
        stages.append(Stage("routing by validation", time.perf_counter() - started,
                            float("nan"), True, detail))  # fmt: skip
        say(f"routing by validation: {detail}")
        winners = [s for s in ("stardist", "hover") if s in routing_table.values()]
        spent = sum(st.seconds for st in stages if st.name.endswith(" probe")) / 60
        continued = set()
        for stream in winners:
            if minutes is None:
                config = configs[stream].replace(epochs=base.epochs)
            else:  # the winners share what the probes left
                done = float(pretrained[stream].history.get("seconds", 0.0)) / 60
                left = max(pretrain_minutes - spent, 0.0) / len(winners)
                if left < 0.05:
                    continue
                config = configs[stream].replace(minutes=done + left)
            path = work_dir / f"{stream}_all.pt"
            pretrain(stream, config, f"{stream} on all (continued)", resume=path)
            continued.add(stream)
        # the probe's selection scores were of the probe's weights: score the continued ones
        for c in class_scores:
            stream = routing_table[c]
            if stream in continued:
                class_scores[c][stream] = best_thresholds(
                    pretrained[stream].model,
                    stream,
                    class_images[c],
                    **map_options(pretrained[stream].config),
                )

    # 3. fine-tuning per class, kept only where it helps that class
    models: dict[int, Checkpoint] = {c: pretrained[routing_table[c]] for c in range(4)}
    for c in tunable:
        stream = routing_table[c]
        started = time.perf_counter()
        class_samples = [s for s, k in zip(samples, categories, strict=True) if k == c]
        if c in class_scores:
            before, before_thresholds = class_scores[c][stream]
        else:
            before, before_thresholds = best_thresholds(
                pretrained[stream].model,
                stream,
                _load_val(val_by_class[c]),
                **map_options(pretrained[stream].config),
            )
        path = work_dir / f"{stream}_class{c}.pt"
        config = fine_tune_config(base, stream, c, len(class_samples), share("fine_tune"), seed)
        train_stream(
            class_samples,
            config,
            val=val_by_class[c],
            out=path,
            init=pretrained[stream].path,
            categories=[c],
            device=device,
            progress=progress,
        )
        tuned = load_checkpoint(path, device=device)
        after = float(tuned.history.get("best_f1", float("nan")))
        kept = after > before
        if kept:
            models[c] = tuned
        else:  # keep the pre-trained model, with the threshold that suits this class
            models[c] = pretrained[stream]._replace(thresholds=before_thresholds)
        stages.append(
            Stage(
                f"{stream} fine-tuned on class {c}",
                time.perf_counter() - started,
                after,
                kept,
                f"pre-trained model on this class: {before:.3f}",
            )
        )
        say(
            f"{stream} class {c}: {stages[-1].seconds:.0f} s, F1 {before:.3f} -> {after:.3f} "
            f"({'kept' if kept else 'pre-trained model kept'})"
        )

    segmenter = infer.MultiStreamSegmenter(
        the_router, models, routing=dict(routing_table) if validated else routing, device=device
    )
    if validated:
        segmenter.routing_name = "validated"
    segmenter.save(out)
    if scratch is not None:
        scratch.cleanup()
    return segmenter, stages
