"""The float side of a run (training, the ideal model, the additive baseline, the
validation's baseline) computes on the run's device, in IEEE float32 like the chips,
with the same noisy weights for a seed on every device."""
import pytest
import torch

from crossbar import precision
from eval.cli import main
from eval.config import BaselineConfig, ValidationConfig
from eval.experiment import evaluate_baseline, float_accuracy, validation_check, validation_tile_config
from eval.hwa import HWAConfig, WeightNoise
from eval.sweep import load_context, prepare_models
from eval.sweep_spec import load_spec
from eval.train import accuracy, load_checkpoint, seeded_model, train, train_or_load
from mapping import convert
from mapping.devices import module_device
from crossbar import presets
from tests.conftest import ieee, needs_cuda


def recording(model):
    """The model, with every forward pass recording the precision settings it ran under
    (a deep copy, as the baseline's noisy copies are, keeps the hook)."""
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(list(precision.settings().values())))
    return model, seen


def test_float_evaluations_run_in_ieee_float32_whatever_the_process_settings(digits, trained_mlp,
                                                                            reduced_precision):
    """A training script may leave TF32 on (cuDNN's default for convolutions on a GPU):
    the ideal model and the baseline are still the float32 model the chips are compared
    with, and the process's settings are back after."""
    import copy

    model, seen = recording(copy.deepcopy(trained_mlp))
    before = list(precision.settings().values())
    assert before != ieee()
    test = digits.batches("test", limit=100)
    float_accuracy(model, test)
    evaluate_baseline(model, test, BaselineConfig(eta=(0.1,)), 2, seed=0, progress=False)
    tile = validation_tile_config(presets.pcm(rows=64, cols=64), ValidationConfig())
    validation_check(model, test, digits.batches("train", limit=100), ValidationConfig(), tile, 2, seed=0,
                     progress=False)
    assert len(seen) >= 1 + 2 + 2  # the ideal pass, two noisy copies, two validation copies (and chips)
    assert all(s == ieee() for s in seen)
    assert list(precision.settings().values()) == before


def test_module_device_is_where_the_tensors_are(trained_mlp):
    assert module_device(trained_mlp) == torch.device("cpu")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")  # no tensors: the CPU
    analog = convert(trained_mlp, presets.ideal(), seed=0)
    assert module_device(analog) == analog.device == torch.device("cpu")


def test_checkpoints_record_the_device_they_were_trained_on_outside_the_cache_key(digits, tmp_path):
    _, meta, path = train_or_load(digits, "mlp", False, tmp_path, epochs=1, seed=0, progress=False)
    assert meta["trained_on"] == "cpu"
    assert "trained_on" not in path.name and torch.load(path, weights_only=True)["trained_on"] == "cpu"


