"""Folding BatchNorm into the preceding convolution or linear layer (exact in float)."""
from __future__ import annotations

from collections import Counter

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .copying import plain_copy

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode) in which every BatchNorm that directly follows
    a Conv1d/2d/3d, ConvTranspose1d/2d or Linear whose output is used nowhere else is
    folded into that layer's weight and bias and replaced by Identity. BatchNorms without
    such a predecessor stay, and so do pairs in which either module is shared (called
    more than once, or held under more than one name: ``nn.ModuleList([conv] * n)``, an
    alias), where folding one use would change the others."""
    model = plain_copy(model)
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # fx cannot trace data-dependent control flow
        raise ValueError(f"fold_batchnorm=True needs a model torch.fx can trace: {err}") from None
    modules = dict(model.named_modules())  # (fx names a module held under several names by its first)
    calls = Counter(id(modules[node.target]) for node in graph.nodes if node.op == "call_module")
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))

    def used_once(module: nn.Module) -> bool:
        return calls[id(module)] == 1 and names[id(module)] == 1

    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _NORMS):
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
            continue
        layer, norm = modules[prev.target], modules[node.target]
        if not isinstance(layer, _FOLDABLE) or not norm.track_running_stats:
            continue
        if not (used_once(layer) and used_once(norm)):
            continue
        if isinstance(layer, nn.Linear):
            fused = fuse_linear_bn_eval(layer, norm)
        else:
            fused = fuse_conv_bn_eval(layer, norm, transpose=isinstance(layer, nn.modules.conv._ConvTransposeNd))
        _set_module(model, prev.target, fused)
        _set_module(model, node.target, nn.Identity())
    return model


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, name = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, module)
