"""Multi-branch blocks as third-party code writes them, with no fusion method deployplug knows.

Each block is written from its paper's description of the *training-time* structure only:
the point is that the generic linear-region pass fuses them without any per-block code. None
defines ``fuse`` / ``reparameterize`` / ``switch_to_deploy``; :class:`RepConv` has a fusion
method under a name of its own (as YOLOv7 does), which must not be needed.

* RepVGG (Ding et al., 2021): 3x3 conv+BN, 1x1 conv+BN and an identity BN, summed, ReLU.
* ACB / ACNet (Ding et al., 2019): square, horizontal (1x3) and vertical (3x1) kernels, each
  followed by BN, summed.
* DBB (Ding et al., 2021): k x k conv+BN; 1x1 conv+BN; 1x1 conv -> BN -> k x k conv -> BN; and
  1x1 conv -> BN -> k x k average pool -> BN. The BN before a k x k op pads its output with the
  value that BN gives a zero input, so the border matches a conv over zero padding.
* MobileOne (Vasu et al., 2023): a depthwise stage (k over-parameterized k x k depthwise
  conv+BN branches, a 1x1 depthwise conv+BN scale branch, an identity BN) and a pointwise
  stage (k 1x1 conv+BN branches and an identity BN), each summed and followed by ReLU.
* YOLOv7 / YOLOv6 RepConv: RepVGG's branches with SiLU (v7) or ReLU (v6).
* RepViT's RepVGGDW (Wang et al., 2024): depthwise 3x3 conv+BN + depthwise 1x1 conv (with bias)
  + identity, then one BN over the sum.
* QARepVGG (Chu et al., 2023): 3x3 conv+BN, 1x1 conv without BN, identity without BN, and a
  BN after the sum.
* RepVGG with squeeze-and-excitation: the branches' sum goes through an SE gate, then ReLU.
* OREPA-style (Hu et al., 2022): branches scaled by learned per-channel factors instead of BN
  (k x k; 1x1; 1x1 -> k x k; 1x1 -> average pool), and one BN after the sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int | tuple[int, int], stride: int = 1,
            padding: int | tuple[int, int] = 0, groups: int = 1,
            dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False),
                         nn.BatchNorm2d(cout))


class RepVGGPlain(nn.Module):
    """RepVGG's training block, no conversion method."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1,
                 dilation: int = 1):
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, stride, dilation, groups, dilation)
        self.pointwise = conv_bn(cin, cout, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)


