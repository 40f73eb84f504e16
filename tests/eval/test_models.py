"""The built-in models (eval/models.py): the architectures the studies and their numbers
rest on, with and without batch norm, on every data set's input shape, and on tiles."""
import warnings

import pytest
import torch
from torch import nn

import mapping
from crossbar import presets
from eval.models import MODELS, build_model
from tests.mapping.test_convert import randomise_batchnorm

SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar": (3, 32, 32)}
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weighted_layers(model: nn.Module) -> list:
    """(type, weight shape) of every convolution and linear layer, in order."""
    return [(type(m).__name__, tuple(m.weight.shape)) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("data", SHAPES)
def test_every_model_classifies_every_input_shape(name, data):
    torch.manual_seed(0)
    for batchnorm in (False, True):
        model = build_model(name, SHAPES[data], 7, batchnorm).eval()
        y = model(torch.rand(3, *SHAPES[data]))
        assert y.shape == (3, 7) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", MODELS)
def test_batch_norm_adds_norms_and_changes_nothing_else(name):
    """The batch norm study (arXiv 2205.07372) compares each model with and without
    batch norm: the same convolutions and linear layers, a norm after each of them but
    the classifier's last, and the ResNets' layers followed by a norm lose their bias."""
    shape = SHAPES["cifar"]
    plain, normed = build_model(name, shape, 10, False), build_model(name, shape, 10, True)
    assert weighted_layers(plain) == weighted_layers(normed)
    assert not any(isinstance(m, NORMS) for m in plain.modules())
    norms = [m for m in normed.modules() if isinstance(m, NORMS)]
    assert len(norms) == len(weighted_layers(normed)) - 1
    biased = [m.bias is not None for m in normed.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert biased == ([False] * len(norms) + [True] if name.startswith("resnet") else [True] * len(biased))


@pytest.mark.parametrize("depth,option_a_parameters", [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018)])
def test_resnets_are_he_et_al_cifar_resnets(depth, option_a_parameters):
    """He et al. 2016's CIFAR ResNets: 6n + 2 weighted layers (a 3 x 3 stem, 3 stages of
    n blocks of two 3 x 3 convolutions on 16, 32 and 64 channels of 32, 16 and 8 pixels,
    a linear classifier). With identity shortcuts (their option A) they have the
    parameter counts of the widely used reference implementation; ours project the two
    shortcuts that change shape with a 1 x 1 convolution and its batch norm (16 x 32 +
    32 x 64 weights, 2 x (32 + 64) affine parameters): 2,752 more."""
    model = build_model(f"resnet{depth}", SHAPES["cifar"], 10, batchnorm=True).eval()
    assert parameters(model) == option_a_parameters + 2_752
    layers = weighted_layers(model)
    three_by_three = [s for kind, s in layers if kind == "Conv2d" and s[2:] == (3, 3)]
    shortcuts = [s for kind, s in layers if kind == "Conv2d" and s[2:] == (1, 1)]
    assert len(three_by_three) + 1 == depth and shortcuts == [(32, 16, 1, 1), (64, 32, 1, 1)]
    sizes = {}
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, o: sizes.setdefault(o.shape[1], set()).add(tuple(o.shape[2:])))
    model(torch.rand(1, *SHAPES["cifar"]))
    assert sizes == {16: {(32, 32)}, 32: {(16, 16)}, 64: {(8, 8)}}


def test_lenet5_on_mnist_is_lecuns_and_small_inputs_are_padded_to_fit():
    """LeNet-5 (LeCun et al. 1998, C3 fully connected) on 28 x 28 inputs padded to 32:
    61,706 parameters, 16 maps of 5 x 5 into the classifier. On 8 x 8 digits both
    convolutions pad, leaving 16 maps of 2 x 2."""
    model = build_model("lenet5", SHAPES["mnist"], 10)
    assert parameters(model) == 61_706
    first_linear = [s for kind, s in weighted_layers(model) if kind == "Linear"][0]
    assert first_linear == (120, 16 * 5 * 5)
    digits = build_model("lenet5", SHAPES["digits"], 10)
    assert [s for kind, s in weighted_layers(digits) if kind == "Linear"][0] == (120, 16 * 2 * 2)


@pytest.mark.parametrize("data,pixels", [("digits", 1), ("mnist", 3 * 3), ("cifar", 4 * 4)])
def test_vgg_pools_each_block_while_the_image_is_two_pixels_wide(data, pixels):
    model = build_model("vgg", SHAPES[data], 10)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    assert [s for kind, s in weighted_layers(model) if kind == "Linear"] == [(256, 128 * pixels), (10, 256)]


def test_an_unknown_model_is_refused_by_name():
    with pytest.raises(ValueError, match=r"model = 'resnet18' is invalid: expected one of mlp, cnn, .*resnet56"):
        build_model("resnet18", SHAPES["cifar"], 10)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_with_batch_norm_folds_and_runs_on_ideal_tiles(name):
    """Every norm of a built-in model follows a convolution or linear layer, so
    ``fold_batchnorm`` folds them all (the Linear + BatchNorm1d pairs of mlp, lenet5 and
    vgg included) and the whole model goes on tiles: on ideal devices and converters its
    outputs are the float model's but for float32 rounding."""
    torch.manual_seed(1)
    model = randomise_batchnorm(build_model(name, SHAPES["digits"], 10, batchnorm=True).eval())
    x = torch.rand(8, *SHAPES["digits"])
    reference = model(x)
    folded = mapping.fold_batchnorm(model)
    assert not any(isinstance(m, NORMS) for m in folded.modules())
    assert torch.allclose(folded(x), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is kept digital, so nothing warns
        analog = mapping.convert(model, presets.ideal(), seed=0, fold_batchnorm=True)
    assert analog.digital_layers == []
    assert len(analog.analog_layers()) == len(weighted_layers(model))
    assert torch.allclose(analog(x), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
