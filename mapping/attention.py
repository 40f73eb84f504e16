"""nn.MultiheadAttention with its weight matrices on tiles.

The four projections (query, key, value, output) are analog linear layers; the packed
in_proj weight of torch's module is split into its three (E, E) blocks, each on tiles of
its own. The attention scores q k^T and their weighting of v stay digital: both multiply
activations by activations, which a crossbar that holds weights does not do. Masks,
``batch_first``, unbatched inputs, ``need_weights`` and ``average_attn_weights`` behave as
in torch (``torch.nn.functional.multi_head_attention_forward``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from crossbar.seeding import derive

from .layers import AnalogLinear

# what stays digital, for the conversion report
DIGITAL_PART = "attention scores (q k^T) and their weighting of v: activations times activations"


class AnalogMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` whose q, k, v and output projections run on tiles."""

    DIGITAL_PART = DIGITAL_PART

    def __init__(self, projections: dict, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = projections["q"], projections["k"], projections["v"]
        self.out_proj = projections["out"]
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.head_dim = mha.head_dim
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        self.kdim, self.vdim = mha.kdim, mha.vdim
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, tile_config, seed, mapping, name: str) -> "AnalogMultiheadAttention":
        if mha.bias_k is not None or mha.bias_v is not None:
            raise ValueError(f"layer {name!r}: MultiheadAttention(add_bias_kv=True) is not supported on tiles "
                             f"(its learned key/value rows are activations, not weights); convert without it")
        if mha.add_zero_attn:
            raise ValueError(f"layer {name!r}: MultiheadAttention(add_zero_attn=True) is not supported on tiles")
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = dict(zip("qkv", mha.in_proj_weight.split(e)))
        else:
            weights = {"q": mha.q_proj_weight, "k": mha.k_proj_weight, "v": mha.v_proj_weight}
        biases = dict(zip("qkv", mha.in_proj_bias.split(e))) if mha.in_proj_bias is not None else {}
        projections = {part: AnalogLinear.from_weight(weights[part], biases.get(part), tile_config,
                                                      derive(seed, j), mapping, f"{name}.{part}_proj")
                       for j, part in enumerate("qkv")}
        projections["out"] = AnalogLinear.from_weight(mha.out_proj.weight, mha.out_proj.bias, tile_config,
                                                      derive(seed, 3), mapping, f"{name}.out_proj")
        return cls(projections, mha)

    @property
    def projections(self) -> list:
        return [self.q_proj, self.k_proj, self.v_proj, self.out_proj]

    def weights_held(self) -> dict:
        """The weights the tiles hold now, in nn.MultiheadAttention's parameter names
        (see AnalogLayer.weights_held)."""
        q, k, v = (p.weights_held()["weight"] for p in self.projections[:3])
        held = {"in_proj_weight": torch.cat([q, k, v])} if self._qkv_same_embed_dim else \
            {"q_proj_weight": q, "k_proj_weight": k, "v_proj_weight": v}
        held["out_proj.weight"] = self.out_proj.weights_held()["weight"]
        return held

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:  # (L, E): a batch of one, as torch handles it
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                # checked before the batch of one is added, so that the error names the shape given
                if key_padding_mask.dim() != 1:
                    raise RuntimeError(f"for an unbatched (2-D) query, key_padding_mask must be None or 1-D "
                                       f"(source,): got shape {tuple(key_padding_mask.shape)}")
                key_padding_mask = key_padding_mask.unsqueeze(0)
        length, batch, _ = query.shape
        source = key.shape[0]
        heads, head_dim = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(length, batch * heads, head_dim).transpose(0, 1)
        k = self.k_proj(key).reshape(source, batch * heads, head_dim).transpose(0, 1)
        v = self.v_proj(value).reshape(source, batch * heads, head_dim).transpose(0, 1)
        mask = self._mask(attn_mask, key_padding_mask, batch, length, source, q.dtype)
        scores = torch.bmm(q * math.sqrt(1.0 / head_dim), k.transpose(1, 2))
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(length * batch, self.embed_dim)
        out = self.out_proj(out).view(length, batch, self.embed_dim)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        weights = weights.view(batch, heads, length, source)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights if batched else weights.squeeze(0))

    def _mask(self, attn_mask, key_padding_mask, batch: int, length: int, source: int, dtype) -> Optional[torch.Tensor]:
        """One additive float mask, (batch * heads or 1, length, source), from torch's
        boolean (True: not attended) or float masks."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            if mask.dim() == 2:
                if mask.shape != (length, source):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(mask.shape)}, but should be "
                                       f"{(length, source)}.")
                mask = mask.unsqueeze(0)
            elif mask.shape != (batch * self.num_heads, length, source):
                raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(mask.shape)}, but should be "
                                   f"{(batch * self.num_heads, length, source)}.")
        if key_padding_mask is not None:
            if key_padding_mask.shape != (batch, source):
                raise RuntimeError(f"expecting key_padding_mask shape of {(batch, source)}, but got "
                                   f"{tuple(key_padding_mask.shape)}")
            padding = _additive(key_padding_mask, dtype).view(batch, 1, 1, source)
            padding = padding.expand(-1, self.num_heads, -1, -1).reshape(batch * self.num_heads, 1, source)
            mask = padding if mask is None else mask + padding
        return mask


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of masks are supported, got {mask.dtype}")
    return mask.to(dtype)