class ACB(nn.Module):
    """Asymmetric convolution block: 3x3, 1x3 and 3x1 branches with their own BN."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.square = conv_bn(cin, cout, 3, stride, 1)
        self.hor = conv_bn(cin, cout, (1, 3), stride, (0, 1))
        self.ver = conv_bn(cin, cout, (3, 1), stride, (1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.square(x) + self.hor(x) + self.ver(x)


class BNAndPad(nn.Module):
    """BatchNorm whose output is padded with the BN's response to a zero input.

    Written as "shift so the pad value is zero, zero-pad, shift back", which is what padding
    with a per-channel constant is.
    """

    def __init__(self, channels: int, pad: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(x)
        if self.pad == 0:
            return out
        bn = self.bn
        value = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
        value = value.view(1, -1, 1, 1)
        return F.pad(out - value, [self.pad] * 4) + value


class DBB(nn.Module):
    """Diverse branch block; ``pad_with_bias=False`` zero-pads the 1x1 -> BN intermediate
    instead (the border case one conv cannot reproduce)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                 pad_with_bias: bool = True):
        super().__init__()
        p = k // 2
        self.origin = conv_bn(cin, cout, k, stride, p, groups)
        self.one = conv_bn(cin, cout, 1, stride, 0, groups)
        self.avg_conv = nn.Conv2d(cin, cout, 1, groups=groups, bias=False)
        self.avg_bn_pad = BNAndPad(cout, p)
        self.avg = nn.AvgPool2d(k, stride, 0)
        self.avg_bn = nn.BatchNorm2d(cout)
        mid = cin if groups < cout else 2 * cin
        self.seq_1x1 = nn.Conv2d(cin, mid, 1, groups=groups, bias=False)
        if pad_with_bias:
            self.seq_bn = BNAndPad(mid, p)
            self.seq_kxk = conv_bn(mid, cout, k, stride, 0, groups)
        else:
            self.seq_bn = nn.BatchNorm2d(mid)
            self.seq_kxk = conv_bn(mid, cout, k, stride, p, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.origin(x) + self.one(x)
        out = out + self.avg_bn(self.avg(self.avg_bn_pad(self.avg_conv(x))))
        return out + self.seq_kxk(self.seq_bn(self.seq_1x1(x)))


class MobileOneStage(nn.Module):
    """One MobileOne stage: ``k`` over-parameterized branches, a scale branch, a skip BN."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, depthwise: bool,
                 branches: int = 3):
        super().__init__()
        groups = cin if depthwise else 1
        self.branches = nn.ModuleList(
            conv_bn(cin, cout, kernel, stride, kernel // 2, groups) for _ in range(branches))
        self.scale = conv_bn(cin, cout, 1, stride, 0, groups) if kernel > 1 else None
        self.skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        for branch in self.branches:
            out = out + branch(x)
        if self.scale is not None:
            out = out + self.scale(x)
        if self.skip is not None:
            out = out + self.skip(x)
        return self.act(out)


class MobileOneBlock(nn.Module):
    """Depthwise 3x3 stage, then pointwise stage."""

    def __init__(self, cin: int, cout: int, stride: int = 1, branches: int = 3):
        super().__init__()
        self.dw = MobileOneStage(cin, cin, 3, stride, True, branches)
        self.pw = MobileOneStage(cin, cout, 1, 1, False, branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class RepConv(nn.Module):
    """YOLOv7 (SiLU) / YOLOv6 (ReLU) RepConv, with its fusion under a name of its own."""

    def __init__(self, c1: int, c2: int, stride: int = 1, act: type[nn.Module] = nn.SiLU):
        super().__init__()
        self.rbr_dense = conv_bn(c1, c2, 3, stride, 1)
        self.rbr_1x1 = conv_bn(c1, c2, 1, stride, 0)
        self.rbr_identity = nn.BatchNorm2d(c1) if c1 == c2 and stride == 1 else None
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.act(self.rbr_dense(x) + self.rbr_1x1(x) + identity)

    def fuse_repvgg_block(self) -> None:
        raise AssertionError("deployplug must not need this block's own fusion method")


class RepVGGDW(nn.Module):
    """RepViT's token mixer: depthwise 3x3+BN, depthwise 1x1 with bias, identity; BN after."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = conv_bn(dim, dim, 3, 1, 1, dim)
        self.conv1 = nn.Conv2d(dim, dim, 1, groups=dim)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.conv1(x) + x)


class QARepVGG(nn.Module):
    """Quantization-aware RepVGG: BN only on the 3x3 branch, and one BN after the sum."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, stride, 1)
        self.pointwise = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.has_identity = cin == cout and stride == 1
        self.post_bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.has_identity:
            out = out + x
        return self.act(self.post_bn(out))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.down = nn.Conv2d(channels, max(1, channels // reduction), 1)
        self.up = nn.Conv2d(max(1, channels // reduction), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.adaptive_avg_pool2d(x, 1)
        gate = torch.sigmoid(self.up(F.relu(self.down(gate))))
        return x * gate


class RepVGGSE(nn.Module):
    """RepVGG branches, then squeeze-and-excitation on the sum, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, stride, 1)
        self.pointwise = conv_bn(cin, cout, 1, stride, 0)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.se = SqueezeExcite(cout)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(self.se(out))


class ChannelScale(nn.Module):
    """A learned per-channel factor (OREPA's linear scaling layer)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1)


class OREPA(nn.Module):
    """Online re-parameterization style: scaled branches without BN, one BN after the sum."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1):
        super().__init__()
        p = k // 2
        self.origin = nn.Conv2d(cin, cout, k, stride, p, bias=False)
        self.origin_scale = ChannelScale(cout)
        self.one = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.one_scale = ChannelScale(cout)
        self.seq_1x1 = nn.Conv2d(cin, cin, 1, bias=False)
        self.seq_kxk = nn.Conv2d(cin, cout, k, stride, p, bias=False)
        self.seq_gamma = nn.Parameter(torch.ones(cout))
        self.avg_1x1 = nn.Conv2d(cin, cout, 1, bias=False)
        self.avg = nn.AvgPool2d(k, stride, p, count_include_pad=True)
        self.avg_scale = ChannelScale(cout)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.origin_scale(self.origin(x)) + self.one_scale(self.one(x))
        out = out + self.seq_kxk(self.seq_1x1(x)) * self.seq_gamma[None, :, None, None]
        out = out + self.avg_scale(self.avg(self.avg_1x1(x)))
        return self.act(self.bn(out))


def randomize_scales(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values for learned scales (which start at one), in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or isinstance(
                    model.get_submodule(name.rpartition(".")[0]) if "." in name else model,
                    ChannelScale):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model
