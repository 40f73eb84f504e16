"""``nn.Conv2d`` (and ``nn.Conv1d``, through a unit height) on tiles.

Each output position reads one input vector: its receptive field in (channel, kh, kw)
order, torch's own weight layout, so that row block r of a group's tile grid holds a
contiguous range of input channels (the channels at a block's edges split between
blocks tap by tap). Two ways compute the same analog products:

- Convolution per row block (one DAC range per layer: fixed or calibrated). The DAC is
  then element-wise, so it converts the padded layer input once, before any unrolling;
  each row block's product is a convolution of its channel range with its conductance
  kernel (taps outside the block zeroed). No unrolled copy of the input exists.
- Unrolled (per-vector DAC ranges, which depend on each unrolled vector, and
  calibration, which samples vectors): one copy into (positions, C kh kw) rows, then the
  tile grid's matrix product.

Both hand their products to the same read-out kernel with the same noise numbering
(vector = output position, in image, row, column order), and the tests hold them
against each other. Counts are those of the hardware: every unrolled copy of an input
is a conversion by the DACs of its tile row.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crossbar import deferred, torch_dac
from crossbar.kernels import pixel_dac_convert
from crossbar.precision import ieee_float32
from crossbar.seeding import derive
from crossbar.tensor_mode import normal_tensors

from .layers import AnalogLayer, group_rows
from .matrix import AnalogMatrix

class AnalogConv2d(AnalogLayer):
    """``nn.Conv2d`` / ``nn.Conv1d`` on tiles, one matrix per group (see the module
    docstring). The output is returned in channels-last memory layout. ``unrolled =
    True`` forces the unrolled path (the tests' reference for the convolution path)."""

    def __init__(self, matrices, weight, bias, name, stride, dilation, padding, padding_mode, groups, one_d):
        super().__init__(matrices, weight, bias, name)
        self.stride, self.dilation = stride, dilation
        self.pad, self.padding_mode, self.groups, self.one_d = padding, padding_mode, groups, one_d
        self.unrolled = False
        self._kernels = {}  # group -> its _RowBlocks

    def at(self, t: float) -> None:
        super().at(t)
        self._prepare_kernels()

    def end_calibration(self) -> None:
        super().end_calibration()
        self._prepare_kernels()

    @normal_tensors
    def _prepare_kernels(self) -> None:
        """Cut the row blocks' kernels now, not in the next forward pass: long-lived
        blocks allocated among a pass's freed activations split the holes that later
        layers' activations would reuse (resnet56's first pass peaked 190 MB higher)."""
        for g in range(self.groups):
            self._block_kernels(g)

    @classmethod
    def from_torch(cls, layer, tile_config, seed, mapping, name: str) -> "AnalogConv2d":
        one_d = isinstance(layer, nn.Conv1d)
        weight = layer.weight.detach()
        if one_d:
            weight = weight.unsqueeze(2)  # (out, in/g, 1, k)
        groups = layer.groups
        matrices = group_matrices(weight, groups, tile_config, seed, mapping, name)
        # F.pad order, last dimension first: (left, right, top, bottom)
        pad = tuple(layer._reversed_padding_repeated_twice)
        if one_d:
            pad = pad + (0, 0)
        stride, dilation = layer.stride, layer.dilation
        if one_d:
            stride, dilation = (1, stride[0]), (1, dilation[0])
        return cls(matrices, weight, layer.bias, name, stride, dilation, pad, layer.padding_mode, groups, one_d)

    def _torch_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.squeeze(2) if self.one_d else weight

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, x = x.dtype, self._check_input(x)
        x, unbatched = self._batched(x)
        y = self._forward(x, self.pad).to(dtype)
        return y.squeeze(0) if unbatched else y

    def _batched(self, x: torch.Tensor) -> tuple:
        return self._as_batch(x, self.weight.shape[1] * self.groups,
                              ("length",) if self.one_d else ("height", "width"))

    def _forward(self, x: torch.Tensor, pad: tuple) -> torch.Tensor:
        """The convolution of a checked input after padding it by ``pad`` (F.pad order:
        left, right, top, bottom; negative values crop). Its convolutions round as IEEE
        float32 (cuDNN's default is TF32: see ``crossbar.precision``)."""
        with torch.no_grad(), ieee_float32():
            if self.one_d:
                x = x.unsqueeze(2)
            calibrating = self._calibration is not None
            dac = self.matrices[0].tile_config.dac
            # per-vector ranges and bit-serial cycles work on unrolled vectors
            convolve = not (self.unrolled or calibrating or dac.range_mode == "per_vector" or dac.cycles > 1)
            left, right, top, bottom = pad
            # symmetric zero padding is the convolution's own (DAC(0) = 0): no padded copy
            conv_padding = (0, 0)
            if convolve and self.padding_mode == "zeros" and left == right >= 0 and top == bottom >= 0:
                conv_padding, pad = (top, left), (0, 0, 0, 0)
            if any(pad):
                mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
                x = F.pad(x, pad, mode=mode)
            x = x.permute(0, 2, 3, 1).contiguous()  # NHWC; free for a channels-last input
            kh, kw = self.weight.shape[2:]
            padded_h = x.shape[1] + 2 * conv_padding[0]
            padded_w = x.shape[2] + 2 * conv_padding[1]
            h_out = (padded_h - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
            w_out = (padded_w - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
            if h_out < 1 or w_out < 1:
                raise ValueError(f"layer {self.layer_name!r}: input of {(padded_h, padded_w)} after padding "
                                 f"is smaller than the kernel")
            # a few images at a time, within the memory a product may hold
            vectors = self.matrices[0].vectors_per_chunk(unrolled=not (convolve or calibrating))
            chunk = max(1, vectors // (h_out * w_out))
            if x.shape[0] == 0:  # (the loop below reads nothing then)
                self._empty_batch()
            elif calibrating:
                self._offer_calibration(x, h_out, w_out)
            if 0 < x.shape[0] <= chunk and self.groups == 1 and x.dtype == torch.float32:
                # one product: its output is the layer's (a copy of every output into a
                # preallocated one was a copy kernel per layer on a GPU)
                y = self._product_of(0, x, h_out, w_out, calibrating, convolve, conv_padding, None)
                out = y.view(x.shape[0], h_out, w_out, self._per_out)
            else:
                out = self._products_into(x, h_out, w_out, chunk, calibrating, convolve, conv_padding)
            out = self._add_bias(out, 3).permute(0, 3, 1, 2)
            return out.squeeze(2) if self.one_d else out

    def _products_into(self, x: torch.Tensor, h_out: int, w_out: int, chunk: int, calibrating: bool,
                       convolve: bool, padding: tuple) -> torch.Tensor:
        """The (N, H', W', out) outputs of an NHWC input, ``chunk`` images and one group
        at a time, each product written into its slice of a new output."""
        per_in, per_out = x.shape[3] // self.groups, self._per_out
        out = torch.empty(x.shape[0], h_out, w_out, self.weight.shape[0], dtype=x.dtype, device=x.device)
        for i in range(0, x.shape[0], chunk):
            for g in range(self.groups):
                xg = x[i:i + chunk, :, :, g * per_in:(g + 1) * per_in]
                target = out[i:i + chunk]  # one group writes its slice of the output in place
                target = target.view(-1, per_out) if self.groups == 1 else None
                y = self._product_of(g, xg, h_out, w_out, calibrating, convolve, padding, target)
                if y is not target:
                    out[i:i + chunk, :, :, g * per_out:(g + 1) * per_out] = y.view(xg.shape[0], h_out, w_out, per_out)
        return out

    def _product_of(self, g: int, xg: torch.Tensor, h_out: int, w_out: int, calibrating: bool, convolve: bool,
                    padding: tuple, target) -> torch.Tensor:
        """Group g's (positions, out) outputs for its NHWC input ``xg``: the float
        product while calibrating, else the analog one by convolutions (written into
        ``target`` where given and possible) or on unrolled vectors."""
        if calibrating:
            return self._calibration_product(g, xg, h_out, w_out)
        if convolve:
            return self._convolved(g, xg, h_out, w_out, padding, target)
        return self._product(g, self._unroll(xg, h_out, w_out))

    @property
    def _per_out(self) -> int:
        return self.weight.shape[0] // self.groups

    def _patches(self, xg: torch.Tensor, h_out: int, w_out: int) -> torch.Tensor:
        """A (N, H', W', C, kh, kw) view of an NHWC group input: the receptive fields."""
        kh, kw = self.weight.shape[2:]
        s_b, s_h, s_w, s_c = xg.stride()
        return xg.as_strided((xg.shape[0], h_out, w_out, xg.shape[3], kh, kw),
                             (s_b, s_h * self.stride[0], s_w * self.stride[1], s_c,
                              s_h * self.dilation[0], s_w * self.dilation[1]), xg.storage_offset())

    def _unroll(self, xg: torch.Tensor, h_out: int, w_out: int) -> torch.Tensor:
        """(positions, C kh kw) input vectors of an NHWC group input: one copy."""
        return self._patches(xg, h_out, w_out).reshape(-1, xg.shape[3] * self.weight.shape[2] * self.weight.shape[3])

    def _offer_calibration(self, x: torch.Tensor, h_out: int, w_out: int) -> None:
        """Offer every group's input vectors of this call (an NHWC input, padded) to its
        calibration sample, once per call (``AnalogLayer._offer_receptive_fields``)."""
        per_in = x.shape[3] // self.groups
        for g in range(self.groups):
            self._offer_receptive_fields(g, self._patches(x[..., g * per_in:(g + 1) * per_in], h_out, w_out), 3)

    def _calibration_product(self, g: int, xg: torch.Tensor, h_out: int, w_out: int) -> torch.Tensor:
        """Calibration: the float product by convolution (the call's sample is offered
        before its products: :meth:`_offer_calibration`)."""
        self.called = True
        y = F.conv2d(xg.permute(0, 3, 1, 2), self.weight[g * self._per_out:(g + 1) * self._per_out].to(xg.dtype),
                     stride=self.stride, dilation=self.dilation)
        return self._positions(y)

    def _convolved(self, g: int, xg: torch.Tensor, h_out: int, w_out: int, padding: tuple,
                   target=None) -> torch.Tensor:
        """The analog product of group g by convolutions per row block (zero ``padding``
        their own), read out (into ``target``, a (positions, out) float32 tensor, where
        given)."""
        self.called = True
        matrix = self.matrices[g]
        grid = matrix.grid
        matrix._require_ready()
        ranges = grid._require_ranges()
        row_blocks = self._block_kernels(g)
        blocks = row_blocks.blocks
        on_torch = grid.engine == "torch"
        xq, squares, clips = self._convert(matrix, xg, row_blocks, grid._var_uniform is not None, on_torch)
        conv = dict(stride=self.stride, dilation=self.dilation, padding=padding)
        partial = _block_outputs(xq, blocks, [b.weight for b in blocks], conv)
        var = var_rows = None
        if grid._var is not None:
            xq.mul_(xq)  # the products are formed: xq's memory can hold its squares
            var = _block_outputs(xq, blocks, [b.variance for b in blocks], conv)
        elif grid._var_uniform is not None:
            # every block's sum of squares over its receptive fields, in one convolution
            sums = F.conv2d(_cudnn_layout(squares), row_blocks.taps, **conv)  # (N, blocks, H', W')
            # row-major, as a linear layer's are: the CPU's channels-last sums make a
            # transposed view, which the fused read-out would compile a variant for
            var_rows = sums.permute(1, 0, 2, 3).reshape(len(blocks), -1).to(torch.float64,
                                                                            memory_format=torch.contiguous_format)
            var_rows *= grid._var_uniform
        if clips is None:
            clipped = torch.zeros(len(blocks), dtype=torch.int64, device=xq.device)
        else:  # every unrolled copy of a clipped input is a clipped conversion
            clipped = self._clip_counts(clips, row_blocks, conv, (h_out, w_out))
        del xq, squares  # the products are formed: the read-out's working memory can reuse theirs
        if on_torch:  # everything stays on the grid's device
            y = matrix.combine_slices(grid.read_out_torch(partial, var, var_rows, None, ranges, True,
                                                          clipped, matrix.divisor, matrix.alpha))
            if target is None:
                return y
            return target.copy_(y)
        direct = target is not None and matrix.slices == 1  # sliced outputs are combined first
        y = grid.read_out(partial.numpy(), None if var is None else var.numpy(),
                          None if var_rows is None else var_rows.numpy(), None, ranges, True,
                          clipped.numpy(), matrix.divisor.numpy(), matrix.alpha,
                          target.numpy() if direct else None)
        if direct:
            return target
        y = torch.from_numpy(matrix.combine_slices(y))
        return y if target is None else target.copy_(y)

    def _clip_counts(self, clips: torch.Tensor, row_blocks: "_RowBlocks", conv: dict, out_hw: tuple) -> torch.Tensor:
        """Clipped conversions per row block, (blocks,) int64: each clipped input counted
        once per receptive field that holds it among the block's taps, i.e. the clip map
        ``clips`` (H, W, segments), summed over images, weighted by the blocks' coverage
        maps. The counts are integers, exact in float64 in any order."""
        coverage = self._coverage(row_blocks, tuple(clips.shape[:2]), conv, out_hw)  # (blocks, H x W x segments)
        return torch.mv(coverage, clips.view(-1)).long()

    def _coverage(self, row_blocks: "_RowBlocks", in_hw: tuple, conv: dict, out_hw: tuple) -> torch.Tensor:
        """(blocks, H x W x segments) float64: at each pixel (of an input of ``in_hw``) of
        each channel segment, how many receptive fields of the convolution hold it among
        each block's taps (``row_blocks.taps``), made once per input and output size."""
        key = (in_hw, out_hw, conv["padding"])
        found = row_blocks.coverages.get(key)
        if found is not None:
            return found
        taps = row_blocks.taps
        n_blocks, n_segments = taps.shape[:2]
        ones = torch.ones(1, 1, *out_hw, dtype=taps.dtype, device=taps.device)
        size = [(o - 1) * s - 2 * p + d * (k - 1) + 1 for o, s, p, d, k in
                zip(out_hw, conv["stride"], conv["padding"], conv["dilation"], taps.shape[2:])]
        extra = [i - n for i, n in zip(in_hw, size)]  # rows and columns no receptive field reaches
        coverage = F.conv_transpose2d(ones, taps.reshape(1, n_blocks * n_segments, *taps.shape[2:]),
                                      stride=conv["stride"], padding=conv["padding"], dilation=conv["dilation"])
        coverage = F.pad(coverage, (0, extra[1], 0, extra[0])).view(n_blocks, n_segments, *in_hw)
        coverage = coverage.permute(0, 2, 3, 1).reshape(n_blocks, -1).double()  # the clip map's order
        row_blocks.coverages[key] = coverage
        return coverage

    @staticmethod
    def _positions(y: torch.Tensor) -> torch.Tensor:
        """(N, out, H, W) -> (N H W, out): output positions in the read-out's vector order."""
        return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])

    def _convert(self, matrix: AnalogMatrix, xg: torch.Tensor, row_blocks: "_RowBlocks", squares: bool,
                 on_torch: bool = False) -> tuple:
        """The group's NHWC input through the layer's DAC, element-wise: (quantized input
        as NCHW in channels-last memory, per-pixel sums of its squares over each channel
        segment as (N, segments, H, W) if asked, the clipped values per pixel and channel
        segment summed over the images as (H, W, segments) float64, or None if nothing
        clipped). In a pass with deferred checks (``crossbar.deferred``) the torch engine
        reads nothing from the device: a non-finite input is flagged, and the clip map is
        kept even if all zero."""
        grid = matrix.grid
        checks = deferred.current() if on_torch else None
        r_in = grid.input_range
        full_scale = 1.0 if r_in is None else r_in
        images, height, width, channels = xg.shape
        if on_torch:
            xq, sq, clips, n_bad = torch_dac.pixel_dac_convert(xg.reshape(images, -1, channels), full_scale,
                                                               grid._dac_half, row_blocks.segment_matrix,
                                                               squares)
            if checks is not None:  # the pass runs again, checked, and refuses x then
                checks.flag(n_bad)
            else:
                n_bad = int(n_bad)
        else:
            pixels = xg.reshape(-1, channels).numpy()
            if not pixels.flags.c_contiguous:
                pixels = np.ascontiguousarray(pixels)
            segments = row_blocks.segments
            n_segments = len(segments) - 1
            xq = np.empty(pixels.shape, np.float32)
            sq = np.empty((len(pixels), n_segments) if squares else (0, 0), np.float32)
            clips = np.empty((len(pixels), n_segments), np.float32)
            n_bad = pixel_dac_convert(pixels, xq, full_scale, grid._dac_half, segments, sq, clips)
            xq, sq = torch.from_numpy(xq), torch.from_numpy(sq) if squares else None
            clips = torch.from_numpy(clips).view(images, -1, n_segments).sum(0, dtype=torch.float64)
        if checks is None and n_bad:
            raise ValueError(f"layer {matrix.name!r}: x contains {n_bad} NaN or Inf values; inputs must be finite")

        def nchw(a: torch.Tensor) -> torch.Tensor:
            return a.reshape(images, height, width, a.shape[-1]).permute(0, 3, 1, 2)

        # an all-zero clip map skips the coverage sums: a device read on the torch engine, so a
        # deferred pass keeps the map and forms the sums
        keep_clips = checks is not None or bool(clips.any())
        clip_map = clips.view(height, width, -1) if keep_clips else None
        return nchw(xq), nchw(sq) if squares else None, clip_map

    def _block_kernels(self, g: int) -> "_RowBlocks":
        """The row blocks of group g (:class:`_RowBlocks`), their kernels cut from the
        conductances read now and cached until the next at(t)."""
        grid = self.matrices[g].grid
        cached = self._kernels.get(g)
        if cached is not None and cached.conductances is grid._gdiff:
            return cached
        kh, kw = self.weight.shape[2:]
        taps = kh * kw
        out_g = grid.shape[1]
        device = grid._gdiff.device
        blocks, spans = [], []
        for r in range(grid.grid_shape[0]):
            a, b = int(grid.row_starts[r]), int(grid.row_starts[r + 1])
            lo, hi = a // taps, (b - 1) // taps + 1
            keep = torch.zeros((hi - lo) * taps, 1, dtype=torch.float32, device=device)
            keep[a - lo * taps:b - lo * taps] = 1.0  # the taps of edge channels that are this block's
            shape = (hi - lo, kh, kw)

            def kernel(m: torch.Tensor) -> torch.Tensor:
                rows = m[lo * taps:hi * taps] * keep
                return rows.t().reshape(out_g, *shape).contiguous(memory_format=_kernel_format(device))

            full_lo = lo if a == lo * taps else lo + 1
            full_hi = max(hi if b == hi * taps else hi - 1, full_lo)
            edges = [(c, keep[(c - lo) * taps:(c - lo + 1) * taps].reshape(kh, kw))
                     for c in sorted({lo, hi - 1}) if not full_lo <= c < full_hi]
            blocks.append(_Block(lo, hi, kernel(grid._gdiff), kernel(grid._var) if grid._var is not None else None))
            spans.append(((full_lo, full_hi), edges))
        # segments: each block's whole channels, and every edge channel alone
        channels = grid.shape[0] // taps
        bounds = {0, channels}
        for (full_lo, full_hi), edges in spans:
            bounds |= {full_lo, full_hi} | {c for channel, _ in edges for c in (channel, channel + 1)}
        segments = np.array(sorted(bounds), np.int64)
        n_segments = len(segments) - 1
        block_taps = torch.zeros(len(blocks), n_segments, kh, kw, dtype=torch.float32, device=device)
        for r, ((full_lo, full_hi), edges) in enumerate(spans):
            block_taps[r, np.searchsorted(segments, full_lo):np.searchsorted(segments, full_hi)] = 1.0
            for channel, mask in edges:
                block_taps[r, np.searchsorted(segments, channel)] = mask
        cut = _RowBlocks(grid._gdiff, blocks, segments, torch_dac.block_matrix(segments, device), block_taps, {})
        self._kernels[g] = cut
        return cut


class _Block(NamedTuple):
    """A row block of a convolution's tile grid: input channels lo .. hi (the edge
    channels possibly in part) and the conductance and read-variance kernels on them."""

    lo: int
    hi: int
    weight: torch.Tensor
    variance: Optional[torch.Tensor]


class _RowBlocks(NamedTuple):
    """A convolution group's row blocks, cut from the conductances ``conductances``, and
    how the per-pixel sums of a layer input (squares for the read-noise variance, clip
    counts) add up over each block's taps. The input's channels fall into channel
    ``segments`` (boundaries): each block's whole channels, and every edge channel
    (split between blocks) alone. ``segment_matrix`` (channels, segments) float64 sums
    a pixel's channels into its segments; ``taps`` (blocks, segments, kh, kw) float32
    holds each block's taps on each segment (all of them on its whole channels, its
    share on an edge channel, none elsewhere), so that one convolution of the
    segment maps gives every block's sum over its receptive field. ``coverages``
    caches :meth:`AnalogConv2d._coverage` per input and output size."""

    conductances: torch.Tensor
    blocks: list
    segments: np.ndarray
    segment_matrix: torch.Tensor
    taps: torch.Tensor
    coverages: dict


def group_matrices(weight: torch.Tensor, groups: int, tile_config, seed, mapping, name: str) -> list:
    """One AnalogMatrix per group of a convolution weight (out, in/groups, *kernel), each
    (out/groups, in/groups x kernel) in torch's (channel, *kernel) order, on its own
    sub-stream of ``seed``."""
    return [AnalogMatrix(group_rows(weight, groups, g).double().numpy(), tile_config, derive(seed, g), mapping,
                         f"{name}[group {g}]" if groups > 1 else name)
            for g in range(groups)]


def _cudnn_layout(t: torch.Tensor) -> torch.Tensor:
    """A convolution input in the memory layout its device convolves fastest: on a GPU,
    NCHW (on an H100, cuDNN's IEEE float32 kernels took 1.95 ms for resnet56's
    16-channel 3 x 3 convolutions of 1024 images in channels-last memory and 0.42 ms in
    NCHW, the copy 0.02 ms; the whole pass's convolutions 55 ms against 23 ms); on the
    CPU, as given (channels-last views: the CPU's numbers stay bitwise as they were)."""
    return t if t.device.type == "cpu" else t.contiguous()


def _kernel_format(device: torch.device) -> torch.memory_format:
    """The memory format of the row blocks' kernels: their inputs' (``_cudnn_layout``)."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def _block_outputs(x: torch.Tensor, blocks: list, kernels: list, conv: dict) -> torch.Tensor:
    """(R, N H' W', out): the convolution of each row block's channels of ``x`` (NCHW
    shape) by its kernel, in the read-out's vector order, one block at a time. One
    block's is a view where its memory is channels-last (the CPU's); several are copied
    straight into their place, not into positions first and stacked after (two copies,
    on a GPU's NCHW outputs)."""
    out = None
    for r, (block, kernel) in enumerate(zip(blocks, kernels)):
        y = F.conv2d(_cudnn_layout(x[:, block.lo:block.hi]), kernel, **conv)
        if len(blocks) == 1:
            return AnalogConv2d._positions(y).unsqueeze(0)
        n, c, h, w = y.shape
        if out is None:
            out = torch.empty((len(blocks), n, h, w, c), dtype=y.dtype, device=y.device)
        out[r].copy_(y.permute(0, 2, 3, 1))
    return out.view(len(blocks), -1, c)
