"""The short causal convolution against its definition, y[t] = sum_j w[j] x[t - (K-1-j) d], and transformers' layout."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanollm.components import VECTOR, param_roles
from nanollm.components.conv import CausalConv1d


def by_definition(conv: CausalConv1d, x: torch.Tensor) -> torch.Tensor:
    """The sum written out, one output position at a time."""
    kernel, dilation = conv.kernel_size[0], conv.dilation[0]
    out = torch.zeros_like(x)
    for t in range(x.shape[1]):
        for j in range(kernel):
            source = t - (kernel - 1 - j) * dilation
            if source >= 0:
                out[:, t] += conv.weight[:, 0, j] * x[:, source]
    return out + (conv.bias if conv.bias is not None else 0)


@pytest.mark.parametrize("kernel, dilation, bias", [(4, 1, False), (3, 2, True), (1, 1, True)])
def test_causal_conv_equals_its_definition_and_its_decoding_form(kernel: int, dilation: int, bias: bool) -> None:
    torch.manual_seed(0)
    conv = CausalConv1d(6, kernel, bias=bias, dilation=dilation)
    x = torch.randn(2, 11, 6)
    full = conv(x)
    torch.testing.assert_close(full, by_definition(conv, x), atol=1e-6, rtol=0)
    past = conv.state(2, "cpu", torch.float32)
    # a chunk shorter than the span, one longer, then token by token
    steps = [conv.decode(x[:, :1], past), conv.decode(x[:, 1:7], past)] + [conv.decode(x[:, t:t + 1], past) for t in range(7, 11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-6, rtol=0)
    assert past.shape == (2, conv.span - 1, 6)


def test_causal_conv_equals_transformers_padded_and_truncated_convolution() -> None:
    torch.manual_seed(0)
    conv = CausalConv1d(5, 4, bias=True)
    x = torch.randn(1, 9, 5)
    theirs = F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=3, groups=5)[..., :9].transpose(1, 2)
    for form in (conv.by_taps, conv.by_windows, conv.by_convolution):
        torch.testing.assert_close(form(x), theirs, atol=1e-6, rtol=0)


def test_causal_conv_taps_are_vectors_for_the_optimiser() -> None:
    assert set(param_roles(CausalConv1d(4, 3, bias=True)).values()) == {VECTOR}


@pytest.mark.parametrize("kernel, dilation, bias", [(4, 1, True), (3, 2, False), (4, 4, True)])
def test_causal_conv_tap_window_and_convolution_forms_agree_in_values_and_gradients(kernel: int, dilation: int, bias: bool) -> None:
    torch.manual_seed(0)
    conv = CausalConv1d(6, kernel, bias=bias, dilation=dilation)  # (4, 4): the first tap reaches past the start of all 11
    x = torch.randn(2, 11, 6, requires_grad=True)
    probe = torch.randn(2, 11, 6)
    reference = conv.by_convolution(x)
    reference_grads = torch.autograd.grad((reference * probe).sum(), [x, *conv.parameters()])
    for form in (conv.by_taps, conv.by_windows):
        out = form(x)
        torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)
        for ours, theirs in zip(torch.autograd.grad((out * probe).sum(), [x, *conv.parameters()]), reference_grads, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