def test_train_refuses_an_unknown_device_before_reading_data(tmp_path, capsys):
    # mnist without --data-dir would fail too: the device is checked first
    code = main(["train", "--dataset", "mnist", "--device", "tpu", "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "--device = 'tpu' is invalid: expected 'cpu', 'cuda' or 'cuda:N'" in err
    assert not (tmp_path / "m.pt").exists()


SPEC = '''
dataset = "digits"
model = "mlp"
repeats = 1
seed = 0
epochs = 1
eval_samples = 60
[grid]
"tile.rows" = [64]
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a client that has no GPU")
def test_a_dask_client_without_a_gpu_makes_the_context_on_its_cpu(tmp_path):
    """With a cluster, --device cuda names the workers' GPUs: the client, which may have
    none, trains and computes the ideal accuracy on its CPU and sends the context on."""
    (tmp_path / "spec.toml").write_text(SPEC)
    spec = load_spec(str(tmp_path / "spec.toml"))
    checkpoints = prepare_models(spec, tmp_path, progress=False)
    ctx = load_context(spec, checkpoints, "cuda", ideal_on_device=False)
    assert ctx.device == "cuda"
    model, _ = load_checkpoint(checkpoints[("mlp", False)])
    assert ctx.ideal[("mlp", False)] == accuracy(model, ctx.data.batches("test", limit=60))
    with pytest.raises(ValueError, match="--device = 'cuda' is invalid: torch sees no CUDA GPU"):
        load_context(spec, checkpoints, "cuda")  # a local worker computes where its chips do


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_the_float_side_equals_the_cpu_within_float_rounding(digits, trained_mlp):
    """The same noisy weights on both devices (drawn on the host): accuracies agree but
    for a test sample whose two best scores are within float32 rounding (at most one)."""
    test = digits.batches("test")
    n = sum(len(y) for _, y in test)
    assert abs(float_accuracy(trained_mlp, test, torch.device("cuda")) - float_accuracy(trained_mlp, test)) <= 1 / n
    cfg = BaselineConfig(eta=(0.1, 0.3))
    on_gpu = evaluate_baseline(trained_mlp, test, cfg, 3, seed=0, progress=False, device=torch.device("cuda"))
    on_cpu = evaluate_baseline(trained_mlp, test, cfg, 3, seed=0, progress=False)
    for g, c in zip(on_gpu, on_cpu):
        assert g["layer_sigmas"] == pytest.approx(c["layer_sigmas"], rel=1e-6)
        assert all(abs(a - b) <= 1 / n for a, b in zip(g["accuracies"], c["accuracies"]))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("hwa", [HWAConfig(), HWAConfig(mode="additive", eta=0.1),
                                 HWAConfig(mode="device", t_min=3600.0, t_max=3600.0)])
def test_training_on_cuda_follows_the_cpu_and_spares_the_callers_rng(digits, hwa):
    """The same initial weights, sample order and injected noise (all drawn on the host):
    one epoch on the GPU ends within float rounding's drift of the CPU's weights."""
    models = [seeded_model("mlp", digits, False, seed=0) for _ in range(2)]
    models[1] = models[1].cuda()
    cuda_state = torch.cuda.get_rng_state()
    losses = [train(m, digits, 1, seed=0, progress=False, hwa=hwa) for m in models]
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert q.device.type == "cuda"
        assert torch.allclose(p, q.cpu(), rtol=1e-3, atol=1e-4)


def test_device_noise_programmed_from_host_copies_equals_noise_from_the_layers(digits, monkeypatch):
    """A model training on a GPU has its weights mapped from host copies of its layers and
    its chips programmed by the torch engine where it trains: the same chips, bitwise, as
    from the layers themselves on the host (forced here on the CPU: the torch engine on
    the CPU device)."""
    import eval.hwa
    from crossbar.grid import grids_made_on

    model = seeded_model("cnn", digits, False, seed=0)
    hwa = HWAConfig(mode="device", t_min=3600.0, t_max=3600.0)
    noise = WeightNoise(model, hwa, seed=3)
    direct, _ = noise.draw()
    copies, made_on = [], []
    real_deepcopy = eval.hwa.copy.deepcopy
    monkeypatch.setattr(eval.hwa, "module_device", lambda module: torch.device("cuda"))
    monkeypatch.setattr(eval.hwa.copy, "deepcopy", lambda m: copies.append(m) or real_deepcopy(m))
    monkeypatch.setattr(eval.hwa, "grids_made_on",
                        lambda device: made_on.append(device) or grids_made_on("cpu", engine="torch"))
    copied, _ = WeightNoise(model, hwa, seed=3).draw()
    assert made_on == [torch.device("cuda")]
    assert len(copies) == len(direct) == 3  # every mapped layer (the CNN's two convolutions and its Linear)
    assert all(torch.equal(a, b) for a, b in zip(direct, copied))
    clean = [model.get_parameter(key) for key in noise.keys]
    assert not any(torch.equal(a, w) for a, w in zip(direct, clean))  # noise was injected
