import numpy as np
import pytest
import torch
from torch import nn

from crossbar import TileConfig
from eval.baseline import noisy_copy
from eval.config import BaselineConfig, RunConfig, ValidationConfig, run_config_from_dict
from eval.experiment import run_experiment, validation_check, validation_tile_config
from eval.models import build_model
from eval.stats import difference_ci, summarize
from eval.train import load_checkpoint, save_checkpoint, train, training_record
from tests.mapping.test_skipping import MultiTask


def test_summary_statistics_on_known_values():
    s = summarize([0.9, 0.8, 0.7, 0.6])
    assert s["accuracy_mean"] == pytest.approx(0.75)
    assert s["accuracy_std"] == pytest.approx(np.std([0.9, 0.8, 0.7, 0.6], ddof=1))
    half = 3.182446305284263 * s["accuracy_std"] / 2  # t(0.975, 3) * s / sqrt(4)
    assert s["ci95"] == pytest.approx([0.75 - half, 0.75 + half])
    # no spread to estimate: the CI is not available, never a zero-width interval
    assert summarize([0.5])["ci95"] is None and summarize([0.7, 0.7, 0.7])["ci95"] is None
    diff, ci = difference_ci([1.0, 1.0, 1.0], [0.5, 0.5, 0.5])
    assert diff == 0.5 and ci is None


def test_ci_covers_the_true_mean_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    trials = 2000
    covered = sum(lo <= 0.3 <= hi for lo, hi in
                  (summarize(list(rng.normal(0.3, 0.05, 5)))["ci95"] for _ in range(trials)))
    # binomial(2000, 0.95): 5 sigma is 2.4 points
    assert abs(covered / trials - 0.95) < 5 * np.sqrt(0.95 * 0.05 / trials)


def test_training_steps_reduce_the_loss(digits):
    model = build_model("cnn", digits.input_shape, 10, True)
    losses = train(model, digits, 3, seed=1, progress=False)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("normalization,level", [("std", 0.1), ("max", 0.05), ("snr_db", 20.0)])
def test_baseline_gives_the_requested_sigma(trained_mlp, normalization, level):
    noisy, sigmas = noisy_copy(trained_mlp, normalization, level, np.random.default_rng(0))
    for name in ("1", "4", "7"):
        w = dict(trained_mlp.named_parameters())[f"{name}.weight"].detach().double()
        delta = (dict(noisy.named_parameters())[f"{name}.weight"].detach().double() - w).numpy().ravel()
        if normalization == "std":
            expected = level * w.std().item()
        elif normalization == "max":
            expected = level * w.abs().max().item()
        else:
            expected = np.sqrt((w ** 2).mean().item() / 10 ** (level / 10))
        assert sigmas[f"{name}.weight"] == pytest.approx(expected)
        n = delta.size
        assert abs(delta.std(ddof=1) / expected - 1) < 5 / np.sqrt(2 * (n - 1))
        assert abs(delta.mean()) < 5 * expected / np.sqrt(n)
    for name, p in trained_mlp.named_parameters():
        if name.endswith("bias"):  # biases untouched unless asked
            assert torch.equal(p, dict(noisy.named_parameters())[name])


def test_baseline_noises_bias_and_batchnorm_only_on_request(digits):
    model = build_model("mlp", digits.input_shape, 10, True).eval()
    _, sigmas = noisy_copy(model, "std", 0.1, np.random.default_rng(0))
    assert all(k.endswith("weight") and k in ("1.weight", "4.weight", "7.weight") for k in sigmas)
    _, sigmas = noisy_copy(model, "std", 0.1, np.random.default_rng(0), noise_bias=True, noise_batchnorm=True)
    assert {"1.bias", "2.weight", "2.bias"} <= set(sigmas)


def test_baseline_noises_the_weights_convert_puts_on_tiles_in_attention_and_recurrent_layers():
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "lstm": nn.LSTM(8, 4)})
    noisy, sigmas = noisy_copy(model, "std", 0.1, np.random.default_rng(0))
    assert list(sigmas) == ["attn.in_proj_weight", "attn.out_proj.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0"]
    for key, p in model.named_parameters():
        assert torch.equal(p, noisy.get_parameter(key)) == (key not in sigmas)


def test_validation_passes_for_gaussian_and_fails_with_a_3_bit_adc(digits, trained_mlp):
    cfg = ValidationConfig()
    test = digits.batches("test")
    calibration = digits.batches("train", limit=256)
    tile = validation_tile_config(TileConfig(rows=64, cols=64), cfg)
    good = validation_check(trained_mlp, test, calibration, cfg, tile, repeats=6, seed=0, progress=False)
    assert good["verdict"] == "PASSED" and good["passed"], good
    assert -cfg.tolerance <= good["ci95"][0] and good["ci95"][1] <= cfg.tolerance
    coarse = tile.with_path("adc.bits", 3).with_path("adc.range_mode", "calibrated")
    bad = validation_check(trained_mlp, test, calibration, cfg, coarse, repeats=6, seed=0, progress=False)
    assert bad["verdict"] == "FAILED" and not bad["passed"], bad
    assert bad["ci95"][1] < -cfg.tolerance


