"""Residual blocks shared by the RD-style bottleneck and decoder.

ResNet encoders get ResNet blocks (timm's ``Bottleneck`` / ``BasicBlock``, with the encoder's own
expansion and base width), as in the official RD code; every other encoder gets basic residual
blocks. :func:`block_family` reads the family off the encoder instead of an if-chain over names.
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from distillad.backbones import StagedEncoder


@dataclass(frozen=True)
class BlockFamily:
    """How to build residual blocks that match an encoder.

    Attributes:
        bottleneck: Use bottleneck blocks (1x1 - 3x3 - 1x1) with ``expansion`` 4, else basic blocks.
        base_width: Bottleneck base width (64 for ResNet-50, 128 for WideResNet-50-2).
        depths: Residual blocks per encoder stage 1-3 (the official RD decoder reuses these counts).
    """

    bottleneck: bool = False
    base_width: int = 64
    depths: tuple[int, int, int] = (2, 2, 2)

    @property
    def expansion(self) -> int:
        return Bottleneck.expansion if self.bottleneck else BasicBlock.expansion


def block_family(encoder: StagedEncoder) -> BlockFamily:
    """Detect the residual-block family of ``encoder`` (ResNet bottleneck, ResNet basic, or generic)."""
    last = list(encoder.stages[-1].children())[-1]
    if isinstance(last, Bottleneck):
        planes = last.conv3.out_channels // Bottleneck.expansion
        base_width = 64 * last.conv1.out_channels // planes
        depths = tuple(sum(isinstance(m, Bottleneck) for m in stage.children()) for stage in encoder.stages[:3])
        return BlockFamily(bottleneck=True, base_width=base_width, depths=depths)
    if isinstance(last, BasicBlock):
        depths = tuple(sum(isinstance(m, BasicBlock) for m in stage.children()) for stage in encoder.stages[:3])
        return BlockFamily(bottleneck=False, depths=depths)
    return BlockFamily()


def residual_stage(family: BlockFamily, in_channels: int, out_channels: int, depth: int, stride: int = 1) -> nn.Sequential:
    """``depth`` residual blocks mapping ``in_channels`` to ``out_channels``; the first may stride."""
    planes = out_channels // family.expansion
    blocks = []
    for index in range(depth):
        block_in = in_channels if index == 0 else out_channels
        block_stride = stride if index == 0 else 1
        downsample = None
        if block_in != out_channels or block_stride != 1:
            downsample = nn.Sequential(
                nn.Conv2d(block_in, out_channels, 1, stride=block_stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        if family.bottleneck:
            blocks.append(Bottleneck(block_in, planes, stride=block_stride, downsample=downsample,
                                     base_width=family.base_width))
        else:
            blocks.append(BasicBlock(block_in, out_channels, stride=block_stride, downsample=downsample))
    return nn.Sequential(*blocks)


class UpsamplingResidualBlock(nn.Module):
    """A residual block that doubles the resolution with 2x2 transposed convolutions (RD's de-block).

    Bottleneck family: 1x1 -> 2x2 deconv (stride 2) -> 1x1, as the official RD ``deBottleneck``;
    basic family: 2x2 deconv -> 3x3. The shortcut is a 2x2 deconv with BatchNorm.
    """

    def __init__(self, family: BlockFamily, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if family.bottleneck:
            width = out_channels // family.expansion * family.base_width // 64
            self.body = nn.Sequential(
                nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.ConvTranspose2d(width, width, 2, stride=2, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
            )
        else:
            self.body = nn.Sequential(
                nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False), nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            )
        self.shortcut = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.activation = nn.ReLU(inplace=True)

    def forward(self, features):
        return self.activation(self.body(features) + self.shortcut(features))
