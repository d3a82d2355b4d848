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

import math
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
    index: tuple[torch.Tensor | int, ...] = (idx, idx % per_group, *centre)
    kernel[index] = 1
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


# ------------------------------------------------------------------ kernel composition
#
# The functions below serve the generic linear-region pass. A kernel there is a dense,
# undilated correlation kernel ``(O, I / groups, *E)``; dilation is made explicit with zeros
# (:func:`dilate_kernel`) so that every composition rule is one of the few below, and is
# compressed back at the end (:func:`compress_dilation`).


def dilate_kernel(kernel: torch.Tensor, dilation: Sequence[int]) -> torch.Tensor:
    """The same conv with dilation 1: taps ``dilation`` apart, zeros in between.

    Extent per dim becomes ``dilation * (k - 1) + 1``, which is also the span a dilated conv
    reads, so output sizes and alignment are unchanged.
    """
    if all(d == 1 for d in dilation):
        return kernel
    spatial = kernel.shape[2:]
    size = [d * (k - 1) + 1 for d, k in zip(dilation, spatial)]
    out = kernel.new_zeros(*kernel.shape[:2], *size)
    index = (slice(None), slice(None), *(slice(None, None, d) for d in dilation))
    out[index] = kernel
    return out


def regroup_kernel(kernel: torch.Tensor, groups: int, new_groups: int) -> torch.Tensor:
    """A grouped kernel rewritten for fewer groups (``new_groups`` divides ``groups``).

    A conv with ``groups`` is also a conv with any divisor of it as group count: each output
    channel reads the zero-extended block of inputs of the coarser group. Branches or stages
    with different group counts are brought to their gcd this way before they are combined.
    """
    if new_groups == groups:
        return kernel
    if groups % new_groups:
        raise ValueError(f"cannot regroup groups={groups} as {new_groups}")
    out_ch, in_per = kernel.shape[:2]
    out_per, coarse_out_per = out_ch // groups, out_ch // new_groups
    coarse_in_per = in_per * groups // new_groups
    rows = torch.arange(out_ch, device=kernel.device)
    start = (rows // out_per) * in_per - (rows // coarse_out_per) * coarse_in_per
    cols = start[:, None] + torch.arange(in_per, device=kernel.device)[None, :]
    cols = cols.reshape(out_ch, in_per, *([1] * (kernel.dim() - 2))).expand_as(kernel)
    out = kernel.new_zeros(out_ch, coarse_in_per, *kernel.shape[2:])
    return out.scatter(1, cols, kernel)


def compose_kernels(outer: torch.Tensor, inner: torch.Tensor, inner_stride: Sequence[int],
                    groups: int) -> torch.Tensor:
    """Kernel of ``outer`` applied (without padding) to the output of ``inner``.

    Both are undilated correlation kernels with the same ``groups``: ``inner`` is
    ``(M, I/g, *E1)`` applied with ``inner_stride``; ``outer`` is ``(O, M/g, *E2)``. The
    composite reads input tap ``s1 * u + t`` for every outer tap ``u`` and inner tap ``t``:

        K[o, i, s1*u + t] = sum_m outer[o, m, u] * inner[m, i, t]

    which is a full (transposed-style) correlation of ``inner`` with ``outer`` flipped and
    dilated by ``s1``, so it is computed by one grouped ``convNd`` with the inner kernel's
    input index as the batch. Extent: ``s1 * (E2 - 1) + E1``.
    """
    dims = inner.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    batch = inner.transpose(0, 1)  # (I/g, M, *E1)
    pads: list[int] = []
    for s, e2 in zip(reversed(tuple(inner_stride)), reversed(outer.shape[2:])):
        pads += [s * (e2 - 1)] * 2
    batch = F.pad(batch, pads) if any(pads) else batch
    flipped = outer.flip(list(range(2, outer.dim())))
    out = conv(batch, flipped, None, 1, 0, tuple(inner_stride), groups)
    return out.transpose(0, 1).contiguous()


def contract_pointwise(outer: torch.Tensor, inner: torch.Tensor, groups: int) -> torch.Tensor:
    """:func:`compose_kernels` for an inner 1x1 stride-1 kernel: a per-group matrix product
    ``K[o, i, u] = sum_m outer[o, m, u] * inner[m, i]``, without the convolution."""
    out_ch, m_per = outer.shape[:2]
    in_per = inner.shape[1]
    a = outer.reshape(groups, out_ch // groups, m_per, -1)
    b = inner.reshape(groups, m_per, in_per)
    k = torch.einsum("gomu,gmi->goiu", a, b)
    return k.reshape(out_ch, in_per, *outer.shape[2:])


def pointwise_after(outer: torch.Tensor, inner: torch.Tensor, groups: int) -> torch.Tensor:
    """:func:`compose_kernels` for an outer 1x1 kernel (any inner kernel and stride): a
    per-group matrix product ``K[o, i, t] = sum_m outer[o, m] * inner[m, i, t]``, without the
    convolution. Extent and stride are the inner kernel's."""
    out_ch, m_per = outer.shape[:2]
    mid, in_per = inner.shape[:2]
    a = outer.reshape(groups, out_ch // groups, m_per)
    b = inner.reshape(groups, mid // groups, -1)
    k = torch.bmm(a, b)
    return k.reshape(out_ch, in_per, *inner.shape[2:])


def scale_input_channels(kernel: torch.Tensor, scale: torch.Tensor,
                         groups: int) -> torch.Tensor:
    """``kernel`` (``(O, I/groups, *k)``) applied to ``scale[i] * x[i]``: each input channel's
    taps multiplied by its scale. Grouping is unchanged."""
    out_ch, in_per = kernel.shape[:2]
    shape = (groups, 1, in_per, *([1] * (kernel.dim() - 2)))
    k = kernel.reshape(groups, out_ch // groups, in_per, *kernel.shape[2:]) * scale.reshape(shape)
    return k.reshape(kernel.shape)


def compose_bias(outer: torch.Tensor, outer_bias: torch.Tensor | None, inner_bias: torch.Tensor,
                 groups: int) -> torch.Tensor:
    """Bias of ``outer`` (unpadded) applied to a map whose every value carries ``inner_bias``.

    Every outer tap reads an in-range position, so each contributes its weight times the
    constant: ``b[o] = outer_bias[o] + sum_{m in group(o), u} outer[o, m, u] * inner_bias[m]``.
    Always the same arithmetic, whatever the values (a zero ``inner_bias`` included), so the
    result's code path depends on shapes only.
    """
    out_ch, m_per = outer.shape[:2]
    taps = math.prod(outer.shape[2:])
    # One matrix-vector product per group over (m, u): no reduction over the short tap axis.
    rows = outer.reshape(groups, out_ch // groups, m_per * taps)
    col = inner_bias.reshape(groups, m_per, 1).expand(groups, m_per, taps)
    bias = torch.bmm(rows, col.reshape(groups, m_per * taps, 1)).reshape(-1)
    return bias if outer_bias is None else bias + outer_bias


def average_kernel(channels: int, size: Sequence[int], divisor: float, *,
                   dtype: torch.dtype = torch.float64,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Depthwise kernel ``(C, 1, *size)`` of an average pool: every tap ``1 / divisor``."""
    return torch.full((channels, 1, *size), 1.0 / divisor, dtype=dtype, device=device)


def compress_dilation(kernel: torch.Tensor,
                      candidates: Iterable[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Undo :func:`dilate_kernel` per spatial dim where the kernel allows it.

    For each dim the largest candidate ``d`` is used for which the extent is ``d*(k-1)+1`` and
    every tap off the ``d``-lattice is zero; the values are unchanged, only stored sparsely.
    Returns the compact kernel and the dilation per dim.
    """
    dilation = []
    out = kernel
    for axis in range(2, kernel.dim()):
        extent = out.shape[axis]
        chosen = 1
        for d in sorted({c for c in candidates if c > 1}, reverse=True):
            if (extent - 1) % d:
                continue
            mask = torch.ones(extent, dtype=torch.bool, device=out.device)
            mask[::d] = False
            if not bool(out.index_select(axis, mask.nonzero().flatten()).any()):
                chosen = d
                break
        if chosen > 1:
            index = torch.arange(0, extent, chosen, device=out.device)
            out = out.index_select(axis, index)
        dilation.append(chosen)
    return out, tuple(dilation)
