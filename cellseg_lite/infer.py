"""Inference on images of any size: sliding windows blended without seams, in bounded memory.

A network trained on 512 x 512 patches segments a 10,000-pixel whole-slide image tile by tile.
:func:`sliding_window` cuts the image into overlapping tiles (512 pixels, step 384, the authors'
StarDist setting), predicts them in batches and blends the overlaps with a Gaussian weight per
tile, so that no seam shows where tiles meet (nnU-Net's recipe, Isensee et al., Nature Methods
2021). An image that fits in memory needs no window: :class:`MultiStreamSegmenter` predicts an
image of up to :data:`WHOLE_IMAGE_SIDE` pixels a side in one forward pass
(``sliding_window(tile=None)``), where overlapping tiles would compute many pixels twice.
:func:`model_predictor` turns a stream's network into the ``predict`` function it needs;
:func:`stardist_maps` and :func:`hover_maps` give each stream's maps of a whole image.

The authors' code keeps the whole image's 33-channel StarDist map in memory: 11.7 GB of float32
for the 10496 x 8415 tuning image. :func:`stardist_instances_tiled` keeps one block's map at a
time instead: every block of the image is predicted with the tiles of the whole image's tile
grid, reduced at once to its sparse NMS candidates, and only then are all candidates suppressed
and drawn together; the labels equal those of the full map.

Contents, in reading order: tile positions and weights (:func:`tile_starts`,
:func:`blend_window`), :func:`sliding_window`, the model helpers and test-time flips and
scales (:func:`flip_averaged`, :func:`scale_averaged`), the tiled StarDist post-processing
(:func:`stardist_candidates_tiled`, :func:`stardist_instances_tiled`), and the method at
inference, :class:`MultiStreamSegmenter`: route each image to its low-level class, then segment
it with that class's stream.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Collection
from typing import NamedTuple

import numpy as np
import torch

from cellseg_lite._checks import as_image, load_torch_file
from cellseg_lite._errors import CellSegError, where
from cellseg_lite.streams import stardist as sd

__all__ = [
    "BLENDS",
    "CODE_TALL_IMAGE",
    "FLIPS",
    "GAUSSIAN_SIGMA",
    "OUTPUTS",
    "PAD_MODES",
    "ROUTINGS",
    "MIN_DIAMETER",
    "MIN_DIAMETER_STRIDE",
    "MIRROR_CONTEXT",
    "TILED_PIXELS",
    "UPSCALE",
    "UPSCALE_CLASSES",
    "TTA_MAPS",
    "WHOLE_IMAGE_SIDE",
    "HOVER_TUNED",
    "MAP_SCALES",
    "HoverCoreMaps",
    "HoverMaps",
    "MultiStreamSegmenter",
    "StarDistMaps",
    "StreamModel",
    "blend_window",
    "crop_context",
    "default_stride",
    "flip_averaged",
    "hover_maps",
    "hover_settings",
    "hover_steps",
    "inscribed_diameter",
    "map_scales_of",
    "mirror_pad",
    "scale_averaged",
    "model_predictor",
    "sliding_window",
    "split_hover_maps",
    "stardist_candidates_tiled",
    "stardist_instances_tiled",
    "stardist_maps",
    "tile_starts",
    "window",
]

#: Tile weights of :func:`sliding_window`: a Gaussian bump (seamless) or flat (a plain mean).
BLENDS = ("gaussian", "mean")
#: Padding of images smaller than a tile: mirror (falls back to ``"edge"`` where the image is too
#: small to mirror once), repeat the border pixels, or zeros.
PAD_MODES = ("reflect", "edge", "constant")
#: Standard deviation of the Gaussian tile weight, as a fraction of the tile size (nnU-Net's and
#: MONAI's 1/8): the weight at a tile's edge is exp(-8) = 3e-4 of its centre's, never 0.
GAUSSIAN_SIGMA = 1 / 8
#: How :func:`model_predictor` turns a model's output into channels (see there).
OUTPUTS = ("auto", "concat", "hover")
#: The flips of test-time augmentation (:func:`flip_averaged`), as image axes: none, rows
#: (up-down), columns (left-right), both.
FLIPS = ((), (0,), (1,), (0, 1))
#: The kinds of maps :func:`flip_averaged` knows how to flip back.
TTA_MAPS = ("stardist", "hover", "scalar")


# --------------------------------------------------------------------------- checks


def _check_int(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise CellSegError(f"{name}: expected an integer >= {low}, got {value!r}")
    return int(value)


def _check_tiling(tile, stride) -> tuple[int, int]:
    tile = _check_int(tile, "tile")
    stride = _check_int(stride, "stride")
    if stride > tile:
        raise CellSegError(
            f"stride: a step of {stride} is larger than the tile ({tile}), which would leave "
            "pixels between tiles unpredicted; use stride <= tile"
        )
    return tile, stride


def _check_choice(value, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise CellSegError(
            f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}"
        )
    return value


def _check_predict(predict) -> None:
    if not callable(predict):
        raise CellSegError(
            f"predict: expected a function from (B, C, tile, tile) tensors to (B, K, tile, tile) "
            f"maps, got {type(predict).__name__} (wrap a network with infer.model_predictor)"
        )


def _check_fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise CellSegError(f"{name}: expected a number in [0, 1], got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- tiles


def map_scales_of(scales, name: str = "map_scales") -> tuple[float, ...]:
    """``scales`` checked as the scales of :func:`scale_averaged`: distinct numbers > 0, as a
    tuple of floats in the order given.

    >>> map_scales_of([1, 1.5])
    (1.0, 1.5)
    """
    try:
        values = tuple(scales)
    except TypeError:
        values = None
    ok = bool(values) and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v) and v > 0
        for v in values
    )
    if not ok or len(set(values)) != len(values):
        raise CellSegError(
            f"{name}: expected distinct numbers > 0, such as (1, 1.5), got {scales!r}"
        )
    return tuple(float(v) for v in values)


def default_stride(tile: int) -> int:
    """The paper's step between tiles: three quarters of a tile (384 for 512), for both streams.
    Training tunes the thresholds on maps of this window and the segmenter predicts with it.

    >>> default_stride(512)
    384
    """
    return tile * 3 // 4


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """First pixels of the tiles along one axis of ``length >= tile`` pixels: every ``stride``,
    the last tile shifted back to end exactly at the border (no padding beyond the image).

    >>> tile_starts(1000, 512, 384)
    [0, 384, 488]
    """
    tile, stride = _check_tiling(tile, stride)
    length = _check_int(length, "length")
    if length < tile:
        raise CellSegError(f"length: {length} is shorter than the tile ({tile}); pad first")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def blend_window(tile: int, blend: str = "gaussian") -> np.ndarray:
    """``(tile, tile)`` float32 weight of one tile's prediction where tiles overlap.

    ``"gaussian"``: separable, ``exp(-d^2 / (2 s^2))`` with ``s = tile / 8`` around the tile's
    centre (scipy's Gaussian window), largest at the centre where the network sees the most
    context, and never 0, so every pixel has weight; ``"mean"``: all ones.
    """
    tile = _check_int(tile, "tile")
    _check_choice(blend, "blend", BLENDS)
    if blend == "mean":
        return np.ones((tile, tile), np.float32)
    from scipy.signal.windows import gaussian

    line = gaussian(tile, std=GAUSSIAN_SIGMA * tile)
    return np.outer(line, line).astype(np.float32)


class _Tiling(NamedTuple):
    """An image ready for tiling: ``padded (H', W', C)`` with ``H' >= tile``, ``W' >= tile``, the
    original ``height`` and ``width``, and the tile grid ``ys`` x ``xs`` of ``padded``."""

    padded: np.ndarray
    height: int
    width: int
    ys: list[int]
    xs: list[int]


def _pad_width(size: int, tile: int, pad_mode: str) -> tuple[int, str]:
    pad = max(tile - size, 0)
    if pad_mode == "reflect" and pad > size - 1:  # one mirror image is not enough
        return pad, "edge"
    return pad, pad_mode


def _tiling(image, tile: int, stride: int, pad_mode: str) -> _Tiling:
    """Check ``image`` ((H, W) or (H, W, C)), pad it at the bottom and right to at least one tile
    where it is smaller, and lay out the tile grid."""
    image = as_image(image, "image")
    if image.ndim == 2:
        image = image[..., None]
    height, width = image.shape[:2]
    padded = image
    for axis, size in ((0, height), (1, width)):
        pad, mode = _pad_width(size, tile, pad_mode)
        if pad:
            widths = [(0, 0)] * 3
            widths[axis] = (0, pad)
            padded = np.pad(padded, widths, mode=mode)
    ys = tile_starts(padded.shape[0], tile, stride)
    xs = tile_starts(padded.shape[1], tile, stride)
    return _Tiling(padded, height, width, ys, xs)


def _as_maps(out) -> np.ndarray:
    """What a ``predict`` function returned, as a float32 numpy array (or a clear error)."""
    if isinstance(out, tuple | list):
        raise CellSegError(
            f"predict: returned a {type(out).__name__} of {len(out)} outputs, expected one "
            "(B, K, tile, tile) array; wrap the network with infer.model_predictor, which "
            "joins a stream's outputs along the channels"
        )
    if isinstance(out, torch.Tensor):
        out = out.detach().float().cpu().numpy()
    try:
        return np.asarray(out, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise CellSegError(f"predict: returned something that is not an array ({err})") from err


class _Predictor:
    """Calls ``predict`` on batches of tiles ``(B, h, w, C)`` and checks what comes back:
    ``(B, K, h, w)`` with the same K every time (read from the first call), as float32 numpy."""

    def __init__(self, predict: Callable):
        self.predict = predict
        self.channels: int | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        inputs = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).float()
        with torch.inference_mode():
            out = _as_maps(self.predict(inputs))
        h, w = batch.shape[1:3]
        expected = (len(batch), "K", h, w)
        if out.ndim != 4:
            raise CellSegError(
                f"predict: expected a (B, K, tile, tile) = {expected} array, got shape {out.shape}"
            )
        if out.shape[0] != len(batch) or out.shape[2:] != (h, w):
            raise CellSegError(
                f"predict: a batch of {len(batch)} tiles of {h} x {w} gave shape "
                f"{out.shape}, expected {expected}"
            )
        if out.shape[1] < 1:
            raise CellSegError(f"predict: returned no channels (shape {out.shape})")
        if self.channels is None:
            self.channels = out.shape[1]
        elif out.shape[1] != self.channels:
            raise CellSegError(
                f"predict: returned {out.shape[1]} channels, but {self.channels} on its first call"
            )
        return out


def _blend(
    predictor: _Predictor,
    image: np.ndarray,
    ys: list[int],
    xs: list[int],
    window: tuple[int, int, int, int],
    weight: np.ndarray,
    batch_size: int,
    bar=None,
) -> np.ndarray:
    """The blended maps ``(K, r1 - r0, c1 - c0)`` of ``window = (r0, r1, c0, c1)`` of ``image``.

    Every tile of the grid ``ys`` x ``xs`` that overlaps the window is predicted (in batches, in
    row-major order) and its weighted prediction added inside the window only; the sums are then
    divided by the summed weights. A pixel thus receives the same tiles, in the same order, with
    the same weights whatever the window, so that blocks of an image get bit-identical values to
    the whole image's map.
    """
    r0, r1, c0, c1 = window
    tile = weight.shape[0]
    wanted_y = [y for y in ys if y < r1 and y + tile > r0]
    wanted_x = [x for x in xs if x < c1 and x + tile > c0]
    positions = [(y, x) for y in wanted_y for x in wanted_x]
    total = np.zeros((r1 - r0, c1 - c0), np.float32)
    out = None
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        batch = np.stack([image[y : y + tile, x : x + tile] for y, x in chunk])
        pred = predictor(batch)
        if out is None:
            out = np.zeros((pred.shape[1], r1 - r0, c1 - c0), np.float32)
        for (y, x), tile_pred in zip(chunk, pred, strict=True):
            # the part of this tile inside the window, in window and in tile coordinates
            wy0, wy1 = max(y, r0) - r0, min(y + tile, r1) - r0
            wx0, wx1 = max(x, c0) - c0, min(x + tile, c1) - c0
            ty0, tx0 = wy0 + r0 - y, wx0 + c0 - x
            ty1, tx1 = ty0 + wy1 - wy0, tx0 + wx1 - wx0
            w = weight[ty0:ty1, tx0:tx1]
            out[:, wy0:wy1, wx0:wx1] += tile_pred[:, ty0:ty1, tx0:tx1] * w
            total[wy0:wy1, wx0:wx1] += w
        if bar is not None:
            bar.update(len(chunk))
    out /= total
    return out


def _progress(total: int, enabled: bool, desc: str, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


def sliding_window(
    predict: Callable,
    image: np.ndarray,
    tile: int | None = 512,
    stride: int | None = 384,
    *,
    batch_size: int = 4,
    blend: str = "gaussian",
    pad_mode: str = "reflect",
    progress: bool = False,
) -> np.ndarray:
    """Predict an image of any size tile by tile: ``(K, H, W)`` float32 maps of ``image (H, W, C)``
    (or ``(H, W)``, one channel).

    Tiles of ``tile x tile`` pixels every ``stride`` pixels (the last row and column of tiles
    shifted back to end at the border) reach ``predict`` in batches of ``batch_size`` as float32
    tensors ``(B, C, tile, tile)`` with the pixel values unchanged (normalising is the caller's
    job), under ``torch.inference_mode``; ``predict`` returns ``(B, K, tile, tile)`` (tensor or
    array; K is read from its first call). Overlaps are averaged with the weights of
    :func:`blend_window` (``blend``). An image smaller than a tile is padded at the bottom and
    right (``pad_mode``, see :data:`PAD_MODES`) and the maps are cropped back.

    ``tile=None`` predicts the whole image in one call instead (a batch of one, at the image's
    own size; ``stride``, ``blend`` and ``pad_mode`` unused): a fully convolutional network takes
    any size, and one pass computes each pixel once where overlapping tiles compute many twice.

    >>> image = np.random.default_rng(0).random((100, 70, 3), dtype=np.float32)
    >>> maps = sliding_window(lambda x: x, image, tile=64, stride=48)
    >>> maps.shape, bool(np.allclose(maps, image.transpose(2, 0, 1), atol=1e-5))
    ((3, 100, 70), True)
    """
    _check_predict(predict)
    batch_size = _check_int(batch_size, "batch_size")
    _check_choice(blend, "blend", BLENDS)
    _check_choice(pad_mode, "pad_mode", PAD_MODES)
    if tile is None:
        image = as_image(image, "image")
        return _Predictor(predict)(image.reshape(1, *image.shape[:2], -1))[0]
    tile, stride = _check_tiling(tile, stride)
    weight = blend_window(tile, blend)
    layout = _tiling(image, tile, stride, pad_mode)
    predictor = _Predictor(predict)
    with _progress(len(layout.ys) * len(layout.xs), progress, "sliding window", "tile") as bar:
        return _blend(
            predictor,
            layout.padded,
            layout.ys,
            layout.xs,
            (0, layout.height, 0, layout.width),
            weight,
            batch_size,
            bar,
        )


# --------------------------------------------------------------------------- models


def _combine_outputs(out, outputs) -> torch.Tensor:
    """One ``(B, K, H, W)`` tensor from a model's output (see :func:`model_predictor`)."""
    if callable(outputs):
        out = outputs(out)
    elif outputs == "hover" or (outputs == "auto" and isinstance(out, _hover().HoverOutput)):
        hover = _hover()
        cp, hv = out[0].float(), out[1].float()
        maps = [hover.foreground_probability(cp)[:, None], hv]
        if cp.shape[1] == 3:  # a core class: its probability is a fourth map
            maps.append(hover.core_probability(cp)[:, None])
        out = torch.cat(maps, dim=1)
    elif isinstance(out, tuple | list):
        out = torch.cat([o.float() for o in out], dim=1)
    if not isinstance(out, torch.Tensor):
        raise CellSegError(
            f"outputs: the model's output became a {type(out).__name__}, expected a tensor"
        )
    return out


def _hover():
    from cellseg_lite.streams import hover

    return hover


def model_predictor(
    model: torch.nn.Module,
    *,
    device=None,
    amp: bool | None = None,
    channels_last: bool = True,
    outputs: str | Callable = "auto",
) -> Callable[[torch.Tensor], np.ndarray]:
    """A ``predict`` function for :func:`sliding_window` from a network: ``(B, 3, h, w)`` tiles
    to ``(B, K, h, w)`` float32 numpy maps.

    The model is put in eval mode, moved to ``device`` (default: where its parameters are) and
    converted to ``channels_last`` memory layout, all in place. Tiles are moved to the device and
    run under ``torch.inference_mode``, with autocast when ``amp`` (default: on CUDA only;
    bfloat16 where the GPU supports it, else float16; bfloat16 on CPU). ``outputs`` joins the
    model's outputs into channels: ``"auto"`` treats a HoVer output as ``"hover"`` and any other
    tuple as ``"concat"``; ``"concat"`` concatenates a tuple's tensors along the channels
    (``ConvNeXtStarDist``: ``(prob, dist)``, 1 + R channels); ``"hover"`` gives
    ``(softmax(cp)[:, 1:2], hv)``, 3 channels (foreground probability, horizontal, vertical); a
    callable maps the output to one tensor itself.
    """
    if not isinstance(model, torch.nn.Module):
        raise CellSegError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not callable(outputs):
        _check_choice(outputs, "outputs", OUTPUTS)
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise CellSegError(f"device: cannot use {device!r} ({err})") from err
    amp = device.type == "cuda" if amp is None else bool(amp)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        amp_dtype = torch.bfloat16
    else:
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    model.eval().to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model.to(memory_format=memory_format)

    def predict(x: torch.Tensor) -> np.ndarray:
        x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with torch.inference_mode(), torch.autocast(device.type, amp_dtype, enabled=amp):
            out = _combine_outputs(model(x), outputs)
        return out.float().cpu().numpy()

    return predict


def _unflip(maps: np.ndarray, axes: tuple[int, ...], kind: str) -> np.ndarray:
    """Maps ``(B, K, h, w)`` predicted for tiles flipped along image ``axes``, turned back into
    maps of the unflipped tiles."""
    for axis in axes:
        if kind == "stardist":  # the rays are mirrored too: prob flips, dist flips and permutes
            maps = np.concatenate(
                [np.flip(maps[:, :1], 2 + axis), sd.flip_targets(maps[:, 1:], axis)], 1
            )
        else:
            maps = np.flip(maps, 2 + axis)
            if kind == "hover":  # a mirror reverses the offsets along its axis: negate that map
                sign = np.ones(maps.shape[1], np.float32)
                sign[2 - axis] = -1  # rows flipped: vertical (channel 2); columns: horizontal (1)
                maps = maps * sign[:, None, None]
    return maps


def flip_averaged(predict: Callable, maps: str) -> Callable[[torch.Tensor], np.ndarray]:
    """Test-time augmentation: a ``predict`` function that averages ``predict``'s maps over the
    four flips of each batch of tiles (:data:`FLIPS`), each flipped back first.

    Flipping a tile back is not always flipping its maps back: in a mirror image a cell's
    horizontal offset changes sign, and StarDist's rays swap places. ``maps`` says what the
    channels are: ``"stardist"`` (``prob`` then ``R`` distances, rays permuted with
    :func:`cellseg_lite.streams.stardist.flip_targets`; R even), ``"hover"`` (foreground
    probability, horizontal, vertical: the offset along the flipped axis is negated) or
    ``"scalar"`` (maps that only move with the pixels, such as probabilities). A network that
    sees each cell four ways errs less on average; it costs four forward passes per tile.

    >>> image = np.random.default_rng(0).random((100, 70, 3), dtype=np.float32)
    >>> tta = flip_averaged(lambda x: x, "scalar")  # an identity "network" is flip-equivariant
    >>> bool(np.allclose(sliding_window(tta, image, 64, 48), image.transpose(2, 0, 1), atol=1e-5))
    True
    """
    _check_predict(predict)
    _check_choice(maps, "maps", TTA_MAPS)

    def averaged(x: torch.Tensor) -> np.ndarray:
        total = None
        for axes in FLIPS:
            tiles = torch.flip(x, [2 + a for a in axes]) if axes else x
            out = _as_maps(predict(tiles))
            if out.ndim != 4 or out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:]:
                raise CellSegError(
                    f"predict: tiles {tuple(x.shape)} gave maps of shape {out.shape}; "
                    "test-time flips need maps (B, K, tile, tile) of the tiles' size"
                )
            if maps == "hover" and out.shape[1] not in (3, 4):
                raise CellSegError(
                    f"predict: {out.shape[1]} channels are not HoVer maps (foreground "
                    "probability, horizontal, vertical, and the core probability of a network "
                    "with cores: 3 or 4 channels)"
                )
            if maps == "stardist" and (out.shape[1] < 4 or (out.shape[1] - 1) % 2):
                raise CellSegError(
                    f"predict: {out.shape[1]} channels are not StarDist maps with an even number "
                    "of rays (prob then R distances); a left-right flip needs R even"
                )
            out = _unflip(out, axes, maps)
            total = out if total is None else total + out
        return total / len(FLIPS)

    return averaged


