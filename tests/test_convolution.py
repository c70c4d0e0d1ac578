"""Faster convolution paths of the folded encoders (distillad.convolution) give the default path's results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import conv2d_same
from torch import nn

import distillad.convolution as convolution
from distillad.convolution import depthwise_conv2d, same_padded_conv2d, takes_grouped_gradient


def _inputs(channels: int, out_channels: int, groups: int, kernel: int, size: tuple[int, int],
            channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(sum(size) + kernel + channels)
    images = torch.randn(2, channels, *size, generator=generator)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, channels // groups, kernel, kernel, generator=generator)
    return images, weight, torch.randn(out_channels, generator=generator)


@pytest.mark.parametrize(("kernel", "stride", "size"), [(3, 2, (16, 16)), (5, 2, (16, 16)), (3, 3, (12, 12)),
                                                         (5, 2, (14, 14)), (4, 2, (14, 14))])
@pytest.mark.parametrize("channels_last", [True, False])
def test_same_padding_without_a_padded_copy_equals_timm(kernel: int, stride: int, size: tuple[int, int],
                                                        channels_last: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even sizes pad one pixel more after than before: the strip path, which must not fall back to the pad."""
    images, weight, bias = _inputs(8, 8, 8, kernel, size, channels_last)
    expected = conv2d_same(images, weight, bias, (stride, stride), (0, 0), (1, 1), 8)
    monkeypatch.setattr(convolution, "conv2d_same", None)
    with torch.no_grad():
        output = same_padded_conv2d(images, weight, bias, (stride, stride), (1, 1), 8)
    assert output.shape == expected.shape
    assert torch.equal(output, expected)
    assert output.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize(("size", "dilation"), [((15, 15), 1), ((17, 17), 1), ((16, 16), 2)])
def test_symmetric_same_padding_is_one_convolution_also_under_autograd(size: tuple[int, int], dilation: int,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    images, weight, bias = _inputs(8, 8, 8, 5, size, True)
    stride = 2 if dilation == 1 else 1
    weight.requires_grad_(True)
    expected = conv2d_same(images, weight, bias, (stride, stride), (0, 0), (dilation, dilation), 8)
    monkeypatch.setattr(convolution, "conv2d_same", None)
    output = same_padded_conv2d(images, weight, bias, (stride, stride), (dilation, dilation), 8)
    assert torch.equal(output, expected)


@pytest.mark.parametrize(("channels", "out_channels", "groups", "size", "grad"),
                         [(3, 32, 1, (16, 16), False),  # a stem: its input is smaller than its output
                          (8, 8, 8, (16, 16), True),  # gradients: the strips' backward would cost more
                          (8, 8, 8, (16, 17), False),  # one dimension symmetric, the other not
                          (8, 8, 8, (2, 2), False),  # a single output row: nothing is left for the inner convolution
                          (8, 8, 8, (16, 16), None)])  # traced for export: the runtime folds the pad
def test_other_cases_fall_back_to_timm(channels: int, out_channels: int, groups: int, size: tuple[int, int],
                                       grad: bool | None, monkeypatch: pytest.MonkeyPatch) -> None:
    images, weight, bias = _inputs(channels, out_channels, groups, 3, size, True)
    images.requires_grad_(bool(grad))
    if grad is None:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    calls = []

    def recorded(*args):
        calls.append(args)
        return conv2d_same(*args)

    monkeypatch.setattr(convolution, "conv2d_same", recorded)
    output = same_padded_conv2d(images, weight, bias, (2, 2), (1, 1), groups)
    assert len(calls) == 1
    assert torch.equal(output, conv2d_same(images, weight, bias, (2, 2), (0, 0), (1, 1), groups))


@pytest.mark.parametrize("with_bias", [True, False])
def test_grouped_weight_gradient_equals_the_default_one(with_bias: bool) -> None:
    images, weight, bias = _inputs(6, 6, 6, 5, (9, 11), True)
    output_grad = torch.randn(2, 6, 9, 11, generator=torch.Generator().manual_seed(1))

    def gradients(convolve) -> tuple[str, tuple[torch.Tensor, ...]]:
        leaves = [t.clone().requires_grad_(True) for t in (images, weight, bias if with_bias else None)
                  if t is not None]
        output = convolve(*leaves[:2], leaves[2] if with_bias else None)
        return type(output.grad_fn).__name__, torch.autograd.grad(output, leaves, output_grad)

    path, grouped = gradients(lambda x, w, b: depthwise_conv2d(x, w, b, (2, 2)))
    _, default = gradients(lambda x, w, b: F.conv2d(x, w, b, 1, (2, 2), 1, 6))
    assert path == "_DepthwiseConv2dBackward"
    assert len(grouped) == (3 if with_bias else 2)
    for ours, expected in zip(grouped, default, strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_only_large_stride_1_depthwise_kernels_take_the_grouped_gradient() -> None:
    assert takes_grouped_gradient(nn.Conv2d(8, 8, 5, padding=2, groups=8))
    assert not takes_grouped_gradient(nn.Conv2d(8, 8, 3, padding=1, groups=8))  # oneDNN's depthwise kernel
    assert not takes_grouped_gradient(nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8))
    assert not takes_grouped_gradient(nn.Conv2d(8, 16, 5, padding=2, groups=8))
    assert not takes_grouped_gradient(nn.Conv2d(8, 8, 5, padding="same", groups=8))


def test_without_gradient_the_depthwise_convolution_is_plain() -> None:
    images, weight, bias = _inputs(6, 6, 6, 5, (9, 9), True)
    weight.requires_grad_(True)
    with torch.no_grad():
        output = depthwise_conv2d(images, weight, bias, (2, 2))
    assert output.grad_fn is None
    assert torch.equal(output, F.conv2d(images, weight, bias, 1, (2, 2), 1, 6))


def test_under_autocast_the_output_has_autocast_s_dtype_and_values(monkeypatch: pytest.MonkeyPatch) -> None:
    images, weight, bias = _inputs(8, 8, 8, 3, (16, 16), True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = conv2d_same(images, weight, bias, (2, 2), (0, 0), (1, 1), 8)
        monkeypatch.setattr(convolution, "conv2d_same", None)
        output = same_padded_conv2d(images, weight, bias, (2, 2), (1, 1), 8)
    assert output.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(output, expected)
