"""The router: a ResNet18 that predicts the low-level class (0-3) of any image.

Lou, Yu et al. (NeurIPS 2022 Cell Segmentation Challenge, team sribd-med),
section "Low-level categorisation": the 4-way rule of :mod:`cellseg_lite.categorize`
needs instance labels (for the largest-cell cue), which a test image does not
have. A classifier trained on the rule's labels therefore decides, at test
time, which segmentation stream an image goes to. The paper uses an
ImageNet-pretrained torchvision ResNet18 with a 4-way head, trained with SGD
(lr 1e-3, momentum 0.9, step decay x0.1 every 7 epochs, 20 epochs, batch 64),
and reports 97.9% validation accuracy; the authors' released code trains it
from scratch (``weights=None``).

The pipeline from a raw image to logits (:class:`Preprocessing`):

1. any image (8/16-bit, float; one, three or more channels) goes through the
   challenge normalisation :func:`cellseg_lite.io.normalize_image`, giving
   ``(H, W, 3)`` uint8;
2. the short side is resized to ``resize`` (256) pixels, keeping the aspect
   ratio (torchvision ``Resize(256)``, antialiased): small images are enlarged,
   large ones shrunk. Training caches this uint8 image once;
3. training only: ``RandomResizedCrop(256, scale=(0.8, 1))`` (a random crop of
   80-100% of the area, aspect ratio 3/4-4/3, resized to a 256 x 256 square),
   ``RandomRotation(15)``, a horizontal flip with probability 0.5;
4. ``CenterCrop(224)``: a very elongated image is seen through its central
   square only;
5. uint8 -> float in [0, 1] (divided by 255), then ImageNet mean/std.

The router works on resized images, so it cannot measure the absolute cell
area that separates class 2 from class 3: it learns what such images look
like (brightfield smears against tissue), as the paper's router does.

Class 0 is defined by the channel count alone. :class:`Router` applies that
rule exactly (``channel_rule=True``, the default): a one-channel input is
class 0 with probability 1 and never reaches the network; the network decides
the others. ``channel_rule=False`` gives the paper's router, which must tell a
one-channel phase-contrast image from a gray RGB one by appearance.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from cellseg_lite._checks import as_image, load_torch_file, positive_int, resolve_device
from cellseg_lite._errors import CellSegError, where

__all__ = [
    "CHECKPOINT_FORMAT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NUM_CLASSES",
    "Preprocessing",
    "Router",
    "RouterPrediction",
    "TrainingHistory",
    "balanced_sample_weights",
    "build_router",
    "checkpoint_dict",
    "class_weights",
    "from_checkpoint_dict",
    "load_router",
    "predict",
    "predict_batch",
    "save_router",
    "train_router",
]

NUM_CLASSES = 4
#: ImageNet channel statistics (torchvision's), used with and without pretrained weights.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: The ``format`` entry of a router checkpoint, and the layout version it follows.
CHECKPOINT_FORMAT = "cellseg-lite router"
_CHECKPOINT_LAYOUT = 1


# ----------------------------------------------------------------------------- the network


def build_router(pretrained: bool = False, *, num_classes: int = NUM_CLASSES) -> nn.Module:
    """torchvision's ResNet18 with its ``fc`` layer replaced by a ``num_classes``-way Linear.

    Input ``(B, 3, 224, 224)`` float (any size from 32 x 32 works: the network
    ends in global average pooling), output ``(B, num_classes)`` logits.
    ``pretrained=True`` loads ``ResNet18_Weights.IMAGENET1K_V1`` (the paper's
    choice) and falls back to random initialisation with a
    :class:`~cellseg_lite._weights.PretrainedWeightsWarning` when offline.
    """
    from torchvision.models import ResNet18_Weights, resnet18

    from cellseg_lite._weights import build_with_pretrained

    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise CellSegError(f"num_classes: expected an integer >= 2, got {num_classes!r}")

    def build(with_weights: bool) -> nn.Module:
        model = resnet18(weights=ResNet18_Weights.IMAGENET1K_V1 if with_weights else None)
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model

    return build_with_pretrained(build, "router (ResNet18)", pretrained)


# ----------------------------------------------------------------------------- preprocessing


def _three_floats(value, name: str) -> tuple[float, float, float]:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise CellSegError(f"{name}: expected three numbers (R, G, B), got {value!r}") from err
    if len(numbers) != 3 or not all(math.isfinite(v) for v in numbers):
        raise CellSegError(f"{name}: expected three finite numbers (R, G, B), got {value!r}")
    return numbers  # type: ignore[return-value]


@dataclass(frozen=True)
class Preprocessing:
    """What happens to an image between the file and the network (see the module docstring).

    ``resize`` is the short side after resizing, ``crop`` the side of the
    central square the network sees (``crop <= resize``), ``mean``/``std`` the
    per-channel statistics applied to [0, 1] values. ``scale``, ``rotation``
    (degrees) and ``flip`` (probability) are the training augmentations. The
    defaults are the paper's; a CPU run may use e.g. ``resize=80, crop=64``.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    scale: tuple[float, float] = (0.8, 1.0)
    rotation: float = 15.0
    flip: float = 0.5
    normalisation: str = field(default="challenge", init=False)

    def __post_init__(self):
        resize = positive_int(self.resize, "resize")
        crop = positive_int(self.crop, "crop")
        if crop > resize:
            raise CellSegError(f"crop: must not exceed resize ({resize}), got {crop}")
        if crop < 32:
            raise CellSegError(f"crop: ResNet18 needs at least 32 pixels, got {crop}")
        mean = _three_floats(self.mean, "mean")
        std = _three_floats(self.std, "std")
        if min(std) <= 0:
            raise CellSegError(f"std: must be positive, got {std}")
        try:
            low, high = (float(v) for v in self.scale)
        except (TypeError, ValueError) as err:
            raise CellSegError(f"scale: expected two numbers, got {self.scale!r}") from err
        if not 0 < low <= high <= 1:
            raise CellSegError(f"scale: need 0 < low <= high <= 1, got ({low}, {high})")
        rotation, flip = float(self.rotation), float(self.flip)
        if not 0 <= rotation <= 180:
            raise CellSegError(f"rotation: expected degrees in [0, 180], got {rotation}")
        if not 0 <= flip <= 1:
            raise CellSegError(f"flip: expected a probability in [0, 1], got {flip}")
        for name, value in [
            ("resize", resize),
            ("crop", crop),
            ("mean", mean),
            ("std", std),
            ("scale", (low, high)),
            ("rotation", rotation),
            ("flip", flip),
        ]:
            object.__setattr__(self, name, value)

    def cache(self, image: np.ndarray, source: str | os.PathLike | None = "image") -> torch.Tensor:
        """Steps 1-2: a raw ``(H, W)``/``(H, W, C)`` image to a ``(3, h, w)`` uint8 tensor, short side ``resize``."""
        from torchvision.transforms.v2 import functional as F

        from cellseg_lite.io import normalize_image

        rgb = normalize_image(image, source=source)
        tensor = torch.from_numpy(rgb).permute(2, 0, 1)
        return F.resize(tensor, [self.resize], antialias=True).contiguous()

    def eval_transform(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Steps 4-5 on a cached uint8 ``(3, h, w)`` tensor: ``(3, crop, crop)`` float32."""
        from torchvision.transforms import v2

        return v2.Compose(
            [
                v2.CenterCrop(self.crop),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(self.mean), list(self.std)),
            ]
        )

    def train_transform(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Steps 3-5 on a cached uint8 ``(3, h, w)`` tensor: random ``(3, crop, crop)`` float32.

        Draws from torch's global random generator, which :func:`train_router`
        seeds inside ``torch.random.fork_rng`` (the caller's state is restored).
        """
        from torchvision.transforms import v2

        return v2.Compose(
            [
                v2.RandomResizedCrop(self.resize, scale=self.scale, antialias=True),
                v2.RandomRotation(self.rotation),
                v2.RandomHorizontalFlip(self.flip),
                v2.CenterCrop(self.crop),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(self.mean), list(self.std)),
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (stored in checkpoints, loadable with ``weights_only=True``)."""
        out = asdict(self)
        out.update(mean=list(self.mean), std=list(self.std), scale=list(self.scale))
        out["normalisation_rule"] = (
            "io.normalize_image: 1 channel repeated to 3, more than 3 -> first 3; per channel, "
            "1st-99th percentile of the non-zero pixels rescaled to 0..255 (uint8)"
        )
        return out

    @classmethod
    def from_dict(cls, settings: dict, source: str | os.PathLike | None = None) -> Preprocessing:
        """Inverse of :meth:`to_dict`; unknown or missing entries raise a CellSegError."""
        keys = ("resize", "crop", "mean", "std", "scale", "rotation", "flip")
        if not isinstance(settings, dict) or any(k not in settings for k in keys):
            raise CellSegError(f"{where(source)}: preprocessing settings are missing or incomplete")
        if settings.get("normalisation", "challenge") != "challenge":
            raise CellSegError(
                f"{where(source)}: unknown image normalisation {settings['normalisation']!r}"
            )
        return cls(**{k: settings[k] for k in keys})


# ----------------------------------------------------------------------------- prediction


class RouterPrediction(NamedTuple):
    """The routed class of one image and the ``(4,)`` class probabilities behind it."""

    category: int
    probabilities: np.ndarray


def _read(item, source: str) -> tuple[np.ndarray, str | os.PathLike]:
    """An image given as an array or as a path: the checked array and the name errors should use."""
    if isinstance(item, str | os.PathLike):
        from cellseg_lite.io import read_image

        return read_image(item), Path(item)
    return as_image(item, source), source


def _channels(image: np.ndarray) -> int:
    return 1 if image.ndim == 2 else image.shape[2]


class Router:
    """A trained router: the network, its preprocessing and the one-channel rule, in one object.

    ``channel_rule=True`` (default) answers class 0 with probability 1 for a
    one-channel input without running the network (the 4-way rule is exact
    there); ``False`` lets the network decide every image, as in the paper.
    Use :func:`train_router` to make one and :meth:`save`/:meth:`load` to keep it.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        preprocessing: Preprocessing | None = None,
        channel_rule: bool = True,
        class_names: Sequence[str] | None = None,
        training: dict | None = None,
    ):
        from cellseg_lite.categorize import CATEGORY_NAMES

        if model is not None and not isinstance(model, nn.Module):
            raise CellSegError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if preprocessing is not None and not isinstance(preprocessing, Preprocessing):
            raise CellSegError(
                f"preprocessing: expected a router.Preprocessing, got {type(preprocessing).__name__}"
            )
        self.model = build_router() if model is None else model
        self.preprocessing = preprocessing or Preprocessing()
        self.channel_rule = bool(channel_rule)
        names = (
            [CATEGORY_NAMES[c] for c in range(NUM_CLASSES)] if class_names is None else class_names
        )
        self.class_names = [str(n) for n in names]
        self.training = {} if training is None else training

    def __repr__(self) -> str:
        p = self.preprocessing
        return (
            f"Router(ResNet18, resize={p.resize}, crop={p.crop}, channel_rule={self.channel_rule}, "
            f"device={self.device})"
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def predict(self, image, *, channel_rule: bool | None = None) -> RouterPrediction:
        """Route one raw image (array of any size, dtype and channel count, or a file path)."""
        return self._route([image], ["image"], 1, channel_rule)[0]

    def predict_batch(
        self, images: Sequence, *, batch_size: int = 32, channel_rule: bool | None = None
    ) -> list[RouterPrediction]:
        """Route many raw images (arrays or paths), ``batch_size`` at a time through the network."""
        batch_size = positive_int(batch_size, "batch_size")
        if isinstance(images, np.ndarray) or isinstance(images, str | os.PathLike):
            raise CellSegError("images: expected a sequence of images, got a single image")
        names = [f"images[{index}]" for index in range(len(images))]
        return self._route(images, names, batch_size, channel_rule)

    def _route(
        self, images: Sequence, names: list[str], batch_size: int, channel_rule: bool | None
    ) -> list[RouterPrediction]:
        rule = self.channel_rule if channel_rule is None else bool(channel_rule)
        results: list[RouterPrediction | None] = [None] * len(images)
        pending: list[tuple[int, torch.Tensor]] = []
        transform = self.preprocessing.eval_transform()
        for index, (item, name) in enumerate(zip(images, names, strict=True)):
            image, source = _read(item, name)
            if rule and _channels(image) == 1:
                results[index] = RouterPrediction(0, np.eye(NUM_CLASSES)[0])
                continue
            pending.append((index, transform(self.preprocessing.cache(image, source))))
            if len(pending) == batch_size:
                self._run(pending, results)
                pending = []
        if pending:
            self._run(pending, results)
        return results  # type: ignore[return-value]

    def _run(self, pending: list[tuple[int, torch.Tensor]], results: list) -> None:
        batch = torch.stack([x for _, x in pending]).to(self.device)
        probabilities = _probabilities(self.model, batch)
        for (index, _), p in zip(pending, probabilities, strict=True):
            results[index] = RouterPrediction(int(np.argmax(p)), p)

    def save(self, path: str | os.PathLike) -> None:
        """Write the router to one checkpoint file, atomically (see :func:`save_router`)."""
        save_router(path, self)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Router:
        """Read a router written by :meth:`save` (see :func:`load_router`)."""
        return load_router(path, device=device)


def _probabilities(model: nn.Module, batch: torch.Tensor) -> np.ndarray:
    """Softmax of the model's logits for a ``(B, 3, h, w)`` batch, in eval mode: ``(B, K)`` float64."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logits = model(batch)
    finally:
        model.train(was_training)
    return torch.softmax(logits.float(), dim=1).cpu().double().numpy()


def _as_router(model_or_router) -> Router:
    if isinstance(model_or_router, Router):
        return model_or_router
    if isinstance(model_or_router, nn.Module):
        return Router(model_or_router)
    raise CellSegError(
        f"router: expected a router.Router or a torch.nn.Module, got {type(model_or_router).__name__}"
    )


def predict(model_or_router, image, *, channel_rule: bool | None = None) -> RouterPrediction:
    """Route one raw image: its class (0-3) and the ``(4,)`` probabilities.

    ``image`` is an array ``(H, W)`` or ``(H, W, C)`` of any dtype and size, or
    a file path. A bare ``nn.Module`` is used with the paper's preprocessing
    and ``channel_rule=True`` unless ``channel_rule`` says otherwise.
    """
    return _as_router(model_or_router).predict(image, channel_rule=channel_rule)


def predict_batch(
    model_or_router, images: Sequence, *, batch_size: int = 32, channel_rule: bool | None = None
) -> list[RouterPrediction]:
    """:func:`predict` for many images, run through the network ``batch_size`` at a time."""
    return _as_router(model_or_router).predict_batch(
        images, batch_size=batch_size, channel_rule=channel_rule
    )


# ----------------------------------------------------------------------------- training


def _check_categories(
    categories, n_images: int | None = None, name: str = "categories"
) -> np.ndarray:
    """``(N,)`` int64 labels in 0..3, one per image (``n_images`` of them when given)."""
    values = np.asarray(categories)
    if values.ndim != 1:
        raise CellSegError(f"{name}: expected one class per image, got shape {values.shape}")
    if values.size and not (
        np.issubdtype(values.dtype, np.integer)
        or (np.issubdtype(values.dtype, np.floating) and np.all(values == np.round(values)))
    ):
        raise CellSegError(f"{name}: classes must be integers 0..3, got {values[:5]!r}")
    if n_images is not None and len(values) != n_images:
        raise CellSegError(f"{name}: {len(values)} classes for {n_images} images")
    if values.size and (values.min() < 0 or values.max() >= NUM_CLASSES):
        bad = values[(values < 0) | (values >= NUM_CLASSES)][0]
        raise CellSegError(f"{name}: classes must lie in 0..{NUM_CLASSES - 1}, found {bad}")
    return values.astype(np.int64)


def balanced_sample_weights(categories) -> np.ndarray:
    """Per-image sampling weights ``1 / n_c`` (``n_c`` = images of its class), ``(N,)`` float64.

    With these weights :class:`torch.utils.data.WeightedRandomSampler` draws every
    class present equally often, so a rare class (the paper's class 1: 7% of
    the challenge's training images) is seen as often as the others.
    """
    labels = _check_categories(categories)
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    return 1.0 / counts[labels]


def class_weights(categories) -> np.ndarray:
    """Loss weights ``N / (K n_c)`` per class (``K`` classes present), ``(4,)`` float64; 0 for absent classes.

    The alternative to balanced sampling: every image is seen once per epoch
    and the cross-entropy of a rare class counts more.
    """
    labels = _check_categories(categories)
    counts = np.bincount(labels, minlength=NUM_CLASSES).astype(float)
    present = counts > 0
    weights = np.zeros(NUM_CLASSES)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights


@dataclass
class TrainingHistory:
    """What :func:`train_router` did, epoch by epoch (lists of equal length) and step by step.

    ``loss``/``accuracy`` are the means over an epoch's (augmented) training
    batches, ``val_accuracy``/``val_loss`` (mean cross-entropy) are NaN without a
    validation set, ``lr`` the
    learning rate the epoch ran with; ``step_loss`` has one entry per step. An
    epoch cut short by the time budget is recorded with the steps it ran.
    """

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    prepare_seconds: float = 0.0
    stopped_early: bool = False
    best_epoch: int = -1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cache_all(images: Sequence, preprocessing: Preprocessing, name: str) -> list[torch.Tensor]:
    if isinstance(images, np.ndarray | str | os.PathLike) or not isinstance(images, Sequence):
        raise CellSegError(f"{name}: expected a list of images (arrays or paths)")
    if len(images) == 0:
        raise CellSegError(f"{name}: no images")
    cached = []
    for index, item in enumerate(images):
        image, source = _read(item, f"{name}[{index}]")
        cached.append(preprocessing.cache(image, source))
    return cached


class _Cached(torch.utils.data.Dataset):
    """Cached uint8 tensors and their classes, transformed on access (in-process, no workers)."""

    def __init__(self, tensors: list[torch.Tensor], labels: np.ndarray, transform):
        self.tensors, self.labels, self.transform = tensors, labels, transform

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, index: int):
        return self.transform(self.tensors[index]), int(self.labels[index])


def _train_step(model, optimizer, loss_fn, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """One SGD step on a batch: returns the batch loss and the number of correct predictions."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = loss_fn(logits, y)
    loss.backward()
    optimizer.step()
    return float(loss.detach()), int((logits.detach().argmax(1) == y).sum())


def _evaluate(
    model: nn.Module, tensors, labels: np.ndarray, transform, device, batch_size
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on cached images."""
    correct, cross_entropy = 0, 0.0
    for start in range(0, len(tensors), batch_size):
        batch = torch.stack([transform(t) for t in tensors[start : start + batch_size]])
        p = _probabilities(model, batch.to(device))
        truth = labels[start : start + batch_size]
        correct += int((p.argmax(1) == truth).sum())
        cross_entropy -= float(np.log(np.maximum(p[np.arange(len(truth)), truth], 1e-12)).sum())
    return correct / len(tensors), cross_entropy / len(tensors)


def train_router(
    images: Sequence,
    categories,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    momentum: float = 0.9,
    step_size: int = 7,
    gamma: float = 0.1,
    weight_decay: float = 0.0,
    balance: bool | str = True,
    val: tuple[Sequence, Any] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    pretrained: bool = False,
    minutes: float | None = None,
    preprocessing: Preprocessing | None = None,
    channel_rule: bool = True,
    progress: bool = True,
    on_epoch: Callable[[int, TrainingHistory], None] | None = None,
) -> tuple[Router, TrainingHistory]:
    """Train the router on raw images and their low-level classes; return ``(router, history)``.

    ``images`` is a list of arrays ``(H, W)``/``(H, W, C)`` or file paths,
    ``categories`` their classes 0-3 (e.g. :func:`cellseg_lite.categorize.low_level_category`).
    Each image is normalised and resized once (:meth:`Preprocessing.cache`), so
    an epoch only crops, rotates and flips cached uint8 tensors, in-process.
    Defaults are the paper's: SGD (lr 1e-3, momentum 0.9), StepLR (x``gamma``
    every ``step_size`` epochs), 20 epochs, batch 64. ``balance``: ``True`` or
    ``"sampler"`` draws classes equally often (:func:`balanced_sample_weights`),
    ``"loss"`` weights the cross-entropy instead (:func:`class_weights`),
    ``False`` neither. ``val=(images, categories)`` is scored after every
    epoch and the best epoch's weights are kept (torchvision's fine-tuning
    recipe, which the paper's settings follow): the highest accuracy and,
    among epochs tied on it, the lowest cross-entropy, since a small
    validation set is often right on every image a few epochs before the
    router stops improving. ``minutes`` stops training
    after the first step past that budget (caching not counted). Runs are
    deterministic for a given ``seed`` and number of torch threads on CPU;
    torch's global random state is left as it was. ``progress`` shows a tqdm
    bar; ``on_epoch(epoch, history)`` is called after every epoch (e.g. to
    print the loss).
    """
    from tqdm import tqdm

    epochs = positive_int(epochs, "epochs")
    batch_size = positive_int(batch_size, "batch_size")
    step_size = positive_int(step_size, "step_size")
    for name, value in [
        ("lr", lr),
        ("momentum", momentum),
        ("gamma", gamma),
        ("weight_decay", weight_decay),
    ]:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise CellSegError(f"{name}: expected a number, got {value!r}")
    if lr <= 0:
        raise CellSegError(f"lr: must be positive, got {lr}")
    if not 0 <= momentum < 1 or not 0 < gamma <= 1 or weight_decay < 0:
        raise CellSegError(
            f"momentum in [0, 1), gamma in (0, 1] and weight_decay >= 0 expected, got "
            f"momentum={momentum}, gamma={gamma}, weight_decay={weight_decay}"
        )
    if balance not in (True, False, "sampler", "loss"):
        raise CellSegError(f"balance: expected True, False, 'sampler' or 'loss', got {balance!r}")
    if minutes is not None and (
        isinstance(minutes, bool) or not isinstance(minutes, int | float) or not minutes > 0
    ):
        raise CellSegError(
            f"minutes: expected a positive number of minutes or None, got {minutes!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise CellSegError(f"seed: expected an integer, got {seed!r}")
    preprocessing = preprocessing or Preprocessing()
    device = resolve_device(device)

    started = time.perf_counter()
    tensors = _cache_all(images, preprocessing, "images")
    labels = _check_categories(categories, len(tensors))
    val_tensors = val_labels = None
    if val is not None:
        if not isinstance(val, tuple | list) or len(val) != 2:
            raise CellSegError("val: expected a pair (images, categories)")
        val_tensors = _cache_all(val[0], preprocessing, "val images")
        val_labels = _check_categories(val[1], len(val_tensors), "val categories")
    history = TrainingHistory(prepare_seconds=time.perf_counter() - started)

    generator = torch.Generator().manual_seed(int(seed))
    if balance in (True, "sampler"):
        sampler = torch.utils.data.WeightedRandomSampler(
            torch.from_numpy(balanced_sample_weights(labels)), len(labels), generator=generator
        )
    else:
        sampler = torch.utils.data.RandomSampler(range(len(labels)), generator=generator)
    loader = torch.utils.data.DataLoader(
        _Cached(tensors, labels, preprocessing.train_transform()),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=0,
        drop_last=len(labels) > batch_size,  # never a last batch of one (BatchNorm needs two)
    )
    weight = torch.from_numpy(class_weights(labels)).float() if balance == "loss" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight.to(device) if weight is not None else None)
    eval_transform = preprocessing.eval_transform()

    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(int(seed))
        model = build_router(pretrained).to(device)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
        budget = None if minutes is None else 60.0 * minutes
        best_state, best_score = None, (-1.0, -math.inf)
        loop_start = time.perf_counter()
        bar = tqdm(total=epochs * len(loader), desc="router", unit="step", disable=not progress)
        try:
            for epoch in range(epochs):
                model.train()
                lr_now = optimizer.param_groups[0]["lr"]
                losses, correct, seen = [], 0, 0
                for x, y in loader:
                    loss, hits = _train_step(model, optimizer, loss_fn, x.to(device), y.to(device))
                    losses.append(loss)
                    correct, seen = correct + hits, seen + len(y)
                    history.step_loss.append(loss)
                    history.steps += 1
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}")
                    if budget is not None and time.perf_counter() - loop_start > budget:
                        history.stopped_early = True
                        break
                scheduler.step()
                history.loss.append(float(np.mean(losses)))
                history.accuracy.append(correct / seen)
                history.lr.append(lr_now)
                if val_tensors is not None:
                    accuracy, val_loss = _evaluate(
                        model, val_tensors, val_labels, eval_transform, device, batch_size
                    )
                    # ties on accuracy (common on a small set) go to the more confident epoch
                    if (accuracy, -val_loss) > best_score:
                        best_score, history.best_epoch = (accuracy, -val_loss), epoch
                        best_state = copy.deepcopy(model.state_dict())
                    history.val_accuracy.append(accuracy)
                    history.val_loss.append(val_loss)
                else:
                    history.val_accuracy.append(float("nan"))
                    history.val_loss.append(float("nan"))
                    history.best_epoch = epoch
                if on_epoch is not None:
                    on_epoch(epoch, history)
                if history.stopped_early:
                    break
        finally:
            bar.close()
        history.seconds = time.perf_counter() - loop_start
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()

    settings = dict(
        epochs=epochs,
        batch_size=batch_size,
        lr=float(lr),
        momentum=float(momentum),
        step_size=step_size,
        gamma=float(gamma),
        weight_decay=float(weight_decay),
        balance=balance,
        seed=int(seed),
        device=str(device),
        pretrained=bool(pretrained),
        minutes=None if minutes is None else float(minutes),
        n_images=len(labels),
        class_counts=np.bincount(labels, minlength=NUM_CLASSES).tolist(),
        n_val=0 if val_labels is None else len(val_labels),
        history=history.to_dict(),
    )
    router = Router(
        model, preprocessing=preprocessing, channel_rule=channel_rule, training=settings
    )
    return router, history


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dict(router: Router) -> dict:
    """``router`` as the plain dict that :func:`save_router` writes (and the multi-stream
    segmenter embeds in its own file)."""
    from cellseg_lite import __version__

    if not isinstance(router, Router):
        raise CellSegError(f"router: expected a router.Router, got {type(router).__name__}")
    return {
        "format": CHECKPOINT_FORMAT,
        "layout": _CHECKPOINT_LAYOUT,
        "version": __version__,
        "architecture": "resnet18",
        "num_classes": NUM_CLASSES,
        "state_dict": {k: v.detach().cpu() for k, v in router.model.state_dict().items()},
        "preprocessing": router.preprocessing.to_dict(),
        "class_names": list(router.class_names),
        "channel_rule": router.channel_rule,
        "training": router.training,
    }


def save_router(path: str | os.PathLike, router: Router) -> None:
    """Write ``router`` to one file, atomically: weights, preprocessing, class names, training
    settings and the package version, in plain types that ``torch.load(weights_only=True)`` reads."""
    from cellseg_lite.io import atomic_write

    checkpoint = checkpoint_dict(router)
    with atomic_write(path) as fh:
        torch.save(checkpoint, fh)


def load_router(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Router:
    """Read a router written by :func:`save_router`; refuses other and damaged files with a CellSegError."""
    path = Path(path)
    device = resolve_device(device)
    checkpoint = load_torch_file(path, "router checkpoint", device=device)
    return from_checkpoint_dict(checkpoint, device=device, source=path)


def from_checkpoint_dict(
    checkpoint: dict, *, device: str | torch.device = "cpu", source=None
) -> Router:
    """The :class:`Router` of a :func:`checkpoint_dict`; foreign or damaged dicts raise a CellSegError
    naming ``source``."""
    device = resolve_device(device)
    path = source
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CellSegError(f"{where(path)}: is not a cellseg-lite router checkpoint")
    if checkpoint.get("layout") != _CHECKPOINT_LAYOUT:
        raise CellSegError(
            f"{where(path)}: router checkpoint layout {checkpoint.get('layout')!r} is not supported "
            f"(this version reads layout {_CHECKPOINT_LAYOUT})"
        )
    preprocessing = Preprocessing.from_dict(checkpoint.get("preprocessing"), path)
    model = build_router(num_classes=int(checkpoint.get("num_classes", NUM_CLASSES)))
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, RuntimeError, TypeError) as err:
        raise CellSegError(
            f"{where(path)}: the weights do not fit a ResNet18 router "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from err
    model.to(device).eval()
    return Router(
        model,
        preprocessing=preprocessing,
        channel_rule=bool(checkpoint.get("channel_rule", True)),
        class_names=checkpoint.get("class_names"),
        training=checkpoint.get("training") or {},
    )
