"""How ATen spells an op's attributes, normalised once for every rule, target and writer.

A captured node binds its schema arguments by name (see :mod:`deployplug.capture`), but the
values keep ATen's shorthand: ``kernel_size=3`` or ``[3]`` or ``[3, 5]``, ``stride=[]`` for
"same as the kernel", pad lists in ``F.pad`` order (last axis first, negative = crop), slice
bounds past either end, ``dim=None`` for "every axis", ``padding='same'``. Reading them in
one place means a rule, a target check and a writer can never read the same node two ways.

Anything these functions cannot normalise raises :class:`~deployplug.errors.OpAttributeError`
naming the attribute: a guessed value would produce a file that computes something else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deployplug.capture import Graph, Node
from deployplug.errors import OpAttributeError


def is_number(value: Any) -> bool:
    """A Python int or float, not a bool (``True`` is an int to Python, not to a user)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalar(value: Any) -> float | None:
    """A number or a one-element tensor as a float; ``None`` for anything else.

    Bools count (ATen treats ``True`` as 1), so ``x * True`` is a scale by one.
    """
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.reshape(()).item())
    return None


def scalar_arg(node: Node, name: str) -> float:
    """Argument ``name`` of ``node`` as a float, or an :class:`OpAttributeError` naming both.

    For writers: their target's check has accepted the node, so a non-scalar here is a
    disagreement to report, never a ``None`` to write into a file.
    """
    value = scalar(node.args.get(name))
    if value is None:
        raise OpAttributeError(f"{node.name} ({node.op} at '{node.where}'): argument {name!r} "
                               f"is not a number or a one-element tensor")
    return value


def pair(value: Any, n: int = 2, *, name: str = "value", default: int | None = None
         ) -> tuple[int, ...]:
    """An int, or a list of 1 or ``n`` ints, as ``n`` ints (ATen accepts all three forms).

    ``None`` or an empty list gives ``default`` on every axis when a default is given. Any
    other length is refused: ``[1, 2, 3]`` for a 2-D kernel has no meaning to fall back on.
    """
    if (value is None or (isinstance(value, (list, tuple)) and len(value) == 0)) and (
            default is not None):
        return (int(default),) * n
    if isinstance(value, bool):
        raise OpAttributeError(f"{name}: expected an int or {n} ints, got the bool {value!r}")
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        if len(value) == 1:
            return (int(value[0]),) * n
        if len(value) == n:
            return tuple(int(v) for v in value)
    raise OpAttributeError(f"{name}: expected an int or a list of 1 or {n} ints, got {value!r}")


def in_shape(node: Node, graph: Graph, index: int = 0) -> tuple[int, ...]:
    """Shape of the node's ``index``-th activation input."""
    if index >= len(node.inputs):
        raise OpAttributeError(f"{node.op} at '{node.where}' has no activation input {index}")
    return tuple(graph.shape_of(node.inputs[index]))


def norm_dim(dim: int, rank: int) -> int:
    """A possibly negative axis as an index in ``[0, rank)``."""
    dim = int(dim)
    if not -max(rank, 1) <= dim < max(rank, 1):
        raise OpAttributeError(f"axis {dim} is out of range for a rank-{rank} tensor")
    return dim + rank if dim < 0 else dim


# -- pooling --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolAttrs:
    """A max/avg pooling's geometry, one value per spatial axis (H, W for 2-D)."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    ceil_mode: bool
    count_include_pad: bool
    divisor_override: int | None


def pool_attrs(node: Node, n: int = 2) -> PoolAttrs:
    """Read ``max_poolNd`` / ``avg_poolNd`` arguments; an empty ``stride`` means the kernel."""
    a = node.args
    kernel = pair(a.get("kernel_size"), n, name=f"{node.op} kernel_size")
    stride = pair(a["stride"], n, name=f"{node.op} stride") if a.get("stride") else kernel
    divisor = a.get("divisor_override")
    return PoolAttrs(
        kernel=kernel,
        stride=stride,
        padding=pair(a.get("padding", 0), n, name=f"{node.op} padding", default=0),
        dilation=pair(a.get("dilation", 1), n, name=f"{node.op} dilation", default=1),
        ceil_mode=bool(a.get("ceil_mode", False)),
        count_include_pad=bool(a.get("count_include_pad", True)),
        divisor_override=None if divisor is None else int(divisor),
    )


def adaptive_sizes(node: Node, graph: Graph) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input H, W...), (output H, W...) of an adaptive pooling or a resize, from the shapes.

    The shapes are what ``torch.export`` recorded, so ``output_size=None`` entries ("keep
    this axis") are already resolved.
    """
    src, out = in_shape(node, graph), tuple(node.shape or ())
    if len(src) != len(out) or len(src) < 3:
        raise OpAttributeError(f"{node.op} at '{node.where}': input {list(src)} and output "
                               f"{list(out)} do not have one spatial layout")
    return src[2:], out[2:]


