"""RepVGG A/B family (paper configurations) and a tiny RepVGG for 32x32 inputs.

Each stage is a run of :class:`~deployplug.blocks.RepVGGBlock`, the first one strided, so the
deploy form is a plain stack of 3x3 conv + ReLU followed by global pooling and a linear layer.
Every builder takes ``quant_friendly=True`` for QARepVGG blocks (see
:class:`~deployplug.blocks.RepVGGBlock`): the same deploy form, with fused kernels that survive
per-tensor int8 quantization.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deployplug.blocks import RepVGGBlock
from deployplug.models.registry import register, with_input_shape

# Blocks numbered from 0 (stage 0) in forward order; these use grouped convs in "g2"/"g4" models.
GROUPED_BLOCKS = frozenset(range(2, 27, 2))


class RepVGG(nn.Module):
    """A stem block followed by stages of RepVGG blocks, global average pool, linear head.

    ``stages`` lists ``(width, depth, stride)``; the stride applies to each stage's first block.
    ``group_map`` maps a block number (stem = 0) to its conv groups; ``quant_friendly``
    builds every block in its QARepVGG form.
    """

    def __init__(self, stem_width: int, stages: Sequence[tuple[int, int, int]],
                 num_classes: int = 1000, in_channels: int = 3, stem_stride: int = 2,
                 group_map: dict[int, int] | None = None, quant_friendly: bool = False):
        super().__init__()
        group_map = group_map or {}
        self.stage0 = RepVGGBlock(in_channels, stem_width, 3, stride=stem_stride,
                                  quant_friendly=quant_friendly)
        in_ch, index = stem_width, 1
        for i, (width, depth, stride) in enumerate(stages, start=1):
            blocks = []
            for j in range(depth):
                blocks.append(RepVGGBlock(in_ch, width, 3, stride=stride if j == 0 else 1,
                                          groups=group_map.get(index, 1),
                                          quant_friendly=quant_friendly))
                in_ch, index = width, index + 1
            setattr(self, f"stage{i}", nn.Sequential(*blocks))
        self.num_stages = len(stages)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage0(x)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{i}")(x)
        return self.linear(torch.flatten(self.gap(x), 1))


def _paper(depths: Sequence[int], a: float, b: float, groups: int, num_classes: int,
           in_channels: int, quant_friendly: bool = False) -> nn.Module:
    widths = (int(64 * a), int(128 * a), int(256 * a), int(512 * b))
    stages = [(w, d, 2) for w, d in zip(widths, depths)]
    group_map = dict.fromkeys(GROUPED_BLOCKS, groups) if groups > 1 else None
    model = RepVGG(min(64, int(64 * a)), stages, num_classes, in_channels, group_map=group_map,
                   quant_friendly=quant_friendly)
    return with_input_shape(model, (1, in_channels, 224, 224))


_A = (2, 4, 14, 1)
_B = (4, 6, 16, 1)
# name: (depths, a, b, groups)
_CONFIGS = {
    "repvgg_a0": (_A, 0.75, 2.5, 1),
    "repvgg_a1": (_A, 1.0, 2.5, 1),
    "repvgg_a2": (_A, 1.5, 2.75, 1),
    "repvgg_b0": (_B, 1.0, 2.5, 1),
    "repvgg_b1": (_B, 2.0, 4.0, 1),
    "repvgg_b1g2": (_B, 2.0, 4.0, 2),
    "repvgg_b1g4": (_B, 2.0, 4.0, 4),
    "repvgg_b2": (_B, 2.5, 5.0, 1),
    "repvgg_b2g4": (_B, 2.5, 5.0, 4),
    "repvgg_b3": (_B, 3.0, 5.0, 1),
    "repvgg_b3g4": (_B, 3.0, 5.0, 4),
}


def _make_builder(name: str):
    depths, a, b, groups = _CONFIGS[name]

    def builder(num_classes: int = 1000, in_channels: int = 3,
                quant_friendly: bool = False) -> nn.Module:
        return _paper(depths, a, b, groups, num_classes, in_channels, quant_friendly)

    builder.__name__ = name
    builder.__doc__ = (f"RepVGG-{name.split('_')[1].upper()}: stages {list(depths)}, "
                       f"width multipliers a={a}, b={b}" + (f", groups {groups}" if groups > 1
                                                            else "") + ".")
    return register(name)(builder)


for _name in _CONFIGS:
    _make_builder(_name)


@register("repvgg_tiny")
def repvgg_tiny(num_classes: int = 1000, in_channels: int = 3, width: int = 8,
                quant_friendly: bool = False) -> nn.Module:
    """Six-block RepVGG for 32x32 inputs (e.g. upsampled 8x8 digits).

    The stem keeps full resolution and three strided stages take 32 -> 16 -> 8 -> 4, so small
    images are not pooled away before the head sees them.
    """
    stages = [(2 * width, 2, 2), (4 * width, 2, 2), (4 * width, 1, 2)]
    model = RepVGG(width, stages, num_classes, in_channels, stem_stride=1,
                   quant_friendly=quant_friendly)
    return with_input_shape(model, (1, in_channels, 32, 32))
