"""Group sizes that do not tile a layer's width fall back to the largest divisor below them."""

import pytest
import torch
from torch import nn

from sliderquant.layers import QuantLinear
from sliderquant.quantizer import layer_group_size


@pytest.mark.parametrize("width,group,want", [
    (576, 128, 96),     # SmolLM2 hidden size with g128: 576 = 6 x 96
    (1536, 128, 128),   # divides: unchanged
    (576, 64, 64),
    (172, 64, 43),      # stories260k intermediate size: 172 = 4 x 43
    (64, 128, None),    # a group at least as wide as the row is per-channel
    (576, None, None),
])
def test_layer_group_size(width, group, want):
    assert layer_group_size(width, group) == want


def test_quant_linear_uses_the_fallback_and_lands_on_its_grid():
    lin = nn.Linear(576, 8, bias=False)
    q = QuantLinear(lin, wbits=3, group_size=128)
    assert q.group_size == 96 and q.lwc_upper.shape == (8, 6)
    q.finalize()
    w = q.weight.reshape(8, 6, 96)
    s, z = q.scales.unsqueeze(-1), q.zeros.unsqueeze(-1)
    codes = torch.round(w / s + z)
    assert torch.all((codes >= 0) & (codes <= 7))
    torch.testing.assert_close((codes - z) * s, w)


@pytest.mark.parametrize("group", [0, -3, 2.5, True])
def test_bad_group_sizes_are_refused_with_a_sentence(group):
    # before the shared check (limits.check_group_size): ZeroDivisionError or an empty max()
    from sliderquant.quantizer import n_groups
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        layer_group_size(64, group)
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        n_groups(64, group)
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        QuantLinear(nn.Linear(64, 8), wbits=3, group_size=group)


def test_n_groups_needs_a_divisor():
    from sliderquant.quantizer import n_groups
    assert (n_groups(576, 96), n_groups(576, None), n_groups(576, 576)) == (6, 1, 1)
    with pytest.raises(ValueError, match="does not divide the 576 input features"):
        n_groups(576, 128)
