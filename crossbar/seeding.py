"""Seeds: every random stream in xbarsim is a pure function of (root seed, tags).

``np.random.SeedSequence.spawn`` is stateful: it counts the children it has handed
out, so spawning twice from the same object gives different children, and a
SeedSequence passed twice to the same call would give two different chips. Every
sub-stream is therefore derived with :func:`derive`, which appends tags to the spawn
key and never changes its argument. For a fresh SeedSequence, ``derive(s, i)`` equals
the i-th child of ``s.spawn(n)``, so stateless derivation names the same streams that
a first ``spawn`` did.
"""
from __future__ import annotations

from typing import Union

import numpy as np

SeedLike = Union[None, int, np.random.SeedSequence]


def as_seed_sequence(seed: SeedLike) -> np.random.SeedSequence:
    """A SeedSequence from a non-negative integer, a SeedSequence (used as is) or None
    (fresh entropy from the operating system)."""
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if seed is None or (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0):
        return np.random.SeedSequence(None if seed is None else int(seed))
    raise ValueError(f"seed = {seed!r} is invalid: expected a non-negative integer, a SeedSequence or None")


def derive(seed: SeedLike, *tags: int) -> np.random.SeedSequence:
    """The sub-stream of ``seed`` named by ``tags`` (non-negative integers); ``seed`` is
    not modified, so the same (seed, tags) always names the same stream."""
    root = as_seed_sequence(seed)
    for tag in tags:
        if isinstance(tag, bool) or not isinstance(tag, (int, np.integer)) or tag < 0:
            raise ValueError(f"seed tag {tag!r} is invalid: expected a non-negative integer")
    return np.random.SeedSequence(root.entropy, spawn_key=tuple(root.spawn_key) + tuple(int(t) for t in tags),
                                  pool_size=root.pool_size)
