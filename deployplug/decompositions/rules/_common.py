"""Arithmetic shared by the rule modules (attribute reading is :mod:`deployplug.ops.attrs`)."""

from __future__ import annotations


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
