"""Convolutions (transposed ones too): the per-row-block convolution path against the unrolled path on the
same chip (the same noise numbering, so they agree even with noise on), and DAC counts
that are exact for what the hardware converts."""
import warnings

import pytest
import torch
from torch import nn

from crossbar import presets
from mapping import MappingConfig, convert
from tests.conftest import under_thread_counts

LAYERS = [
    lambda: nn.Conv2d(5, 7, 3, padding=1),
    lambda: nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect"),
    lambda: nn.Conv2d(9, 4, (5, 3), stride=(1, 2), padding=(2, 0), padding_mode="circular"),
    lambda: nn.Conv1d(12, 6, 5, stride=2, padding=2),
    # transposed convolutions run as the convolution they equal: the same two paths
    lambda: nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
    lambda: nn.ConvTranspose1d(8, 5, 4, stride=3, padding=4, dilation=2),  # crops: padding > d (k - 1)
]


def analog_layer(make, config, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(make()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, convert(model, config, seed=seed)


def inputs(layer, batch=6, size=11, scale=1.0):
    one_d = isinstance(layer, (nn.Conv1d, nn.ConvTranspose1d))
    shape = (batch, layer.in_channels, size) if one_d else (batch, layer.in_channels, size, size)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * scale


def both_paths(analog, x, t=3600.0):
    layer = analog.module[0]
    results = {}
    for unrolled in (False, True):
        layer.unrolled = unrolled
        analog.at(t)  # the same read streams from their start
        analog.reset_counts()
        results[unrolled] = (analog(x), analog.counts()["0"])
    layer.unrolled = False
    return results


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("config", [presets.pcm(rows=16, cols=8, adc_bits=None),
                                    presets.gaussian(rows=40, cols=4, adc_bits=None, read_sigma_rel=0.05)])
def test_convolution_path_equals_unrolled_path_with_noise_on(make, config):
    model, analog = analog_layer(make, config)
    x = inputs(model[0])
    analog.calibrate([x])
    paths = both_paths(analog, x)
    (conv, conv_counts), (unrolled, unrolled_counts) = paths[False], paths[True]
    scale = unrolled.abs().max().item()
    assert torch.allclose(conv, unrolled, rtol=1e-4, atol=1e-4 * scale)
    assert conv_counts == unrolled_counts


@pytest.mark.parametrize("make", LAYERS)
def test_with_adcs_the_paths_differ_by_at_most_a_step_on_few_outputs(make):
    model, analog = analog_layer(make, presets.pcm(rows=16, cols=8, adc_bits=6, dac_bits=5))
    x = inputs(model[0])
    analog.calibrate([x])
    paths = both_paths(analog, x * 1.5)  # beyond the calibrated DAC range: clipping happens
    (conv, conv_counts), (unrolled, unrolled_counts) = paths[False], paths[True]
    assert conv_counts == unrolled_counts and conv_counts["dac_clipped"] > 0
    layer = analog.module[0]
    steps = sum(float(m.grid.output_ranges().max() / 31 / m.divisor.min()) for m in layer.matrices)
    diff = (conv - unrolled).abs()
    assert diff.max().item() <= steps * float(layer.matrices[0].alpha) * 1.01
    assert (diff > 1e-5 * unrolled.abs().max()).float().mean().item() < 0.02


def test_dac_counts_are_every_unrolled_copy():
    model, analog = analog_layer(lambda: nn.Conv2d(4, 6, 3, padding=1), presets.ideal(rows=16, cols=4, dac_bits=4))
    x = inputs(model[0], batch=3, size=7)
    analog.calibrate([x])
    analog.reset_counts()
    analog(x * 2.0)
    counts = analog.counts()["0"]
    r_in = analog.module[0].matrices[0].grid.input_range
    unrolled = torch.nn.functional.unfold(x * 2.0, 3, padding=1).transpose(1, 2).reshape(-1, 36)  # (c, kh, kw) order
    col_blocks = 2  # 6 outputs on 4-column tiles
    assert counts["dac_converted"] == unrolled.numel() * col_blocks
    assert counts["dac_clipped"] == int((unrolled.abs() > r_in).sum()) * col_blocks


def test_convolution_path_is_bitwise_reproducible_under_any_thread_count():
    model, analog = analog_layer(LAYERS[1], presets.pcm(rows=16, cols=8))
    x = inputs(model[0], batch=8, size=16)
    analog.calibrate([x])
    outs = under_thread_counts(lambda: analog.at(86400.0)(x))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_row_block_kernels_are_cut_at_calibration_and_at_t_not_in_the_forward_pass():
    # kernels cut lazily inside a pass fragmented the heap (see AnalogConv2d._prepare_kernels)
    model, analog = analog_layer(LAYERS[1], presets.pcm(rows=16, cols=8))
    layer = analog.module[0]
    x = inputs(model[0], batch=2, size=9)
    analog.calibrate([x])
    for t in (None, 86400.0):
        if t is not None:
            analog.at(t)
        assert all(layer._kernels[g][0] is m.grid._gdiff for g, m in enumerate(layer.matrices))
        before = {g: layer._kernels[g][1] for g in range(layer.groups)}
        analog(x)
        assert all(layer._kernels[g][1] is before[g] for g in range(layer.groups))


def test_operations_per_pass_do_not_grow_with_the_channel_segments(monkeypatch):
    """On a GPU every operation costs host time. A row block's per-pixel sums (read-noise
    variance, clip counts) over its whole channels and its edge channels are one matrix
    product and one convolution for all blocks, not a few operations per segment."""
    from tests.mapping.test_graphs import OperationLog

    monkeypatch.setenv("XBARSIM_FUSED", "0")
    issued = {}
    for rows in (18, 20):  # two blocks each: 2 whole channels per block, or split channels too
        model, analog = analog_layer(lambda: nn.Conv2d(4, 6, 3, padding=1), presets.pcm(rows=rows, cols=8))
        analog.set_engine("torch")
        x = inputs(model[0], batch=2, size=6)
        analog.calibrate([x])
        analog.at(3600.0)
        grid = analog.module[0].matrices[0].grid
        assert grid.grid_shape[0] == 2 and grid._var_uniform is not None
        analog(x)
        with OperationLog() as log:
            analog(x * 3.0)  # clipping: the clip counts are formed
        issued[rows] = (len(log.operations), len(analog.module[0]._kernels[0].segments) - 1)
    (whole, whole_segments), (split, split_segments) = issued[18], issued[20]
    assert (whole_segments, split_segments) == (2, 3)
    assert split == whole


@pytest.mark.parametrize("engine", ["numba", "torch"])
@pytest.mark.parametrize("make", LAYERS + [lambda: nn.Conv3d(3, 4, (2, 3, 3), stride=(1, 2, 1), padding=1)])
def test_an_unbatched_input_is_a_batch_of_one_as_in_torch(make, engine):
    """torch's convolutions take (channels, *spatial); before, these refused it."""
    model, analog = analog_layer(make, presets.pcm(rows=24, cols=8))
    _, again = analog_layer(make, presets.pcm(rows=24, cols=8))  # the same chip
    layer = model[0]
    x = inputs(layer, batch=1) if not isinstance(layer, nn.Conv3d) else torch.rand(1, 3, 5, 6, 7)
    for a in (analog, again):
        a.set_engine(engine).calibrate([x]).at(3600.0)
    y = analog(x[0])
    assert y.shape == layer(x[0]).shape
    assert torch.equal(y, again(x)[0])  # its noise too: the same reads as the batch of one
    assert analog.counts() == again.counts()
    if isinstance(layer, nn.ConvTranspose2d):  # output_size as torch takes it unbatched: (channels, h, w)
        size = (layer.out_channels, 21, 21)  # (not the layer's own output padding)
        assert analog.module[0](x[0], output_size=size).shape == layer(x[0], output_size=size).shape == (4, 21, 21)
    with pytest.raises(ValueError, match=r"input has shape \(2, .*\): expected \(batch, \d+, .*\) or, unbatched"):
        analog(torch.rand(2, *x.shape[2:]))


@pytest.mark.parametrize("rows", [16, 64])  # several row blocks, and one
def test_the_gpus_memory_layouts_read_as_the_cpus_on_the_cpu(rows, monkeypatch):
    """On a GPU the convolutions take NCHW inputs and kernels (``conv._cudnn_layout``)
    and their outputs are copied into the read-out's order; taken here on the CPU's
    torch engine, every layer reads as in the CPU's channels-last layout, bitwise,
    with noise, clipping DACs and ADCs on."""
    from mapping import conv

    for make in LAYERS:
        model, analog = analog_layer(make, presets.pcm(rows=rows, cols=8, adc_bits=6, dac_bits=5))
        analog.set_engine("torch")
        x = inputs(model[0])
        analog.calibrate([x])
        outs = []
        for gpu_layout in (False, True):
            if gpu_layout:
                monkeypatch.setattr(conv, "_cudnn_layout", lambda t: t.contiguous())
                monkeypatch.setattr(conv, "_kernel_format", lambda device: torch.contiguous_format)
            analog.module[0]._kernels.clear()  # cut again in the layout
            analog.at(3600.0)
            analog.reset_counts()
            outs.append((analog(x * 1.5), analog.counts()["0"]))
            monkeypatch.undo()
        (y0, c0), (y1, c1) = outs
        assert torch.equal(y0, y1) and c0 == c1 and c0["dac_clipped"] > 0


CHUNKED = [
    (lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2), (6, 6, 9, 9)),
    (lambda: nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1), (6, 6, 5, 5)),
    (lambda: nn.Conv3d(3, 5, 3, padding=1), (6, 3, 4, 5, 5)),
]


