"""Analog torch layers: one base does the tiled product, subclasses only unroll.

Biases stay digital. The float weights are kept (buffer ``weight``) so that range
calibration can propagate float activations and so that a layer describes itself.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crossbar.seeding import derive

from .matrix import AnalogMatrix


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    """A float32 C-contiguous numpy view of x (a copy only where layout or dtype demand)."""
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


def _tensors(obj):
    """numpy arrays -> tensors, recursively: torch.load(weights_only=True) accepts these."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors(v) for v in obj)
    return obj


def _arrays(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _arrays(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_arrays(v) for v in obj)
    return obj


# Why a layer reported as analog can go uncalled, for the errors that say so.
NOT_CALLED_WHY = ("the model computed without it, either through a fused fast path that reads its weight "
                  "directly (such paths are switched off for converted models; a custom module may still "
                  "have one) or because its forward never uses this layer. Its output would not come from "
                  "the tiles, so it is refused; remove unused layers before converting")


class AnalogLayer(nn.Module):
    """Base analog layer: ``groups`` weight matrices on tiles plus a digital bias.

    Subclasses implement ``_unroll`` (input -> (vectors, context) per group) and
    ``_fold`` (products -> output tensor)."""

    def __init__(self, matrices: list, weight: torch.Tensor, bias: Optional[torch.Tensor], name: str) -> None:
        super().__init__()
        self.matrices = matrices
        self.layer_name = name
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._calibration: Optional[list] = None  # per group: sampled input rows
        self._calibration_rng: Optional[np.random.Generator] = None
        self.called = False  # set by every product: AnalogModel checks that no layer was bypassed

    # each group's (out/groups, in/groups) weight matrix, from the float weight
    def _group_weight(self, g: int) -> torch.Tensor:
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor) -> None:
        """The dtypes the float layer accepts: its own (a converted model is float32)."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"layer {self.layer_name!r}: input is a {type(x).__name__}: expected a torch.Tensor")
        if x.dtype != self.weight.dtype:
            raise ValueError(f"layer {self.layer_name!r}: input has dtype {x.dtype}: expected {self.weight.dtype}, "
                             f"as the float layer would (it refuses other dtypes too)")

    def _product(self, g: int, vectors: torch.Tensor) -> torch.Tensor:
        self.called = True
        if self._calibration is not None:
            self._sample_for_calibration(g, vectors)
            return vectors @ self._group_weight(g).t().to(vectors.dtype)
        y = self.matrices[g].matmul(_to_numpy(vectors))  # its errors name the layer and the tile
        return torch.from_numpy(y).to(vectors.dtype)

    def _add_bias(self, y: torch.Tensor, channel_dim: int) -> torch.Tensor:
        if self.bias is None:
            return y
        shape = [1] * y.dim()
        shape[channel_dim] = -1
        return y + self.bias.view(shape).to(y.dtype)

    # -- time, calibration, counts ------------------------------------------------------------
    def at(self, t: float) -> None:
        for m in self.matrices:
            m.at(t)

    def begin_calibration(self, seed: int = 0) -> None:
        self._calibration = [[] for _ in self.matrices]
        self._calibration_rng = np.random.default_rng(seed)

    def _sample_for_calibration(self, g: int, vectors: torch.Tensor) -> None:
        keep = self.matrices[g].mapping.calibration_rows
        have = sum(len(a) for a in self._calibration[g])
        if have >= keep:
            return
        x = _to_numpy(vectors)
        if len(x) > keep - have:
            x = x[np.sort(self._calibration_rng.choice(len(x), keep - have, replace=False))]
        self._calibration[g].append(x.copy())

    def end_calibration(self) -> None:
        samples, self._calibration = self._calibration, None
        for m, parts in zip(self.matrices, samples):
            if not parts:
                raise RuntimeError(f"analog layer {self.layer_name!r} was never called during calibration: "
                                   f"{NOT_CALLED_WHY}")
            m.calibrate(np.concatenate(parts))

    def weight_pairs(self) -> list:
        """Per group: (intended weights, weights the tiles hold now incl. drift
        compensation), both (out, in) float64 in the tiles' unrolled order."""
        return [(self._group_weight(g).double().numpy(), m.weight_read()) for g, m in enumerate(self.matrices)]

    def counts(self) -> dict:
        total = {}
        for m in self.matrices:
            for k, v in m.counts().items():
                total[k] = total.get(k, 0) + v
        return total

    def reset_counts(self) -> None:
        for m in self.matrices:
            m.reset_counts()

    # -- persistence: the programmed chip travels in the state_dict ---------------------------
    def get_extra_state(self):
        return _tensors({"matrices": [m.state() for m in self.matrices]})

    def set_extra_state(self, state) -> None:
        state = _arrays(state)
        if len(state["matrices"]) != len(self.matrices):
            raise ValueError(f"layer {self.layer_name!r}: saved state has {len(state['matrices'])} groups")
        for m, s in zip(self.matrices, state["matrices"]):
            m.load_state(s)

    def extra_repr(self) -> str:
        m = self.matrices[0]
        return (f"name={self.layer_name!r}, groups={len(self.matrices)}, matrix={m.shape}, "
                f"tiles={sum(x.n_tiles for x in self.matrices)} of {m.tile_config.rows}x{m.tile_config.cols}")


