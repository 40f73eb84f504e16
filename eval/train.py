"""Training with a progress bar, on the device the model is on, and checkpoints that
record what they hold.

Training is a pure function of (data, model, batch norm, epochs, seed, recipe): the
initial weights and the sample order both come from the seed, on generators of their
own, so the same command gives bitwise the same weights on the CPU and the caller's
global torch RNG is left as it was. On a GPU, cuDNN is asked for deterministic
algorithms, but some backward kernels (adaptive average pooling's, among others) add
with atomics, so weights trained there can differ in their last bits from run to run.
The model cache is keyed on all of these and on a fingerprint of the data, so other
files under the same data set name never reuse a model; where it was trained is
recorded (``trained_on``) but is not part of the key: a model trained on either device
serves runs on both, so a run's chips are the same on either device.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

import crossbar
from mapping import mapped_modules
from mapping.copying import computed_weights
from mapping.devices import module_device
from mapping.inputs import call_model, map_tensors

from .datasets import Dataset
from .hwa import HWAConfig, WeightNoise, clip_weights, straight_through_converters
from .models import build_model

DEFAULT_EPOCHS = {"digits": 40, "mnist": 3, "cifar10": 15, "cifar100": 15}
# The training recipe: everything besides data, model, epochs and seed that decides
# the trained weights. A change here must change RECIPE["version"] so that cached
# models trained the old way are not reused.
RECIPE = {"version": 2, "optimizer": "adam", "schedule": "cosine", "lr": 2e-3, "batch_size": 64}
_CHECKPOINT_KEYS = ("model", "batchnorm", "dataset", "input_shape", "num_classes", "state_dict")


def _check_epochs(epochs) -> int:
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs = {epochs!r} is invalid: expected an integer >= 1")
    return epochs


def seeded_model(name: str, data: Dataset, batchnorm: bool, seed: int, device=None) -> nn.Module:
    """build_model with initial weights drawn from ``seed`` (the global RNG untouched),
    on the CPU, so that they are the same whatever ``device`` (None: the CPU) it is then
    moved to."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(name, data.input_shape, data.num_classes, batchnorm)
    return model if device is None else model.to(device)


def _rng_devices(device: torch.device) -> list:
    """The CUDA devices whose RNG a training run on ``device`` draws from (dropout)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextmanager
def _deterministic_cudnn(device: torch.device):
    """cuDNN's deterministic algorithms, no autotuning, while training on a GPU; the
    process's settings are restored after."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


