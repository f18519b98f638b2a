"""ConvNeXt-UNet: a timm ConvNeXt encoder with a U-Net decoder, the network under both streams.

Lou, Yu et al. (NeurIPS 2022 Cell Segmentation Challenge) put a ConvNeXt-small encoder
(Liu et al., "A ConvNet for the 2020s", CVPR 2022) under a U-Net decoder, and one 1x1 head per
output map. The paper's text and the authors' released code describe two different decoders; both
are here, behind ``decoder=``:

``"code"``
    The released code: four MONAI-style up blocks (MONAI's ``FlexibleUNet``/``UpCat``). Each
    halves its channels with a 1x1 convolution, upsamples x2 (nearest), concatenates the encoder
    skip (none in the last block) and applies 2 x [conv 3x3, BatchNorm, ReLU]. The decoder ends
    at stride 2; the head upsamples x2.
``"paper"``
    The paper's text: four Conv-ReLU-BN blocks (conv 3x3, then ReLU, then BatchNorm). The first
    works on the stride-32 features, the other three upsample x2 (nearest) and concatenate the
    encoder skip. The decoder ends at stride 4; the head upsamples x4. (The paper does not say
    which blocks upsample; four blocks that reach stride 4 from 32 upsample three times.)

The default is ``"paper"``: in ``benchmarks/bench_models.py`` (convnext_atto, synthetic data, equal
training time, two seeds) the two decoders reached the same foreground Dice at equal numbers of
steps and at the end of the budget, and the paper's decoder, working at stride 4, takes about
1.5 times less time per training step on a CPU; it also follows the project's rule that the
paper's values are the defaults and the code's a named alternative.

The heads are a single 1x1 convolution with ``out_channels`` outputs (K parallel 1x1 heads are
one 1x1 convolution with K outputs) followed by bilinear upsampling to the input size; the
activation is left to the stream (sigmoid/ReLU for StarDist, softmax/identity for HoVer).

Inputs of any height and width work: they are padded (reflect) to a multiple of 32 and the output
is cropped back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation

from cellseg_lite._errors import CellSegError
from cellseg_lite._weights import build_with_pretrained

__all__ = [
    "DECODERS",
    "DEFAULT_DECODER",
    "CodeUpBlock",
    "ConvNeXtUNet",
    "ConvReLUBN",
    "PaperUpBlock",
    "convnext_names",
    "count_parameters",
    "pad_to_multiple",
]

DECODERS = ("code", "paper")
DEFAULT_DECODER = "paper"  # see the module docstring and benchmarks/RESULTS.md
DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32)
MULTIPLE = 32  # the encoder's total stride: inputs are padded to a multiple of it
PAD_MODES = ("reflect", "replicate", "constant")

# BatchNorm settings of MONAI's FlexibleUNet decoder, which the authors' code uses.
_MONAI_BN_EPS = 1e-3


# --------------------------------------------------------------------------- helpers


def convnext_names() -> list[str]:
    """Names of the timm ConvNeXt (v1 and v2) encoders this U-Net accepts, e.g. ``convnext_atto``.

    A pretrained tag may be appended (``convnext_small.fb_in22k``) to choose which weights
    ``pretrained=True`` fetches; the authors' code used ImageNet-22k weights.
    """
    import timm

    return sorted(timm.list_models(["convnext_*", "convnextv2_*"]))


def _check_backbone(name) -> str:
    import timm

    names = convnext_names()
    if not isinstance(name, str):
        raise CellSegError(
            f"backbone: expected a model name such as 'convnext_small', got {name!r}"
        )
    base, _, tag = name.partition(".")
    if base not in names:
        raise CellSegError(
            f"backbone: unknown ConvNeXt {name!r}; valid names: {', '.join(names)}"
            " (optionally with a pretrained tag, e.g. 'convnext_small.fb_in22k')"
        )
    if tag:
        tags = timm.list_pretrained(f"{base}.*")
        if name not in tags:
            raise CellSegError(
                f"backbone: {base!r} has no pretrained tag {tag!r}; valid: {', '.join(tags)}"
            )
    return name


def pad_to_multiple(
    x: torch.Tensor, multiple: int = MULTIPLE, *, mode: str = "reflect"
) -> torch.Tensor:
    """Pad ``(B, C, H, W)`` at the bottom and right so that H and W are multiples of ``multiple``.

    ``mode`` is ``"reflect"`` (mirror the border, no artificial edge for the convolutions to
    see), ``"replicate"`` or ``"constant"`` (zeros). Reflection needs the padding to be smaller
    than the side, so a side shorter than its padding (under ``multiple / 2`` pixels) is
    replicated instead. Crop back with ``y[..., :H, :W]``.
    """
    if mode not in PAD_MODES:
        raise CellSegError(f"mode: expected one of {', '.join(PAD_MODES)}, got {mode!r}")
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    if mode == "reflect" and (pad_h >= h or pad_w >= w):
        mode = "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- blocks


class CodeUpBlock(nn.Module):
    """One up block of the authors' decoder (MONAI's ``UpCat``), ``(B, C_in, h, w)`` to
    ``(B, C_out, 2h, 2w)``.

    An optional 1x1 convolution halves the channels (``halve``), nearest upsampling x2, then
    the encoder skip (if any) is concatenated in front and 2 x [conv 3x3, BatchNorm, ReLU] mix them.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, *, halve: bool):
        super().__init__()
        up_channels = in_channels // 2 if halve else in_channels
        self.reduce = nn.Conv2d(in_channels, up_channels, 1) if halve else nn.Identity()
        norm = lambda c: nn.BatchNorm2d(c, eps=_MONAI_BN_EPS)  # noqa: E731
        self.convs = nn.Sequential(
            Conv2dNormActivation(skip_channels + up_channels, out_channels, 3, norm_layer=norm),
            Conv2dNormActivation(out_channels, out_channels, 3, norm_layer=norm),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(self.reduce(x), scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([skip, x], dim=1)
        return self.convs(x)


class ConvReLUBN(nn.Sequential):
    """Conv 3x3, ReLU, BatchNorm in the paper's order: ``(B, C_in, h, w)`` to ``(B, C_out, h, w)``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(out_channels),
        )


class PaperUpBlock(nn.Module):
    """One block of the paper's decoder: optional nearest upsampling x2, concatenation of the
    encoder skip, one :class:`ConvReLUBN`; ``(B, C_in, h, w)`` to ``(B, C_out, 2h, 2w)`` (or
    ``(h, w)`` for the first block, which does not upsample)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, *, upsample: bool):
        super().__init__()
        self.upsample = upsample
        self.block = ConvReLUBN(skip_channels + in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([skip, x], dim=1)
        return self.block(x)


def _code_decoder(encoder_channels, decoder_channels) -> nn.ModuleList:
    # MONAI's UNetDecoder wiring for a 4-stage encoder: the deepest stage (3) feeds block 1, the
    # skips of blocks 1-3 are stages 2, 1, 0 (strides 16, 8, 4) and block 4 (stride 2) has none.
    in_channels = [encoder_channels[-1], *decoder_channels[:-1]]
    skips = [*encoder_channels[-2::-1], 0]
    halves = [True] * (len(decoder_channels) - 1) + [False]
    return nn.ModuleList(
        CodeUpBlock(i, s, o, halve=h)
        for i, s, o, h in zip(in_channels, skips, decoder_channels, halves, strict=True)
    )


def _paper_decoder(encoder_channels, decoder_channels) -> nn.ModuleList:
    # Block 1 refines the stride-32 features; blocks 2-4 upsample to strides 16, 8, 4 with skips.
    in_channels = [encoder_channels[-1], *decoder_channels[:-1]]
    skips = [0, *encoder_channels[-2::-1]]
    upsample = [False] + [True] * (len(decoder_channels) - 1)
    return nn.ModuleList(
        PaperUpBlock(i, s, o, upsample=u)
        for i, s, o, u in zip(in_channels, skips, decoder_channels, upsample, strict=True)
    )


# --------------------------------------------------------------------------- model


class ConvNeXtUNet(nn.Module):
    """ConvNeXt encoder (timm, ``features_only``, strides 4, 8, 16, 32) with a U-Net decoder and
    a 1x1 head: ``(B, 3, H, W)`` float to ``(B, out_channels, H, W)`` raw outputs (no activation).

    ``backbone`` is any name from :func:`convnext_names` (``"convnext_small"`` in the paper,
    ``"convnext_atto"`` for CPU runs); ``pretrained=True`` fetches ImageNet weights and falls back
    to random initialisation with a :class:`~cellseg_lite._weights.PretrainedWeightsWarning` when
    offline. ``decoder`` selects the authors' code (``"code"``, output stride 2) or the paper's text
    (``"paper"``, output stride 4, the default); ``decoder_channels`` are the four blocks' widths, by default
    (256, 128, 64, 32) as in the authors' StarDist model. ``pad_mode`` pads inputs whose sides are
    not multiples of 32 (see :func:`pad_to_multiple`).

    Example::

        >>> net = ConvNeXtUNet("convnext_atto", out_channels=33)
        >>> net(torch.zeros(1, 3, 65, 97)).shape
        torch.Size([1, 33, 65, 97])
    """

    def __init__(
        self,
        backbone: str = "convnext_small",
        pretrained: bool = False,
        *,
        out_channels: int = 1,
        decoder: str = DEFAULT_DECODER,
        decoder_channels: tuple[int, ...] | None = None,
        pad_mode: str = "reflect",
    ):
        super().__init__()
        backbone = _check_backbone(backbone)
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise CellSegError(f"out_channels: expected a positive integer, got {out_channels!r}")
        if decoder not in DECODERS:
            raise CellSegError(
                f"decoder: expected one of {', '.join(map(repr, DECODERS))}, got {decoder!r}"
            )
        if pad_mode not in PAD_MODES:
            raise CellSegError(
                f"pad_mode: expected one of {', '.join(PAD_MODES)}, got {pad_mode!r}"
            )
        decoder_channels = (
            DEFAULT_DECODER_CHANNELS if decoder_channels is None else decoder_channels
        )
        try:
            decoder_channels = tuple(decoder_channels)
        except TypeError:
            decoder_channels = ()
        if len(decoder_channels) != 4 or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 2 for c in decoder_channels
        ):
            raise CellSegError(
                f"decoder_channels: expected 4 integers >= 2 (one per decoder block), got {decoder_channels!r}"
            )

        import timm

        self.encoder = build_with_pretrained(
            lambda weights: timm.create_model(backbone, pretrained=weights, features_only=True),
            f"ConvNeXtUNet encoder {backbone}",
            pretrained,
        )
        reductions = tuple(self.encoder.feature_info.reduction())
        if reductions != (4, 8, 16, 32):  # every timm ConvNeXt has these; guard against surprises
            raise CellSegError(
                f"backbone: {backbone!r} has strides {reductions}, expected (4, 8, 16, 32)"
            )

        self.backbone = backbone
        self.out_channels = out_channels
        self.decoder = decoder
        self.pad_mode = pad_mode
        self.encoder_channels = tuple(self.encoder.feature_info.channels())
        self.decoder_channels = decoder_channels
        self.output_stride = 2 if decoder == "code" else 4
        build = _code_decoder if decoder == "code" else _paper_decoder
        self.decoder_blocks = build(self.encoder_channels, decoder_channels)
        self.head = nn.Conv2d(decoder_channels[-1], out_channels, 1)

    # The three stages, separately callable so that two heads can share one backbone.

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features of ``x`` padded to a multiple of 32: four tensors
        ``(B, C_i, H'/s, W'/s)`` for strides s = 4, 8, 16, 32 (``C_i`` = :attr:`encoder_channels`)."""
        x = self._check_input(x)
        return self.encoder(pad_to_multiple(x, mode=self.pad_mode))

    def forward_decoder(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Decoder output ``(B, decoder_channels[-1], H'/s, W'/s)`` from the four encoder features,
        with s = :attr:`output_stride` (2 for ``"code"``, 4 for ``"paper"``)."""
        *_, x = self._decode(features)
        return x

    def _decode(self, features: list[torch.Tensor]):
        """Yield the output of every decoder block in turn."""
        skips = features[-2::-1]  # strides 16, 8, 4
        # "code": blocks 1-3 take the skips, block 4 none; "paper": block 1 none, blocks 2-4 the skips
        skips = [*skips, None] if self.decoder == "code" else [None, *skips]
        x = features[-1]
        if self.training and self.decoder == "paper" and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            raise CellSegError(
                "x: in training mode the paper decoder's first BatchNorm (at stride 32) needs more "
                "than one value per channel, and one image of at most 32 x 32 pixels gives one: use "
                "a batch of 2 or more, a larger patch, eval mode or decoder='code'"
            )
        for block, skip in zip(self.decoder_blocks, skips, strict=True):
            x = block(x, skip)
            yield x

    def forward_head(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """1x1 head on the decoder output, bilinear upsampling by the output stride, crop to ``size``."""
        x = self.head(x)
        x = F.interpolate(
            x, scale_factor=float(self.output_stride), mode="bilinear", align_corners=False
        )
        return x[..., : size[0], : size[1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` float to ``(B, out_channels, H, W)`` raw head outputs, any H and W."""
        size = tuple(self._check_input(x).shape[-2:])
        return self.forward_head(self.forward_decoder(self.forward_features(x)), size)

    # Summaries for the book.

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the encoder, the decoder, the head and in total."""
        parts = {
            "encoder": count_parameters(self.encoder),
            "decoder": count_parameters(self.decoder_blocks),
            "head": count_parameters(self.head),
        }
        parts["total"] = sum(parts.values())
        return parts

    @torch.no_grad()
    def shapes(self, size: tuple[int, int] = (256, 256)) -> list[tuple[str, int, tuple[int, ...]]]:
        """``(part, stride, (C, h, w))`` of every encoder stage, decoder block and the head for
        one ``size`` input (padded sizes for sides that are not multiples of 32)."""
        was_training = self.training
        self.eval()
        try:
            param = next(self.parameters())
            x = torch.zeros(1, 3, *size, dtype=param.dtype, device=param.device)
            features = self.forward_features(x)
            padded = pad_to_multiple(x, mode=self.pad_mode).shape[-1]
            rows = [
                (f"encoder stage {i}", padded // f.shape[-1], tuple(f.shape[1:]))
                for i, f in enumerate(features)
            ]
            for i, y in enumerate(self._decode(features)):
                rows.append((f"decoder block {i + 1}", padded // y.shape[-1], tuple(y.shape[1:])))
            out = self.forward_head(y, size)
            rows.append(("head (1x1 conv, upsample)", 1, tuple(out.shape[1:])))
            return rows
        finally:
            self.train(was_training)

    def describe(self, size: tuple[int, int] = (256, 256)) -> str:
        """A plain-text table of :meth:`shapes` and :meth:`parameter_counts`."""
        counts = self.parameter_counts()
        lines = [
            f"ConvNeXtUNet({self.backbone!r}, decoder={self.decoder!r}, out_channels={self.out_channels})",
            f"input (1, 3, {size[0]}, {size[1]})",
            f"{'part':<28}{'stride':>7}  shape (C, h, w)",
        ]
        for part, stride, shape in self.shapes(size):
            lines.append(f"{part:<28}{stride:>7}  {shape}")
        lines.append(
            "parameters: " + ", ".join(f"{name} {value:,}" for name, value in counts.items())
        )
        return "\n".join(lines)

    @staticmethod
    def _check_input(x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise CellSegError(f"x: expected a torch.Tensor (B, 3, H, W), got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise CellSegError(f"x: expected a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise CellSegError(f"x: expected a float tensor, got {x.dtype}")
        return x
