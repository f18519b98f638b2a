"""ConvNeXt-UNet: shapes for any input size, both decoders, gradients, determinism, errors, fallback."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from cellseg_lite import CellSegError
from cellseg_lite._weights import PretrainedWeightsWarning
from cellseg_lite.unet import (
    ConvNeXtUNet,
    convnext_names,
    count_parameters,
    pad_to_multiple,
)


@functools.cache
def _net(
    backbone: str = "convnext_atto", decoder: str = "code", out_channels: int = 1
) -> ConvNeXtUNet:
    """One model per setting for the whole module (building timm models is the slow part)."""
    torch.manual_seed(0)
    return ConvNeXtUNet(backbone, out_channels=out_channels, decoder=decoder).eval()


def _input(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("decoder", ["code", "paper"])
@pytest.mark.parametrize("size", [(65, 97), (31, 33), (256, 256), (7, 40)])
def test_output_has_the_input_size_for_any_side(decoder, size):
    with torch.no_grad():
        out = _net("convnext_atto", decoder, 33)(_input(1, *size))
    assert out.shape == (1, 33, *size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("backbone", "decoder"),
    [("convnext_femto", "code"), ("convnext_nano", "paper"), ("convnextv2_atto", "code")],
)
def test_other_backbones(backbone, decoder):
    net = _net(backbone, decoder, 1)
    with torch.no_grad():
        out = net(_input(2, 64, 96))
    assert out.shape == (2, 1, 64, 96)
    assert net.backbone == backbone and net.decoder == decoder and net.out_channels == 1


def test_convnext_small_matches_the_paper_encoder():
    net = ConvNeXtUNet("convnext_small", out_channels=33).eval()
    assert net.encoder_channels == (96, 192, 384, 768)  # paper-notes section 4
    assert net.decoder_channels == (256, 128, 64, 32)
    with torch.no_grad():
        assert net(_input(1, 64, 64)).shape == (1, 33, 64, 64)


def test_encoder_features_have_strides_4_to_32():
    net = _net()
    with torch.no_grad():
        features = net.forward_features(_input(1, 64, 96))
    assert [tuple(f.shape) for f in features] == [
        (1, 40, 16, 24),
        (1, 80, 8, 12),
        (1, 160, 4, 6),
        (1, 320, 2, 3),
    ]
    assert net.encoder_channels == (40, 80, 160, 320)


@pytest.mark.parametrize(("decoder", "stride"), [("code", 2), ("paper", 4)])
def test_decoder_output_stride(decoder, stride):
    net = _net("convnext_atto", decoder, 1)
    assert net.output_stride == stride
    with torch.no_grad():
        y = net.forward_decoder(net.forward_features(_input(1, 64, 96)))
    assert y.shape == (1, 32, 64 // stride, 96 // stride)
    rows = net.shapes((64, 96))
    assert [stride for _, stride, _ in rows[4:8]] == (
        [16, 8, 4, 2] if decoder == "code" else [32, 16, 8, 4]
    )


# Decoder parameters counted by hand for convnext_atto (stages 40, 80, 160, 320 channels) and
# decoder channels (256, 128, 64, 32): they pin the wiring of each variant.
#  code, block 1: 1x1 320->160 (+bias) 51,360; 3x3 (160+160)->256 737,280; BN 512; 3x3 256->256
#  589,824; BN 512 = 1,379,488. Block 2: 32,896 + 3x3 (80+128)->128 239,616 + 256 + 147,456 + 256
#  = 420,480. Block 3: 8,256 + 59,904 + 128 + 36,864 + 128 = 105,280. Block 4 (no 1x1, no skip):
#  18,432 + 64 + 9,216 + 64 = 27,776. Total 1,933,024.
#  paper: 3x3 320->256 (+bias) 737,536 + BN 512; (160+256)->128 479,360 + 256; (80+128)->64
#  119,872 + 128; (40+64)->32 29,984 + 64. Total 1,367,712.
@pytest.mark.parametrize(("decoder", "expected"), [("code", 1_933_024), ("paper", 1_367_712)])
def test_decoder_parameter_counts(decoder, expected):
    counts = _net("convnext_atto", decoder, 33).parameter_counts()
    assert counts["decoder"] == expected
    assert counts["head"] == 32 * 33 + 33
    assert counts["total"] == count_parameters(_net("convnext_atto", decoder, 33))


def test_describe_lists_stages_and_parameters():
    text = _net().describe((64, 64))
    assert "encoder stage 3" in text and "(320, 2, 2)" in text
    assert "decoder block 4" in text and "(32, 32, 32)" in text
    assert "decoder 1,933,024" in text


def test_odd_input_equals_the_cropped_output_of_its_padded_version():
    net = _net("convnext_atto", "code", 2)
    x = _input(1, 45, 70)
    with torch.no_grad():
        out = net(x)
        padded = net(pad_to_multiple(x))
    assert padded.shape[-2:] == (64, 96)
    torch.testing.assert_close(out, padded[..., :45, :70])


def test_pad_to_multiple_reflects_and_keeps_multiples_untouched():
    x = torch.arange(40.0).reshape(1, 1, 5, 8)
    y = pad_to_multiple(x, 4)
    assert y.shape == (1, 1, 8, 8)
    torch.testing.assert_close(y[0, 0, 5:], x[0, 0, [3, 2, 1]])  # mirrored about the last row
    assert pad_to_multiple(y, 4) is y
    zeros = pad_to_multiple(x, 4, mode="constant")
    assert zeros[0, 0, 5:].abs().sum() == 0


def test_pad_to_multiple_replicates_sides_too_short_to_reflect():
    x = torch.arange(6.0).reshape(1, 1, 2, 3)
    y = pad_to_multiple(x, 32)
    assert y.shape == (1, 1, 32, 32)
    torch.testing.assert_close(y[0, 0, -1, :3], x[0, 0, -1])
    assert y[0, 0, 0, -1] == x[0, 0, 0, -1]


def test_gradients_reach_every_encoder_stage():
    net = copy.deepcopy(_net("convnext_atto", "code", 3)).train()
    net(_input(2, 32, 32)).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    stem = next(p for name, p in net.encoder.named_parameters() if name.startswith("stem"))
    assert stem.grad.abs().sum() > 0
    deepest = [p for name, p in net.encoder.named_parameters() if name.startswith("stages_3")]
    assert all(p.grad.abs().sum() > 0 for p in deepest)


def test_eval_and_train_modes_are_deterministic():
    net = copy.deepcopy(_net("convnext_atto", "paper", 1))
    x = _input(2, 32, 32)
    with torch.no_grad():
        a, b = net(x), net(x)
        net.train()
        c, d = net(x), net(x)  # batch statistics, no dropout: still deterministic
    assert torch.equal(a, b)
    assert torch.equal(c, d)
    assert not torch.allclose(a, c)  # BatchNorm switches between running and batch statistics


def test_channels_last_input_and_model():
    net = _net("convnext_atto", "code", 4)
    x = _input(2, 40, 72)
    with torch.no_grad():
        expected = net(x)
        out = net(x.contiguous(memory_format=torch.channels_last))
        net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        out_cl = net_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_cl, expected, rtol=1e-4, atol=1e-5)


def test_pretrained_offline_falls_back_with_a_warning(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable when imported, which an earlier test may have done
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.warns(PretrainedWeightsWarning, match="convnext_atto.*random initialisation"):
        net = ConvNeXtUNet("convnext_atto.d2_in1k", pretrained=True)
    assert net.backbone == "convnext_atto.d2_in1k"
    with torch.no_grad():
        assert net.eval()(_input(1, 32, 32)).shape == (1, 1, 32, 32)


def test_convnext_names():
    names = convnext_names()
    assert {"convnext_atto", "convnext_small", "convnextv2_atto"} <= set(names)
    assert all(name.startswith("convnext") for name in names)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone": "resnet18"}, r"unknown ConvNeXt 'resnet18'; valid names: .*convnext_atto"),
        ({"backbone": "convnext_smal"}, r"unknown ConvNeXt.*convnext_small"),
        ({"backbone": "convnext_atto.in22k_nope"}, r"no pretrained tag 'in22k_nope'.*d2_in1k"),
        ({"backbone": None}, r"backbone: expected a model name"),
        ({"out_channels": 0}, r"out_channels: expected a positive integer, got 0"),
        ({"out_channels": 2.0}, r"out_channels: expected a positive integer"),
        ({"decoder": "unet"}, r"decoder: expected one of 'code', 'paper', got 'unet'"),
        ({"decoder_channels": (64, 32)}, r"decoder_channels: expected 4 integers"),
        ({"decoder_channels": (64, 32, 16, 1)}, r"decoder_channels: expected 4 integers"),
        ({"decoder_channels": 64}, r"decoder_channels: expected 4 integers"),
        ({"pad_mode": "circular"}, r"pad_mode: expected one of reflect, replicate, constant"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"backbone": "convnext_atto", **kwargs}
    with pytest.raises(CellSegError, match=match):
        ConvNeXtUNet(**kwargs)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(3, 32, 32), r"x: expected a \(B, 3, H, W\) tensor, got shape \(3, 32, 32\)"),
        (torch.zeros(1, 1, 32, 32), r"got shape \(1, 1, 32, 32\)"),
        (
            torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
            r"x: expected a float tensor, got torch.uint8",
        ),
        (None, r"x: expected a torch.Tensor"),
    ],
)
def test_bad_input(x, match):
    with pytest.raises(CellSegError, match=match):
        _net()(x)


def test_pad_to_multiple_bad_mode():
    with pytest.raises(CellSegError, match="mode: expected one of"):
        pad_to_multiple(torch.zeros(1, 1, 5, 5), mode="wrap")


def test_paper_decoder_training_on_one_tiny_image_says_why_it_cannot():
    net = copy.deepcopy(_net("convnext_atto", "paper", 1)).train()
    with pytest.raises(CellSegError, match=r"paper decoder's first BatchNorm.*batch of 2 or more"):
        net(_input(1, 32, 32))
    assert net(_input(2, 32, 32)).shape == (2, 1, 32, 32)  # two images: two values per channel
    assert net(_input(1, 33, 20)).shape == (1, 1, 33, 20)  # padded to 64 x 32: two values
    assert net.eval()(_input(1, 32, 32)).shape == (1, 1, 32, 32)  # running statistics
