"""Parasitic wire resistance (IR drop, PHYSICS.md section 8): the effective conductance
matrix of one array with resistive word and bit lines.

The network is linear in the inputs, so y = x @ G_eff with G_eff depending only on the
device conductances and the wires. It is computed exactly (a direct solve, no iteration)
by eliminating the word-line nodes of each row, which leaves a block-tridiagonal system
in the bit-line nodes, row by row:

    word line i:   T_i U_i = g_r x_i e_0 + D_i V_i      (T_i tridiagonal, D_i = diag(G_i))
    bit lines:     B_i V_i - g_c V_{i-1} - g_c V_{i+1} = x_i s_i
                   B_i = D_i - D_i T_i^-1 D_i + c_i I,  s_i = g_r D_i T_i^-1 e_0

(g_r = 1e6 / r_row, g_c = 1e6 / r_col in uS; c_i the bit-line conductance at node i). A
top-down block elimination S_i = B_i - g_c^2 S_{i-1}^-1 and a bottom-up product give
every row's response at the sense amplifiers without any per-input solve:

    G_eff[i] = g_last S_{R-1}^-1 (g_c S_{R-2}^-1) ... (g_c S_i^-1) s_i,

formed by carrying all R unit inputs' right-hand sides through the elimination. Cost:
about R m^3 + R^2 m^2 flops and m (m + R) float64 of memory for R used rows and m used
columns. ``reference.ir_drop_reference``
solves the same network node by node, per input vector, with scipy's sparse LU.

A partly used tile holds its block in its first rows and columns; the cross points
beyond hold no device, so the unused columns carry no current and the bit lines' last
``rows - n`` segments lie in series with the segment to the sense amplifier.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import blas, lapack

# 1 ohm is 1e6 uS: conductances are in microsiemens
MICROSIEMENS_PER_SIEMENS = 1e6


def effective_conductance(g: np.ndarray, r_row: float, r_col: float, physical_rows: int) -> np.ndarray:
    """G_eff (n, m) float64 of one array of device conductances g (n, m) uS, in the
    first n of ``physical_rows`` rows, with word-line segments of r_row ohms and
    bit-line segments of r_col ohms (0: ideal wire)."""
    g = np.asarray(g, dtype=np.float64)
    n, m = g.shape
    if physical_rows < n:
        raise ValueError(f"physical_rows = {physical_rows} is invalid: the array has {n} used rows")
    if r_row == 0 and r_col == 0:
        return g.copy()
    if r_col == 0:  # the bit lines are held at 0 V: each device sees its word-line voltage
        return g * np.stack([_word_line_solve(row, r_row, with_devices=False)[0] for row in g])
    g_c = MICROSIEMENS_PER_SIEMENS / r_col
    g_last = g_c / (physical_rows - n + 1)  # the empty rows' segments lie in series
    # Top-down block elimination, carrying every row's source along: after row i,
    # response[k] is the eliminated right-hand side of row k's unit input (S symmetric,
    # so row vectors times S^-1 serve)
    response = np.zeros((n, m))
    s_inv = None
    for i in range(n):
        drive, t_inv_d = _word_line_solve(g[i], r_row, with_devices=True)
        s = np.diag(g[i]) if t_inv_d is None else np.diag(g[i]) - g[i][:, None] * t_inv_d
        s[np.diag_indices(m)] += (g_c if i > 0 else 0.0) + (g_c if i < n - 1 else g_last)
        if s_inv is not None:
            s -= (g_c * g_c) * s_inv
            response[:i] = blas.dgemm(g_c, response[:i], s_inv)
        response[i] = g[i] * drive  # s_i: what row i's unit input sends into each bit line
        s_inv = _spd_inverse(s)
    return blas.dgemm(g_last, response, s_inv)


def _word_line_solve(g_row: np.ndarray, r_row: float, with_devices: bool) -> tuple:
    """For one word line with its bit lines at 0 V: (T_i^-1 e_0 g_r, each node's voltage
    per unit input; T_i^-1 D_i (m, m), or None without devices asked or with ideal word
    lines, where every node sits at x_i). T_i (symmetric positive definite, tridiagonal):
    a segment to the left of every node, one to the right of all but the last (the far
    end is open), and the node's device to its bit line."""
    m = len(g_row)
    if r_row == 0:
        return np.ones(m), None
    g_r = MICROSIEMENS_PER_SIEMENS / r_row
    diagonal = g_row + 2 * g_r
    diagonal[-1] = g_row[-1] + g_r
    if m == 1:  # LAPACK's tridiagonal routines want an off-diagonal
        return g_r / diagonal, (g_row / diagonal)[:, None] if with_devices else None
    d, e, info = lapack.dpttrf(diagonal, np.full(m - 1, -g_r))
    if info != 0:
        raise np.linalg.LinAlgError(f"IR drop: a word line's matrix is not positive definite (LAPACK info {info})")
    rhs = np.zeros((m, 1 + m if with_devices else 1), order="F")
    rhs[0, 0] = g_r
    if with_devices:
        rhs[np.arange(m), 1 + np.arange(m)] = g_row
    solved, info = lapack.dpttrs(d, e, rhs)
    return solved[:, 0], solved[:, 1:] if with_devices else None


