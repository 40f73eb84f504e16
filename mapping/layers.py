"""Analog torch layers: one base does the tiled product, subclasses only unroll.

Biases stay digital. The float weights are kept (buffer ``weight``) so that range
calibration can propagate float activations and so that a layer describes itself. The
programmed chip lives in the matrices' buffers (``matrices.G.grid.g_prog`` and so on),
so ``state_dict()`` and ``load_state_dict()`` save and restore it bitwise.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import nn

from crossbar.state_changes import CountsChanges
from crossbar.tensor_mode import normal_tensors

from .calibration_sample import FirstRows
from .matrix import AnalogMatrix


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    """A float32 C-contiguous numpy view of x (a copy only where layout or dtype demand)."""
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


def group_rows(weight: torch.Tensor, groups: int, g: int) -> torch.Tensor:
    """Group g of a weight (out, in/groups, *kernel) as the matrix its tiles hold:
    (out/groups, in/groups x kernel), torch's (channel, *kernel) order."""
    per_group = weight.shape[0] // groups
    return weight[g * per_group:(g + 1) * per_group].reshape(per_group, -1)


# Why a layer reported as analog can go uncalled, for the errors that say so.
NOT_CALLED_WHY = ("the model computed without it, either through a fused fast path that reads its weight "
                  "directly (such paths are switched off for converted models; a custom module may still "
                  "have one) or because its forward never uses this layer. Its output would not come from "
                  "the tiles, so it is refused; remove unused layers before converting, or, if the model "
                  "chooses its layers per call, allow it with analog_model.allow_skipping(name)")


