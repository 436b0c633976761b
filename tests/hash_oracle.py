"""A scalar, loop-per-position oracle for spec §4 (E1-E4), written independently of the library.

Slow on purpose: every rule is spelled out exactly as the spec states it.
"""

from __future__ import annotations


def oracle_row_ids(raw, lookup, multipliers, primes, pad_raw, doc_start=None, dead=None, reset=False):
    """raw: list of ints; returns [L][T][H_e] offset-applied row ids."""
    pad = int(lookup[pad_raw])
    x = [int(lookup[i]) for i in raw]
    t_len = len(x)
    out = []
    for layer, mults in enumerate(multipliers):
        layer_primes = primes[layer]
        rows_t = []
        for t in range(t_len):
            start = 0
            if reset and doc_start is not None:
                for s in range(t + 1):
                    if doc_start[s]:
                        start = s
            row = []
            offset = 0
            mix = 0
            for k in range(len(mults)):
                pos = t - k
                blocked = pos < start or (dead is not None and any(dead[pos:t])) if pos >= 0 else True
                v = pad if blocked else x[pos]
                mix ^= v * int(mults[k])
                if k >= 1:
                    for p in layer_primes[k - 1]:
                        row.append(mix % int(p) + offset)
                        offset += int(p)
            rows_t.append(row)
        out.append(rows_t)
    return out
