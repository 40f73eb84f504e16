"""Copies of user models with every weight a plain parameter.

torch has two ways of computing a layer's weight from other tensors at each forward
pass: a forward pre-hook that sets a plain ``weight`` attribute (``torch.nn.utils.prune``:
mask times ``weight_orig``; the old ``torch.nn.utils.weight_norm`` and ``spectral_norm``),
and ``torch.nn.utils.parametrize``, a property (``parametrizations.weight_norm`` and
``spectral_norm``, user parametrizations). Tiles hold the weight itself, and
the baseline perturbs the weight itself; a copy in which each such weight is made a plain
parameter, as its forward pass would compute it now, gives both the names and values they
expect. The hooks' attribute is also stale after an optimizer step (it is recomputed at
the next forward) and refuses ``copy.deepcopy`` (autograd made it)."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize, prune, remove_spectral_norm, remove_weight_norm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

# forward pre-hooks that set a module's weight attribute from its other tensors
_WEIGHT_HOOKS = (prune.BasePruningMethod, WeightNorm, SpectralNorm)


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, in eval mode, in which every pruned, weight-normed,
    spectral-normed or parametrized tensor is a plain parameter (or buffer) holding the
    value the model's next forward pass would compute in eval mode (in which spectral
    norm's power iteration does not step). The original is untouched."""
    memo = {}
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()  # the hook recomputes it below
    copied = copy.deepcopy(model, memo).eval()
    with torch.no_grad():
        for m in copied.modules():
            for hook in list(m._forward_pre_hooks.values()):
                if isinstance(hook, prune.BasePruningMethod):
                    prune.remove(m, hook._tensor_name)
                elif isinstance(hook, WeightNorm):
                    remove_weight_norm(m, hook.name)
                elif isinstance(hook, SpectralNorm):
                    remove_spectral_norm(m, hook.name)
            if parametrize.is_parametrized(m):
                _make_plain(m)
    return copied


def computed_weights(model: nn.Module) -> list:
    """Paths of the modules of ``model`` whose tensors torch computes at each pass from
    others (pruning, the old weight or spectral norm, a parametrization)."""
    return [name for name, m in model.named_modules()
            if parametrize.is_parametrized(m) or any(isinstance(hook, _WEIGHT_HOOKS)
                                                      for hook in m._forward_pre_hooks.values())]


def _make_plain(module: nn.Module) -> None:
    """Each parametrized tensor of ``module`` (a copy) as a plain parameter or buffer of
    its present value. Not torch's ``remove_parametrizations``: that deletes the property
    from the parametrized class, which the copy shares with the original, and so would
    break the user's model."""
    values = {}
    for name, parametrization in module.parametrizations.items():
        original = getattr(parametrization, "original", getattr(parametrization, "original0", None))
        values[name] = (getattr(module, name).detach().clone(), isinstance(original, nn.Parameter))
    module.__class__ = module.__class__.__bases__[0]  # the class torch derived the parametrized one from
    del module._modules["parametrizations"]
    for name, (value, is_parameter) in values.items():
        if is_parameter:
            module.register_parameter(name, nn.Parameter(value))
        else:
            module.register_buffer(name, value)
