"""The RepVGG block: three parallel branches while training, one conv at deployment.

Training form: ``relu(BN(conv_kxk(x)) + BN(conv_1x1(x)) + BN(x))``. The identity branch exists
only when the output can equal the input shape (same channels, stride 1, 'same' padding).

The 1x1 and identity branches are *centre-tap* branches: they read exactly the pixel the k x k
kernel's centre reads. That holds for any stride, dilation and padding mode as long as the
1x1 conv's padding is the k x k padding minus ``dilation * (k // 2)``, so the fused conv is
exact everywhere, borders included. Unlike the original block this one honours ``dilation``
and ``padding_mode`` in the training branches and keeps them on the fused conv, accepts any
``_BatchNorm`` (``SyncBatchNorm`` included) and keeps the weights' dtype.

``quant_friendly=True`` builds the QARepVGG form instead: ``relu(BN(BN(conv_kxk(x)) +
conv_1x1(x) + x))``. In the plain block every branch has its own BatchNorm, so the fused
kernel's centre tap of channel c carries ``gamma_c / sigma_c`` of the identity BN and of the
1x1 BN on top of the k x k weights; nothing bounds those ratios, and a few large ones make a
fused kernel whose range per-tensor int8 cannot cover without crushing every other weight.
With no BN on the 1x1 and identity branches and one BN after the sum, all branches of a channel
share a single scale, so the fused kernel is the summed raw weights times one factor per output
channel. It fuses into one conv exactly like the plain block.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Literal, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.utils import _pair

from deployplug.errors import BatchNormStatsError
from deployplug.reparam.fusion import add_centred_, fold_bn, identity_kernel, sum_branches

IntOrPair = int | tuple[int, int]
PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]


def _conv_bn(in_channels: int, out_channels: int, kernel_size: tuple[int, int],
             stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
             groups: int, padding_mode: str) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                     bias=False, padding_mode=cast(PaddingMode, padding_mode))
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_channels)))


def _conv_only(in_channels: int, out_channels: int, stride: tuple[int, int],
               padding: tuple[int, int], groups: int, padding_mode: str) -> nn.Sequential:
    """A bias-free 1x1 conv under the same ``conv`` name as the conv->BN branches."""
    conv = nn.Conv2d(in_channels, out_channels, 1, stride, padding, 1, groups, bias=False,
                     padding_mode=cast(PaddingMode, padding_mode))
    return nn.Sequential(OrderedDict(conv=conv))


def _folded(branch: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel, bias) of a conv->BN branch, differentiable."""
    conv, bn = cast(nn.Conv2d, branch.conv), cast(_BatchNorm, branch.bn)
    mean, var = _require_stats(bn, f"{name}.bn")
    return fold_bn(conv.weight, conv.bias, mean, var, bn.eps, bn.weight, bn.bias)


