import math

import pytest
import torch

from tlese.models.blocks import (
    BLOCK_PLACEMENTS,
    ConvBNAct,
    EffectiveSE,
    InvertedResidual,
    SamePad2d,
    ese_modules,
    ese_state_keys,
)


def test_ese_starts_at_gate_init_and_still_learns():
    ese = EffectiveSE(8, gate_init=0.95)
    x = torch.rand(2, 8, 5, 5) + 0.1
    out = ese(x)
    torch.testing.assert_close(out, 0.95 * x)
    out.square().sum().backward()
    # zero weights still get a gradient (pooled input is non-zero) because the gate is not saturated
    assert ese.fc.weight.grad.abs().min() > 0
    assert ese.fc.bias.grad.abs().min() > 0


def test_ese_refuses_a_saturated_gate():
    with pytest.raises(ValueError, match="saturates"):
        EffectiveSE(4, gate_init=1.0)


def test_ese_is_channelwise_and_has_no_reduction():
    ese = EffectiveSE(6, gate_init=None)
    assert ese.fc.weight.shape == (6, 6, 1, 1) and ese.fc.bias is not None
    x = torch.rand(1, 6, 4, 4)
    ratio = ese(x) / x  # one gate per channel, constant over space, inside [0, 1]
    assert torch.allclose(ratio, ratio[..., :1, :1].expand_as(ratio), atol=1e-6)
    assert ratio.min() >= 0 and ratio.max() <= 1


@pytest.mark.parametrize("size", [7, 8, 224, 225])
def test_same_padding_matches_tensorflow(size):
    pad = SamePad2d(kernel_size=3, stride=2)
    x = torch.zeros(1, 1, size, size)
    padded = pad(x)
    total = max((math.ceil(size / 2) - 1) * 2 + 3 - size, 0)
    assert padded.shape[-1] == size + total
    conv = ConvBNAct(1, 1, 3, stride=2, padding="same")
    assert conv(x).shape[-1] == math.ceil(size / 2)  # SAME: output = ceil(input / stride)
    if size == 224:  # the extra pixel goes bottom/right, as in TensorFlow
        marked = pad(torch.ones(1, 1, size, size))
        assert marked[0, 0, 0, 0] == 1 and marked[0, 0, -1, -1] == 0


@pytest.mark.parametrize(
    "ese, extra",
    [("none", 0), ("expanded", 48 * 48 + 48), ("output", 8 * 8 + 8)],
)
def test_inverted_residual_ese_placement_cost(ese, extra):
    plain = InvertedResidual(8, 8, expand_ratio=6, ese="none")
    block = InvertedResidual(8, 8, expand_ratio=6, ese=ese)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(block) - count(plain) == extra
    assert block.use_residual
    assert block(torch.rand(2, 8, 6, 6)).shape == (2, 8, 6, 6)


def test_inverted_residual_downsamples_without_residual():
    block = InvertedResidual(8, 16, stride=2, expand_ratio=1, kernel_size=5)
    assert not block.use_residual
    assert isinstance(block.expand, torch.nn.Identity)
    assert block(torch.rand(1, 8, 9, 9)).shape == (1, 16, 5, 5)


def test_a_block_without_ese_has_an_identity_in_its_place():
    block = InvertedResidual(8, 8, expand_ratio=6)
    assert isinstance(block.ese, torch.nn.Identity) and not ese_modules(block)
    gated = InvertedResidual(8, 8, expand_ratio=6, ese="output")
    assert {k for k in gated.state_dict()} - {k for k in block.state_dict()} == {"ese.fc.weight", "ese.fc.bias"}


def test_a_block_takes_only_block_placements():
    assert BLOCK_PLACEMENTS == ("none", "expanded", "output")
    with pytest.raises(ValueError, match="unknown ESE placement 'stage'; valid: none, expanded, output$"):
        InvertedResidual(8, 8, ese="stage")  # which blocks are gated is the backbone table's business


def test_ese_is_found_by_type_not_by_name():
    class Renamed(torch.nn.Module):  # a gate under any attribute name still counts
        def __init__(self):
            super().__init__()
            self.attention = EffectiveSE(4)
            self.conv = torch.nn.Conv2d(4, 4, 1)

    model = Renamed()
    assert [name for name, _ in ese_modules(model)] == ["attention"]
    assert ese_state_keys(model) == {"attention.fc.weight", "attention.fc.bias"}
