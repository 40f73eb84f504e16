"""The additive-noise baseline (Fagbohungbe and Qian, arXiv 2011.11840, 2205.07372):
W' = W + sigma xi, independent per weight, fresh per Monte Carlo repeat."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from mapping import is_digital_bias, mapped_modules, plain_copy

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def layer_sigma(weight: torch.Tensor, normalization: str, level: float) -> float:
    """The noise sigma of one tensor under a normalisation and level (eta or SNR dB)."""
    w = weight.detach().double()
    if normalization == "std":
        return level * w.std().item() if w.numel() > 1 else 0.0
    if normalization == "max":
        return level * w.abs().max().item()
    if normalization == "snr_db":
        return math.sqrt((w ** 2).mean().item() / 10 ** (level / 10))
    raise ValueError(f"normalization = {normalization!r} is invalid: expected 'std', 'max' or 'snr_db'")


def noised_tensors(model: nn.Module, noise_bias: bool, noise_batchnorm: bool) -> list:
    """(module name, parameter name) of the tensors the baseline perturbs, in the model's
    order: the weights that ``mapping.convert`` puts on tiles (and the mapped modules'
    biases, if asked), and batch-norm parameters if asked."""
    mapped = {name for name, _, _ in mapped_modules(model)[0]}
    chosen = []
    for name, m in model.named_modules():
        if name in mapped:
            chosen += [(name, p) for p, _ in m.named_parameters() if noise_bias or not is_digital_bias(p)]
        elif noise_batchnorm and isinstance(m, _NORMS) and m.affine:
            chosen += [(name, "weight"), (name, "bias")]
    return chosen


def noisy_copy(model: nn.Module, normalization: str, level: float, rng: np.random.Generator,
               noise_bias: bool = False, noise_batchnorm: bool = False, sigmas: dict = None) -> tuple:
    """(copy of model with W + sigma xi, {tensor: sigma used}), on the model's device (the
    noise is drawn on the host, from ``rng``). ``sigmas`` overrides the normalisation
    with explicit per-tensor sigmas (keys "module.param")."""
    noisy = plain_copy(model)  # (pruned or parametrized weights made plain, as convert puts them on tiles)
    used = {}
    for module_name, param in noised_tensors(noisy, noise_bias, noise_batchnorm):
        key = f"{module_name}.{param}" if module_name else param
        tensor = noisy.get_parameter(key)
        sigma = sigmas[key] if sigmas is not None else layer_sigma(tensor, normalization, level)
        noise = rng.standard_normal(tuple(tensor.shape)) * sigma
        with torch.no_grad():
            tensor.add_(torch.from_numpy(noise).to(tensor.device, tensor.dtype))
        used[key] = sigma
    return noisy, used
