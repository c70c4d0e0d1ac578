"""Two convolutions of the folded encoders, computed faster than PyTorch's default path with the same results.

**TensorFlow-"same" padding without a padded copy.** timm's ``Conv2dSame`` (EfficientNet's stride-2 layers) pads
its input with ``F.pad`` before every call, because the padding is one pixel larger after than before. For the
largest of Lite0's depthwise layers (32 x 96 x 128 x 128, float32, 2 threads) that copy of 200 MB took most of
the 42 ms forward. In passes without gradient (frozen teachers, no-grad student passes, inference),
:func:`same_padded_conv2d` computes the same output in 17 ms: a convolution with the smaller, symmetric padding
gives every output but the last row and column, and convolutions of the input's last rows and columns (padded:
a few rows, not the map) give those. On an odd-sized input the "same" padding is symmetric and one convolution
with it is the whole answer, with or without gradient.

**Weight gradients of large depthwise kernels.** oneDNN computes the weight gradient of a 3x3 depthwise
convolution with its depthwise kernel, but that of a 5x5 one with its generic kernel: in DMDD's student (Lite0,
256 px, 32 images, 2 threads, float32) the 5x5 weight gradients took 229 ms of a 1,488 ms forward + backward
(``benchmarks/results/conv_kernels.md``). Per image and channel, dL/dW is the correlation of the padded input
with the output gradient, so all of them are one convolution with N x C groups whose kernels are the output
gradients, summed over the batch afterwards. Forward + backward of Lite0's stride-1 5x5 layers took 1.5-2.1x less
time that way, with weight gradients within 2e-6 (relative) of oneDNN's, so :func:`depthwise_conv2d` takes that
path where it pays: stride 1, kernels larger than 3x3, weights that need a gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import conv2d_same


class _DepthwiseConv2d(torch.autograd.Function):
    """``F.conv2d(input, weight, bias, 1, padding, 1, groups=C)`` with the grouped-convolution weight gradient."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(input, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return F.conv2d(input, weight, bias, 1, padding, 1, input.shape[1])

    @staticmethod
    def backward(ctx, output_grad: torch.Tensor):
        input, weight = ctx.saved_tensors
        channels = input.shape[1]
        input_grad = weight_grad = bias_grad = None
        if ctx.needs_input_grad[0]:
            input_grad = torch.ops.aten.convolution_backward(
                output_grad, input, weight, None, [1, 1], list(ctx.padding), [1, 1], False, [0, 0], channels,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            weight_grad = depthwise_weight_gradient(input, output_grad, weight.shape[-2:], ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            bias_grad = output_grad.sum((0, 2, 3))
        return input_grad, weight_grad, bias_grad, None


def depthwise_weight_gradient(input: torch.Tensor, output_grad: torch.Tensor, kernel_size: tuple[int, int],
                              padding: tuple[int, int]) -> torch.Tensor:
    """dL/dW (C, 1, kh, kw) of a stride-1 depthwise convolution of ``input`` (N, C, H, W) given dL/d output."""
    batch, channels = input.shape[:2]
    grouped = F.conv2d(input.contiguous().view(1, batch * channels, *input.shape[-2:]),
                       output_grad.contiguous().view(batch * channels, 1, *output_grad.shape[-2:]),
                       padding=padding, groups=batch * channels)
    return grouped[..., : kernel_size[0], : kernel_size[1]].view(batch, channels, *kernel_size).sum(0).unsqueeze(1)


def takes_grouped_gradient(conv: torch.nn.Conv2d) -> bool:
    """Whether ``conv`` is a depthwise convolution that :func:`depthwise_conv2d` computes faster."""
    return (conv.groups == conv.in_channels == conv.out_channels > 1 and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and max(conv.kernel_size) > 3 and isinstance(conv.padding, tuple))


def depthwise_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     padding: tuple[int, int]) -> torch.Tensor:
    """A stride-1 depthwise convolution; its weight gradient comes from one grouped convolution (module docstring)."""
    if torch.is_grad_enabled() and weight.requires_grad:
        return _DepthwiseConv2d.apply(input, weight, bias, tuple(padding))
    return F.conv2d(input, weight, bias, 1, padding, 1, input.shape[1])


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's "same" padding (before, after) of one dimension."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def same_padded_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       stride: tuple[int, int], dilation: tuple[int, int], groups: int) -> torch.Tensor:
    """timm's ``conv2d_same`` (TensorFlow "same" padding), without padding the whole input (module docstring).

    One convolution where both dimensions have symmetric padding. The strips where both have one more pixel
    after than before, the output has at least two rows and columns, the input is larger than the output (a
    depthwise layer, not a 3-channel stem, whose small input costs less to pad than its output costs to
    assemble), no gradient is taken and nothing traces it (``torch.export`` and ONNX keep the pad, which their
    runtimes fold into the convolution). ``conv2d_same`` otherwise. Under autograd the strips would cost more
    than the pad: the backward of each slice of the input is a zeroed tensor of the input's size (forward +
    backward of the largest layer: 283 ms against 117 ms).
    """
    height, width = input.shape[-2:]
    (top, bottom), (left, right) = (_same_padding(size, kernel, step, spacing) for size, kernel, step, spacing
                                    in zip((height, width), weight.shape[-2:], stride, dilation, strict=True))
    if top == bottom and left == right:
        return F.conv2d(input, weight, bias, stride, (top, left), dilation, groups)
    rows, cols = math.ceil(height / stride[0]), math.ceil(width / stride[1])
    if ((bottom, right) != (top + 1, left + 1) or min(rows, cols) < 2
            or input.shape[1] * stride[0] * stride[1] < weight.shape[0]
            or (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))
            or torch.compiler.is_compiling()):
        return conv2d_same(input, weight, bias, stride, (0, 0), dilation, groups)
    first_row, first_col = (rows - 1) * stride[0] - top, (cols - 1) * stride[1] - left
    inner = F.conv2d(input, weight, bias, stride, (top, left), dilation, groups)
    output = torch.empty(input.shape[0], weight.shape[0], rows, cols, dtype=inner.dtype, device=inner.device,
                         memory_format=torch.channels_last if _channels_last(input) else torch.contiguous_format)
    output[..., :-1, :-1] = inner
    last_rows = F.pad(input[..., first_row:, :], (left, right, 0, bottom))
    output[..., -1:, :] = F.conv2d(last_rows, weight, bias, stride, 0, dilation, groups)
    last_cols = F.pad(input[..., first_col:], (0, right, top, bottom))
    output[..., :-1, -1:] = F.conv2d(last_cols, weight, bias, stride, 0, dilation, groups)[..., :-1, :]
    return output


def _channels_last(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()