def test_validation_with_one_repeat_cannot_decide(digits, trained_mlp):
    cfg = ValidationConfig()
    tile = validation_tile_config(TileConfig(rows=64, cols=64), cfg)
    one = validation_check(trained_mlp, digits.batches("test"), digits.batches("train", limit=256), cfg, tile,
                           repeats=1, seed=0, progress=False)
    assert one["verdict"] == "INCONCLUSIVE" and one["passed"] is False and one["ci95"] is None


def test_checkpoint_round_trip_and_mismatch(tmp_path, digits, trained_mlp):
    path = tmp_path / "m.pt"
    save_checkpoint(path, trained_mlp, training_record(digits, "mlp", False, 8, 0), 0.9)
    model, meta = load_checkpoint(path, digits, "mlp", False)
    assert meta["test_accuracy"] == 0.9
    x = digits.test_x[:5]
    assert torch.equal(model(x), trained_mlp(x))
    with pytest.raises(ValueError, match="holds model 'mlp'"):
        load_checkpoint(path, digits, "cnn")
    path.write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_run_config_errors_name_the_key():
    with pytest.raises(ValueError, match="tile.device: DeviceConfig.drift_scale = -1"):
        run_config_from_dict({"tile": {"device": {"drift_scale": -1}}}).tile
    with pytest.raises(ValueError, match="unknown field tile.dac.bitz"):
        run_config_from_dict({"tile": {"dac": {"bitz": 3}}})
    with pytest.raises(ValueError, match="BaselineConfig.normalization"):
        BaselineConfig(normalization="var")
    with pytest.raises(ValueError, match="RunConfig.repeats"):
        RunConfig(repeats=0)
    with pytest.raises(ValueError, match="preset"):
        run_config_from_dict({"preset": "rram"})


def test_config_files_that_cannot_be_read_name_the_file(tmp_path):
    from eval.config import load_run_config
    from eval.sweep_spec import SpecError, load_spec

    missing = tmp_path / "missing.toml"
    with pytest.raises(ValueError, match=f"{missing}: cannot read: .*No such file"):
        load_run_config(str(missing))
    broken = tmp_path / "broken.toml"
    broken.write_text('preset = "pcm"\n[tile\n')
    with pytest.raises(ValueError, match=f"{broken}: not valid TOML: .*line 2"):
        load_run_config(str(broken))
    with pytest.raises(SpecError, match=f"{broken}: not valid TOML"):
        load_spec(str(broken))
    with pytest.raises(ValueError, match=r"tile = 'big' is invalid: expected a table of fields"):
        run_config_from_dict({"tile": "big"})
    with pytest.raises(ValueError, match=r"tile.adc = 8 is invalid: expected a table of fields"):
        run_config_from_dict({"tile": {"adc": 8}})


def test_run_experiment_leaves_the_callers_model_as_it_was():
    """Before, it moved the caller's model to the CPU, cast it to float32 and left it in
    eval mode: a training loop that evaluated on chips went on training with its dropout
    and batch norm frozen. Now it works on a copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3)).double()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]
    config = RunConfig(repeats=1, times=(1.0,), baseline=BaselineConfig(enabled=False),
                       validation=ValidationConfig(enabled=False), tile=TileConfig())
    results = run_experiment(model, batches, batches, config, progress=False, histograms=False)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert results["test_samples"] == 32 and 0.0 <= results["ideal_accuracy"] <= 1.0


def test_run_experiment_takes_models_that_choose_their_layers_per_call():
    g = torch.Generator().manual_seed(3)
    batches = [({"x": torch.rand(8, 8, generator=g), "task": task}, torch.randint(0, 3, (8,), generator=g))
               for task in ("a", "b")]
    config = RunConfig(repeats=2, times=(1.0,), baseline=BaselineConfig(enabled=False), tile=TileConfig())
    with pytest.raises(RuntimeError, match="allow_skipping"):
        run_experiment(MultiTask(), batches, batches, config, progress=False, histograms=False)
    results = run_experiment(MultiTask(), batches, batches, config, progress=False, histograms=False,
                             allow_skipping="heads.*")
    assert len(results["analog"][0]["accuracies"]) == 2 and results["validation"]["repeats"] == 2
    for bad in (3, {"heads.*": 1}, ["heads.*", 4]):
        with pytest.raises(ValueError, match=r"allow_skipping = .* is invalid: expected an analog layer's name"):
            run_experiment(MultiTask(), batches, batches, config, progress=False, allow_skipping=bad)
    with pytest.raises(ValueError, match="layers: 'nope' is invalid"):
        run_experiment(MultiTask(), batches, batches, config, progress=False, allow_skipping=["nope"])