class AnalogLayer(CountsChanges, nn.Module):
    """Base analog layer: ``groups`` weight matrices on tiles plus a digital bias.

    Subclasses supply ``forward`` (their input as vectors of each group through
    ``_product``, the products back in their output's shape) and, where the float
    module's weight layout is not the buffer's, ``_torch_layout``."""

    bookkeeping = frozenset({"called"})  # set by every pass

    @normal_tensors
    def __init__(self, matrices: list, weight: torch.Tensor, bias: Optional[torch.Tensor], name: str) -> None:
        super().__init__()
        self.matrices = nn.ModuleList(matrices)
        self.layer_name = name
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._calibration: Optional[list] = None  # per group: its calibration sample (None: final)
        self.called = False  # set by every product: AnalogModel checks that no layer was bypassed

    def _group_weight(self, g: int) -> torch.Tensor:
        """Group g's (out/groups, in/groups x kernel) matrix of the float weight, in the
        tiles' unrolled order."""
        return group_rows(self.weight, len(self.matrices), g)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        """x, if its dtype is the one the float layer accepts: its own (float32 for a
        converted model; what ``.half()`` or ``.double()`` made it), widened to float32
        where it is a 16-bit float. The layer computes in that dtype (the chip keeps its
        precision: see ``crossbar.precision``); callers cast the output back to x's."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"layer {self.layer_name!r}: input is a {type(x).__name__}: expected a torch.Tensor")
        if x.dtype != self.weight.dtype:
            raise ValueError(f"layer {self.layer_name!r}: input has dtype {x.dtype}: expected {self.weight.dtype}, "
                             f"as the float layer would (it refuses other dtypes too)")
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x

    def _as_batch(self, x: torch.Tensor, channels: int, sizes: tuple) -> tuple:
        """(x as a batch, whether it was one unbatched input), for a convolution of
        ``channels`` input channels over spatial dimensions named ``sizes``: torch's
        convolutions take (channels, *spatial) as a batch of one, and so do these."""
        spatial = len(sizes)
        if x.dim() not in (spatial + 1, spatial + 2) or x.shape[-spatial - 1] != channels:
            named = ", ".join(sizes)
            raise ValueError(f"layer {self.layer_name!r}: input has shape {tuple(x.shape)}: expected "
                             f"(batch, {channels}, {named}) or, unbatched, ({channels}, {named})")
        unbatched = x.dim() == spatial + 1
        return (x.unsqueeze(0) if unbatched else x), unbatched

    def _product(self, g: int, vectors: torch.Tensor) -> torch.Tensor:
        self.called = True
        if len(vectors) == 0:
            self._empty_batch()
            return vectors.new_zeros((0, self.matrices[g].shape[0]))
        if self._calibration is not None:
            self._sample_for_calibration(g, len(vectors), lambda rows: vectors if rows is None else vectors[rows])
            return self._float_product(g, vectors)
        matrix = self.matrices[g]
        if matrix.grid.engine == "torch":  # on the grid's device, never via the host
            return matrix.matmul(vectors.to(torch.float32)).to(vectors.dtype)
        y = matrix.matmul(_to_numpy(vectors))  # its errors name the layer and the tile
        return torch.from_numpy(y).to(vectors.dtype)

    def _float_product(self, g: int, vectors: torch.Tensor) -> torch.Tensor:
        """Group g's float product of (n, inputs) vectors: calibration's."""
        self.called = True
        return vectors @ self._group_weight(g).t().to(vectors.dtype)

    def _add_bias(self, y: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """y + bias along ``channel_dim``, in place: y is the layer's own new output."""
        if self.bias is None:
            return y
        shape = [1] * y.dim()
        shape[channel_dim] = -1
        return y.add_(self.bias.view(shape).to(y.dtype))

    # -- time, calibration, counts ------------------------------------------------------------
    def at(self, t: float) -> None:
        for m in self.matrices:
            m.at(t)

    def begin_calibration(self, seed: int = 0, kind: type = FirstRows) -> None:
        """Sample the inputs of the next passes for each group (``mapping.calibration_sample``:
        ``FirstRows``, ``Reservoir`` for a layer called several times per pass, or
        ``Unsampled``)."""
        rng = np.random.default_rng(seed)
        self._calibration = [kind(m.mapping.calibration_rows, m.shape[1], rng) for m in self.matrices]

    def _empty_batch(self) -> None:
        """Note a call on an empty batch (as torch's layers take one: nothing is read): a
        call, and in calibration one that sampled nothing (not a layer never called)."""
        self.called = True
        for sample in self._calibration or []:
            if sample is not None:
                sample.offer(0, None)

    def _sample_for_calibration(self, g: int, n_vectors: int, fetch) -> None:
        """Offer the group's ``n_vectors`` input vectors to its sample; ``fetch(rows)``
        returns the chosen ones (rows None: all). A sample that is full and final
        calibrates the group at once and is freed."""
        sample = self._calibration[g]
        if sample is None:  # calibrated already
            return
        if sample.offer(n_vectors, fetch):
            self._calibration[g] = None
            self.matrices[g].calibrate(sample.rows())

    def _offer_receptive_fields(self, g: int, patches: torch.Tensor, positions: int) -> None:
        """Offer group g's input vectors of one call to its calibration sample, all at
        once: ``patches`` is a view whose first ``positions`` dimensions are the output
        positions and whose others are a receptive field, unrolled only for the rows the
        sample keeps. Once per call, not per chunk of products: a sample that keeps the
        first rows offered drew them from the first chunk's images alone (36 of 256 for
        resnet20's first layers), so that the ranges depended on
        ``mapping.max_rows_per_chunk`` and on the device (a GPU's chunks are larger)."""
        lead = patches.shape[:positions]
        width = math.prod(patches.shape[positions:])

        def fetch(rows):
            if rows is None:
                return patches.reshape(-1, width)
            where = tuple(torch.from_numpy(i).to(patches.device) for i in np.unravel_index(rows, lead))
            return patches[where].reshape(len(rows), width)

        self._sample_for_calibration(g, lead.numel(), fetch)

    def end_calibration(self) -> None:
        """Calibrate the groups whose sample is not final yet (all it kept)."""
        samples, self._calibration = self._calibration, None
        for m, sample in zip(self.matrices, samples):
            if sample is None:
                continue
            if not sample.calls:
                raise RuntimeError(f"analog layer {self.layer_name!r} was never called during calibration: its "
                                   f"ranges come from the inputs it sees there, so calibrate on batches that use it "
                                   f"(if no pass ever does: {NOT_CALLED_WHY})")
            rows = sample.rows()
            if len(rows) == 0:
                raise ValueError(f"analog layer {self.layer_name!r} saw only empty batches during calibration: "
                                 f"calibrate on batches with at least one input")
            m.calibrate(rows)

    def weight_pairs(self) -> list:
        """Per group: (intended weights, weights the tiles hold now incl. drift
        compensation), both (out, in) float64 in the tiles' unrolled order."""
        return [(self._group_weight(g).double().cpu().numpy(), m.weight_read()) for g, m in enumerate(self.matrices)]

    def weights_held(self) -> dict:
        """{parameter name: the weights the tiles hold now}, in the float module's names and
        layouts (its ``weight``), float32: (G+ - G-) / scale at the current time with drift
        compensation, clipped weights at their clip value. What the chip computes with,
        read without per-read noise or converters."""
        read = torch.cat([torch.from_numpy(m.weight_read()) for m in self.matrices])
        return {"weight": self._torch_layout(read.reshape(self.weight.shape).float())}

    def _torch_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight in this layer's buffer layout -> the float module's parameter layout."""
        return weight

    def counts(self) -> dict:
        total = {}
        for m in self.matrices:
            for k, v in m.counts().items():
                total[k] = total.get(k, 0) + v
        return total

    def reset_counts(self) -> None:
        for m in self.matrices:
            m.reset_counts()

    def extra_repr(self) -> str:
        m = self.matrices[0]
        return (f"name={self.layer_name!r}, groups={len(self.matrices)}, matrix={m.shape}, "
                f"tiles={sum(x.n_tiles for x in self.matrices)} of {m.tile_config.rows}x{m.tile_config.cols}")


class AnalogLinear(AnalogLayer):
    """``nn.Linear`` on tiles: the weight (out, in) is one matrix."""

    @classmethod
    def from_torch(cls, layer: nn.Linear, tile_config, seed, mapping, name: str) -> "AnalogLinear":
        return cls.from_weight(layer.weight, layer.bias, tile_config, seed, mapping, name)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], tile_config, seed, mapping,
                    name: str) -> "AnalogLinear":
        """A weight (out, in) and an optional bias (out,) on tiles, as nn.Linear holds them."""
        m = AnalogMatrix(weight.detach().double().numpy(), tile_config, seed, mapping, name)
        return cls([m], weight, bias, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, x = x.dtype, self._check_input(x)
        with torch.no_grad():
            n_in = self.weight.shape[1]
            if x.shape[-1] != n_in:
                raise ValueError(f"layer {self.layer_name!r}: input has shape {tuple(x.shape)}: "
                                 f"expected (..., {n_in})")
            y = self._product(0, x.reshape(-1, n_in))
            return self._add_bias(y.reshape(*x.shape[:-1], y.shape[-1]), -1).to(dtype)
