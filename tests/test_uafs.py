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


def test_forward_from_first_principles() -> None:
    """A = conv1x1(ReLU(BN(conv3x3(X)))) with M = 2 channels (defaults), U = H(softmax A) / log M,
    X' = X + X (1 - U); batch norm normalises with the batch statistics in training mode."""
    torch.manual_seed(3)
    block = UAFS(6).train()
    conv, norm, relu, head = block.attention
    assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    assert (conv.in_channels, conv.out_channels, head.in_channels, head.out_channels) == (6, 6, 6, 2)
    assert isinstance(norm, torch.nn.BatchNorm2d) and isinstance(relu, torch.nn.ReLU)
    assert head.kernel_size == (1, 1)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 6, 5, 7)
    z = F.conv2d(x, conv.weight, conv.bias, padding=1)
    mean, var = z.mean(dim=(0, 2, 3), keepdim=True), z.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    z = (z - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    attention = F.conv2d(z.clamp_min(0), head.weight, head.bias)
    p = attention.softmax(1)
    u = -(p * p.log()).sum(1, keepdim=True) / math.log(2)
    out = block(x)
    torch.testing.assert_close(block.last_uncertainty, u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, x + x * (1 - u), atol=1e-5, rtol=1e-5)
