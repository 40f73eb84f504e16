"""Hardware-aware training: the injected noise has the configured statistics (bounds from
the sample size) and is the converted chip's own in device mode; noise off trains bitwise
as plain training; clipping holds after every step; gradients pass the straight-through
converters; checkpoints and the model cache record how a model was trained."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import eval.train as training
from crossbar import presets
from eval.cli import main
from eval.config import ValidationConfig, load_run_config
from eval.experiment import validation_tile_config
from eval.hwa import HWAConfig, WeightNoise, describe, load_hwa_config, straight_through_converters
from eval.train import load_checkpoint, seeded_model, train, train_or_load
from mapping import MappingConfig, convert
from tests.conftest import z_bound


def wide_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))


def check_gaussian(delta: torch.Tensor, sigma: float) -> None:
    """Mean 0 and standard deviation sigma, within 5 standard errors of n samples."""
    d = delta.double().flatten()
    n = d.numel()
    assert abs(float(d.mean())) <= sigma * z_bound(n)
    assert abs(float(d.std()) / sigma - 1) <= z_bound(2 * n)  # the sample sd's relative SE is 1/sqrt(2n)


@pytest.mark.parametrize("normalization", ["std", "max"])
def test_additive_noise_is_eta_times_the_tensors_scale_and_fresh_per_batch(normalization):
    model = wide_mlp()
    noise = WeightNoise(model, HWAConfig(mode="additive", eta=0.3, normalization=normalization), seed=0)
    assert noise.keys == ["0.weight", "2.weight"]  # biases stay digital and clean
    w = model[0].weight.detach()
    first, second = (noise.draw()[0][0] - w for _ in range(2))
    scale = float(w.std()) if normalization == "std" else float(w.abs().max())
    check_gaussian(first, 0.3 * scale)
    check_gaussian(second, 0.3 * scale)
    n = first.numel()
    correlation = float(np.corrcoef(first.flatten(), second.flatten())[0, 1])
    assert abs(correlation) <= z_bound(n)


def test_device_noise_is_the_weights_the_converted_chip_holds():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 40), nn.ReLU(),
                          nn.Unflatten(1, (5, 8)), nn.LSTM(8, 6, batch_first=True))
    config = HWAConfig(mode="device", t_min=10.0, t_max=1e6, tile=presets.pcm(rows=32, cols=16))
    noise = WeightNoise(model, config, seed=3)
    noisy, t = noise.draw()
    assert 10.0 <= t <= 1e6
    chip = convert(model, noise.tile, seed=noise.chip_seed(0), mapping=config.mapping)
    chip.at(t)
    held = {}
    for name in ("0", "3", "6"):
        held.update({f"{name}.{p}": w for p, w in chip.module.get_submodule(name).weights_held().items()})
    assert noise.keys == ["0.weight", "3.weight", "6.weight_ih_l0", "6.weight_hh_l0"]
    for key, weights in zip(noise.keys, noisy):
        assert torch.equal(weights, held[key])
    # the next batch: another chip, another time
    later, t_later = noise.draw()
    assert t_later != t and not torch.equal(later[0], noisy[0])


def test_device_noise_works_for_tiles_whose_converters_need_bits():
    # bit-serial DACs and ADC errors are valid only with finite converters; the device mode
    # replaces the converters (not weight errors) with ideal ones instead of unsetting bits
    tile = presets.pcm().with_path("dac.bits_per_cycle", 2).with_path("adc.offset_sigma", 0.5)
    model = wide_mlp()
    noisy, _ = WeightNoise(model, HWAConfig(mode="device", tile=tile), seed=0).draw()
    error = float((noisy[0] - model[0].weight.detach()).std() / model[0].weight.detach().std())
    assert 0.05 < error < 0.5  # a PCM chip's effective eta (0.12 to 0.19 at 1 x noise in the main job)


def test_device_noise_with_gaussian_programming_noise_is_the_baseline_at_the_equivalent_sigma():
    # PHYSICS.md section 7: W_read = W + sqrt(2) sigma_abs max|W| / (g_max - g_min) xi
    model = wide_mlp()
    validation = ValidationConfig()
    mapping = MappingConfig(scale="layer", clip="max", drift_compensation=False)
    config = HWAConfig(mode="device", tile=validation_tile_config(presets.pcm(), validation), mapping=mapping)
    noisy, _ = WeightNoise(model, config, seed=0).draw()
    w = model[0].weight.detach()
    sigma = np.sqrt(2) * validation.prog_sigma_abs * float(w.abs().max()) / (validation.g_max - validation.g_min)
    check_gaussian(noisy[0] - w, sigma)


def test_no_noise_trains_bitwise_as_plain_training(digits):
    plain = seeded_model("cnn", digits, False, 0)
    plain_losses = train(plain, digits, 1, seed=0, progress=False)
    for config in (HWAConfig(), HWAConfig(mode="additive", eta=0.0)):
        model = seeded_model("cnn", digits, False, 0)
        assert train(model, digits, 1, seed=0, progress=False, hwa=config) == plain_losses
        a, b = plain.state_dict(), model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    noisy = seeded_model("cnn", digits, False, 0)
    train(noisy, digits, 1, seed=0, progress=False, hwa=HWAConfig(mode="additive", eta=0.5))
    assert not torch.equal(noisy.state_dict()["1.weight"], plain.state_dict()["1.weight"])  # noise is used


def test_clipping_holds_after_every_step(digits, monkeypatch):
    bounds = {}
    real_clip = training.clip_weights

    def recording_clip(model, k):  # the bound of each tensor from its weights before clipping
        for key in ("0.0.weight", "0.3.weight", "1.weight"):
            bounds[key] = k * float(model.get_parameter(key).detach().std())
        real_clip(model, k)

    checked = []

    def check(step, model):
        for key, bound in bounds.items():
            w = model.get_parameter(key).detach()
            assert float(w.abs().max()) <= bound * (1 + 1e-6)
        clipped = model.get_parameter("1.weight").detach().abs()
        checked.append(bool((clipped >= bounds["1.weight"] * (1 - 1e-6)).any()))

    monkeypatch.setattr(training, "clip_weights", recording_clip)
    model = seeded_model("cnn", digits, False, 0)
    train(model, digits, 1, seed=0, progress=False, hwa=HWAConfig(clip_sigma=1.5), after_step=check)
    assert len(checked) == 23 and all(checked)  # every step; at 1.5 std some weights always sit at the bound


def test_gradients_pass_straight_through_the_converters():
    torch.manual_seed(2)
    layer = nn.Linear(8, 5)
    x = torch.randn(4, 8, requires_grad=True)
    with straight_through_converters(layer, dac_bits=3, adc_bits=4):
        y = layer(x)
        y.sum().backward()
    w, b = layer.weight.detach(), layer.bias.detach()
    step_in = float(x.detach().abs().max()) / 3
    x_q = torch.round(x.detach() / step_in) * step_in
    product = x_q @ w.t()
    step_out = float(product.abs().max()) / 7
    assert torch.allclose(y.detach(), torch.round(product / step_out) * step_out + b, atol=1e-6)
    # straight through: d/dx as without the quantizers, d/dW at the quantized input
    assert torch.allclose(x.grad, torch.ones(4, 5) @ w)
    assert torch.allclose(layer.weight.grad, torch.ones(4, 5).t() @ x_q)
    assert not layer._forward_hooks and not layer._forward_pre_hooks  # removed afterwards
    conv = nn.Conv2d(2, 3, 3)
    with straight_through_converters(conv, None, 4):
        out = conv(torch.randn(2, 2, 5, 5)) - conv.bias.view(1, 3, 1, 1)
    levels = out.detach() / (float(out.detach().abs().max()) / 7)
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # the ADC acts before the bias
    unbiased = nn.Conv2d(2, 3, 3, bias=False)  # (a ResNet's, before its batch norm)
    with straight_through_converters(unbiased, None, 4):
        out = unbiased(torch.randn(2, 2, 5, 5))
    levels = out.detach() / (float(out.detach().abs().max()) / 7)
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() == 7
    with pytest.raises(ValueError, match="'0' is a LSTM"):
        with straight_through_converters(nn.Sequential(nn.LSTM(4, 4)), 6, None):
            pass


def test_checkpoints_and_the_cache_record_how_a_model_was_trained(digits, tmp_path, capsys):
    hwa = HWAConfig(mode="additive", eta=0.1, clip_sigma=3.0)
    _, plain_meta, plain_path = train_or_load(digits, "mlp", False, tmp_path, epochs=1, progress=False)
    model, meta, path = train_or_load(digits, "mlp", False, tmp_path, epochs=1, progress=False, hwa=hwa)
    assert "hwa" not in plain_meta and "-hwa-" not in plain_path.name  # plain models keep their cache keys
    assert path != plain_path and "-hwa-additive-" in path.name
    assert meta["hwa"] == {"mode": "additive", "clip_sigma": 3.0, "dac_bits": None, "adc_bits": None,
                           "normalization": "std", "eta": 0.1}
    other = train_or_load(digits, "mlp", False, tmp_path, epochs=1, progress=False, hwa=hwa.replace(eta=0.2))[2]
    assert other != path
    assert load_checkpoint(path)[1]["hwa"] == meta["hwa"]
    assert describe(meta["hwa"]) == "for the chip: additive weight noise, eta 0.1 x std(W), weights clipped to 3 std"
    out = tmp_path / "out"
    config = tmp_path / "quick.toml"
    config.write_text("[baseline]\nenabled = false\n[validation]\nenabled = false\n")
    assert main(["run", "--checkpoint", str(path), "--config", str(config), "--repeats", "1", "--times", "1",
                 "--out", str(out), "--no-progress"]) == 0
    assert f"checkpoint {path}: mlp trained for the chip: additive weight noise" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["training"]["hwa"] == meta["hwa"]


def test_device_mode_keys_its_models_by_the_chip_draws_they_trained_with(monkeypatch):
    """A device-mode model trained on chips of other draws (numpy's PCG64 streams, before
    the counter-based ones) is another model: its cache key records the draws' version;
    the additive mode's does not depend on chips and keeps its key."""
    import eval.hwa
    device, additive = HWAConfig(mode="device"), HWAConfig(mode="additive")
    now = (device.record(), additive.record())
    assert now[0]["chip_draws"] == 2 and "chip_draws" not in now[1]
    monkeypatch.setattr(eval.hwa, "CHIP_DRAWS_VERSION", 1)
    assert device.record() != now[0] and additive.record() == now[1]