class AnalogLinear(AnalogLayer):
    """``nn.Linear`` on tiles: the weight (out, in) is one matrix."""

    @classmethod
    def from_torch(cls, layer: nn.Linear, tile_config, seed, mapping, name: str) -> "AnalogLinear":
        m = AnalogMatrix(layer.weight.detach().double().numpy(), tile_config, seed, mapping, name)
        return cls([m], layer.weight, layer.bias, name)

    def _group_weight(self, g: int) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        with torch.no_grad():
            n_in = self.weight.shape[1]
            if x.shape[-1] != n_in:
                raise ValueError(f"layer {self.layer_name!r}: input has shape {tuple(x.shape)}: "
                                 f"expected (..., {n_in})")
            y = self._product(0, x.reshape(-1, n_in))
            return self._add_bias(y.reshape(*x.shape[:-1], -1), -1)


class AnalogConv2d(AnalogLayer):
    """``nn.Conv2d`` (and, through a unit height, ``nn.Conv1d``) on tiles, unrolled:
    each output position is one input vector of kh * kw * in/groups values, taken in
    (kh, kw, channel) order from a channels-last view so that unrolling costs one copy;
    each group is its own matrix. Padding of any mode is applied before unrolling. The
    output is returned in channels-last memory layout."""

    def __init__(self, matrices, weight, bias, name, stride, dilation, padding, padding_mode, groups, one_d):
        super().__init__(matrices, weight, bias, name)
        self.stride, self.dilation = stride, dilation
        self.pad, self.padding_mode, self.groups, self.one_d = padding, padding_mode, groups, one_d

    @staticmethod
    def _matrix(weight: torch.Tensor) -> torch.Tensor:
        """(out, c, kh, kw) -> (out, kh * kw * c), the unrolled vectors' order."""
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)

    @classmethod
    def from_torch(cls, layer, tile_config, seed, mapping, name: str) -> "AnalogConv2d":
        one_d = isinstance(layer, nn.Conv1d)
        weight = layer.weight.detach()
        if one_d:
            weight = weight.unsqueeze(2)  # (out, in/g, 1, k)
        groups = layer.groups
        per_group = weight.shape[0] // groups
        matrices = [
            AnalogMatrix(cls._matrix(weight[g * per_group:(g + 1) * per_group]).double().numpy(),
                         tile_config, derive(seed, g), mapping, f"{name}[group {g}]" if groups > 1 else name)
            for g in range(groups)
        ]
        # F.pad order, last dimension first: (left, right, top, bottom)
        pad = tuple(layer._reversed_padding_repeated_twice)
        if one_d:
            pad = pad + (0, 0)
        stride, dilation = layer.stride, layer.dilation
        if one_d:
            stride, dilation = (1, stride[0]), (1, dilation[0])
        return cls(matrices, weight, layer.bias, name, stride, dilation, pad, layer.padding_mode, groups, one_d)

    def _group_weight(self, g: int) -> torch.Tensor:
        per_group = self.weight.shape[0] // self.groups
        return self._matrix(self.weight[g * per_group:(g + 1) * per_group])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        with torch.no_grad():
            if self.one_d:
                x = x.unsqueeze(2)
            c_in = self.weight.shape[1] * self.groups
            if x.dim() != 4 or x.shape[1] != c_in:
                raise ValueError(f"layer {self.layer_name!r}: input has shape {tuple(x.shape)}: "
                                 f"expected (batch, {c_in}, ...)")
            if any(self.pad):
                mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
                x = F.pad(x, self.pad, mode=mode)
            x = x.permute(0, 2, 3, 1).contiguous()  # NHWC; free for a channels-last input
            kh, kw = self.weight.shape[2:]
            h_out = (x.shape[1] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
            w_out = (x.shape[2] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
            if h_out < 1 or w_out < 1:
                raise ValueError(f"layer {self.layer_name!r}: input of {tuple(x.shape[1:3])} after padding "
                                 f"is smaller than the kernel")
            out = torch.empty(x.shape[0], h_out, w_out, self.weight.shape[0], dtype=x.dtype)
            # a few images at a time: the unrolled input is kh * kw times larger
            chunk = max(1, self.matrices[0].mapping.max_rows_per_chunk // (h_out * w_out))
            per_in, per_out = x.shape[3] // self.groups, self.weight.shape[0] // self.groups
            for i in range(0, x.shape[0], chunk):
                for g in range(self.groups):
                    xg = x[i:i + chunk, :, :, g * per_in:(g + 1) * per_in]
                    s_b, s_h, s_w, s_c = xg.stride()
                    patches = xg.as_strided(
                        (xg.shape[0], h_out, w_out, kh, kw, per_in),
                        (s_b, s_h * self.stride[0], s_w * self.stride[1],
                         s_h * self.dilation[0], s_w * self.dilation[1], s_c),
                        xg.storage_offset())
                    y = self._product(g, patches.reshape(-1, kh * kw * per_in))
                    out[i:i + chunk, :, :, g * per_out:(g + 1) * per_out] = y.view(xg.shape[0], h_out, w_out, per_out)
            out = self._add_bias(out, 3).permute(0, 3, 1, 2)
            return out.squeeze(2) if self.one_d else out
