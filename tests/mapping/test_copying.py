"""Models whose weights torch computes at each pass (pruning, weight and spectral norm,
parametrizations): ``plain_copy``, and ``convert`` and the baseline, which use it."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

from crossbar import presets
from eval.baseline import noisy_copy
from eval.datasets import Dataset
from eval.experiment import equivalent_sigmas
from eval.hwa import HWAConfig
from eval.train import train
from mapping import convert, plain_copy


class Symmetric(nn.Module):
    """A user parametrization: the weight as the symmetric part of a free matrix."""

    def forward(self, x):
        return x.triu() + x.triu(1).transpose(-1, -2)


class Abs(nn.Module):
    def forward(self, x):
        return x.abs()


def pruned_twice(layer):
    prune.l1_unstructured(layer, "weight", 0.4)
    prune.random_unstructured(layer, "weight", 0.2)  # (a PruningContainer of both)
    return layer


KINDS = {
    "prune": pruned_twice,
    "old weight_norm": torch.nn.utils.weight_norm,
    "old spectral_norm": torch.nn.utils.spectral_norm,
    "weight_norm": parametrizations.weight_norm,
    "spectral_norm": parametrizations.spectral_norm,
    "user parametrization": lambda layer: parametrize.register_parametrization(layer, "weight", Symmetric()),
}


def trained(kind):
    """A small model with its first Linear reparametrized by ``kind``, after an optimizer
    step taken after its last forward pass (the hooks' weight attribute is then stale)."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the old weight_norm is deprecated)
        model[0] = KINDS[kind](model[0])
    x = torch.rand(8, 12)
    model(x).pow(2).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.3 * p.grad
    return model.eval(), x


@pytest.mark.parametrize("kind", KINDS)
def test_a_plain_copy_computes_what_the_model_computes_with_plain_parameters(kind):
    model, x = trained(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cls = type(model[0])
    copy = plain_copy(model)
    assert type(copy[0]) is nn.Linear and not copy[0]._forward_pre_hooks
    assert [n for n, _ in copy.named_parameters()] == ["0.bias", "0.weight", "2.weight", "2.bias"]
    want = model(x)  # (its hooks recompute the weight first)
    assert torch.equal(copy(x), want)
    # the original is untouched: its class, its tensors, its outputs
    assert type(model[0]) is cls
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(model(x), want)


@pytest.mark.parametrize("kind", KINDS)
def test_convert_puts_the_computed_weight_on_tiles(kind):
    model, x = trained(kind)
    analog = convert(model, presets.ideal(rows=16, cols=16), seed=0)
    assert analog.digital_layers == []
    assert torch.allclose(analog(x), model(x), atol=1e-5)
    held = analog.module[0].weights_held()["weight"]
    assert torch.allclose(held, plain_copy(model)[0].weight, atol=1e-6)


def test_the_baseline_perturbs_the_computed_weight_by_its_name():
    """Before, a pruned model's copy failed (deepcopy), and the names were weight_orig."""
    model, x = trained("prune")
    noisy, sigmas = noisy_copy(model, "std", 0.0, np.random.default_rng(0))
    assert set(sigmas) == {"0.weight", "2.weight"} and torch.equal(noisy(x), model(x))
    assert set(equivalent_sigmas(model, presets.pcm())) == set(sigmas)
    noisy, sigmas = noisy_copy(model, "std", 0.1, np.random.default_rng(0))
    weight = plain_copy(model)[0].weight
    assert sigmas["0.weight"] == pytest.approx(0.1 * weight.double().std().item())
    changed = (noisy[0].weight != weight).float().mean().item()
    assert changed == 1.0  # every weight, the pruned zeros included, as tiles program them


@pytest.mark.parametrize("kind", KINDS)
def test_hardware_aware_training_refuses_a_computed_weight_by_name_and_takes_its_plain_copy(kind):
    """HWA perturbs, clips and hooks a layer's own weight tensor: before, a pruned model
    in device mode failed with a KeyError, and additive noise went to weight_orig or to
    weight norm's g and v, not to the weight."""
    model, _ = trained(kind)
    g = torch.Generator().manual_seed(0)
    data = Dataset("toy", torch.rand(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g),
                   torch.rand(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g), 4)
    hwa = HWAConfig(mode="additive", eta=0.05)
    with pytest.raises(ValueError, match=r"hwa: layer '0' computes its weight from other tensors"):
        train(model, data, 1, progress=False, hwa=hwa)
    plain = plain_copy(model).train()
    assert len(train(plain, data, 1, progress=False, hwa=hwa)) == 1
    train(model, data, 1, progress=False)  # plain training takes it as it is
    # a digital layer's computed weight is no concern of HWA
    digital = nn.Sequential(plain_copy(model), parametrize.register_parametrization(nn.PReLU(4), "weight", Abs()))
    assert len(train(digital, data, 1, progress=False, hwa=hwa)) == 1
