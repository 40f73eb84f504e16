"""Weights to differential conductance pairs and back (PHYSICS.md section 1).

    s  = (g_max - g_min) / w_ref        uS per unit weight
    G+ = g_min + s max(W, 0),  G- = g_min + s max(-W, 0),  W = (G+ - G-) / s
"""
from __future__ import annotations

import numpy as np


def reference_weight(w: np.ndarray, clip: str, clip_value: float, axis=None) -> np.ndarray:
    """w_ref of a block (axis=None) or of each column (axis=0): the weight magnitude
    that maps to the full conductance range."""
    a = np.abs(w)
    if clip == "max":
        ref = a.max(axis=axis)
    elif clip == "std":
        ref = clip_value * w.std(axis=axis)
    elif clip == "percentile":
        ref = np.percentile(a, clip_value, axis=axis)
    else:
        raise ValueError(f"clip = {clip!r} is invalid: expected 'max', 'std' or 'percentile'")
    # an all-zero block or column maps to g_min whatever w_ref is; 1 avoids 0/0
    return np.where(np.asarray(ref) > 0, ref, 1.0)


def weights_to_conductances(w: np.ndarray, g_min: float, g_max: float, w_ref) -> tuple:
    """(G+, G-, scale, number clipped) for weights w, clipping |w| > w_ref to w_ref.

    w_ref is a scalar or one value per column of w; scale is in uS per unit weight."""
    w = np.asarray(w, dtype=np.float64)
    w_ref = np.asarray(w_ref, dtype=np.float64)
    clipped = int(np.count_nonzero(np.abs(w) > w_ref))
    wc = np.clip(w, -w_ref, w_ref)
    scale = (g_max - g_min) / w_ref
    g_plus = g_min + scale * np.maximum(wc, 0.0)
    g_minus = g_min + scale * np.maximum(-wc, 0.0)
    return g_plus, g_minus, scale, clipped


def conductances_to_weights(g_plus, g_minus, scale) -> np.ndarray:
    """The weights that conductance pairs represent: (G+ - G-) / scale."""
    return (np.asarray(g_plus, dtype=np.float64) - np.asarray(g_minus, dtype=np.float64)) / scale


def slice_weights(w: np.ndarray, w_ref, slices: int, bits_per_slice: int) -> tuple:
    """Bit slicing (PHYSICS.md section 9): (digits (slices, *w.shape) in [0, 2^b - 1],
    sign of w, number clipped). |w| is clipped to w_ref, quantized to n = k b bits,
    m = round(|w| / w_ref (2^n - 1)), and written in base 2^b, slice s holding digit
    s (least significant first)."""
    w = np.asarray(w, dtype=np.float64)
    w_ref = np.asarray(w_ref, dtype=np.float64)
    clipped = int(np.count_nonzero(np.abs(w) > w_ref))
    top = 2.0 ** (slices * bits_per_slice) - 1
    # m <= 2^32 - 1: exact in float64 and in int64
    m = np.rint(np.minimum(np.abs(w) / w_ref, 1.0) * top).astype(np.int64)
    base = 1 << bits_per_slice
    digits = np.stack([(m >> (bits_per_slice * s)) & (base - 1) for s in range(slices)])
    return digits, np.sign(w), clipped


def sliced_conductances(w: np.ndarray, g_min: float, g_max: float, w_ref, slices: int, bits_per_slice: int) -> tuple:
    """(G+, G-, scales, number clipped) of a sliced block w (in, out): G+ and G- are
    (in, out * slices) with weight column j's slice s in column j * slices + s; scales
    (slices,) or (slices, out) with a per-column w_ref: uS per unit weight of each
    slice's column, 2^(b s) (2^b - 1) / (2^n - 1) * (g_max - g_min) / w_ref, so that
    sum_s (G+_s - G-_s) / scale_s = W_q."""
    digits, sign, clipped = slice_weights(w, w_ref, slices, bits_per_slice)
    levels = 2 ** bits_per_slice - 1
    g = digits / levels * (g_max - g_min)  # (k, in, out)
    g_plus = g_min + np.where(sign > 0, g, 0.0)
    g_minus = g_min + np.where(sign < 0, g, 0.0)
    interleave = lambda a: np.moveaxis(a, 0, -1).reshape(w.shape[0], w.shape[1] * slices)  # noqa: E731
    top = 2.0 ** (slices * bits_per_slice) - 1
    weight_per_slice = np.array([2.0 ** (bits_per_slice * s) * levels / top for s in range(slices)])
    scales = (g_max - g_min) / np.multiply.outer(weight_per_slice, np.asarray(w_ref, dtype=np.float64))
    return interleave(g_plus), interleave(g_minus), scales, clipped


def quantized_weights(w: np.ndarray, w_ref, slices: int, bits_per_slice: int) -> np.ndarray:
    """W_q = sign(W) m w_ref / (2^n - 1): what a sliced block holds with ideal devices."""
    digits, sign, _ = slice_weights(w, w_ref, slices, bits_per_slice)
    m = sum(d.astype(np.float64) * 2.0 ** (bits_per_slice * s) for s, d in enumerate(digits))
    return sign * m * np.asarray(w_ref, dtype=np.float64) / (2.0 ** (slices * bits_per_slice) - 1)
