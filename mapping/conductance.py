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