def scale_averaged(
    maps_of: Callable[[np.ndarray], np.ndarray], image: np.ndarray, scales, maps: str
) -> np.ndarray:
    """Test-time augmentation over scales: the mean of ``maps_of(image resized by s)`` over the
    ``scales``, each resized back to ``image``'s height and width (bilinear, smoothed where it
    shrinks), ``(K, H, W)`` float32.

    ``maps_of`` takes a network input ``(h, w, C)`` and returns its maps ``(K, h, w)`` (for
    example :func:`sliding_window` with a ``predict`` function). Resizing a map back is not
    always resizing its values: ``maps`` says what the channels are. ``"hover"`` and
    ``"scalar"``: probabilities, and HoVer's offsets, which are normalised to each cell's extent
    and mean the same at any scale; ``"stardist"``: ``prob`` then distances in pixels, which are
    divided by the scale. A network trained on a few minutes of data merges touching cells that
    look small to it and cuts large ones; an average of two views may err less than either
    (``MAP_SCALES``).

    >>> image = np.random.default_rng(0).random((40, 30, 3), dtype=np.float32)
    >>> smooth = np.broadcast_to(np.linspace(0, 1, 30, dtype=np.float32), (40, 30))[..., None]
    >>> out = scale_averaged(lambda x: x.transpose(2, 0, 1), smooth, (1, 1.5), "scalar")
    >>> out.shape, bool(np.abs(out - smooth.transpose(2, 0, 1)).max() < 0.02)
    ((1, 40, 30), True)
    """
    from skimage.transform import resize

    scales = map_scales_of(scales, "scales")
    _check_choice(maps, "maps", TTA_MAPS)
    image = as_image(image, "image")
    shape = image.shape[:2]
    total = None
    for scale in scales:
        x = image if scale == 1.0 else _enlarge(image, scale)
        out = np.asarray(maps_of(x), dtype=np.float32)
        if out.ndim != 3 or out.shape[1:] != x.shape[:2]:
            raise CellSegError(
                f"maps_of: an input of {x.shape[0]} x {x.shape[1]} gave maps of shape "
                f"{out.shape}; expected (K, {x.shape[0]}, {x.shape[1]})"
            )
        if scale != 1.0:
            out = np.stack(
                [
                    resize(m, shape, order=1, anti_aliasing=scale > 1, preserve_range=True)
                    for m in out
                ]
            ).astype(np.float32)
            if maps == "stardist":
                out[1:] /= scale  # distances in pixels of the resized image
        total = out.astype(np.float32) if total is None else total + out
    return total / len(scales)


