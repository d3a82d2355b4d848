"""Which training-time branch put a weight into a fused kernel.

A fused RepVGG kernel is the sum of its branches, each folded with its BatchNorm: the k x k
conv, the 1x1 conv (on the centre tap) and the identity (on the centre tap of each channel's
own input). Quantization sees only the sum; a large entry is explained by splitting it back
into those parts. The split is computed here from the *training-form* block, with the same
pure functions the fusion uses (:func:`deployplug.reparam.fusion.fold_bn`), and it is kept
only when the parts add up to the fused kernel the model actually carries, so an attribution
is never a guess about a kernel built some other way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from deployplug.blocks import RepVGGBlock
from deployplug.numerics import normalized_error
from deployplug.reparam.fusion import bn_scale_shift, fold_bn, identity_kernel, pad_kernel

#: parts must reproduce the fused kernel this closely (float32 rounding of the fold)
MATCH_TOLERANCE = 1e-5
BRANCH_TITLES = {"kxk": "{k} conv+BN", "1x1": "1x1 conv+BN", "identity": "identity BN"}
QA_TITLES = {"kxk": "{k} conv+BN", "1x1": "1x1 conv", "identity": "identity"}


@dataclass
class BranchKernels:
    """The folded branches of one block, each as a full-size kernel in fused coordinates."""

    block: str  # module path of the training-form block
    fused_path: str  # module path of the conv the block becomes
    form: str  # "repvgg" (a BN per branch) or "quant_friendly" (one BN after the sum)
    kernel_size: tuple[int, ...]
    parts: dict[str, torch.Tensor]  # "kxk" / "1x1" / "identity" -> kernel (float64)
    #: per output channel, the BN scale each branch's kernel carries (the post-sum BN's for a
    #: quant-friendly block)
    scales: dict[str, torch.Tensor]

    def title(self, branch: str) -> str:
        k = "x".join(str(s) for s in self.kernel_size)
        titles = QA_TITLES if self.form == "quant_friendly" else BRANCH_TITLES
        return titles[branch].format(k=k)

    def module(self, branch: str) -> str:
        name = {"kxk": "conv_kxk", "1x1": "conv_1x1", "identity": "identity"}[branch]
        return f"{self.block}.{name}" if self.block else name

    def total(self) -> torch.Tensor:
        return torch.stack(list(self.parts.values())).sum(0)


@dataclass
class Attribution:
    """The branch behind one entry (or one channel) of a fused kernel, in words and numbers."""

    branch: str  # "kxk", "1x1" or "identity"
    module: str  # the training-form module path of that branch
    out_channel: int
    in_channel: int | None
    tap: list[int] | None
    fused_value: float
    branch_value: float
    share: float  # branch_value / fused_value
    scale: float  # the BN scale of that branch on the output channel
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stats(bn: _BatchNorm, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"BatchNorm '{name}' has no running statistics")
    return bn.running_mean, bn.running_var


def _fold(conv: nn.Conv2d, bn: _BatchNorm, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    mean, var = _stats(bn, name)
    kernel = fold_bn(conv.weight.double(), None, mean.double(), var.double(), bn.eps,
                     None if bn.weight is None else bn.weight.double(),
                     None if bn.bias is None else bn.bias.double())[0]
    scale = bn_scale_shift(mean.double(), var.double(), bn.eps,
                           None if bn.weight is None else bn.weight.double())[0]
    return kernel, scale


@torch.no_grad()
def block_branches(block: RepVGGBlock, path: str) -> BranchKernels:
    """Every branch of a training-form block as a kernel of the fused conv's size (float64)."""
    size = tuple(block.kernel_size)
    conv_kxk = cast(nn.Conv2d, block.conv_kxk.conv)
    kxk, kxk_scale = _fold(conv_kxk, cast(_BatchNorm, block.conv_kxk.bn), f"{path}.conv_kxk.bn")
    parts: dict[str, torch.Tensor] = {"kxk": kxk}
    scales: dict[str, torch.Tensor] = {"kxk": kxk_scale}
    ident = None
    if block.identity is not None:
        ident = identity_kernel(block.in_channels, block.groups, (1, 1), dtype=torch.float64)
    conv_1x1 = cast(nn.Conv2d, block.conv_1x1.conv)
    fused = f"{path}.reparam" if path else "reparam"
    if block.post_bn is None:
        parts["1x1"], scales["1x1"] = _fold(conv_1x1, cast(_BatchNorm, block.conv_1x1.bn),
                                            f"{path}.conv_1x1.bn")
        if ident is not None:
            bn = cast(_BatchNorm, block.identity)
            mean, var = _stats(bn, f"{path}.identity")
            scale = bn_scale_shift(mean.double(), var.double(), bn.eps,
                                   None if bn.weight is None else bn.weight.double())[0]
            parts["identity"], scales["identity"] = ident * scale.reshape(-1, 1, 1, 1), scale
        form = "repvgg"
    else:
        post = block.post_bn
        mean, var = _stats(post, f"{path}.post_bn")
        scale = bn_scale_shift(mean.double(), var.double(), post.eps,
                               None if post.weight is None else post.weight.double())[0]
        per_out = scale.reshape(-1, 1, 1, 1)
        parts["kxk"] = kxk * per_out
        scales["kxk"] = scale
        parts["1x1"], scales["1x1"] = conv_1x1.weight.double() * per_out, scale
        if ident is not None:
            parts["identity"], scales["identity"] = ident * per_out, scale
        form = "quant_friendly"
    parts = {k: pad_kernel(v, size) for k, v in parts.items()}
    return BranchKernels(path, fused, form, size, parts, scales)


