"""Structural re-parameterization as a handful of pure tensor functions.

Every multi-branch fusion reduces to four facts about linear maps:

* a convolution followed by an inference-mode BatchNorm is one convolution with a bias
  (:func:`fold_bn`);
* a smaller kernel is the same map as a larger one zero-padded around it, if both read the
  same centre pixel (:func:`pad_kernel`);
* the identity is a convolution whose kernel is 1 at the centre tap of each channel's own
  input (:func:`identity_kernel`);
* parallel branches that are summed are one convolution with summed kernels and biases
  (:func:`sum_branches`).

These functions never touch modules, so they can be tested exhaustively and reused by any
block. They stay differentiable (no ``.data``, no in-place writes) so an equivalent kernel can
be regularised or quantised during training.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: rsqrt of a variance in bfloat16/float16 loses more than the final cast."""
    return torch.promote_types(dtype, torch.float32)


def bn_scale_shift(running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                   weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The inference-mode BatchNorm as ``y = scale * x + shift`` per channel.

    ``weight``/``bias`` are ``None`` for a BatchNorm built with ``affine=False``.
    """
    ct = _compute_dtype(running_var.dtype)
    scale = torch.rsqrt(running_var.to(ct) + eps)
    if weight is not None:
        scale = scale * weight.to(ct)
    shift = -running_mean.to(ct) * scale
    if bias is not None:
        shift = shift + bias.to(ct)
    return scale, shift


def fold_bn(kernel: torch.Tensor, bias: torch.Tensor | None, running_mean: torch.Tensor,
            running_var: torch.Tensor, eps: float, bn_weight: torch.Tensor | None = None,
            bn_bias: torch.Tensor | None = None, *, groups: int = 1,
            transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv (``kernel``, optional ``bias``) then BatchNorm -> one (kernel, bias).

    Works for 1-D/2-D/3-D kernels. For a transposed conv the output channels sit on weight
    dim 1 *within each group* (weight shape ``(in, out / groups, *k)``), so the scale is
    applied group by group. The results keep the kernel's dtype.
    """
    scale, shift = bn_scale_shift(running_mean, running_var, eps, bn_weight, bn_bias)
    ct = scale.dtype
    k = kernel.to(ct)
    spatial = (1,) * (kernel.dim() - 2)
    if transposed:
        cin, cout_g = kernel.shape[:2]
        k = k.reshape(groups, cin // groups, cout_g, *kernel.shape[2:])
        k = k * scale.reshape(groups, 1, cout_g, *spatial)
        k = k.reshape(kernel.shape)
    else:
        k = k * scale.reshape(-1, 1, *spatial)
    b = shift if bias is None else bias.to(ct) * scale + shift
    out_dtype = kernel.dtype
    return k.to(out_dtype), b.to(bias.dtype if bias is not None else out_dtype)


def pad_kernel(kernel: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Zero-pad the spatial dims of ``kernel`` (shape ``(O, I, *k)``) to ``size``, centred.

    ``F.pad`` takes pads last dimension first, so the list is built from the last spatial dim
    backwards; a 1x3 kernel padded to 3x5 gets one row above and below and one column each
    side, never the transpose. Both sizes must be odd (or equal) so a centre exists.
    """
    spatial = kernel.shape[2:]
    if len(size) != len(spatial):
        raise ValueError(f"target size {tuple(size)} does not match kernel dims {tuple(spatial)}")
    pads: list[int] = []
    for have, want in zip(reversed(spatial), reversed(tuple(size))):
        extra = want - have
        if extra < 0 or extra % 2:
            raise ValueError(f"cannot centre a {tuple(spatial)} kernel in {tuple(size)}")
        pads += [extra // 2, extra // 2]
    return F.pad(kernel, pads) if any(pads) else kernel


def add_centred_(kernel: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """``kernel += pad_kernel(small, kernel.shape[2:])`` in place, without the padded copy.

    Same result as :func:`pad_kernel` + :func:`sum_branches`, but touches only the centre
    taps: for a whole model this saves two full passes and two allocations per kernel.
    Meant for a kernel the caller has just computed (e.g. the result of :func:`fold_bn`);
    autograd accepts it because no backward formula needs that result.
    """
    if small.shape[:2] != kernel.shape[:2]:
        raise ValueError(f"channel dims differ: {tuple(small.shape)} vs {tuple(kernel.shape)}")
    index = [slice(None), slice(None)]
    for have, want in zip(small.shape[2:], kernel.shape[2:]):
        extra = want - have
        if extra < 0 or extra % 2:
            raise ValueError(f"cannot centre {tuple(small.shape[2:])} in "
                             f"{tuple(kernel.shape[2:])}")
        index.append(slice(extra // 2, extra // 2 + have))
    kernel[tuple(index)] += small
    return kernel


def identity_kernel(channels: int, groups: int, size: Sequence[int], *,
                    dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Kernel of shape ``(C, C / groups, *size)`` that maps every channel to itself.

    Output channel ``i`` lives in group ``i // (C/groups)`` and sees that group's inputs as
    local indices ``0 .. C/groups - 1``; its own input is local index ``i % (C/groups)``.
    """
    if channels % groups:
        raise ValueError(f"{channels} channels are not divisible by groups={groups}")
    if any(s % 2 == 0 for s in size):
        raise ValueError(f"identity needs an odd kernel size, got {tuple(size)}")
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, *size, dtype=dtype, device=device)
    idx = torch.arange(channels, device=device)
    centre = tuple(s // 2 for s in size)
    kernel[(idx, idx % per_group, *centre)] = 1
    return kernel


def sum_branches(
    branches: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel conv branches with equal shapes whose outputs are added -> one (kernel, bias)."""
    kernels, biases = zip(*branches)
    kernel = kernels[0]
    bias = biases[0]
    for k, b in zip(kernels[1:], biases[1:]):
        kernel = kernel + k
        bias = bias + b
    return kernel, bias
