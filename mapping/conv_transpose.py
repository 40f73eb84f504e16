"""``nn.ConvTranspose2d`` and ``nn.ConvTranspose1d`` on tiles, as the convolution they equal.

A transposed convolution of stride s, padding p, output padding o and dilation d is the
stride-1 convolution, dilation d, of its input with s - 1 zeros inserted between
neighbouring pixels and padded by d (k - 1) - p on each side (plus o on the far side;
negative padding crops), with the kernel flipped and its in/out channels swapped per
group. The tiles hold that convolution's weight, and the layer runs through
:class:`~mapping.conv.AnalogConv2d`: each output position is one analog read, its
overlapping kernel taps summed on the bit lines as in any convolution, so read noise and
ADC steps enter once per output, as they do for a Conv2d of the same shape.

The inserted zeros are applied to the rows (0 V, they add nothing) and counted as DAC
conversions, as on hardware that feeds the zero-inserted input. The alternative, one
read per input pixel with the overlaps summed digitally after the ADCs, reads fewer
rows but adds the noise and quantization of up to k^2 partial reads per output; it is
not what a Conv2d-shaped crossbar does and is not offered.
"""
from __future__ import annotations

import torch
from torch import nn

from .conv import AnalogConv2d, group_matrices


class AnalogConvTranspose2d(AnalogConv2d):
    """``nn.ConvTranspose2d`` / ``nn.ConvTranspose1d`` on tiles (see the module docstring).
    ``weight`` is the equivalent convolution's (out, in/groups, kh, kw) weight."""

    def __init__(self, matrices, weight, bias, name, groups, one_d, stride, padding, output_padding, dilation):
        super().__init__(matrices, weight, bias, name, (1, 1), dilation, (0, 0, 0, 0), "zeros", groups, one_d)
        # the transposed layer's own settings, (height, width); a 1-d layer has unit height
        self.t_stride, self.t_padding, self.t_output_padding = stride, padding, output_padding

    @classmethod
    def from_torch(cls, layer, tile_config, seed, mapping, name: str) -> "AnalogConvTranspose2d":
        one_d = isinstance(layer, nn.ConvTranspose1d)
        weight = layer.weight.detach()  # (in, out/groups, *kernel)
        if one_d:
            weight = weight.unsqueeze(2)
        groups = layer.groups
        conv_weight = _swapped_and_flipped(weight, groups).contiguous()  # the equivalent convolution's
        matrices = group_matrices(conv_weight, groups, tile_config, seed, mapping, name)

        def unit_height(values, height):  # a 1-d layer's settings as (height, width)
            return (height, values[0]) if one_d else tuple(values)

        return cls(matrices, conv_weight, layer.bias, name, groups, one_d, unit_height(layer.stride, 1),
                   unit_height(layer.padding, 0), unit_height(layer.output_padding, 0),
                   unit_height(layer.dilation, 1))

    def _torch_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """The equivalent convolution's weight back to (in, out/groups, *kernel)."""
        weight = _swapped_and_flipped(weight, self.groups)
        return weight.squeeze(2) if self.one_d else weight

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        dtype, x = x.dtype, self._check_input(x)
        x, unbatched = self._batched(x)
        with torch.no_grad():
            output_padding = self._output_padding(x, output_size, unbatched)
            kernel = self.weight.shape[2:]
            spatial = (1,) + tuple(x.shape[2:]) if self.one_d else tuple(x.shape[2:])
            out_size = [(n - 1) * s - 2 * p + d * (k - 1) + o + 1 for n, s, p, d, k, o in
                        zip(spatial, self.t_stride, self.t_padding, self.dilation, kernel, output_padding)]
            if min(out_size) < 1:
                raise ValueError(f"layer {self.layer_name!r}: an input of {list(x.shape[2:])} gives an empty "
                                 f"output ({out_size[1:] if self.one_d else out_size}): the padding "
                                 f"{self.t_padding[1:] if self.one_d else self.t_padding} crops all of it")
            pad = []  # F.pad order: width (left, right), then height (top, bottom)
            for axis in (1, 0):
                before = self.dilation[axis] * (kernel[axis] - 1) - self.t_padding[axis]
                pad += [before, before + output_padding[axis]]
            y = self._forward(self._zeros_inserted(x), tuple(pad)).to(dtype)
        return y.squeeze(0) if unbatched else y

    def _zeros_inserted(self, x: torch.Tensor) -> torch.Tensor:
        """x with stride - 1 zeros between neighbouring pixels, in channels-last memory
        (the layout the convolution reads)."""
        strides = self.t_stride[1:] if self.one_d else self.t_stride
        sizes = [(n - 1) * s + 1 for n, s in zip(x.shape[2:], strides)]
        spread = x.new_zeros(x.shape[0], *sizes, x.shape[1]).movedim(-1, 1)
        spread[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)] = x
        return spread

    def _output_padding(self, x: torch.Tensor, output_size, unbatched: bool) -> tuple:
        """(height, width) output padding: the layer's own, or what ``output_size`` (as
        torch takes it: the spatial sizes, optionally after batch and channels, or after
        channels for an unbatched input) asks."""
        if output_size is None:
            return self.t_output_padding
        spatial = 1 if self.one_d else 2
        sizes = [int(n) for n in output_size]
        leading = 1 if unbatched else 2
        if len(sizes) == spatial + leading:
            sizes = sizes[leading:]
        if len(sizes) != spatial:
            with_leading = "channels" if unbatched else "batch and channels"
            raise ValueError(f"layer {self.layer_name!r}: output_size = {list(output_size)} is invalid: expected "
                             f"{spatial} spatial sizes (or {spatial + leading} with {with_leading})")
        axes = (1,) if self.one_d else (0, 1)
        kernel = self.weight.shape[2:]
        padding = []
        for axis, n_in, size in zip(axes, x.shape[2:], sizes):
            smallest = ((n_in - 1) * self.t_stride[axis] - 2 * self.t_padding[axis]
                        + self.dilation[axis] * (kernel[axis] - 1) + 1)
            if not smallest <= size < smallest + self.t_stride[axis]:
                raise ValueError(f"layer {self.layer_name!r}: output_size = {list(output_size)} is invalid: for an "
                                 f"input of {list(x.shape[2:])} each size must lie in [smallest, smallest + stride "
                                 f"- 1], here {smallest} to {smallest + self.t_stride[axis] - 1} on that axis")
            padding.append(size - smallest)
        return (0, padding[0]) if self.one_d else tuple(padding)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", transposed: stride={self.t_stride}, padding={self.t_padding}, "
                f"output_padding={self.t_output_padding}")


def _swapped_and_flipped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Per group, in and out channels swapped, and the taps flipped: a transposed
    convolution's (in, out/g, kh, kw) weight to its equivalent convolution's
    (out, in/g, kh, kw), and back (the map is its own inverse)."""
    return torch.cat([w.transpose(0, 1) for w in weight.chunk(groups)]).flip(2, 3)
