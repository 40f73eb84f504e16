"""The counter-based normals of ``rng.py`` on torch tensors, for any torch device.

A SplitMix64 hash of (key, counter) into a 128-layer ziggurat, computed on int64
tensors: multiplication and addition wrap modulo 2^64 exactly as uint64 does, and a
logical right shift is an arithmetic one masked to the bits that remain. The rare
rejections (2.7% of normals) run the ziggurat's slow path on the rejected elements
only, step by step, as ``rng.normal_rejected`` does, so a (key, counter) gives the same
normal on either engine, bitwise.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch

from .fused import fused_version, use_fused
from .rng import FN, GOLDEN, KN_FLOAT, MIX1, MIX2, WN, ZIGGURAT_R
from .tensor_mode import normal_tensors


def _signed(c: int) -> int:
    """The int64 with the bits of the uint64 c."""
    return c - (1 << 64) if c >= 1 << 63 else c


def as_int64_keys(keys: np.ndarray) -> torch.Tensor:
    """uint64 stream keys as int64 tensors of the same bits."""
    return torch.from_numpy(np.ascontiguousarray(keys, dtype=np.uint64).view(np.int64))


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _signed(MIX1)
    z = (z ^ _shr(z, 27)) * _signed(MIX2)
    return z ^ _shr(z, 31)


def counter_hash(key: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The 64-bit hash of counter n in the stream of ``key`` (int64 bits): ``rng.counter_hash``."""
    return mix64(key ^ (n * _signed(GOLDEN)))


def uniforms_from_hash(h: torch.Tensor) -> torch.Tensor:
    """A uniform in (0, 1] (float64) from each 64-bit hash's top 53 bits (exact):
    ``rng._uniform``."""
    return (_shr(h, 11) + 1).double() * (1.0 / 9007199254740992.0)


@functools.lru_cache(maxsize=None)
@normal_tensors
def tables(device: torch.device) -> tuple:
    """The ziggurat tables (KN as float64, WN, FN) on one device, made once per device
    (normal tensors even if first made in a torch.inference_mode() block)."""
    return tuple(torch.from_numpy(a).to(device) for a in (KN_FLOAT, WN, FN))


def fast_path(h: torch.Tensor, kn: torch.Tensor, wn: torch.Tensor) -> tuple:
    """The ziggurat's fast path of each 64-bit hash (``rng.ziggurat_fast``): (the
    candidate normal x (float64), whether the fast test accepts it, the hash's top 32
    bits as a signed float64, its layer 0..127)."""
    hz = (h >> 32).double()  # the top 32 bits as a signed int32 (an arithmetic shift)
    iz = h & 127
    return hz * wn[iz], hz.abs() < kn[iz], hz, iz


def normals_from_hash(h: torch.Tensor) -> torch.Tensor:
    """A standard normal (float64) from each 64-bit hash: ``rng.normal_from_hash``."""
    kn, wn, fn = tables(h.device)
    x, accepted, _, _ = fast_path(h, kn, wn)
    rejected = (~accepted).view(-1).nonzero().view(-1)  # flat indices, whatever h's shape
    if rejected.numel():
        x.view(-1)[rejected] = _rejected(h.reshape(-1)[rejected], kn, wn, fn)
    return x


def _rejected(h: torch.Tensor, kn, wn, fn) -> torch.Tensor:
    """``rng.normal_rejected`` on a vector of hashes. Every element walks the same steps
    (wedge tests and tail draws at its own k) until it is accepted; here all of them
    step together, masked, a few rounds per (fused) call, so that the number of
    kernels and device syncs does not grow with the elements' longest walk."""
    return finish_walks(start_walks(h), kn, wn, fn)


def start_walks(h: torch.Tensor) -> tuple:
    """The walks' state (h, k, phase, out, positive) before their first step."""
    return (h, torch.ones_like(h), torch.zeros(h.shape, dtype=torch.int8, device=h.device),  # phase WEDGES
            torch.zeros(h.shape, dtype=torch.float64, device=h.device),
            torch.zeros(h.shape, dtype=torch.bool, device=h.device))