# -- padding --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PadSpec:
    """``F.pad`` arguments: ``pads`` in its order (last axis first, before then after).

    Negative amounts crop. ``axis(d)`` gives (before, after) for any axis of the input.
    """

    pads: tuple[int, ...]
    mode: str
    value: float
    rank: int

    def axis(self, dim: int) -> tuple[int, int]:
        k = self.rank - 1 - norm_dim(dim, self.rank)
        if 2 * k + 1 < len(self.pads):
            return self.pads[2 * k], self.pads[2 * k + 1]
        return 0, 0

    @property
    def spatial(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom): the last two axes of the input."""
        (left, right), (top, bottom) = self.axis(-1), self.axis(-2)
        return left, right, top, bottom

    def only_last(self, count: int) -> bool:
        """True when every axis before the last ``count`` is left alone."""
        return not any(self.pads[2 * count:])

    @property
    def symmetric(self) -> bool:
        """Every axis padded equally on both sides, and nothing cropped."""
        pairs = zip(self.pads[0::2], self.pads[1::2])
        return all(b == a and b >= 0 for b, a in pairs)


def pad_spec(node: Node, graph: Graph) -> PadSpec:
    """Read ``pad`` / ``constant_pad_nd`` (and ``reflection_pad*``-style ``padding``)."""
    raw = node.args.get("pad")
    if raw is None:
        raw = node.args.get("padding")
    raw = list(raw or [])
    rank = len(in_shape(node, graph))
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in raw):
        raise OpAttributeError(f"{node.op} at '{node.where}': pads {raw!r} are not ints")
    if len(raw) % 2 or len(raw) > 2 * rank:
        raise OpAttributeError(f"{node.op} at '{node.where}': {len(raw)} pad amounts for a "
                               f"rank-{rank} input (need an even number, at most {2 * rank})")
    mode = node.args.get("mode", "constant") if node.op == "pad" else "constant"
    value = node.args.get("value")
    return PadSpec(tuple(int(p) for p in raw), str(mode or "constant"),
                   0.0 if value is None else float(value), rank)


# -- convolution ----------------------------------------------------------------------------
def same_pads(kernel: Sequence[int], dilation: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(before, after) per axis for ``padding='same'``: PyTorch puts the odd one after."""
    out = []
    for k, d in zip(kernel, dilation, strict=True):
        total = d * (k - 1)
        out.append((total // 2, total - total // 2))
    return tuple(out)


def conv_pads(node: Node) -> tuple[tuple[int, int], ...]:
    """(before, after) per spatial axis of a convolution, resolving 'same' and 'valid'."""
    weight = node.args.get("weight")
    if not isinstance(weight, torch.Tensor):
        raise OpAttributeError(f"{node.op} at '{node.where}': the weight is not a constant")
    n = weight.dim() - 2
    padding = node.args.get("padding", 0)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * n
        if padding == "same":
            dilation = pair(node.args.get("dilation", 1), n, name=f"{node.op} dilation",
                            default=1)
            return same_pads(tuple(weight.shape[2:]), dilation)
        raise OpAttributeError(f"{node.op} at '{node.where}': padding {padding!r}")
    return tuple((p, p) for p in pair(padding, n, name=f"{node.op} padding", default=0))


# -- slicing and reductions -----------------------------------------------------------------
def slice_bounds(size: int, start: int | None, end: int | None, step: int = 1
                 ) -> tuple[int, int, int]:
    """Python/ATen slice semantics: negatives count from the end, both ends are clamped.

    The result satisfies ``0 <= start <= end <= size``; ``range(start, end, step)`` lists
    exactly the indices ``x[start:end:step]`` keeps.
    """
    step = int(step)
    if step < 1:
        raise OpAttributeError(f"slice step {step}: ATen slices only with a positive step")
    start = 0 if start is None else int(start)
    end = size if end is None else int(end)
    if start < 0:
        start += size
    if end < 0:
        end += size
    start = min(max(start, 0), size)
    end = min(max(end, start), size)
    return start, end, step


@dataclass(frozen=True)
class SliceSpec:
    dim: int
    start: int
    end: int
    step: int
    size: int

    @property
    def length(self) -> int:
        return len(range(self.start, self.end, self.step))

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.step == 1 and self.end == self.size


def slice_spec(node: Node, graph: Graph) -> SliceSpec:
    """A ``slice`` node's axis and normalised bounds."""
    shape = in_shape(node, graph)
    dim = norm_dim(node.args.get("dim", 0), len(shape))
    start, end, step = slice_bounds(shape[dim], node.args.get("start"), node.args.get("end"),
                                    node.args.get("step", 1) or 1)
    return SliceSpec(dim, start, end, step, shape[dim])


def reduce_dims(node: Node, graph: Graph) -> tuple[list[int], int]:
    """(sorted axes, input rank) of a ``mean``/``sum``; ``dim=None`` or ``[]`` is every axis."""
    rank = len(in_shape(node, graph))
    dims = node.args.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(rank)), rank
    dims = [dims] if isinstance(dims, int) else list(dims)
    return sorted({norm_dim(d, rank) for d in dims}), rank


# -- constants ------------------------------------------------------------------------------
def channel_vector(value: Any, shape: Sequence[int]) -> torch.Tensor | None:
    """``value`` as ``C`` float64 numbers when it varies along the channel axis of ``shape``
    only (a number, or a tensor broadcasting as ``(1, C or 1, 1, ...)``); else ``None``."""
    if len(shape) < 2:
        return None
    channels = int(shape[1])
    if is_number(value):
        return torch.full((channels,), float(value), dtype=torch.float64)
    if (not isinstance(value, torch.Tensor) or value.dim() > len(shape) or value.is_complex()
            or value.dtype == torch.bool):
        return None
    padded = (1,) * (len(shape) - value.dim()) + tuple(value.shape)
    if padded[0] != 1 or any(s != 1 for s in padded[2:]) or padded[1] not in (1, channels):
        return None
    return value.detach().reshape(-1).to(torch.float64).expand(channels).clone()


def varying_axis(const_shape: Sequence[int], out_shape: Sequence[int]) -> int | None:
    """The one axis (>= 1) along which a constant of ``const_shape`` varies once broadcast to
    ``out_shape`` with its full length there; ``None`` when there is not exactly one."""
    if len(const_shape) > len(out_shape):
        return None
    shape = (1,) * (len(out_shape) - len(const_shape)) + tuple(const_shape)
    varying = [i for i, s in enumerate(shape) if s != 1]
    if len(varying) != 1 or varying[0] == 0 or shape[varying[0]] != out_shape[varying[0]]:
        return None
    return varying[0]


def clamp_bounds(node: Node) -> tuple[float | None, float | None]:
    """(low, high) of ``relu6`` / ``hardtanh`` / ``clamp`` / ``clamp_min`` / ``clamp_max``.

    A bound that is not a number (a tensor of several values, an activation) raises; check
    with :func:`tensor_bound` first.
    """
    a = node.args
    if node.op == "relu6":
        return 0.0, 6.0
    if node.op == "hardtanh":
        return float(a.get("min_val", -1.0)), float(a.get("max_val", 1.0))
    keys = {"clamp_min": ("min", None), "clamp_max": (None, "max")}.get(node.op, ("min", "max"))
    out = []
    for key in keys:
        value = None if key is None else a.get(key)
        bound = None if value is None else scalar(value)
        if value is not None and bound is None:
            raise OpAttributeError(f"{node.op} at '{node.where}': bound {key!r} is not a number")
        out.append(bound)
    return out[0], out[1]


def tensor_bound(node: Node) -> str | None:
    """The name of a clamp bound that is not a single number, or ``None``."""
    for key in ("min", "max", "min_val", "max_val"):
        value = node.args.get(key)
        if value is not None and scalar(value) is None:
            return key
    return None