@pytest.mark.parametrize("make, shape", CHUNKED)
def test_calibration_does_not_depend_on_how_products_are_chunked(make, shape):
    # mapping.max_rows_per_chunk bounds memory and "outputs do not depend on it"; a GPU's
    # chunks are larger. Calibrated on chunks of one image, a sample that keeps the first
    # rows offered used to draw them from the first image alone
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    states, outputs = [], []
    for rows in (1, 10 ** 6):
        torch.manual_seed(0)
        model = nn.Sequential(make()).eval()
        analog = convert(model, presets.pcm(rows=16, cols=8), seed=0,
                         mapping=MappingConfig(max_rows_per_chunk=rows, calibration_rows=64))
        if rows == 1:  # chunks of one image's output positions (Conv3d: of depth slices)
            (_, layer), = analog.analog_layers()
            with torch.no_grad():
                per_image = model(x)[0, 0].numel()
            assert layer.matrices[0].vectors_per_chunk(unrolled=isinstance(model[0], nn.Conv3d)) < 2 * per_image
        analog.calibrate([x]).at(3600.0)
        states.append(analog.state_dict())
        with torch.no_grad():
            outputs.append(analog(x))
    tensors = [{k: v for k, v in state.items() if isinstance(v, torch.Tensor)} for state in states]
    assert tensors[0].keys() == tensors[1].keys()
    # the DAC and ADC ranges, the drift-compensation reference, ...
    assert [k for k in tensors[0] if not torch.equal(tensors[0][k], tensors[1][k])] == []
    assert torch.equal(outputs[0], outputs[1])
