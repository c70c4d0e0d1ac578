"""A student decoder that mirrors an encoder's stages 3, 2, 1 (RD's reverse student)."""

from __future__ import annotations

import torch
from torch import nn

from distillad.components.blocks import BlockFamily, UpsamplingResidualBlock, residual_stage


class MirrorDecoder(nn.Module):
    """Decode a stride-32 embedding into features shaped like the teacher's stages 1-3.

    Each level doubles the resolution with an :class:`UpsamplingResidualBlock` and refines with more
    residual blocks; ResNet encoders get the official RD depths (3, 4, 6 blocks for the levels at
    strides 16, 8, 4 with a ResNet-50 family), other encoders two blocks per level.

    Args:
        embedding_channels: Channels of the bottleneck embedding.
        channels: Teacher channels of stages 1, 2, 3.
        family: Residual-block family matching the encoder.
    """

    def __init__(self, embedding_channels: int, channels: list[int], family: BlockFamily) -> None:
        super().__init__()
        levels = []
        in_channels = embedding_channels
        for out_channels, depth in zip(reversed(channels), family.depths):
            refine = residual_stage(family, out_channels, out_channels, depth - 1) if depth > 1 else nn.Identity()
            levels.append(nn.Sequential(UpsamplingResidualBlock(family, in_channels, out_channels), refine))
            in_channels = out_channels
        self.levels = nn.ModuleList(levels)

    def forward(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        """Return decoded features ordered like the encoder stages (stride 4, 8, 16)."""
        outputs = []
        features = embedding
        for level in self.levels:
            features = level(features)
            outputs.append(features)
        return outputs[::-1]