def repvgg_blocks(model: nn.Module) -> Iterator[tuple[str, RepVGGBlock]]:
    """Training-form RepVGG blocks of ``model`` with their module paths."""
    for path, module in model.named_modules():
        if isinstance(module, RepVGGBlock) and not module.deployed:
            yield path, module


def collect_branches(model: nn.Module, fused: nn.Module) -> tuple[dict[str, BranchKernels],
                                                                   dict[str, str]]:
    """Branch kernels keyed by fused conv path, for every block whose parts match its fusion.

    Returns the matches and, for blocks that could not be split, the reason (a block whose
    fused conv is missing or whose parts do not add up gets no attribution at all).
    """
    fused_modules = dict(fused.named_modules())
    found: dict[str, BranchKernels] = {}
    skipped: dict[str, str] = {}
    for path, block in repvgg_blocks(model):
        try:
            kernels = block_branches(block, path)
        except ValueError as exc:
            skipped[path] = str(exc)
            continue
        conv = fused_modules.get(kernels.fused_path)
        if not isinstance(conv, nn.Conv2d):
            skipped[path] = f"no fused conv at '{kernels.fused_path}'"
            continue
        weight = conv.weight.detach().double()
        total = kernels.total()
        if total.shape != weight.shape:
            skipped[path] = f"branch kernels {tuple(total.shape)} vs fused {tuple(weight.shape)}"
            continue
        err = normalized_error(total, weight)
        if err > MATCH_TOLERANCE:
            skipped[path] = f"branches differ from the fused kernel (normalized {err:.2e})"
            continue
        found[kernels.fused_path] = kernels
    return found, skipped


def _where(kernels: BranchKernels, out_channel: int, in_channel: int,
           tap: list[int]) -> str:
    centre = [k // 2 for k in kernels.kernel_size]
    place = "centre tap" if tap == centre else f"tap {tuple(tap)}"
    return f"out {out_channel}, in {in_channel}, {place}"


def _message(kernels: BranchKernels, branch: str, out_channel: int, in_channel: int,
             tap: list[int], fused_value: float, branch_value: float, scale: float) -> str:
    block = f"'{kernels.block}'"
    where = _where(kernels, out_channel, in_channel, tap)
    if kernels.form == "quant_friendly":
        return (f"{kernels.title(branch)} of {block}, times the post-sum BN scale {scale:.3g} of "
                f"channel {out_channel}, gives {branch_value:.3g} of the fused {fused_value:.3g} "
                f"({where})")
    if branch == "identity":
        return (f"identity BN of {block} scales channel {out_channel} by {scale:.3g} "
                f"(fused weight {fused_value:.3g}, {where})")
    return (f"{kernels.title(branch)} of {block} (BN scale {scale:.3g} on channel "
            f"{out_channel}) gives {branch_value:.3g} of the fused {fused_value:.3g} ({where})")


def attribute_entry(kernels: BranchKernels, index: tuple[int, ...]) -> Attribution:
    """Split one entry ``(out, in, *tap)`` of the fused kernel into its branches."""
    values = {name: float(part[index]) for name, part in kernels.parts.items()}
    fused_value = sum(values.values())
    sign = 1.0 if fused_value >= 0 else -1.0
    # The branch that pushes the entry furthest in its own direction made the outlier.
    branch = max(values, key=lambda name: sign * values[name])
    out_channel, in_channel, tap = index[0], index[1], list(index[2:])
    scale = float(kernels.scales[branch][out_channel])
    share = values[branch] / fused_value if fused_value else 0.0
    return Attribution(branch, kernels.module(branch), out_channel, in_channel, tap,
                       fused_value, values[branch], share, scale,
                       _message(kernels, branch, out_channel, in_channel, tap, fused_value,
                                values[branch], scale))


def attribute_largest(kernels: BranchKernels) -> Attribution:
    """The branch behind the largest-magnitude weight of the fused kernel."""
    total = kernels.total()
    flat = int(total.abs().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), total.shape))
    return attribute_entry(kernels, index)


def branch_extremes(kernels: BranchKernels) -> dict[str, float]:
    """Largest magnitude each branch puts anywhere in the fused kernel."""
    return {name: float(part.abs().max()) for name, part in kernels.parts.items()}