def _stacked(maps) -> np.ndarray:
    """The channels of :class:`StarDistMaps`, :class:`HoverMaps` or :class:`HoverCoreMaps` as
    one array ``(K, H, W)``, in :func:`sliding_window`'s order."""
    return np.concatenate([m[None] if m.ndim == 2 else m for m in maps])


class StarDistMaps(NamedTuple):
    """What :func:`stardist_maps` returns: ``prob (H, W)`` in [0, 1] and ``dist (R, H, W)``."""

    prob: np.ndarray
    dist: np.ndarray


class HoverMaps(NamedTuple):
    """What :func:`hover_maps` returns: ``foreground_prob (H, W)`` in [0, 1] and ``hv (2, H, W)``
    (channel 0 horizontal, 1 vertical)."""

    foreground_prob: np.ndarray
    hv: np.ndarray


class HoverCoreMaps(NamedTuple):
    """What :func:`hover_maps` returns for a network with a core class
    (``ConvNeXtHover(cores=True)``): :class:`HoverMaps`'s two and ``core_prob (H, W)``."""

    foreground_prob: np.ndarray
    hv: np.ndarray
    core_prob: np.ndarray


def split_hover_maps(maps: np.ndarray) -> HoverMaps | HoverCoreMaps:
    """Stacked HoVer maps ``(3, H, W)`` (foreground probability, horizontal, vertical) or
    ``(4, H, W)`` (and the core probability) as :class:`HoverMaps` or :class:`HoverCoreMaps`."""
    if len(maps) == 4:
        return HoverCoreMaps(maps[0], maps[1:3], maps[3])
    return HoverMaps(maps[0], maps[1:])


