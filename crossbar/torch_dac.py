"""The DAC of the torch engine: ``kernels.grid_dac_convert`` and
``kernels.pixel_dac_convert`` on torch tensors, converters in float64 with the same
step, inverse step and round half away from zero as the Numba kernels, and the sums of
squares that the read-noise variance needs.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .fused import fused_version, use_fused


def steps(full_scale, half: int) -> tuple:
    """(step, inv_step), float64, as ``kernels.steps`` computes them (tensor or float)."""
    if half <= 0:
        return full_scale, 1.0
    return full_scale / half, half / full_scale


def quantize(v: torch.Tensor, full_scale, half: int) -> tuple:
    """``kernels.quantize`` on a float64 tensor (half >= 0; full_scale a float or a
    tensor that broadcasts): (values, mask of values beyond the range). A NaN stays NaN
    (``torch_engine._read_fast`` marks an output to read again so)."""
    a = v.abs()
    clipped = a > full_scale
    if half == 0:  # the sign's full scale (a float is a scalar to where: no copy from the host on a GPU)
        return torch.where(v >= 0, full_scale, torch.where(v < 0, -full_scale, v)), clipped
    step, inv_step = steps(full_scale, half)
    q = torch.clamp(torch.floor(a * inv_step + 0.5), max=float(half)) * step
    return torch.where(v >= 0, q, -q), clipped


def dac_convert(x: torch.Tensor, full_scale: float, half: int, per_vector: bool, row_starts,
                block_matrix: torch.Tensor) -> tuple:
    """``kernels.grid_dac_convert``: (converted float32 (batch, n_in), per-vector scales
    (R, batch) float64 or None, clipped values per row block (R,) int64, the count of
    non-finite values in x as a device tensor). ``block_matrix`` (n_in, R) float64 is 1
    where an input is in a row block.

    With fused kernels, one range (not per vector) converts in one kernel
    (:func:`dac_values`), its clips summed per row block by a matrix product: the eager
    conversion holds float64 temporaries of the whole input, which were a transformer's
    peak memory (the feed-forward's second layer: 784 MB of working memory against
    float's peak of 300 MB at batch 256, estimated by ``benchmarks/bench_memory.py``)."""
    if not per_vector and use_fused(x.device):
        xq, _, clips, bad = pixel_dac_convert(x.view(x.shape[0], 1, x.shape[1]), full_scale, half, block_matrix,
                                              False)
        return xq.view(x.shape), None, clips.view(-1).to(torch.int64), bad
    xd = x.double()
    bad = (~torch.isfinite(xd)).sum()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    n_blocks = len(row_starts) - 1
    scales = torch.empty((n_blocks, x.shape[0]), dtype=torch.float64, device=x.device) if per_vector else None
    clipped = torch.zeros(n_blocks, dtype=torch.int64, device=x.device)
    for r in range(n_blocks):
        a, b = int(row_starts[r]), int(row_starts[r + 1])
        v = xd[:, a:b]
        if per_vector:
            m = v.abs().amax(dim=1)
            scales[r] = m
            v = v * torch.where(m > 0, 1.0 / m, torch.zeros_like(m))[:, None]
        if half >= 0:
            v, hits = quantize(v, full_scale, half)
            clipped[r] = hits.sum()
        out[:, a:b] = v
    return out, scales, clipped, bad


def block_matrix(bounds, device) -> torch.Tensor:
    """(n, K) float64: 1 where item i lies in block k, the blocks ``bounds[k] ..
    bounds[k + 1] - 1`` (a grid's row starts: its inputs' row blocks; a convolution's
    channel segments)."""
    bounds = np.asarray(bounds, np.int64)
    blocks = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    out = torch.zeros((int(bounds[-1]), len(bounds) - 1), dtype=torch.float64)
    out[np.arange(len(blocks)), blocks] = 1.0
    return out.to(device)


def row_sum_squares(xq: torch.Tensor, row_starts) -> torch.Tensor:
    """(R, batch) float64: each vector's sum of squares over each row block, in
    row-major memory as the convolutions' sums are (a transposed view would make the
    fused read-out compile a variant for each layout). Squared a row block at a time:
    float64 squares of a whole input were a transformer's peak memory."""
    bounds = [int(b) for b in row_starts]
    return torch.stack([xq[:, lo:hi].double().square_().sum(dim=1) for lo, hi in zip(bounds[:-1], bounds[1:])])


def dac_values(x: torch.Tensor, full_scale: float, half: int, segment_matrix: Optional[torch.Tensor]) -> tuple:
    """A DAC over a layer input x (images, pixels, channels) with one range: (converted
    float32, per image and pixel the sums of the converted values squared over each
    channel segment of ``segment_matrix`` (channels, segments) float64, 1 where a channel
    is in a segment, as float32 (None without it), per pixel and channel the count over
    the images of values beyond the range (pixels, channels) float64, count of
    non-finite values as a tensor); half < 0 passes values through. The clip counts are
    summed over images here, not kept per image: the layer's clip counts need no more,
    and a float64 map of every image would cost two passes over eight bytes per input
    value.

    The squares are exact in float64 and summed in float64 (in an order that may
    differ from the Numba kernel's, which float32 rounds away but for rare ties).
    Compiled, each segment's sum is a reduction of the kernel that converts: the float64
    squares of every input are never written (they were, 8 bytes per input, then read
    by a matrix product); eager, it is that product (the compiled reduction's broadcast
    would hold a float64 copy of the input per segment)."""
    xd = x.double()
    # counted per pixel and channel first, as the clips are: on a GPU the two sums then
    # share one pass over x (a sum over all of x took a pass of its own)
    bad = (~torch.isfinite(xd)).sum(0).sum()
    if half >= 0:
        q, hits = quantize(xd, full_scale, half)
        clips = hits.double().sum(0)
    else:
        q, clips = xd, torch.zeros(xd.shape[1:], dtype=torch.float64, device=xd.device)
    q = q.float()
    if segment_matrix is None:
        return q, None, clips, bad
    qd = q.double()
    if torch.compiler.is_compiling():
        # where, not a product: a NaN's square times 0 would make every segment NaN
        sums = torch.where(segment_matrix > 0, qd.square()[..., None], 0.0).sum(dim=-2)
    else:
        sums = torch.mm(qd.square().view(-1, qd.shape[-1]), segment_matrix).view(*qd.shape[:2], -1)
    return q, sums.float(), clips, bad


def pixel_dac_convert(images: torch.Tensor, full_scale: float, half: int, segment_matrix: torch.Tensor,
                      want_squares: bool) -> tuple:
    """``kernels.pixel_dac_convert``: a layer input (images, pixels, channels) through one
    DAC range. ``segment_matrix`` (channels, segments) float64 is 1 where a channel is in
    a segment. Returns (converted float32, per image, pixel and channel segment the sum
    of the converted values squared (float32; None unless asked), per pixel and segment
    the values beyond the range summed over the images (pixels, segments) float64, the
    count of non-finite values as a device tensor). Each segment sum is a sum against
    the matrix, whatever the number of segments: on a GPU, a kernel per segment costs
    more host time than the sums."""
    convert = fused_version(dac_values) if use_fused(images.device) else dac_values
    xq, squares, clips, bad = convert(images, float(full_scale), half, segment_matrix if want_squares else None)
    return xq, squares, torch.mm(clips, segment_matrix), bad
