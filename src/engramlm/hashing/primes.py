"""Exact primality and the Engram prime plan (spec §4.4).

Every (layer, order, head) table gets its own prime size; all primes of a model are distinct,
so the plan must be computed over the full, sorted layer list.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

# Deterministic Miller-Rabin. The spec's bases 2..37 are exact only below 318,665,857,834,031,
# 151,167,461 (~3.2e23, itself a strong pseudoprime to all of them); adding 41 makes the test exact
# below 3,317,044,064,679,887,385,961,981 (~3.3e24), the bound the spec quotes.
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
EXACT_BELOW = 3_317_044_064_679_887_385_961_981


def is_prime(n: int) -> bool:
    """Exact primality test for n < 3.3e24 (deterministic Miller-Rabin); larger n raise."""
    if n >= EXACT_BELOW:
        raise ValueError(f"is_prime is exact only below {EXACT_BELOW}, got {n}")
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime_above(s: int, used: set[int] | frozenset[int] = frozenset()) -> int:
    """Smallest prime q > s with q not in ``used``."""
    q = s + 1
    while not is_prime(q) or q in used:
        q += 1
    return q


@lru_cache(maxsize=64)
def _plan(layer_ids: tuple[int, ...], bases: tuple[int, ...], heads: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    used: set[int] = set()
    plan = []
    for _layer in layer_ids:
        orders = []
        for base in bases:
            s = base - 1
            primes = []
            for _h in range(heads):
                p = next_prime_above(s, used)
                used.add(p)
                primes.append(p)
                s = p
            orders.append(tuple(primes))
        plan.append(tuple(orders))
    return tuple(plan)


def prime_plan(layer_ids: Sequence[int], bases: Sequence[int], heads: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Primes indexed ``[layer_index][order - 2][head]`` (spec §4.4), cached per configuration.

    ``bases`` has one entry per order n = 2..N. Layers are processed in the given (sorted) order,
    orders major, heads minor; each order restarts its search at ``base - 1``.
    """
    ids = tuple(int(x) for x in layer_ids)
    if list(ids) != sorted(set(ids)):
        raise ValueError(f"layer_ids must be sorted ascending without duplicates, got {list(ids)}")
    return _plan(ids, tuple(int(b) for b in bases), int(heads))