def test_train_command_with_a_config_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config = tmp_path / "chip.toml"
    config.write_text('preset = "pcm"\nrepeats = 3\n[tile.device]\nprog_noise_scale = 2.0\n'
                      '[hwa]\nmode = "device"\nt_min = 60\nt_max = 86400\nclip_sigma = 3.0\n')
    hwa = load_hwa_config(str(config))
    assert hwa.mode == "device" and hwa.tile.device.prog_noise_scale == 2.0 and hwa.t_max == 86400.0
    assert load_run_config(str(config)).repeats == 3  # the same file drives xbarsim run
    ckpt = tmp_path / "m.pt"
    assert main(["train", "--model", "mlp", "--epochs", "1", "--config", str(config), "--out", str(ckpt)]) == 0
    assert "for the chip: device weight noise (pcm tiles, times 1 min to 1 d)" in capsys.readouterr().out
    assert torch.load(ckpt, weights_only=True)["hwa"]["tile"]["device"]["prog_noise_scale"] == 2.0
    # the command line wins over the file; --hwa-eta belongs to the additive mode
    assert main(["train", "--model", "mlp", "--epochs", "1", "--config", str(config), "--hwa", "additive",
                 "--hwa-eta", "0.2", "--out", str(ckpt)]) == 0
    assert torch.load(ckpt, weights_only=True)["hwa"]["eta"] == 0.2
    assert main(["train", "--config", str(config), "--hwa-eta", "0.2", "--out", str(ckpt)]) == 2
    assert "--hwa-eta 0.2 is the additive mode's noise level; training mode is 'device'" in capsys.readouterr().err
    for text, message in (('[hwa]\nmode = "noisy"\n', "HWAConfig.mode = 'noisy' is invalid"),
                          ('[hwa]\nt_min = 100\nt_max = 10\n', "HWAConfig.t_max = 10 is invalid"),
                          ('[hwa]\n[hwa.tile]\nrows = 64\n', "hwa.tile: give preset, \\[tile\\] and \\[mapping\\]")):
        config.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_hwa_config(str(config))
