"""Common prefixes of token lists: a leaf that the slot pool (prefix_cache.py) and the disk
cache (disk_cache.py) both use, so neither imports the other for it."""

from __future__ import annotations

from collections.abc import Sequence as Seq


def common_prefix_len(a: Seq[int], b: Seq[int]) -> int:
    """Length of the common prefix, by bisection over C-speed slice comparisons."""
    hi = min(len(a), len(b))
    if hi == 0 or a[0] != b[0]:
        return 0
    if a[:hi] == b[:hi]:
        return hi
    lo = 1  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo
