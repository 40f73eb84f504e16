"""Transposed and 3-d convolutions on tiles: exact against torch with the ideal preset (random
shapes and options, edge tiles included), DAC counts against an independent unrolling,
calibration on the inputs the DACs see, the chip saved and loaded bitwise, clear errors."""
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crossbar import presets
from mapping import AnalogConv3d, AnalogConvTranspose2d, convert

IDEAL = presets.ideal(rows=24, cols=20)  # most layers below span edge tiles both ways


def converted(layer, config=IDEAL, seed=0, calibrate_with=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analog = convert(nn.Sequential(layer), config, seed=seed)
    if calibrate_with is not None:
        analog.calibrate([calibrate_with])
    return analog


def close(got, want, rel=1e-5):
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= rel * float(want.abs().max())


def random_transposed(seed: int):
    """A ConvTranspose1d/2d with random sizes and options, and an input for it."""
    pick = random.Random(seed)
    one_d = seed % 3 == 2
    dims = 1 if one_d else 2
    groups = pick.choice([1, 2, 3])
    c_in, c_out = groups * pick.randint(1, 6), groups * pick.randint(1, 9)
    kernel = [pick.randint(1, 4) for _ in range(dims)]
    stride = [pick.randint(1, 3) for _ in range(dims)]
    dilation = [pick.randint(1, 2) for _ in range(dims)]
    padding = [pick.randint(0, d * (k - 1) + 1) for k, d in zip(kernel, dilation)]  # + 1: a crop
    output_padding = [pick.randint(0, max(s, d) - 1) for s, d in zip(stride, dilation)]
    kind = nn.ConvTranspose1d if one_d else nn.ConvTranspose2d
    layer = kind(c_in, c_out, kernel, stride=stride, padding=padding, output_padding=output_padding,
                 groups=groups, dilation=dilation, bias=pick.random() < 0.7)
    # inputs large enough for a non-empty output (torch returns an empty one, we refuse it)
    size = [max(pick.randint(3, 7), (2 * p - d * (k - 1) - o + s - 1) // s + 1)
            for p, d, k, o, s in zip(padding, dilation, kernel, output_padding, stride)]
    return layer.eval(), torch.randn(pick.randint(1, 3), c_in, *size, generator=torch.Generator().manual_seed(seed))


def test_transposed_convolution_takes_output_size_as_torch_does():
    torch.manual_seed(1)
    layer = nn.ConvTranspose2d(4, 6, 3, stride=3, padding=1).eval()
    x = torch.randn(2, 4, 5, 4)
    analog = converted(layer, calibrate_with=x)
    inner = analog.module[0]
    for size in ([13, 10], [2, 6, 15, 12], torch.Size([14, 11])):
        with torch.no_grad():
            want = layer(x, output_size=size)
        close(analog._run(lambda: inner(x, output_size=size), "forward pass"), want)
    with pytest.raises(ValueError, match=r"output_size = \[16, 10\] is invalid: .* here 13 to 15"):
        inner(x, output_size=[16, 10])
    with pytest.raises(ValueError, match=r"output_size = \[13\] is invalid: expected 2 spatial sizes"):
        inner(x, output_size=[13])


def random_conv3d(seed: int):
    pick = random.Random(seed)
    groups = pick.choice([1, 2])
    c_in, c_out = groups * pick.randint(1, 4), groups * pick.randint(1, 12)
    kernel = [pick.randint(1, 3) for _ in range(3)]
    padding_mode = pick.choice(["zeros", "reflect", "replicate", "circular"])
    layer = nn.Conv3d(c_in, c_out, kernel, stride=[pick.randint(1, 2) for _ in range(3)],
                      padding=[pick.randint(0, k - 1) for k in kernel], dilation=[pick.randint(1, 2) for _ in range(3)],
                      groups=groups, padding_mode=padding_mode, bias=pick.random() < 0.7)
    size = [pick.randint(5, 8) for _ in range(3)]
    return layer.eval(), torch.randn(2, c_in, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make,seed", [(random_transposed, s) for s in range(9)] +
                         [(random_conv3d, s) for s in range(6)])
def test_random_layers_equal_torch(make, seed):
    torch.manual_seed(seed)
    layer, x = make(seed)
    analog = converted(layer, calibrate_with=x)
    with torch.no_grad():
        want = layer(x)
    inner = analog.module[0]
    for unrolled in (False, True) if isinstance(inner, AnalogConvTranspose2d) else (True,):
        inner.unrolled = unrolled  # a transposed convolution's two paths
        close(analog(x), want)


def test_conv3d_chunks_by_depth_slices_without_changing_a_noisy_result():
    torch.manual_seed(2)
    layer = nn.Conv3d(3, 5, 3, padding=1).eval()
    x = torch.randn(3, 3, 6, 5, 4)
    config = presets.pcm(rows=16, cols=8)
    analog = converted(layer, config, calibrate_with=x)
    matrices = analog.module[0].matrices
    results = []
    for rows in (10 ** 6, 40):  # whole batch at once; 2 depth slices (of 20 positions) per chunk
        for m in matrices:
            m.mapping = m.mapping.replace(max_rows_per_chunk=rows)
        analog.at(86400.0)
        results.append(analog(x))
    assert torch.equal(results[0], results[1])


def test_dac_counts_are_every_read_of_every_input():
    torch.manual_seed(3)
    config = presets.ideal(rows=16, cols=4, dac_bits=4)
    # stride 2, no padding: every input pixel is read once per kernel tap; the inserted
    # zeros and the output padding's are converted too
    layer = nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1).eval()
    x = torch.randn(2, 4, 5, 6)
    analog = converted(layer, config, calibrate_with=x)
    analog.reset_counts()
    y = analog(x * 2.0)
    counts = analog.counts()["0"]
    r_in = analog.module[0].matrices[0].grid.input_range
    col_blocks = 2  # 6 outputs on 4-column tiles
    assert counts["dac_converted"] == y.shape[0] * y.shape[2] * y.shape[3] * 4 * 9 * col_blocks
    assert counts["dac_clipped"] == int(((x * 2.0).abs() > r_in).sum()) * 9 * col_blocks

    cube = nn.Conv3d(2, 6, (2, 3, 2), padding=(1, 0, 1)).eval()
    v = torch.randn(2, 2, 4, 5, 3)
    analog = converted(cube, config, calibrate_with=v)
    analog.reset_counts()
    analog(v * 2.0)
    counts = analog.counts()["0"]
    fields = F.pad(v * 2.0, (1, 1, 0, 0, 1, 1)).unfold(2, 2, 1).unfold(3, 3, 1).unfold(4, 2, 1)
    r_in = analog.module[0].matrices[0].grid.input_range
    assert counts["dac_converted"] == fields.numel() * col_blocks
    assert counts["dac_clipped"] == int((fields.abs() > r_in).sum()) * col_blocks


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.ConvTranspose2d(5, 7, 3, stride=2, padding=1), (4, 5, 6, 6)),
    (lambda: nn.Conv3d(3, 7, 3, padding=1, padding_mode="replicate"), (4, 3, 5, 5, 5)),
])
def test_calibration_takes_the_ranges_of_what_the_dacs_see_and_stays_within_the_steps(make, shape):
    torch.manual_seed(4)
    layer = make().eval()
    x = torch.randn(*shape)
    config = presets.ideal(rows=32, cols=16, dac_bits=8, adc_bits=8).with_path(
        "dac.percentile", 100.0).with_path("adc.percentile", 100.0)
    analog = converted(layer, config, calibrate_with=x)
    matrices = analog.module[0].matrices
    # inserted zeros, padding (a replicated edge repeats a value) change no maximum
    assert all(m.grid.input_range == pytest.approx(float(x.abs().max()), rel=1e-6) for m in matrices)
    with torch.no_grad():
        want = layer(x)
    got = analog(x)
    # error bound: half a DAC step on every input of a field, half an ADC step per tile read
    grid = matrices[0].grid
    n_in = matrices[0].shape[1]
    w_max = float(layer.weight.detach().abs().max())
    dac_half_step = float(x.abs().max()) / 127 / 2
    adc_half_steps = sum(float(m.grid.output_ranges().max()) / 127 / 2 / float(m.divisor.min()) for m in matrices)
    bound = n_in * w_max * dac_half_step + adc_half_steps * grid.grid_shape[0]
    assert float((got - want).abs().max()) <= bound


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.ConvTranspose2d(6, 4, (2, 3), stride=(2, 1), groups=2), (2, 6, 5, 4)),
    (lambda: nn.ConvTranspose1d(6, 4, 3, stride=2), (2, 6, 7)),
    (lambda: nn.Conv3d(4, 6, 2, groups=2), (2, 4, 4, 4, 4)),
])
def test_the_chip_saved_and_loaded_bitwise(make, shape):
    torch.manual_seed(5)
    layer = make().eval()
    x = torch.randn(*shape)
    config = presets.pcm(rows=16, cols=8)
    analog = converted(layer, config, calibrate_with=x)
    other = converted(make().eval(), config, seed=9)
    other.load_state_dict(analog.state_dict())
    for model in (analog, other):
        model.at(86400.0)
    assert torch.equal(other(x), analog(x))
    assert isinstance(other.module[0], (AnalogConvTranspose2d, AnalogConv3d))