def _require_stats(bn: _BatchNorm, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The running mean and variance, which folding needs."""
    if bn.running_mean is None or bn.running_var is None:
        raise BatchNormStatsError(
            f"BatchNorm '{name}' has no running statistics (track_running_stats=False), so it "
            "cannot be folded into a convolution; build it with track_running_stats=True and "
            "train (or recalibrate) so that running_mean/running_var are estimated")
    return bn.running_mean, bn.running_var


class RepVGGBlock(nn.Module):
    """k x k conv+BN, 1x1 conv+BN and identity BN, summed, then ReLU.

    ``padding=None`` means 'same' alignment: ``dilation * (kernel_size // 2)``. An explicit
    padding must be at least that, so the 1x1 branch can be aligned by padding the rest.
    ``quant_friendly=True`` drops the BatchNorms of the 1x1 and identity branches and adds one
    BatchNorm ``post_bn`` after the sum (QARepVGG; see the module docstring).
    Call :meth:`reparameterize` to collapse the block into a single biased conv ``reparam``.
    """

    # Fusing only reads the branch modules and tensors and then drops them, so a deploy copy
    # may borrow them (see reparam.passes). A subclass that writes to them must set False.
    fusion_reads_only = True

    conv_kxk: nn.Sequential
    conv_1x1: nn.Sequential
    #: a BatchNorm in the plain block, ``nn.Identity`` in the quant-friendly one
    identity: nn.Module | None
    #: the BatchNorm after the branch sum (quant-friendly block only)
    post_bn: nn.BatchNorm2d | None
    act: nn.Module
    reparam: nn.Conv2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair = 3,
                 stride: IntOrPair = 1, padding: IntOrPair | None = None,
                 dilation: IntOrPair = 1, groups: int = 1, padding_mode: str = "zeros",
                 quant_friendly: bool = False):
        super().__init__()
        k, s, d = _pair(kernel_size), _pair(stride), _pair(dilation)
        if any(v % 2 == 0 for v in k):
            raise ValueError(f"RepVGGBlock needs an odd kernel size, got {k}")
        centre = (d[0] * (k[0] // 2), d[1] * (k[1] // 2))
        p = centre if padding is None else _pair(padding)
        p1 = (p[0] - centre[0], p[1] - centre[1])
        if min(p1) < 0:
            raise ValueError(
                f"padding {p} is smaller than dilation * (kernel_size // 2) = {centre}; the 1x1 "
                "branch could not be aligned with the kernel centre")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding, self.dilation = k, s, p, d
        self.padding_mode = padding_mode
        self.quant_friendly = quant_friendly

        self.conv_kxk = _conv_bn(in_channels, out_channels, k, s, p, d, groups, padding_mode)
        has_identity = in_channels == out_channels and s == (1, 1) and p1 == (0, 0)
        if quant_friendly:
            self.conv_1x1 = _conv_only(in_channels, out_channels, s, p1, groups, padding_mode)
            self.identity = nn.Identity() if has_identity else None
            self.post_bn = nn.BatchNorm2d(out_channels)
        else:
            self.conv_1x1 = _conv_bn(in_channels, out_channels, (1, 1), s, p1, (1, 1), groups,
                                     padding_mode)
            self.identity = nn.BatchNorm2d(in_channels) if has_identity else None
            self.post_bn = None
        self.act = nn.ReLU()

    @property
    def deployed(self) -> bool:
        """True once the branches have been replaced by ``reparam``."""
        return hasattr(self, "reparam")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed:
            return self.act(self.reparam(x))
        out = self.conv_kxk(x) + self.conv_1x1(x)
        if self.identity is not None:
            out = out + self.identity(x)
        if self.post_bn is not None:
            out = self.post_bn(out)
        return self.act(out)

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single (kernel, bias) equal to the sum of the branches (BN in inference mode).

        Differentiable, so it can feed a regulariser or quantisation-aware training.
        """
        if self.deployed:
            assert self.reparam.bias is not None  # the fused conv always carries a bias
            return self.reparam.weight, self.reparam.bias
        kernel, bias = _folded(self.conv_kxk, "conv_kxk")
        if self.post_bn is not None:
            return self._quant_friendly_kernel_bias(kernel, bias, self.post_bn)
        # Centre-tap branches are summed at 1x1 first and added onto the centre taps of the
        # freshly folded k x k kernel, so no other full-size kernel is ever materialised.
        centre = [_folded(self.conv_1x1, "conv_1x1")]
        if self.identity is not None:
            bn = cast(_BatchNorm, self.identity)
            mean, var = _require_stats(bn, "identity")
            ident = identity_kernel(self.in_channels, self.groups, (1, 1),
                                    dtype=kernel.dtype, device=kernel.device)
            centre.append(fold_bn(ident, None, mean, var, bn.eps, bn.weight, bn.bias))
        k1, b1 = sum_branches(centre)
        return add_centred_(kernel, k1), bias + b1

    def _quant_friendly_kernel_bias(self, kernel: torch.Tensor, bias: torch.Tensor,
                                    post_bn: nn.BatchNorm2d
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw 1x1 and identity kernels on the centre taps, then the post-sum BN folded in."""
        centre = cast(nn.Conv2d, self.conv_1x1.conv).weight.to(kernel.dtype)
        if self.identity is not None:
            centre = centre + identity_kernel(self.in_channels, self.groups, (1, 1),
                                              dtype=kernel.dtype, device=kernel.device)
        kernel = add_centred_(kernel, centre)
        mean, var = _require_stats(post_bn, "post_bn")
        return fold_bn(kernel, bias, mean, var, post_bn.eps, post_bn.weight, post_bn.bias)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replace the branches by one biased conv ``reparam``, in place. Idempotent."""
        if self.deployed:
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        # The fused conv is the k x k conv (stride, padding, dilation, groups, padding mode)
        # carrying the new weight and a bias. Copying it with the new weight pre-seeded in the
        # memo avoids constructing a Conv2d, whose weight initialisation would be wasted work.
        src = cast(nn.Conv2d, self.conv_kxk.conv)
        requires_grad = src.weight.requires_grad
        weight = nn.Parameter(kernel.detach(), requires_grad=requires_grad)
        conv = copy.deepcopy(src, memo={id(src.weight): weight})
        conv.bias = nn.Parameter(bias.detach(), requires_grad=requires_grad)
        conv.train(self.training)
        del self.conv_kxk, self.conv_1x1, self.identity, self.post_bn
        self.reparam = conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, padding_mode={self.padding_mode!r}"
                + (", quant_friendly=True" if self.quant_friendly else ""))