def train(model: nn.Module, data: Dataset, epochs: int, seed: int = 0, lr: float = RECIPE["lr"],
          batch_size: int = RECIPE["batch_size"], progress: bool = True, hwa: Optional[HWAConfig] = None,
          after_step: Optional[Callable[[int, nn.Module], None]] = None) -> list:
    """Adam with a cosine learning-rate schedule; returns the mean loss of each epoch
    (of the losses at the noisy weights, where ``hwa`` injects noise). Training runs on
    the device the model is on (``model.to("cuda")`` first to train on a GPU); the data
    is moved there once.

    ``hwa`` trains for the chip (:mod:`eval.hwa`; None or the default HWAConfig: plainly,
    bitwise as without it). ``after_step(step, model)`` is called after every optimizer
    step (and the clipping that follows it), e.g. to log or check weights. The sample
    order, any randomness inside the model (dropout) and the injected noise come from
    ``seed``; the global torch RNG is restored afterwards."""
    _check_epochs(epochs)
    hwa = hwa if hwa is not None else HWAConfig()
    if not isinstance(hwa, HWAConfig):
        raise ValueError(f"hwa = {hwa!r} is invalid: expected an eval.hwa.HWAConfig or None")
    mapped = {name for name, _, _ in mapped_modules(model)[0]} if not hwa.plain else set()
    computed = [name for name in computed_weights(model) if name in mapped]
    if computed:  # noise, clipping and the converters' hooks act on a layer's own weight tensor
        raise ValueError(f"hwa: layer {computed[0]!r} computes its weight from other tensors (pruning, weight or "
                         f"spectral norm, a parametrization), which hardware-aware training cannot perturb: make "
                         f"its weight plain first (mapping.plain_copy(model).train(), or torch's prune.remove)")
    noise = WeightNoise(model, hwa, seed) if hwa.mode != "off" else None
    device = module_device(model)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    order_rng = torch.Generator().manual_seed(seed)  # on the CPU: the same order on every device
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(data.train_x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    bar = tqdm(total=steps, desc=f"training on {data.name}", unit="step", disable=not progress, leave=False)
    step = 0
    with torch.random.fork_rng(devices=_rng_devices(device)), _deterministic_cudnn(device), \
            straight_through_converters(model, hwa.dac_bits, hwa.adc_bits):
        torch.manual_seed(seed)
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(len(train_x), generator=order_rng)
            total, count = 0.0, 0
            for i in range(0, len(perm), batch_size):
                idx = perm[i:i + batch_size]
                if len(idx) < 2:  # batch norm cannot train on a single sample
                    continue
                idx = idx.to(device)
                with noise.applied() if noise is not None else nullcontext():
                    loss = loss_fn(model(train_x[idx]), train_y[idx])
                    opt.zero_grad()
                    loss.backward()  # the gradient at the noisy weights, for the clean ones
                opt.step()
                sched.step()
                if hwa.clip_sigma:
                    clip_weights(model, hwa.clip_sigma)
                step += 1
                if after_step is not None:
                    after_step(step, model)
                total += loss.item() * len(idx)
                count += len(idx)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            losses.append(total / max(count, 1))
    bar.close()
    model.eval()
    return losses


IGNORED_LABEL = -100  # torch's CrossEntropyLoss ignore_index default


def accuracy(model: nn.Module, batches) -> float:
    """Top-1 accuracy, a fraction in [0, 1], over (inputs, labels) batches (inputs as in
    :mod:`mapping.inputs`: a tensor, a tuple of positional inputs or a dict): the share
    of labels whose class scores (the model's output, classes last) are highest; labels
    per position (a sequence's tokens) count one each, but positions labelled -100 (the
    padding that torch's cross-entropy ignores by default) are not scored. Inputs are
    moved to the model's device (``mapping.devices.module_device``)."""
    correct = total = 0
    device = module_device(model)
    with torch.no_grad():
        for inputs, y in batches:
            scores = call_model(model, map_tensors(inputs, lambda t: t.to(device)))
            if not isinstance(scores, torch.Tensor):
                raise ValueError(f"accuracy: the model returned a {type(scores).__name__}: expected a tensor of "
                                 f"class scores, classes last")
            predicted, y = scores.argmax(-1).cpu(), torch.as_tensor(y).cpu()  # (labels may be on a GPU too)
            if predicted.shape != y.shape:  # (broadcasting would compare every prediction with every label)
                raise ValueError(f"accuracy: the model's scores of shape {tuple(scores.shape)} give predictions "
                                 f"of shape {tuple(predicted.shape)} (classes last) for labels of shape "
                                 f"{tuple(y.shape)}: expected the same shape")
            scored = y != IGNORED_LABEL
            if (y[scored] < 0).any():
                raise ValueError(f"accuracy: labels hold {int(y[scored].min())}: expected class indices >= 0, "
                                 f"or {IGNORED_LABEL} for positions not scored")
            correct += (predicted[scored] == y[scored]).sum().item()
            total += int(scored.sum())  # (per token, for labels per position)
    if total == 0:
        raise ValueError("accuracy: the batches held no samples")
    return correct / total


def training_record(data: Dataset, model_name: str, batchnorm: bool, epochs: int, seed: int,
                    hwa: Optional[HWAConfig] = None) -> dict:
    """Everything that decides a trained model's weights; ``hwa`` only where training was
    hardware-aware (so plainly trained models keep the keys they always had)."""
    record = {"dataset": data.name, "data_fingerprint": data.fingerprint(), "input_shape": list(data.input_shape),
              "num_classes": data.num_classes, "model": model_name, "batchnorm": batchnorm, "epochs": epochs,
              "seed": seed, "recipe": dict(RECIPE)}
    hwa_record = hwa.record() if hwa is not None else None
    if hwa_record is not None:
        record["hwa"] = hwa_record
    return record


def training_key(record: dict) -> str:
    return hashlib.blake2b(json.dumps(record, sort_keys=True).encode(), digest_size=8).hexdigest()


def check_checkpoint_path(path) -> Path:
    """A checkpoint path that can be written: not a directory, its folder creatable."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out {path}: is a directory; give the checkpoint's file name (e.g. {path / 'model.pt'})")
    from .outputs import check_writable_dir

    check_writable_dir(path.parent, f"--out {path}")
    return path


def save_checkpoint(path, model: nn.Module, record: dict, test_accuracy: float) -> None:
    """Write the model (its tensors on the CPU), how it was trained (``training_record``),
    the kind of device it was trained on and its test accuracy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    payload = {**record, "test_accuracy": test_accuracy, "xbarsim_version": crossbar.__version__,
               "trained_on": module_device(model).type,
               "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}
    try:
        torch.save(payload, tmp)
        tmp.replace(path)  # a crash mid-write never leaves a truncated checkpoint
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path, data: Optional[Dataset] = None, model_name: Optional[str] = None,
                    batchnorm: Optional[bool] = None) -> tuple:
    """(model, metadata). Given data/model/batchnorm, a checkpoint of something else is
    refused; every unreadable file is a ValueError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types on garbage
        raise ValueError(f"checkpoint {path}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _CHECKPOINT_KEYS):
        missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        raise ValueError(f"checkpoint {path}: not an xbarsim checkpoint (missing {', '.join(missing)}); "
                         f"a plain state_dict cannot say which model it holds: write one with 'xbarsim train'")
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    expected = {"dataset": data.name if data else None, "model": model_name, "batchnorm": batchnorm}
    for key, want in expected.items():
        if want is not None and meta[key] != want:
            raise ValueError(f"checkpoint {path} holds {key} {meta[key]!r}, but {want!r} was asked for")
    try:
        with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: spare the caller's RNG
            model = build_model(meta["model"], tuple(meta["input_shape"]), meta["num_classes"], meta["batchnorm"])
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {path}: its weights do not fit model {meta['model']!r}: {first}") from None
    return model.eval(), meta


def train_or_load(data: Dataset, model_name: str, batchnorm: bool, cache_dir: Path, epochs: Optional[int] = None,
                  seed: int = 0, progress: bool = True, hwa: Optional[HWAConfig] = None,
                  device: Optional[torch.device] = None) -> tuple:
    """(model, metadata, path): the cached checkpoint for this data (by fingerprint),
    model, batch norm, epochs, seed, recipe and hardware-aware training, trained (on
    ``device``; None: the CPU) and cached if missing. The model returned is on the CPU."""
    epochs = _check_epochs(epochs if epochs is not None else DEFAULT_EPOCHS[data.name])
    record = training_record(data, model_name, batchnorm, epochs, seed, hwa)
    mode = f"-hwa-{record['hwa']['mode']}" if "hwa" in record else ""
    name = (f"{data.name}-{model_name}-{'bn' if batchnorm else 'nobn'}-e{epochs}-s{seed}{mode}-"
            f"{training_key(record)}.pt")
    path = Path(cache_dir) / "checkpoints" / name
    if not path.is_file():
        model = seeded_model(model_name, data, batchnorm, seed, device)
        train(model, data, epochs, seed=seed, progress=progress, hwa=hwa)
        save_checkpoint(path, model, record, accuracy(model, data.batches("test")))
    model, meta = load_checkpoint(path, data, model_name, batchnorm)
    if meta.get("data_fingerprint") != record["data_fingerprint"]:
        raise ValueError(f"cached checkpoint {path} was trained on other data; remove it")
    return model, meta, path
