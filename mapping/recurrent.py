"""nn.RNN, nn.LSTM and nn.GRU, and their cells, with their weight matrices on tiles.

Each layer and direction has two analog linear layers: input-to-hidden (W_ih, with b_ih)
over the whole sequence at once, and hidden-to-hidden (W_hh, with b_hh) once per time
step, as hardware reads it. The gates (sigmoids, tanh and their products) and the state
updates are digital, with torch's equations (its documentation of each module):

    RNN   h' = act(W_ih x + b_ih + W_hh h + b_hh)
    LSTM  i, f, g, o = W_ih x + b_ih + W_hh h + b_hh; c' = s(f) c + s(i) tanh(g); h' = s(o) tanh(c')
    GRU   r, z, n_x = W_ih x + b_ih; r_h, z_h, n_h = W_hh h + b_hh; r = s(r + r_h), z = s(z + z_h),
          n = tanh(n_x + r n_h), h' = (1 - z) n + z h

``num_layers``, ``bidirectional``, ``batch_first``, ``bias``, unbatched inputs and initial
states behave as in torch; dropout between layers acts in training mode only, as there.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from crossbar.seeding import derive

from .layers import AnalogLinear

DIGITAL_PART = "gates (sigmoid, tanh and their products) and the state updates"


class AnalogRNNBase(nn.Module):
    """The analog counterpart of nn.RNN, nn.LSTM and nn.GRU (``mode`` says which)."""

    DIGITAL_PART = DIGITAL_PART

    def __init__(self, cells: dict, rnn: nn.RNNBase) -> None:
        super().__init__()
        for name, layer in cells.items():  # named as torch names the weights: ih_l0, hh_l1_reverse, ...
            self.add_module(name, layer)
        self.mode, self.hidden_size, self.num_layers = rnn.mode, rnn.hidden_size, rnn.num_layers
        self.input_size, self.batch_first, self.dropout = rnn.input_size, rnn.batch_first, rnn.dropout
        self.directions = 2 if rnn.bidirectional else 1
        self.bidirectional = rnn.bidirectional

    @classmethod
    def from_torch(cls, rnn: nn.RNNBase, tile_config, seed, mapping, name: str) -> "AnalogRNNBase":
        if getattr(rnn, "proj_size", 0):
            raise ValueError(f"layer {name!r}: LSTM(proj_size={rnn.proj_size}) is not supported on tiles; "
                             f"convert an LSTM without projections")
        cells = {}
        for layer in range(rnn.num_layers):
            for direction in range(2 if rnn.bidirectional else 1):
                suffix = _suffix(layer, direction)
                for kind in ("ih", "hh"):
                    cells[kind + suffix] = AnalogLinear.from_weight(
                        getattr(rnn, f"weight_{kind}{suffix}"), getattr(rnn, f"bias_{kind}{suffix}", None),
                        tile_config, derive(seed, len(cells)), mapping, f"{name}.{kind}{suffix}")
        return cls(cells, rnn)

    def weights_held(self) -> dict:
        """The weights the tiles hold now, in torch's parameter names (weight_ih_l0, ...;
        see AnalogLayer.weights_held)."""
        return _weights_held(self)

    def forward(self, x: torch.Tensor, hx=None):
        if isinstance(x, nn.utils.rnn.PackedSequence):
            raise ValueError("analog recurrent layers take padded tensors, not PackedSequence: pad the batch "
                             "(torch.nn.utils.rnn.pad_packed_sequence) before the layer")
        batched = x.dim() == 3
        if not batched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        steps, batch, _ = x.shape
        if steps == 0:  # as torch's recurrent layers refuse it (an empty batch is taken)
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        shape = (self.num_layers * self.directions, batch, self.hidden_size)
        h0, c0 = _initial_states(self.mode, hx, shape, batched, 1, x, "LSTM")
        last_h, last_c = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.directions):
                k = layer * self.directions + direction
                suffix = _suffix(layer, direction)
                out, h, c = self._run_direction(getattr(self, "ih" + suffix), getattr(self, "hh" + suffix), x, h0[k],
                                                None if c0 is None else c0[k], reverse=direction == 1)
                outputs.append(out)
                last_h.append(h)
                last_c.append(c)
            x = outputs[0] if self.directions == 1 else torch.cat(outputs, dim=2)
            if self.training and self.dropout > 0 and layer < self.num_layers - 1:
                x = F.dropout(x, p=self.dropout)
        h_n = torch.stack(last_h)
        out = x if not self.batch_first or not batched else x.transpose(0, 1)
        if not batched:
            out, h_n = out.squeeze(1), h_n.squeeze(1)
        if self.mode == "LSTM":
            c_n = torch.stack(last_c)
            return out, (h_n, c_n if batched else c_n.squeeze(1))
        return out, h_n

    def _run_direction(self, ih: AnalogLinear, hh: AnalogLinear, x: torch.Tensor, h: torch.Tensor,
                       c: Optional[torch.Tensor], reverse: bool):
        steps, batch, _ = x.shape
        gates_x = ih(x.reshape(steps * batch, x.shape[2]))  # the whole sequence at once
        gates_x = gates_x.view(steps, batch, gates_x.shape[1])
        outputs = [None] * steps
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        for t in order:
            gates_h = hh(h)
            h, c = _step(self.mode, gates_x[t], gates_h, h, c)
            outputs[t] = h
        return torch.stack(outputs), h, c


class AnalogRNNCellBase(nn.Module):
    """The analog counterpart of nn.RNNCell, nn.LSTMCell and nn.GRUCell: one step of
    the recurrent layers above, its two matrices on tiles (``ih``, ``hh``), called as
    torch's cells are (``cell(x, hx)``, batched or not, ``hx`` zero when omitted)."""

    DIGITAL_PART = DIGITAL_PART

    def __init__(self, ih: AnalogLinear, hh: AnalogLinear, cell: nn.RNNCellBase) -> None:
        super().__init__()
        self.ih, self.hh = ih, hh
        self.input_size, self.hidden_size = cell.input_size, cell.hidden_size
        if isinstance(cell, nn.LSTMCell):
            self.mode = "LSTM"
        elif isinstance(cell, nn.GRUCell):
            self.mode = "GRU"
        else:
            self.mode = "RNN_TANH" if cell.nonlinearity == "tanh" else "RNN_RELU"

    @classmethod
    def from_torch(cls, cell: nn.RNNCellBase, tile_config, seed, mapping, name: str) -> "AnalogRNNCellBase":
        ih, hh = (AnalogLinear.from_weight(getattr(cell, f"weight_{kind}"), getattr(cell, f"bias_{kind}", None),
                                           tile_config, derive(seed, k), mapping, f"{name}.{kind}")
                  for k, kind in enumerate(("ih", "hh")))
        return cls(ih, hh, cell)

    def weights_held(self) -> dict:
        """The weights the tiles hold now, in torch's names (weight_ih, weight_hh)."""
        return _weights_held(self)

    def forward(self, x: torch.Tensor, hx=None):
        if x.dim() not in (1, 2):
            raise ValueError(f"{type(self).__name__}: Expected input to be 1D or 2D, got {x.dim()}D instead")
        batched = x.dim() == 2
        if not batched:
            x = x.unsqueeze(0)
        h, c = _initial_states(self.mode, hx, (x.shape[0], self.hidden_size), batched, 0, x, "LSTMCell")
        h, c = _step(self.mode, self.ih(x), self.hh(h), h, c)
        if not batched:
            h, c = h.squeeze(0), (None if c is None else c.squeeze(0))
        return (h, c) if self.mode == "LSTM" else h


