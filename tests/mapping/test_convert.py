import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mapping
from crossbar import presets
from mapping import AnalogMatrix, MappingConfig, convert


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 70), nn.ReLU(), nn.Linear(70, 10)).eval()


def cnn():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=2, dilation=2, groups=4, padding_mode="reflect"), nn.ReLU(),
        nn.Flatten(1, 2),  # (B, 12*8, 8) -> a 1-D signal of 96 channels
        nn.Conv1d(96, 16, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5),
    ).eval()


def randomise_batchnorm(model):
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if m.track_running_stats:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model


@pytest.mark.parametrize("tile", [8, 33, 128, 1024])
@pytest.mark.parametrize("make,shape", [(mlp, (16, 40)), (cnn, (4, 3, 16, 16))])
def test_ideal_conversion_matches_float(make, shape, tile):
    model = randomise_batchnorm(make())
    x = torch.rand(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analog = convert(model, presets.ideal(rows=tile, cols=tile), seed=0)
    expected = model(x)
    got = analog(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_the_warning_names_each_digital_layer_and_its_type_the_model_itself_included():
    embedded = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"kept digital \(not mapped to tiles\): 0 \(Embedding\)$"):
        convert(embedded, presets.ideal(), seed=0)
    with pytest.warns(UserWarning, match=r"kept digital \(not mapped to tiles\): the model \(Bilinear\)$"):
        analog = convert(nn.Bilinear(4, 5, 3), presets.ideal(), seed=0)
    assert analog.digital_layers == [""]


def test_original_untouched_report_and_warning():
    model = randomise_batchnorm(cnn())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="kept digital.*1") as caught:
        analog = convert(model, presets.ideal(rows=32, cols=32), seed=0)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[0], nn.Conv2d)
    where = {r["layer"]: r["where"] for r in analog.report}
    assert where == {"0": "analog", "3": "analog", "6": "analog", "9": "analog", "1": "digital"}
    conv3 = next(r for r in analog.report if r["layer"] == "3")
    assert conv3["matrix"] == [4, 3, 2 * 9] and conv3["tiles"] == 4 and conv3["devices"] == 2 * 12 * 18


def test_batchnorm_folding_is_exact_in_float():
    model = randomise_batchnorm(cnn())
    x = torch.rand(4, 3, 16, 16)
    folded = mapping.fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(folded(x), model(x), rtol=1e-5, atol=1e-6)
    analog = convert(model, presets.ideal(rows=64, cols=64), seed=0, fold_batchnorm=True)
    assert analog.digital_layers == []
    assert torch.allclose(analog(x), model(x), rtol=1e-4, atol=1e-5)