def _spd_inverse(a: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive definite matrix by Cholesky (half the work of
    a general inverse): the blocks S_i are Schur complements of the network's nodal
    matrix, which is positive definite."""
    factor, info = lapack.dpotrf(a, lower=False)
    if info == 0:
        inverse, info = lapack.dpotri(factor, lower=False)
    if info != 0:
        raise np.linalg.LinAlgError(f"IR drop: a bit-line block is not positive definite (LAPACK info {info}); "
                                    f"the wire and device conductances are too far apart for float64")
    upper = np.triu(inverse)
    return upper + np.triu(upper, 1).T


def effective_conductance_torch(g: torch.Tensor, r_row: float, r_col: float, physical_rows: int) -> torch.Tensor:
    """:func:`effective_conductance` of a batch of arrays g (B, n, m) float64 (torch, on
    any device), the same elimination with dense Cholesky factors in place of LAPACK's
    tridiagonal ones: equal to it within float64 rounding (about 1e-15 relative), so the
    float32 chips a grid stores agree but for a rare last bit."""
    _, n, m = g.shape
    if physical_rows < n:
        raise ValueError(f"physical_rows = {physical_rows} is invalid: the arrays have {n} used rows")
    if r_row == 0 and r_col == 0:
        return g.clone()
    if r_col == 0:
        return g * torch.stack([_word_line_solve_torch(g[:, i], r_row, False)[0] for i in range(n)], dim=1)
    g_c = MICROSIEMENS_PER_SIEMENS / r_col
    g_last = g_c / (physical_rows - n + 1)
    eye = torch.eye(m, dtype=g.dtype, device=g.device)
    response = torch.zeros_like(g)
    s_inv = None
    for i in range(n):
        drive, t_inv_d = _word_line_solve_torch(g[:, i], r_row, True)
        s = torch.diag_embed(g[:, i]) if t_inv_d is None else torch.diag_embed(g[:, i]) - g[:, i, :, None] * t_inv_d
        s = s + ((g_c if i > 0 else 0.0) + (g_c if i < n - 1 else g_last)) * eye
        if s_inv is not None:
            s = s - (g_c * g_c) * s_inv
            response[:, :i] = g_c * (response[:, :i] @ s_inv)
        response[:, i] = g[:, i] * drive
        s_inv = _spd_inverse_torch(s)
    return g_last * (response @ s_inv)


def _word_line_solve_torch(g_row: torch.Tensor, r_row: float, with_devices: bool) -> tuple:
    """:func:`_word_line_solve` of a batch of word lines g_row (B, m): (drive (B, m),
    T^-1 D (B, m, m) or None)."""
    batch, m = g_row.shape
    if r_row == 0:
        return torch.ones_like(g_row), None
    g_r = MICROSIEMENS_PER_SIEMENS / r_row
    diagonal = g_row + 2 * g_r
    diagonal[:, -1] = g_row[:, -1] + g_r
    t = torch.diag_embed(diagonal)
    if m > 1:
        off = torch.full((batch, m - 1), -g_r, dtype=g_row.dtype, device=g_row.device)
        t = t + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
    rhs = torch.zeros((batch, m, 1 + m if with_devices else 1), dtype=g_row.dtype, device=g_row.device)
    rhs[:, 0, 0] = g_r
    if with_devices:
        rhs[:, :, 1:] = torch.diag_embed(g_row)
    factor, info = torch.linalg.cholesky_ex(t)
    if bool((info != 0).any()):
        raise torch.linalg.LinAlgError("IR drop: a word line's matrix is not positive definite")
    solved = torch.cholesky_solve(rhs, factor)
    return solved[:, :, 0], solved[:, :, 1:] if with_devices else None


def _spd_inverse_torch(a: torch.Tensor) -> torch.Tensor:
    """:func:`_spd_inverse` of a batch (B, m, m), by Cholesky, symmetrised as there."""
    factor, info = torch.linalg.cholesky_ex(a)
    if bool((info != 0).any()):
        raise torch.linalg.LinAlgError("IR drop: a bit-line block is not positive definite; the wire and device "
                                       "conductances are too far apart for float64")
    inverse = torch.cholesky_inverse(factor)
    upper = torch.triu(inverse)
    return upper + torch.triu(upper, 1).transpose(-1, -2)


def attenuation(g_eff, g):
    """G_eff / G per device, numpy or torch: how much of its current reaches the sense
    amplifier. A device's per-read noise is a fluctuation of its conductance, which the
    wires pass on attenuated as its signal (to first order; PHYSICS.md section 8 states
    the error). G_eff also holds the other devices' tiny cross-talk, which a near-zero G
    would turn into a huge ratio: the factor is held to [0, 1], its physical range, and
    devices at 0 uS pass their absolute noise unattenuated (1: an upper bound)."""
    if isinstance(g, torch.Tensor):
        return torch.where(g > 0, g_eff / g, torch.ones_like(g)).clamp(0.0, 1.0)
    return np.clip(np.divide(g_eff, g, out=np.ones_like(g_eff), where=g > 0), 0.0, 1.0)


def pair_read_variance(read_variance, g, g_eff):
    """sigma+^2 + sigma-^2 of each pair as its column sees it, (rows, cols), numpy or
    torch: each device's per-read variance (``read_variance``, the device model's, of
    the conductances g (2, rows, cols) read) times its :func:`attenuation` squared
    through the wires (G_eff ``g_eff``; ``g`` itself without wires: no attenuation)."""
    if g_eff is g:
        return read_variance(g[0]) + read_variance(g[1])
    plus, minus = (read_variance(g[p]) * attenuation(g_eff[p], g[p]) ** 2 for p in (0, 1))
    return plus + minus
