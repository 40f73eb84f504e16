"""How a batch reaches a model: one convention for calibration, evaluation and training.

A batch is the model's inputs, or an (inputs, labels, ...) pair as a DataLoader yields
it. Inputs are a tensor (``model(x)``), a tuple or list of positional inputs
(``model(*inputs)``) or a dict of keyword inputs (``model(**inputs)``). A bare tensor or
dict is inputs alone; a tuple or list is always (inputs, labels, ...), so a model of two
positional inputs takes ``((x1, x2), y)``.
"""
from __future__ import annotations

import torch


def batch_inputs(batch):
    """The model inputs of one batch."""
    if isinstance(batch, (torch.Tensor, dict)):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise ValueError(f"a batch of type {type(batch).__name__} is invalid: expected a tensor, a dict of keyword "
                     f"inputs, or an (inputs, labels) pair")


def call_model(model, inputs):
    """model(inputs) by the convention above."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def map_tensors(inputs, fn):
    """fn applied to every tensor of the inputs (non-tensor inputs are kept as they are)."""
    if isinstance(inputs, dict):
        return {k: map_tensors(v, fn) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        mapped = [map_tensors(v, fn) for v in inputs]
        if hasattr(inputs, "_fields"):  # a namedtuple takes its fields as arguments
            return type(inputs)(*mapped)
        return type(inputs)(mapped)
    return fn(inputs) if isinstance(inputs, torch.Tensor) else inputs


def slice_inputs(inputs, n: int):
    """The first n samples of every input tensor (non-tensor inputs are kept whole)."""
    return map_tensors(inputs, lambda t: t[:n])