class SharedBlocks(nn.Module):
    """One Linear held under four names, called three times per pass, and a
    convolution whose BatchNorm differs at each of its two calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        linear = nn.Linear(16, 16)
        self.blocks = nn.ModuleList([linear] * 3)
        self.alias = linear
        conv = nn.Conv1d(2, 2, 3, padding=1)
        self.convs = nn.ModuleList([conv, conv])
        self.norms = randomise_batchnorm(nn.ModuleList([nn.BatchNorm1d(2), nn.BatchNorm1d(2)]))
        self.first = nn.Conv1d(1, 2, 3, padding=1)  # unshared, with its own norm: folded
        self.first_norm = randomise_batchnorm(nn.BatchNorm1d(2))

    def forward(self, x):
        x = torch.relu(self.first_norm(self.first(x.unsqueeze(1))))
        for conv, norm in zip(self.convs, self.norms):
            x = torch.relu(norm(conv(x)))
        x = x.mean(1)
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def test_a_module_under_several_names_runs_on_the_same_tiles_under_each():
    """Before, only a shared module's first name was put on tiles: its other uses ran
    as exact float layers, unreported but by one of their names."""
    model = SharedBlocks().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the norms stay digital)
        analog = convert(model, presets.pcm(rows=32, cols=32), seed=0)
        ideal = convert(model, presets.ideal(rows=32, cols=32), seed=0,
                        mapping=MappingConfig(drift_compensation=False))
    blocks = analog.module.blocks
    assert blocks[0] is blocks[1] is blocks[2] is analog.module.alias
    assert analog.module.convs[0] is analog.module.convs[1]
    assert [name for name, _ in analog.analog_layers()] == ["blocks.0", "convs.0", "first"]
    shared = {r["layer"]: r.get("shared_with") for r in analog.report if r["where"] == "analog"}
    assert shared == {"first": None, "convs.0": ["convs.1"], "blocks.0": ["blocks.1", "blocks.2", "alias"]}
    assert not [name for name in analog.digital_layers if "norms" not in name and "first_norm" not in name]
    x = torch.rand(5, 16)
    analog.calibrate([x])
    grid = blocks[0].matrices[0].grid
    before = grid._vectors_read
    analog(x)
    assert grid._vectors_read - before == 3 * 5  # every call read the one chip
    assert torch.allclose(ideal(x), model(x), atol=1e-4)


def test_a_module_shared_with_one_inside_a_mapped_module_is_reported_digital():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = self.attn.out_proj  # (fx or a user may alias it)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0])

    # torch's attention holds its output projection in a subclass of Linear
    with pytest.warns(UserWarning, match=r"kept digital \(not mapped to tiles\): head \(NonDynamically\w+Linear\)$"):
        analog = convert(Head().eval(), presets.ideal(), seed=0)
    assert analog.digital_layers == ["head"] and isinstance(analog.module.head, nn.Linear)


def test_batchnorm_of_a_shared_layer_is_not_folded():
    """Folding a BatchNorm into a convolution called twice, or held under two names,
    would change its other use: before, the folded model differed by up to 3.0."""
    model = SharedBlocks().eval()
    x = torch.rand(5, 16)
    folded = mapping.fold_batchnorm(model)
    assert torch.allclose(folded(x), model(x), rtol=1e-5, atol=1e-6)
    assert isinstance(folded.first_norm, nn.Identity)  # the unshared pair is folded
    assert all(isinstance(norm, nn.BatchNorm1d) for norm in folded.norms)

    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 3)
            self.alias = self.conv
            self.norm = randomise_batchnorm(nn.BatchNorm1d(2))

        def forward(self, x):
            return self.norm(self.alias(x))

    model, x = Aliased().eval(), torch.rand(3, 2, 9)
    folded = mapping.fold_batchnorm(model)
    assert isinstance(folded.norm, nn.BatchNorm1d) and torch.equal(folded(x), model(x))


def test_batchnorm_without_a_layer_to_fold_into_stays():
    """A norm after a sum, after an activation, or without running statistics (it
    normalises by each batch's own) has no weights to go into: it stays, and the
    model computes what it did; the pair beside them is folded."""

    class Unfoldable(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
            self.after_sum = nn.BatchNorm1d(6)
            self.relu = nn.ReLU()
            self.after_relu = nn.BatchNorm1d(6)
            self.c = nn.Linear(6, 6)
            self.batch_stats = nn.BatchNorm1d(6, track_running_stats=False)
            self.d = nn.Linear(6, 6)
            self.folded = nn.BatchNorm1d(6)

        def forward(self, x):
            x = self.after_relu(self.relu(self.after_sum(self.a(x) + self.b(x))))
            return self.folded(self.d(self.batch_stats(self.c(x))))

    torch.manual_seed(2)
    model = randomise_batchnorm(Unfoldable()).eval()
    x = torch.rand(5, 6)
    folded = mapping.fold_batchnorm(model)
    kept = [name for name, m in folded.named_modules() if isinstance(m, nn.BatchNorm1d)]
    assert kept == ["after_sum", "after_relu", "batch_stats"] and isinstance(folded.folded, nn.Identity)
    assert torch.allclose(folded(x), model(x), rtol=1e-5, atol=1e-6)


def test_batchnorm_folding_refuses_a_model_fx_cannot_trace():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.norm = nn.Linear(3, 3), nn.BatchNorm1d(3)

        def forward(self, x):
            return self.norm(self.linear(x)) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="fold_batchnorm=True needs a model torch.fx can trace"):
        mapping.fold_batchnorm(DataDependent().eval())


def test_a_lazy_layer_not_yet_run_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"layer '1' \(LazyLinear\) has uninitialized weight, bias: run the model"):
        convert(model, presets.ideal(), seed=0)


def test_more_row_tiles_mean_more_quantization_error(rng):
    """Same 8-bit ADC range on every tile: each row tile adds an independent uniform
    rounding error of step / sqrt(12), so the RMS error is sqrt(row tiles) times that."""
    w = rng.normal(0, 1, (32, 512))
    x = rng.uniform(0, 1, (512, 512)).astype(np.float32)
    exact = x @ w.T
    scale = 25.0 / np.abs(w).max()
    full_scale = 1.2 * np.abs(exact).max() * scale  # no tile can saturate
    errors = []
    for rows in (512, 128, 32):
        cfg = presets.ideal(rows=rows, cols=32, adc_bits=8, adc_range_mode="fixed").with_path("adc.range", full_scale)
        a = AnalogMatrix(w, cfg, seed=0, mapping=MappingConfig(drift_compensation=False))
        rms = np.sqrt(np.mean((a.matmul(x) - exact) ** 2))
        expected = np.sqrt(512 / rows) * (full_scale / 127) / np.sqrt(12) / scale
        assert abs(rms / expected - 1) < 0.15
        errors.append(rms)
    assert errors[0] < errors[1] < errors[2]


def test_noise_off_results_do_not_depend_on_seed(rng):
    w = rng.normal(0, 1, (20, 70))
    x = rng.uniform(-1, 1, (30, 70)).astype(np.float32)
    cfg = presets.ideal(rows=32, cols=16, dac_bits=5, adc_bits=6)
    ys = [AnalogMatrix(w, cfg, seed=s).calibrate(x).at(1e4).matmul(x) for s in (0, 1)]
    assert np.array_equal(ys[0], ys[1])


def test_drift_compensation_restores_scale(rng):
    w = rng.normal(0, 1, (64, 128))
    x = rng.uniform(0, 1, (200, 128)).astype(np.float32)
    cfg = presets.pcm(rows=64, cols=64, read_noise_1f=False, read_sigma_abs=0.0, prog_noise_scale=0.0)
    exact = x @ w.T
    results = {}
    for comp in (True, False):
        a = AnalogMatrix(w, cfg, seed=3, mapping=MappingConfig(drift_compensation=comp)).calibrate(x)
        y = a.at(3.15e7).matmul(x)
        results[comp] = np.sum(y * exact) / np.sum(exact * exact)  # fitted gain
    assert results[False] < 0.6          # a year of drift halves the conductances
    assert abs(results[True] - 1) < 0.1  # compensated


def test_save_reload_is_bitwise_equal():
    model = randomise_batchnorm(cnn())
    x = torch.rand(8, 3, 16, 16)
    cfg = presets.pcm(rows=32, cols=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analog = convert(model, cfg, seed=7)
        analog.calibrate([x[:4], x[4:]])
        first = analog.at(3600.0)(x)
        buffer = io.BytesIO()
        torch.save(analog.state_dict(), buffer)
        buffer.seek(0)
        other = convert(model, cfg, seed=99)
        fresh = convert(model, cfg, seed=99).calibrate([x[:4], x[4:]]).at(3600.0)(x)
    assert not torch.equal(fresh, first)
    other.load_state_dict(torch.load(buffer))  # weights_only: the state is tensors and numbers
    assert other.time == 3600.0  # the saved chip's time (the model said 0.0 before)
    assert torch.equal(other(x), first) and torch.equal(other.at(3600.0)(x), first)


def test_a_model_with_no_analog_layer_tells_its_device_and_time():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analog = convert(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), presets.pcm(), seed=0)
    assert analog.analog_layers() == [] and analog.device == torch.device("cpu")
    assert analog.at(60.0).time == 60.0


def test_a_chip_of_another_tile_size_is_refused_by_name_and_not_loaded():
    model = mlp()
    saved = convert(model, presets.pcm(rows=32, cols=32), seed=0).state_dict()
    target = convert(model, presets.pcm(rows=64, cols=64), seed=1)
    grid = target.module[0].matrices[0].grid
    held = grid.g_prog.clone(), list(grid.seeds)
    with pytest.raises(RuntimeError, match=r"module\.0\.matrices\.0\.grid\.g_prog: the saved chip holds a "
                                           r"\(40, 70\) matrix on 6 tiles; this grid holds \(40, 70\) on 2 tiles "
                                           r"of 64 x 64"):
        target.load_state_dict(saved)
    assert torch.equal(grid.g_prog, held[0]) and grid.seeds == held[1]  # the misfit chip was not taken


def test_bad_inputs_raise_clear_errors():
    model = mlp()
    model[2].weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'2'.*1 NaN"):
        convert(model, presets.ideal(), seed=0)
    analog = convert(mlp(), presets.pcm(rows=32, cols=32), seed=0)
    with pytest.raises(RuntimeError, match="'0'.*calibrate"):
        analog(torch.rand(2, 40))
    analog.calibrate([torch.rand(8, 40)])
    with pytest.raises(ValueError, match=r"'0'.*\(\.\.\., 40\)"):
        analog(torch.rand(2, 41))
    with pytest.raises(ValueError, match="nothing"):
        analog.calibrate([])
    with pytest.raises(ValueError, match="tile_config"):
        convert(mlp(), {"rows": 3})
    with pytest.raises(ValueError, match="fold_batchnorm"):
        convert(mlp(), presets.ideal(), fold_batchnorm="yes")
    with pytest.raises(ValueError, match="mapping"):
        convert(mlp(), presets.ideal(), mapping={"scale": "layer"})


def test_counts_report_clipping_and_saturation():
    analog = convert(mlp(), presets.ideal(rows=32, cols=32, adc_bits=4, dac_bits=4), seed=0,
                     mapping=MappingConfig(clip="std", clip_value=1.0))
    x = torch.rand(64, 40) * 3  # beyond the fixed DAC range of 1
    analog.calibrate([torch.rand(64, 40)])
    analog(x)
    counts = analog.counts()
    assert counts["0"]["clipped_weights"] > 0
    assert counts["0"]["dac_clipped"] > 0
    assert counts["0"]["dac_converted"] == 64 * 40 * 3  # the 70 outputs span three 32-column tiles
    assert counts["2"]["adc_converted"] == 64 * 10 * 3  # 70 inputs span three 32-row tiles


def test_weights_held_are_the_float_weights_in_torchs_names_and_layouts_on_ideal_tiles():
    torch.manual_seed(7)
    model = nn.ModuleDict({
        "linear": nn.Linear(30, 7), "conv1": nn.Conv1d(4, 6, 3, groups=2), "conv2": nn.Conv2d(3, 5, (2, 3)),
        "conv3": nn.Conv3d(2, 4, 2), "up1": nn.ConvTranspose1d(4, 6, 3, groups=2),
        "up2": nn.ConvTranspose2d(6, 3, (2, 3), groups=3), "attn": nn.MultiheadAttention(12, 2),
        "attn_kv": nn.MultiheadAttention(12, 2, kdim=5, vdim=7), "gru": nn.GRU(5, 9, bidirectional=True),
    })
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analog = convert(model, presets.ideal(rows=16, cols=8), seed=0)
    keys = []
    for name in model:
        for key, held in analog.module[name].weights_held().items():
            want = model[name].get_parameter(key).detach()
            assert held.shape == want.shape and held.dtype == torch.float32
            assert float((held - want).abs().max()) <= 1e-6 * float(want.abs().max())
            keys.append(f"{name}.{key}")
    assert keys == [f"{n}.{p}" for n, p in mapping.tile_parameters(model)]


def test_an_input_that_requires_grad_is_told_once_that_no_gradient_flows():
    """A converted model's passes run under no_grad: its output never requires grad.
    Before, that was silent until backward() failed with torch's generic message."""
    analog = convert(mlp(), presets.ideal(rows=32, cols=32), seed=0)
    x = torch.rand(3, 40, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="an analog model computes no gradients") as caught:
        y = analog(x)
        analog({"input": x}["input"])  # once per model
    assert len(caught) == 1 and not y.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            convert(mlp(), presets.ideal(rows=32, cols=32), seed=0)(x)  # no gradient asked: no warning
        convert(mlp(), presets.ideal(rows=32, cols=32), seed=0)(x.detach())


def test_a_converted_model_is_not_converted_again():
    """Before, convert(analog_model, other_config) returned a copy that ran on the first
    chip, whatever the new configuration, without a word."""
    analog = convert(mlp(), presets.pcm(rows=32, cols=32), seed=0)
    with pytest.raises(ValueError, match=r"model = AnalogModel is invalid: it holds analog layers already "
                                         r"\('module.0', 'module.2'\): convert the float model"):
        convert(analog, presets.ideal(rows=64, cols=64), seed=1)
    with pytest.raises(ValueError, match=r"holds analog layers already \('0'\)"):
        convert(nn.Sequential(analog.module[0]), presets.ideal(), seed=1)