def hover_steps(maps: HoverMaps | HoverCoreMaps, thresholds: dict):
    """HoVer's watershed (:func:`cellseg_lite.streams.hover.watershed_steps`, every step kept;
    ``.labels`` are the cells) of a model's maps with its tuned ``thresholds`` (``prob_thresh``
    and :data:`HOVER_TUNED`), seeded by the core probability where the maps have one."""
    from cellseg_lite.streams import hover

    return hover.watershed_steps(
        maps.foreground_prob,
        maps.hv,
        thresholds.get("prob_thresh", 0.6),
        core_prob=getattr(maps, "core_prob", None),
        **hover_settings(thresholds),
    )


def _network_input(image) -> np.ndarray:
    """Check the networks' input: ``(H, W, 3)`` floats in [0, 1]."""
    image = as_image(image, "image")
    if image.ndim != 3 or image.shape[2] != 3:
        raise CellSegError(
            f"image: expected the network input (H, W, 3), got shape {image.shape} "
            "(use io.normalize_image(raw) / 255)"
        )
    if not np.issubdtype(image.dtype, np.floating):
        raise CellSegError(
            f"image: expected floats in [0, 1], got dtype {image.dtype} "
            "(use io.normalize_image(raw) / 255)"
        )
    low, high = float(image.min()), float(image.max())
    if not (0 <= low and high <= 1):  # also refuses NaN
        raise CellSegError(
            f"image: expected values in [0, 1], found [{low:g}, {high:g}] "
            "(use io.normalize_image(raw) / 255)"
        )
    return image


def stardist_maps(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    tile: int | None = 512,
    stride: int | None = 384,
    batch_size: int = 4,
    device=None,
    amp: bool | None = None,
    blend: str = "gaussian",
    tta: bool = False,
    progress: bool = False,
) -> StarDistMaps:
    """A StarDist network's maps of a whole image: ``prob (H, W)`` and ``dist (R, H, W)``.

    ``image`` is already the network input: ``(H, W, 3)`` float32 in [0, 1], that is
    ``io.normalize_image(raw) / 255``. Tiles of 512 every 384 pixels, as the authors' code
    (``tile=None``: the whole image in one forward pass); see :func:`sliding_window` and
    :func:`model_predictor`. The maps take ``(1 + R) x H x W x 4``
    bytes; for whole-slide images use :func:`stardist_instances_tiled`. ``tta``: average the
    maps of the four flips of every tile (:func:`flip_averaged`; four times the time).
    """
    predict = model_predictor(model, device=device, amp=amp)
    if tta:
        predict = flip_averaged(predict, "stardist")
    maps = sliding_window(
        predict,
        _network_input(image),
        tile,
        stride,
        batch_size=batch_size,
        blend=blend,
        progress=progress,
    )
    return StarDistMaps(maps[0], maps[1:])


def hover_maps(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    tile: int | None = 512,
    stride: int | None = 384,
    batch_size: int = 4,
    device=None,
    amp: bool | None = None,
    blend: str = "gaussian",
    tta: bool = False,
    progress: bool = False,
) -> HoverMaps | HoverCoreMaps:
    """A HoVer network's maps of a whole image: ``foreground_prob (H, W)`` (softmax of the CP
    logits, cell channel) and ``hv (2, H, W)``, blended after the softmax; a network with a core
    class adds ``core_prob (H, W)`` (:class:`HoverCoreMaps`).

    ``image`` is already the network input: ``(H, W, 3)`` float32 in [0, 1], that is
    ``io.normalize_image(raw) / 255``. Tiles of 512 every 384 pixels, the paper's window (the
    authors' HoVer code steps 256: ``stride=256``, more tiles for the same F1; ``tile=None``: the
    whole image in one forward pass).
    ``tta``: average the maps of the four flips of every tile (:func:`flip_averaged`; four
    times the time).
    """
    predict = model_predictor(model, device=device, amp=amp, outputs="hover")
    if tta:
        predict = flip_averaged(predict, "hover")
    maps = sliding_window(
        predict,
        _network_input(image),
        tile,
        stride,
        batch_size=batch_size,
        blend=blend,
        progress=progress,
    )
    return split_hover_maps(maps)


# --------------------------------------------------------------------------- StarDist, tiled

_INSTANCE_KWARGS = ("border", "max_candidates", "keep_fraction", "min_dist", "method")


def _instance_settings(kwargs: dict) -> dict:
    unknown = sorted(set(kwargs) - set(_INSTANCE_KWARGS))
    if unknown:
        raise CellSegError(
            f"{unknown[0]}: not a setting of the tiled StarDist post-processing; expected "
            f"candidate_stride or one of {', '.join(_INSTANCE_KWARGS)}"
        )
    settings = {
        "border": sd.NMS_BORDER,
        "max_candidates": None,
        "keep_fraction": sd.CODE_KEEP_FRACTION,
        "min_dist": sd.MIN_DIST,
        "method": "star",
    }
    settings.update(kwargs)
    settings["border"] = _check_int(settings["border"], "border", 0)
    return settings