def test_wrong_inputs_are_refused_with_the_shape_expected():
    transposed = converted(nn.ConvTranspose2d(4, 6, 3))
    with pytest.raises(ValueError, match=r"input has shape \(4, 5\): expected \(batch, 4, height, width\) or, "
                                         r"unbatched, \(4, height, width\)"):
        transposed(torch.randn(4, 5))
    one_d = converted(nn.ConvTranspose1d(4, 6, 3))
    with pytest.raises(ValueError, match=r"input has shape \(2, 3, 5\): expected \(batch, 4, length\)"):
        one_d(torch.randn(2, 3, 5))
    cube = converted(nn.Conv3d(2, 3, 3))
    with pytest.raises(ValueError, match=r"input has shape \(1, 2, 5, 5\): expected \(batch, 2, depth, height, width\)"):
        cube(torch.randn(1, 2, 5, 5))
    with pytest.raises(ValueError, match=r"input of \(2, 5, 5\) after padding is smaller than the kernel"):
        cube(torch.randn(1, 2, 2, 5, 5))
    cropping = converted(nn.ConvTranspose2d(3, 2, 4, padding=(3, 4)))
    with pytest.raises(ValueError, match=r"an input of \[7, 5\] gives an empty output \(\[4, 0\]\): the "
                                         r"padding \(3, 4\) crops all of it"):
        cropping(torch.randn(2, 3, 7, 5))


def test_batch_norm_folds_into_transposed_and_3d_convolutions():
    torch.manual_seed(6)
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 2, 1), nn.Flatten(2), nn.Unflatten(2, (1, 11, 11)),
                          nn.Conv3d(2, 3, (1, 3, 3)), nn.BatchNorm3d(3)).eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analog = convert(model, IDEAL, seed=0, fold_batchnorm=True)
    analog.calibrate([x])
    assert isinstance(analog.module[1], nn.Identity) and isinstance(analog.module[7], nn.Identity)
    with torch.no_grad():
        close(analog(x), model(x))
