"""UAFS: bounded weights, identity at maximal uncertainty, gradient flow."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vqseg.modules.uafs import UAFS


def test_weights_are_bounded_and_shape_is_kept() -> None:
    torch.manual_seed(0)
    block = UAFS(8)
    x = torch.randn(2, 8, 9, 13)
    out = block(x)
    u = block.last_uncertainty
    assert out.shape == x.shape
    assert u is not None and u.shape == (2, 1, 9, 13) and not u.requires_grad
    assert bool(((u >= 0) & (u <= 1)).all())
    torch.testing.assert_close(out, x * (2 - u))


def test_uncertainty_is_normalised_entropy() -> None:
    torch.manual_seed(0)
    block = UAFS(4, m=3)
    x = torch.randn(2, 4, 6, 6)
    p = F.softmax(block.attention(x), dim=1)
    entropy = -(p * p.log()).sum(1, keepdim=True) / math.log(3)
    torch.testing.assert_close(block.uncertainty(x), entropy)


def test_constant_attention_makes_the_block_an_identity() -> None:
    block = UAFS(8)
    last = block.attention[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    x = torch.randn(2, 8, 7, 5)
    out = block(x)
    assert torch.equal(block.last_uncertainty, torch.ones(2, 1, 7, 5))
    assert torch.equal(out, x)


def test_confident_attention_doubles_the_features() -> None:
    block = UAFS(4)
    last = block.attention[-1]
    torch.nn.init.zeros_(last.weight)
    with torch.no_grad():
        last.bias.copy_(torch.tensor([100.0, -100.0]))
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(block(x), 2 * x)


def test_gradient_reaches_the_attention_convolutions() -> None:
    torch.manual_seed(0)
    block = UAFS(8, kernel_size=5)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    block(x).square().mean().backward()
    for conv in (block.attention[0], block.attention[-1]):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert x.grad is not None


def test_autocast_keeps_input_dtype() -> None:
    block = UAFS(4)
    x = torch.randn(1, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x.bfloat16())
    assert out.dtype == torch.bfloat16 and block.last_uncertainty.dtype == torch.float32


@pytest.mark.parametrize(("m", "kernel_size"), [(1, 3), (2, 4)])
def test_rejects_invalid_configuration(m: int, kernel_size: int) -> None:
    with pytest.raises(ValueError):
        UAFS(4, m=m, kernel_size=kernel_size)