def stardist_candidates_tiled(
    predict: Callable,
    image: np.ndarray,
    *,
    tile: int = 512,
    stride: int = 384,
    block: int = 2048,
    context: int | None = None,
    prob_thresh: float = 0.5,
    candidate_stride: int = sd.DEFAULT_STRIDE,
    batch_size: int = 4,
    blend: str = "gaussian",
    pad_mode: str = "reflect",
    progress: bool = False,
    **instances_kwargs,
) -> sd.Polygons:
    """The NMS candidates of a whole image, found block by block: the first half of
    :func:`stardist_instances_tiled` (see there), unsorted by probability.

    Returns :class:`~cellseg_lite.streams.stardist.Polygons` with ``points`` in the image's
    coordinates, row-major over the candidate grid: the order of
    :func:`~cellseg_lite.streams.stardist.select_candidates` on the whole map (without its cap),
    which matters because NMS breaks ties between equal probabilities by it.
    """
    _check_predict(predict)
    tile, stride = _check_tiling(tile, stride)
    batch_size = _check_int(batch_size, "batch_size")
    candidate_stride = _check_int(candidate_stride, "candidate_stride")
    block = _check_int(block, "block")
    if context is not None:
        context = _check_int(context, "context", 0)
    weight = blend_window(tile, blend)
    _check_choice(pad_mode, "pad_mode", PAD_MODES)
    settings = _instance_settings(instances_kwargs)
    select = {
        "stride": candidate_stride,
        "border": 0,  # the image's border is masked below; a block's edge is no border
        "max_candidates": settings["max_candidates"],
        "keep_fraction": settings["keep_fraction"],
        "min_dist": settings["min_dist"],
    }
    # every setting checked now, by stardist's own checks on a 1-pixel map, not after an hour
    sd.select_candidates(np.zeros((1, 1)), np.zeros((3, 1, 1)), prob_thresh, **select)

    layout = _tiling(image, tile, stride, pad_mode)
    height, width, border = layout.height, layout.width, settings["border"]
    # block cores on the candidate grid, so that every stride x stride cell lies in one block
    block = max(block // candidate_stride, 1) * candidate_stride
    cores = [
        (r0, min(r0 + block, height), c0, min(c0 + block, width))
        for r0 in range(0, height, block)
        for c0 in range(0, width, block)
    ]
    predictor = _Predictor(predict)
    found = []
    with _progress(len(cores), progress, "StarDist", "block") as bar:
        for r0, r1, c0, c1 in cores:
            if context is None:  # the whole image's tiles: the full map's values, exactly
                window = (r0, r1, c0, c1)
                maps = _blend(
                    predictor, layout.padded, layout.ys, layout.xs, window, weight, batch_size
                )
            else:  # a crop of `context` pixels around the core, tiled on its own
                y0, y1 = _crop_range(r0, r1, context, layout.padded.shape[0], tile)
                x0, x1 = _crop_range(c0, c1, context, layout.padded.shape[1], tile)
                maps = _blend(
                    predictor,
                    layout.padded[y0:y1, x0:x1],
                    tile_starts(y1 - y0, tile, stride),
                    tile_starts(x1 - x0, tile, stride),
                    (r0 - y0, r1 - y0, c0 - x0, c1 - x0),
                    weight,
                    batch_size,
                )
            if maps.shape[0] < 4:
                raise CellSegError(
                    f"predict: returned {maps.shape[0]} channels; StarDist needs 1 + R "
                    "(probability, then R >= 3 distances)"
                )
            prob = maps[0]
            # candidates keep `border` pixels away from the image's border (stardist's b=2)
            prob[: max(border - r0, 0)] = 0
            prob[max(height - border - r0, 0) :] = 0
            prob[:, : max(border - c0, 0)] = 0
            prob[:, max(width - border - c0, 0) :] = 0
            polygons = sd.select_candidates(prob, maps[1:], prob_thresh, **select)
            del maps, prob
            found.append(polygons._replace(points=polygons.points + np.array([r0, c0])))
            bar.update(1)
            bar.set_postfix(candidates=sum(len(p.points) for p in found))
    points = np.concatenate([p.points for p in found])
    # the whole map's order: row-major over the candidate grid's cells (NMS breaks ties by it)
    cells_across = -(-width // candidate_stride)
    key = (points[:, 0] // candidate_stride) * cells_across + points[:, 1] // candidate_stride
    order = np.argsort(key, kind="stable")
    return sd.Polygons(
        points[order],
        np.concatenate([p.prob for p in found])[order],
        np.concatenate([p.dist for p in found])[order],
    )


def _crop_range(start: int, stop: int, context: int, size: int, tile: int) -> tuple[int, int]:
    """``[start - context, stop + context)`` clipped to ``[0, size)``, widened to a tile."""
    low, high = max(start - context, 0), min(stop + context, size)
    if high - low < tile:
        high = min(low + tile, size)
        low = max(high - tile, 0)
    return low, high


def stardist_instances_tiled(
    predict: Callable,
    image: np.ndarray,
    *,
    tile: int = 512,
    stride: int = 384,
    block: int = 2048,
    context: int | None = None,
    prob_thresh: float = 0.5,
    nms_thresh: float = 0.4,
    candidate_stride: int = sd.DEFAULT_STRIDE,
    batch_size: int = 4,
    blend: str = "gaussian",
    pad_mode: str = "reflect",
    progress: bool = False,
    **instances_kwargs,
) -> np.ndarray:
    """StarDist instance labels ``(H, W)`` int32 of an image of any size, in bounded memory.

    The image is cut into ``block x block`` cores (rounded down to a multiple of
    ``candidate_stride``). Each core's maps are predicted by :func:`sliding_window`'s rules
    (``predict`` returns ``(B, 1 + R, tile, tile)``: probability, then R distances, e.g.
    :func:`model_predictor` of a ``ConvNeXtStarDist``), and reduced at once to the NMS candidates
    centred in the core (:func:`~cellseg_lite.streams.stardist.select_candidates`, ``prob_thresh``,
    ``candidate_stride``); then one NMS over all candidates (``nms_thresh``) and one rendering
    into the labels. Memory: one block's ``(1 + R) x block^2`` float32 map (0.55 GB at 2048 and
    R = 32), the candidates and the labels; never the whole image's map.

    ``context=None`` predicts each core with the whole image's tile grid (every tile that overlaps
    the core; tiles across a core's edge are predicted once for each core they touch), so the
    maps, and for a ``predict`` that treats each tile alone the labels, equal
    ``stardist.instances(*sliding_window(...))`` exactly, for any ``block``. An integer
    ``context`` tiles a crop of that many pixels around each core on its own instead.

    ``instances_kwargs``: ``border``, ``max_candidates``, ``keep_fraction``, ``min_dist``,
    ``method`` of :func:`~cellseg_lite.streams.stardist.instances`. The authors' cap (past
    20,000 candidates keep the most probable half) is a rule about one image; here it is off by
    default (``max_candidates=None``), and a number applies it to each block.
    """
    nms_thresh = _check_fraction(nms_thresh, "nms_thresh")
    settings = _instance_settings(instances_kwargs)
    _check_choice(settings["method"], "method", sd.RENDER_METHODS)
    found = stardist_candidates_tiled(
        predict,
        image,
        tile=tile,
        stride=stride,
        block=block,
        context=context,
        prob_thresh=prob_thresh,
        candidate_stride=candidate_stride,
        batch_size=batch_size,
        blend=blend,
        pad_mode=pad_mode,
        progress=progress,
        **instances_kwargs,
    )
    shape = as_image(image, "image").shape[:2]
    return sd.render(sd.suppress(found, nms_thresh), shape, method=settings["method"])


# --- multi-stream segmenter (below) ---


#: Which stream segments each low-level class. ``"paper"``: the paper's text, StarDist for classes
#: 0, 2 and 3 and HoVer for class 1 (gray). ``"code"``: the authors' released code (they call the
#: README wording a typo), StarDist for classes 0, 1 and 2 and HoVer for class 3 (colour, small
#: cells), and StarDist for any image taller than :data:`CODE_TALL_IMAGE` pixels. ``"hover"``:
#: HoVer for every class, this project's choice for short CPU runs: in every recorded 27-minute
#: CPU run of the validated routing HoVer won all four classes, and sending them all to it gives
#: its pre-training the StarDist probe's time (``benchmarks/RESULTS.md``, ``bench_quality_hover``).
ROUTINGS: dict[str, dict[int, str]] = {
    "paper": {0: "stardist", 1: "hover", 2: "stardist", 3: "stardist"},
    "code": {0: "stardist", 1: "stardist", 2: "stardist", 3: "hover"},
    "hover": {0: "hover", 1: "hover", 2: "hover", 3: "hover"},
}
#: The authors' code sends every image taller than this to StarDist, whatever its class.
CODE_TALL_IMAGE = 4000
#: Images with more pixels than this go through :func:`stardist_instances_tiled` (bounded memory)
#: instead of whole-image maps.
TILED_PIXELS = 4096 * 4096
#: Images whose cells are typically narrower than this many pixels (:func:`inscribed_diameter` of
#: a first pass) are segmented again :data:`UPSCALE` times larger: the `lite` networks (a 4-pixel
#: stem, 128-pixel training patches) merge touching cells that small, and larger they separate
#: them. Chosen on the real-mini TRAIN split among second passes at 1.5 or 2 times below 11 to 30
#: pixels (``benchmarks/bench_upscale.py``; see the inference chapter).
MIN_DIAMETER = 25.0
#: The output stride of the maps :data:`MIN_DIAMETER` was chosen for (the paper's decoder). A
#: network whose maps come at a finer stride resolves cells that much narrower, so
#: :class:`MultiStreamSegmenter` scales the threshold by the model's stride over this one: 12.5
#: pixels for the authors' stride-2 decoder, where the TRAIN sweep of a stride-2 segmenter chose
#: 11-13 pixels (``benchmarks/bench_upscale.py``).
MIN_DIAMETER_STRIDE = 4
#: How much larger :class:`MultiStreamSegmenter` segments an image of small cells again.
UPSCALE = 1.5
#: The classes whose images may get that second pass: the two of nuclei (0: fluorescence, 3:
#: stained). Class 2 holds large cells by the 4-way rule's definition, and the gray whole cells of
#: class 1 are long and irregular: narrow, not small, so a first pass reads them below
#: :data:`MIN_DIAMETER` and the enlarged pass cuts them (``benchmarks/bench_upscale.py``).
UPSCALE_CLASSES = (0, 3)
#: The scales whose maps :class:`MultiStreamSegmenter` averages (:func:`scale_averaged`) for a
#: model whose thresholds were tuned on such maps (their ``"map_scales"`` entry, from
#: ``TrainConfig(map_scales=MAP_SCALES)``): the image's own and 1.5 times larger, on every image,
#: in place of the second pass that a rule picks (:data:`UPSCALE`). Not the default: on two
#: trained `lite` segmenters, same weights, it was level with the second pass (real-mini VAL
#: -0.014 and +0.012), lost fluorescence F1 in both and merged more cells
#: (``benchmarks/bench_map_scales.py``).
MAP_SCALES = (1.0, 1.5)
#: Pixels of mirrored context that :class:`MultiStreamSegmenter` adds around an image before
#: segmenting it, cropped away after (the U-Net paper's overlap-tile strategy at the image
#: border): a cell that the frame cuts then looks whole to the network instead of ending in a
#: wall. On five trained `lite` segmenters: real-mini VAL F1 +0.004 on average (all five higher),
#: held-out synthetic +0.013 (three of five; large class-2 cells gain, long gray class-1 cells
#: lose), with fewer matches broken by the challenge's frame (``benchmarks/bench_boundary.py``).
MIRROR_CONTEXT = 16
#: Images whose longer side (mirrored context included) is at most this many pixels are predicted
#: by :class:`MultiStreamSegmenter` in one forward pass (``sliding_window(tile=None)``) instead of
#: overlapping tiles of 512: the networks are fully convolutional, so the maps differ only where
#: a tile's border cut the context, and each pixel is computed once. A 1024 x 1024 image (1056
#: with its context) takes nine tiles of 512, 2.1 times its pixels.
WHOLE_IMAGE_SIDE = 2048
MULTISTREAM_FORMAT = "cellseg-lite-multistream"
_MULTISTREAM_LAYOUT = 1
#: Watershed settings (:class:`cellseg_lite.streams.hover.WatershedParams`) that a HoVer model's
#: tuned thresholds may carry besides ``prob_thresh``.
HOVER_TUNED = (
    "marker_threshold",
    "marker_min_fraction",
    "foreground_min_fraction",
    "marker_min_prob",
    "core_threshold",
)


def hover_settings(thresholds: dict) -> dict:
    """The watershed overrides among a HoVer model's tuned thresholds (:data:`HOVER_TUNED`)."""
    return {name: thresholds[name] for name in HOVER_TUNED if name in thresholds}


def inscribed_diameter(labels: np.ndarray) -> float:
    """Typical cell diameter of a label image: the median over its objects of the widest circle
    inside each (twice the largest distance to a pixel outside it), in pixels; ``nan`` without
    objects.

    A clump of touching cells that a first pass merged into one object still holds circles no
    wider than one of its cells, so the estimate does not grow with merges the way the mean
    object area does. (An object ``w`` pixels wide measures ``w`` if ``w`` is even, ``w + 1``
    if odd.)

    >>> labels = np.zeros((40, 40), np.int32)
    >>> labels[5:15, 5:15], labels[20:30, 5:35] = 1, 2    # 10 px wide, whatever their length
    >>> inscribed_diameter(labels)
    10.0
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise CellSegError(
            f"labels: expected an (H, W) integer label image, got {labels.dtype} {labels.shape}"
        )
    radii = []
    for k, box in enumerate(ndi.find_objects(labels), start=1):
        if box is not None:  # pad by one pixel so that the object's own border counts as outside
            radii.append(ndi.distance_transform_edt(np.pad(labels[box] == k, 1)).max())
    return float(2.0 * np.median(radii)) if radii else float("nan")


class StreamModel(NamedTuple):
    """One trained stream: the network, which stream it is, its post-processing thresholds and
    its training settings (a :class:`cellseg_lite.train.TrainConfig`)."""

    model: torch.nn.Module
    stream: str
    thresholds: dict
    config: object

    @classmethod
    def from_checkpoint(cls, checkpoint) -> StreamModel:
        """From a :class:`cellseg_lite.train.Checkpoint` (``train.load_checkpoint(path)``)."""
        return cls(
            checkpoint.model, checkpoint.stream, dict(checkpoint.thresholds), checkpoint.config
        )


def _check_routing(routing) -> dict[int, str]:
    if isinstance(routing, str):
        if routing not in ROUTINGS:
            raise CellSegError(
                f"routing: expected one of {', '.join(map(repr, ROUTINGS))} or a dict "
                f"{{class: stream}}, got {routing!r}"
            )
        return dict(ROUTINGS[routing])
    if not isinstance(routing, dict) or sorted(routing) != [0, 1, 2, 3]:
        raise CellSegError(f"routing: expected a stream for each class 0-3, got {routing!r}")
    bad = {c: s for c, s in routing.items() if s not in ("stardist", "hover")}
    if bad:
        raise CellSegError(f"routing: unknown stream(s) {bad}; expected 'stardist' or 'hover'")
    return {int(c): str(s) for c, s in routing.items()}


def _enlarge(x: np.ndarray, factor: float) -> np.ndarray:
    """Image ``(H, W, C)`` resized by ``factor`` (bilinear)."""
    from skimage.transform import resize

    shape = (round(x.shape[0] * factor), round(x.shape[1] * factor), *x.shape[2:])
    return resize(x, shape, order=1, anti_aliasing=False, preserve_range=True).astype(x.dtype)


def _shrink_labels(labels: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``labels`` resized to the height and width of ``like`` (nearest neighbour), renumbered
    1..N since a cell can vanish."""
    from skimage.segmentation import relabel_sequential
    from skimage.transform import resize

    small = resize(labels, like.shape[:2], order=0, anti_aliasing=False, preserve_range=True)
    return relabel_sequential(small.astype(np.int32))[0]


def mirror_pad(x: np.ndarray, pad: int = MIRROR_CONTEXT) -> np.ndarray:
    """``x`` ``(H, W)`` or ``(H, W, C)`` with ``pad`` pixels of mirrored context on each side
    (:data:`MIRROR_CONTEXT`); ``x`` itself for ``pad`` 0. :func:`crop_context` undoes it.

    >>> mirror_pad(np.arange(4).reshape(1, 4), 2)[2]
    array([2, 1, 0, 1, 2, 3, 2, 1])
    """
    if not _check_int(pad, "pad", low=0):
        return x
    return np.pad(x, ((pad, pad), (pad, pad)) + ((0, 0),) * (x.ndim - 2), mode="reflect")


def crop_context(a: np.ndarray, pad: int = MIRROR_CONTEXT) -> np.ndarray:
    """``a`` without ``pad`` pixels on each side of its last two axes: the labels ``(H, W)`` or
    maps ``(K, H, W)`` of a :func:`mirror_pad`-ded image, back at the image's own size."""
    return a[..., pad:-pad, pad:-pad] if pad else a


def window(
    shape: tuple[int, ...],
    tile: int = 512,
    stride: int | None = None,
    whole_image_side: int | None = WHOLE_IMAGE_SIDE,
) -> tuple[int | None, int | None]:
    """``(tile, stride)`` for :func:`sliding_window` of an image of ``shape``, as
    :class:`MultiStreamSegmenter` predicts it and :func:`cellseg_lite.train.predict_maps` tunes
    the thresholds on it: ``(None, None)`` (one forward pass) up to ``whole_image_side`` pixels a
    side (and :data:`TILED_PIXELS` in all), else tiles of ``tile`` every ``stride`` (default
    :func:`default_stride`); an image smaller than a tile gets one tile of its own size.

    >>> window((1056, 1056)), window((2100, 1000)), window((300, 200), whole_image_side=None)
    ((None, None), (512, 384), (320, 320))
    """
    height, width = shape[:2]
    if whole_image_side is not None and max(height, width) <= whole_image_side:
        if height * width <= TILED_PIXELS:
            return None, None
    # an image smaller than a tile is predicted in one tile of its own size (a multiple of 32)
    small = min(tile, -(-max(height, width) // 32) * 32)
    return small, min(stride or default_stride(tile), small)


class MultiStreamSegmenter:
    """The method at inference: route each image to its low-level class, then segment it with
    that class's stream model.

    ``router``: a trained :class:`cellseg_lite.router.Router`. ``models``: ``{class: model}`` for
    the four classes, each a :class:`StreamModel` (or a :class:`cellseg_lite.train.Checkpoint`),
    whose stream must be the one ``routing`` names for its class (``"paper"``, ``"code"`` or a
    dict, see :data:`ROUTINGS`); one model may serve several classes. ``tile``/``stride``: the
    sliding window, 512 every 384 pixels for both streams by default (the paper's; the authors'
    HoVer code steps 256: ``stride=256``), for images with a side longer than
    ``whole_image_side`` pixels; smaller ones are predicted in one forward pass
    (:data:`WHOLE_IMAGE_SIDE`; ``None`` tiles every image larger than a tile, as the paper; the
    thresholds are tuned on maps made the same way, :func:`cellseg_lite.train.predict_maps`). ``tta``:
    average the maps over the four flips of each tile (:func:`flip_averaged`); ``None`` (the
    default) does what each model's thresholds were tuned with (their ``"tta"`` entry), since
    flip-averaged maps are smoother and want their own thresholds. ``map_scales``: average the
    maps of the image at these scales (:func:`scale_averaged`, such as :data:`MAP_SCALES`);
    ``None`` (the default) does what each model's thresholds were tuned on (their
    ``"map_scales"`` entry, else the image's own scale alone); a scale that would make an image
    larger than :data:`TILED_PIXELS` is left out for that image. ``min_diameter``/``upscale``:
    an image of one of the ``upscale_classes`` (:data:`UPSCALE_CLASSES`) whose cells a first
    pass finds narrower than ``min_diameter`` pixels (:func:`inscribed_diameter`) is segmented
    again ``upscale`` times larger and its labels shrunk back (:data:`MIN_DIAMETER`; ``None``
    turns this off; never for a model whose maps are averaged over scales, which already hold a
    larger view); ``min_diameter`` holds for maps at stride 4 (the paper's decoder) and scales
    with each model's output stride (:data:`MIN_DIAMETER_STRIDE`: half for the stride-2 decoder;
    :meth:`upscale_below`). ``sparse_cells``: normalise images with
    :func:`cellseg_lite.io.normalize_image`'s mended rule for images whose cells cover under
    about 1% of the pixels, as the training data are (``False``: the challenge's rule
    unchanged). ``mirror_context``: pixels of mirrored context around each image
    (:data:`MIRROR_CONTEXT`; 0 turns it off; whole slides, above :data:`TILED_PIXELS`, go
    without, where a padded copy would cost memory and the frame holds a tiny share of the
    cells). :meth:`segment` takes a raw image of any supported kind; :meth:`save`/:meth:`load`
    keep the whole thing in one file.
    """

    def __init__(
        self,
        router,
        models: dict,
        *,
        routing: str | dict = "paper",
        tile: int = 512,
        stride: int | None = None,
        batch_size: int = 4,
        tta: bool | None = None,
        map_scales: Collection[float] | None = None,
        min_diameter: float | None = MIN_DIAMETER,
        upscale: float = UPSCALE,
        upscale_classes: Collection[int] = UPSCALE_CLASSES,
        sparse_cells: bool = True,
        mirror_context: int = MIRROR_CONTEXT,
        whole_image_side: int | None = WHOLE_IMAGE_SIDE,
        device=None,
    ):
        from cellseg_lite.router import Router

        if not isinstance(router, Router):
            raise CellSegError(f"router: expected a router.Router, got {type(router).__name__}")
        self.routing_name = routing if isinstance(routing, str) else "custom"
        self.routing = _check_routing(routing)
        if not isinstance(models, dict) or sorted(models) != [0, 1, 2, 3]:
            have = sorted(models) if isinstance(models, dict) else type(models).__name__
            raise CellSegError(f"models: expected one stream model for each class 0-3, got {have}")
        self.models: dict[int, StreamModel] = {}
        for category, model in models.items():
            if not isinstance(model, StreamModel):
                if not hasattr(model, "thresholds") or not hasattr(model, "model"):
                    raise CellSegError(
                        f"models[{category}]: expected a StreamModel or train.Checkpoint, "
                        f"got {type(model).__name__}"
                    )
                model = StreamModel.from_checkpoint(model)
            if model.stream != self.routing[category]:
                raise CellSegError(
                    f"models[{category}]: routing {self.routing_name!r} sends class {category} to "
                    f"{self.routing[category]!r}, but the model given is a {model.stream!r} model"
                )
            self.models[int(category)] = model
        self.router = router
        self.tile, _ = _check_tiling(tile, tile if stride is None else stride)
        self.stride = None if stride is None else _check_tiling(tile, stride)[1]
        self.batch_size = _check_int(batch_size, "batch_size")
        if tta is not None and not isinstance(tta, bool | np.bool_):
            raise CellSegError(f"tta: expected True, False or None, got {tta!r}")
        self.tta = None if tta is None else bool(tta)
        self.map_scales = None if map_scales is None else map_scales_of(map_scales)
        if min_diameter is not None and not (
            isinstance(min_diameter, numbers.Real)
            and not isinstance(min_diameter, bool)
            and min_diameter > 0
        ):
            raise CellSegError(f"min_diameter: expected a number > 0 or None, got {min_diameter!r}")
        if isinstance(upscale, bool) or not isinstance(upscale, numbers.Real) or not upscale > 1:
            raise CellSegError(f"upscale: expected a number > 1, got {upscale!r}")
        self.min_diameter = None if min_diameter is None else float(min_diameter)
        self.upscale = float(upscale)
        try:
            classes = sorted(set(upscale_classes))
        except TypeError:
            classes = None
        if classes is None or not all(
            isinstance(c, numbers.Integral) and not isinstance(c, bool) and 0 <= c <= 3
            for c in classes
        ):
            raise CellSegError(
                f"upscale_classes: expected a collection of classes 0-3, got {upscale_classes!r}"
            )
        self.upscale_classes = tuple(int(c) for c in classes)
        if not isinstance(sparse_cells, bool | np.bool_):
            raise CellSegError(f"sparse_cells: expected True or False, got {sparse_cells!r}")
        self.sparse_cells = bool(sparse_cells)
        self.mirror_context = _check_int(mirror_context, "mirror_context", low=0)
        self.whole_image_side = (
            None if whole_image_side is None else _check_int(whole_image_side, "whole_image_side")
        )
        if device is not None:
            self.to(device)

    def __repr__(self) -> str:
        streams = ", ".join(f"{c}: {m.stream}/{m.config.backbone}" for c, m in self.models.items())
        return f"MultiStreamSegmenter(routing={self.routing_name!r}, {{{streams}}})"

    def to(self, device) -> MultiStreamSegmenter:
        """Move the router and every stream model to ``device``; returns self."""
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise CellSegError(f"device: cannot use {device!r} ({err})") from err
        self.router.model.to(device)
        for model in self.models.values():
            model.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.router.device

    def route(self, image) -> int:
        """The low-level class (0-3) of a raw image (array or path), as the router predicts it."""
        return int(self.router.predict(image).category)

    def stream_for(self, image_or_category) -> str:
        """The stream that :meth:`segment` uses for an image (or a class), with the code routing's
        rule for tall images."""
        if isinstance(image_or_category, int | np.integer):
            return self.routing[int(image_or_category)]
        image = as_image(image_or_category, "image")
        if self.routing_name == "code" and image.shape[0] > CODE_TALL_IMAGE:
            return "stardist"
        return self.routing[self.route(image)]

    def segment(
        self,
        image,
        *,
        category: int | None = None,
        scale: float | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Instance labels ``(H, W)`` int32 of a raw image: ``(H, W)`` or ``(H, W, C)`` of any
        dtype, as :func:`cellseg_lite.io.read_image` returns it, or a path to one.

        The image is normalised the challenge's way, mended for sparse cells unless the
        segmenter's ``sparse_cells`` is False (:func:`cellseg_lite.io.normalize_image`),
        routed (``category`` overrides the router) and segmented by that class's model with its
        tuned thresholds; whole-slide StarDist images go through
        :func:`stardist_instances_tiled` in bounded memory. The maps are averaged over the
        model's :meth:`map_scales_for`. Images of cells narrower than ``min_diameter`` are
        segmented a second time (unless the maps hold several scales), ``upscale`` times larger,
        if their class is one of ``upscale_classes`` (see the class);
        ``scale`` instead makes one pass at that scale whatever the cells' size.
        """
        model, category, x = self._prepare(image, category)
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale > 0:
                raise CellSegError(f"scale: expected a number > 0 or None, got {scale!r}")
            return self._segment_at(model, x, float(scale), progress)
        labels = self._segment(model, x, progress)
        if self._wants_upscale(labels, category, model):
            labels = self._segment_at(model, x, self.upscale, progress)
        return labels

    def maps(self, image, *, category: int | None = None, progress: bool = False):
        """The maps that :meth:`segment` post-processes in its first pass: the routed model's
        :class:`HoverMaps` (:class:`HoverCoreMaps` with a core class) or :class:`StarDistMaps` of
        ``image`` at its own scale, with the same window and flips, the mirrored context cropped
        away (for inspecting a segmentation and for trying other post-processing on the same
        maps, :func:`hover_steps`). Whole slides (above :data:`TILED_PIXELS`) are refused: their
        StarDist maps are never held whole."""
        model, _, x = self._prepare(image, category)
        if x.shape[0] * x.shape[1] > TILED_PIXELS:
            raise CellSegError(
                f"maps: a {x.shape[0]} x {x.shape[1]} image is a whole slide, segmented in "
                "blocks without its full maps; crop a region to inspect"
            )
        pad = self.mirror_context
        out = self._maps(model, mirror_pad(x, pad), progress)
        return type(out)(*(crop_context(m, pad) for m in out))

    def _prepare(self, image, category) -> tuple[StreamModel, int, np.ndarray]:
        """The model, class and network input (normalised, float32 in [0, 1]) of ``image``."""
        from cellseg_lite import io

        source = "image"
        if isinstance(image, str | os.PathLike):
            source = image
            image = io.read_image(image)
        image = as_image(image, source)
        if category is None:
            category = self.route(image)
        elif not (isinstance(category, int | np.integer) and 0 <= category <= 3):
            raise CellSegError(f"category: expected a class 0-3, got {category!r}")
        category = int(category)
        model = self.models[category]
        if self.routing_name == "code" and image.shape[0] > CODE_TALL_IMAGE:
            model = next(m for c, m in self.models.items() if m.stream == "stardist")
        x = io.normalize_image(image, source=source, sparse_cells=self.sparse_cells)
        return model, category, x.astype(np.float32) / 255.0

    def _segment_at(self, model: StreamModel, x: np.ndarray, scale: float, progress: bool):
        """One pass over ``x`` resized by ``scale``, its labels at ``x``'s size."""
        if scale == 1.0:
            return self._segment(model, x, progress)
        return _shrink_labels(self._segment(model, _enlarge(x, scale), progress), x)

    def _wants_upscale(self, labels: np.ndarray, category: int, model: StreamModel) -> bool:
        """Whether the first pass's ``labels`` of an image of class ``category`` hold nuclei too
        small for the scale of ``model``'s maps (and the enlarged image still fits in memory
        without the tiled path)."""
        threshold = self.upscale_below(model)
        if (
            threshold is None
            or len(self.map_scales_for(model)) > 1
            or category not in self.upscale_classes
            or labels.size * self.upscale**2 > TILED_PIXELS
        ):
            return False
        return bool(inscribed_diameter(labels) < threshold)  # nan (no cells): no

    def upscale_below(self, model: StreamModel) -> float | None:
        """The first-pass cell diameter (pixels) below which ``model``'s images of the
        :attr:`upscale_classes` get the second, larger pass: :attr:`min_diameter` scaled by the
        model's output stride over :data:`MIN_DIAMETER_STRIDE`; ``None`` when the pass is off."""
        if self.min_diameter is None:
            return None
        stride = getattr(getattr(model.model, "unet", None), "output_stride", MIN_DIAMETER_STRIDE)
        return self.min_diameter * stride / MIN_DIAMETER_STRIDE

    def map_scales_for(self, model: StreamModel) -> tuple[float, ...]:
        """The scales whose maps :meth:`segment` averages for ``model``: the segmenter's
        ``map_scales``, else those its thresholds were tuned on (``(1.0,)``: one pass at the
        image's own scale)."""
        if self.map_scales is not None:
            return self.map_scales
        return map_scales_of(model.thresholds.get("map_scales", (1.0,)), "thresholds' map_scales")

    def _tiling(self, x: np.ndarray) -> tuple[int | None, int | None]:
        """``(tile, stride)`` of the sliding window for image ``x`` (both streams alike;
        :func:`window`)."""
        return window(x.shape, self.tile, self.stride, self.whole_image_side)

    def _segment(self, model: StreamModel, x: np.ndarray, progress: bool) -> np.ndarray:
        """One pass over ``x``, with :attr:`mirror_context` pixels of mirrored context around it
        (cropped away after) unless it is a whole slide."""
        from skimage.segmentation import relabel_sequential

        pad = self.mirror_context
        if not pad or x.shape[0] * x.shape[1] > TILED_PIXELS:
            return self._segment_once(model, x, progress)
        labels = self._segment_once(model, mirror_pad(x, pad), progress)
        return relabel_sequential(crop_context(labels, pad))[0]  # cells of the context go

    def _segment_once(self, model: StreamModel, x: np.ndarray, progress: bool) -> np.ndarray:
        from cellseg_lite.streams import stardist as sd_stream

        t = dict(model.thresholds)
        if model.stream == "stardist" and x.shape[0] * x.shape[1] > TILED_PIXELS:
            predict = model_predictor(model.model)
            if self._tta(model):
                predict = flip_averaged(predict, "stardist")
            tile, stride = self._tiling(x)
            return stardist_instances_tiled(
                predict,
                x,
                tile=tile,
                stride=stride,
                batch_size=self.batch_size,
                prob_thresh=t.get("prob_thresh", 0.5),
                nms_thresh=t.get("nms_thresh", 0.4),
                progress=progress,
            )
        maps = self._maps(model, x, progress)
        if model.stream == "stardist":
            return sd_stream.instances(*maps, t.get("prob_thresh", 0.5), t.get("nms_thresh", 0.4))
        return hover_steps(maps, t).labels

    def _tta(self, model: StreamModel) -> bool:
        return bool(model.thresholds.get("tta", False)) if self.tta is None else self.tta

    def _maps(self, model: StreamModel, x: np.ndarray, progress: bool):
        """``model``'s maps of network input ``x`` through the segmenter's window, flips and
        scales (each scale's image with a window of its own)."""
        draw = stardist_maps if model.stream == "stardist" else hover_maps

        def maps_of(image: np.ndarray):
            tile, stride = self._tiling(image)
            return draw(
                model.model,
                image,
                tile=tile,
                stride=stride,
                batch_size=self.batch_size,
                tta=self._tta(model),
                progress=progress,
            )

        pixels = x.shape[0] * x.shape[1]
        scales = [s for s in self.map_scales_for(model) if pixels * s * s <= TILED_PIXELS]
        if scales in ([], [1.0]):
            return maps_of(x)
        out = scale_averaged(lambda image: _stacked(maps_of(image)), x, scales, model.stream)
        return (
            StarDistMaps(out[0], out[1:]) if model.stream == "stardist" else split_hover_maps(out)
        )

    # ----------------------------------------------------------------- one file

    def save(self, path: str | os.PathLike) -> None:
        """Write router, stream models (each once, however many classes it serves), routing and
        thresholds to one file, atomically."""
        from cellseg_lite import __version__, router, train
        from cellseg_lite.io import atomic_write

        unique: list[StreamModel] = []
        index: dict[int, int] = {}
        for category, model in self.models.items():
            for i, seen in enumerate(unique):
                if seen.model is model.model and seen.thresholds == model.thresholds:
                    index[category] = i
                    break
            else:
                index[category] = len(unique)
                unique.append(model)
        checkpoint = {
            "format": MULTISTREAM_FORMAT,
            "layout": _MULTISTREAM_LAYOUT,
            "version": __version__,
            "routing_name": self.routing_name,
            "routing": {int(c): s for c, s in self.routing.items()},
            "tile": self.tile,
            "stride": self.stride,
            "tta": self.tta,
            "map_scales": None if self.map_scales is None else list(self.map_scales),
            "min_diameter": self.min_diameter,
            "upscale": self.upscale,
            "upscale_classes": list(self.upscale_classes),
            "sparse_cells": self.sparse_cells,
            "mirror_context": self.mirror_context,
            "whole_image_side": self.whole_image_side,
            "router": router.checkpoint_dict(self.router),
            "models": [
                {
                    "config": m.config.to_dict(),
                    "thresholds": dict(m.thresholds),
                    "state_dict": train._model_state(m.model),
                }
                for m in unique
            ],
            "classes": {int(c): i for c, i in index.items()},
        }
        with atomic_write(path) as fh:
            torch.save(checkpoint, fh)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device="cpu") -> MultiStreamSegmenter:
        """Read a file written by :meth:`save`; another file kind, a damaged file or weights of
        another architecture raise a :class:`~cellseg_lite.CellSegError` naming the file."""
        from pathlib import Path

        from cellseg_lite import router, train

        path = Path(path)
        checkpoint = load_torch_file(path, "segmenter file")
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != MULTISTREAM_FORMAT:
            kind = checkpoint.get("format") if isinstance(checkpoint, dict) else None
            hint = (
                " (a single-stream checkpoint: load it with train.load_checkpoint)"
                if kind == train.CHECKPOINT_FORMAT
                else ""
            )
            raise CellSegError(f"{where(path)}: is not a cellseg-lite multi-stream segmenter{hint}")
        if checkpoint.get("layout") != _MULTISTREAM_LAYOUT:
            raise CellSegError(
                f"{where(path)}: segmenter layout {checkpoint.get('layout')!r} is not supported "
                f"(this version reads layout {_MULTISTREAM_LAYOUT})"
            )
        the_router = router.from_checkpoint_dict(checkpoint["router"], source=path)
        loaded = []
        for entry in checkpoint["models"]:
            config = train.TrainConfig.from_dict(entry["config"], path)
            model = train.build_model(config, pretrained=False)
            train._load_state(model, entry["state_dict"], path)
            loaded.append(
                StreamModel(model.eval(), config.stream, dict(entry["thresholds"]), config)
            )
        models = {int(c): loaded[i] for c, i in checkpoint["classes"].items()}
        name = checkpoint.get("routing_name", "custom")
        routing = (
            name if name in ROUTINGS else {int(c): s for c, s in checkpoint["routing"].items()}
        )
        segmenter = cls(
            the_router,
            models,
            routing=routing,
            tile=checkpoint.get("tile", 512),
            stride=checkpoint.get("stride"),
            tta=checkpoint.get("tta"),
            map_scales=checkpoint.get("map_scales"),
            min_diameter=checkpoint.get("min_diameter", MIN_DIAMETER),
            upscale=checkpoint.get("upscale", UPSCALE),
            upscale_classes=checkpoint.get("upscale_classes", UPSCALE_CLASSES),
            sparse_cells=checkpoint.get("sparse_cells", True),
            mirror_context=checkpoint.get("mirror_context", MIRROR_CONTEXT),
            whole_image_side=checkpoint.get("whole_image_side", WHOLE_IMAGE_SIDE),
            device=device,
        )
        segmenter.routing_name = str(name)  # e.g. "validated": a table chosen on validation images
        return segmenter
