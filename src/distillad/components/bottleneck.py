"""One-class bottleneck embedding (OCBE) of Reverse Distillation (Deng & Li, CVPR 2022, Sec. 3.2).

Multi-scale feature fusion (MFF) brings the teacher's stage 1-3 features to the stride of stage 3 with
strided 3x3 convolutions and concatenates them; one-class embedding (OCE) compresses the result with
residual blocks (the first one strided) into a compact embedding at stride 32, with the teacher's
stage-4 width (2048 for WideResNet-50-2, as in the paper).
"""

from __future__ import annotations

import torch
from torch import nn

from distillad.components.blocks import BlockFamily, residual_stage


def _strided_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class OneClassBottleneck(nn.Module):
    """OCBE: MFF + OCE.

    Args:
        channels: Teacher channels of stages 1, 2, 3 (strides 4, 8, 16).
        embedding_channels: Output channels (the teacher's stage-4 width by default in the models).
        family: Residual-block family matching the encoder.
        depth: Residual blocks in OCE (3 in the paper).
    """

    def __init__(self, channels: list[int], embedding_channels: int, family: BlockFamily, depth: int = 3) -> None:
        super().__init__()
        first, second, third = channels
        self.fuse_first = nn.Sequential(_strided_conv(first, second), _strided_conv(second, third))
        self.fuse_second = _strided_conv(second, third)
        self.embed = residual_stage(family, 3 * third, embedding_channels, depth, stride=2)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Fuse the teacher's first three stage features into the one-class embedding."""
        first, second, third = features[:3]
        fused = torch.cat([self.fuse_first(first), self.fuse_second(second), third], dim=1)
        return self.embed(fused)
