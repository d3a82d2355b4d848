"""Small functions shared by the rule modules: reading shapes and attributes off a node."""

from __future__ import annotations

from typing import Any

import torch

from deployplug.capture import Graph, Node, Ref


def in_shape(node: Node, graph: Graph, arg: str | None = None) -> tuple[int, ...]:
    """Shape of the node's first activation input (or of the activation argument ``arg``)."""
    if arg is None:
        return graph.shape_of(node.inputs[0])
    value = node.args[arg]
    if not isinstance(value, Ref):
        raise TypeError(f"{node.op}: argument {arg!r} is not an activation")
    return graph.shape_of(value.name)


def pair(value: Any, n: int = 2) -> tuple[int, ...]:
    """Expand an int or a 1-element list to ``n`` values (ATen allows both)."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    return value * n if len(value) == 1 else value


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def split_factors(n: int, limit: int) -> list[int] | None:
    """``n`` as a short product of factors each <= ``limit``; ``None`` if impossible.

    First-fit-decreasing packing of the prime factors: few stages, each within the limit.
    """
    if n <= limit:
        return [n]
    primes = sorted(prime_factors(n), reverse=True)
    if primes[0] > limit:
        return None
    bins: list[int] = []
    for p in primes:
        for i, b in enumerate(bins):
            if b * p <= limit:
                bins[i] = b * p
                break
        else:
            bins.append(p)
    return sorted(bins, reverse=True)


def as_tensor(value: Any) -> torch.Tensor:
    return value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(value)