def finish_walks(state: tuple, kn, wn, fn) -> torch.Tensor:
    """Step every walk until all are done (their steps are unchanged once done): the
    normals."""
    rounds = fused_version(rejection_rounds) if use_fused(state[0].device) else rejection_rounds
    while True:
        state = rounds(*state, kn, wn, fn)
        if not bool((state[2] != DONE).any()):  # one sync per ROUNDS steps; rarely more than one
            return state[3]


WEDGES, TAIL, DONE = 0, 1, 2
# Steps per call. A walk outlasts k steps mostly in the tail: it is entered by 5.7e-4 of
# all normals, and each of its steps fails with probability TAIL_FAILURE = 0.0689, so k
# steps are outlasted by about 5.7e-4 x 0.0689^(k-1) of normals: 8.8e-10 for 6 steps,
# 9.4e-17 for 12. An exact re-read walks 12 steps (two calls' worth:
# torch_engine._EXACT_STEPS), since a pass of 10^9 normals (resnet56 at batch 1024) meets
# one of 6 or more in one pass of two, and one of 12 in one pass of 10^7: a deferred pass
# flags it (and runs again, checked), a checked read finishes the walk. Checked and
# deferred reads walk the same steps, so that one compiled variant serves both.
ROUNDS = 6


def rejection_rounds(h, k, phase, out, positive, kn, wn, fn, steps: Optional[int] = None) -> tuple:
    """``steps`` (default ``ROUNDS``) steps of ``rng.normal_rejected`` for every
    element, masked by its phase: the ziggurat (fast test, then the wedge test with the
    uniform of h + k; a miss re-hashes h + k + 1), or the tail (two uniforms at k,
    k + 1) with the sign of the hash that entered it. Elements that are done keep
    their state."""
    for _ in range(ROUNDS if steps is None else steps):
        in_wedges, in_tail = phase == WEDGES, phase == TAIL
        x, accepted, hz, iz = fast_path(h, kn, wn)
        a, tail_accepts = _tail_attempt(h, k)
        tail_ok = in_tail & tail_accepts
        wedge = in_wedges & ~accepted & (iz != 0)
        inside = wedge & _under_wedge(h, k, x, iz, fn)
        enter_tail = in_wedges & ~accepted & (iz == 0)
        take_x = in_wedges & accepted | inside
        out = torch.where(take_x, x, torch.where(tail_ok, torch.where(positive, ZIGGURAT_R + a, -ZIGGURAT_R - a), out))
        positive = torch.where(enter_tail, hz > 0, positive)
        missed = wedge & ~inside
        k_next = torch.where(missed | in_tail, k + 2, k)
        h = torch.where(missed, mix64(h + k + 1), h)
        k = k_next
        phase = torch.where(take_x | tail_ok, torch.full_like(phase, DONE),
                            torch.where(enter_tail, torch.full_like(phase, TAIL), phase))
    return h, k, phase, out, positive


def _under_wedge(h, k, x, iz, fn) -> torch.Tensor:
    """The ziggurat's wedge test of x in layer iz with the uniform of h + k: whether x
    lies under the density (iz = 0, the tail's layer, is tested as layer 1: unused)."""
    layer = torch.where(iz == 0, torch.ones_like(iz), iz)
    return fn[layer] + uniforms_from_hash(mix64(h + k)) * (fn[layer - 1] - fn[layer]) < torch.exp(-0.5 * x * x)


def _tail_attempt(h, k) -> tuple:
    """Marsaglia's tail attempt with the uniforms of h + k and h + k + 1: (a, whether
    it is accepted); the normal is R + a, signed."""
    a = -torch.log(uniforms_from_hash(mix64(h + k))) / ZIGGURAT_R
    b = -torch.log(uniforms_from_hash(mix64(h + k + 1)))
    return a, b + b >= a * a


