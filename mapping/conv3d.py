"""``nn.Conv3d`` on tiles: each output position reads its receptive field, unrolled.

The input vector of an output position is its receptive field in (channel, kd, kh, kw)
order, torch's weight layout, as for :mod:`mapping.conv`. Volumes are unrolled (one copy
of the receptive fields of a chunk of output positions) and go through the tile grid's
matrix product, so every DAC mode (fixed, calibrated, per-vector ranges, bit-serial) and
calibration work as for Linear layers. Noise numbering: vector = output position in
image, depth, row, column order. Counts are the hardware's: every unrolled copy of an
input is a DAC conversion.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .conv import group_matrices
from .layers import AnalogLayer


class AnalogConv3d(AnalogLayer):
    """``nn.Conv3d`` on tiles, one matrix per group (see the module docstring). The output
    is returned in channels-last memory layout."""

    def __init__(self, matrices, weight, bias, name, stride, dilation, padding, padding_mode, groups):
        super().__init__(matrices, weight, bias, name)
        self.stride, self.dilation, self.pad = stride, dilation, padding
        self.padding_mode, self.groups = padding_mode, groups

    @classmethod
    def from_torch(cls, layer, tile_config, seed, mapping, name: str) -> "AnalogConv3d":
        weight = layer.weight.detach()
        matrices = group_matrices(weight, layer.groups, tile_config, seed, mapping, name)
        # F.pad order, last dimension first: (left, right, top, bottom, front, back)
        return cls(matrices, weight, layer.bias, name, tuple(layer.stride), tuple(layer.dilation),
                   tuple(layer._reversed_padding_repeated_twice), layer.padding_mode, layer.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, x = x.dtype, self._check_input(x)
        c_in = self.weight.shape[1] * self.groups
        x, unbatched = self._as_batch(x, c_in, ("depth", "height", "width"))
        with torch.no_grad():
            if any(self.pad):
                x = F.pad(x, self.pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
            x = x.permute(0, 2, 3, 4, 1).contiguous()  # NDHWC
            kernel = self.weight.shape[2:]
            out_size = [(n - d * (k - 1) - 1) // s + 1
                        for n, d, k, s in zip(x.shape[1:4], self.dilation, kernel, self.stride)]
            if min(out_size) < 1:
                raise ValueError(f"layer {self.layer_name!r}: input of {tuple(x.shape[1:4])} after padding "
                                 f"is smaller than the kernel")
            c_out = self.weight.shape[0]
            per_in, per_out = c_in // self.groups, c_out // self.groups
            out = torch.empty(x.shape[0], *out_size, c_out, dtype=x.dtype, device=x.device)
            vectors = self.matrices[0].vectors_per_chunk(unrolled=True)
            calibrating = self._calibration is not None
            if x.shape[0] == 0:  # (the loop below reads nothing then)
                self._empty_batch()
            elif calibrating:
                self._offer_calibration(x, out_size)
            for images, depths in _chunks(x.shape[0], out_size, vectors):
                for g in range(self.groups):
                    patches = self._patches(x[..., g * per_in:(g + 1) * per_in], out_size)[images, depths]
                    vectors_in = patches.reshape(-1, per_in * kernel.numel())
                    y = self._float_product(g, vectors_in) if calibrating else self._product(g, vectors_in)
                    out[images, depths, ..., g * per_out:(g + 1) * per_out] = y.view(*patches.shape[:4], per_out)
            y = self._add_bias(out, 4).permute(0, 4, 1, 2, 3).to(dtype)
        return y.squeeze(0) if unbatched else y

    def _offer_calibration(self, x: torch.Tensor, out_size: list) -> None:
        """Offer every group's input vectors of this call (an NDHWC input, padded) to its
        calibration sample, once per call (``AnalogLayer._offer_receptive_fields``)."""
        per_in = x.shape[4] // self.groups
        for g in range(self.groups):
            self._offer_receptive_fields(g, self._patches(x[..., g * per_in:(g + 1) * per_in], out_size), 4)

    def _patches(self, xg: torch.Tensor, out_size: list) -> torch.Tensor:
        """A (N, D', H', W', C, kd, kh, kw) view of an NDHWC group input: the receptive fields."""
        s_b, s_d, s_h, s_w, s_c = xg.stride()
        spatial = (s_d, s_h, s_w)
        return xg.as_strided((xg.shape[0], *out_size, xg.shape[4], *self.weight.shape[2:]),
                             (s_b, *(s * step for s, step in zip(spatial, self.stride)), s_c,
                              *(s * d for s, d in zip(spatial, self.dilation))), xg.storage_offset())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stride={self.stride}, dilation={self.dilation}"


def _chunks(batch: int, out_size: list, vectors: int):
    """(image slice, depth slice) pairs covering the output positions in their order, each
    at most ``vectors`` positions where a depth slice of one image allows it."""
    per_image = out_size[0] * out_size[1] * out_size[2]
    if per_image <= vectors:
        step = vectors // per_image
        for i in range(0, batch, step):
            yield slice(i, i + step), slice(None)
        return
    depths = max(1, vectors // (out_size[1] * out_size[2]))
    for i in range(batch):
        for d in range(0, out_size[0], depths):
            yield slice(i, i + 1), slice(d, d + depths)