def _initial_states(mode: str, hx, shape: tuple, batched: bool, batch_dim: int, x: torch.Tensor,
                    who: str) -> tuple:
    """(h, c) of ``shape`` (c None but for an LSTM): zeros where ``hx`` is None, else
    hx's, checked as torch checks them; unbatched ones gain the batch dimension."""
    if hx is None:
        zeros = x.new_zeros(shape)
        return zeros, (zeros if mode == "LSTM" else None)
    if mode == "LSTM" and not (isinstance(hx, tuple) and len(hx) == 2):
        raise ValueError(f"{who}: hx must be a tuple (h_0, c_0)")
    states = tuple(s if batched else s.unsqueeze(batch_dim) for s in (hx if mode == "LSTM" else (hx,)))
    for s in states:
        if tuple(s.shape) != shape:
            raise RuntimeError(f"Expected hidden size {shape}, got {tuple(s.shape)}")
    return states[0], (states[1] if mode == "LSTM" else None)


def _step(mode: str, gx: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: Optional[torch.Tensor]) -> tuple:
    """One time step's digital part, from the two products: (h', c'; None but for an LSTM)."""
    if mode == "LSTM":
        i, f, g, o = (gx + gh).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        r_x, z_x, n_x = gx.chunk(3, dim=1)
        r_h, z_h, n_h = gh.chunk(3, dim=1)
        r, z = torch.sigmoid(r_x + r_h), torch.sigmoid(z_x + z_h)
        n = torch.tanh(n_x + r * n_h)
        return (1 - z) * n + z * h, None
    act = torch.tanh if mode == "RNN_TANH" else torch.relu
    return act(gx + gh), None


def _weights_held(module: nn.Module) -> dict:
    """Each analog child's weight, named as torch names the weight it holds."""
    return {f"weight_{name}": layer.weights_held()["weight"] for name, layer in module.named_children()}


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction else "")