def steps_at_once(h, k, phase, out, positive, kn, wn, fn, steps: int) -> tuple:
    """``steps`` steps of :func:`rejection_rounds`, the same state after them, with the
    steps side by side, not one after another: compiled, the rounds' code is unrolled
    once per step (about 4 s of compiling a step on 2 CPU cores), and an exact
    re-read's 10 late steps were most of a cold start's compiling: its walks took 49 s
    to compile for resnet56, 27 s with these. A walk's steps are laid out in advance,
    since each is a function of the walk's state where its phase began: in the
    ziggurat, a missed wedge test re-hashes (h + k + 1) and takes k + 2, so the hashes
    it would try form a chain, and each step's outcome follows from its hash alone; in
    the tail, attempt m draws at k + 2 m. The first step that ends a phase ends it.
    Each walk computes every step, needed or not: for the few walks still going after
    the open steps (``torch_engine._late_rounds``), not for all of them."""
    at = torch.arange(steps, device=h.device)
    hs, ks = [h], [k]
    for _ in range(steps):  # the chain: the hash and k of every step the walk would take in the ziggurat
        hs.append(mix64(hs[-1] + ks[-1] + 1))
        ks.append(ks[-1] + 2)
    chain_h, chain_k = torch.stack(hs[:steps], dim=-1), torch.stack(ks[:steps], dim=-1)  # (walks, steps)
    x, accepted, hz, iz = fast_path(chain_h, kn, wn)
    inside = ~accepted & (iz != 0) & _under_wedge(chain_h, chain_k, x, iz, fn)
    enters = ~accepted & (iz == 0)
    # the step at which each walk leaves the ziggurat (steps: none does)
    first = torch.where(accepted | inside | enters, at, steps).amin(dim=-1)
    ending = first.clamp(max=steps - 1)[..., None]

    def at_end(a):
        return a.gather(-1, ending).squeeze(-1)

    end_h, end_k, ends_in_tail = at_end(chain_h), at_end(chain_k), at_end(enters)
    in_wedges, in_tail = phase == WEDGES, phase == TAIL
    leaves = in_wedges & (first < steps)
    takes_x = leaves & ~ends_in_tail
    to_tail = leaves & ends_in_tail
    # the tail: its hash and first k, and the attempts left to it within the steps
    tail_h = torch.where(to_tail, end_h, h)
    tail_k = torch.where(to_tail, end_k, k)
    tries = torch.where(to_tail, steps - 1 - first, steps)
    positive = torch.where(to_tail, at_end(hz) > 0, positive)
    a, accepts = _tail_attempt(tail_h[..., None], tail_k[..., None] + 2 * at)
    success = torch.where(accepts & (at < tries[..., None]), at, steps).amin(dim=-1)
    tailing = in_tail | to_tail
    tail_done = tailing & (success < steps)
    tail_a = a.gather(-1, success.clamp(max=steps - 1)[..., None]).squeeze(-1)
    out = torch.where(takes_x, at_end(x), torch.where(
        tail_done, torch.where(positive, ZIGGURAT_R + tail_a, -ZIGGURAT_R - tail_a), out))
    still_wedges = in_wedges & ~leaves
    h = torch.where(still_wedges, hs[steps], torch.where(leaves, end_h, h))  # a walk keeps its hash in the tail
    k = torch.where(still_wedges, ks[steps], torch.where(takes_x, end_k, torch.where(
        tailing, tail_k + 2 * torch.where(tail_done, success + 1, tries), k)))
    phase = torch.where(takes_x | tail_done, torch.full_like(phase, DONE),
                        torch.where(tailing, torch.full_like(phase, TAIL), phase))
    return h, k, phase, out, positive


def counter_normals(key: int, offset: int, n: int, device="cpu") -> torch.Tensor:
    """Normals number offset .. offset + n - 1 of stream ``key``: ``rng.counter_normals``."""
    k = torch.tensor(_signed(int(key)), dtype=torch.int64, device=device)
    counters = torch.arange(n, dtype=torch.int64, device=device) + _signed(int(offset) % (1 << 64))
    return normals_from_hash(counter_hash(k, counters))
